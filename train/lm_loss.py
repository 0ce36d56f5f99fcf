"""Causal language-model loss: mean next-token cross-entropy over packed rows.

Packed rows (`train.data`) have no padding, so every position but the last predicts the next token and none is
ignored: for tokens [B, T] the loss averages B × (T − 1) terms. The model runs over all T tokens (keeping T a
multiple of the gate block size) and the last position's logits are dropped. Logits are cast to float32 before the
log-softmax, so a bf16 model's loss is computed in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from seer_jax.model import CausalLM
from seer_jax.seer import SeerCausalLM, sparse_training_forward
from train.distill import gate_kl_loss
from train.train_step import Metrics


def next_token_loss(
    model: CausalLM, tokens: jax.Array, rng: jax.Array, *, remat: bool = False
) -> tuple[jax.Array, Metrics]:
    """A `train.train_step.LossFn`: (mean cross-entropy of tokens[:, 1:] given the prefix, no extra metrics).

    `rng` is unused (no dropout in these models). `remat` rematerialises each decoder layer (see `CausalLM`).
    """
    del rng
    logits, _ = model(tokens, remat=remat)  # [B, T, V]
    return _cross_entropy(logits, tokens).mean(), {}


def seer_next_token_loss(
    model: SeerCausalLM, tokens: jax.Array, rng: jax.Array, *, gate_loss_scale: float, remat: bool = False
) -> tuple[jax.Array, Metrics]:
    """The SeerAttention fine-tuning loss (SEER_SPEC §8): next-token cross-entropy of the block-sparse model plus
    `gate_loss_scale` × the gates' distillation loss against the true pooled attention (`train.distill`).

    The gates see detached q/k and their TopK masks are not differentiable, so the LM loss trains the base model
    and the gate loss trains the gates only. `remat` rematerialises each decoder layer.
    """
    del rng
    # logits [B, T, V]; gate logits and targets per layer [B, N, I, J]
    logits, gate_logits, targets = sparse_training_forward(model, tokens, remat=remat)
    lm_loss = _cross_entropy(logits, tokens).mean()
    gate_loss, _ = gate_kl_loss(gate_logits, targets, scale=gate_loss_scale)
    return lm_loss + gate_loss, {"lm_loss": lm_loss, "gate_loss": gate_loss}


def evaluate_loss(model: CausalLM, windows: np.ndarray, *, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) of `model` over int [n, T] windows (e.g. `train.data.eval_windows`)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size: {batch_size} must be positive")
    loss_sums = nnx.jit(lambda model, tokens: _cross_entropy(model(tokens)[0], tokens).sum())
    total = sum(
        float(loss_sums(model, jnp.asarray(windows[start : start + batch_size])))
        for start in range(0, len(windows), batch_size)
    )
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def _cross_entropy(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """logits [B, T, V], tokens [B, T] → float32 [B, T − 1] losses of predicting tokens[:, 1:]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), tokens[:, 1:])
