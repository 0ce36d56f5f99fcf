"""Block selection: from block scores [B, N, I, J] to the boolean block mask that sparse attention computes.

This module is the one owner of selection: causal masking, the forced diagonal, `last_block_dense`, the all-dense
shortcut (`Selection.is_dense`) and the density of a mask (`block_density`). Masks are in each row's own block
coordinates: with `lengths`, row b's real tokens are its first lengths[b] positions (`seer_jax.seer` moves left
padding out of the way before selecting).

SeerAttention (docs/design.md §3) scores every 64×64 (query block i, key block j) pair, per query head, and keeps
  * `nz_ratio` (TopK): the same k = max(1, int((1 − sqrt(1 − nz)) · J)) blocks in every row, chosen on the raw
    masked scores; with causal truncation the kept fraction of the causal triangle ≈ 2r − r² = nz for r = k/J;
  * `threshold`: the blocks whose softmax probability over the row's causal key blocks exceeds the threshold.
Both optionally keep each row's last two real query-block rows dense (`last_block_dense`) and drop blocks above
the diagonal.

Unlike the reference implementation, the diagonal block is always kept, so no row is ever empty: the official
code can select nothing in a row under `threshold` and its kernel then divides 0 by 0 (docs/design.md §6.1).

The scores can come from a learned AttnGate (logits), from the true pooled attention map (the oracle upper
bound), or from training-free heuristics (`seer_jax.block_scores`): selection does not care.
"""

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import BLOCK_SIZE, causal_block_mask  # also for seer_jax's other modules
from pallas_kernels.block_topk import block_topk_mask

SparsityMethod = Literal["nz_ratio", "threshold"]
NUM_DENSE_LAST_ROWS = 2  # `last_block_dense` keeps this many final query-block rows dense (docs/design.md §3)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Selection:
    """How block scores become a block mask.

    Attributes:
      method: "nz_ratio" (TopK per row) or "threshold" (on the row softmax of the scores).
      nz_ratio: target causal block density for "nz_ratio", in (0, 1]; 1 keeps every causal block.
      threshold: probability threshold for "threshold", in [0, 1); 0 keeps every causal block.
      last_block_dense: keep the last two query-block rows fully dense.
    """

    method: SparsityMethod = "nz_ratio"
    nz_ratio: float = 1.0
    threshold: float = 0.0
    last_block_dense: bool = False

    def __post_init__(self):
        if self.method not in ("nz_ratio", "threshold"):
            raise ValueError(f"method must be 'nz_ratio' or 'threshold', got {self.method!r}")
        if not 0.0 < self.nz_ratio <= 1.0:
            raise ValueError(f"nz_ratio must be in (0, 1], got {self.nz_ratio}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")

    @property
    def is_dense(self) -> bool:
        """True when this selection keeps every causal block (so sparse attention equals dense)."""
        if self.method == "nz_ratio":
            return self.nz_ratio >= 1.0
        return self.threshold <= 0.0


def topk_per_row(nz_ratio: float, num_kv_blocks: int) -> int:
    """Blocks kept per query-block row for a target causal density (docs/design.md §3)."""
    return max(1, int((1.0 - (1.0 - nz_ratio) ** 0.5) * num_kv_blocks))


def masked_softmax(scores: jax.Array) -> jax.Array:
    """Softmax over key blocks restricted to the causal triangle: f32 [B, N, I, J], zero above the diagonal."""
    causal = causal_block_mask(*scores.shape[-2:])
    return jax.nn.softmax(jnp.where(causal, scores.astype(jnp.float32), -jnp.inf), axis=-1)


@functools.partial(jax.jit, static_argnames="selection")
def select_blocks(scores: jax.Array, selection: Selection, lengths: jax.Array | None = None) -> jax.Array:
    """Block scores [B, N, I, J] (gate logits, or any score where larger = more important) → bool block mask.

    The result is causal and always contains the diagonal. With `last_block_dense`, the last NUM_DENSE_LAST_ROWS
    query-block rows holding real tokens are dense: those of each row's lengths[b] tokens (int [B]), or the last
    rows of the mask when `lengths` is None.
    """
    num_q_blocks, num_kv_blocks = scores.shape[-2:]
    causal = causal_block_mask(num_q_blocks, num_kv_blocks)
    if selection.is_dense:
        return jnp.broadcast_to(causal, scores.shape)
    if selection.method == "nz_ratio":
        mask = block_topk_mask(scores, topk_per_row(selection.nz_ratio, num_kv_blocks))
    else:
        mask = masked_softmax(scores) > selection.threshold
    rows = jnp.arange(num_q_blocks)[:, None]  # [I, 1]
    forced = rows == jnp.arange(num_kv_blocks)[None, :]  # [I, J] the diagonal: never an empty row
    if selection.last_block_dense:
        forced = forced | _last_real_rows(num_q_blocks, scores.shape[0], lengths)[:, None, :, None]  # [B, 1, I, J]
    return (mask | forced) & causal


def _last_real_rows(num_q_blocks: int, batch: int, lengths: jax.Array | None) -> jax.Array:
    """bool [B, I]: the last NUM_DENSE_LAST_ROWS query-block rows that hold real tokens of each row."""
    if lengths is None:
        last_row = jnp.full((batch,), num_q_blocks - 1)  # [B]
    else:
        last_row = (lengths - 1) // BLOCK_SIZE  # [B]
    rows = jnp.arange(num_q_blocks)[None, :]  # [1, I]
    return (rows > last_row[:, None] - NUM_DENSE_LAST_ROWS) & (rows <= last_row[:, None])  # [B, I]


def block_density(block_mask: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """f32 [N]: selected / causal blocks, pooled over the batch and the query-block rows holding real tokens.

    block_mask: bool [B, N, I, J]; lengths: int [B] real tokens per row in the mask's row coordinates (None: all
    rows real). Blocks above the diagonal are not counted.
    """
    batch, _, num_q_blocks, num_kv_blocks = block_mask.shape
    if lengths is None:
        real_rows = jnp.ones((batch, num_q_blocks), bool)  # [B, I]
    else:
        real_rows = jnp.arange(num_q_blocks)[None, :] * BLOCK_SIZE < lengths[:, None]  # [B, I]
    counted = real_rows[:, :, None] & causal_block_mask(num_q_blocks, num_kv_blocks)  # [B, I, J]
    selected = jnp.sum(block_mask & counted[:, None], axis=(0, 2, 3), dtype=jnp.float32)  # [N]
    return selected / jnp.sum(counted)
