"""The gate path's cost against dense attention, one Llama-3.1-8B layer: `python -m benchmarks.gate_path`.

    python -m benchmarks.gate_path [--lengths 32768 131072] [--nz-ratio 0.1] [--runs 10] [--commit C] [--output-dir DIR]

Times, on one sequence with the layer shapes of Llama-3.1-8B (32 query heads, 8 kv heads, head_dim 128, bf16 q/k/v,
a float32 gate of hidden size 128 with random weights), each jit-compiled on its own and then all together:
  gate       pooling (avg of q, max|min|avg of k per 64-token block), projections, block RoPE, scores, causal mask
  select     TopK at `--nz-ratio` (diagonal kept) on the gate's logits
  schedule   the block-sparse kernel's tile schedule from the mask (`sm90.schedule.tile_schedule`; the model hands
             the kernel its mask, so this is all the index building there is)
  gate path  all three in one program: what SeerAttention adds before the block-sparse kernel
against cuDNN dense causal attention (`jax.nn.dot_product_attention(..., implementation="cudnn")`) on the same
q/k/v, measured in the same run. Median of `--runs` after warm-up; fresh random inputs. Prints a table and writes JSON.
"""

import argparse
import datetime
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.prefill import LLAMA_31_8B
from pallas_kernels.bench import time_ms
from pallas_kernels.sm90.schedule import tile_schedule
from seer_jax.config import ModelConfig
from seer_jax.gate import AttnGate, GateConfig
from seer_jax.sparsity import Selection, select_blocks


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072], help="sequence lengths")
    parser.add_argument("--nz-ratio", type=float, default=0.1, help="TopK density of the selection")
    parser.add_argument("--runs", type=int, default=10, help="timed calls per measurement")
    parser.add_argument("--commit", help="git commit to record (the GPU machine's .git is not this tree's)")
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"), help="where the JSON goes")
    args = parser.parse_args(argv)

    config = ModelConfig.from_hf(LLAMA_31_8B)
    gate = AttnGate(config, GateConfig(hidden_size=128), param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    selection = Selection(method="nz_ratio", nz_ratio=args.nz_ratio)
    graphdef, gate_state = nnx.split(gate)

    def gate_logits(state, q, k):
        return nnx.merge(graphdef, state)(q, k)  # [B, N, I, J]

    def gate_path(state, q, k):
        return tile_schedule(select_blocks(gate_logits(state, q, k), selection))

    implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"  # xla: a CPU smoke run

    def dense(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)  # [B, T, N, H]

    rows = []
    print("| T | cuDNN dense | gate | select | schedule | gate path | gate path / dense |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for length in args.lengths:
        keys = jax.random.split(jax.random.key(length), 3)
        q = jax.random.normal(keys[0], (1, length, config.num_q_heads, config.head_dim), jnp.bfloat16)
        k = jax.random.normal(keys[1], (1, length, config.num_kv_heads, config.head_dim), jnp.bfloat16)
        v = jax.random.normal(keys[2], (1, length, config.num_kv_heads, config.head_dim), jnp.bfloat16)
        logits = jax.jit(gate_logits)(gate_state, q, k)
        block_mask = jax.jit(select_blocks, static_argnums=1)(logits, selection)
        timing = {
            "dense_ms": time_ms(jax.jit(dense), q, k, v, runs=args.runs, warmup=2),
            "gate_ms": time_ms(jax.jit(gate_logits), gate_state, q, k, runs=args.runs, warmup=2),
            "select_ms": time_ms(jax.jit(select_blocks, static_argnums=1), logits, selection, runs=args.runs, warmup=2),
            "schedule_ms": time_ms(jax.jit(tile_schedule), block_mask, runs=args.runs, warmup=2),
            "gate_path_ms": time_ms(jax.jit(gate_path), gate_state, q, k, runs=args.runs, warmup=2),
        }
        row = {"length": length, **timing, "ratio": timing["gate_path_ms"] / timing["dense_ms"]}
        rows.append(row)
        print(
            f"| {length} | {row['dense_ms']:.2f} ms | {row['gate_ms']:.2f} ms | {row['select_ms']:.2f} ms | "
            f"{row['schedule_ms']:.2f} ms | {row['gate_path_ms']:.2f} ms | {100 * row['ratio']:.1f}% |"
        )

    now = datetime.datetime.now(datetime.UTC)
    payload = {
        "date": now.isoformat(timespec="seconds"),
        "git_commit": args.commit,
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "nz_ratio": args.nz_ratio,
        "rows": rows,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"{now:%Y-%m-%d-%H%M%S}_gate_path.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
