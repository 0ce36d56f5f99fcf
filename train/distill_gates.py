"""Train SeerAttention gates on a frozen model: `python -m train.distill_gates`.

    python -m train.distill_gates --model DIR --data FILES... [--seq-len 8192 --steps 500 --out runs/gates]

distils AttnGates for the model (Hugging Face or converted directory) on local text data (see `train.documents`)
and writes the gate adapter to `OUT/adapter` (load it with `seer_jax.adapters.load_seer_model`). Checkpoints,
`metrics.jsonl` and resume (`--resume`) as in every trainer of this project; SIGINT/SIGTERM save and stop.
"""

import argparse
import logging
from pathlib import Path

import jax

from seer_jax.gate import GateConfig
from train.distill import DistillConfig, DistillResult, distill
from train.finetune import progress_bar
from train.trainer import TrainingDivergedError

log = logging.getLogger("train.distill_gates")


def add_distill_arguments(parser: argparse.ArgumentParser, defaults: DistillConfig | None = None) -> None:
    """The distillation flags (shared with the demo entry point)."""
    d = defaults
    parser.add_argument("--data", type=Path, nargs="+", help="document files or directories (txt, jsonl[.gz], parquet)")
    parser.add_argument("--tokenizer-dir", type=Path, help="tokenizer directory (default: --model)")
    parser.add_argument("--text-field", default="text", help="text column of json/jsonl/parquet data")
    parser.add_argument("--corpus-cache", type=Path, help="cache directory for the tokenized corpus")
    parser.add_argument("--seq-len", type=int, default=d.seq_len if d else 8192, help="tokens per row (× 64)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size if d else 1, help="rows per step")
    parser.add_argument("--steps", type=int, default=d.steps if d else 500, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (SPEC §3.3: 1e-3)")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps if d else 20, help="linear warm-up")
    parser.add_argument("--gate-type", default="Qavg_Kmaxminavg", help="Q<ops>_K<ops> with ops from max, min, avg")
    parser.add_argument("--gate-hidden-size", type=int, default=128, help="gate hidden size E")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="base model dtype")
    parser.add_argument("--seed", type=int, default=0, help="gate init and data order")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")


def distill_config_from_args(args: argparse.Namespace, *, model: Path, data: tuple[Path, ...], out: Path):
    return DistillConfig(
        model=model,
        data=data,
        out_dir=out,
        tokenizer_dir=args.tokenizer_dir,
        text_field=args.text_field,
        cache_dir=args.corpus_cache,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=args.steps,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        gate=GateConfig(gate_type=args.gate_type, hidden_size=args.gate_hidden_size),
        seed=args.seed,
        dtype=args.dtype,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )


def run_distillation(config: DistillConfig) -> DistillResult:
    """Runs `distill` with a progress bar and logs throughput and peak device memory."""
    log.info("%s", config)
    bar, on_step = progress_bar(config.steps)
    with bar:
        result = distill(config, on_step=on_step)
    record = result.train.last_record
    if record is not None:
        log.info("step %d: loss %.4f, %.0f tokens/s", record.step, record.metrics["loss"], record.tokens_per_second)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        log.info("peak device memory: %.2f GiB", stats["peak_bytes_in_use"] / 2**30)
    if result.train.stopped_by is not None:
        log.info("stopped by %s; rerun with --resume to continue", result.train.stopped_by)
    log.info("wrote %s", result.adapter_dir)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.distill_gates", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="base model directory (HF or converted)")
    parser.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, metrics, adapter)")
    add_distill_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", force=True)
    log.setLevel(logging.INFO)
    if not args.data:
        parser.error("--data is required")
    try:
        config = distill_config_from_args(args, model=args.model, data=tuple(args.data), out=args.out)
        run_distillation(config)
    except (ValueError, OSError, TrainingDivergedError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
