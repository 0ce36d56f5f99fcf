"""`python -m pallas_kernels.bench --decode` runs end to end on CPU at a tiny size and writes its JSON."""

import json

import pytest

from pallas_kernels import bench


def test_bench_decode_reference_on_cpu(tmp_path, capsys):
    flags = ["--shapes", "h64", "--batches", "2", "--contexts", "256", "--sparsities", "0", "0.9"]
    flags += ["--runs", "1", "--warmup", "1", "--steps", "2", "--implementation", "reference"]
    path = bench.main(["--decode", *flags, "--output-dir", str(tmp_path)])
    record = json.loads(path.read_text())
    assert {"date", "git_commit", "jax_version", "device", "config", "rows"} <= record.keys()
    rows = {(row["case"], row["implementation"]): row for row in record["rows"]}
    assert list(rows) == [
        ("dense", "cudnn"),
        ("dense", "xla"),
        ("sparse 0.00", "reference"),
        ("sparse 0.90", "reference"),
    ]
    assert rows[("sparse 0.00", "reference")]["blocks"] == 4 and rows[("sparse 0.90", "reference")]["blocks"] == 1
    for key in list(rows)[1:]:
        assert rows[key]["ms"] > 0 and rows[key]["gbps"] > 0 and rows[key]["speedup_vs_best_dense"] > 0
    assert "sparse 0.90" in capsys.readouterr().out


def test_bench_decode_block_size_32(tmp_path):
    """--block-size 32 counts and selects 32-key blocks (256 keys: 8 blocks, 1 of them at sparsity 0.9)."""
    flags = ["--shapes", "h64", "--batches", "1", "--contexts", "256", "--sparsities", "0", "0.9", "--block-size", "32"]
    flags += ["--runs", "1", "--warmup", "1", "--steps", "2", "--implementation", "reference"]
    record = json.loads(bench.main(["--decode", *flags, "--output-dir", str(tmp_path)]).read_text())
    assert record["config"]["block_size"] == 32
    blocks = {row["case"]: row["blocks"] for row in record["rows"] if row["implementation"] == "reference"}
    assert blocks == {"sparse 0.00": 8, "sparse 0.90": 1}
    with pytest.raises(ValueError, match="multiples of 32"):
        bench.main(["--decode", *flags[:5], "100", *flags[6:], "--output-dir", str(tmp_path)])


def _profiled_run(tmp_path, implementation: str) -> dict:
    flags = ["--shapes", "h64", "--batches", "1", "--contexts", "4096", "--sparsities", "0", "0.9", "--profile"]
    flags += ["--runs", "1", "--warmup", "1", "--steps", "3", "--implementation", implementation]
    path = bench.main(["--decode", *flags, "--output-dir", str(tmp_path)])
    return {row["case"] + " " + row["implementation"]: row for row in json.loads(path.read_text())["rows"]}


def test_bench_decode_profile_without_gpu_leaves_device_time_empty(tmp_path):
    rows = _profiled_run(tmp_path, "reference")
    assert rows["sparse 0.90 reference"]["ms"] > 0
    assert all(row["device_ms"] is None and row["kernels"] is None for row in rows.values())


@pytest.mark.gpu
def test_bench_decode_profile_on_gpu(tmp_path):
    """The device trace gives each case a time per step below its wall time per step, and the kernels it ran."""
    rows = _profiled_run(tmp_path, "mosaic")
    for row in rows.values():
        if row["ms"] is None:  # cuDNN may decline
            continue
        assert 0 < row["device_ms"] <= row["ms"] and row["device_gbps"] > 0 and row["device_speedup_vs_best_dense"] > 0
        assert row["kernels"] and all(launches > 0 for launches, _ in row["kernels"].values())  # XLA may hoist
    sparse = rows["sparse 0.90 mosaic"]
    assert sum(us for _, us in sparse["kernels"].values()) <= 1e3 * sparse["device_ms"] * 1.01  # busy ≤ span
