"""The compact block-sparsity format consumed by `block_sparse_attention`, and conversions from/to block masks.

A SeerAttention gate decides, for every (batch, query head, 64-row query block), which 64-key blocks to compute.
As a boolean block mask that is [B, N, I, J]. Kernels want a list per row instead: `BlockIndex`.
Both conversions are plain XLA (cumsum + scatter, no sort), cheap next to attention itself.
`check_block_index` verifies a user-built `BlockIndex` against the contract below.
"""

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.blocks import BLOCK_SIZE, causal_block_mask
from pallas_kernels.validation import is_concrete

__all__ = [
    "BLOCK_SIZE",
    "BlockIndex",
    "block_index_from_mask",
    "block_mask_from_index",
    "causal_block_mask",
    "check_block_index",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockIndex:
    """Selected key blocks per query-block row, as a padded, sorted index list plus a count.

    Attributes:
      indices: int32 [B, N, I, J]. For batch b, query head n and query block i, the first `counts[b, n, i]`
        entries are the selected key-block indices j, strictly ascending, each in [0, i] (causal: blocks above
        the diagonal are never listed). The remaining entries are padding and hold i (the diagonal block of
        that row), so every entry is a valid, in-range block index and each row is non-decreasing.
      counts: int32 [B, N, I]. Number of valid entries per row, in [0, i + 1]. A row with count 0 computes
        nothing and its attention output is zero.
    """

    indices: jax.Array
    counts: jax.Array

    @property
    def num_q_blocks(self) -> int:
        return self.indices.shape[-2]

    @property
    def num_kv_blocks(self) -> int:
        return self.indices.shape[-1]


@jax.jit
def block_index_from_mask(block_mask: jax.Array) -> BlockIndex:
    """bool [B, N, I, J] block mask → `BlockIndex`. Blocks above the diagonal are dropped (causal)."""
    if block_mask.ndim != 4:
        raise ValueError(f"block_mask must be [B, N, I, J], got shape {block_mask.shape}")
    num_q_blocks, num_kv_blocks = block_mask.shape[-2:]
    mask = block_mask.astype(bool) & causal_block_mask(num_q_blocks, num_kv_blocks)
    counts = jnp.sum(mask, axis=-1, dtype=jnp.int32)  # [B, N, I]
    # Selected block j goes to slot (number of selected blocks before it); unselected ones go to slot J (dropped).
    slots = jnp.where(mask, jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1, num_kv_blocks)
    diagonal = jnp.minimum(jnp.arange(num_q_blocks, dtype=jnp.int32), num_kv_blocks - 1)
    padding = jnp.broadcast_to(diagonal[:, None], (num_q_blocks, num_kv_blocks))
    columns = jnp.arange(num_kv_blocks, dtype=jnp.int32)

    def compact_row(row_slots, row_padding):
        return row_padding.at[row_slots].set(columns, mode="drop")

    compact = jax.vmap(jax.vmap(jax.vmap(compact_row, in_axes=(0, 0)), in_axes=(0, None)), in_axes=(0, None))
    indices = compact(slots, padding)  # [B, N, I, J]
    return BlockIndex(indices=indices, counts=counts)


@jax.jit
def block_mask_from_index(index: BlockIndex) -> jax.Array:
    """`BlockIndex` → bool [B, N, I, J] block mask (padding entries ignored)."""
    num_kv_blocks = index.num_kv_blocks
    valid = jnp.arange(num_kv_blocks)[None, None, None, :] < index.counts[..., None]  # [B, N, I, J]
    targets = jnp.where(valid, index.indices, num_kv_blocks)  # padding → slot J, dropped by the scatter

    def scatter_row(row_targets):
        return jnp.zeros((num_kv_blocks,), jnp.bool_).at[row_targets].set(True, mode="drop")

    return jax.vmap(jax.vmap(jax.vmap(scatter_row)))(targets)


def check_block_index(index: BlockIndex, *, batch: int, num_q_heads: int, num_blocks: int) -> None:
    """Raises `ValueError` unless `index` follows the `BlockIndex` contract for [B, N, I, I] blocks.

    Shapes and dtypes are always checked; the values (ranges, order, padding) only when the arrays are concrete
    (not traced), since checking them means reading them back to the host.
    """
    expected = (batch, num_q_heads, num_blocks, num_blocks)
    if index.indices.shape != expected or index.indices.dtype != jnp.int32:
        raise ValueError(
            f"index.indices must be int32 [B, N, I, J] = {expected}, "
            f"got {index.indices.dtype} {tuple(index.indices.shape)}"
        )
    if index.counts.shape != expected[:3] or index.counts.dtype != jnp.int32:
        raise ValueError(
            f"index.counts must be int32 [B, N, I] = {expected[:3]}, "
            f"got {index.counts.dtype} {tuple(index.counts.shape)}"
        )
    if not is_concrete(index.indices, index.counts):
        return
    bad_counts, out_of_range, unordered, bad_padding = (bool(flag) for flag in _contract_violations(index))
    if bad_counts:
        raise ValueError("index.counts out of range: counts[b, n, i] must be in [0, i + 1]")
    if out_of_range:
        raise ValueError("index.indices out of range: every entry of row i must be in [0, i] (causal)")
    if unordered:
        raise ValueError("index.indices not strictly ascending within the first counts[b, n, i] entries of a row")
    if bad_padding:
        raise ValueError("index.indices padding (entries at or after counts[b, n, i]) must equal the row index i")


@jax.jit
def _contract_violations(index: BlockIndex) -> jax.Array:
    """bool [4]: counts out of range, indices out of range, valid entries not ascending, padding not i."""
    num_q_blocks, num_kv_blocks = index.indices.shape[-2:]
    row = jnp.arange(num_q_blocks, dtype=jnp.int32)[:, None]  # [I, 1]
    slot = jnp.arange(num_kv_blocks, dtype=jnp.int32)  # [J]
    valid = slot < index.counts[..., None]  # [B, N, I, J]
    bad_counts = jnp.any((index.counts < 0) | (index.counts > row[:, 0] + 1))
    out_of_range = jnp.any((index.indices < 0) | (index.indices > row))
    ascending = index.indices[..., 1:] > index.indices[..., :-1]  # [B, N, I, J - 1]
    unordered = jnp.any(valid[..., 1:] & ~ascending)
    bad_padding = jnp.any(~valid & (index.indices != row))
    return jnp.stack([bad_counts, out_of_range, unordered, bad_padding])
