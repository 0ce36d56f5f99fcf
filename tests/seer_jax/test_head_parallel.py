"""The per-device attention ops: the pooled attention's gradient is dense attention's, and the implementation
report for sparse prefill."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention_with_pooling import attention_with_pooling
from seer_jax.attention import dot_product_attention
from seer_jax.head_parallel import attention_with_pooling_per_device, sparse_prefill_implementation


def _qkv(seed: int, length: int = 150):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (2, length, 4, 16), jnp.float32)
    k = jax.random.normal(keys[1], (2, length, 2, 16), jnp.float32)
    v = jax.random.normal(keys[2], (2, length, 2, 16), jnp.float32)
    return q, k, v


def test_pooled_attention_outputs_are_the_ops():
    q, k, v = _qkv(0)
    out, pooled = attention_with_pooling_per_device(q, k, v, block_size=64)
    want_out, want_pooled = attention_with_pooling(q, k, v, block_size=64)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(pooled, want_pooled)


def test_pooled_attention_gradient_is_dense_attentions():
    """Through `out` the gradient equals dense causal attention's; the pooled map passes no gradient back."""
    q, k, v = _qkv(1)
    weights = jax.random.normal(jax.random.key(2), q.shape, jnp.float32)

    def pooled_loss(q, k, v):
        out, pooled = attention_with_pooling_per_device(q, k, v, block_size=64)
        return jnp.sum(out * weights) + 1e3 * jnp.sum(pooled**2)  # the pooled term must contribute nothing

    def dense_loss(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, causal=True) * weights)

    got = jax.grad(pooled_loss, argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(dense_loss, argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        assert np.abs(np.asarray(w)).max() > 1e-2  # a real gradient
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sparse_prefill_implementation_off_hopper_is_the_reference(dtype):
    if jax.default_backend() == "gpu":
        pytest.skip("off-Hopper behaviour")
    shape = dict(num_q_heads=4, num_kv_heads=2, head_dim=128, dtype=dtype)
    assert sparse_prefill_implementation(1, 1000, **shape) == "reference"


@pytest.mark.gpu
def test_sparse_prefill_implementation_on_hopper_is_the_kernel():
    shape = dict(num_q_heads=4, num_kv_heads=2, head_dim=128, dtype=jnp.bfloat16)
    assert sparse_prefill_implementation(1, 1000, **shape) == "mosaic"
