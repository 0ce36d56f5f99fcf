"""Full-parameter causal-LM training of a Llama-family model: fine-tuning a checkpoint or pretraining from scratch.

    result = finetune(FinetuneConfig(model_dir=..., corpus=..., loader=..., optimizer=..., loop=...))

The command line is `python -m train.finetune`; the embedded demo (`train.demo`) pretrains its model with it too.
The model comes from `model_dir` (a converted or HF directory, `seer_jax.checkpoint.load_model`), or is initialised
at random from `init_config` (an HF config.json) or `preset` (`train.model_source.PRESETS`). `yarn` rewrites its
RoPE to YaRN before training (docs/design.md §5). Every parameter trains, in float32 master weights; the forward and
backward run in `compute_dtype` (RMSNorm statistics, attention softmax and the loss stay float32). `remat`
recomputes each decoder layer in the backward pass (`nnx.remat`, dense and SeerAttention mode), trading compute for
activation memory. The optimizer is the project's one recipe (`train.optimizer`: AdamW with warmup and linear or
cosine decay and global-norm clipping); the loss is mean next-token cross-entropy over packed rows (`train.losses`),
a seam: `finetune(config, loss_fn=...)` trains the same model with another loss. Data are packed rows of
`train.data`; the loop is `train.trainer`.

Output directory (`loop.out_dir`):

    finetune.json      this run's FinetuneConfig
    config.json        the HF config of the trained model (YaRN applied); a resumed run must match it
    tokenizer files    the tokenizer, saved by transformers
    checkpoints/       training-state checkpoints (`train.train_checkpoints`); `loop.resume` continues from the newest
    metrics.jsonl      per-step metrics (`train.trainer`)
    model/             the trained model as a converted directory (float32), written once all steps are done
    adapter/           SeerAttention mode: the trained gates (`seer_jax.adapters`)

SeerAttention mode (docs/design.md §5, `seer`): attaches distilled gates (`train.distill`) and trains with block-sparse
attention at `nz_ratio` (TopK): every weight trains with the LM loss, and the gates also with `gate_loss_scale` ×
their distillation loss against the true pooled attention (`train.losses.seer_next_token_loss`). The base weights go
to `model/` as usual and the gates to `adapter/`.

`mesh` trains on a device mesh (`seer_jax.sharding`): parameters and AdamW state sharded over fsdp and tensor,
batches over data × fsdp. `export_hf_dir` also writes the trained model as a Hugging Face directory
(`seer_jax.hf_export`). A signal stops the run after the current step with a checkpoint saved
(`FinetuneResult.model_dir` is then None); a NaN/inf loss raises `TrainingDivergedError` with the last good
checkpoint kept.
"""

import dataclasses
import functools
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from transformers import PreTrainedTokenizerBase

from seer_jax.adapters import attach_gates, read_adapter, save_adapter
from seer_jax.attention import IMPLEMENTATIONS
from seer_jax.base_identity import check_base_identity
from seer_jax.checkpoint import save_converted
from seer_jax.config import ModelConfig
from seer_jax.hf_export import EXPORT_DTYPES, save_hf
from seer_jax.multihost import is_primary
from seer_jax.seer import base_of
from seer_jax.sharding import MeshConfig, build_mesh, check_batch_size
from seer_jax.sparsity import Selection
from train.data import LoaderConfig, PackedLoader
from train.losses import next_token_loss, seer_next_token_loss
from train.model_source import PRESETS, YarnConfig, apply_yarn, build_model, preset_config, read_hf_config
from train.optimizer import OptimizerConfig, build_optimizer
from train.run_config import store_run_config
from train.token_corpus import CorpusConfig, load_corpus, load_tokenizer
from train.train_checkpoints import CHECKPOINTS_DIR
from train.train_step import LossFn
from train.trainer import StepRecord, TrainLoopConfig, TrainResult, fit

COMPUTE_DTYPES = ("bfloat16", "float32")
MODEL_SUBDIR = "model"
ADAPTER_SUBDIR = "adapter"
RUN_CONFIG_FILE = "finetune.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeerTuning:
    """SeerAttention fine-tuning. gates: a gate adapter directory for the model (e.g. from `train.distill`).
    nz_ratio: TopK causal block density of the sparse attention. gate_loss_scale: weight of the gates' loss.
    allow_other_base: attach the gates even to a base other than the one they recorded (`seer_jax.base_identity`).
    """

    gates: Path
    nz_ratio: float = 0.5
    gate_loss_scale: float = 10.0
    allow_other_base: bool = False

    def __post_init__(self):
        if not Path(self.gates).is_dir():
            raise ValueError(f"gates: {self.gates} is not a directory; pass a gate adapter (train.distill_gates)")
        try:
            Selection(method="nz_ratio", nz_ratio=self.nz_ratio)  # the one place a selection setting is checked
        except ValueError as error:
            raise ValueError(f"nz_ratio: {error}") from None
        if self.gate_loss_scale <= 0:
            raise ValueError(f"gate_loss_scale: {self.gate_loss_scale} must be positive")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """A training run.

    Attributes:
      model_dir: start from this converted or HF model directory; or
      init_config: initialise at random the architecture of this HF config.json; or
      preset: initialise at random this `train.model_source.PRESETS` architecture (vocabulary from the tokenizer).
      corpus: the documents and the tokenizer (`corpus.tokenizer_dir`: usually the model directory).
      loader: rows per batch, tokens per row, data order seed.
      optimizer: AdamW and its schedule.
      loop: steps, checkpoints, output directory, resume.
      compute_dtype: the dtype of matmuls and activations (weights are float32).
      attention_implementation: `seer_jax.attention` implementation (`xla` on CPU, `cudnn` on GPUs).
      remat: rematerialise each decoder layer in the backward pass.
      yarn: extend the context with YaRN RoPE scaling, or None.
      seed: random init (from scratch) and the run's PRNG key.
      export_hf_dir: write the trained model there as an HF directory (must not exist), or None.
      export_dtype: the exported weights' dtype.
      seer: SeerAttention mode (gates and block-sparse attention), or None for dense training.
      mesh: train on a device mesh (`seer_jax.sharding`: data, fsdp, tensor), or None: one device.
    """

    model_dir: Path | None = None
    init_config: Path | None = None
    preset: str | None = None
    corpus: CorpusConfig
    loader: LoaderConfig
    optimizer: OptimizerConfig
    loop: TrainLoopConfig
    compute_dtype: str = "bfloat16"
    attention_implementation: str = "xla"
    remat: bool = False
    yarn: YarnConfig | None = None
    seed: int = 0
    export_hf_dir: Path | None = None
    export_dtype: str = "bfloat16"
    seer: SeerTuning | None = None
    mesh: MeshConfig | None = None

    def __post_init__(self):
        sources = [name for name in ("model_dir", "init_config", "preset") if getattr(self, name) is not None]
        if len(sources) != 1:
            raise ValueError(f"model_dir, init_config, preset: give exactly one model source, got {sources or 'none'}")
        if self.model_dir is not None and not (Path(self.model_dir) / "config.json").is_file():
            raise ValueError(
                f"model_dir: {self.model_dir} holds no config.json; pass a converted or HF model directory"
            )
        if self.init_config is not None and not Path(self.init_config).is_file():
            raise ValueError(f"init_config: {self.init_config} is not a file")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset: {self.preset!r} is not one of {sorted(PRESETS)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype: {self.compute_dtype!r} is not one of {COMPUTE_DTYPES}")
        if self.attention_implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"attention_implementation: {self.attention_implementation!r} is not one of {IMPLEMENTATIONS}"
            )
        if self.attention_implementation == "cudnn" and self.compute_dtype != "bfloat16":
            raise ValueError(
                "attention_implementation: cudnn runs in bf16/fp16 only; use compute_dtype bfloat16 (or xla attention)"
            )
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype: {self.export_dtype!r} is not one of {EXPORT_DTYPES}")
        if self.export_hf_dir is not None and Path(self.export_hf_dir).exists():
            raise ValueError(f"export_hf_dir: {self.export_hf_dir} already exists; choose a new directory or remove it")
        if self.mesh is not None:
            check_batch_size(self.loader.batch_size, self.mesh)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneResult:
    """train: the loop's result. model_dir: the converted trained model (None when stopped early). hf_dir: the HF
    export (None when not asked for, or stopped early).
    """

    train: TrainResult
    model_dir: Path | None
    hf_dir: Path | None


def finetune(
    config: FinetuneConfig,
    *,
    loss_fn: LossFn | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> FinetuneResult:
    """Runs (or resumes) the training run `config` describes; see the module docstring.

    Args:
      config: the run.
      loss_fn: `(model, tokens, rng) -> (loss, metrics)`; None: `train.losses.next_token_loss` (with `remat`).
      on_step: called after every step (a progress bar).

    Raises:
      TrainingDivergedError: the loss or gradient norm became NaN/inf (the last good checkpoint is kept).
    """
    out_dir = Path(config.loop.out_dir)
    mesh = None if config.mesh is None else build_mesh(config.mesh)
    tokenizer = load_tokenizer(config.corpus.tokenizer_dir)
    hf_config = model_hf_config(config, tokenizer)
    model_config = ModelConfig.from_hf(hf_config)
    if config.loader.seq_len > model_config.max_position_embeddings:
        raise ValueError(
            f"seq_len: {config.loader.seq_len} exceeds the model's max_position_embeddings "
            f"({model_config.max_position_embeddings}); extend the context with YaRN or train shorter rows"
        )
    _prepare_out_dir(out_dir, config, hf_config, tokenizer)
    compute_dtype = jnp.dtype(config.compute_dtype)
    model = build_model(
        hf_config,
        model_dir=config.model_dir,
        seed=config.seed,
        dtype=compute_dtype,
        param_dtype=jnp.float32,
        attention_implementation=config.attention_implementation,
        mesh=mesh,
    )
    if config.seer is not None:
        adapter = read_adapter(config.seer.gates)
        check_base_identity(
            adapter.base_identity, model, adapter=str(config.seer.gates), allow_other_base=config.seer.allow_other_base
        )
        model = attach_gates(model, adapter, selection=Selection(method="nz_ratio", nz_ratio=config.seer.nz_ratio))
        default_loss = functools.partial(
            seer_next_token_loss, gate_loss_scale=config.seer.gate_loss_scale, remat=config.remat
        )
    else:
        default_loss = functools.partial(next_token_loss, remat=config.remat)
    corpus = load_corpus(config.corpus)
    optimizer, schedule = build_optimizer(config.optimizer, config.loop.total_steps)
    result = fit(
        model,
        loss_fn=loss_fn or default_loss,
        optimizer=optimizer,
        config=config.loop,
        make_loader=lambda state: PackedLoader(corpus, config.loader, state=state),
        learning_rate=schedule,
        seed=config.seed,
        on_step=on_step,
        mesh=mesh,
    )
    if result.stopped_by is not None:
        return FinetuneResult(train=result, model_dir=None, hf_dir=None)
    model_dir = out_dir / MODEL_SUBDIR
    shutil.rmtree(model_dir, ignore_errors=True)  # a resumed run that went further replaces the earlier model
    if config.seer is not None:
        adapter_dir = out_dir / ADAPTER_SUBDIR
        shutil.rmtree(adapter_dir, ignore_errors=True)
        save_adapter(model, adapter_dir, base_model=str(model_dir))
        model = base_of(model)
    save_converted(model, model_dir, hf_dir=out_dir)
    if config.export_hf_dir is not None:
        save_hf(model, hf_config, config.export_hf_dir, dtype=config.export_dtype, copy_from=out_dir)
    return FinetuneResult(train=result, model_dir=model_dir, hf_dir=config.export_hf_dir)


def model_hf_config(config: FinetuneConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The HF config of the model the run trains: from its source, YaRN applied; checked against the tokenizer."""
    if config.model_dir is not None:
        hf_config = read_hf_config(config.model_dir)
    elif config.init_config is not None:
        hf_config = read_hf_config(config.init_config)
    else:
        hf_config = preset_config(config.preset, tokenizer)
    if config.yarn is not None:
        hf_config = apply_yarn(hf_config, config.yarn)
    vocab_size = ModelConfig.from_hf(hf_config).vocab_size
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer: {config.corpus.tokenizer_dir} has {len(tokenizer)} tokens, more than the model's vocab_size "
            f"({vocab_size}); use the model's own tokenizer"
        )
    return hf_config


def _prepare_out_dir(
    out_dir: Path, config: FinetuneConfig, hf_config: dict[str, Any], tokenizer: PreTrainedTokenizerBase
) -> None:
    config_path = out_dir / "config.json"
    if not config.loop.resume and (out_dir / CHECKPOINTS_DIR).exists():
        raise ValueError(f"out_dir: {out_dir} already holds checkpoints; resume from them or choose a new directory")
    if config.loop.resume and config_path.is_file() and _read_json(config_path) != hf_config:
        raise ValueError(
            f"resume: {config_path} describes another model than this run's; resume with the same model settings"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    resuming = config.loop.resume and (out_dir / CHECKPOINTS_DIR).is_dir()
    store_run_config(out_dir / RUN_CONFIG_FILE, config, resume=resuming, may_change=may_change_on_resume(config))
    if is_primary():  # every process has read config.json: store_run_config waits for them all
        config_path.write_text(json.dumps(hf_config, indent=2) + "\n")
        tokenizer.save_pretrained(str(out_dir))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); restore it or start a new run") from None


def may_change_on_resume(config: FinetuneConfig) -> tuple[str, ...]:
    """The `FinetuneConfig` fields a resume may change (`train.run_config`): outputs, caches, logging, the mesh and
    how the same numbers are computed; `loop.total_steps` only under the constant schedule, whose rates do not
    depend on it (linear and cosine decay over the total)."""
    fields = ("loop.out_dir", "loop.checkpoint_every", "loop.keep_checkpoints", "loop.log_every", "loop.resume")
    fields += ("corpus.cache_dir", "attention_implementation", "remat", "export_hf_dir", "export_dtype", "mesh")
    fields += ("seer.allow_other_base",)
    return fields + (("loop.total_steps",) if config.optimizer.schedule == "constant" else ())
