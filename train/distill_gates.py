"""Train SeerAttention gates on a frozen model: `python -m train.distill_gates` (the product's main job).

    python -m train.distill_gates --model DIR --data FILES... --out DIR [--seq-len 8192 --steps 500 ...]

distils AttnGates for the model (Hugging Face or converted directory) on local text data (see `train.documents`)
and writes the gate adapter to `OUT/adapter` (load it with `seer_jax.adapters.load_seer_model`); the command line of
`train.distill.distill`. `--target decode` distils SeerAttention-R decode gates instead (`--decode-*` flags: their
structure, the official recipe by default), `--target both` both kinds in one run. Checkpoints, `metrics.jsonl`
and resume (`--resume`) as in every trainer of this project; SIGINT/SIGTERM save a checkpoint and stop with exit
status 130/143 without writing the adapter (`--resume` finishes the run and writes it). `--eval-data FILES` then
measures perplexity vs. block density (`train.perplexity`) into `OUT/eval`.
The adapter's default prefill selection is the threshold that keeps `--default-density` (0.3) of the blocks on the
first distillation windows, recorded with the density it reaches there (on the gate's logits plus `--quest-weight`
× the quest scores, recorded too, when given); `--budget-density D` makes it a density
budget at D instead, its per-layer shares calibrated on the same windows, its quest weight (0 or 0.5) and forced
sink (or not) those of the lowest NLL on the next windows (`record_prefill_selection`). With decode
gates, `--decode-allocation recall|coverage` records in the adapter's decode config how a decode budget is shared
among layers, calibrated on the same windows (`record_decode_allocation`; one dense forward per window after
training); by default ("none") every layer gets the same budget, which measured best on the testbed (BENCHMARKS.md).
Decode gates are recorded with scores that add `--decode-quest-weight` (0.5) × Quest's bound on each block
(`DecodeConfig.quest_weight`): more accurate than the gate alone and than Quest on the testbed, a few percent slower
per step (BENCHMARKS.md); `--decode-quest-weight 0` records the official gate alone.
`--mesh data=2` (or `tensor=2`, `fsdp=2`, combinations) trains and evaluates on several devices
(`seer_jax.sharding`); `--distributed` joins a multi-process job first (`train.flags`).

With no `--model`, it runs the embedded demo end to end, with no download: a small Llama pretrained on the
running interpreter's standard-library sources (`train.demo`, cached in `--demo-cache`, default
~/.cache/seer-jax/demo), gate distillation on the same corpus, and the perplexity-vs-density table (gates against
the oracle and the training-free baselines) on held-out standard-library modules, written to `OUT/eval` (default
DEMO_CACHE/distill; a previous demo run there is replaced). The perplexity table measures prefill gates: with
`--target decode` the demo and `--eval-data` evaluate nothing (decode-mode evaluation is `train.eval_ppl`'s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from train.flags import DefaultsHelpFormatter, add_corpus_arguments, add_mesh_arguments

if TYPE_CHECKING:
    from seer_jax.decode_config import DecodeConfig
    from train.distill import DistillConfig, DistillResult
    from train.perplexity import EvalConfig

# Library values the flags show, written out so that `--help` imports no jax (a test checks they are the library's:
# train.losses.DISTILLATION_TARGETS, DECODE_SLICE_RATIO; train.distill.DTYPES, GATE_OPTIMIZER; Q_HEAD_POOLINGS).
TARGETS = ("prefill", "decode", "both")
# The decode gates' recorded Quest weight (`DecodeConfig.quest_weight`) by default: 0.5 (ours; 0 is the official gate
# alone). On the testbed at L = 8192 (H200, 16 docs) gate + 0.5 × Quest beat the gate alone at every budget from 256
# tokens to 25% (+10.3% vs +12.4% PPL at 10%) and Quest at every one, which the gate alone does not; since the bounds
# are updated in place it costs 2-6% of the decode tokens/s at 128k, batch 8 (3.11× dense against 3.18×; design §8,
# BENCHMARKS.md).
DECODE_QUEST_WEIGHT = 0.5
DTYPE_CHOICES = ("bfloat16", "float32")
Q_HEAD_POOLING_CHOICES = ("Qproj", "Qavgproj", "Qavg")
RECIPE_LEARNING_RATE = 1e-3
RECIPE_WARMUP_STEPS = 20
DECODE_SLICE = 0.5
# Distillation windows (of --seq-len tokens, the first of the data) a --budget-density allocation and a
# --decode-allocation are calibrated on.
BUDGET_CALIBRATION_WINDOWS = 4
# The block density an adapter's default prefill selection keeps (a threshold calibrated on those windows): on the
# testbeds the gates cost < 1% PPL there (BENCHMARKS.md), and a threshold adapts per row, where TopK does not.
DEFAULT_DENSITY = 0.3
# `seer_jax.decode_config.DECODE_ALLOCATION_RULES`, and "none".
DECODE_ALLOCATION_CHOICES = ("none", "recall", "coverage")

# The embedded demo: distil and evaluate at 1024 tokens (16 blocks per row; the demo model trains at 512 tokens, so
# this also exercises positions beyond its training length, within its 2048 maximum).
DEMO_DISTILL = dict(seq_len=1024, batch_size=4, steps=80, gate_hidden_size=64)
DEMO_EVAL = dict(lengths=(1024,), num_docs=8, nz_ratios=(0.5, 0.3, 0.2), thresholds=(0.02,))
# With the shipped pretrained model (`train.demo.shipped`): its training length, 2048 tokens (32 blocks per row).
# About 90 s on 2 quiet cores (distillation ~30 s at 0.7 s per step of 2 x 2048 tokens; evaluation ~40 s, 11
# settings of 8 documents). The table: dense; the gates by threshold (0.02 and 0.06 keep ~0.28 and ~0.17 of the
# blocks on this model) and by TopK; the oracle, Quest and StreamingLLM by TopK at nz 0.3 and 0.2 (densities ~0.28
# and ~0.18, so the baselines keep slightly more blocks than the gates' thresholds).
SHIPPED_DISTILL = dict(seq_len=2048, batch_size=2, steps=40, gate_hidden_size=64)
SHIPPED_EVAL = dict(
    lengths=(2048,),
    num_docs=8,
    nz_ratios=(0.3, 0.2),
    thresholds=(0.02, 0.06),
    methods=("dense", "gate", "oracle", "quest", "streaming"),
)

log = logging.getLogger("train.distill_gates")


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a `DistillConfig` (the demo overrides some defaults, `DEMO_DISTILL`)."""
    add_corpus_arguments(parser, data_required=False)
    parser.add_argument("--seq-len", type=int, default=8192, help="tokens per row (× 64)")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per step")
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps")
    parser.add_argument(
        "--lr", type=float, default=RECIPE_LEARNING_RATE, help="peak learning rate (the official recipe)"
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        help=f"linear warm-up steps (default: the official {RECIPE_WARMUP_STEPS}, at most a tenth of --steps)",
    )
    parser.add_argument("--gate-type", default="Qavg_Kmaxminavg", help="Q<ops>_K<ops> with ops from max, min, avg")
    parser.add_argument("--gate-hidden-size", type=int, default=128, help="gate hidden size E (128: as released)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="bfloat16", help="base model dtype")
    parser.add_argument(
        "--target",
        choices=TARGETS,
        default="prefill",
        help="the gates to train: prefill AttnGates, SeerAttention-R decode gates, or both from one forward",
    )
    decode = parser.add_argument_group("decode gates (--target decode or both; defaults: the official recipe)")
    decode.add_argument(
        "--decode-q-pooling", choices=Q_HEAD_POOLING_CHOICES, default="Qproj", help="query-head pooling"
    )
    decode.add_argument("--decode-k-pooling", default="Kmaxminavg", help="K<ops>: k pooling ops per block")
    decode.add_argument(
        "--decode-hidden-size",
        type=int,
        help="gate hidden size E (default: the model's head_dim, which the official 128 equals for every released "
        "gate; Qavg needs it)",
    )
    decode.add_argument("--decode-block-size", type=int, default=64, help="key positions per block")
    decode.add_argument(
        "--decode-qk-norm", action=argparse.BooleanOptionalAction, default=True, help="RMSNorm of the gate q/k"
    )
    decode.add_argument(
        "--decode-rope", action=argparse.BooleanOptionalAction, default=True, help="RoPE inside the gate"
    )
    decode.add_argument(
        "--decode-quest-weight",
        type=float,
        default=DECODE_QUEST_WEIGHT,
        help="recorded in the adapter: the gate's decode scores plus this weight times Quest's bound on each block "
        "(DecodeConfig.quest_weight; ours: 0 is the official gate alone) (default: %(default)s)",
    )
    decode.add_argument(
        "--decode-quest-in-loss",
        action="store_true",
        help="distil the decode gates on the hybrid scores (gate + --decode-quest-weight × Quest's bound), so they "
        "learn what the bound misses; without it the gate trains alone and the weight only applies at run time "
        "(on the testbed at small scale the hybrid was no better this way: BENCHMARKS.md)",
    )
    decode.add_argument(
        "--decode-slice-ratio",
        type=float,
        default=DECODE_SLICE,
        help="the loss counts each row's tokens from this fraction of its length on",
    )
    parser.add_argument("--seed", type=int, default=0, help="gate init and data order")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --out, with the same settings (stored in OUT/distill.json): only "
        "--out, --corpus-cache, --checkpoint-every and the mesh may change",
    )
    add_mesh_arguments(parser)


def distill_config_from_args(
    args: argparse.Namespace,
    *,
    model: Path,
    data: tuple[Path, ...],
    out: Path,
    corpus_cache: Path | None,
    dtype: str,
) -> DistillConfig:
    from seer_jax.gate import GateConfig
    from train.data import LoaderConfig
    from train.distill import GATE_OPTIMIZER, DistillConfig
    from train.flags import mesh_from_args
    from train.optimizer import scaled_warmup_steps
    from train.token_corpus import CorpusConfig
    from train.trainer import TrainLoopConfig

    warmup_steps = args.warmup_steps
    if warmup_steps is None:
        warmup_steps = scaled_warmup_steps(GATE_OPTIMIZER.warmup_steps, args.steps)
    return DistillConfig(
        model=model,
        corpus=CorpusConfig(
            paths=data, tokenizer_dir=args.tokenizer_dir or model, text_field=args.text_field, cache_dir=corpus_cache
        ),
        loader=LoaderConfig(seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed),
        optimizer=dataclasses.replace(GATE_OPTIMIZER, learning_rate=args.lr, warmup_steps=warmup_steps),
        loop=TrainLoopConfig(
            out_dir=out, total_steps=args.steps, checkpoint_every=args.checkpoint_every, resume=args.resume
        ),
        gate=GateConfig(gate_type=args.gate_type, hidden_size=args.gate_hidden_size),
        seed=args.seed,
        dtype=dtype,
        mesh=mesh_from_args(args, log),
        target=args.target,
        decode=None if args.target == "prefill" else decode_config_from_args(args, model),
        decode_slice_ratio=args.decode_slice_ratio,
        decode_quest_in_loss=args.decode_quest_in_loss,
    )


def decode_config_from_args(args: argparse.Namespace, model: Path) -> DecodeConfig:
    """The decode gates' structure from the `--decode-*` flags (hidden size: the model's head_dim by default)."""
    from seer_jax.config import ModelConfig
    from seer_jax.decode_config import DecodeConfig

    hidden_size = args.decode_hidden_size or ModelConfig.from_hf(model).head_dim
    return DecodeConfig(
        q_head_pooling=args.decode_q_pooling,
        k_pooling=args.decode_k_pooling,
        hidden_size=hidden_size,
        block_size=args.decode_block_size,
        qk_norm=args.decode_qk_norm,
        use_rope=args.decode_rope,
        quest_weight=args.decode_quest_weight,
    )


def run_distillation(config: DistillConfig) -> DistillResult:
    """Runs `distill` with a progress bar and logs throughput and peak device memory."""
    from train.distill import distill
    from train.progress import training_progress
    from train.trainer import peak_device_memory_gib

    log.info("%s", config)
    bar, on_step = training_progress(config.loop.total_steps)
    with bar:
        result = distill(config, on_step=on_step)
    record = result.train.last_record
    if record is not None:
        log.info("step %d: loss %.4f, %.0f tokens/s", record.step, record.metrics["loss"], record.tokens_per_second)
    if (peak := peak_device_memory_gib()) is not None:
        log.info("peak device memory: %.2f GiB (the fullest local device)", peak)
    if result.train.stopped_by is not None:
        log.info(
            "stopped by %s after step %d; checkpoint saved, no adapter written; rerun with --resume to finish",
            result.train.stopped_by,
            result.train.step,
        )
        raise SystemExit(128 + signal.Signals[result.train.stopped_by])  # 130 for SIGINT, 143 for SIGTERM
    log.info("wrote %s", result.adapter_dir)
    return result


def record_prefill_selection(
    config: DistillConfig, result: DistillResult, density: float, *, budget: bool, quest_weight: float | None = None
) -> None:
    """Calibrates the distilled prefill gates' default selection at mean block density `density` on the first
    `BUDGET_CALIBRATION_WINDOWS` windows of the distillation data and records it, with the density the sparse model
    reaches there, in the adapter.

    With `budget`: a density budget chosen by `seer_jax.calibration.choose_budget` among the quest weights
    `BUDGET_QUEST_WEIGHTS` (only `quest_weight` when given) × the sink forced or not, by the sparse model's NLL on
    the next `BUDGET_CALIBRATION_WINDOWS` windows (on the calibration windows when the data has no more); every
    candidate goes to `<out>/budget_candidates.json` and the log. Else the threshold that reaches `density`
    (`seer_jax.calibration.threshold_for_density`) on the scores with `quest_weight` (0 when None). The quest weight
    (`SeerConfig.quest_weight`) is recorded with the selection."""
    import jax.numpy as jnp

    from seer_jax.adapters import MeasuredDensity, record_selection
    from seer_jax.calibration import BUDGET_QUEST_WEIGHTS, choose_budget, threshold_for_density
    from seer_jax.forwards import block_density
    from seer_jax.seer import seer_with_abstract_gates
    from train.data import eval_windows
    from train.token_corpus import load_corpus

    length = config.loader.seq_len
    windows = eval_windows(load_corpus(config.corpus), length=length, num_docs=2 * BUDGET_CALIBRATION_WINDOWS)
    tokens = jnp.asarray(windows[:BUDGET_CALIBRATION_WINDOWS])
    if budget:
        scoring = jnp.asarray(windows[BUDGET_CALIBRATION_WINDOWS:] if len(windows) > len(tokens) else windows)
        weights = BUDGET_QUEST_WEIGHTS if quest_weight is None else (quest_weight,)
        chosen, candidates = choose_budget(result.model, tokens, scoring, density=density, quest_weights=weights)
        selection, quest_weight = chosen.selection, chosen.quest_weight
        _report_budget_candidates(config, candidates, chosen, scored_on=len(scoring), length=length)
    else:
        quest_weight = quest_weight or 0.0
        scored = seer_with_abstract_gates(
            result.model, dataclasses.replace(result.model.seer_config, quest_weight=quest_weight)
        )
        selection, _ = threshold_for_density(scored, tokens, density=density)
    model = seer_with_abstract_gates(
        result.model, dataclasses.replace(result.model.seer_config, quest_weight=quest_weight, selection=selection)
    )
    reached = float(jnp.mean(block_density(model, tokens)))
    data = f"distillation data: the {len(tokens)} calibration windows of {length} tokens"
    measured = MeasuredDensity(density=reached, data=data)
    record_selection(result.adapter_dir, selection, prefill_density=measured, quest_weight=quest_weight)
    if budget:
        sink = "sink forced" if selection.force_sink else "sink not forced"
        what = f"a density budget at {density:g} (quest weight {quest_weight:g}, {sink})"
    else:
        what = f"threshold {selection.threshold:.4g} (target {density:g})"
    log.info("recorded %s as the default prefill selection (%.4f reached on %s)", what, reached, data)


def _report_budget_candidates(config: DistillConfig, candidates, chosen, *, scored_on: int, length: int) -> None:
    """Logs `choose_budget`'s candidates and writes them to `<out>/budget_candidates.json` (process 0)."""
    from seer_jax.multihost import is_primary

    if not is_primary():
        return
    rows = [
        {
            "quest_weight": candidate.quest_weight,
            "force_sink": candidate.selection.force_sink,
            "nll": candidate.nll,
            "ppl": math.exp(candidate.nll),
            "density": candidate.density,
            "chosen": candidate is chosen,
        }
        for candidate in candidates
    ]
    for row in rows:
        log.info(
            "budget candidate: quest weight %g, sink %s: NLL %.5f (PPL %.4f) at density %.4f%s",
            row["quest_weight"],
            "forced" if row["force_sink"] else "not forced",
            row["nll"],
            row["ppl"],
            row["density"],
            "  <- chosen" if row["chosen"] else "",
        )
    report = {"budget": chosen.selection.budget, "scoring_windows": scored_on, "length": length, "candidates": rows}
    path = config.loop.out_dir / "budget_candidates.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(path)


def record_decode_allocation(config: DistillConfig, result: DistillResult, rule: str) -> None:
    """Calibrates how the distilled decode gates share a decode budget among layers
    (`seer_jax.decode_calibration.decode_allocation` by `rule`, on the first `BUDGET_CALIBRATION_WINDOWS` windows of
    the distillation data, scored from the run's `decode_slice_ratio` on) and records it in the adapter's decode
    config."""
    import jax.numpy as jnp

    from seer_jax.adapters import record_selection
    from seer_jax.decode_calibration import decode_allocation
    from train.data import eval_windows
    from train.token_corpus import load_corpus

    length = config.loader.seq_len
    tokens = jnp.asarray(eval_windows(load_corpus(config.corpus), length=length, num_docs=BUDGET_CALIBRATION_WINDOWS))
    allocation = decode_allocation(result.model, tokens, rule=rule, scored_from=config.decode_slice_ratio)
    decode = dataclasses.replace(result.model.seer_config.decode, allocation=allocation)
    record_selection(result.adapter_dir, decode=decode)
    at_tenth = " ".join(f"{fraction:.3f}" for fraction in allocation.layer_fractions_at(0.1))
    log.info(
        "recorded a %s decode allocation (%d windows of %d tokens; layer fractions at a 10%% budget: %s) in %s",
        rule,
        len(tokens),
        length,
        at_tenth,
        result.adapter_dir,
    )


def record_default_selections(args: argparse.Namespace, config: DistillConfig, result: DistillResult) -> None:
    """The adapter's default selections as the flags ask: with prefill gates a calibrated threshold
    (`--default-density`) or density budget (`--budget-density`); with decode gates the decode allocation of
    `--decode-allocation`'s rule, if any."""
    if config.target != "decode":
        budget = args.budget_density is not None
        density = args.budget_density if budget else args.default_density
        record_prefill_selection(config, result, density, budget=budget, quest_weight=args.quest_weight)
    rule = args.decode_allocation or "none"
    if rule != "none" and config.target != "prefill":
        record_decode_allocation(config, result, rule)


def run_evaluation(config: EvalConfig, out_dir: Path) -> None:
    """Perplexity vs. density with a progress bar; writes `out_dir` and prints the markdown table."""
    from seer_jax.multihost import is_primary
    from train.perplexity import evaluate
    from train.progress import evaluation_progress

    log.info("%s", config)
    result = evaluate(config, progress=evaluation_progress)
    paths = result.write(out_dir)
    if is_primary():  # one table per job
        print(result.to_markdown(), flush=True)
    log.info("wrote %s", ", ".join(str(path) for path in paths.values()))


def run_demo(args: argparse.Namespace) -> None:
    """The embedded default: pretrain (cached) → distil → evaluate, on the standard-library corpus."""
    from train.demo.corpus import DemoCorpusConfig, build_demo_corpus
    from train.demo.model import DemoModelConfig, pretrain_demo_model
    from train.demo.shipped import shipped_model_dir
    from train.perplexity import EvalConfig
    from train.progress import training_progress

    cache = args.demo_cache
    model_dir = shipped_model_dir()
    if model_dir is not None:
        log.info("demo: the shipped pretrained model %s (its MODEL_CARD.md)", model_dir)
        corpus = build_demo_corpus(DemoCorpusConfig(cache_dir=cache / "corpus", vocab_size=None))
    else:
        log.info("demo: pretraining (or reusing) the small Llama in %s", cache)
        bar, on_step = training_progress(DemoModelConfig(cache_dir=cache).steps)
        with bar:
            demo = pretrain_demo_model(DemoModelConfig(cache_dir=cache), on_step=on_step)
        log.info("demo model %s: held-out perplexity %.1f", demo.model_dir, demo.eval_perplexity)
        model_dir = demo.model_dir
        corpus = build_demo_corpus(DemoCorpusConfig(cache_dir=cache / "corpus"))
    out = args.out or cache / "distill"
    if out.exists() and not args.resume:
        shutil.rmtree(out)
    config = distill_config_from_args(
        args,
        model=model_dir,
        data=(corpus.train_path,),
        out=out,
        corpus_cache=args.corpus_cache or cache / "tokens",
        dtype="float32",
    )
    result = run_distillation(config)
    record_default_selections(args, config, result)
    if config.target == "decode":
        log.info("demo: the perplexity table measures prefill gates; decode gates are evaluated by train.eval_ppl")
        return
    eval_config = EvalConfig(
        model=model_dir,
        data=(corpus.eval_path,),
        gates=config.adapter_dir,
        cache_dir=config.corpus.cache_dir,
        seed=args.seed,
        mesh=config.mesh,
        **(SHIPPED_EVAL if shipped_model_dir() is not None else DEMO_EVAL),
    )
    run_evaluation(eval_config, out / "eval")


def build_parser() -> argparse.ArgumentParser:
    """The flags, with their defaults in the help (no library import)."""
    parser = argparse.ArgumentParser(
        prog="python -m train.distill_gates",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", help="base model directory (HF or converted) or a hub id in the local HF cache; none: the demo"
    )
    parser.add_argument("--out", type=Path, help="run directory (checkpoints, metrics, adapter, eval)")
    parser.add_argument("--eval-data", type=Path, nargs="+", help="held-out documents: evaluate PPL vs. density")
    parser.add_argument("--eval-lengths", type=int, nargs="+", default=[2048, 8192], help="evaluation lengths L")
    parser.add_argument(
        "--budget-density",
        type=float,
        help="record a density budget at this mean density as the adapter's default prefill selection, its "
        f"per-layer shares calibrated on the first {BUDGET_CALIBRATION_WINDOWS} distillation windows; the quest weight "
        "(0 or 0.5, or --quest-weight's) and whether every row keeps its sink block are chosen by the sparse model's "
        f"NLL on the next {BUDGET_CALIBRATION_WINDOWS} windows (each helps one testbed and hurts the other; the "
        "candidates go to OUT/budget_candidates.json) (default: the threshold of --default-density)",
    )
    parser.add_argument(
        "--default-density",
        type=float,
        default=DEFAULT_DENSITY,
        help="without --budget-density: record as the adapter's default prefill selection the threshold that keeps "
        f"this block density on the first {BUDGET_CALIBRATION_WINDOWS} distillation windows, with the density reached",
    )
    parser.add_argument(
        "--quest-weight",
        type=float,
        help="with prefill gates: record that their selection ranks blocks by the gate's logits plus this weight "
        "times the quest source's scores (SeerConfig.quest_weight), and calibrate the default selection on those "
        "scores; 0: the gate alone, as the official code (not a training setting). 0.5 helped the tiny testbed's "
        "budgets (+5.7%% against +7.0%% PPL at density 0.1) and ruined SmolLM2's (+69.9%% against +9.9%%) "
        "(default: 0 for a threshold; with --budget-density the better of 0 and 0.5 by NLL)",
    )
    parser.add_argument(
        "--decode-allocation",
        choices=DECODE_ALLOCATION_CHOICES,
        help="with decode gates: record in the adapter how a decode budget is shared among layers, calibrated on the "
        f"first {BUDGET_CALIBRATION_WINDOWS} distillation windows after training (one dense forward per window) by "
        "rule recall (the gate's ranking: layers whose gate ranks poorly get more blocks) or coverage (the "
        "attention's), or none: every layer the same budget (on the testbed uniform measured best)",
    )
    demo_cache = Path.home() / ".cache" / "seer-jax" / "demo"
    parser.add_argument("--demo-cache", type=Path, default=demo_cache, help="the demo's model and corpus cache")
    add_distill_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    from seer_jax.model_path import resolve_model_path
    from train.perplexity import EvalConfig
    from train.progress import configure_logging
    from train.trainer import TrainingDivergedError

    configure_logging()
    try:
        if args.quest_weight is not None and not 0 <= args.quest_weight < float("inf"):
            parser.error(f"--quest-weight must be a finite number >= 0, got {args.quest_weight}")
        if args.quest_weight and args.target == "decode":
            parser.error("--quest-weight weighs prefill gates' scores; for decode gates use --decode-quest-weight")
        if args.model is None:
            if args.data:
                parser.error("--data needs --model (without --model the embedded demo runs on its own corpus)")
            from train.demo.shipped import shipped_model_dir

            for name, value in (SHIPPED_DISTILL if shipped_model_dir() is not None else DEMO_DISTILL).items():
                if getattr(args, name) == parser.get_default(name):
                    setattr(args, name, value)
            run_demo(args)
            return
        if not args.data or args.out is None:
            parser.error("--model needs --data and --out")
        if args.eval_data and args.target == "decode":
            parser.error("--eval-data measures prefill gates; evaluate decode gates with python -m train.eval_ppl")
        if args.budget_density is not None and (args.target == "decode" or not 0 < args.budget_density <= 1):
            parser.error("--budget-density needs prefill gates (--target prefill or both) and a density in (0, 1]")
        if not 0 < args.default_density <= 1:
            parser.error(f"--default-density must be in (0, 1], got {args.default_density}")
        if args.decode_allocation not in (None, "none") and args.target == "prefill":
            parser.error("--decode-allocation needs decode gates (--target decode or both)")
        if args.decode_quest_in_loss and (args.target == "prefill" or not args.decode_quest_weight > 0):
            parser.error(
                "--decode-quest-in-loss needs decode gates (--target decode or both) and --decode-quest-weight > 0"
            )
        args.model = resolve_model_path(args.model)
        args.tokenizer_dir = args.tokenizer_dir and resolve_model_path(args.tokenizer_dir, flag="--tokenizer-dir")
        config = distill_config_from_args(
            args,
            model=args.model,
            data=tuple(args.data),
            out=args.out,
            corpus_cache=args.corpus_cache,
            dtype=args.dtype,
        )
        result = run_distillation(config)
        record_default_selections(args, config, result)
        if args.eval_data:
            eval_config = EvalConfig(
                model=args.model,
                data=tuple(args.eval_data),
                gates=config.adapter_dir,
                tokenizer_dir=args.tokenizer_dir,
                text_field=args.text_field,
                cache_dir=args.corpus_cache,
                lengths=tuple(args.eval_lengths),
                seed=args.seed,
                mesh=config.mesh,  # the distillation's devices, every process of a multi-process job included
            )
            run_evaluation(eval_config, args.out / "eval")
    except (ValueError, OSError, TrainingDivergedError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
