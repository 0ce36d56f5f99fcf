"""`dot_product_attention`: the XLA path against a float64 numpy oracle; cuDNN against XLA on a Hopper GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seer_jax.attention import dot_product_attention

# Jitted: one compilation per case instead of one per eager op.
attention = jax.jit(dot_product_attention, static_argnames=("causal", "implementation"))

# (B, T, S, N, K, H)
SHAPES = {"gqa2": (2, 24, 24, 4, 2, 16), "mha": (1, 17, 17, 3, 3, 8), "mqa": (2, 9, 9, 4, 1, 32)}


def oracle(q, k, v, *, causal, key_mask):
    """Per-head softmax attention in float64 with kv heads repeated."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # [B, S, N, H]
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    allowed = np.ones(logits.shape, bool)
    if causal:
        allowed &= np.tril(np.ones(logits.shape[-2:], bool))
    if key_mask is not None:
        allowed &= np.asarray(key_mask)[:, None, None, :]
    logits = np.where(allowed, logits, -np.inf)
    with np.errstate(invalid="ignore"):  # rows with no visible key become NaN here; callers skip them
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)


def random_inputs(shape, seed=0, dtype=jnp.float32):
    batch, num_queries, num_keys, num_q_heads, num_kv_heads, head_dim = shape
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, num_queries, num_q_heads, head_dim))
    k = rng.normal(size=(batch, num_keys, num_kv_heads, head_dim))
    v = rng.normal(size=(batch, num_keys, num_kv_heads, head_dim))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def left_padding_mask(batch, length):
    """Row b is padded by 5·b keys at the start."""
    return jnp.arange(length)[None, :] >= (5 * jnp.arange(batch))[:, None]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padded", [False, True])
def test_causal_matches_oracle(shape, padded):
    q, k, v = random_inputs(SHAPES[shape])
    key_mask = left_padding_mask(q.shape[0], k.shape[1]) if padded else None
    out = attention(q, k, v, causal=True, key_mask=key_mask, implementation="xla")
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = oracle(q, k, v, causal=True, key_mask=key_mask)
    rows = np.ones(q.shape[:2], bool) if key_mask is None else np.asarray(key_mask)  # queries with a visible key
    np.testing.assert_allclose(np.asarray(out)[rows], expected[rows], atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()  # fully masked (padding) rows are finite, not NaN


def test_decode_over_cache_matches_oracle():
    q, k, v = random_inputs((2, 1, 12, 4, 2, 16))
    key_mask = jnp.asarray([[False] * 3 + [True] * 6 + [False] * 3, [True] * 9 + [False] * 3])  # [B, S]
    out = attention(q, k, v, causal=False, key_mask=key_mask)
    np.testing.assert_allclose(out, oracle(q, k, v, causal=False, key_mask=key_mask), atol=1e-5)


def test_bf16_accumulates_in_float32():
    q, k, v = random_inputs(SHAPES["gqa2"], dtype=jnp.bfloat16)
    out = attention(q, k, v, causal=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), oracle(q, k, v, causal=True, key_mask=None), atol=3e-2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(k_shape=(1, 8, 3, 16)), "kv heads (3) must divide query heads (4)"),
        (dict(k_shape=(1, 6, 2, 16)), "causal attention needs as many queries as keys"),
        (dict(k_shape=(1, 8, 2, 8)), "k and v must be [B, S, K, H] matching q [B, T, N, H]"),
        (dict(key_mask=jnp.ones((1, 7), bool)), "key_mask must be [B, S]"),
        (dict(implementation="flash"), "attention implementation 'flash' is not one of"),
    ],
)
def test_invalid_arguments(kwargs, message):
    q = jnp.ones((1, 8, 4, 16))
    k = jnp.ones(kwargs.pop("k_shape", (1, 8, 2, 16)))
    with pytest.raises(ValueError) as raised:
        dot_product_attention(q, k, k, causal=True, **kwargs)
    assert message in str(raised.value)


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True])
def test_cudnn_matches_xla(padded):
    q, k, v = random_inputs((2, 256, 256, 8, 2, 128), dtype=jnp.bfloat16)
    key_mask = left_padding_mask(2, 256) if padded else None
    out = attention(q, k, v, causal=True, key_mask=key_mask, implementation="cudnn")
    reference = attention(q, k, v, causal=True, key_mask=key_mask, implementation="xla")
    assert np.isfinite(np.asarray(out, np.float32)).all()
    rows = np.ones((2, 256), bool) if key_mask is None else np.asarray(key_mask)
    np.testing.assert_allclose(np.asarray(out, np.float32)[rows], np.asarray(reference, np.float32)[rows], atol=2e-2)


@pytest.mark.gpu
def test_cudnn_decode_matches_xla():
    q, k, v = random_inputs((2, 1, 256, 8, 2, 128), dtype=jnp.bfloat16)
    key_mask = jnp.arange(256)[None, :] < jnp.asarray([[100], [256]])
    out = attention(q, k, v, causal=False, key_mask=key_mask, implementation="cudnn")
    reference = attention(q, k, v, causal=False, key_mask=key_mask, implementation="xla")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(reference, np.float32), atol=2e-2)
