"""Block-sparse causal attention over 64×64 blocks, forward and backward, in pure jnp.

This is the oracle for the Mosaic GPU kernels, the implementation used off Hopper, and the statement of semantics.
It takes the kernels' selection type, a bool block mask [B, N, I, J]. With G = N / K, causal T == S, blocks of 64
positions (I = J = ceil(T / 64)), query row t (in block i = t // 64) of head n attends key c when

    c ≤ t   and   block_mask[b, n, i, c // 64]                                    ("c is selected for t")

    out[b, t, n] = Σ_{selected c} softmax(q[b, t, n] · k[b, c, n // G] · sm_scale) v[b, c, n // G]     q.dtype
    lse[b, n, t] = log Σ_{selected c} exp(q[b, t, n] · k[b, c, n // G] · sm_scale)    float32, natural log

(entries above the diagonal select nothing). A block row with no selected causal block has out = 0 and lse = -inf;
every row of a block row that selects one has a selected key (the diagonal block holds c = t, and any block below
it is wholly visible), so nothing else is empty.

Algorithm: the mask is listed per block row as a `BlockIndex` (`block_index_from_mask`: the selected causal blocks
ascending, and their count), then a loop over slots s = 0 .. max(counts) - 1. Step s handles, for every (b, n, i)
at once, key block indices[b, n, i, s], gathered from kv head n // G (K/V are never repeated to N heads); rows with
fewer than s + 1 selected blocks are masked in that step. Unselected blocks are never read, and the loop ends with
the longest row.
The forward is FlashAttention-2's online softmax; the backward recomputes probabilities from the saved lse and
scatter-adds dk/dv into the selected blocks. Each step's working set is O(B·N·T·H) (the gathered blocks are the
size of q) and the scores O(B·N·T·64); nothing is O(T·S). The loops have data-dependent trip counts, so these
functions are not differentiable themselves: the public op wraps them in a `jax.custom_vjp`.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention.index import BLOCK_SIZE, BlockIndex, block_index_from_mask

# float32 math for real: on GPU, XLA would otherwise run float32 matmuls in TF32 (about 1e-3 relative error).
_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def block_sparse_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, block_mask: jax.Array, *, sm_scale: float
) -> tuple[jax.Array, jax.Array]:
    """q [B, T, N, H], k/v [B, S, K, H] (T == S), bool block_mask [B, N, I, J] → out [B, T, N, H] (q.dtype),
    lse [B, N, T]."""
    index = block_index_from_mask(block_mask)
    batch, num_queries, num_q_heads = q.shape[:3]
    group = num_q_heads // k.shape[2]
    num_blocks = index.num_q_blocks
    q_blocks = _to_blocks(q, num_blocks) * sm_scale  # [B, N, I, 64, H]
    k_blocks = _to_blocks(k, num_blocks)  # [B, K, J, 64, H]
    v_blocks = _to_blocks(v, num_blocks)  # [B, K, J, 64, H]

    def step(slot, carry):
        row_max, row_sum, acc = carry  # [B, N, I, 64], [B, N, I, 64], [B, N, I, 64, H]
        block_ids = index.indices[..., slot]  # [B, N, I]
        keys = _gather(k_blocks, block_ids, group)  # [B, N, I, 64, H]
        values = _gather(v_blocks, block_ids, group)  # [B, N, I, 64, H]
        # A padding slot's block is not read: 0 · NaN would leak a poisoned block into rows that never select it.
        values = jnp.where((slot < index.counts)[..., None, None], values, 0.0)
        scores = _einsum("bnirh,bnich->bnirc", q_blocks, keys)  # [B, N, I, 64, 64]
        scores = jnp.where(_selected(index, slot, block_ids), scores, -jnp.inf)
        new_max = jnp.maximum(row_max, scores.max(axis=-1))
        # Rows with nothing selected yet keep max -inf; shift them by 0 instead to avoid (-inf) - (-inf) = NaN.
        shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        probs = jnp.exp(scores - shift[..., None])  # [B, N, I, 64, 64], 0 where masked
        rescale = jnp.exp(row_max - shift)  # [B, N, I, 64]
        row_sum = row_sum * rescale + probs.sum(axis=-1)
        acc = acc * rescale[..., None] + _einsum("bnirc,bnich->bnirh", probs, values)
        return new_max, row_sum, acc

    row_shape = q_blocks.shape[:-1]  # [B, N, I, 64]
    init = (jnp.full(row_shape, -jnp.inf), jnp.zeros(row_shape), jnp.zeros(q_blocks.shape))
    row_max, row_sum, acc = jax.lax.fori_loop(0, jnp.max(index.counts), step, init)
    # From the counts, not row_sum > 0: a NaN/inf score makes row_sum NaN/inf, which must stay so (as in dense).
    nonempty = jnp.broadcast_to((index.counts > 0)[..., None], row_sum.shape)  # [B, N, I, 64]
    safe_sum = jnp.where(nonempty, row_sum, 1.0)
    out = jnp.where(nonempty[..., None], acc / safe_sum[..., None], 0.0)  # [B, N, I, 64, H]
    lse = jnp.where(nonempty, row_max + jnp.log(safe_sum), -jnp.inf)  # [B, N, I, 64]
    lse = lse.reshape(batch, num_q_heads, num_blocks * BLOCK_SIZE)[..., :num_queries]  # [B, N, T]
    return _from_blocks(out, num_queries).astype(q.dtype), lse


def block_sparse_attention_bwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_mask: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    d_out: jax.Array,
    d_lse: jax.Array,
    *,
    sm_scale: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of `block_sparse_attention` from its outputs' cotangents.

    Args:
      q, k, v, block_mask, sm_scale: the forward's inputs.
      out: [B, T, N, H], lse: float32 [B, N, T]: the forward's outputs (lse is -inf on empty rows).
      d_out: [B, T, N, H], d_lse: float32 [B, N, T]: cotangents of out and lse.

    Returns:
      dq [B, T, N, H] (q.dtype), dk and dv [B, S, K, H] (k.dtype), summed over each kv head's query-head group.
    """
    index = block_index_from_mask(block_mask)
    num_queries, num_q_heads = q.shape[1:3]
    group = num_q_heads // k.shape[2]
    num_blocks = index.num_q_blocks
    q_blocks = _to_blocks(q, num_blocks) * sm_scale  # [B, N, I, 64, H]
    k_blocks = _to_blocks(k, num_blocks)  # [B, K, J, 64, H]
    v_blocks = _to_blocks(v, num_blocks)  # [B, K, J, 64, H]
    d_out_blocks = _to_blocks(d_out, num_blocks)  # [B, N, I, 64, H]
    # Softmax backward: d_scores = p ⊙ (d_p − delta), with delta = rowsum(d_out ⊙ out) − d_lse (∂lse/∂s = p).
    delta = (d_out_blocks * _to_blocks(out, num_blocks)).sum(axis=-1) - _rows_to_blocks(d_lse, num_blocks)
    # Empty rows (lse = -inf) select nothing, so their lse is never used; 0 keeps exp() finite.
    lse_blocks = _rows_to_blocks(jnp.where(jnp.isfinite(lse), lse, 0.0), num_blocks)  # [B, N, I, 64]
    batch_ids, kv_heads = _gather_ids(*index.counts.shape[:2], group)

    def step(slot, carry):
        dq, dk, dv = carry  # [B, N, I, 64, H], [B, K, J, 64, H], [B, K, J, 64, H]
        block_ids = index.indices[..., slot]  # [B, N, I]
        keys = _gather(k_blocks, block_ids, group)  # [B, N, I, 64, H]
        values = _gather(v_blocks, block_ids, group)  # [B, N, I, 64, H]
        scores = _einsum("bnirh,bnich->bnirc", q_blocks, keys)  # [B, N, I, 64, 64]
        probs = jnp.where(_selected(index, slot, block_ids), jnp.exp(scores - lse_blocks[..., None]), 0.0)
        d_probs = _einsum("bnirh,bnich->bnirc", d_out_blocks, values)  # [B, N, I, 64, 64]
        d_scores = probs * (d_probs - delta[..., None])  # [B, N, I, 64, 64]
        dq = dq + _einsum("bnirc,bnich->bnirh", d_scores, keys)
        dk_slot = _einsum("bnirc,bnirh->bnich", d_scores, q_blocks)  # [B, N, I, 64, H]
        dv_slot = _einsum("bnirc,bnirh->bnich", probs, d_out_blocks)  # [B, N, I, 64, H]
        dk = dk.at[batch_ids, kv_heads, block_ids].add(dk_slot)
        dv = dv.at[batch_ids, kv_heads, block_ids].add(dv_slot)
        return dq, dk, dv

    init = (jnp.zeros(q_blocks.shape), jnp.zeros(k_blocks.shape), jnp.zeros(v_blocks.shape))
    dq, dk, dv = jax.lax.fori_loop(0, jnp.max(index.counts), step, init)
    return (
        _from_blocks(dq * sm_scale, num_queries).astype(q.dtype),
        _from_blocks(dk, num_queries).astype(k.dtype),
        _from_blocks(dv, num_queries).astype(v.dtype),
    )


def _to_blocks(x: jax.Array, num_blocks: int) -> jax.Array:
    """[B, T, heads, H] → float32 [B, heads, I, 64, H], zero-padded to I·64 positions."""
    batch, length, heads, head_dim = x.shape
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, num_blocks * BLOCK_SIZE - length), (0, 0), (0, 0)))
    return x.reshape(batch, num_blocks, BLOCK_SIZE, heads, head_dim).transpose(0, 3, 1, 2, 4)  # [B, heads, I, 64, H]


def _from_blocks(x: jax.Array, length: int) -> jax.Array:
    """[B, heads, I, 64, H] → [B, T, heads, H], dropping the padded positions."""
    batch, heads, num_blocks, block, head_dim = x.shape
    x = x.transpose(0, 2, 3, 1, 4).reshape(batch, num_blocks * block, heads, head_dim)  # [B, I·64, heads, H]
    return x[:, :length]


def _rows_to_blocks(x: jax.Array, num_blocks: int) -> jax.Array:
    """float32 [B, N, T] → [B, N, I, 64], zero-padded."""
    batch, heads, length = x.shape
    x = jnp.pad(x, ((0, 0), (0, 0), (0, num_blocks * BLOCK_SIZE - length)))
    return x.reshape(batch, heads, num_blocks, BLOCK_SIZE)  # [B, N, I, 64]


def _gather_ids(batch: int, num_q_heads: int, group: int) -> tuple[jax.Array, jax.Array]:
    """Batch and kv-head index arrays [B, 1, 1], [1, N, 1] that broadcast against block ids [B, N, I]."""
    return jnp.arange(batch)[:, None, None], (jnp.arange(num_q_heads) // group)[None, :, None]


def _gather(kv_blocks: jax.Array, block_ids: jax.Array, group: int) -> jax.Array:
    """kv_blocks [B, K, J, 64, H], block_ids [B, N, I] → [B, N, I, 64, H]: block block_ids[b, n, i] of head n // G."""
    batch_ids, kv_heads = _gather_ids(*block_ids.shape[:2], group)
    return kv_blocks[batch_ids, kv_heads, block_ids]


def _selected(index: BlockIndex, slot: jax.Array, block_ids: jax.Array) -> jax.Array:
    """bool [B, N, I, 64, 64]: query row r of block i attends key c of block block_ids[b, n, i] at this slot."""
    in_row = slot < index.counts  # [B, N, I]
    offsets = jnp.arange(BLOCK_SIZE)
    query_positions = jnp.arange(index.num_q_blocks)[:, None] * BLOCK_SIZE + offsets  # [I, 64]
    key_positions = block_ids[..., None] * BLOCK_SIZE + offsets  # [B, N, I, 64]
    causal = key_positions[..., None, :] <= query_positions[:, :, None]  # [B, N, I, 64, 64]
    return in_row[..., None, None] & causal
