"""Benchmark the attention ops against dense causal cuDNN: `python -m pallas_kernels.bench [--lengths 8192 ...]`.

For each length T, on Llama-3.1-8B attention (`shapes.BENCH_SHAPES`: B=1, N=32, K=8, H=128; `--heads` picks another
layout of `shapes.BENCH_HEADS`, e.g. SmolLM2-135M's 9/3 heads of 64), bf16, causal:
  dense cuDNN  `jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")`, no mask (a mask would
               become a dense bias); the baseline, measured in the same run ("xla" where there is no GPU).
  sparse s     `block_sparse_attention` with a random per-row block mask at sparsity s that keeps the diagonal
               (`inputs.random_block_mask`, as in SeerAttention's benchmark), passed as the mask (as `seer_jax`
               does): the time includes building the kernel's tile schedule from it.
  pooling      `attention_with_pooling`.
  bwd ...      with `--backward`: the backward alone of dense cuDNN and of each sparse case, timed as forward +
               backward (`jax.vjp` on a random cotangent) minus the same op's forward of this run.
  topk s       with `--topk`: `block_topk_mask` on random bf16 block scores [B, N, I, I] (as the gate's logits),
               keeping k = ⌊(1 − √s)·I⌋ blocks per row (about density 1 − s over the causal blocks, as `seer_jax`'s
               `nz_ratio`): its Pallas Triton kernel against its reference (banded XLA `top_k`) in the same run.
TFLOP/s counts causal FLOPs, 4·B·T²·H·N / 2, times the achieved block density for the sparse cases. Timing: jitted,
warm-up calls, then the median of `--runs` calls each ended by `block_until_ready`, on fresh random inputs.
A case whose implementation raises `NotImplementedError` or runs out of memory is skipped with a note.

The table goes to stdout row by row; everything is also written as JSON to
`<output-dir>/<date>-<time>_<device>_<commit>.json` (date, git commit, jax version, device, config, rows).
"""

import argparse
import dataclasses
import datetime
import functools
import json
import logging
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.attention_with_pooling import attention_with_pooling, attention_with_pooling_implementation
from pallas_kernels.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_implementation,
)
from pallas_kernels.block_topk import block_topk_mask, block_topk_mask_implementation
from pallas_kernels.inputs import causal_density, input_key, random_block_mask, random_qkv
from pallas_kernels.shapes import BENCH_HEADS, BENCH_SHAPES, AttentionShape, bench_shape

_logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    lengths: tuple[int, ...] = tuple(shape.seq_len for shape in BENCH_SHAPES)
    sparsities: tuple[float, ...] = (0.0, 0.5, 0.7, 0.9, 0.95)
    runs: int = 10
    warmup: int = 2
    implementation: dispatch.Implementation | None = "mosaic"
    output_dir: Path = Path("benchmarks/results")
    seed: int = 0
    commit: str | None = None  # recorded in the JSON; None: ask git
    backward: bool = False  # also time the backward of dense cuDNN and of each sparse case
    topk: bool = False  # also time TopK block selection, kernel against reference
    heads: str = "llama3_8b"  # the head layout, a `shapes.BENCH_HEADS` key

    def __post_init__(self):
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"lengths must be positive, got {self.lengths}")
        if any(not 0.0 <= sparsity < 1.0 for sparsity in self.sparsities):
            raise ValueError(f"sparsities must be in [0, 1), got {self.sparsities}")
        if self.runs < 1:
            raise ValueError(f"runs must be >= 1, got {self.runs}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the first call compiles), got {self.warmup}")
        dispatch.check_implementation(self.implementation, "mosaic")
        if self.heads not in BENCH_HEADS:
            raise ValueError(f"heads: {self.heads!r} is not one of {sorted(BENCH_HEADS)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row:
    """One measured (or skipped) case."""

    seq_len: int
    case: str
    implementation: str
    density: float | None = None
    ms: float | None = None
    tflops: float | None = None
    speedup_vs_dense: float | None = None
    note: str = ""


_HEADER = f"{'T':>7} {'case':<12} {'impl':<10} {'density':>7} {'ms':>10} {'TFLOP/s':>8} {'vs dense':>8}  note"


def _format_row(row: Row) -> str:
    def number(value, spec):
        return "—" if value is None else format(value, spec)

    return (
        f"{row.seq_len:>7} {row.case:<12} {row.implementation:<10} {number(row.density, '.3f'):>7} "
        f"{number(row.ms, '.3f'):>10} {number(row.tflops, '.4g'):>8} {number(row.speedup_vs_dense, '.2f'):>8}  "
        f"{row.note}"
    )


def causal_flops(shape: AttentionShape) -> float:
    """FLOPs of causal attention counted as half the dense 4·T²·H·N per batch element (QKᵀ and PV)."""
    return 4 * shape.batch * shape.seq_len**2 * shape.head_dim * shape.num_q_heads / 2


def time_ms(fn: Callable, *args, runs: int, warmup: int) -> float:
    """Median wall time in ms of `fn(*args)` over `runs` calls after `warmup` calls, each synchronised."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _skip_note(error: Exception) -> str | None:
    """The table note for an error that skips a case (not implemented, out of memory); None for anything else."""
    if isinstance(error, NotImplementedError):
        return f"skipped: NotImplementedError: {error}"
    if isinstance(error, jax.errors.JaxRuntimeError) and re.search("RESOURCE_EXHAUSTED|out of memory", str(error)):
        return "skipped: out of memory"
    return None


def _measure(row: Row, flops: float | None, dense_ms: float | None, fn: Callable, *args, config: BenchConfig) -> Row:
    try:
        ms = time_ms(fn, *args, runs=config.runs, warmup=config.warmup)
    except (NotImplementedError, jax.errors.JaxRuntimeError) as error:
        note = _skip_note(error)
        if note is None:
            raise
        return dataclasses.replace(row, note=note)
    return dataclasses.replace(
        row,
        ms=ms,
        tflops=None if flops is None else flops / ms / 1e9,
        speedup_vs_dense=None if dense_ms is None else dense_ms / ms,
    )


def _forward_backward(fn: Callable) -> Callable:
    """jit of (q, k, v, d_out, *rest) -> gradients of `fn(q, k, v, *rest)` w.r.t. q, k, v for cotangent d_out."""

    def run(q, k, v, d_out, *rest):
        _, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, *rest), q, k, v)
        return vjp(d_out)

    return jax.jit(run)


def _backward_row(row: Row, forward: Row, flops: float, dense_bwd_ms: float | None, fn: Callable, *args, config):
    """`row` timed as forward + backward of `fn`, minus `forward.ms`: the backward alone (2.5× forward FLOPs)."""
    both = _measure(row, None, None, _forward_backward(fn), *args, config=config)
    if both.ms is None or forward.ms is None:
        return both
    ms = both.ms - forward.ms
    return dataclasses.replace(
        both,
        ms=ms,
        tflops=2.5 * flops / ms / 1e9,
        speedup_vs_dense=None if dense_bwd_ms is None else dense_bwd_ms / ms,
        note=f"forward + backward {both.ms:.3f} ms",
    )


def _implementation(query: Callable, *args, implementation, **kwargs) -> tuple[str, str]:
    """(implementation the op would run, "") or, when an explicitly requested kernel declines, (its name, note)."""
    try:
        return query(*args, implementation=implementation, **kwargs), ""
    except NotImplementedError as error:
        return implementation, _skip_note(error)


def bench_length(shape: AttentionShape, config: BenchConfig, emit: Callable[[Row], None]) -> None:
    """Measures every case at one length; calls `emit` with each row as soon as it is measured."""
    key = jax.random.fold_in(input_key(config.seed), shape.seq_len)
    q, k, v = random_qkv(key, shape, jnp.bfloat16)
    flops = causal_flops(shape)
    dense_implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"

    def dense(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=dense_implementation)

    dense_row = Row(seq_len=shape.seq_len, case="dense", implementation=dense_implementation)
    dense_row = _measure(dense_row, flops, None, jax.jit(dense), q, k, v, config=config)
    emit(dense_row)
    dense_ms = dense_row.ms
    d_out = jax.random.normal(jax.random.fold_in(key, 1 << 20), q.shape, q.dtype) if config.backward else None
    dense_bwd_ms = None
    if config.backward:
        row = Row(seq_len=shape.seq_len, case="bwd dense", implementation=dense_implementation)
        row = _backward_row(row, dense_row, flops, None, dense, q, k, v, d_out, config=config)
        emit(row)
        dense_bwd_ms = row.ms

    for number, sparsity in enumerate(config.sparsities):
        mask = random_block_mask(
            jax.random.fold_in(key, number), shape.batch, shape.num_q_heads, shape.num_blocks(), sparsity=sparsity
        )
        density = causal_density(mask)
        name, note = _implementation(
            block_sparse_attention_implementation, q, k, v, block_mask=mask, implementation=config.implementation
        )
        row = Row(seq_len=shape.seq_len, case=f"sparse {sparsity:.2f}", implementation=name, density=density, note=note)

        def sparse_op(q, k, v, mask):
            return block_sparse_attention(q, k, v, block_mask=mask, implementation=config.implementation)

        if not note:
            row = _measure(row, flops * density, dense_ms, jax.jit(sparse_op), q, k, v, mask, config=config)
        emit(row)
        if config.backward and not note:
            bwd_row = Row(seq_len=shape.seq_len, case=f"bwd {sparsity:.2f}", implementation=name, density=density)
            emit(_backward_row(bwd_row, row, flops * density, dense_bwd_ms, sparse_op, q, k, v, d_out, mask,
                               config=config))  # fmt: skip

    name, note = _implementation(attention_with_pooling_implementation, q, k, v, implementation=config.implementation)
    row = Row(seq_len=shape.seq_len, case="pooling", implementation=name, note=note)
    if not note:
        pooling = jax.jit(lambda q, k, v: attention_with_pooling(q, k, v, implementation=config.implementation))
        row = _measure(row, flops, dense_ms, pooling, q, k, v, config=config)
    emit(row)
    if config.topk:
        bench_topk(shape, config, emit)


def bench_topk(shape: AttentionShape, config: BenchConfig, emit: Callable[[Row], None]) -> None:
    """TopK block selection at one length: the reference, then the kernel (unless `--implementation reference`)."""
    num_blocks = shape.num_blocks()
    key = jax.random.fold_in(input_key(config.seed), shape.seq_len + 1)
    scores = jax.random.normal(key, (shape.batch, shape.num_q_heads, num_blocks, num_blocks), jnp.bfloat16)
    # This op's kernel is Pallas Triton: the bench's "mosaic" (our kernels) means "triton" here.
    kernel = {"mosaic": "triton", "reference": None, None: None}[config.implementation]
    for sparsity in config.sparsities:
        k = max(1, int((1.0 - sparsity**0.5) * num_blocks))
        case = f"topk {sparsity:.2f}"

        def topk(scores, implementation, k=k):
            return block_topk_mask(scores, k, implementation=implementation)

        reference = _measure(
            Row(seq_len=shape.seq_len, case=case, implementation="reference", note=f"k = {k}"),
            None,
            None,
            jax.jit(functools.partial(topk, implementation="reference")),
            scores,
            config=config,
        )
        emit(reference)
        if config.implementation == "reference":
            continue
        name, note = _implementation(block_topk_mask_implementation, scores, k, implementation=kernel)
        row = Row(seq_len=shape.seq_len, case=case, implementation=name, note=note or f"k = {k}")
        if not note:
            kernel_fn = jax.jit(functools.partial(topk, implementation=kernel))
            row = _measure(row, None, None, kernel_fn, scores, config=config)
            if row.ms is not None and reference.ms is not None:
                row = dataclasses.replace(row, note=f"{row.note}, {reference.ms / row.ms:.2f}× the reference's speed")
        emit(row)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def parse_args(argv: list[str] | None) -> BenchConfig:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(prog="python -m pallas_kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=defaults.lengths, help="sequence lengths T")
    parser.add_argument("--sparsities", type=float, nargs="+", default=defaults.sparsities, help="block sparsities")
    parser.add_argument("--runs", type=int, default=defaults.runs, help="timed calls per case (median reported)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed calls first (compile, warm-up)")
    parser.add_argument(
        "--implementation",
        choices=["auto", "mosaic", "reference"],
        default=defaults.implementation,
        help="for our ops: 'mosaic' (default: our kernels, TopK's being Pallas Triton) skips cases the kernels "
        "decline; 'reference' times the jnp references",
    )
    parser.add_argument("--backward", action="store_true", help="also time the backward passes")
    parser.add_argument("--topk", action="store_true", help="also time TopK block selection (kernel vs reference)")
    parser.add_argument(
        "--heads", choices=sorted(BENCH_HEADS), default=defaults.heads, help="head layout (query/kv heads, head_dim)"
    )
    parser.add_argument("--output-dir", type=Path, default=defaults.output_dir, help="where the JSON goes")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the random inputs")
    parser.add_argument(
        "--commit",
        default=None,
        help="git commit to record when the tree has no .git (e.g. on the GPU machine); default: git rev-parse",
    )
    args = parser.parse_args(argv)
    return BenchConfig(
        lengths=tuple(args.lengths),
        sparsities=tuple(args.sparsities),
        runs=args.runs,
        warmup=args.warmup,
        implementation=None if args.implementation == "auto" else args.implementation,
        output_dir=args.output_dir,
        seed=args.seed,
        commit=args.commit,
        backward=args.backward,
        topk=args.topk,
        heads=args.heads,
    )


def main(argv: list[str] | None = None) -> Path:
    """Runs the benchmark, prints the table, writes the JSON; returns the JSON's path."""
    args = sys.argv[1:] if argv is None else argv
    if "--decode" in args:  # the decode benchmark, with its own flags
        from pallas_kernels import bench_decode  # imports this module: lazily

        return bench_decode.main([arg for arg in args if arg != "--decode"])
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _logger.info("%s", config)
    device = jax.devices()[0]
    _logger.info("device: %s, jax %s", device.device_kind, jax.__version__)
    rows: list[Row] = []

    def emit(row: Row) -> None:
        rows.append(row)
        print(_format_row(row), flush=True)

    print(_HEADER, flush=True)
    shape = bench_shape(config.heads, config.lengths[0])
    for seq_len in config.lengths:
        bench_length(shape.with_seq_len(seq_len), config, emit)

    shape_record = {
        "batch": shape.batch,
        "num_q_heads": shape.num_q_heads,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "dtype": "bfloat16",
        "causal": True,
    }
    path = write_results(config, rows, device=device, shape=shape_record)
    _logger.info("wrote %s", path)
    return path


def write_results(config, rows: list, *, device, suffix: str = "", **fields) -> Path:
    """Writes `<output_dir>/<date>-<time>_<device>_<commit><suffix>.json`: date, git commit, jax version, device,
    `fields`, the run's config and its rows (each a dataclass); returns its path. `config` has `output_dir` and
    `commit` (None: the checkout's HEAD)."""
    now = datetime.datetime.now(datetime.UTC)
    commit = config.commit or _git("rev-parse", "--short=12", "HEAD") or "unknown"
    device_name = re.sub(r"[^A-Za-z0-9]+", "-", device.device_kind).strip("-")
    path = config.output_dir / f"{now:%Y-%m-%d-%H%M%S}_{device_name}_{commit}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": now.isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device": device.device_kind,
        **fields,
        "config": dataclasses.asdict(config) | {"output_dir": str(config.output_dir)},
        "rows": [dataclasses.asdict(row) for row in rows],
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


if __name__ == "__main__":
    main()
