"""Full-parameter causal-LM training of a Llama-family model: fine-tuning a checkpoint or pretraining from scratch.

    python -m train.finetune --model DIR --data PATH... --seq-len 32768 --batch-size 1 --steps 400 --lr 1e-5 \\
        --warmup-steps 20 --schedule linear --remat --attention cudnn \\
        --yarn-factor 4 --yarn-original-max-positions 8192 --out runs/yarn --export-hf runs/yarn-hf
    python -m train.finetune --preset demo-llama --tokenizer-dir TOK --data PATH... --seq-len 512 --batch-size 8 \\
        --steps 100 --lr 3e-3 --warmup-steps 10 --out runs/demo

The command line of `train.lm_training.finetune` (what trains, the output directory `--out`, SeerAttention mode: see
there). The model comes from `--model` (a converted or HF directory), or is initialised at random from `--init-
config config.json` or `--preset`. `--yarn-factor` rewrites its RoPE to YaRN before training (docs/design.md §5).
`--remat` recomputes each decoder layer in the backward pass. `--seer-gates ADAPTER` attaches distilled gates
(`train.distill_gates`) and trains with block-sparse attention at `--nz-ratio` (TopK, 0.5 by default), the gates
also with `--gate-loss-scale` (10) × their distillation loss.

`--mesh data=D,fsdp=F,tensor=T` trains on a device mesh (`seer_jax.sharding`); `--distributed` joins a multi-host
job first. `--export-hf DIR` also writes the trained model as a Hugging Face directory. SIGINT/SIGTERM stop after
the current step with a checkpoint saved, write no model, adapter or export, and exit with status 130/143; rerun
with `--resume` to continue. A NaN/inf loss stops the run with the
last good checkpoint kept. Errors print one line and exit with status 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from train.flags import DefaultsHelpFormatter, add_corpus_arguments, add_mesh_arguments

if TYPE_CHECKING:
    from train.lm_training import FinetuneConfig

# Library values the flags show, written out so that `--help` imports no jax (a test checks they are the library's:
# train.model_source.PRESETS, train.optimizer.SCHEDULES, train.lm_training.COMPUTE_DTYPES,
# seer_jax.attention.IMPLEMENTATIONS, seer_jax.hf_export.EXPORT_DTYPES).
PRESET_CHOICES = ("demo-llama", "seer-demo-llama")
SCHEDULE_CHOICES = ("cosine", "linear", "constant")
DTYPE_CHOICES = ("bfloat16", "float32")
ATTENTION_CHOICES = ("xla", "cudnn")
EXPORT_DTYPE_CHOICES = ("bfloat16", "float32")
RECIPE_WARMUP_STEPS = 20

log = logging.getLogger("train.finetune")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    import jax

    from train.data import LoaderConfig
    from train.flags import mesh_from_args
    from train.lm_training import FinetuneConfig, SeerTuning
    from train.model_source import YarnConfig
    from train.optimizer import OptimizerConfig, scaled_warmup_steps
    from train.token_corpus import CorpusConfig
    from train.trainer import TrainLoopConfig

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
    mesh = mesh_from_args(args, log)  # joining a multi-process job must come before anything asks JAX
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
            warmup_steps=scaled_warmup_steps(RECIPE_WARMUP_STEPS, args.steps)
            if args.warmup_steps is None
            else args.warmup_steps,
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
        attention_implementation=args.attention or ("cudnn" if jax.default_backend() == "gpu" else "xla"),
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
        mesh=mesh,
    )


def build_parser() -> argparse.ArgumentParser:
    """The flags, with their defaults in the help (no library import)."""
    parser = argparse.ArgumentParser(
        prog="python -m train.finetune", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="converted or Hugging Face model directory (or cached hub id) to fine-tune")
    source.add_argument("--init-config", type=Path, help="HF config.json: train this architecture from scratch")
    source.add_argument("--preset", choices=PRESET_CHOICES, help="train this preset architecture from scratch")
    add_corpus_arguments(parser, data_required=True)
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per packed row (a multiple of 64)")
    parser.add_argument("--batch-size", type=int, required=True, help="rows per step")
    parser.add_argument("--seed", type=int, default=0, help="data order, random init and the run's PRNG key")
    parser.add_argument("--steps", type=int, required=True, help="total optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (the official recipe: 1e-5)")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        help=f"linear warmup steps (default: {RECIPE_WARMUP_STEPS}, at most a tenth of --steps)",
    )
    parser.add_argument("--schedule", choices=SCHEDULE_CHOICES, default="linear", help="decay after the warmup")
    parser.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the last step")
    parser.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    parser.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (HF Trainer's default: 0.999)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay of matrices")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0: none)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="bfloat16", help="compute dtype")
    parser.add_argument(
        "--attention",
        choices=ATTENTION_CHOICES,
        help="attention implementation (default: cudnn on GPUs, else xla)",
    )
    parser.add_argument("--remat", action="store_true", help="recompute each decoder layer in the backward pass")
    parser.add_argument("--yarn-factor", type=float, help="YaRN context extension factor (the official recipe: 4)")
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
    parser.add_argument(
        "--export-dtype", choices=EXPORT_DTYPE_CHOICES, default="bfloat16", help="dtype of the HF export"
    )
    parser.add_argument("--seer-gates", help="gate adapter (or cached hub id): train with SeerAttention (block-sparse)")
    parser.add_argument(
        "--allow-other-base", action="store_true", help="use --seer-gates on a base other than the one they recorded"
    )
    parser.add_argument(
        "--nz-ratio", type=float, default=0.5, help="SeerAttention TopK block density (official recipe: 0.5)"
    )
    parser.add_argument("--gate-loss-scale", type=float, default=10.0, help="weight of the gates' distillation loss")
    add_mesh_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from seer_jax.model_path import resolve_model_path
    from train.lm_training import finetune
    from train.progress import configure_logging, training_progress
    from train.trainer import TrainingDivergedError, peak_device_memory_gib

    configure_logging()
    try:
        args.model = args.model and resolve_model_path(args.model)
        args.seer_gates = args.seer_gates and resolve_model_path(args.seer_gates, flag="--seer-gates")
        args.tokenizer_dir = args.tokenizer_dir and resolve_model_path(args.tokenizer_dir, flag="--tokenizer-dir")
        config = config_from_args(args)
        log.info("%s", config)
        bar, on_step = training_progress(config.loop.total_steps)
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
