"""Per-layer decode budgets calibrated on data: `decode_allocation` measures how a mean context fraction should be
shared among the sparse decode layers (`seer_jax.decode_config.DecodeAllocation`), the decode counterpart of the
prefill `seer_jax.calibration.budget_allocation`.

Why. A uniform decode budget gives every layer the same blocks per step, but layers differ in how well their decode
gate ranks blocks: a layer whose gate ranks poorly needs more blocks to hold the attention mass that a layer with a
good gate holds with few (on the testbed, layers 3 and 5 carry the gate's gap to the oracle at a 10% budget).

Rows. One dense forward on a batch of distillation-like data gives, per sparse layer, the decode gate's target (the
true per-block attention mass of every token, normalised over its completed earlier blocks: `seer_jax.decode_target`)
and the gate's logits on every token (`decode_target.training_logits`). A row is one (token, kv head) of the tokens
decode distillation scores: t >= max(block_size, floor(L_b · scored_from)) of each row of L_b real tokens. Token t
stands for the decode step that feeds it: its row holds n = t + 1 tokens, and as in `select_decode_blocks` its
candidates are the completed earlier blocks j < t // block_size that are not forced (the sink with `force_sink`, the
sliding window); the forced blocks and the current one are attended anyway.

Rule. Each candidate's key is the true mass its row already holds before it is kept: the forced blocks' mass plus
that of the candidates ranked above it in the row, ranked
  * "recall" (default): by the decode gate's score (descending, ties to the lower block), the order in which the
    gate's top-k keeps them at run time, so the key is the recall the row reaches just before the block (the gate's
    logits alone: with `DecodeConfig.quest_weight` > 0 the run-time order also weighs Quest's bound, which a
    dense forward over training features does not compute, so the shares approximate that order);
  * "coverage": by the true mass itself (gate-independent, like the prefill rule `shares_from="attention"`).
One order over every sparse layer, row and candidate (key ascending, ties to the lower layer) then keeps, at mean
fraction f, the first ⌊f · Σ_rows n_row / block_size · sparse layers⌋; a layer's fraction is the count it keeps over
Σ_rows n_row / block_size, so it means what `DecodeConfig.context_fraction` means (the blocks a row of n tokens picks
by top-k: floor(fraction · n / block_size)). Every row of every layer is thus filled to a common recall: a layer whose
gate ranks poorly reaches it slowly and gets more blocks, a layer whose gate ranks well gets fewer; under "coverage"
a layer whose attention is spread out gets more.

Points: the fractions asked for (keyed by the fraction asked, so `DecodeConfig.for_layer` at one of them gives
exactly these counts) and 1.0, at which every layer keeps everything. A fraction at which the order would keep more
than every candidate cannot be shared and is left out (near 1 at short calibration rows: the forced blocks are a
large part of each row there); interpolation covers it. Layers below the decode `start_layer` have fraction 1.

The dense forward computes every layer from dense inputs, whereas at run time later layers see the outputs of sparse
earlier ones; the gate's training logits rotate a block at its first position, as decode steps do unless
`rope_at_block_end` (official adapters).
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seer_jax.decode_config import DECODE_ALLOCATION_RULES, DecodeAllocation, DecodeConfig
from seer_jax.decode_target import training_logits
from seer_jax.forwards import decode_distillation_inputs
from seer_jax.multihost import to_host
from seer_jax.seer import SeerCausalLM, seer_with_abstract_gates
from seer_jax.sparsity import Selection

# The mean context fractions an allocation is measured at (and 1): dense at small fractions, where decoding runs and
# a layer's share changes fastest, for linear interpolation in between.
DECODE_CALIBRATION_FRACTIONS = (0.02, 0.03, 0.05, 0.07, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# The rows scored: each row's tokens from this fraction of its length on, as decode distillation scores them (the
# official `seerattn_loss_slice_ratio`, `train.losses.DECODE_SLICE_RATIO`).
SCORED_FROM = 0.5


def candidate_keys(scores: jax.Array, mass: jax.Array, counted: jax.Array, decode: DecodeConfig) -> jax.Array:
    """Each candidate block's key (module docstring): float32 [..., T, J], +inf for non-candidates.

    Args:
      scores: float32 [..., T, J], the ranking of each row's blocks (larger first, ties to the lower block): the
        gate's logits ("recall") or the true mass ("coverage").
      mass: float32 [..., T, J], the true attention mass of each row's completed earlier blocks (zero elsewhere).
      counted: bool, broadcastable to [..., T]: the rows that count.
      decode: its block_size, force_sink and sliding_window say which blocks are candidates and which forced.
    Row t holds n = t + 1 tokens.
    """
    length, num_blocks = scores.shape[-2:]
    block_size = decode.block_size
    tokens = jnp.arange(length) + 1  # [T] n: real tokens at the step feeding token t
    blocks = jnp.arange(num_blocks)[None, :]  # [1, J]
    current = ((tokens - 1) // block_size)[:, None]  # [T, 1]
    scored = blocks < current  # [T, J]
    forced = jnp.zeros_like(scored)
    if decode.force_sink:
        forced = forced | (blocks == 0)
    if decode.sliding_window:
        first = (jnp.maximum(tokens - decode.sliding_window, 0) // block_size)[:, None]  # [T, 1]
        forced = forced | (blocks >= first)
    candidates = scored & ~forced  # [T, J]
    mass = mass.astype(jnp.float32)
    forced_mass = jnp.sum(jnp.where(scored & forced, mass, 0.0), axis=-1, keepdims=True)  # [..., T, 1]
    # Candidates first, best first; argsort is stable, so ties keep the lower block first (as lax.top_k does).
    order = jnp.argsort(jnp.where(candidates, -scores.astype(jnp.float32), jnp.inf), axis=-1, stable=True)
    ranked = jnp.take_along_axis(jnp.where(candidates, mass, 0.0), order, axis=-1)  # [..., T, J] in rank order
    before = forced_mass + jnp.cumsum(ranked, axis=-1) - ranked  # [..., T, J]
    keys = jnp.put_along_axis(jnp.zeros_like(before), order, before, axis=-1, inplace=False)  # [..., T, J]
    return jnp.where(candidates & jnp.asarray(counted)[..., None], keys, jnp.inf)


def kept_fractions(keys: Sequence[np.ndarray], row_blocks: float, fraction: float) -> np.ndarray | None:
    """The order statistic (module docstring): f64 [sparse layers], each layer's kept candidates over `row_blocks`
    at mean fraction `fraction`, or None when the order would keep more than every candidate.

    keys: per sparse layer, its candidates' keys (any order, any shape); row_blocks: Σ_rows n_row / block_size of
    one layer (every layer has the same rows). The first ⌊fraction · row_blocks · layers⌋ keys in ascending order,
    ties to the lower layer, are kept.
    """
    keys = [np.ravel(np.asarray(layer, np.float32)) for layer in keys]
    keep = int(np.floor(fraction * row_blocks * len(keys) + 1e-6))
    total = sum(layer.size for layer in keys)
    if keep > total:
        return None
    kept = np.zeros(len(keys), np.int64)
    if keep > 0:
        last = np.partition(np.concatenate(keys), keep - 1)[keep - 1]  # the largest key kept
        below = np.array([np.sum(layer < last) for layer in keys])
        ties = np.array([np.sum(layer == last) for layer in keys])
        remaining = keep - below.sum()  # keys equal to `last` kept, lower layers first
        taken = np.minimum(ties, np.maximum(remaining - np.concatenate([[0], np.cumsum(ties)[:-1]]), 0))
        kept = below + taken
    return kept / row_blocks


@functools.partial(nnx.jit, static_argnames=("rule", "scored_from"))
def _layer_keys(
    model: SeerCausalLM, tokens: jax.Array, attention_mask: jax.Array | None, *, rule: str, scored_from: float
) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Per sparse layer the candidate keys f32 [B, K, T, J] (+inf elsewhere), and the counted rows bool [B, T]."""
    decode = model.seer_config.decode
    features, targets = decode_distillation_inputs(model, tokens, attention_mask)
    lengths = features[0].lengths  # [B]
    first = jnp.maximum(decode.block_size, jnp.floor(lengths * scored_from).astype(jnp.int32))  # [B]
    rows = jnp.arange(tokens.shape[1])[None, :]  # [1, T]
    counted = (rows >= first[:, None]) & (rows < lengths[:, None])  # [B, T]
    keys = []
    for layer, layer_features, target in zip(model.model.layers, features, targets, strict=True):
        if layer.self_attn.layer_index < decode.start_layer:
            continue
        scores = training_logits(layer.self_attn.decode_gate, layer_features) if rule == "recall" else target
        keys.append(candidate_keys(scores, target, counted[:, None, :], decode))  # [B, K, T, J]
    return tuple(keys), counted


def decode_allocation(
    model: SeerCausalLM,
    tokens: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    fractions: Sequence[float] = DECODE_CALIBRATION_FRACTIONS,
    rule: str = "recall",
    scored_from: float = SCORED_FROM,
) -> DecodeAllocation:
    """Each layer's context fraction at each of `fractions` (and 1), from one dense forward on this batch (module
    docstring), one batch row at a time.

    Args:
      model: a model with decode gates; its decode config's block_size, force_sink, sliding_window and start_layer
        count (its selection and prefill selection are ignored: the forward is dense).
      tokens: int [B, T] distillation-like data; attention_mask: bool [B, T] left padding, or None.
      fractions: mean context fractions in (0, 1] to calibrate at (`DecodeConfig.for_layer` interpolates).
      rule: "recall" (the gate's ranking) or "coverage" (the true attention's), module docstring.
      scored_from: the rows counted start at this fraction of each row's length (at least one block in).
    """
    decode = model.seer_config.decode
    if decode is None:
        raise ValueError("decode calibration needs decode gates (the model has no decode config)")
    if rule not in DECODE_ALLOCATION_RULES:
        raise ValueError(f"rule must be one of {DECODE_ALLOCATION_RULES}, got {rule!r}")
    for fraction in fractions:
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
            raise ValueError(f"fractions must be in (0, 1], got {fraction!r}")
    if not 0 <= scored_from < 1:
        raise ValueError(f"scored_from must be in [0, 1), got {scored_from!r}")
    num_layers = len(model.model.layers)
    num_sparse = num_layers - min(decode.start_layer, num_layers)
    if num_sparse == 0:
        raise ValueError("the model has no sparse decode layer (decode start_layer >= its layers): nothing to allocate")
    dense = seer_with_abstract_gates(model, dataclasses.replace(model.seer_config, selection=Selection()))
    keys: list[list[np.ndarray]] = [[] for _ in range(num_sparse)]
    row_blocks = 0.0
    for row in range(tokens.shape[0]):
        mask = None if attention_mask is None else attention_mask[row : row + 1]
        row_keys, counted = _layer_keys(dense, tokens[row : row + 1], mask, rule=rule, scored_from=scored_from)
        positions = np.flatnonzero(to_host(counted)[0])  # row-aligned t of the counted tokens
        row_blocks += model.config.num_kv_heads * float(np.sum(positions + 1)) / decode.block_size
        for layer, layer_keys in enumerate(row_keys):
            layer_keys = to_host(layer_keys)  # gathered when sharded over other processes' devices
            keys[layer].append(layer_keys[np.isfinite(layer_keys)])
    if row_blocks == 0:
        raise ValueError(f"no row to calibrate on: rows need more than {decode.block_size} tokens (one decode block)")
    keys = [np.concatenate(layer) for layer in keys]
    points = {}
    for fraction in sorted({*map(float, fractions), 1.0}):
        shares = np.ones(num_sparse) if fraction == 1.0 else kept_fractions(keys, row_blocks, fraction)
        if shares is not None:
            points[fraction] = tuple(float(share) for share in shares)
    return DecodeAllocation(
        fractions=tuple(points),
        layer_fractions=tuple((1.0,) * (num_layers - num_sparse) + shares for shares in points.values()),
        length=int(tokens.shape[1]),
        rule=rule,
    )
