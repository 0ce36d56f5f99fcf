"""`python -m pallas_kernels.bench` runs end to end on CPU at a tiny length and writes its JSON."""

import json

import pytest

from pallas_kernels import bench
from pallas_kernels.dispatch import hopper_available


def test_bench_reference_on_cpu(tmp_path, capsys):
    flags = ["--lengths", "130", "--sparsities", "0", "0.9", "--runs", "1", "--warmup", "1"]
    path = bench.main([*flags, "--implementation", "reference", "--output-dir", str(tmp_path)])
    record = json.loads(path.read_text())
    assert {"date", "git_commit", "jax_version", "device", "config", "rows"} <= record.keys()
    cases = [row["case"] for row in record["rows"]]
    assert cases == ["dense", "sparse 0.00", "sparse 0.90", "pooling"]
    assert all(row["ms"] > 0 and not row["note"] for row in record["rows"])
    sparse_dense = record["rows"][1]
    assert sparse_dense["density"] == 1.0 and sparse_dense["implementation"] == "reference"
    assert "sparse 0.90" in capsys.readouterr().out


@pytest.mark.skipif(hopper_available(), reason="off Hopper only: the kernels decline and their cases are skipped")
def test_bench_skips_declined_kernels(tmp_path):
    flags = ["--lengths", "64", "--sparsities", "0.5", "--runs", "1", "--topk", "--output-dir", str(tmp_path)]
    rows = {(row["case"], row["implementation"]): row for row in json.loads(bench.main(flags).read_text())["rows"]}
    assert list(rows) == [
        ("dense", "xla"),
        ("sparse 0.50", "mosaic"),
        ("pooling", "mosaic"),
        ("topk 0.50", "reference"),
        ("topk 0.50", "triton"),  # TopK's kernel is Pallas Triton, and the bench says so
    ]
    assert rows[("dense", "xla")]["ms"] > 0 and rows[("topk 0.50", "reference")]["ms"] > 0
    for case in (("sparse 0.50", "mosaic"), ("pooling", "mosaic"), ("topk 0.50", "triton")):
        assert rows[case]["ms"] is None
        assert rows[case]["note"].startswith("skipped: NotImplementedError")


def test_bench_backward_on_cpu(tmp_path):
    flags = ["--lengths", "130", "--sparsities", "0.5", "--runs", "1", "--warmup", "1", "--backward"]
    path = bench.main([*flags, "--implementation", "reference", "--output-dir", str(tmp_path)])
    rows = {row["case"]: row for row in json.loads(path.read_text())["rows"]}
    assert list(rows) == ["dense", "bwd dense", "sparse 0.50", "bwd 0.50", "pooling"]
    for backward, forward in (("bwd dense", "dense"), ("bwd 0.50", "sparse 0.50")):
        both = float(rows[backward]["note"].removeprefix("forward + backward ").removesuffix(" ms"))
        assert both > 0
        # The backward alone is forward + backward minus the forward measured in the same run.
        assert rows[backward]["ms"] == pytest.approx(both - rows[forward]["ms"], abs=1e-3)
    assert rows["bwd 0.50"]["density"] == rows["sparse 0.50"]["density"]


def test_bench_small_heads_on_cpu(tmp_path):
    """`--heads smollm2_135m` benchmarks SmolLM2-135M's 9 query / 3 kv heads of 64 and records them."""
    flags = ["--lengths", "130", "--sparsities", "0.5", "--runs", "1", "--warmup", "1", "--heads", "smollm2_135m"]
    path = bench.main([*flags, "--implementation", "reference", "--output-dir", str(tmp_path)])
    record = json.loads(path.read_text())
    assert (record["shape"]["num_q_heads"], record["shape"]["num_kv_heads"], record["shape"]["head_dim"]) == (9, 3, 64)
    assert record["config"]["heads"] == "smollm2_135m"
    assert [row["case"] for row in record["rows"]] == ["dense", "sparse 0.50", "pooling"]
    assert all(row["ms"] > 0 for row in record["rows"])
    with pytest.raises(ValueError, match="heads"):
        bench.BenchConfig(heads="gpt2")
