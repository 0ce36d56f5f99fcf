"""Causal attention with SeerAttention's 2D max-pooled attention map, in pure jnp.

This is the oracle for the Mosaic GPU kernel, the implementation used off Hopper, and the statement of semantics
(docs/design.md §5, computed in float32 instead of the Triton kernel's bf16 buffers). With G = N / K, causal T == S,
blocks of `block_size` positions (I = J = ceil(T / block_size); the last block may be partial):

    p[b, n, t, c]      = softmax over c ≤ t of q[b, t, n] · k[b, c, n // G] · sm_scale      (0 for c > t)
    out[b, t, n]       = Σ_c p[b, n, t, c] · v[b, c, n // G]                                 q.dtype
    lse[b, n, t]       = log Σ_{c ≤ t} exp(q[b, t, n] · k[b, c, n // G] · sm_scale)         float32, natural log
    raw[b, n, i, j]    = max of p[b, n, t, c] over valid rows t < T of block i and keys c of block j
    pooled[b, n, i, j] = raw[b, n, i, j] / Σ_j raw[b, n, i, j]                               float32

so `pooled` is zero above the diagonal and each row sums to 1 (the sum is > 0: every row's probabilities sum to 1).

Memory: `lax.map` over query blocks; each step holds one block's full score row [B, K, G, block_size, S] in
float32, so the peak is O(B·N·block_size·S) next to the O(B·N·T·H) output, never the Triton kernel's O(T·J)
row-max buffer. Each step computes the whole row, masked half included: this is an oracle, not a fast path.
"""

import functools

import jax
import jax.numpy as jnp

# float32 math for real: on GPU, XLA would otherwise run float32 matmuls in TF32 (about 1e-3 relative error).
_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def attention_with_pooling(
    q: jax.Array, k: jax.Array, v: jax.Array, *, sm_scale: float, block_size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, T, N, H], k/v [B, S, K, H] (T == S) → out [B, T, N, H] (q.dtype), pooled [B, N, I, J], lse [B, N, T]."""
    batch, num_queries, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    num_blocks = -(-num_queries // block_size)
    padded_length = num_blocks * block_size
    # Zero padding is harmless: a padded key c ≥ T is only visible (c ≤ t) to padded rows t ≥ T, which are dropped.
    padding = ((0, 0), (0, padded_length - num_queries), (0, 0), (0, 0))
    q_f32, k_f32, v_f32 = (jnp.pad(x.astype(jnp.float32), padding) for x in (q, k, v))
    q_blocks = q_f32.reshape(batch, num_blocks, block_size, num_kv_heads, group, head_dim)
    q_blocks = q_blocks.transpose(1, 0, 2, 3, 4, 5)  # [I, B, block, K, G, H]
    key_positions = jnp.arange(padded_length)  # [S']

    def one_query_block(block_and_queries):
        block, queries = block_and_queries  # queries: [B, block, K, G, H]
        rows = block * block_size + jnp.arange(block_size)  # [block]
        scores = _einsum("brkgh,bskh->bkgrs", queries, k_f32) * sm_scale  # [B, K, G, block, S']
        scores = jnp.where(key_positions <= rows[:, None], scores, -jnp.inf)
        lse = jax.nn.logsumexp(scores, axis=-1)  # [B, K, G, block]; finite: key c = t is always visible
        probs = jnp.exp(scores - lse[..., None])  # [B, K, G, block, S']
        out = _einsum("bkgrs,bskh->brkgh", probs, v_f32)  # [B, block, K, G, H]
        block_max = probs.reshape(*probs.shape[:-1], num_blocks, block_size).max(axis=-1)  # [B, K, G, block, J]
        raw = jnp.where((rows < num_queries)[:, None], block_max, 0.0).max(axis=-2)  # [B, K, G, J]
        pooled = raw / raw.sum(axis=-1, keepdims=True)  # [B, K, G, J]
        return out, pooled, lse

    out, pooled, lse = jax.lax.map(one_query_block, (jnp.arange(num_blocks), q_blocks))
    out = out.transpose(1, 0, 2, 3, 4, 5).reshape(batch, padded_length, num_q_heads, head_dim)  # [B, T', N, H]
    pooled = pooled.transpose(1, 2, 3, 0, 4).reshape(batch, num_q_heads, num_blocks, num_blocks)  # [B, N, I, J]
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(batch, num_q_heads, padded_length)  # [B, N, T']
    return out[:, :num_queries].astype(q.dtype), pooled, lse[:, :, :num_queries]
