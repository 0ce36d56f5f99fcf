"""Block selection at decode: block scores [B, K, J] (or [B, N, J]) → the key blocks each (row, head) attends.

Scores come from a source of `seer_jax.decode_scores` (the decode gate by default), one row per kv head (shared by
its G query heads) or, for Quest, per query head; selection treats that axis alike. Blocks are in each row's own
coordinates (`seer_jax.k_compression`): a row with n real tokens (the one being decoded included) has blocks 0 … c,
c = (n − 1) // block_size its current (open or just completed) block. Per step, layer, row and head, as
docs/design.md §8 describes:

  * scored blocks: the completed earlier blocks j < c. The current block is not scored (training never scores the
    block holding its query; the official inference scores a zero placeholder there).
  * forced blocks: the current block always; block 0 (the attention sink) with `force_sink`; the blocks holding the
    row's last `sliding_window` tokens.
  * "token_budget": top-k of the scored blocks that are not forced, k = token_budget // block_size (all of them
    when fewer), on float32 scores without a softmax (ties to the lower block); forced blocks come on top.
  * "context_fraction": the same top-k with k = floor(context_fraction · n / block_size) (float32), i.e. the token
    budget context_fraction · n of this row at this step.
  * "threshold": the scored blocks whose softmax probability over all scored blocks exceeds the threshold.

`decode_key_mask` turns a selection into the key mask of the masked dense attention that computes it exactly;
`decode_block_index` into the (block_index, block_count) lists of `pallas_kernels.block_sparse_decode`.
`decode_block_lists` makes those lists straight from the scores (the decode step's path): under a budget from the
top-k's block ids and the forced blocks, with no [B, K, J] mask, prefix sum or scatter in between.
"""

import dataclasses

import jax
import jax.numpy as jnp

from seer_jax.decode_config import DecodeConfig
from seer_jax.gate import MASKED_LOGIT
from seer_jax.model import positions_from_mask


def select_decode_blocks(scores: jax.Array, lengths: jax.Array, config: DecodeConfig) -> jax.Array:
    """Block scores float32 [B, K, J] (or [B, N, J]) and the real tokens of each row int [B] (the decoded one
    included) → bool of the same shape, the attended blocks (module docstring). Blocks past the current one are
    never attended."""
    num_blocks = scores.shape[-1]
    step = _StepBlocks.of(lengths, config, num_blocks)
    scores = scores.astype(jnp.float32)
    if config.method == "threshold":
        probs = jax.nn.softmax(jnp.where(step.scored[:, None, :], scores, MASKED_LOGIT), axis=-1)  # [B, K, J]
        chosen = (probs > config.threshold) & step.scored[:, None, :]
    elif config.method == "token_budget":
        chosen = _top_blocks(scores, step.candidates, _top_count(config, num_blocks))
    else:
        chosen = _top_blocks(scores, step.candidates, num_blocks, _row_budget_blocks(lengths, config))
    return chosen | step.forced[:, None, :]


@dataclasses.dataclass(frozen=True)
class _StepBlocks:
    """One decode step's blocks per row (module docstring): current int [B] (the block holding the decoded token),
    first int [B] (the window's first block; current without a window), forced bool [B, J] (current, window, sink),
    scored bool [B, J] (completed earlier blocks) and candidates bool [B, J] (scored and not forced)."""

    current: jax.Array
    first: jax.Array
    forced: jax.Array
    scored: jax.Array
    candidates: jax.Array

    @classmethod
    def of(cls, lengths: jax.Array, config: DecodeConfig, num_blocks: int) -> "_StepBlocks":
        blocks = jnp.arange(num_blocks)[None, :]  # [1, J]
        current = (lengths - 1) // config.block_size  # [B]
        first = current
        if config.sliding_window:
            first = jnp.maximum(lengths - config.sliding_window, 0) // config.block_size  # [B]
        forced = (blocks >= first[:, None]) & (blocks <= current[:, None])  # [B, J]
        if config.force_sink:
            forced = forced | (blocks == 0)
        scored = blocks < current[:, None]  # [B, J]
        return cls(current=current, first=first, forced=forced, scored=scored, candidates=scored & ~forced)


def _row_budget_blocks(lengths: jax.Array, config: DecodeConfig) -> jax.Array:
    """int32 [B]: the blocks "context_fraction" takes by top-k in each row, floor(f · n / block_size) in float32."""
    budget = jnp.float32(config.context_fraction) * lengths.astype(jnp.float32)  # [B] tokens
    return jnp.floor(budget / config.block_size).astype(jnp.int32)


def _top_blocks(scores: jax.Array, candidates: jax.Array, most: int, count: jax.Array | None = None) -> jax.Array:
    """bool [B, K, J]: per (row, head) the `most` best-scored candidates (bool [B, J]), or with `count` (int [B],
    at most `most`) the count[b] best of row b; fewer where fewer are candidates. Ties go to the lower block."""
    chosen = jnp.zeros(scores.shape, bool)  # [B, K, J]
    if most == 0:
        return chosen
    _, top = jax.lax.top_k(_candidate_scores(scores, candidates), most)  # [B, K, most], best first
    keep = jnp.ones(top.shape, bool) if count is None else jnp.arange(most) < count[:, None, None]  # [B, K, most]
    chosen = jnp.put_along_axis(chosen, top, keep, axis=-1, inplace=False)  # [B, K, J]
    return chosen & candidates[:, None, :]


def _candidate_scores(scores: jax.Array, candidates: jax.Array) -> jax.Array:
    """float32 [B, K, J]: the candidates' scores (at least float32's lowest, so a −inf score still outranks every
    non-candidate) and −inf elsewhere: a top-k of it lists every candidate before any non-candidate."""
    finite = jnp.maximum(scores, jnp.finfo(jnp.float32).min)
    return jnp.where(candidates[:, None, :], finite, -jnp.inf)


def max_selected_blocks(config: DecodeConfig, num_blocks: int) -> int:
    """The most blocks one step of `config` (one layer's: `DecodeConfig.for_layer`) selects per (row, head) out of
    `num_blocks`: the length its kernel block lists need. Under "token_budget" the budget plus the forced blocks
    (current, sink, window); under "context_fraction" the same with the fraction of a full cache; all of them under
    "threshold"."""
    if config.method == "threshold":
        return num_blocks
    return min(num_blocks, _top_count(config, num_blocks) + _max_forced(config))


def _top_count(config: DecodeConfig, num_blocks: int) -> int:
    """The top-k size of a budget: token_budget // block_size, or for a context fraction f the most any row of a
    cache of num_blocks · block_size slots can get, floor(f · n / block_size) ≤ floor(f · num_blocks) (+1 for
    float32 rounding)."""
    if config.method == "token_budget":
        return min(config.budget_blocks, num_blocks)
    return min(int(config.context_fraction * num_blocks) + 1, num_blocks)


def _max_forced(config: DecodeConfig) -> int:
    """The most forced blocks of a step: the current one, the sink, and the blocks of the sliding window."""
    window_blocks = -(-config.sliding_window // config.block_size) + 1 if config.sliding_window else 0
    return 1 + int(config.force_sink) + window_blocks


def decode_block_lists(
    scores: jax.Array, lengths: jax.Array, config: DecodeConfig, num_slots: int
) -> tuple[jax.Array, jax.Array]:
    """`decode_block_index(select_decode_blocks(scores, lengths, config), num_slots)` as a set, built from the
    scores directly: (block_index int32 [B, K, M], block_count int32 [B, K]) with M = num_slots ≥
    `max_selected_blocks(config, J)`.

    Under a budget the list is the top-k's candidate ids, best first, then the forced blocks (current block, the
    window's blocks backwards, the sink), −1 after: the order `pallas_kernels.block_sparse_decode` accepts (any),
    which spares the decode step a [B, K, J] mask, its prefix sum and a scatter per layer. A threshold selection goes
    through the mask."""
    num_blocks = scores.shape[-1]
    if config.method == "threshold":
        return decode_block_index(select_decode_blocks(scores, lengths, config), num_slots)
    most = _top_count(config, num_blocks)
    if num_slots < most + _max_forced(config) and num_slots < num_blocks:
        raise ValueError(f"num_slots={num_slots} cannot hold the {most} top blocks and the forced ones")
    step = _StepBlocks.of(lengths, config, num_blocks)
    # Forced ids, distinct, in slots 0 … num_forced − 1: current, current − 1, … first (the window), then the sink
    # unless the window (or the current block) already holds block 0.
    num_window = step.current - step.first + 1  # [B]
    sink = jnp.asarray(config.force_sink) & (step.first > 0)  # [B]
    num_forced = num_window + sink.astype(num_window.dtype)  # [B]
    slots_forced = _max_forced(config)
    f = jnp.arange(slots_forced)[None, :]  # [1, F]
    forced_ids = jnp.where(f < num_window[:, None], step.current[:, None] - f, 0)  # [B, F]; the sink at f == num_window
    if config.method == "token_budget":
        count = jnp.full(lengths.shape, most, jnp.int32)
    else:
        count = _row_budget_blocks(lengths, config)
    count = jnp.minimum(count, jnp.sum(step.candidates, axis=-1, dtype=jnp.int32))  # [B] top blocks taken
    slots = jnp.arange(num_slots)[None, None, :]  # [1, 1, M]
    taken = count[:, None, None]  # [B, 1, 1]
    if most > 0:
        _, top = jax.lax.top_k(_candidate_scores(scores, step.candidates), most)  # [B, K, most] candidates first
        from_top = jnp.take_along_axis(top, jnp.minimum(slots, most - 1), axis=-1)  # [B, K, M]
    else:
        from_top = jnp.zeros((*scores.shape[:2], num_slots), jnp.int32)
    from_forced = jnp.take_along_axis(
        forced_ids[:, None, :], jnp.clip(slots - taken, 0, slots_forced - 1), axis=-1
    )  # [B, 1, M]
    total = (count + num_forced)[:, None]  # [B, 1]
    index = jnp.where(slots < taken, from_top, jnp.where(slots < total[..., None], from_forced, -1))  # [B, K, M]
    block_count = jnp.broadcast_to(jnp.minimum(total, num_slots), scores.shape[:2])  # [B, K]
    return index.astype(jnp.int32), block_count.astype(jnp.int32)


def available_blocks(lengths: jax.Array, block_size: int) -> jax.Array:
    """int32 [B]: the blocks holding a row's real tokens (the current one included), the denominator of density."""
    return ((lengths - 1) // block_size + 1).astype(jnp.int32)


def decode_key_mask(block_mask: jax.Array, key_mask: jax.Array, block_size: int) -> jax.Array:
    """bool [B, K, S]: the KV-cache slots a selection attends.

    block_mask: bool [B, K, J], blocks in own coordinates; key_mask: bool [B, S], the cache's real slots (left
    padding and empty slots False). Slot s of row b is the row's real token number positions_from_mask(key_mask)[b, s]
    and belongs to that number's block.
    """
    block_of_slot = positions_from_mask(key_mask) // block_size  # [B, S]
    block_of_slot = jnp.minimum(block_of_slot, block_mask.shape[-1] - 1)
    selected = jnp.take_along_axis(block_mask, block_of_slot[:, None, :], axis=-1)  # [B, K, S]
    return selected & key_mask[:, None, :]


def decode_block_index(block_mask: jax.Array, num_slots: int | None = None) -> tuple[jax.Array, jax.Array]:
    """A selection bool [B, K, J] → (block_index int32 [B, K, M], block_count int32 [B, K]), the block lists of
    `pallas_kernels.block_sparse_decode`: per (row, kv head) the selected block ids ascending in slots
    0 … block_count − 1, −1 after. M = num_slots (default J) must be at least the largest count; extra
    selected blocks beyond M would be dropped, so callers size M from the selection's bound."""
    num_blocks = block_mask.shape[-1]
    num_slots = num_blocks if num_slots is None else num_slots
    # Each selected block's slot is the number of selected blocks before it: a prefix sum and one scatter per step
    # instead of a sort of all J blocks (the decode step runs this per layer).
    slot = jnp.cumsum(block_mask, axis=-1, dtype=jnp.int32) - 1  # [B, K, J]
    slot = jnp.where(block_mask, slot, num_slots)  # unselected (and any slot >= M): dropped by the scatter
    rows = jnp.arange(block_mask.shape[0])[:, None, None]
    heads = jnp.arange(block_mask.shape[1])[None, :, None]
    ids = jnp.broadcast_to(jnp.arange(num_blocks, dtype=jnp.int32), block_mask.shape)  # [B, K, J]
    index = jnp.full((*block_mask.shape[:-1], num_slots), -1, jnp.int32)
    index = index.at[rows, heads, slot].set(ids, mode="drop")  # [B, K, M]
    count = jnp.minimum(jnp.sum(block_mask, axis=-1, dtype=jnp.int32), num_slots)  # [B, K]
    return index, count
