"""Block selection: from block scores [B, N, I, J] to the boolean block mask that sparse attention computes.

This module is the one owner of selection: causal masking, the forced diagonal, `last_block_dense`, the all-dense
shortcut (`Selection.is_dense`) and the density of a mask (`block_density`). Masks are in each row's own block
coordinates: with `lengths`, row b's real tokens are its first lengths[b] positions (`seer_jax.seer` moves left
padding out of the way before selecting).

SeerAttention (docs/design.md §3) scores every 64×64 (query block i, key block j) pair, per query head, and keeps
  * `nz_ratio` (TopK): the same k = max(1, int((1 − sqrt(1 − nz)) · J)) blocks in every row, chosen on the raw
    masked scores; with causal truncation the kept fraction of the causal triangle ≈ 2r − r² = nz for r = k/J;
  * `threshold`: the blocks whose softmax probability over the row's causal key blocks exceeds the threshold;
  * `budget`: a mean density that allocates itself. Each sparse layer keeps a fraction of its causal blocks (its
    share of the budget, `BudgetAllocation`, calibrated on distillation data by `seer_jax.calibration`): the
    diagonal plus the off-diagonal blocks of highest softmax probability over all heads and query-block rows of
    each batch row, so heads and rows the gate is unsure about get more blocks, and every layer reaches its share
    on any input. Without an allocation every sparse layer keeps the same fraction.
All optionally keep each row's first key block, the attention sink, in every query-block row (`force_sink`: models
such as SmolLM2 put most rows' largest weight on it), and each row's last two real query-block rows dense
(`last_block_dense`), and drop blocks above the diagonal. Forced blocks count against a `budget`; under `nz_ratio`
and `threshold` they come on top.

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
import numpy as np

from pallas_kernels.block_sparse_attention import BLOCK_SIZE, causal_block_mask  # also for seer_jax's other modules
from pallas_kernels.block_topk import block_topk_mask

SparsityMethod = Literal["nz_ratio", "threshold", "budget"]
METHODS: tuple[str, ...] = ("nz_ratio", "threshold", "budget")
NUM_DENSE_LAST_ROWS = 2  # `last_block_dense` keeps this many final query-block rows dense (docs/design.md §3)


def layer_points(
    points, shares, points_name: str, shares_name: str
) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
    """Checks and freezes (as hashable float tuples) per-layer shares at calibration points, the content of
    `BudgetAllocation` and `seer_jax.decode_config.DecodeAllocation`: P points strictly increasing in (0, 1], and
    per point one share in [0, 1] for each of the same L >= 1 layers. Errors name the fields."""
    points = tuple(float(x) for x in points)
    shares = tuple(tuple(float(x) for x in point) for point in shares)
    if not points or len(shares) != len(points):
        raise ValueError(
            f"{points_name} and {shares_name} need one entry per calibration point, got {len(points)} and {len(shares)}"
        )
    if any(not 0.0 < x <= 1.0 for x in points) or any(np.diff(points) <= 0):
        raise ValueError(f"{points_name} must increase strictly in (0, 1], got {points}")
    if len({len(point) for point in shares}) != 1 or not shares[0]:
        raise ValueError(f"{shares_name} must hold the same number (>= 1) of layers at every point")
    if any(not 0.0 <= x <= 1.0 for point in shares for x in point):
        raise ValueError(f"{shares_name} must be in [0, 1]")
    return points, shares


def interpolate_layer_points(x: float, points: tuple[float, ...], shares: tuple[tuple[float, ...], ...]):
    """Each layer's share at `x`, linear between the calibration points; below the first the shares scale with x
    (0 at 0); above the last, the last's."""
    table = np.asarray(shares)  # [P, L]
    if x < points[0]:
        return tuple(float(v) for v in table[0] * x / points[0])
    return tuple(float(np.interp(x, points, table[:, layer])) for layer in range(table.shape[1]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class BudgetAllocation:
    """How a `budget` selection shares a mean density among the layers: each layer's density at calibration points,
    measured by `seer_jax.calibration.budget_allocation` (one global order statistic of the gates' probabilities
    over every layer, head and block of a batch of distillation data) and interpolated linearly in between.

    Attributes:
      densities: P calibration points, strictly increasing in (0, 1]: the mean density over the sparse layers.
      layer_densities: P tuples of L floats in (0, 1]: each layer's density at that point (1 for dense layers);
        the mean over the sparse layers of each tuple is that point's density (up to one block: the blocks are
        whole), so interpolating keeps the mean.
      length: the tokens per row of the calibration batch (the shares are measured at that length).
    """

    densities: tuple[float, ...]
    layer_densities: tuple[tuple[float, ...], ...]
    length: int

    def __post_init__(self):
        # JSON gives lists; a Selection is a static jit argument, so everything it holds must hash.
        points, shares = layer_points(self.densities, self.layer_densities, "densities", "layer_densities")
        object.__setattr__(self, "densities", points)
        object.__setattr__(self, "layer_densities", shares)
        if any(d == 0.0 for point in shares for d in point):
            raise ValueError("layer_densities must be in (0, 1]")
        if not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"length must be a positive int, got {self.length!r}")

    @property
    def num_layers(self) -> int:
        return len(self.layer_densities[0])

    def layer_budgets(self, density: float) -> tuple[float, ...]:
        """Each layer's density at mean density `density`, interpolated between the calibration points; below the
        first (the diagonal alone, when calibrated) the shares scale with the density, so a budget that small keeps
        each row's diagonal only, as it would in a longer row."""
        return interpolate_layer_points(density, self.densities, self.layer_densities)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Selection:
    """How block scores become a block mask.

    Attributes:
      method: "nz_ratio" (TopK per row), "threshold" (on the row softmax of the scores) or "budget" (a mean density
        shared among layers by `allocation`; module docstring).
      nz_ratio: target causal block density for "nz_ratio", in (0, 1]; 1 keeps every causal block.
      threshold: probability threshold for "threshold", in [0, 1); 0 keeps every causal block.
      budget: target mean causal block density of the sparse layers for "budget", in (0, 1]; 1 keeps every block.
      allocation: "budget" only: each layer's share (`BudgetAllocation`), or None: every sparse layer keeps `budget`.
      force_sink: keep key block 0 (each row's first real tokens, the attention sink) in every query-block row.
      last_block_dense: keep the last two query-block rows fully dense.
    """

    method: SparsityMethod = "nz_ratio"
    nz_ratio: float = 1.0
    threshold: float = 0.0
    budget: float = 1.0
    allocation: BudgetAllocation | None = None
    force_sink: bool = False
    last_block_dense: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 < self.nz_ratio <= 1.0:
            raise ValueError(f"nz_ratio must be in (0, 1], got {self.nz_ratio}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.allocation is not None:
            if not isinstance(self.allocation, BudgetAllocation):
                raise ValueError(f"allocation must be a BudgetAllocation or None, got {type(self.allocation).__name__}")
            if self.method != "budget":
                raise ValueError(f"allocation applies to method 'budget' only, not {self.method!r}")

    @property
    def is_dense(self) -> bool:
        """True when this selection keeps every causal block (so sparse attention equals dense)."""
        if self.method == "nz_ratio":
            return self.nz_ratio >= 1.0
        if self.method == "budget":
            return self.budget >= 1.0
        return self.threshold <= 0.0

    def for_layer(self, layer_index: int) -> "Selection":
        """The selection layer `layer_index` applies: a budget with an allocation becomes that layer's own budget
        (without allocation); every other selection applies as it is."""
        if self.allocation is None:
            return self
        if not 0 <= layer_index < self.allocation.num_layers:
            raise ValueError(
                f"layer {layer_index}: the budget allocation covers {self.allocation.num_layers} layers; calibrate "
                "it for this model"
            )
        budget = self.allocation.layer_budgets(self.budget)[layer_index]
        return dataclasses.replace(self, budget=budget, allocation=None)


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
    if selection.allocation is not None:
        raise ValueError("select_blocks applies one layer's selection: pass selection.for_layer(layer_index)")
    if selection.method == "nz_ratio":
        mask = block_topk_mask(scores, topk_per_row(selection.nz_ratio, num_kv_blocks))
    elif selection.method == "threshold":
        mask = masked_softmax(scores) > selection.threshold
    else:
        mask = _budget_mask(scores, selection.budget, lengths, selection.force_sink)
    forced = _forced_blocks(num_q_blocks, num_kv_blocks, selection.force_sink)  # [I, J]
    if selection.last_block_dense:
        forced = forced | _last_real_rows(num_q_blocks, scores.shape[0], lengths)[:, None, :, None]  # [B, 1, I, J]
    return (mask | forced) & causal


def _forced_blocks(num_q_blocks: int, num_kv_blocks: int, force_sink: bool) -> jax.Array:
    """bool [I, J]: the blocks every selection keeps: the diagonal (never an empty row), and key block 0 with
    `force_sink` (above the diagonal too: callers drop those)."""
    forced = jnp.arange(num_q_blocks)[:, None] == jnp.arange(num_kv_blocks)[None, :]
    return forced | (force_sink & (jnp.arange(num_kv_blocks)[None, :] == 0))


def _budget_mask(scores: jax.Array, budget: float, lengths: jax.Array | None, force_sink: bool = False) -> jax.Array:
    """bool [B, N, I, J]: per batch row, the unforced causal blocks of its real query-block rows with the highest
    softmax probability over their row, pooled over heads, as many as keep ⌊budget · causal blocks⌋ with the forced
    ones (the diagonal, and the sink with `force_sink`; never fewer than none). Ties go to the lower (head, row,
    block) index."""
    batch, num_heads, num_q_blocks, num_kv_blocks = scores.shape
    real_rows = _real_rows(num_q_blocks, batch, lengths)  # [B, I]
    causal = causal_block_mask(num_q_blocks, num_kv_blocks)  # [I, J]
    forced_blocks = _forced_blocks(num_q_blocks, num_kv_blocks, force_sink) & causal  # [I, J]
    candidates = jnp.broadcast_to(real_rows[:, None, :, None] & causal & ~forced_blocks, scores.shape)  # [B, N, I, J]
    counted = num_heads * jnp.sum(real_rows[:, :, None] & causal, axis=(1, 2))  # [B]
    forced = num_heads * jnp.sum(real_rows[:, :, None] & forced_blocks, axis=(1, 2))  # [B]
    # The small margin keeps a budget that is an exact fraction of the blocks (as calibrated) from rounding down.
    keep = jnp.maximum(jnp.floor(budget * counted.astype(jnp.float32) + 1e-3).astype(jnp.int32) - forced, 0)  # [B]
    probabilities = jnp.where(candidates, masked_softmax(scores), -1.0).reshape(batch, -1)  # [B, N·I·J]
    order = jnp.argsort(-probabilities, axis=-1, stable=True)  # [B, N·I·J]
    rank = jnp.arange(order.shape[1])[None, :] < keep[:, None]  # [B, N·I·J] in `order`'s order
    kept = jnp.zeros_like(rank).at[jnp.arange(batch)[:, None], order].set(rank)  # [B, N·I·J]
    return kept.reshape(scores.shape) & candidates  # [B, N, I, J]


def _real_rows(num_q_blocks: int, batch: int, lengths: jax.Array | None) -> jax.Array:
    """bool [B, I]: the query-block rows holding real tokens of each row (all of them when `lengths` is None)."""
    if lengths is None:
        return jnp.ones((batch, num_q_blocks), bool)
    return jnp.arange(num_q_blocks)[None, :] * BLOCK_SIZE < lengths[:, None]


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
    real_rows = _real_rows(num_q_blocks, batch, lengths)  # [B, I]
    counted = real_rows[:, :, None] & causal_block_mask(num_q_blocks, num_kv_blocks)  # [B, I, J]
    selected = jnp.sum(block_mask & counted[:, None], axis=(0, 2, 3), dtype=jnp.float32)  # [N]
    return selected / jnp.sum(counted)
