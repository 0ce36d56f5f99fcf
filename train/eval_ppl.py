"""Perplexity vs. block density: the dense model, SeerAttention gates and training-free baselines (docs/design.md §7).

    python -m train.eval_ppl --model DIR [--gates DIR] --data PATHS... --out DIR
        [--mode prefill|decode] [--lengths 2048 8192] [--num-docs 16]
        [--nz-ratios 0.5 0.4 0.3 0.2 0.1] [--thresholds ...] [--budgets ...] [--force-sink]
        [--quest-weights W ...]                                                        (prefill mode)
        [--continuation 2048] [--decode-budgets 256 512 1024 2048 5% 10% 25%]
        [--decode-prefill nz_ratio=X | threshold=Y] [--decode-chunk 256]
        [--decode-allocation adapter|none|recall|coverage] [--decode-quest-weights W ...]  (decode mode)
        [--methods dense gate oracle quest streaming random] [--batch-size 4] [--dtype bfloat16|float32]
        [--attention xla|cudnn] [--start-layer N] [--seed 0] [--text-field text] [--tokenizer-dir DIR]
        [--cache-dir DIR] [--mesh data=D,fsdp=F,tensor=T] [--distributed]

The command line of `train.perplexity.evaluate` (protocol, methods and settings: see there; decode mode:
`train.decode_perplexity`). Writes results.json, ppl_vs_density.md and ppl_vs_density.png (`train.ppl_results`) into
`--out` and prints the table. The library is imported after the flags are read, so `--help` answers at once.
"""

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from train.flags import add_mesh_arguments

if TYPE_CHECKING:
    from seer_jax.sparsity import Selection

log = logging.getLogger("train.eval_ppl")

# The choices, spelled out so that `--help` needs no jax (a test checks them against the library's).
METHOD_CHOICES = ("dense", "gate", "oracle", "quest", "streaming", "random")
DTYPE_CHOICES = ("bfloat16", "float32")
ATTENTION_CHOICES = ("xla", "cudnn")
MODE_CHOICES = ("prefill", "decode")
DEFAULT_DECODE_BUDGETS = ("256", "512", "1024", "2048", "5%", "10%", "25%")
DECODE_ALLOCATION_CHOICES = ("adapter", "none", "recall", "coverage")


def build_parser() -> argparse.ArgumentParser:
    """The flags, with their defaults in the help (no library import)."""
    parser = argparse.ArgumentParser(prog="python -m train.eval_ppl", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="Hugging Face or converted model directory, or a hub id in the local HF cache"
    )
    parser.add_argument(
        "--gates",
        help="gate adapter directory (ours or official), or a cached hub id; default: none, so no 'gate' method",
    )
    parser.add_argument(
        "--allow-other-base", action="store_true", help="use the gates on a base other than the one they recorded"
    )
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="data files or directories")
    parser.add_argument("--text-field", default="text", help="text column of the data (default: %(default)s)")
    parser.add_argument("--tokenizer-dir", help="tokenizer directory or cached hub id (default: --model)")
    parser.add_argument("--cache-dir", type=Path, help="tokenized-corpus cache directory (default: none)")
    parser.add_argument(
        "--mode",
        choices=MODE_CHOICES,
        default="prefill",
        help="prefill: whole windows under block-sparse prefill; decode: each window's continuation, teacher-forced "
        "sparse decoding (default: %(default)s)",
    )
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        help="window lengths, BOS included (default: 2048 8192 in prefill mode, 8192 in decode mode)",
    )
    parser.add_argument("--num-docs", type=int, default=16, help="documents per length (default: %(default)s)")
    parser.add_argument(
        "--nz-ratios",
        type=float,
        nargs="*",
        default=[0.5, 0.4, 0.3, 0.2, 0.1],
        help="prefill mode: TopK targets (default: %(default)s)",
    )
    parser.add_argument(
        "--thresholds", type=float, nargs="*", default=[], help="prefill mode: gate threshold settings (default: none)"
    )
    parser.add_argument(
        "--budgets",
        type=float,
        nargs="*",
        default=[],
        help="prefill mode: gate budget densities, shared among layers by the allocation the adapter records "
        "(train.distill_gates --budget-density) (default: none)",
    )
    parser.add_argument(
        "--continuation",
        type=int,
        default=2048,
        help="decode mode: tokens scored at the end of each window, each by a decode step (default: %(default)s)",
    )
    parser.add_argument(
        "--decode-budgets",
        nargs="+",
        default=list(DEFAULT_DECODE_BUDGETS),
        help="decode mode: budgets of every sparse decode method, tokens (256) or percent of the context (10%%) "
        f"(default: {' '.join(DEFAULT_DECODE_BUDGETS).replace('%', '%%')})",
    )
    parser.add_argument(
        "--decode-prefill",
        help="decode mode: also run the gate's budgets and dense decoding after a block-sparse prefill with the "
        "adapter's prefill gates, nz_ratio=X or threshold=Y (default: dense prefill only)",
    )
    parser.add_argument(
        "--decode-allocation",
        choices=DECODE_ALLOCATION_CHOICES,
        default="adapter",
        help="decode mode: how the gate rows share each budget among layers: the adapter's calibrated allocation "
        "(uniform if it records none), none (uniform), or calibrated now on the prompts of the first batch by rule "
        "recall (the gate's ranking) or coverage (the attention's) (default: %(default)s)",
    )
    parser.add_argument(
        "--quest-weights",
        type=float,
        nargs="+",
        help="prefill mode: run the gate rows once per weight w, ranking blocks by the gate's logits plus w times the "
        "quest source's scores (rows gate+<w>quest; 0: the gate alone) (default: the adapter's weight)",
    )
    parser.add_argument(
        "--decode-quest-weights",
        type=float,
        nargs="+",
        help="decode mode: run the gate rows once per weight w, scoring blocks by the gate's logits plus w times "
        "Quest's bound (rows gate+<w>quest; 0: the gate alone) (default: the adapter's weight)",
    )
    parser.add_argument(
        "--decode-chunk",
        type=int,
        default=256,
        help="decode mode: decode steps per compiled call (default: %(default)s)",
    )
    parser.add_argument("--methods", nargs="+", choices=METHOD_CHOICES, help="methods to run (default: all available)")
    parser.add_argument(
        "--start-layer",
        type=int,
        help="first sparse layer (decode mode: first sparse decode layer); default: the adapter's, else 0",
    )
    parser.add_argument(
        "--force-sink",
        action="store_true",
        help="prefill mode: every sparse row also keeps key block 0 (the attention sink) in every query-block row",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the 'random' source (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=4, help="documents per forward (decode: per scan) (default: %(default)s)"
    )
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: bfloat16 on GPU, float32 elsewhere")
    parser.add_argument("--attention", choices=ATTENTION_CHOICES, help="default: cudnn on GPU, xla elsewhere")
    parser.add_argument("--out", type=Path, required=True, help="output directory (created; files overwritten)")
    add_mesh_arguments(parser)
    return parser


def parse_selection(text: str) -> "Selection":
    """ "nz_ratio=0.1" or "threshold=0.002" → a `seer_jax.sparsity.Selection` without last_block_dense."""
    from seer_jax.sparsity import Selection

    method, _, value = text.partition("=")
    if method not in ("nz_ratio", "threshold") or not value:
        raise ValueError(f"--decode-prefill {text!r}: write nz_ratio=X or threshold=Y")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"--decode-prefill {text!r}: {value!r} is not a number") from None
    return Selection(method=method, last_block_dense=False, **{method: number})


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from seer_jax.model_path import resolve_model_path
    from seer_jax.multihost import is_primary
    from train.decode_perplexity import DecodeBudget
    from train.flags import mesh_from_args
    from train.perplexity import EvalConfig, evaluate
    from train.progress import configure_logging, evaluation_progress

    configure_logging()
    # dtype, attention and lengths keep EvalConfig's defaults (device- or mode-dependent) unless given.
    chosen = {name: value for name in ("dtype", "attention") if (value := getattr(args, name)) is not None}
    if args.lengths is not None:
        chosen["lengths"] = tuple(args.lengths)
    try:
        config = EvalConfig(
            model=resolve_model_path(args.model),
            data=tuple(args.data),
            gates=args.gates and resolve_model_path(args.gates, flag="--gates"),
            allow_other_base=args.allow_other_base,
            force_sink=args.force_sink,
            tokenizer_dir=None
            if args.tokenizer_dir is None
            else resolve_model_path(args.tokenizer_dir, flag="--tokenizer-dir"),
            text_field=args.text_field,
            cache_dir=args.cache_dir,
            mode=args.mode,
            num_docs=args.num_docs,
            nz_ratios=tuple(args.nz_ratios),
            thresholds=tuple(args.thresholds),
            budgets=tuple(args.budgets),
            continuation=args.continuation,
            decode_budgets=tuple(DecodeBudget.parse(text) for text in args.decode_budgets),
            decode_prefill=None if args.decode_prefill is None else parse_selection(args.decode_prefill),
            decode_chunk=args.decode_chunk,
            decode_allocation=args.decode_allocation,
            decode_quest_weights=None if args.decode_quest_weights is None else tuple(args.decode_quest_weights),
            quest_weights=None if args.quest_weights is None else tuple(args.quest_weights),
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
