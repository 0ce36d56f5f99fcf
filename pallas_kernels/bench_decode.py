"""Benchmark `block_sparse_decode` against dense decode: `python -m pallas_kernels.bench_decode` (or `bench --decode`).

For each head shape (Llama-3.1-8B: N=32, K=8, H=128; and N=32, K=8, H=64), batch B and context S, one query token
per row against a full bf16 KV cache (lengths = S for every row, as in SeerAttention-R's benchmark):
  cudnn        `jax.nn.dot_product_attention(q[:, None], k, v, implementation="cudnn")`: one query, no mask (every
               row's whole cache is valid, so no length mask is needed).
  xla          the same call with implementation="xla".
  sparse s     `block_sparse_decode` with ceil(J·(1 − s)) random distinct blocks per (row, kv head) in random
               order, the last block always among them (J = S / 64); s = 0 selects every block.
"best dense" is the fastest of cudnn, xla and sparse 0 in this run; "×" is best dense time / this time. "GB/s"
counts the K and V bytes of the selected blocks (what the op must read), against the chip's ~4.3 TB/s.

Timing: one decode step is meaningless to time from Python (tens of µs of dispatch), so each case runs `--steps`
steps unrolled in one jitted function, each step's output fed back as the next step's query (a true dependency:
nothing is hoisted); "ms" per step is its wall time / steps, median of `--runs` calls after `--warmup`. That
still carries the call's dispatch, spread over the steps. With `--profile`, one more call runs under the jax
profiler, and the device trace gives "dev ms": from the first kernel's start to the last kernel's end, per step
(every launch and gap between the kernels of the steps included, the call's host-side dispatch not: the cost of
the op inside a longer jitted program, such as a model's decode step), and the kernels run per step and their
device time ("dev ×" = best dense dev ms / this dev ms).

The table goes to stdout row by row; everything is also written as JSON to
`<output-dir>/<date>-<time>_<device>_<commit>_decode.json`.
"""

import argparse
import collections
import dataclasses
import functools
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.bench import _skip_note, write_results
from pallas_kernels.block_sparse_decode import block_sparse_decode, block_sparse_decode_implementation
from pallas_kernels.inputs import SCORE_STD, input_key

_logger = logging.getLogger(__name__)
BLOCK = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadShape:
    name: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


HEAD_SHAPES = {
    "llama3_8b": HeadShape(name="llama3_8b", num_q_heads=32, num_kv_heads=8, head_dim=128),
    "h64": HeadShape(name="h64", num_q_heads=32, num_kv_heads=8, head_dim=64),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    shapes: tuple[str, ...] = tuple(HEAD_SHAPES)
    batches: tuple[int, ...] = (1, 8, 16)
    contexts: tuple[int, ...] = (8192, 32768, 131072)
    sparsities: tuple[float, ...] = (0.0, 0.5, 0.9)
    runs: int = 10
    warmup: int = 2
    steps: int = 10
    implementation: dispatch.Implementation | None = "mosaic"
    output_dir: Path = Path("benchmarks/results")
    seed: int = 0
    commit: str | None = None
    profile: bool = False  # also trace one call: device time per step and the kernels it runs
    block_size: int = BLOCK  # keys per selected block (the decode gate's block size: 64 or 32)

    def __post_init__(self):
        unknown = set(self.shapes) - set(HEAD_SHAPES)
        if unknown:
            raise ValueError(f"shapes must be among {sorted(HEAD_SHAPES)}, got {sorted(unknown)}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if any(context < 1 or context % self.block_size for context in self.contexts):
            raise ValueError(f"contexts must be positive multiples of {self.block_size}, got {self.contexts}")
        if any(not 0.0 <= sparsity < 1.0 for sparsity in self.sparsities):
            raise ValueError(f"sparsities must be in [0, 1), got {self.sparsities}")
        if min(self.batches) < 1 or self.runs < 1 or self.warmup < 1 or self.steps < 1:
            raise ValueError("batches, runs, warmup and steps must be >= 1")
        dispatch.check_implementation(self.implementation)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row:
    shape: str
    batch: int
    context: int
    case: str
    implementation: str
    blocks: int | None = None  # selected blocks per (row, kv head)
    ms: float | None = None  # per decode step
    gbps: float | None = None  # selected K/V bytes / time
    speedup_vs_best_dense: float | None = None
    device_ms: float | None = None  # per decode step, first kernel start to last kernel end (`--profile`)
    device_gbps: float | None = None  # selected K/V bytes / device time
    device_speedup_vs_best_dense: float | None = None
    kernels: dict[str, tuple[float, float]] | None = None  # per step, each kernel's (launches, device µs)
    note: str = ""


_HEADER = (
    f"{'shape':<10} {'B':>3} {'S':>7} {'case':<11} {'impl':<9} {'blocks':>6} {'ms':>9} {'GB/s':>7} {'×':>6} "
    f"{'dev ms':>9} {'dev ×':>6}  note"
)


def _format_row(row: Row) -> str:
    def number(value, spec):
        return format(value, spec) if value is not None else format("-", spec[:2])

    return (
        f"{row.shape:<10} {row.batch:>3} {row.context:>7} {row.case:<11} {row.implementation:<9} "
        f"{number(row.blocks, '>6')} {number(row.ms, '>9.4f')} {number(row.gbps, '>7.0f')} "
        f"{number(row.speedup_vs_best_dense, '>6.2f')} {number(row.device_ms, '>9.4f')} "
        f"{number(row.device_speedup_vs_best_dense, '>6.2f')}  {row.note}"
    )


def step_loop(step: Callable, steps: int) -> Callable:
    """jit of `steps` calls of `step(q, *args) -> out` (out shaped like q), each output the next call's q."""

    @jax.jit
    def loop(q, *args):
        for _ in range(steps):  # unrolled: a device while loop would sync with the host on every step
            q = step(q, *args).astype(q.dtype)
        return q

    return loop


def time_step_ms(loop: Callable, q, *args, steps: int, runs: int, warmup: int) -> float:
    """Median wall ms per step of `loop(q, *args)` (a `step_loop` of `steps` steps)."""
    for _ in range(warmup):
        jax.block_until_ready(loop(q, *args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(loop(q, *args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times) / steps


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """One traced call of a step loop, per step: `span_ms` from the first kernel's start to the last kernel's
    end; `kernels`: each kernel's name → (launches, device µs)."""

    span_ms: float
    kernels: dict[str, tuple[float, float]]


def device_profile(loop: Callable, q, *args, steps: int) -> DeviceProfile | None:
    """Traces one (already compiled) call of `loop`; None where the trace has no GPU device plane (CPU)."""
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            jax.block_until_ready(loop(q, *args))
        paths = sorted(Path(directory).rglob("*.xplane.pb"))
        data = jax.profiler.ProfileData.from_file(str(paths[-1])) if paths else None
    planes = [plane for plane in (data.planes if data else ()) if plane.name.startswith("/device:GPU:")]
    if not planes:
        return None
    lines = [line for line in planes[0].lines if line.name.startswith("Stream")] or list(planes[0].lines)
    events = [(event.name, event.start_ns, event.end_ns) for line in lines for event in line.events]
    if not events:
        return None
    launches, device_ns = collections.Counter(), collections.Counter()
    for name, start_ns, end_ns in events:
        launches[name] += 1
        device_ns[name] += end_ns - start_ns
    span_ns = max(end for _, _, end in events) - min(start for _, start, _ in events)
    kernels = {name: (launches[name] / steps, device_ns[name] / steps / 1e3) for name in launches}
    return DeviceProfile(span_ms=span_ns / steps / 1e6, kernels=kernels)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def random_selection(key: jax.Array, shape: tuple[int, int], num_kv_blocks: int, num_selected: int):
    """num_selected distinct random blocks per (b, k) of shape [B, K], in random order, the last block always
    included: block_index int32 [B, K, num_selected], block_count int32 [B, K] (= num_selected)."""
    priority = jax.random.uniform(key, (*shape, num_kv_blocks)).at[..., -1].set(-1.0)  # [B, K, J]
    index = jnp.argsort(priority, axis=-1)[..., :num_selected].astype(jnp.int32)  # [B, K, num_selected]
    order = jnp.argsort(jax.random.uniform(jax.random.fold_in(key, 1), index.shape), axis=-1)
    index = jnp.take_along_axis(index, order, axis=-1)
    return index, jnp.full(shape, num_selected, jnp.int32)


def _measure(row: Row, step: Callable, q, *args, kv_bytes: float, config: BenchConfig) -> Row:
    loop = step_loop(step, config.steps)
    try:
        ms = time_step_ms(loop, q, *args, steps=config.steps, runs=config.runs, warmup=config.warmup)
    except (NotImplementedError, RuntimeError, ValueError) as error:  # JaxRuntimeError is a RuntimeError
        note = _skip_note(error)
        if note is None and row.implementation != "cudnn":  # cuDNN may be absent or refuse a shape: a note
            raise
        return dataclasses.replace(row, note=note or f"skipped: {type(error).__name__}: {str(error)[:120]}")
    row = dataclasses.replace(row, ms=ms, gbps=kv_bytes / ms / 1e6)
    profile = device_profile(loop, q, *args, steps=config.steps) if config.profile else None
    if profile is None:
        return row
    device_gbps = kv_bytes / profile.span_ms / 1e6
    return dataclasses.replace(row, device_ms=profile.span_ms, device_gbps=device_gbps, kernels=profile.kernels)


def bench_case(shape: HeadShape, batch: int, context: int, config: BenchConfig, emit: Callable[[Row], None]):
    """Dense baselines and every sparsity at one (shape, batch, context); emits rows as they are measured."""
    key = jax.random.fold_in(jax.random.fold_in(input_key(config.seed), batch), context)
    q_key, k_key, v_key, index_key = jax.random.split(key, 4)
    kv_shape = (batch, context, shape.num_kv_heads, shape.head_dim)
    scale = SCORE_STD**0.5
    q = (scale * jax.random.normal(q_key, (batch, shape.num_q_heads, shape.head_dim))).astype(jnp.bfloat16)
    k = (scale * jax.random.normal(k_key, kv_shape)).astype(jnp.bfloat16)
    v = jax.random.normal(v_key, kv_shape).astype(jnp.bfloat16)
    lengths = jnp.full((batch,), context, jnp.int32)
    dense_bytes = 2 * k.size * k.dtype.itemsize
    common = dict(shape=shape.name, batch=batch, context=context)
    rows = []
    for name in ("cudnn", "xla"):

        def dense(q, k, v, name=name):
            return jax.nn.dot_product_attention(q[:, None], k, v, implementation=name)[:, 0]

        rows.append(_measure(Row(**common, case="dense", implementation=name), dense, q, k, v,
                             kv_bytes=dense_bytes, config=config))  # fmt: skip
    num_kv_blocks = context // config.block_size
    sizes = dict(block_size=config.block_size)
    for sparsity in config.sparsities:
        num_selected = max(1, -(-round(num_kv_blocks * (1 - sparsity) * 1e6) // 1_000_000))
        index, count = random_selection(index_key, (batch, shape.num_kv_heads), num_kv_blocks, num_selected)
        row = Row(**common, case=f"sparse {sparsity:.2f}", implementation="", blocks=num_selected)
        try:
            implementation = block_sparse_decode_implementation(
                q, k, v, lengths, index, count, implementation=config.implementation, **sizes
            )
        except NotImplementedError as error:
            rows.append(dataclasses.replace(row, implementation="mosaic", note=_skip_note(error)))
            continue

        def sparse(q, k, v, lengths, index, count):
            return block_sparse_decode(q, k, v, lengths, index, count, implementation=config.implementation, **sizes)

        kv_bytes = dense_bytes * num_selected / num_kv_blocks
        row = dataclasses.replace(row, implementation=implementation)
        rows.append(_measure(row, sparse, q, k, v, lengths, index, count, kv_bytes=kv_bytes, config=config))
    dense = [row for row in rows if row.case in ("dense", "sparse 0.00")]
    best_dense = min((row.ms for row in dense if row.ms is not None), default=None)
    best_dense_device = min((row.device_ms for row in dense if row.device_ms is not None), default=None)
    for row in rows:
        if best_dense is not None and row.ms is not None:
            row = dataclasses.replace(row, speedup_vs_best_dense=best_dense / row.ms)
        if best_dense_device is not None and row.device_ms is not None:
            row = dataclasses.replace(row, device_speedup_vs_best_dense=best_dense_device / row.device_ms)
        emit(row)


def parse_args(argv: list[str] | None) -> BenchConfig:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(prog="python -m pallas_kernels.bench_decode", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=defaults.shapes, choices=sorted(HEAD_SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=defaults.batches, help="batch sizes B")
    parser.add_argument("--contexts", type=int, nargs="+", default=defaults.contexts, help="cache lengths S")
    parser.add_argument("--sparsities", type=float, nargs="+", default=defaults.sparsities, help="block sparsities")
    parser.add_argument("--runs", type=int, default=defaults.runs, help="timed loops per case (median reported)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed loops first (compile, warm-up)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="decode steps per timed loop")
    parser.add_argument(
        "--implementation",
        choices=["auto", *dispatch.IMPLEMENTATIONS],
        default=defaults.implementation,
        help="for block_sparse_decode: 'mosaic' (default) skips cases the kernel declines",
    )
    parser.add_argument("--output-dir", type=Path, default=defaults.output_dir, help="where the JSON goes")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the random inputs")
    parser.add_argument("--commit", default=None, help="git commit to record when the tree has no .git")
    parser.add_argument(
        "--profile", action="store_true", help="also trace one call per case: device time per step, kernels run"
    )
    parser.add_argument("--block-size", type=int, default=defaults.block_size, help="keys per block (64 or 32)")
    args = parser.parse_args(argv)
    return BenchConfig(
        shapes=tuple(args.shapes),
        batches=tuple(args.batches),
        contexts=tuple(args.contexts),
        sparsities=tuple(args.sparsities),
        runs=args.runs,
        warmup=args.warmup,
        steps=args.steps,
        implementation=None if args.implementation == "auto" else args.implementation,
        output_dir=args.output_dir,
        seed=args.seed,
        commit=args.commit,
        profile=args.profile,
        block_size=args.block_size,
    )


def main(argv: list[str] | None = None) -> Path:
    """Runs the benchmark, prints the table, writes the JSON; returns the JSON's path."""
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
    for shape_name in config.shapes:
        for context in config.contexts:
            for batch in config.batches:
                bench_case(HEAD_SHAPES[shape_name], batch, context, config, emit)

    head_shapes = {name: dataclasses.asdict(HEAD_SHAPES[name]) for name in config.shapes}
    path = write_results(config, rows, device=device, suffix="_decode", head_shapes=head_shapes, dtype="bfloat16")
    _logger.info("wrote %s", path)
    return path


if __name__ == "__main__":
    main()
