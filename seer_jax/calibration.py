"""The prefill threshold at which a model's gates keep a stated fraction of blocks on given data: the default
selection an adapter records with its density (`seer_jax.adapters.save_adapter(selection=, prefill_density=)`).

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
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seer_jax.seer import SeerCausalLM, seer_with_abstract_gates
from seer_jax.sparsity import BLOCK_SIZE, Selection, causal_block_mask, masked_softmax


@nnx.jit
def _gate_logits(model: SeerCausalLM, tokens: jax.Array, attention_mask: jax.Array | None) -> tuple[jax.Array, ...]:
    _, _, collected = model.forward(tokens, attention_mask=attention_mask, collect=("gate_logits",))
    return tuple(layer["gate_logits"] for layer in collected)


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
    if model.seer_config.gate is None:
        raise ValueError("threshold_for_density needs prefill gates; this model has decode gates only")
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    seer_config = model.seer_config
    dense = seer_with_abstract_gates(model, dataclasses.replace(seer_config, selection=Selection()))
    logits = _gate_logits(dense, tokens, attention_mask)[seer_config.start_layer :]  # each [B, N, I, J]
    num_layers, num_heads = len(model.model.layers), model.config.num_q_heads
    num_blocks = -(-tokens.shape[1] // BLOCK_SIZE)
    lengths = tokens.shape[1] if attention_mask is None else jnp.sum(attention_mask, axis=-1)[:, None]  # [B, 1]
    real_rows = jnp.arange(num_blocks)[None, :] * BLOCK_SIZE < lengths  # [B, I], rows in row-aligned coordinates
    causal = causal_block_mask(num_blocks, num_blocks)  # [I, J]
    off_diagonal = causal & ~jnp.eye(num_blocks, dtype=bool)  # [I, J]
    counted = int(jnp.sum(real_rows[:, :, None] & causal))  # per (layer, head)
    diagonal = int(jnp.sum(real_rows))  # per (layer, head)
    total = num_layers * num_heads * counted
    forced = (num_layers - len(logits)) * num_heads * counted + len(logits) * num_heads * diagonal
    candidates = real_rows[:, None, :, None] & off_diagonal  # [B, 1, I, J]
    per_layer = [np.asarray(masked_softmax(layer)[jnp.broadcast_to(candidates, layer.shape)]) for layer in logits]
    probabilities = np.sort(np.concatenate([np.zeros(0, np.float32), *per_layer]))[::-1]  # descending
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
