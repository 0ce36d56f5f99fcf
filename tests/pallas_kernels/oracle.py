"""Naive dense oracles for the attention ops: float64 NumPy (forward values) and float32 jnp (for jax.grad)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# float32 math for real: on GPU, XLA would otherwise run float32 matmuls in TF32 (about 1e-3 relative error).
_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def to_float64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def token_mask(block_mask, seq_len: int, block_size: int = 64) -> np.ndarray:
    """bool [B, N, I, J] block mask → bool [B, N, T, S] token mask, causal (c ≤ t) included."""
    blocks = np.asarray(block_mask, bool)
    tokens = blocks.repeat(block_size, axis=2).repeat(block_size, axis=3)[:, :, :seq_len, :seq_len]
    return tokens & np.tri(seq_len, dtype=bool)


def _head_attention(q, k, v, allowed, sm_scale, chunk: int = 512):
    """One head: q [T, H], k/v [S, H], allowed bool [T, S] (causal) → out [T, H], lse [T], probs [T, S] (float64).

    Rows go in chunks that only see keys up to the chunk's last row: the causal half is all that is computed.
    """
    seq_len = q.shape[0]
    out, lse, probs = np.zeros(q.shape), np.zeros(seq_len), np.zeros((seq_len, k.shape[0]))
    for start in range(0, seq_len, chunk):
        rows = slice(start, min(start + chunk, seq_len))
        keys = slice(0, rows.stop)
        chunk_allowed = allowed[rows, keys]  # [rows, keys]
        scores = np.where(chunk_allowed, q[rows] @ k[keys].T * sm_scale, -np.inf)  # [rows, keys]
        nonempty = chunk_allowed.any(axis=-1)  # [rows]
        row_max = np.where(nonempty, scores.max(axis=-1), 0.0)
        chunk_probs = np.exp(scores - row_max[:, None])  # [rows, keys], 0 where not allowed
        row_sum = np.where(nonempty, chunk_probs.sum(axis=-1), 1.0)
        chunk_probs /= row_sum[:, None]
        probs[rows, keys] = chunk_probs
        out[rows] = chunk_probs @ v[keys]
        lse[rows] = np.where(nonempty, row_max + np.log(row_sum), -np.inf)
    return out, lse, probs


def dense_attention(q, k, v, *, sm_scale: float, block_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Softmax attention over causal (and, given a block mask, selected) keys, in float64.

    Returns out [B, T, N, H] (0 on rows with no key) and lse [B, N, T] (natural log, -inf on rows with no key).
    """
    q, k, v = to_float64(q), to_float64(k), to_float64(v)
    batch, seq_len, num_q_heads, _ = q.shape
    group = num_q_heads // k.shape[2]
    allowed = np.tri(seq_len, dtype=bool) if block_mask is None else token_mask(block_mask, seq_len)
    out = np.zeros(q.shape)
    lse = np.zeros((batch, num_q_heads, seq_len))
    for b in range(batch):
        for n in range(num_q_heads):
            head_allowed = allowed if block_mask is None else allowed[b, n]  # [T, S]
            kv = n // group
            out[b, :, n], lse[b, n], _ = _head_attention(q[b, :, n], k[b, :, kv], v[b, :, kv], head_allowed, sm_scale)
    return out, lse


def pooled_attention(q, k, v, *, sm_scale: float, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense causal attention plus SeerAttention's pooled map (SEER_SPEC §2.1), in float64.

    Returns out [B, T, N, H], pooled [B, N, I, J] (2D max-pool of the probabilities, rows normalised), lse [B, N, T].
    """
    q, k, v = to_float64(q), to_float64(k), to_float64(v)
    batch, seq_len, num_q_heads, _ = q.shape
    group = num_q_heads // k.shape[2]
    num_blocks = -(-seq_len // block_size)
    padding = num_blocks * block_size - seq_len
    causal = np.tri(seq_len, dtype=bool)
    out = np.zeros(q.shape)
    lse = np.zeros((batch, num_q_heads, seq_len))
    pooled = np.zeros((batch, num_q_heads, num_blocks, num_blocks))
    for b in range(batch):
        for n in range(num_q_heads):
            kv = n // group
            out[b, :, n], lse[b, n], probs = _head_attention(q[b, :, n], k[b, :, kv], v[b, :, kv], causal, sm_scale)
            # Zero padding never wins a max of probabilities, so partial blocks pool over their valid entries.
            probs = np.pad(probs, ((0, padding), (0, padding)))
            raw = probs.reshape(num_blocks, block_size, num_blocks, block_size).max(axis=(1, 3))  # [I, J]
            pooled[b, n] = raw / raw.sum(axis=-1, keepdims=True)
    return out, pooled, lse


def dense_masked_attention_jnp(q, k, v, allowed, *, sm_scale: float) -> tuple[jax.Array, jax.Array]:
    """float32 jnp version of `dense_attention`, differentiable with `jax.grad` (no NaN grads).

    `allowed` is the bool [B, N, T, S] `token_mask`. Pass it as an argument, not a closure constant, under jit:
    XLA would constant-fold reductions over it for a minute. Materialises [B, N, T, S] scores and repeats K/V per
    query head: for tests at small T only.
    """
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)  # [B, S, N, H]
    scores = _einsum("btnh,bsnh->bnts", q, k) * sm_scale  # [B, N, T, S]
    # A large finite fill (not -inf) keeps fully masked rows finite, so their zeroed gradients are not NaN.
    scores = jnp.where(allowed, scores, -1e30)
    lse = jax.nn.logsumexp(scores, axis=-1)  # [B, N, T]
    probs = jnp.where(allowed, jnp.exp(scores - lse[..., None]), 0.0)  # [B, N, T, S]
    out = _einsum("bnts,bsnh->btnh", probs, v)  # [B, T, N, H]
    return out, jnp.where(allowed.any(axis=-1), lse, -jnp.inf)
