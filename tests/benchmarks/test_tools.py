"""The GPU measurement tools run on CPU at tiny sizes: `benchmarks.gate_path`, `benchmarks.profile_kernels` and
`benchmarks.generate`."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import gate_path, generate, prefill, profile_kernels


def test_gate_path_writes_its_table(tmp_path):
    path = gate_path.main(["--lengths", "256", "--runs", "1", "--commit", "abc", "--output-dir", str(tmp_path)])
    record = json.loads(path.read_text())
    assert record["git_commit"] == "abc"
    [row] = record["rows"]
    parts = ("dense_ms", "gate_ms", "select_ms", "schedule_ms", "gate_path_ms")
    assert row["length"] == 256 and all(row[part] > 0 for part in parts)
    assert row["ratio"] == row["gate_path_ms"] / row["dense_ms"]


def test_profile_cases_compute_attention():
    """At sparsity 0 the sparse case is dense causal attention; the backward case returns q/k/v-shaped gradients."""
    dense, inputs = profile_kernels.case_function("dense", 256, 0.0)
    sparse, sparse_inputs = profile_kernels.case_function("sparse", 256, 0.0)
    for got, want in zip(sparse_inputs[:3], inputs[:3], strict=True):
        np.testing.assert_array_equal(got, want)  # the same q/k/v
    expected = np.asarray(dense(*inputs).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(sparse(*sparse_inputs).astype(jnp.float32)), expected, atol=2e-2, rtol=2e-2)
    backward, backward_inputs = profile_kernels.case_function("backward", 256, 0.5)
    grads = backward(*backward_inputs)
    assert [g.shape for g in grads] == [x.shape for x in backward_inputs[:3]]
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)

    out, pooled = profile_kernels.case_function("pooling", 256, 0.0)[0](*inputs)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), expected, atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(pooled).sum(axis=-1), 1.0, rtol=1e-5)


def test_generate_benchmark_times_dense_and_sparse_generation(tmp_path, monkeypatch):
    """At a tiny width (the Llama-3.1-8B config shrunk) the end-to-end benchmark times both cases per batch size and
    records what BENCHMARKS.md quotes."""
    tiny = {**prefill.LLAMA_31_8B, "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256}
    tiny.update(num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    monkeypatch.setattr(prefill, "LLAMA_31_8B", tiny)  # the model builder and the record read it
    flags = ["--lengths", "128", "--batch-sizes", "1", "2", "--new-tokens", "3", "--densities", "0.5", "--layers", "1"]
    flags += ["--quest-weights", "0", "0.25"]
    path = generate.main([*flags, "--runs", "1", "--commit", "abc", "--output-dir", str(tmp_path), "--profile"])
    record = json.loads(path.read_text())
    assert record["git_commit"] == "abc" and record["model"]["hidden_size"] == 128
    assert len(list(tmp_path.glob("*.json"))) == 1  # the record rewritten after each case, one file
    assert all(row["decode_step_kernels"] is None for row in record["rows"])  # no GPU trace on a CPU
    rows = record["rows"]
    cases = [(row["batch"], row["case"]) for row in rows]
    assert cases == [(batch, case) for batch in (1, 2) for case in ("dense", "seer 0.5", "seer 0.5 +0.25q")]
    for row in rows:
        assert row["generate_ms"] > 0 and row["ttft_ms"] > 0 and row["decode_tokens_per_s"] > 0  # tiny: timing noise
        decode_seconds = max(row["generate_ms"] - row["ttft_ms"], 1e-6) / 1e3
        assert row["decode_tokens_per_s"] == pytest.approx(row["batch"] * 2 / decode_seconds)


def test_prefill_benchmark_times_each_density_and_quest_weight(tmp_path, monkeypatch):
    tiny = {**prefill.LLAMA_31_8B, "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256}
    tiny.update(num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    monkeypatch.setattr(prefill, "LLAMA_31_8B", tiny)
    timed, time_prefill = [], prefill._time_prefill
    monkeypatch.setattr(  # the models timed: their quest weight (None: dense)
        prefill,
        "_time_prefill",
        lambda model, *args: timed.append(getattr(model, "seer_config", None)) or time_prefill(model, *args),
    )
    flags = ["--lengths", "256", "--densities", "0.5", "--quest-weights", "0", "0.25", "--layers", "1", "--runs", "1"]
    record = json.loads(prefill.main([*flags, "--commit", "abc", "--output-dir", str(tmp_path)]).read_text())
    rows = [(row["case"], row["nz_ratio"], row["quest_weight"]) for row in record["rows"]]
    assert rows == [("dense", None, None), ("seer 0.5", 0.5, 0.0), ("seer 0.5 +0.25q", 0.5, 0.25)]
    assert [None if config is None else config.quest_weight for config in timed] == [None, 0.0, 0.25]
    assert all(row["ttft_ms"] > 0 and row["speedup"] > 0 for row in record["rows"])
    assert record["config"]["quest_weights"] == [0.0, 0.25]
    with pytest.raises(ValueError, match="quest_weights"):
        prefill.PrefillBenchConfig(quest_weights=(-1.0,))


def test_decode_step_kernels_subtract_the_first_token(monkeypatch):
    """A decode step's kernels: the whole generation's trace less the first token's, per step."""
    from pallas_kernels.bench_decode import DeviceProfile

    profiles = {
        "whole": DeviceProfile(
            span_ms=12.0, kernels={"gemm": (21.0, 500.0), "topk": (20.0, 200.0), "prefill": (1.0, 90.0)}
        ),
        "first": DeviceProfile(span_ms=2.0, kernels={"gemm": (1.0, 100.0), "prefill": (1.0, 90.0)}),
    }
    monkeypatch.setattr(generate, "device_profile", lambda loop, q, steps: profiles[loop(None)])
    kernels = generate.decode_step_kernels(lambda: "first", lambda: "whole", steps=20, top=2)
    assert kernels == {
        "gemm": [1.0, 20.0],
        "topk": [1.0, 10.0],
        "all": [2.0, 30.0],
        "span": [20.0, 500.0],
    }
