"""The training and evaluation losses: next-token cross-entropy, the gates' distillation loss, and their sum.

Every loss function here has the `train.train_step.LossFn` signature `(model, tokens [B, T], rng) -> (loss,
metrics)` (or builds one), so `train.trainer.fit` trains with any of them:

* `next_token_loss`: mean next-token cross-entropy over packed rows (full fine-tuning, pretraining).
* `distillation_loss(scale=..., target=...)`: the gates' KL against the model's own attention (gate distillation)
  for the prefill gates, the decode gates, or both.
* `seer_next_token_loss`: the block-sparse model's cross-entropy plus the gates' KL (SeerAttention fine-tuning).

Cross-entropy: packed rows (`train.data`) have no padding, so every position but the last predicts the next token
and none is ignored: for tokens [B, T] the loss averages B × (T − 1) terms. The model runs over all T tokens (keeping
T a multiple of the gate block size) and the last position's logits are dropped. Logits are cast to float32 before
the log-softmax, so a bf16 model's loss is computed in float32. `next_token_nll` is the one per-position NLL: the
training losses, `evaluate_loss` and the perplexity evaluation (`train.perplexity`) all reduce it.

Gate distillation (docs/design.md §5, the official V2/HEAD loss):

    loss = 10 · Σ_layers KL(target ‖ softmax(gate logits)) over key blocks, on query-block rows i ≥ I // 4,
           averaged over every element B·N·(I − I//4)·J (torch `KLDivLoss` 'mean', zeros included, docs/design.md §5)

where the target is the layer's row-normalised 2D max-pooled attention map [B, N, I, J] from a dense forward with
`attention_with_pooling`, and the gate scores the same layer's pooled pre-RoPE q/k.

Decode-gate distillation (docs/design.md §5, SeerAttention-R; spec §4.4 with the deviations of docs/design.md §8):

    loss = 10 · Σ_layers mean over the counted rows (b, k, t) of KL(target[b, k, t] ‖ softmax_j(logits[b, k, t]))
           counted: max(block_size, floor(L_b · slice_ratio)) ≤ t < L_b    (L_b the real tokens of row b)

where the target is the per-token 1D map [B, K, T, J] of `seer_jax.decode_target` and the logits the decode gate's
on every token. A row's KL is summed over its blocks; the mean is over rows, not over the pack's J as the official
`KLDivLoss('mean')`, and rows t < block_size (no completed block, target all zero) never count.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from seer_jax.forwards import (
    decode_distillation_inputs,
    decode_gate_logits,
    distillation_inputs,
    gate_logits,
    joint_distillation_inputs,
    sparse_training_forward,
)
from seer_jax.model import CausalLM
from seer_jax.seer import SeerCausalLM
from train.train_step import LossFn, Metrics

# Which gates a distillation trains: the prefill AttnGates, the SeerAttention-R decode gates, or both in one run.
DISTILLATION_TARGETS = ("prefill", "decode", "both")
DECODE_SLICE_RATIO = 0.5  # the official `seerattn_loss_slice_ratio`: only each row's second half counts


def next_token_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """logits [B, T, V], tokens [B, T] → float32 [B, T − 1]: the NLL (nats) of each of tokens[:, 1:]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), tokens[:, 1:])


def next_token_loss(
    model: CausalLM, tokens: jax.Array, rng: jax.Array, *, remat: bool = False
) -> tuple[jax.Array, Metrics]:
    """A `train.train_step.LossFn`: (mean cross-entropy of tokens[:, 1:] given the prefix, no extra metrics).

    `rng` is unused (no dropout in these models). `remat` rematerialises each decoder layer (see `CausalLM`).
    """
    del rng
    logits, _ = model(tokens, remat=remat)  # [B, T, V]
    return next_token_nll(logits, tokens).mean(), {}


def gate_kl_loss(
    logits: Sequence[jax.Array], targets: Sequence[jax.Array], *, scale: float
) -> tuple[jax.Array, jax.Array]:
    """`scale` · Σ_layers mean KL(target ‖ softmax(logits)) on rows i ≥ I // 4; returns (loss, per-layer KL [L]).

    logits, targets: per layer f32 [B, N, I, J]; targets are row-normalised and zero above the diagonal, where the
    gate's logits are masked, so those entries add exactly 0 (a target 0 contributes 0, as xlogy(0, ·) = 0).
    """
    per_layer = []
    for layer_logits, target in zip(logits, targets, strict=True):
        first_row = layer_logits.shape[-2] // 4  # the first quarter of query-block rows is dropped (docs/design.md §5)
        log_q = jax.nn.log_softmax(layer_logits[..., first_row:, :].astype(jnp.float32), axis=-1)
        p = target[..., first_row:, :].astype(jnp.float32)
        kl = jax.scipy.special.xlogy(p, p) - p * log_q  # [B, N, I - I//4, J]
        per_layer.append(jnp.mean(kl))
    per_layer = jnp.stack(per_layer)
    return scale * jnp.sum(per_layer), per_layer


def decode_gate_kl_loss(
    logits: Sequence[jax.Array],
    targets: Sequence[jax.Array],
    lengths: jax.Array,
    *,
    block_size: int,
    slice_ratio: float,
    scale: float,
) -> tuple[jax.Array, jax.Array]:
    """`scale` · Σ_layers the decode gates' mean KL over the counted rows (module docstring); returns (loss,
    per-layer KL [L]).

    logits, targets: per layer f32 [B, K, T, J], row-aligned; targets zero where the logits are masked.
    lengths: int [B], the real tokens of each row. A batch without a counted row has loss 0.
    """
    length = logits[0].shape[-2]
    first = jnp.maximum(block_size, jnp.floor(lengths * slice_ratio).astype(jnp.int32))  # [B]
    rows = jnp.arange(length)  # [T]
    counted = (rows[None, :] >= first[:, None]) & (rows[None, :] < lengths[:, None])  # [B, T]
    per_layer = []
    for layer_logits, target in zip(logits, targets, strict=True):
        log_q = jax.nn.log_softmax(layer_logits.astype(jnp.float32), axis=-1)  # [B, K, T, J]
        p = target.astype(jnp.float32)
        row_kl = jnp.sum(jax.scipy.special.xlogy(p, p) - p * log_q, axis=-1)  # [B, K, T]
        num_rows = layer_logits.shape[1] * jnp.sum(counted)
        per_layer.append(jnp.sum(jnp.where(counted[:, None, :], row_kl, 0.0)) / jnp.maximum(num_rows, 1))
    per_layer = jnp.stack(per_layer)
    return scale * jnp.sum(per_layer), per_layer


def distillation_loss(
    *, scale: float, target: str = "prefill", slice_ratio: float = DECODE_SLICE_RATIO, decode_quest: bool = False
) -> LossFn:
    """The gate-distillation `LossFn` for `target` (one of `DISTILLATION_TARGETS`):

    * "prefill": `scale` × the prefill gates' KL (`gate_kl_loss`), metrics `kl/layer_<i>`;
    * "decode": `scale` × the decode gates' KL (`decode_gate_kl_loss` with `slice_ratio`), metrics
      `decode_kl/layer_<i>`;
    * "both": their sum from one forward, with both metric sets and `prefill_loss`, `decode_loss`.

    `decode_quest`: the decode gates' logits are the hybrid's, gate + quest_weight × each token's Quest bound
    (`DecodeFeatures.quest`), so the gates learn what the bound misses.

    The base forward sits under `stop_gradient`, so no base activation is kept for a backward pass: memory grows
    with sequence length like inference, and only the gates receive gradients. Give the model a dense prefill
    selection (the default), so the targets are the base model's attention.
    """
    if target not in DISTILLATION_TARGETS:
        raise ValueError(f"target: {target!r} is not one of {DISTILLATION_TARGETS}")

    def prefill_part(model, inputs):
        features, targets = inputs
        loss, per_layer = gate_kl_loss(gate_logits(model, features), targets, scale=scale)
        return loss, {f"kl/layer_{i}": kl for i, kl in enumerate(per_layer)}

    def decode_part(model, inputs):
        features, targets = inputs
        block_size = model.seer_config.decode.block_size
        loss, per_layer = decode_gate_kl_loss(
            decode_gate_logits(model, features),
            targets,
            features[0].lengths,
            block_size=block_size,
            slice_ratio=slice_ratio,
            scale=scale,
        )
        return loss, {f"decode_kl/layer_{i}": kl for i, kl in enumerate(per_layer)}

    def loss_fn(model: SeerCausalLM, tokens: jax.Array, rng: jax.Array):
        del rng  # deterministic
        if target == "prefill":
            return prefill_part(model, jax.lax.stop_gradient(distillation_inputs(model, tokens)))
        if target == "decode":
            return decode_part(
                model, jax.lax.stop_gradient(decode_distillation_inputs(model, tokens, quest=decode_quest))
            )
        prefill_inputs, decode_inputs = jax.lax.stop_gradient(
            joint_distillation_inputs(model, tokens, quest=decode_quest)
        )
        prefill_loss, prefill_metrics = prefill_part(model, prefill_inputs)
        decode_loss, decode_metrics = decode_part(model, decode_inputs)
        metrics = {**prefill_metrics, **decode_metrics, "prefill_loss": prefill_loss, "decode_loss": decode_loss}
        return prefill_loss + decode_loss, metrics

    return loss_fn


def seer_next_token_loss(
    model: SeerCausalLM, tokens: jax.Array, rng: jax.Array, *, gate_loss_scale: float, remat: bool = False
) -> tuple[jax.Array, Metrics]:
    """The SeerAttention fine-tuning loss (docs/design.md §5): next-token cross-entropy of the block-sparse model plus
    `gate_loss_scale` × the gates' distillation loss against the true pooled attention (`gate_kl_loss`).

    The gates see detached q/k and their TopK masks are not differentiable, so the LM loss trains the base model
    and the gate loss trains the gates only. `remat` rematerialises each decoder layer.
    """
    del rng
    # logits [B, T, V]; gate logits and targets per layer [B, N, I, J]
    logits, layer_gate_logits, targets = sparse_training_forward(model, tokens, remat=remat)
    lm_loss = next_token_nll(logits, tokens).mean()
    gate_loss, _ = gate_kl_loss(layer_gate_logits, targets, scale=gate_loss_scale)
    return lm_loss + gate_loss, {"lm_loss": lm_loss, "gate_loss": gate_loss}


def evaluate_loss(model: CausalLM, windows: np.ndarray, *, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) of `model` over int [n, T] windows (e.g. `train.data.eval_windows`)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size: {batch_size} must be positive")
    loss_sums = nnx.jit(lambda model, tokens: next_token_nll(model(tokens)[0], tokens).sum())
    total = sum(
        float(loss_sums(model, jnp.asarray(windows[start : start + batch_size])))
        for start in range(0, len(windows), batch_size)
    )
    return total / (windows.shape[0] * (windows.shape[1] - 1))
