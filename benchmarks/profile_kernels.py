"""Runs one attention case a few times, for a profiler: `ncu ... python -m benchmarks.profile_kernels --case sparse`.

Cases (Llama-3.1-8B attention, B=1, N=32, K=8, H=128, bf16, causal, the inputs of `pallas_kernels.bench`):
  dense     cuDNN `jax.nn.dot_product_attention`.
  sparse    `block_sparse_attention` at `--sparsity` (random per-row block mask keeping the diagonal).
  backward  forward + backward of `block_sparse_attention` at `--sparsity` (`jax.vjp`, random cotangent).
  pooling   `attention_with_pooling`.
Everything is compiled and run once before the `--runs` profiled calls, so a profiler can skip the first launch
of each kernel (e.g. `ncu --launch-skip 1 --kernel-name regex:body`). The Mosaic kernels are named after their
body functions, which is `body` for all of ours.

Example, 32k at sparsity 0.9 (the figures in BENCHMARKS.md came from this):
  ncu --kernel-name regex:body --launch-skip 1 --launch-count 1 --section SpeedOfLight \\
      --section MemoryWorkloadAnalysis --section WarpStateStats \\
      python -m benchmarks.profile_kernels --case sparse --sparsity 0.9 --length 32768
"""

import argparse

import jax
import jax.numpy as jnp

from pallas_kernels.attention_with_pooling import attention_with_pooling
from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.inputs import input_key, random_block_mask, random_qkv
from pallas_kernels.shapes import BENCH_SHAPES

CASES = ("dense", "sparse", "backward", "pooling")


def case_function(case: str, length: int, sparsity: float, seed: int = 0):
    """(jitted function, its arguments) for one case at one length."""
    shape = BENCH_SHAPES[0].with_seq_len(length)
    key = input_key(seed)
    q, k, v = random_qkv(key, shape, jnp.bfloat16)
    if case == "dense":
        return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)), (q, k, v)
    if case == "pooling":
        return jax.jit(lambda q, k, v: attention_with_pooling(q, k, v)), (q, k, v)
    mask = random_block_mask(jax.random.fold_in(key, 1), 1, shape.num_q_heads, shape.num_blocks(), sparsity=sparsity)

    def sparse(q, k, v, mask):
        return block_sparse_attention(q, k, v, block_mask=mask)

    if case == "sparse":
        return jax.jit(sparse), (q, k, v, mask)
    if case == "backward":
        d_out = jax.random.normal(jax.random.fold_in(key, 2), q.shape, q.dtype)

        def forward_backward(q, k, v, mask, d_out):
            _, vjp = jax.vjp(lambda q, k, v: sparse(q, k, v, mask), q, k, v)
            return vjp(d_out)

        return jax.jit(forward_backward), (q, k, v, mask, d_out)
    raise ValueError(f"case must be one of {CASES}, got {case!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES, default="sparse")
    parser.add_argument("--length", type=int, default=32768, help="sequence length T")
    parser.add_argument("--sparsity", type=float, default=0.9, help="block sparsity of the sparse cases")
    parser.add_argument("--runs", type=int, default=2, help="calls after the first (compiling) one")
    args = parser.parse_args(argv)
    fn, inputs = case_function(args.case, args.length, args.sparsity)
    for _ in range(1 + args.runs):
        jax.block_until_ready(fn(*inputs))


if __name__ == "__main__":
    main()
