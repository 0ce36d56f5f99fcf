"""End-to-end generation: dense vs block-sparse prefill + block-sparse decode, `python -m benchmarks.generate`.

    python -m benchmarks.generate [--lengths 32768 131072] [--batch-sizes 1 8] [--new-tokens 512] \
        [--densities 0.1] [--quest-weights 0] [--layers 4] [--profile]

Builds the Llama-3.1-8B architecture (`benchmarks.prefill.LLAMA_31_8B`, no download) with random bf16 weights and
random float32 gates, and generates `--new-tokens` tokens (greedy, no early stop) after a prompt of each length, for
each batch size: dense attention (cuDNN prefill and decode), and SeerAttention at each density d — TopK prefill at
nz_ratio d with random prefill gates, and decode steps that read a token budget of d × the prompt length
(`DecodeConfig`, random decode gates) through `pallas_kernels.block_sparse_decode`; with several `--quest-weights`
one such case per weight w (`DecodeConfig.quest_weight`: the gate's scores plus w × Quest's bound from the kept block
key bounds), "seer d +wq". Random gates select arbitrary
blocks, which is all a timing needs. Reports time to first token (`generate` of one token: the prefill and the
first sample), the whole generation (one compiled `generate`: prefill and every decode step), decode tokens/s
(B · (new tokens − 1) over the difference of the two), compile times and the device's peak memory
(`memory_stats`, GPU only); medians of `--runs` after a warm-up. `--layers N` keeps the first N decoder layers
(compile time; every layer costs the same, but `lm_head` and sampling are a fixed cost per step, so fewer layers
understate what sparse decoding gains). `--profile` adds the GPU kernels of one decode step (device trace). Prints a
table and writes JSON under `--output-dir` with date, commit, jax version and device.
"""

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.prefill import LLAMA_31_8B, add_run_arguments, random_llama, write_record
from pallas_kernels.bench_decode import device_profile
from seer_jax.decode_config import DecodeConfig
from seer_jax.gate import GateConfig
from seer_jax.generate import generate
from seer_jax.model import CausalLM
from seer_jax.seer import seer_from_base
from seer_jax.seer_config import SeerConfig
from seer_jax.sparsity import Selection


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateBenchConfig:
    lengths: tuple[int, ...] = (32768, 131072)
    batch_sizes: tuple[int, ...] = (1, 8)
    new_tokens: int = 512
    densities: tuple[float, ...] = (0.1,)
    quest_weights: tuple[float, ...] = (0.0,)
    layers: int = 4
    runs: int = 3
    profile: bool = False
    output_dir: Path = Path("benchmarks/results")
    commit: str | None = None
    seed: int = 0

    def __post_init__(self):
        if any(length <= 0 or length % 64 for length in self.lengths):
            raise ValueError(f"lengths: {self.lengths} must be positive multiples of 64")
        if any(batch < 1 for batch in self.batch_sizes):
            raise ValueError(f"batch_sizes: {self.batch_sizes} must be >= 1")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens: {self.new_tokens} must be >= 2")
        if any(not 0.0 < d < 1.0 for d in self.densities):
            raise ValueError(f"densities: {self.densities} must be in (0, 1)")
        if not self.quest_weights or any(not w >= 0 for w in self.quest_weights):
            raise ValueError(f"quest_weights: {self.quest_weights} must be one or more weights >= 0")
        if not 1 <= self.layers <= LLAMA_31_8B["num_hidden_layers"]:
            raise ValueError(f"layers: {self.layers} must be in [1, 32]")
        if self.runs < 1:
            raise ValueError(f"runs: {self.runs} must be >= 1")


def _median_seconds(fn, runs: int) -> float:
    jax.block_until_ready(fn())  # warm-up (compiled already)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _compile_seconds(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def time_generation(model: CausalLM, tokens: jax.Array, new_tokens: int, runs: int, *, profile: bool = False) -> dict:
    """Times `generate` of 1 token (the time to first token: prefill and the first sample) and of `new_tokens`
    (int [B, T] prompts); decode tokens/s from their difference, the same compiled path for the prompt in both.
    `profile`: also the kernels of a decode step (`decode_step_kernels`)."""
    batch = tokens.shape[0]
    first = lambda: generate(model, tokens, max_new_tokens=1, eos_token_id=())
    whole = lambda: generate(model, tokens, max_new_tokens=new_tokens, eos_token_id=())
    compile_seconds = _compile_seconds(first) + _compile_seconds(whole)
    ttft, total = _median_seconds(first, runs), _median_seconds(whole, runs)
    stats = jax.devices()[0].memory_stats() or {}
    result = {
        "ttft_ms": 1e3 * ttft,
        "generate_ms": 1e3 * total,
        "decode_tokens_per_s": batch * (new_tokens - 1) / max(total - ttft, 1e-9),
        "compile_s": compile_seconds,
        "peak_bytes": stats.get("peak_bytes_in_use"),
    }
    if profile:
        result["decode_step_kernels"] = decode_step_kernels(first, whole, new_tokens - 1)
    return result


def decode_step_kernels(first, whole, steps: int, top: int = 12) -> dict[str, list[float]] | None:
    """Per decode step, the GPU kernels of `whole` (a generation) less those of `first` (its first token only),
    from one device trace of each (`pallas_kernels.bench_decode.device_profile`): kernel name → [launches, device
    µs], the `top` costliest, plus "all" (every kernel) and "span" ([steps, device µs per step from the first
    kernel's start to the last one's end, gaps included]). None without a GPU."""
    whole_profile = device_profile(lambda _: whole(), None, steps=1)
    first_profile = device_profile(lambda _: first(), None, steps=1)
    if whole_profile is None or first_profile is None:
        return None
    per_step = {}
    for name, (launches, micros) in whole_profile.kernels.items():
        before = first_profile.kernels.get(name, (0.0, 0.0))
        per_step[name] = [(launches - before[0]) / steps, (micros - before[1]) / steps]
    ranked = dict(sorted(per_step.items(), key=lambda item: -item[1][1])[:top])
    ranked["all"] = [sum(v[0] for v in per_step.values()), sum(v[1] for v in per_step.values())]
    span_ms = whole_profile.span_ms - first_profile.span_ms
    ranked["span"] = [float(steps), 1e3 * span_ms / steps]
    return ranked


def main(argv: list[str] | None = None) -> Path:
    defaults = GenerateBenchConfig()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=defaults.lengths, help="prompt lengths")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=defaults.batch_sizes)
    parser.add_argument("--new-tokens", type=int, default=defaults.new_tokens, help="tokens generated per row")
    parser.add_argument("--densities", type=float, nargs="+", default=defaults.densities)
    parser.add_argument(
        "--quest-weights",
        type=float,
        nargs="+",
        default=defaults.quest_weights,
        help="one sparse case per weight of Quest's bound added to the decode gate's scores (default: 0)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also trace each case: the GPU kernels of a decode step, device µs"
    )
    add_run_arguments(parser, defaults)
    args = parser.parse_args(argv)
    config = GenerateBenchConfig(
        lengths=tuple(args.lengths),
        batch_sizes=tuple(args.batch_sizes),
        new_tokens=args.new_tokens,
        densities=tuple(args.densities),
        quest_weights=tuple(args.quest_weights),
        layers=args.layers,
        runs=args.runs,
        profile=args.profile,
        output_dir=args.output_dir,
        commit=args.commit,
        seed=args.seed,
    )
    print(config, flush=True)
    dense = random_llama(config.layers, config.seed)
    model_config = dense.config
    rows = []
    path = Path(config.output_dir) / "none"
    header = f"{'B':>3} {'T':>7} {'case':>14} {'TTFT ms':>9} {'gen ms':>9} {'decode tok/s':>13}"
    print(header + f" {'TTFT x':>7} {'decode x':>8} {'whole x':>8} {'peak GiB':>9}", flush=True)
    for length in config.lengths:
        for batch in config.batch_sizes:
            tokens = jax.random.randint(jax.random.key(length), (batch, length), 0, model_config.vocab_size, jnp.int32)
            cases = [("dense", None, dense)]
            for density in config.densities:
                for weight in config.quest_weights:
                    seer_config = SeerConfig(
                        gate=GateConfig(),
                        selection=Selection(method="nz_ratio", nz_ratio=density),
                        decode=DecodeConfig(token_budget=int(density * length), quest_weight=weight),
                    )
                    # The dense model's weights (shared, not copied) plus random float32 gates.
                    rngs = nnx.Rngs(config.seed)
                    seer = seer_from_base(dense, seer_config, rngs=rngs, gate_param_dtype=jnp.float32)
                    cases.append((f"seer {density}" + (f" +{weight:g}q" if weight else ""), density, seer))
            dense_result = None
            for name, density, model in cases:
                result = time_generation(model, tokens, config.new_tokens, config.runs, profile=config.profile)
                dense_result = dense_result or result
                row = {
                    "batch": batch,
                    "prompt_len": length,
                    "new_tokens": config.new_tokens,
                    "case": name,
                    "density": density,
                    **result,
                    "ttft_speedup": dense_result["ttft_ms"] / result["ttft_ms"],
                    "decode_speedup": result["decode_tokens_per_s"] / dense_result["decode_tokens_per_s"],
                    "generate_speedup": dense_result["generate_ms"] / result["generate_ms"],
                }
                rows.append(row)
                gib = "—" if result["peak_bytes"] is None else f"{result['peak_bytes'] / 2**30:.1f}"
                print(
                    f"{batch:>3} {length:>7} {name:>14} {result['ttft_ms']:>9.1f} {result['generate_ms']:>9.1f} "
                    f"{result['decode_tokens_per_s']:>13.1f} {row['ttft_speedup']:>7.2f} {row['decode_speedup']:>8.2f} "
                    f"{row['generate_speedup']:>8.2f} {gib:>9}",
                    flush=True,
                )
                for kernel, (launches, micros) in (result.get("decode_step_kernels") or {}).items():
                    print(f"      per decode step: {micros:9.1f} µs {launches:6.1f}x  {kernel[:90]}", flush=True)
                del model
                path.unlink(missing_ok=True)  # the record so far: a later case that fails keeps the earlier rows
                path = write_record("generate", config, rows)
    print(f"wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
