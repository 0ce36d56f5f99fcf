"""Block-sparse decode attention in pure jnp: the statement of semantics, the test oracle and the CPU path.

Axes: B batch, T query tokens per row (decode steps, ≤ 8), N query heads, K kv heads, G = N / K, H head_dim,
S cache slots, M slots of the block list.

Semantics (SeerAttention-R's sparse decode kernels; a row's tokens may start anywhere in its cache):
  * Row b's cache holds `lengths[b]` valid positions 0 … lengths[b] − 1; position p lives at cache slot
    starts[b] + p (starts = 0: right-aligned caches; starts[b] = the row's left padding: a left-padded cache), so
    starts[b] + lengths[b] ≤ S. Slots outside [starts[b], starts[b] + lengths[b]) are never attended.
  * The T queries are the row's last T tokens, so query t sits at position p(b, t) = lengths[b] − T + t (its own
    key/value already in the cache) and attends the key at position c iff 0 ≤ c ≤ p(b, t) and c's block
    c // block_size is selected for (b, kv head of the query head). Blocks are numbered in positions, not slots:
    block j covers slots starts[b] + j·block_size …, which need not be aligned to block_size.
  * Query head n belongs to kv head n // G; the G heads of a group share one selection.
  * The selection of (b, k) is the set {block_index[b, k, m] : m < block_count[b, k]}; see `check_decode_index`
    for the contract (distinct, in range, any order, padding ignored).
  * out = softmax(q·Kᵀ·sm_scale over the attended keys)·V; a query that attends no key (nothing selected, every
    selected position beyond its own position, p < 0) gives out = 0 and lse = −inf, never NaN.

This file materialises the [B, N, T, S] scores: O(S) work per query like a dense decode step, fine as a CPU path.
"""

import jax
import jax.numpy as jnp
import numpy as np


def check_decode_index(block_index, block_count, *, num_kv_blocks: int) -> None:
    """Raises ValueError unless (block_index, block_count) meets the contract; call on concrete arrays only.

    Contract:
      block_index: int32 [B, K, M], M ≥ 1. For row b and kv head k, the first block_count[b, k] entries are the
        selected key-block ids, each in [0, num_kv_blocks) (block j covers positions j·block_size …
        (j+1)·block_size − 1), pairwise distinct, in any order. Entries at m ≥ block_count[b, k] are padding:
        never read, any value (−1 by convention).
      block_count: int32 [B, K], in [0, M]. 0 selects nothing (that group's outputs are 0).
    A duplicate would be counted twice by the kernel (it streams the list as given), hence the distinctness rule.
    """
    index, count = np.asarray(block_index), np.asarray(block_count)
    num_slots = index.shape[-1]
    if count.min(initial=0) < 0 or count.max(initial=0) > num_slots:
        raise ValueError(f"block_count must be in [0, M = {num_slots}], got values in [{count.min()}, {count.max()}]")
    valid = np.arange(num_slots) < count[..., None]  # [B, K, M]
    selected = index[valid]
    if selected.size and (selected.min() < 0 or selected.max() >= num_kv_blocks):
        raise ValueError(
            f"selected block ids must be in [0, {num_kv_blocks}), got values in [{selected.min()}, {selected.max()}]"
        )
    ordered = np.sort(np.where(valid, index, -1 - np.arange(num_slots)), axis=-1)  # padding made distinct
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        raise ValueError("selected block ids must be distinct within each (row, kv head)")


def selected_block_mask(block_index: jax.Array, block_count: jax.Array, num_kv_blocks: int) -> jax.Array:
    """bool [B, K, J]: True where block j is among the first block_count[b, k] entries of block_index[b, k]."""
    num_slots = block_index.shape[-1]
    valid = jnp.arange(num_slots) < block_count[..., None]  # [B, K, M]
    ids = jnp.where(valid, block_index, num_kv_blocks)  # padding → out of range, dropped by the scatter

    def scatter_row(row_ids):
        return jnp.zeros((num_kv_blocks,), bool).at[row_ids].set(True, mode="drop")

    return jax.vmap(jax.vmap(scatter_row))(ids)  # [B, K, J]


def block_sparse_decode(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    block_index: jax.Array,
    block_count: jax.Array,
    *,
    starts: jax.Array | None = None,
    block_size: int,
    sm_scale: float,
) -> tuple[jax.Array, jax.Array]:
    """q [B, T, N, H], caches [B, S, K, H], starts int32 [B] or None (zeros) → out [B, T, N, H] in q.dtype, lse
    float32 [B, N, T] (natural log).

    Float32 math. See the module docstring for the semantics.
    """
    batch, num_queries, num_q_heads, head_dim = q.shape
    cache_len, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    num_kv_blocks = -(-cache_len // block_size)
    selected = selected_block_mask(block_index, block_count, num_kv_blocks)  # [B, K, J]
    starts = jnp.zeros_like(lengths) if starts is None else starts
    key_positions = jnp.arange(cache_len) - starts[:, None]  # [B, S]: the position held by each slot (< 0: before)
    key_blocks = jnp.clip(key_positions // block_size, 0, num_kv_blocks - 1)  # [B, S]
    selected_keys = jnp.take_along_axis(selected, key_blocks[:, None, :], axis=-1)  # [B, K, S]
    positions = lengths[:, None] - num_queries + jnp.arange(num_queries)  # [B, T]
    causal = (key_positions[:, None, :] >= 0) & (key_positions[:, None, :] <= positions[..., None])  # [B, T, S]
    allowed = selected_keys[:, :, None, :] & causal[:, None, :, :]  # [B, K, T, S]

    qg = q.astype(jnp.float32).reshape(batch, num_queries, num_kv_heads, group, head_dim)  # [B, T, K, G, H]
    scores = jnp.einsum(
        "btkgh,bskh->bkgts", qg, k_cache.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )  # [B, K, G, T, S]
    scores = jnp.where(allowed[:, :, None], scores * sm_scale, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)  # [B, K, G, T, 1]
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # empty rows: exp(-inf - 0) = 0, no NaN
    probs = jnp.exp(scores - row_max)  # [B, K, G, T, S]
    row_sum = jnp.sum(probs, axis=-1, keepdims=True)
    out = jnp.einsum(
        "bkgts,bskh->btkgh", probs / jnp.where(row_sum == 0, 1.0, row_sum), v_cache.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )  # fmt: skip  # [B, T, K, G, H]
    lse = jnp.where(row_sum == 0, -jnp.inf, row_max + jnp.log(row_sum))[..., 0]  # [B, K, G, T]
    out = out.reshape(batch, num_queries, num_q_heads, head_dim).astype(q.dtype)  # [B, T, N, H]
    return out, lse.reshape(batch, num_q_heads, num_queries)  # [B, N, T]
