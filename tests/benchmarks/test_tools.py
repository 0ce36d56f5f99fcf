"""The GPU measurement tools run on CPU at tiny lengths: `benchmarks.gate_path` and `benchmarks.profile_kernels`."""

import json

import jax.numpy as jnp
import numpy as np

from benchmarks import gate_path, profile_kernels


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
