"""Gate self-distillation (SEER_SPEC §2–§3): train the AttnGates of a frozen model to predict its own attention.

For every layer, one dense forward with `attention_with_pooling` gives the layer's true output and the row-normalised
2D max-pooled attention map [B, N, I, J] (the target); the gate scores the same layer's pooled pre-RoPE q/k. The loss
is the official V2/HEAD one:

    loss = 10 · Σ_layers KL(target ‖ softmax(gate logits)) over key blocks, on query-block rows i ≥ I // 4,
           averaged over every element B·N·(I − I//4)·J (torch `KLDivLoss` 'mean', zeros included, SEER_SPEC §10.16)

Only `GateParam` variables train: `train.trainer.fit(..., trainable=GateParam)` differentiates and optimises them
alone (the optimizer holds no state for the frozen base), and the base forward sits under `stop_gradient`, so no
base activation is kept for a backward pass: memory grows with sequence length like inference. AdamW at 1e-3, cosine
decay after 20 warm-up steps, no weight decay, gradients clipped to norm 1.0 (SEER_SPEC §3.3); base weights bf16.
"""

import dataclasses
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from seer_jax.adapters import save_adapter
from seer_jax.checkpoint import load_model
from seer_jax.gate import GateConfig, GateParam
from seer_jax.seer import SeerCausalLM, SeerConfig, distillation_inputs, gate_logits, seer_from_base
from seer_jax.sharding import MeshConfig, build_mesh, check_batch_size
from train.checkpoints import CHECKPOINTS_DIR
from train.data import LoaderConfig, LoaderState, PackedLoader
from train.run_config import store_run_config
from train.token_corpus import CorpusConfig, load_corpus
from train.trainer import StepRecord, TrainLoopConfig, TrainResult, fit

ADAPTER_DIR = "adapter"
RUN_CONFIG_FILE = "distill.json"
# What a resume may change (`train.run_config`); every other field must match. The cosine schedule decays over
# `steps`, so steps may not change.
MAY_CHANGE_ON_RESUME = ("out_dir", "cache_dir", "checkpoint_every", "resume", "mesh")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """A gate-distillation run.

    Attributes:
      model: base model directory (Hugging Face or converted by `convert.hf_to_flax`).
      data: local text data (see `train.documents`); tokenized with `tokenizer_dir` (default: the model's).
      out_dir: checkpoints, `metrics.jsonl` and, at the end, the gate adapter in `out_dir/adapter`.
      seq_len: tokens per packed row, a multiple of 64. batch_size: rows per step. steps: optimizer steps.
      learning_rate, warmup_steps, weight_decay, max_grad_norm: AdamW with linear warm-up and cosine decay to 0.
      loss_scale: multiplies the summed per-layer KL (the official 10).
      gate: the AttnGate structure. seed: gate initialisation, data order.
      dtype: base weights and compute ("bfloat16" or "float32"); gates always train in float32.
      checkpoint_every: steps between checkpoints. resume: continue from the newest checkpoint in out_dir.
      mesh: train on a device mesh (`seer_jax.sharding`: data, fsdp, tensor), or None: one device.
    """

    model: Path
    data: tuple[Path, ...]
    out_dir: Path
    tokenizer_dir: Path | None = None
    text_field: str = "text"
    cache_dir: Path | None = None
    seq_len: int = 8192
    batch_size: int = 1
    steps: int = 500
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loss_scale: float = 10.0
    gate: GateConfig = dataclasses.field(default_factory=GateConfig)
    seed: int = 0
    dtype: str = "bfloat16"
    checkpoint_every: int = 100
    resume: bool = False
    mesh: MeshConfig | None = None

    def __post_init__(self):
        if not self.data:
            raise ValueError("data: give at least one file or directory")
        if self.seq_len <= 0 or self.seq_len % 64:
            raise ValueError(f"seq_len: {self.seq_len} must be a positive multiple of 64 (the gate's block size)")
        for name in ("batch_size", "steps", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: {getattr(self, name)} must be positive")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} must be in [0, steps={self.steps})")
        for name in ("learning_rate", "max_grad_norm", "loss_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: {getattr(self, name)} must be positive")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: {self.weight_decay} must be >= 0")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype: {self.dtype!r} must be 'bfloat16' or 'float32'")
        if self.mesh is not None:
            check_batch_size(self.batch_size, self.mesh)


def gate_kl_loss(
    logits: Sequence[jax.Array], targets: Sequence[jax.Array], *, scale: float
) -> tuple[jax.Array, jax.Array]:
    """`scale` · Σ_layers mean KL(target ‖ softmax(logits)) on rows i ≥ I // 4; returns (loss, per-layer KL [L]).

    logits, targets: per layer f32 [B, N, I, J]; targets are row-normalised and zero above the diagonal, where the
    gate's logits are masked, so those entries add exactly 0 (a target 0 contributes 0, as xlogy(0, ·) = 0).
    """
    per_layer = []
    for layer_logits, target in zip(logits, targets, strict=True):
        first_row = layer_logits.shape[-2] // 4  # the first quarter of query-block rows is dropped (SEER_SPEC §3.1)
        log_q = jax.nn.log_softmax(layer_logits[..., first_row:, :].astype(jnp.float32), axis=-1)
        p = target[..., first_row:, :].astype(jnp.float32)
        kl = jax.scipy.special.xlogy(p, p) - p * log_q  # [B, N, I - I//4, J]
        per_layer.append(jnp.mean(kl))
    per_layer = jnp.stack(per_layer)
    return scale * jnp.sum(per_layer), per_layer


def distillation_loss(*, scale: float) -> Callable[[SeerCausalLM, jax.Array, jax.Array], tuple[jax.Array, dict]]:
    """The `train.trainer` loss function: `(model, tokens [B, T], rng) -> (loss, metrics)`."""

    def loss_fn(model: SeerCausalLM, tokens: jax.Array, rng: jax.Array):
        del rng  # deterministic
        features, targets = jax.lax.stop_gradient(distillation_inputs(model, tokens))
        loss, per_layer = gate_kl_loss(gate_logits(model, features), targets, scale=scale)
        metrics = {f"kl/layer_{i}": kl for i, kl in enumerate(per_layer)}
        return loss, metrics

    return loss_fn


def gate_optimizer(config: DistillConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.steps,
        end_value=0.0,
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay),
    )
    return optimizer, schedule


def build_seer_model(config: DistillConfig, mesh: Mesh | None = None) -> SeerCausalLM:
    """The frozen base model (in `config.dtype`, placed on `mesh` as it loads) with freshly initialised float32
    gates (on the default device; `fit` places them)."""
    dtype = jnp.dtype(config.dtype)
    base, _ = load_model(config.model, dtype=dtype, param_dtype=dtype, mesh=mesh)
    seer_config = SeerConfig(gate=config.gate)
    return seer_from_base(base, seer_config, rngs=nnx.Rngs(config.seed), gate_param_dtype=jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillResult:
    """model: the model with trained gates. train: the loop's result. adapter_dir: the exported gates (None when a
    signal stopped the run: the checkpoint holds the gates, and a resumed run exports them once finished)."""

    model: SeerCausalLM
    train: TrainResult
    adapter_dir: Path | None


def distill(
    config: DistillConfig,
    *,
    model: SeerCausalLM | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
    on_tokenize: Callable[[int], None] | None = None,
) -> DistillResult:
    """Runs the distillation and writes the adapter (unless a signal stopped it); `model` defaults to
    `build_seer_model(config)`."""
    adapter_dir = Path(config.out_dir) / ADAPTER_DIR
    mesh = None if config.mesh is None else build_mesh(config.mesh)
    if adapter_dir.exists() and not config.resume:
        raise ValueError(f"out_dir: {config.out_dir} already holds a finished run's adapter; choose a new directory")
    resuming = config.resume and (Path(config.out_dir) / CHECKPOINTS_DIR).is_dir()
    store_run_config(Path(config.out_dir) / RUN_CONFIG_FILE, config, resume=resuming, may_change=MAY_CHANGE_ON_RESUME)
    corpus = load_corpus(
        CorpusConfig(
            paths=config.data,
            tokenizer_dir=config.tokenizer_dir or config.model,
            text_field=config.text_field,
            cache_dir=config.cache_dir,
        ),
        on_batch=on_tokenize,
    )
    loader_config = LoaderConfig(seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed)
    PackedLoader(corpus, loader_config)  # fail on too little data before building or compiling anything

    def make_loader(state: LoaderState) -> PackedLoader:
        return PackedLoader(corpus, loader_config, state=state)

    model = model if model is not None else build_seer_model(config, mesh)
    optimizer, schedule = gate_optimizer(config)
    result = fit(
        model,
        loss_fn=distillation_loss(scale=config.loss_scale),
        optimizer=optimizer,
        config=TrainLoopConfig(
            out_dir=config.out_dir,
            total_steps=config.steps,
            checkpoint_every=config.checkpoint_every,
            resume=config.resume,
        ),
        make_loader=make_loader,
        trainable=GateParam,
        learning_rate=schedule,
        seed=config.seed,
        on_step=on_step,
        mesh=mesh,
    )
    if result.stopped_by is not None:  # half-trained gates are not exported as if final; resume to finish
        return DistillResult(model=model, train=result, adapter_dir=None)
    if adapter_dir.exists():  # a resumed run that had already finished: replace its adapter with this one
        shutil.rmtree(adapter_dir)
    save_adapter(model, adapter_dir, base_model=str(config.model), weights="safetensors")
    return DistillResult(model=model, train=result, adapter_dir=adapter_dir)
