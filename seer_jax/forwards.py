"""The one forward of a `SeerCausalLM` with a fixed `collect` (`seer_jax.seer`): what evaluation, distillation and
fine-tuning call.

    block_density(model, tokens, mask)             f32 [L, N] prefill block density per layer and head
    logits_and_density(model, tokens, mask)        logits and that density from one prefill (PPL at a density)
    decode_logits_and_density(model, tokens, mask, continuation)   teacher-forced sparse decoding, as `generate`
    distillation_inputs(model, tokens, mask)       per layer the gate's features and its pooled-attention target
    decode_distillation_inputs(model, tokens, mask)   per layer the decode gate's features and per-token target
    joint_distillation_inputs(model, tokens, mask)    both gates' distillation inputs from one forward
    sparse_training_forward(model, tokens)         logits, gate logits and targets of the block-sparse forward
    gate_logits(model, features)                   each layer's gate logits from its features (differentiable)
    decode_gate_logits(model, features)            each layer's decode-gate logits on every token (differentiable)
"""

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from seer_jax.decode_target import DecodeFeatures, training_logits
from seer_jax.gate import GateFeatures
from seer_jax.seer import DECODE_COLLECTABLE, SeerCausalLM


def _collect(
    model: SeerCausalLM, tokens: jax.Array, attention_mask: jax.Array | None, names: tuple[str, ...], **options
) -> tuple[jax.Array, tuple[Mapping[str, jax.Array], ...]]:
    if not isinstance(model, SeerCausalLM):
        raise ValueError(f"expected a SeerCausalLM, got {type(model).__name__}")
    logits, _, collected = model.forward(tokens, attention_mask=attention_mask, collect=names, **options)
    return logits, collected


def block_density(model: SeerCausalLM, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """f32 [L, N]: the fraction of causal 64×64 blocks each layer and head computes in this batch's prefill.

    Counts the query blocks holding real tokens of each row, pooled over the batch; 1.0 in dense layers.
    tokens: int [B, T]; attention_mask: bool [B, T] left padding, or None.
    """
    return logits_and_density(model, tokens, attention_mask)[1]


def logits_and_density(
    model: SeerCausalLM, tokens: jax.Array, attention_mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """The model's logits [B, T, V] and `block_density` f32 [L, N] from one prefill (perplexity at a density)."""
    logits, collected = _collect(model, tokens, attention_mask, ("density",))
    return logits, jnp.stack([layer["density"] for layer in collected])  # [B, T, V], [L, N]


def decode_logits_and_density(
    model: SeerCausalLM, tokens: jax.Array, attention_mask: jax.Array | None, continuation: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced decoding of a continuation, step by step as `seer_jax.generate.generate` decodes.

    Prefills `tokens` (int [B, T], left padding in `attention_mask`), then feeds continuation[:, :-1] (int [B, C],
    C >= 2) one token per decode step into a cache of T + C − 1 slots, as `generate` with max_new_tokens = C does;
    with a generation's own tokens every step selects what that generation selected.

    Returns:
      logits f32-or-compute-dtype [B, C, V], logits[:, i] predicting continuation[:, i]; and the decode density
      f32 [L]: per layer, the blocks attended over the blocks holding real tokens (the current one included),
      summed over decode steps, rows and kv heads (1.0 in a layer that decodes densely).
    """
    if not isinstance(model, SeerCausalLM):
        raise ValueError(f"expected a SeerCausalLM, got {type(model).__name__}")
    length, num_new = tokens.shape[1], continuation.shape[1]
    if num_new < 2:
        raise ValueError(f"the continuation needs at least 2 tokens (1 decode step), got {num_new}")
    logits, cache = model(tokens, attention_mask=attention_mask, last_only=True)  # [B, 1, V]
    cache = cache.padded_to(length + num_new - 1)

    def step(cache, token):
        step_logits, cache, collected = model.forward(token[:, None], cache=cache, collect=DECODE_COLLECTABLE)
        return cache, (step_logits[:, 0], jnp.stack([layer["decode_blocks"] for layer in collected]))

    _, (step_logits, blocks) = jax.lax.scan(step, cache, continuation[:, :-1].T)  # [C − 1, B, V], [C − 1, L, 2]
    logits = jnp.concatenate([logits, step_logits.transpose(1, 0, 2)], axis=1)  # [B, C, V]
    blocks = jnp.sum(blocks, axis=0)  # [L, 2]
    return logits, blocks[:, 0] / blocks[:, 1]


def distillation_inputs(
    model: SeerCausalLM, tokens: jax.Array, attention_mask: jax.Array | None = None
) -> tuple[tuple[GateFeatures, ...], tuple[jax.Array, ...]]:
    """Per layer, the gate's `GateFeatures` and its target (the true pooled attention map, f32 [B, N, I, J]).

    The targets are those of the model's own forward. Distillation gives the model a dense selection (the default
    `Selection()`): every layer then computes the base model's attention and its target in one kernel. Call it
    outside the differentiated function (under `jax.lax.stop_gradient`): the loss needs only
    `gate_logits(model, features)` and the targets.
    """
    _, collected = _collect(model, tokens, attention_mask, ("gate_features", "target"))
    return tuple(layer["gate_features"] for layer in collected), tuple(layer["target"] for layer in collected)


def sparse_training_forward(
    model: SeerCausalLM, tokens: jax.Array, *, remat: bool = False
) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Logits [B, T, V] of the block-sparse model, and per layer the gate logits and their pooled-attention targets
    (everything the fine-tuning loss needs, from one forward over unpadded rows). The output is differentiable in
    the base weights; the gate logits see detached q/k (the LM loss never reaches the gate) and the targets are
    detached. `remat` recomputes each decoder layer in the backward pass (`nnx.remat`)."""
    logits, collected = _collect(model, tokens, None, ("gate_logits", "target"), remat=remat)
    return logits, tuple(layer["gate_logits"] for layer in collected), tuple(layer["target"] for layer in collected)


def gate_logits(model: SeerCausalLM, features: Sequence[GateFeatures]) -> tuple[jax.Array, ...]:
    """Each layer's gate logits f32 [B, N, I, J] from its `GateFeatures` (`AttnGate.score`)."""
    layers = model.model.layers
    if len(features) != len(layers):
        raise ValueError(f"expected GateFeatures for each of the {len(layers)} layers, got {len(features)}")
    return tuple(
        layer.self_attn.attn_gate.score(layer_features) for layer, layer_features in zip(layers, features, strict=True)
    )


def _decode_names(quest: bool) -> tuple[str, ...]:
    return ("decode_features", "decode_target", "decode_quest") if quest else ("decode_features", "decode_target")


def _decode_inputs(collected) -> tuple[tuple[DecodeFeatures, ...], tuple[jax.Array, ...]]:
    features = tuple(
        dataclasses.replace(layer["decode_features"], quest=layer["decode_quest"]) if "decode_quest" in layer
        else layer["decode_features"]
        for layer in collected
    )  # fmt: skip
    return features, tuple(layer["decode_target"] for layer in collected)


def decode_distillation_inputs(
    model: SeerCausalLM, tokens: jax.Array, attention_mask: jax.Array | None = None, *, quest: bool = False
) -> tuple[tuple[DecodeFeatures, ...], tuple[jax.Array, ...]]:
    """Per layer, the decode gate's `DecodeFeatures` and its per-token target f32 [B, K, T, J]
    (`seer_jax.decode_target`), row-aligned, from the model's own forward (give it a dense prefill selection, as
    `distillation_inputs`, to distil against the base model). Call it outside the differentiated function; the loss
    needs only `decode_gate_logits(model, features)` and the targets. `quest`: the features also carry each token's
    Quest bound, so the gate distils on the hybrid scores (`DecodeFeatures.quest`)."""
    _, collected = _collect(model, tokens, attention_mask, _decode_names(quest))
    return _decode_inputs(collected)


def joint_distillation_inputs(
    model: SeerCausalLM, tokens: jax.Array, attention_mask: jax.Array | None = None, *, quest: bool = False
) -> tuple[
    tuple[tuple[GateFeatures, ...], tuple[jax.Array, ...]], tuple[tuple[DecodeFeatures, ...], tuple[jax.Array, ...]]
]:
    """(`distillation_inputs`, `decode_distillation_inputs`) from one forward: both gates distil together."""
    _, collected = _collect(model, tokens, attention_mask, ("gate_features", "target", *_decode_names(quest)))
    prefill = tuple(layer["gate_features"] for layer in collected), tuple(layer["target"] for layer in collected)
    return prefill, _decode_inputs(collected)


def decode_gate_logits(model: SeerCausalLM, features: Sequence[DecodeFeatures]) -> tuple[jax.Array, ...]:
    """Each layer's decode-gate logits f32 [B, K, T, J] on every token, from its `DecodeFeatures`
    (`seer_jax.decode_target.training_logits`: blocks not completed before a token are masked)."""
    layers = model.model.layers
    if len(features) != len(layers):
        raise ValueError(f"expected DecodeFeatures for each of the {len(layers)} layers, got {len(features)}")
    if model.seer_config.decode is None:
        raise ValueError("the model has no decode gates (seer_config.decode is None)")
    return tuple(
        training_logits(layer.self_attn.decode_gate, layer_features)
        for layer, layer_features in zip(layers, features, strict=True)
    )
