"""Full-parameter causal-LM training of a Llama-family model: fine-tuning a checkpoint or pretraining from scratch.

    python -m train.finetune --model DIR --data PATH... --seq-len 32768 --batch-size 1 --steps 400 --lr 1e-5 \\
        --warmup-steps 20 --schedule linear --remat --attention cudnn \\
        --yarn-factor 4 --yarn-original-max-positions 8192 --out runs/yarn --export-hf runs/yarn-hf
    python -m train.finetune --preset demo-llama --tokenizer-dir TOK --data PATH... --seq-len 512 --batch-size 8 \\
        --steps 100 --lr 3e-3 --warmup-steps 10 --out runs/demo

The model comes from `--model` (a converted or HF directory, `seer_jax.checkpoint.load_model`), or is initialised
at random from `--init-config config.json` or `--preset` (`train.model_source.PRESETS`). `--yarn-factor` rewrites
its RoPE to YaRN before training (SPEC §8). Every parameter trains, in float32 master weights; the forward and
backward run in `--dtype` (bfloat16 by default; RMSNorm statistics, attention softmax and the loss stay float32).
`--remat` recomputes each decoder layer in the backward pass (`nnx.remat`, dense and SeerAttention mode), trading
compute for activation memory.
The optimizer is AdamW with warmup and linear or cosine decay and global-norm clipping (`train.optimizer`); the loss
is mean next-token cross-entropy over packed rows (`train.lm_loss`), a seam: `finetune(config, loss_fn=...)` trains
the same model with another loss. Data are packed rows of `train.data`; the loop is `train.trainer`.

Output directory (`--out`):

    finetune.json      this run's FinetuneConfig
    config.json        the HF config of the trained model (YaRN applied); a resumed run must match it
    tokenizer files    the tokenizer, saved by transformers
    checkpoints/       training checkpoints (`train.checkpoints`); `--resume` continues from the newest
    metrics.jsonl      per-step metrics (`train.trainer`)
    model/             the trained model as a converted directory (float32), written once `--steps` are done
    adapter/           SeerAttention mode: the trained gates (`seer_jax.adapters`)

SeerAttention mode (SEER_SPEC §8): `--seer-gates ADAPTER` attaches distilled gates (`train.distill_gates`) and
trains with block-sparse attention at `--nz-ratio` (TopK, 0.5 by default): every weight trains with the LM loss,
and the gates also with `--gate-loss-scale` (10) × their distillation loss against the true pooled attention
(`train.lm_loss.seer_next_token_loss`). The base weights go to `model/` as usual and the gates to `adapter/`.

`--mesh data=D,fsdp=F,tensor=T` trains on a device mesh (`seer_jax.sharding`): parameters and AdamW state
sharded over fsdp and tensor, batches over data × fsdp; `--distributed` joins a multi-host job first.

`--export-hf DIR` also writes the trained model as a Hugging Face directory (`seer_jax.hf_export`). SIGINT/SIGTERM
stop after the current step with a checkpoint saved, write no model, adapter or export, and exit with status 130/143;
rerun with `--resume` to continue. A NaN/inf loss stops the
run with the last good checkpoint kept. Errors print one line and exit with status 1.
"""

import argparse
import dataclasses
import functools
import json
import logging
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from seer_jax.adapters import attach_gates, read_adapter, save_adapter
from seer_jax.attention import IMPLEMENTATIONS
from seer_jax.base_identity import check_base_identity
from seer_jax.checkpoint import save_converted
from seer_jax.config import ModelConfig
from seer_jax.hf_export import EXPORT_DTYPES, save_hf
from seer_jax.seer import base_of
from seer_jax.sharding import MeshConfig, build_mesh, check_batch_size
from seer_jax.sparsity import Selection
from train.checkpoints import CHECKPOINTS_DIR
from train.data import LoaderConfig, PackedLoader
from train.lm_loss import next_token_loss, seer_next_token_loss
from train.mesh_flags import add_mesh_arguments, mesh_from_args
from train.model_source import PRESETS, YarnConfig, apply_yarn, build_model, preset_config, read_hf_config
from train.optimizer import SCHEDULES, OptimizerConfig, build_optimizer
from train.run_config import store_run_config
from train.token_corpus import CorpusConfig, load_corpus, load_tokenizer
from train.train_step import LossFn
from train.trainer import StepRecord, TrainingDivergedError, TrainLoopConfig, TrainResult, fit, peak_device_memory_gib

COMPUTE_DTYPES = ("bfloat16", "float32")
MODEL_SUBDIR = "model"
ADAPTER_SUBDIR = "adapter"
RUN_CONFIG_FILE = "finetune.json"

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeerTuning:
    """SeerAttention fine-tuning. gates: a gate adapter directory for the model (e.g. from `train.distill_gates`).
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
        if not 0.0 < self.nz_ratio <= 1.0:
            raise ValueError(f"nz_ratio: {self.nz_ratio} must be in (0, 1]")
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
      loss_fn: `(model, tokens, rng) -> (loss, metrics)`; None: `train.lm_loss.next_token_loss` (with `remat`).
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
        selection = Selection(method="nz_ratio", nz_ratio=config.seer.nz_ratio)
        seer_config = dataclasses.replace(adapter.seer_config, selection=selection, source="gate")
        model = attach_gates(model, dataclasses.replace(adapter, seer_config=seer_config))
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


def progress_bar(total_steps: int) -> tuple[tqdm, Callable[[StepRecord], None]]:
    """A tqdm bar over steps and the `on_step` callback that advances it and shows loss and tokens/s."""
    bar = tqdm(total=total_steps, unit="step", desc="train", dynamic_ncols=True)

    def on_step(record: StepRecord) -> None:
        # The postfix first: `update` draws the bar, which would otherwise show the previous step's loss.
        bar.set_postfix(loss=f"{record.metrics['loss']:.4f}", tok_s=f"{record.tokens_per_second:.0f}", refresh=False)
        bar.update(record.step - bar.n)

    return bar, on_step


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    tokenizer_dir = args.tokenizer_dir or args.model
    if tokenizer_dir is None:
        raise ValueError("--tokenizer-dir is required when training from scratch (--init-config or --preset)")
    yarn = None
    if args.yarn_factor is not None:
        yarn = YarnConfig(
            factor=args.yarn_factor,
            original_max_position_embeddings=args.yarn_original_max_positions,
            replace_scaling=args.yarn_replace_scaling,
        )
    elif args.yarn_original_max_positions is not None:
        raise ValueError("--yarn-original-max-positions needs --yarn-factor")
    elif args.yarn_replace_scaling:
        raise ValueError("--yarn-replace-scaling needs --yarn-factor")
    return FinetuneConfig(
        model_dir=args.model,
        init_config=args.init_config,
        preset=args.preset,
        corpus=CorpusConfig(
            paths=tuple(args.data), tokenizer_dir=tokenizer_dir, text_field=args.text_field, cache_dir=args.corpus_cache
        ),
        loader=LoaderConfig(seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed),
        optimizer=OptimizerConfig(
            learning_rate=args.lr,
            warmup_steps=args.warmup_steps,
            schedule=args.schedule,
            min_learning_rate=args.min_lr,
            beta1=args.beta1,
            beta2=args.beta2,
            weight_decay=args.weight_decay,
            grad_clip_norm=args.grad_clip or None,
        ),
        loop=TrainLoopConfig(
            out_dir=args.out,
            total_steps=args.steps,
            checkpoint_every=args.checkpoint_every,
            keep_checkpoints=args.keep_checkpoints,
            log_every=args.log_every,
            resume=args.resume,
        ),
        compute_dtype=args.dtype,
        attention_implementation=args.attention,
        remat=args.remat,
        yarn=yarn,
        seed=args.seed,
        export_hf_dir=args.export_hf,
        export_dtype=args.export_dtype,
        seer=None
        if args.seer_gates is None
        else SeerTuning(
            gates=args.seer_gates,
            nz_ratio=args.nz_ratio,
            gate_loss_scale=args.gate_loss_scale,
            allow_other_base=args.allow_other_base,
        ),
        mesh=mesh_from_args(args, log),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.finetune", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="converted or Hugging Face model directory to fine-tune")
    source.add_argument("--init-config", type=Path, help="HF config.json: train this architecture from scratch")
    source.add_argument("--preset", choices=sorted(PRESETS), help="train this preset architecture from scratch")
    parser.add_argument("--tokenizer-dir", type=Path, help="tokenizer directory (default: --model)")
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="document files or directories")
    parser.add_argument("--text-field", default="text", help="text column of json/jsonl/parquet data")
    parser.add_argument("--corpus-cache", type=Path, help="cache directory for the tokenized corpus")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per packed row (a multiple of 64)")
    parser.add_argument("--batch-size", type=int, required=True, help="rows per step")
    parser.add_argument("--seed", type=int, default=0, help="data order, random init and the run's PRNG key")
    parser.add_argument("--steps", type=int, required=True, help="total optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (SPEC §8: 1e-5)")
    parser.add_argument("--warmup-steps", type=int, default=20, help="linear warmup steps")
    parser.add_argument("--schedule", choices=SCHEDULES, default="linear", help="decay after the warmup")
    parser.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the last step")
    parser.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    parser.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (HF Trainer's default: 0.999)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay of matrices")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0: none)")
    parser.add_argument("--dtype", choices=COMPUTE_DTYPES, default="bfloat16", help="compute dtype")
    parser.add_argument(
        "--attention",
        choices=IMPLEMENTATIONS,
        default="cudnn" if jax.default_backend() == "gpu" else "xla",
        help="attention implementation (default: cudnn on GPUs, else xla)",
    )
    parser.add_argument("--remat", action="store_true", help="recompute each decoder layer in the backward pass")
    parser.add_argument("--yarn-factor", type=float, help="YaRN context extension factor (SPEC §8: 4)")
    parser.add_argument(
        "--yarn-original-max-positions", type=int, help="context the model was trained for (default: its config's)"
    )
    parser.add_argument(
        "--yarn-replace-scaling",
        action="store_true",
        help="replace the model's own RoPE scaling (e.g. Llama-3.1's llama3) by YaRN instead of refusing",
    )
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="save a checkpoint every this many steps")
    parser.add_argument("--keep-checkpoints", type=int, default=3, help="how many checkpoints to keep")
    parser.add_argument("--log-every", type=int, default=1, help="metrics line every this many steps")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --out, with the same settings (stored in OUT/finetune.json): "
        "only --out, --corpus-cache, --checkpoint-every, --keep-checkpoints, --log-every, --attention, --remat, "
        "--export-hf, --export-dtype and the mesh may change, and --steps under --schedule constant",
    )
    parser.add_argument("--export-hf", type=Path, help="also write the trained model as an HF directory here")
    parser.add_argument("--export-dtype", choices=EXPORT_DTYPES, default="bfloat16", help="dtype of the HF export")
    parser.add_argument("--seer-gates", type=Path, help="gate adapter: train with SeerAttention (block-sparse)")
    parser.add_argument("--nz-ratio", type=float, default=0.5, help="SeerAttention TopK block density (SPEC §8: 0.5)")
    parser.add_argument("--gate-loss-scale", type=float, default=10.0, help="weight of the gates' distillation loss")
    parser.add_argument(
        "--allow-other-base", action="store_true", help="use --seer-gates on a base other than the one they recorded"
    )
    add_mesh_arguments(parser)
    args = parser.parse_args(argv)
    # force: an imported library may have configured the root logger already. The root stays at WARNING, so only
    # this CLI's own INFO lines are shown, not the libraries'.
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", force=True)
    log.setLevel(logging.INFO)
    logging.getLogger("train.trainer").setLevel(logging.INFO)  # the step a resumed run continues from
    try:
        config = config_from_args(args)
        log.info("%s", config)
        bar, on_step = progress_bar(config.loop.total_steps)
        with bar:
            result = finetune(config, on_step=on_step)
    except (ValueError, OSError, TrainingDivergedError) as error:  # CheckpointError is a ValueError
        raise SystemExit(f"error: {error}") from None
    record = result.train.last_record
    if record is not None:
        log.info("step %d: loss %.4f, %.0f tokens/s", record.step, record.metrics["loss"], record.tokens_per_second)
    if (peak := peak_device_memory_gib()) is not None:
        log.info("peak device memory: %.2f GiB", peak)
    if result.train.stopped_by is not None:
        log.info(
            "stopped by %s after step %d; checkpoint saved in %s; rerun with --resume to continue",
            result.train.stopped_by,
            result.train.step,
            config.loop.out_dir,
        )
        raise SystemExit(128 + signal.Signals[result.train.stopped_by])  # 130 for SIGINT, 143 for SIGTERM
    log.info("wrote %s", result.model_dir)
    if result.hf_dir is not None:
        log.info("wrote %s", result.hf_dir)


if __name__ == "__main__":
    main()
