"""Tile constants, the packed tile-schedule format of the sm_90 kernels, its builders, and the kernels' padding.

A kernel's CTA owns a tile of two 64-row blocks (`TILE` = 2 · `BLOCK` rows); its two compute warpgroups own one
block each. The blocks the tile visits (key blocks for the forward and dQ, query blocks for dK/dV) are the union of
the two warpgroups' selections, listed once, ascending, so that one TMA stream serves both:

  entries  int32 [B, N, R/2, Cc/64, 64]  for each pair p of rows 2p, 2p+1 of a bool [B, N, R, C] mask, the first
           counts[b, n, p] entries (flattened over the last two axes) list the columns used by either row,
           ascending, each packed as column | used(2p) << 16 | used(2p+1) << 17; the rest are 0. Cc is C rounded
           up to 64, so that one tile's list is a 2D TMA box of at most 256 × 64 entries.
  counts   int32 [B, N, R/2]  the sizes of the unions.
  dense    int32 [B, N, I/2]  (forward only, `tile_schedule`) 1 where both query blocks use every causal block.

Padding has one owner: each kernel's wrapper pads T up to whole tiles (`padded_length`, `pad_rows`) and the block
mask to match (`pad_block_mask`); the public ops never pad. Zero-padded keys c ≥ T are causally visible only to
padded rows t ≥ T, which the wrappers slice off.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.blocks import BLOCK_SIZE, causal_block_mask

BLOCK = BLOCK_SIZE  # gate granularity: rows per compute warpgroup and keys per K/V block
TILE = 2 * BLOCK  # rows per CTA (two compute warpgroups)
INDEX_BITS = 16  # packed entry: block index | used-by-wg0 << 16 | used-by-wg1 << 17
INDEX_MASK = (1 << INDEX_BITS) - 1
MAX_SEQ_LEN = 256 * BLOCK * BLOCK  # one tile's list is copied as one TMA box of at most 256 × 64 entries


def padded_length(seq_len: int) -> int:
    """T rounded up to whole tiles (Tp)."""
    return -(-seq_len // TILE) * TILE


def pad_rows(x: jax.Array, length: int) -> jax.Array:
    """[B, T, heads, H] zero-padded to [B, length, heads, H]."""
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def pad_block_mask(block_mask: jax.Array, num_blocks: int) -> jax.Array:
    """bool [B, N, I, J] → [B, N, Ip, Ip] (Ip = num_blocks), blocks above the diagonal dropped, padding False."""
    block_mask = block_mask & causal_block_mask(*block_mask.shape[-2:])  # [B, N, I, J]
    pad_rows_, pad_cols = num_blocks - block_mask.shape[2], num_blocks - block_mask.shape[3]
    return jnp.pad(block_mask, ((0, 0), (0, 0), (0, pad_rows_), (0, pad_cols)))  # [B, N, Ip, Ip]


def pair_schedule(block_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Merges the block lists of each pair of rows of a block mask into one packed, ascending list per pair.

    Args:
      block_mask: bool [B, N, R, C] with R even: R rows of which consecutive pairs share a CTA, C columns.

    Returns:
      entries, counts: the module's format (R/2 pairs of rows; columns packed with the rows' "used" bits).
    """
    batch, heads, num_rows, num_cols = block_mask.shape
    padded_cols = -(-num_cols // BLOCK) * BLOCK
    pairs = block_mask.reshape(batch, heads, num_rows // 2, 2, num_cols)  # [B, N, R/2, 2, C]
    used_lo, used_hi = pairs[..., 0, :], pairs[..., 1, :]  # [B, N, R/2, C] each
    union = used_lo | used_hi
    counts = jnp.sum(union, axis=-1, dtype=jnp.int32)  # [B, N, R/2]
    columns = jnp.arange(num_cols, dtype=jnp.int32)
    packed = (
        columns | (used_lo.astype(jnp.int32) << INDEX_BITS) | (used_hi.astype(jnp.int32) << (INDEX_BITS + 1))
    )  # [B, N, R/2, C]
    slots = jnp.where(union, jnp.cumsum(union, axis=-1, dtype=jnp.int32) - 1, padded_cols)

    def compact_row(row_slots, row_packed):
        return jnp.zeros((padded_cols,), jnp.int32).at[row_slots].set(row_packed, mode="drop")

    entries = jax.vmap(jax.vmap(jax.vmap(compact_row)))(slots, packed)  # [B, N, R/2, Cc]
    return entries.reshape(batch, heads, num_rows // 2, padded_cols // BLOCK, BLOCK), counts


def tile_schedule(block_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The forward kernel's schedule: `pair_schedule` over query-block pairs, plus the dense-tile flag.

    Args:
      block_mask: bool [B, N, I, J], causal (nothing above the diagonal), I even.

    Returns:
      entries, counts, dense: the module's format (query tile t = query blocks 2t, 2t+1; columns = key blocks).
    """
    entries, counts = pair_schedule(block_mask)
    num_q_blocks = block_mask.shape[2]
    tiles = jnp.arange(num_q_blocks // 2, dtype=jnp.int32)
    own_counts = jnp.sum(block_mask.reshape(*block_mask.shape[:2], -1, 2, block_mask.shape[3]), -1, jnp.int32)
    dense = (own_counts[..., 0] == 2 * tiles + 1) & (own_counts[..., 1] == 2 * tiles + 2)  # [B, N, I/2]
    return entries, counts, dense.astype(jnp.int32)


def dense_causal_schedule(batch: int, heads: int, num_q_blocks: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The tile schedule of plain causal attention (every block on or below the diagonal)."""
    mask = causal_block_mask(num_q_blocks, num_q_blocks)  # [I, I]
    return tile_schedule(jnp.broadcast_to(mask, (batch, heads, num_q_blocks, num_q_blocks)))
