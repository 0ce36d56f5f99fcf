"""Perplexity vs. block density: the dense model, SeerAttention gates and training-free baselines (docs/design.md §7).

    python -m train.eval_ppl --model DIR [--gates DIR] --data PATHS... --out DIR
        [--lengths 2048 8192] [--num-docs 16] [--nz-ratios 0.5 0.4 0.3 0.2 0.1] [--thresholds ...]
        [--methods dense gate oracle quest streaming random] [--batch-size 4] [--dtype bfloat16|float32]
        [--attention xla|cudnn] [--start-layer N] [--seed 0] [--text-field text] [--tokenizer-dir DIR]
        [--cache-dir DIR] [--mesh data=D,fsdp=F,tensor=T] [--distributed]

The command line of `train.perplexity.evaluate` (protocol, methods and settings: see there). Writes results.json,
ppl_vs_density.md and ppl_vs_density.png (`train.ppl_results`) into `--out` and prints the table.
"""

import argparse
import logging
from pathlib import Path

from seer_jax.attention import IMPLEMENTATIONS
from seer_jax.model_path import resolve_model_path
from seer_jax.multihost import is_primary
from train.flags import add_mesh_arguments, mesh_from_args
from train.perplexity import DTYPES, METHODS, EvalConfig, evaluate
from train.progress import configure_logging, evaluation_progress

log = logging.getLogger("train.eval_ppl")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.eval_ppl", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="Hugging Face or converted model directory, or a hub id in the local HF cache"
    )
    parser.add_argument("--gates", help="gate adapter directory (ours or official), or a cached hub id; else no 'gate'")
    parser.add_argument(
        "--allow-other-base", action="store_true", help="use the gates on a base other than the one they recorded"
    )
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="data files or directories")
    parser.add_argument("--text-field", default="text", help="text column of the data")
    parser.add_argument("--tokenizer-dir", help="tokenizer directory or cached hub id (default: --model)")
    parser.add_argument("--cache-dir", type=Path, help="tokenized-corpus cache directory")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192], help="window lengths, BOS included")
    parser.add_argument("--num-docs", type=int, default=16, help="documents per length")
    parser.add_argument("--nz-ratios", type=float, nargs="*", default=[0.5, 0.4, 0.3, 0.2, 0.1], help="TopK targets")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[], help="gate threshold settings")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="methods to run (default: all available)")
    parser.add_argument("--start-layer", type=int, help="first sparse layer (default: the adapter's, else 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 'random' source")
    parser.add_argument("--batch-size", type=int, default=4, help="documents per forward")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on GPU, float32 elsewhere")
    parser.add_argument("--attention", choices=IMPLEMENTATIONS, help="default: cudnn on GPU, xla elsewhere")
    parser.add_argument("--out", type=Path, required=True, help="output directory (created; files overwritten)")
    add_mesh_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    # dtype and attention keep EvalConfig's device-dependent defaults unless given.
    chosen = {name: value for name in ("dtype", "attention") if (value := getattr(args, name)) is not None}
    try:
        config = EvalConfig(
            model=resolve_model_path(args.model),
            data=tuple(args.data),
            gates=args.gates and resolve_model_path(args.gates, flag="--gates"),
            allow_other_base=args.allow_other_base,
            tokenizer_dir=None
            if args.tokenizer_dir is None
            else resolve_model_path(args.tokenizer_dir, flag="--tokenizer-dir"),
            text_field=args.text_field,
            cache_dir=args.cache_dir,
            lengths=tuple(args.lengths),
            num_docs=args.num_docs,
            nz_ratios=tuple(args.nz_ratios),
            thresholds=tuple(args.thresholds),
            methods=None if args.methods is None else tuple(args.methods),
            start_layer=args.start_layer,
            seed=args.seed,
            batch_size=args.batch_size,
            mesh=mesh_from_args(args, log),
            **chosen,
        )
        log.info("%s", config)
        result = evaluate(config, progress=evaluation_progress)
        paths = result.write(args.out)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        raise SystemExit(f"error: {error}") from None
    log.info("wrote %s", ", ".join(str(path) for path in paths.values()))
    if is_primary():  # one table per job
        print(result.to_markdown())


if __name__ == "__main__":
    main()
