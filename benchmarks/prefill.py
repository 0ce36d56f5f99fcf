"""End-to-end prefill (time to first token): dense cuDNN vs SeerAttention, `python -m benchmarks.prefill`.

    python -m benchmarks.prefill [--lengths 8192 32768 65536 131072] [--densities 0.5 0.3 0.1] [--layers 32]
        [--quest-weights 0]

Builds the Llama-3.1-8B architecture (its public config, embedded below: no download) with random bf16 weights and
random float32 gates, and times a jit-compiled prefill of one sequence that returns the last position's logits:
dense attention through cuDNN, and SeerAttention at each TopK density (gates, block selection, block index and
the Mosaic block-sparse kernel all included). Reports time to first token (median of `--runs` after a warm-up),
compile time, and the compiled program's device memory (arguments + outputs + temporaries, from XLA's memory
analysis). With several `--quest-weights`, one SeerAttention case per density and weight w
(`SeerConfig.quest_weight`: the gates' logits plus w × the quest source's scores, which adds the quest scores'
pooling and matmul to each layer). `--layers N` keeps the first N decoder layers: every layer costs the same, so
timings scale linearly with N and speedups do not depend on it, while compiles get shorter. Prints a table and
writes JSON under `--output-dir` with the date, commit, jax version and device.
"""

import argparse
import dataclasses
import datetime
import json
import re
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seer_jax.config import ModelConfig
from seer_jax.gate import GateConfig
from seer_jax.model import CausalLM
from seer_jax.seer import seer_from_base
from seer_jax.seer_config import SeerConfig
from seer_jax.sparsity import Selection

# meta-llama/Llama-3.1-8B config.json (the fields the model reads).
LLAMA_31_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefillBenchConfig:
    lengths: tuple[int, ...] = (8192, 32768, 65536, 131072)
    densities: tuple[float, ...] = (0.5, 0.3, 0.1)
    quest_weights: tuple[float, ...] = (0.0,)
    layers: int = 32
    runs: int = 5
    output_dir: Path = Path("benchmarks/results")
    commit: str | None = None
    seed: int = 0

    def __post_init__(self):
        if any(length <= 0 or length % 64 for length in self.lengths):
            raise ValueError(f"lengths: {self.lengths} must be positive multiples of 64")
        if any(not 0.0 < d < 1.0 for d in self.densities):
            raise ValueError(f"densities: {self.densities} must be in (0, 1)")
        if not self.quest_weights or any(not 0 <= w < float("inf") for w in self.quest_weights):
            raise ValueError(f"quest_weights: {self.quest_weights} must be one or more finite weights >= 0")
        if not 1 <= self.layers <= LLAMA_31_8B["num_hidden_layers"]:
            raise ValueError(f"layers: {self.layers} must be in [1, 32]")
        if self.runs < 1:
            raise ValueError(f"runs: {self.runs} must be >= 1")


def random_fill(model: nnx.Module, seed: int) -> None:
    """Draws every parameter on the device: N(0, 0.02²) weights, unit norm scales."""
    key = jax.random.key(seed)
    for index, (path, variable) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        shape, dtype = variable.get_value().shape, variable.get_value().dtype
        if path[-1] == "scale":
            variable.set_value(jnp.ones(shape, dtype))
        else:
            draw = jax.jit(lambda k, s=shape, d=dtype: (0.02 * jax.random.normal(k, s, jnp.float32)).astype(d))
            variable.set_value(draw(jax.random.fold_in(key, index)))


def add_run_arguments(parser: argparse.ArgumentParser, defaults) -> None:
    """The flags every end-to-end benchmark shares (--layers, --runs, --output-dir, --commit, --seed), with the
    defaults of its config dataclass `defaults`."""
    parser.add_argument("--layers", type=int, default=defaults.layers, help="decoder layers kept (of 32)")
    parser.add_argument("--runs", type=int, default=defaults.runs, help="timed runs per case (median)")
    parser.add_argument("--output-dir", type=Path, default=defaults.output_dir)
    parser.add_argument("--commit", help="git commit to record (the GPU machine has no .git)")
    parser.add_argument("--seed", type=int, default=defaults.seed)


def random_llama(layers: int, seed: int) -> CausalLM:
    """The Llama-3.1-8B architecture with its first `layers` decoder layers and random bf16 weights (`random_fill`);
    cuDNN dense attention on a GPU, XLA elsewhere."""
    model_config = ModelConfig.from_hf({**LLAMA_31_8B, "num_hidden_layers": layers})
    on_gpu = jax.default_backend() == "gpu"
    model = nnx.eval_shape(
        lambda: CausalLM(
            model_config,
            attention_implementation="cudnn" if on_gpu else "xla",
            dtype=jnp.bfloat16,
            param_dtype=jnp.bfloat16,
            rngs=nnx.Rngs(0),
        )
    )
    random_fill(model, seed)
    return model


def write_record(name: str, config, rows: list[dict]) -> Path:
    """Writes a benchmark's JSON (date, commit, jax version, device, the model, `config`, `rows`) under
    `config.output_dir` as DATE_NAME_DEVICE_COMMIT.json; `config` is a dataclass with output_dir, commit, layers."""
    now = datetime.datetime.now(datetime.UTC)
    device = jax.devices()[0].device_kind
    path = config.output_dir / (
        f"{now:%Y-%m-%d-%H%M%S}_{name}_{re.sub(r'[^A-Za-z0-9]+', '-', device)}_{config.commit or 'unknown'}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": now.isoformat(timespec="seconds"),
        "git_commit": config.commit,
        "jax_version": jax.__version__,
        "device": device,
        "model": {**LLAMA_31_8B, "num_hidden_layers": config.layers},
        "config": {**dataclasses.asdict(config), "output_dir": str(config.output_dir)},
        "rows": rows,
    }
    path.write_text(json.dumps(record, indent=1, default=lambda x: float(np.asarray(x))) + "\n")
    return path


def _time_prefill(model: nnx.Module, tokens: jax.Array, runs: int) -> dict:
    graphdef, state = nnx.split(model)

    def prefill(state, tokens):
        logits, _ = nnx.merge(graphdef, state)(tokens, last_only=True)
        return logits  # [B, 1, V]

    start = time.perf_counter()
    compiled = jax.jit(prefill).lower(state, tokens).compile()
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    device_bytes = None
    if memory is not None:
        device_bytes = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    jax.block_until_ready(compiled(state, tokens))  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, tokens))
        times.append(time.perf_counter() - start)
    return {"ttft_ms": 1e3 * statistics.median(times), "compile_s": compile_seconds, "device_bytes": device_bytes}


def main(argv: list[str] | None = None) -> Path:
    defaults = PrefillBenchConfig()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prefill", description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=defaults.lengths)
    parser.add_argument("--densities", type=float, nargs="+", default=defaults.densities)
    parser.add_argument(
        "--quest-weights",
        type=float,
        nargs="+",
        default=defaults.quest_weights,
        help="one SeerAttention case per weight: the gates' logits plus w × the quest scores (SeerConfig.quest_weight)",
    )
    add_run_arguments(parser, defaults)
    args = parser.parse_args(argv)
    config = PrefillBenchConfig(
        lengths=tuple(args.lengths),
        densities=tuple(args.densities),
        quest_weights=tuple(args.quest_weights),
        layers=args.layers,
        runs=args.runs,
        output_dir=args.output_dir,
        commit=args.commit,
        seed=args.seed,
    )
    print(config, flush=True)
    dense = random_llama(config.layers, config.seed)
    model_config = dense.config
    rows = []
    print(f"{'T':>7} {'case':>16} {'TTFT ms':>10} {'vs dense':>9} {'compile s':>10} {'device GiB':>11}", flush=True)
    for length in config.lengths:
        tokens = jax.random.randint(jax.random.key(length), (1, length), 0, model_config.vocab_size, jnp.int32)
        cases = [("dense", None, None, dense)]
        for density in config.densities:
            for weight in config.quest_weights:
                selection = Selection(method="nz_ratio", nz_ratio=density)
                seer_config = SeerConfig(gate=GateConfig(), selection=selection, quest_weight=weight)
                # The dense model's weights (shared, not copied) plus random float32 gates.
                seer = seer_from_base(dense, seer_config, rngs=nnx.Rngs(config.seed), gate_param_dtype=jnp.float32)
                cases.append((f"seer {density}" + (f" +{weight:g}q" if weight else ""), density, weight, seer))
        dense_ms = None
        for name, density, weight, model in cases:
            result = _time_prefill(model, tokens, config.runs)
            dense_ms = dense_ms or result["ttft_ms"]
            row = {
                "seq_len": length,
                "case": name,
                "nz_ratio": density,
                "quest_weight": weight,
                **result,
                "speedup": dense_ms / result["ttft_ms"],
            }
            rows.append(row)
            gib = "—" if result["device_bytes"] is None else f"{result['device_bytes'] / 2**30:.1f}"
            print(
                f"{length:>7} {name:>16} {result['ttft_ms']:>10.1f} {row['speedup']:>8.2f}x "
                f"{result['compile_s']:>10.1f} {gib:>11}",
                flush=True,
            )
            del model
    path = write_record("prefill", config, rows)
    print(f"wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
