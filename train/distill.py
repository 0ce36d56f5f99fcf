"""Gate self-distillation (docs/design.md §5): train the gates of a frozen model to predict its own attention.

    result = distill(DistillConfig(model=..., corpus=..., loader=..., optimizer=GATE_OPTIMIZER, loop=...))

`target` chooses the gates: "prefill" (the AttnGates), "decode" (SeerAttention-R's decode gates, `decode` giving
their structure) or "both" (one run, one frozen forward, the sum of the two losses). For every layer, one dense
forward gives the layer's true output and the targets: the pooled attention map of `attention_with_pooling` for the
prefill gate, the per-token block map of `seer_jax.decode_target` for the decode gate; each gate scores the same
layer's pre-RoPE q/k; the loss is their KL (`train.losses.distillation_loss`). Only the target's gate weights train
(`GateParam`, or `DECODE_GATE_PARAMS` for "decode"): `train.trainer.fit(..., trainable=...)` differentiates and
optimises them alone (the optimizer holds no state for the frozen rest). The optimizer is the project's one recipe
(`train.optimizer`) with the gates' settings, `GATE_OPTIMIZER`: AdamW at 1e-3, cosine decay after 20 warm-up steps,
no weight decay, gradients clipped to norm 1.0 (docs/design.md §5; the official decode recipe has the same rate);
base weights bf16.

The run directory (`loop.out_dir`) holds checkpoints and `metrics.jsonl` (`train.trainer`) and, at the end, the gate
adapter in `out_dir/adapter` (`seer_jax.adapters`): the model's gates and its `SeerConfig` (decode config included).
A "decode" run's model has no prefill gates (`SeerConfig.gate` None), so its adapter holds decode gates only.
"""

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from seer_jax.adapters import save_adapter
from seer_jax.checkpoint import load_model
from seer_jax.decode_config import DecodeConfig
from seer_jax.decode_gate import DECODE_GATE_PARAMS
from seer_jax.gate import GateConfig, GateParam
from seer_jax.seer import SeerCausalLM, seer_from_base
from seer_jax.seer_config import SeerConfig
from seer_jax.sharding import MeshConfig, build_mesh, check_batch_size
from train.data import LoaderConfig, LoaderState, PackedLoader
from train.losses import DECODE_SLICE_RATIO, DISTILLATION_TARGETS, distillation_loss
from train.optimizer import OptimizerConfig, build_optimizer
from train.run_config import store_run_config
from train.token_corpus import CorpusConfig, load_corpus
from train.train_checkpoints import CHECKPOINTS_DIR
from train.trainer import StepRecord, TrainLoopConfig, TrainResult, fit

ADAPTER_DIR = "adapter"
# The gates' optimizer (docs/design.md §5: HF Trainer's AdamW, cosine decay to 0, max_grad_norm 1.0).
GATE_OPTIMIZER = OptimizerConfig(
    learning_rate=1e-3, warmup_steps=20, schedule="cosine", beta2=0.999, weight_decay=0.0, grad_clip_norm=1.0
)
DTYPES = ("bfloat16", "float32")
RUN_CONFIG_FILE = "distill.json"
# What a resume may change (`train.run_config`); every other field must match. The cosine schedule decays over
# `loop.total_steps`, so the step count may not change.
MAY_CHANGE_ON_RESUME = ("loop.out_dir", "corpus.cache_dir", "loop.checkpoint_every", "loop.resume", "mesh")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """A gate-distillation run.

    Attributes:
      model: base model directory (Hugging Face or converted by `convert.hf_to_flax`).
      corpus: local text data (see `train.documents`) and its tokenizer (usually the model directory's).
      loader: tokens per packed row (a multiple of 64), rows per step, data order seed.
      optimizer: the gates' AdamW and its schedule (`GATE_OPTIMIZER` with the run's rate and warm-up).
      loop: steps, checkpoints, the run directory (`out_dir`), resume.
      loss_scale: multiplies the summed per-layer KL (the official 10).
      gate: the AttnGate structure. seed: gate initialisation and the run's PRNG key.
      target: the gates that train, one of `DISTILLATION_TARGETS` ("prefill", "decode", "both").
      decode: the decode gates' structure (and the selection stored with them in the adapter); required for the
        "decode" and "both" targets, None for "prefill".
      decode_slice_ratio: the decode loss counts rows t >= max(block_size, floor(L · ratio)) of each row of L real
        tokens (the official `seerattn_loss_slice_ratio`).
      decode_quest_in_loss: distil the decode gates on the hybrid scores they will be ranked by, gate +
        `decode.quest_weight` × Quest's bound (`DecodeFeatures.quest`), so that they learn what the bound misses;
        needs a decode config with quest_weight > 0. False: the official loss on the gate's own logits.
      dtype: base weights and compute ("bfloat16" or "float32"); gates always train in float32.
      mesh: train on a device mesh (`seer_jax.sharding`: data, fsdp, tensor), or None: one device.
    """

    model: Path
    corpus: CorpusConfig
    loader: LoaderConfig
    optimizer: OptimizerConfig = GATE_OPTIMIZER
    loop: TrainLoopConfig
    loss_scale: float = 10.0
    gate: GateConfig = dataclasses.field(default_factory=GateConfig)
    seed: int = 0
    dtype: str = "bfloat16"
    mesh: MeshConfig | None = None
    target: str = "prefill"
    decode: DecodeConfig | None = None
    decode_slice_ratio: float = DECODE_SLICE_RATIO
    decode_quest_in_loss: bool = False

    def __post_init__(self):
        if self.target not in DISTILLATION_TARGETS:
            raise ValueError(f"target: {self.target!r} is not one of {DISTILLATION_TARGETS}")
        if (self.decode is None) != (self.target == "prefill"):
            raise ValueError(f"decode: target {self.target!r} takes a DecodeConfig only for 'decode' and 'both'")
        if self.decode is not None and self.loader.seq_len <= self.decode.block_size:
            raise ValueError(
                f"seq_len: {self.loader.seq_len} leaves no row after the first decode block "
                f"({self.decode.block_size} tokens) for the decode loss"
            )
        if not 0.0 <= self.decode_slice_ratio < 1.0:
            raise ValueError(f"decode_slice_ratio: {self.decode_slice_ratio} must be in [0, 1)")
        if self.decode_quest_in_loss and (self.decode is None or not self.decode.quest_weight > 0):
            raise ValueError("decode_quest_in_loss: needs decode gates with a quest_weight > 0")
        if self.optimizer.warmup_steps >= self.loop.total_steps:
            raise ValueError(
                f"warmup_steps: {self.optimizer.warmup_steps} must be in [0, steps={self.loop.total_steps})"
            )
        if self.loss_scale <= 0:
            raise ValueError(f"loss_scale: {self.loss_scale} must be positive")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} must be 'bfloat16' or 'float32'")
        if self.mesh is not None:
            check_batch_size(self.loader.batch_size, self.mesh)

    @property
    def adapter_dir(self) -> Path:
        """Where the run writes the trained gates."""
        return Path(self.loop.out_dir) / ADAPTER_DIR

    @property
    def trainable(self) -> nnx.filterlib.Filter:
        """The weights that train: every gate's, or the decode gates' alone for the "decode" target."""
        return DECODE_GATE_PARAMS if self.target == "decode" else GateParam


def build_seer_model(config: DistillConfig, mesh: Mesh | None = None) -> SeerCausalLM:
    """The frozen base model (in `config.dtype`, placed on `mesh` as it loads) with freshly initialised float32
    gates (on the default device; `fit` places them): prefill gates unless the target is "decode", decode gates
    unless it is "prefill" (a decode-only adapter then holds no untrained prefill gates). The prefill selection is
    dense, so the targets are the base model's attention."""
    dtype = jnp.dtype(config.dtype)
    # The dense attention of layers without prefill gates (every layer of a decode-only run): cuDNN's fused kernel on
    # a GPU in 16-bit, never XLA's, which holds [B, N, T, T] float32 scores (16 GiB at 8 x 8192 on the testbed).
    fused = jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
    base, _ = load_model(
        config.model, dtype=dtype, param_dtype=dtype, mesh=mesh, attention_implementation="cudnn" if fused else "xla"
    )
    seer_config = SeerConfig(gate=None if config.target == "decode" else config.gate, decode=config.decode)
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
) -> DistillResult:
    """Runs the distillation and writes the adapter (unless a signal stopped it); `model` defaults to
    `build_seer_model(config)`."""
    adapter_dir = config.adapter_dir
    mesh = None if config.mesh is None else build_mesh(config.mesh)
    if adapter_dir.exists() and not config.loop.resume:
        raise ValueError(
            f"out_dir: {config.loop.out_dir} already holds a finished run's adapter; choose a new directory"
        )
    out_dir = Path(config.loop.out_dir)
    resuming = config.loop.resume and (out_dir / CHECKPOINTS_DIR).is_dir()
    store_run_config(out_dir / RUN_CONFIG_FILE, config, resume=resuming, may_change=MAY_CHANGE_ON_RESUME)
    corpus = load_corpus(config.corpus)
    PackedLoader(corpus, config.loader)  # fail on too little data before building or compiling anything

    def make_loader(state: LoaderState) -> PackedLoader:
        return PackedLoader(corpus, config.loader, state=state)

    model = model if model is not None else build_seer_model(config, mesh)
    optimizer, schedule = build_optimizer(config.optimizer, config.loop.total_steps)
    result = fit(
        model,
        loss_fn=distillation_loss(
            scale=config.loss_scale,
            target=config.target,
            slice_ratio=config.decode_slice_ratio,
            decode_quest=config.decode_quest_in_loss,
        ),
        optimizer=optimizer,
        config=config.loop,
        make_loader=make_loader,
        trainable=config.trainable,
        learning_rate=schedule,
        seed=config.seed,
        on_step=on_step,
        mesh=mesh,
    )
    if result.stopped_by is not None:  # half-trained gates are not exported as if final; resume to finish
        return DistillResult(model=model, train=result, adapter_dir=None)
    if adapter_dir.exists():  # a resumed run that had already finished: replace its adapter with this one
        shutil.rmtree(adapter_dir, ignore_errors=True)  # each process of a multi-process job tries
    save_adapter(model, adapter_dir, base_model=str(config.model), weights="safetensors")
    return DistillResult(model=model, train=result, adapter_dir=adapter_dir)
