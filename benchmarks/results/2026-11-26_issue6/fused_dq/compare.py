"""Fused against separate dQ in the block-sparse backward (session 13), one layout per process:
`MOSAIC_GPU_DUMP_PTXAS=1 python compare.py unfused` first (it saves the reference gradients), then `... fused`.
The runs used temporary module flags (`_FUSED_DQ`, and `_DQ_HALVES` for the "fused_halves" variant, since
dropped); this copy uses the committed `fused_dq=` argument instead, same logic otherwise."""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.bench import time_ms
from pallas_kernels.block_sparse_attention import kernel_bwd_sm90 as kb
from pallas_kernels.block_sparse_attention.kernel_sm90 import block_sparse_attention_sm90
from pallas_kernels.inputs import input_key, random_block_mask, random_qkv
from pallas_kernels.shapes import BENCH_SHAPES

name = sys.argv[1]
length = 32768
for sparsity in (0.5, 0.9):
    shape = BENCH_SHAPES[0].with_seq_len(length)
    key = input_key(0)
    q, k, v = random_qkv(key, shape, jnp.bfloat16)
    mask = random_block_mask(jax.random.fold_in(key, 1), 1, shape.num_q_heads, shape.num_blocks(), sparsity=sparsity)
    d_out = jax.random.normal(jax.random.fold_in(key, 2), q.shape, q.dtype)
    scale = shape.head_dim**-0.5
    forward = jax.jit(functools.partial(block_sparse_attention_sm90, sm_scale=scale, return_lse=True))
    out, lse = forward(q, k, v, mask)
    d_lse = jnp.zeros_like(lse)
    backward = jax.jit(
        functools.partial(kb.block_sparse_attention_bwd_sm90, sm_scale=scale, fused_dq=name != "unfused")
    )
    args = (q, k, v, mask, out, lse, d_out, d_lse)
    grads = jax.block_until_ready(backward(*args))
    line = dict(
        variant=name, length=length, sparsity=sparsity, bwd_ms=round(time_ms(backward, *args, runs=20, warmup=1), 3)
    )
    for grad, label in zip(grads, ("dq", "dk", "dv"), strict=True):
        x = np.asarray(grad.astype(jnp.float32))
        path = f"/tmp/{label}_{length}_{sparsity}.npy"
        if name == "unfused":
            np.save(path, x)
        else:
            want = np.load(path)
            line[f"{label}_maxdiff"] = float(np.abs(x - want).max())
            line[f"{label}_relerr"] = float(np.linalg.norm(x - want) / np.linalg.norm(want))
        line[f"{label}_max"] = float(np.abs(x).max())
    print("RESULT " + json.dumps(line), flush=True)
