"""`python -m pallas_kernels.bench --decode` runs end to end on CPU at a tiny size and writes its JSON."""

import json

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
