"""Selections calibrated on data to keep a stated fraction of blocks: the prefill threshold at which a model's
gates reach a density (`threshold_for_density`), and the per-layer shares of a density budget
(`budget_allocation`, `budget_for_density`): the default selection an adapter records with its density
(`seer_jax.adapters.save_adapter(selection=, prefill_density=)`, `seer_jax.adapters.record_selection`).

Block density (docs/design.md §3, `seer_jax.forwards.block_density`) is the mean over layers and heads of the
selected over the causal blocks of the query-block rows holding real tokens. Under `Selection(method="threshold",
threshold=t)` a sparse layer selects the diagonal plus the causal blocks whose softmax probability over their row
exceeds t; a dense layer (below `start_layer`) selects every block. Every (layer, head) counts the same blocks, so
over one batch the density is (forced blocks + #{probabilities > t}) / all counted blocks: a step function of t,
and the threshold reaching a target is an order statistic of the probabilities, found exactly from one forward.

The gate logits come from a forward that computes every block, so from the second sparse layer on they differ
slightly from those the sparse forward sees; the density returned is exact for layers whose inputs are dense.
Measure the sparse model's density (`seer_jax.forwards.block_density`) to record it. `last_block_dense` is off,
as in the perplexity protocol (docs/design.md §7).

A density budget also has two switches that no model-free criterion has ranked right: the weight of the quest
scores added to the gate's (`SeerConfig.quest_weight`) and whether every row keeps its sink block
(`Selection.force_sink`). `choose_budget` calibrates one budget per combination and keeps the one whose sparse
model predicts held-out windows best (lowest mean next-token NLL), since each switch helps one testbed and hurts
the other (docs/design.md §3).

A budget's allocation is an order statistic of the same kind read per layer (`budget_allocation`): at mean
density d (over the sparse layers, the density evaluation rows report) the blocks kept by one global order over all
layers, counted per layer, give each layer's share; the order fills every row to a common coverage of its
probability mass (default), or keeps what one global threshold would. The budget selection then keeps each
layer's share by a per-layer order statistic at run time (`seer_jax.sparsity`), so unlike a threshold its density
does not drift when the inputs do: the sparse forward reaches the shares exactly, whatever the dense-forward logits
were.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seer_jax.forwards import logits_and_density
from seer_jax.seer import SeerCausalLM, seer_with_abstract_gates
from seer_jax.sparsity import BLOCK_SIZE, BudgetAllocation, Selection, causal_block_mask, masked_softmax

# The mean densities a budget allocation is measured at (and the forced blocks alone, and 1): dense enough at low
# densities, where a layer's share changes fastest, for linear interpolation in between.
CALIBRATION_DENSITIES = (0.02, 0.03, 0.05, 0.07, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@nnx.jit
def _gate_probabilities(
    model: SeerCausalLM, tokens: jax.Array, attention_mask: jax.Array | None
) -> tuple[jax.Array, ...]:
    # The scores selection ranks: the gate's logits, plus the weighted quest scores with a `quest_weight`.
    _, _, collected = model.forward(tokens, attention_mask=attention_mask, collect=("block_scores",))
    return tuple(masked_softmax(layer["block_scores"]) for layer in collected)


@nnx.jit
def _attention_probabilities(
    model: SeerCausalLM, tokens: jax.Array, attention_mask: jax.Array | None
) -> tuple[jax.Array, ...]:
    _, _, collected = model.forward(tokens, attention_mask=attention_mask, collect=("target",))
    return tuple(layer["target"] for layer in collected)


BUDGET_RULES = ("coverage", "probability")
# Where a budget's shares come from: the gates' probabilities, or the true attention the gates are distilled on.
SHARE_SOURCES = {"gate": _gate_probabilities, "attention": _attention_probabilities}


@dataclasses.dataclass(frozen=True)
class _Probabilities:
    """The sparse layers' candidate probabilities of one dense forward, and the blocks each layer counts.

    per_layer: one f32 array per sparse layer (layers >= start_layer, in order): the softmax probabilities of the
      off-diagonal causal blocks of real query-block rows, over batch, heads, rows and blocks.
    covered: the same blocks' coverage keys: the probability mass of their row held by the diagonal and the blocks
      ranked above them in the row (by probability, ties to the lower block).
    counted: causal blocks of real rows per layer (all heads); forced: the diagonal blocks among them.
    """

    per_layer: list[np.ndarray]
    covered: list[np.ndarray]
    counted: int
    forced: int


def _probabilities(
    model: SeerCausalLM, tokens: jax.Array, attention_mask: jax.Array | None, source: str = "gate"
) -> _Probabilities:
    if source not in SHARE_SOURCES:
        raise ValueError(f"shares_from must be one of {tuple(SHARE_SOURCES)}, got {source!r}")
    if model.seer_config.gate is None:
        raise ValueError("calibration needs prefill gates; this model has decode gates only")
    seer_config = model.seer_config
    dense = seer_with_abstract_gates(model, dataclasses.replace(seer_config, selection=Selection()))
    # Each [B, N, I, J], row-aligned: the row softmax of the gate logits, or the row-normalised pooled attention.
    row_probabilities = SHARE_SOURCES[source](dense, tokens, attention_mask)[seer_config.start_layer :]
    num_heads = model.config.num_q_heads
    num_blocks = -(-tokens.shape[1] // BLOCK_SIZE)
    lengths = tokens.shape[1] if attention_mask is None else jnp.sum(attention_mask, axis=-1)[:, None]  # [B, 1]
    real_rows = jnp.arange(num_blocks)[None, :] * BLOCK_SIZE < lengths  # [B or 1, I], rows in row-aligned coordinates
    real_rows = jnp.broadcast_to(real_rows, (tokens.shape[0], num_blocks))  # [B, I]: every row counts its blocks
    causal = causal_block_mask(num_blocks, num_blocks)  # [I, J]
    off_diagonal = causal & ~jnp.eye(num_blocks, dtype=bool)  # [I, J]
    candidates = real_rows[:, None, :, None] & off_diagonal  # [B, 1, I, J]
    chosen = jnp.broadcast_to(candidates, row_probabilities[0].shape)  # [B, N, I, J]
    return _Probabilities(
        per_layer=[np.asarray(layer[chosen]) for layer in row_probabilities],
        covered=[np.asarray(_covered_before(layer)[chosen]) for layer in row_probabilities],
        counted=num_heads * int(jnp.sum(real_rows[:, :, None] & causal)),
        forced=num_heads * int(jnp.sum(real_rows)),
    )


@jax.jit
def _covered_before(probabilities: jax.Array) -> jax.Array:
    """f32 [B, N, I, J]: for each block, the mass of its row held by the diagonal and the blocks before it when the
    row's off-diagonal blocks are ranked by probability (descending, ties to the lower block): the coverage its row
    reaches just before it is kept."""
    num_blocks = probabilities.shape[-1]
    diagonal = jnp.eye(num_blocks, dtype=bool)  # [I, J]
    causal = causal_block_mask(num_blocks, num_blocks)
    masked = jnp.where(causal, probabilities, 0.0)  # [B, N, I, J]
    order = jnp.argsort(jnp.where(diagonal, -jnp.inf, -masked), axis=-1, stable=True)  # the diagonal first
    ranked = jnp.take_along_axis(masked, order, axis=-1)  # [B, N, I, J] in rank order
    before = jnp.cumsum(ranked, axis=-1) - ranked  # mass of the blocks ranked before each
    return jnp.put_along_axis(jnp.zeros_like(before), order, before, axis=-1, inplace=False)


def _check_density(density: float) -> None:
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")


def threshold_for_density(
    model: SeerCausalLM, tokens: jax.Array, attention_mask: jax.Array | None = None, *, density: float
) -> tuple[Selection, float]:
    """The threshold selection of `model`'s prefill gates that keeps the most blocks without exceeding `density`
    on this batch, and the density it reaches there (module docstring).

    Args:
      model: a model with prefill gates (its selection is ignored; its `start_layer` counts).
      tokens: int [B, T]; attention_mask: bool [B, T] left padding, or None.
      density: the target block density, in (0, 1].

    Returns:
      (Selection(method="threshold", threshold=t), the density at t). Below the forced blocks' density (the
      diagonal and the dense layers) no threshold reaches the target: t then drops every other block, and the
      density returned says how far above the target that is.
    """
    _check_density(density)
    found = _probabilities(model, tokens, attention_mask)
    num_layers = len(model.model.layers)
    total = num_layers * found.counted
    forced = (num_layers - len(found.per_layer)) * found.counted + len(found.per_layer) * found.forced
    probabilities = np.sort(np.concatenate([np.zeros(0, np.float32), *found.per_layer]))[::-1]  # descending
    keep = min(max(int(np.floor(density * total - forced + 1e-6)), 0), probabilities.size)
    if keep >= probabilities.size:
        return Selection(method="threshold", threshold=0.0), 1.0
    if keep == 0:  # drop every block that is not forced: the largest threshold there is
        threshold = float(np.nextafter(np.float32(1.0), np.float32(0.0)))
    else:
        # Midway between the last probability kept and the first dropped, so that rounding differences in the
        # model's own softmax never move a block across it; above 0 (0 means "every block", not "p > 0").
        midway = (probabilities[keep - 1] + probabilities[keep]) / 2
        threshold = float(np.maximum(midway, np.finfo(np.float32).tiny))
    kept = int(np.sum(probabilities > threshold))
    return Selection(method="threshold", threshold=threshold), (forced + kept) / total


def budget_allocation(
    model: SeerCausalLM,
    tokens: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    densities: tuple[float, ...] = CALIBRATION_DENSITIES,
    shares_from: str = "gate",
    rule: str = "probability",
) -> BudgetAllocation:
    """Each layer's share of a mean density, at each of `densities`, from one dense forward on this batch.

    At mean density d over the sparse layers, the blocks kept are the forced ones (the diagonal) plus the
    ⌊d · all blocks⌋ − forced off-diagonal blocks first in one order over every sparse layer, head, row and block
    together (ties to the lower layer); a layer's share is the fraction of its blocks among them. The order (`rule`):
      * "probability" (default): by probability, descending: the blocks one threshold would keep
        (`threshold_for_density`). On the testbed at L = 8192 and density 0.1 (gates distilled on the H200, 4
        documents, sink forced): +11.4% PPL against +28.6% for "coverage"; at L = 2048, where density 0.1 is
        close to the diagonal's own share, it starves spread-out layers (+391% against +113%);
      * "coverage": by the mass its row already holds before the block (diagonal and higher-probability blocks):
        every row of every layer is filled to the same coverage, as a common top-p would, so a layer whose mass is
        spread over many blocks gets many (the testbed's layer 0: 0.26 of its blocks at density 0.1 and L = 8192,
        leaving layers 1, 2 and 4 with the diagonal and the sink only).
    The points are the forced blocks alone, then those of `densities` above them and every block (1.0); dense
    layers (below `start_layer`) have share 1.

    Args:
      model: a model with prefill gates (its selection is ignored; its `start_layer` counts).
      tokens: int [B, T] distillation-like data; attention_mask: bool [B, T] left padding, or None.
      densities: mean densities in (0, 1] to calibrate at (`Selection.for_layer` interpolates in between).
      shares_from: "gate": the order statistic of the gates' probabilities (the blocks one threshold would keep);
        "attention": of the true row-normalised max-pooled attention (the gates' distillation target), so each layer
        gets the share its attention needs even where its gate is confidently wrong. Either way the gate picks
        the blocks within each layer at run time.
      rule: "coverage" or "probability" (above).
    """
    if rule not in BUDGET_RULES:
        raise ValueError(f"rule must be one of {BUDGET_RULES}, got {rule!r}")
    for density in densities:
        _check_density(density)
    found = _probabilities(model, tokens, attention_mask, shares_from)
    num_layers, num_sparse = len(model.model.layers), len(found.per_layer)
    if num_sparse == 0:
        raise ValueError("the model has no sparse layer (start_layer >= its layers): nothing to allocate")
    probabilities = np.concatenate(found.per_layer)
    layer_of = np.repeat(np.arange(num_sparse), [layer.size for layer in found.per_layer])
    keys = np.concatenate(found.covered) if rule == "coverage" else -probabilities
    order = np.argsort(keys, kind="stable")  # first kept first, ties to the lower layer
    total = num_sparse * found.counted
    floor = found.forced / found.counted  # the diagonal alone, in every sparse layer
    points = {floor: (floor,) * num_sparse}
    for density in sorted(d for d in {*densities, 1.0} if d > floor):
        keep = min(int(np.floor(density * total - num_sparse * found.forced + 1e-6)), probabilities.size)
        kept = np.bincount(layer_of[order[:keep]], minlength=num_sparse)  # [sparse layers]
        # Keyed by the density asked for, not the one reached (up to one block below it), so that
        # `Selection.for_layer` at that density gives exactly these shares.
        points[density] = tuple((found.forced + kept) / found.counted)
    return BudgetAllocation(
        densities=tuple(map(float, points)),
        layer_densities=tuple((1.0,) * (num_layers - num_sparse) + tuple(map(float, p)) for p in points.values()),
        length=int(tokens.shape[1]),
    )


def budget_for_density(
    model: SeerCausalLM,
    tokens: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    density: float,
    shares_from: str = "gate",
    rule: str = "probability",
) -> Selection:
    """Selection(method="budget", budget=density) with the allocation `budget_allocation` measures on this batch
    (`density` among its points, so this batch's shares at `density` are exact, not interpolated).

    Every sparse layer then keeps its share at `density` on any input (`seer_jax.sparsity`), so the mean density
    over the sparse layers is `density` up to one block per layer and batch row (above it when `density` is below
    the diagonal's share). `last_block_dense` is off.
    """
    _check_density(density)
    densities = (*CALIBRATION_DENSITIES, density)
    allocation = budget_allocation(
        model, tokens, attention_mask, densities=densities, shares_from=shares_from, rule=rule
    )
    return Selection(method="budget", budget=density, allocation=allocation)


# The switches `choose_budget` tries by default. Both are model-dependent (H200, L = 8192 unless said): the tiny
# testbed's budget at density 0.1 gains from w = 0.5 (+5.71% against +7.01% PPL) and loses with the sink forced
# (+10.4% against +4.94%); SmolLM2's is ruined by w = 0.5 (+69.9% against +9.87%) and gains with the sink forced
# (+29.1% against +41.3% at density 0.2, L = 2048, CPU gates). BENCHMARKS.md, issue 20.
BUDGET_QUEST_WEIGHTS = (0.0, 0.5)
BUDGET_FORCE_SINK = (False, True)


@dataclasses.dataclass(frozen=True)
class BudgetCandidate:
    """One density budget `choose_budget` measured: its scores' quest weight, its selection (the sink forced or not,
    the shares calibrated with that weight), and on the scoring windows the sparse model's mean next-token NLL
    (nats) and mean block density."""

    quest_weight: float
    selection: Selection
    nll: float
    density: float


@nnx.jit
def _sparse_nll(model: SeerCausalLM, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits, density = logits_and_density(model, tokens)  # [1, T, V], [L, N]
    log_probabilities = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probabilities, tokens[:, 1:, None], axis=-1)
    return jnp.mean(nll), jnp.mean(density)


def choose_budget(
    model: SeerCausalLM,
    calibration_tokens: jax.Array,
    scoring_tokens: jax.Array,
    *,
    density: float,
    quest_weights: tuple[float, ...] = BUDGET_QUEST_WEIGHTS,
    force_sink: tuple[bool, ...] = BUDGET_FORCE_SINK,
) -> tuple[BudgetCandidate, tuple[BudgetCandidate, ...]]:
    """The density budget at `density` whose switches give the lowest language-modelling loss, and every candidate.

    For each quest weight w (`SeerConfig.quest_weight`) the shares are calibrated on `calibration_tokens`
    (`budget_for_density` on the gate + w · quest scores); each is tried with the sink forced and not; each of those
    sparse models scores `scoring_tokens` one window at a time (full windows, no padding). Both the NLL and the
    density are means over the scoring windows.

    Args:
      model: a model with prefill gates (its selection and quest weight are ignored; its `start_layer` counts).
      calibration_tokens: int [B, T] distillation-like windows the shares are calibrated on.
      scoring_tokens: int [B', T'] held-out windows the candidates are ranked on.
      density: the budget's mean density, in (0, 1].
      quest_weights, force_sink: the switches to try (every combination, in this order).

    Returns:
      (the candidate of lowest NLL, ties to the earlier one; every candidate in the order tried).
    """
    _check_density(density)
    if not quest_weights or not force_sink:
        raise ValueError("choose_budget needs at least one quest weight and one force_sink value")
    candidates = []
    for weight in quest_weights:
        scored = seer_with_abstract_gates(model, dataclasses.replace(model.seer_config, quest_weight=weight))
        budget = budget_for_density(scored, calibration_tokens, density=density)
        for sink in force_sink:
            selection = dataclasses.replace(budget, force_sink=sink)
            sparse = seer_with_abstract_gates(scored, dataclasses.replace(scored.seer_config, selection=selection))
            measured = [_sparse_nll(sparse, window[None]) for window in scoring_tokens]
            nll, reached = (float(np.mean([float(m[i]) for m in measured])) for i in (0, 1))
            candidates.append(BudgetCandidate(quest_weight=weight, selection=selection, nll=nll, density=reached))
    return min(candidates, key=lambda candidate: candidate.nll), tuple(candidates)
