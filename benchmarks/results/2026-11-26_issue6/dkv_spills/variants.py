"""Backward-kernel variants of session 13 (register spills), one per process, with `experiment_knobs.patch` (plus a
dK/dV `stages` knob) applied: `MOSAIC_GPU_DUMP_PTXAS=1 python variants.py NAME [T]`. Tidied for ruff after the runs,
same logic."""

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

VARIANTS = {
    "base": {},
    "regs240": dict(regs=(240, 24)),
    "lse_step": dict(lse_per_step=True),
    "overlap": dict(order="overlap"),
    "overlap_lse_step": dict(order="overlap", lse_per_step=True),
}
DKV_VARIANTS = {
    "dkv_240": dict(regs=(240, 24)),
    "dkv_paired": dict(order="paired"),
    "dkv_paired_240": dict(order="paired", regs=(240, 24)),
    "dkv_stages4": dict(stages=4),
    "dkv_stages2": dict(stages=2),
    "dkv_opaque": dict(opaque=True),
    "dkv_opaque_240": dict(opaque=True, regs=(240, 24)),
    "dkv_paired_opaque": dict(order="paired", opaque=True),
    "dkv_paired_opaque_240": dict(order="paired", opaque=True, regs=(240, 24)),
}
name = sys.argv[1]
length = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
if name in DKV_VARIANTS:
    kb._DKV_OPTIONS.update(DKV_VARIANTS[name])
else:
    kb._DQ_OPTIONS.update(VARIANTS[name])
shape = BENCH_SHAPES[0].with_seq_len(length)
key = input_key(0)
q, k, v = random_qkv(key, shape, jnp.bfloat16)
mask = random_block_mask(jax.random.fold_in(key, 1), 1, shape.num_q_heads, shape.num_blocks(), sparsity=0.5)
d_out = jax.random.normal(jax.random.fold_in(key, 2), q.shape, q.dtype)
scale = shape.head_dim**-0.5
out, lse = jax.jit(lambda q, k, v, m: block_sparse_attention_sm90(q, k, v, m, sm_scale=scale, return_lse=True))(
    q, k, v, mask
)
d_lse = jnp.zeros_like(lse)
print(f"=== {name}: compiling backward", flush=True)
bwd = jax.jit(lambda *a: kb.block_sparse_attention_bwd_sm90(*a, sm_scale=scale))
args = (q, k, v, mask, out, lse, d_out, d_lse)
res = jax.block_until_ready(bwd(*args))
ms = time_ms(bwd, *args, runs=20, warmup=0)
line = dict(variant=name, length=length, bwd_ms=round(ms, 3))
for i, g in enumerate(["dq", "dk", "dv"]):
    x = np.asarray(res[i].astype(jnp.float32))
    path = f"/tmp/{g}_base_{length}.npy"
    if name == "base":
        np.save(path, x)
    else:
        line[f"{g}_maxdiff"] = float(np.abs(x - np.load(path)).max())
    line[f"{g}_max"] = float(np.abs(x).max())
if name == "base":
    attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    dense = jax.jit(lambda q, k, v, g: jax.vjp(attn, q, k, v)[1](g))
    fwd = jax.jit(attn)

    backward_ms = time_ms(dense, q, k, v, d_out, runs=20, warmup=1) - time_ms(fwd, q, k, v, runs=20, warmup=1)
    line["cudnn_bwd_ms"] = round(backward_ms, 3)
print("RESULT " + json.dumps(line), flush=True)
