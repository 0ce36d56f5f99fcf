"""The Triton TopK kernel's configurations against the banded-top_k reference (session 13; tidied for ruff after
the run, same logic). Run from the repository root: `python benchmarks/results/2026-11-26_issue6/topk_configs.py`."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.bench import time_ms
from pallas_kernels.block_topk import reference
from pallas_kernels.block_topk.kernel_triton import Config, topk_mask_triton
from seer_jax.sparsity import topk_per_row

CONFIGS = [(1, 4), (2, 4), (2, 8), (4, 8), (8, 8), (4, 16), (8, 16)]  # (rows per program, warps)

for width, nz_ratio in [(2048, 0.1), (2048, 0.5), (512, 0.3)]:
    k = topk_per_row(nz_ratio, width)
    scores = jax.random.normal(jax.random.PRNGKey(0), (1, 32, width, width), jnp.bfloat16)
    banded = jax.jit(functools.partial(reference.block_topk_mask, k=k))
    result = dict(J=width, k=k, reference_ms=round(time_ms(banded, scores, runs=20, warmup=1), 3))
    expected = np.asarray(banded(scores))
    for rows, warps in CONFIGS:
        if rows * width > 32768:
            continue
        config = Config(rows_per_program=rows, num_warps=warps)
        kernel = jax.jit(functools.partial(topk_mask_triton, k=k, config=config))
        same = bool((np.asarray(kernel(scores)) == expected).all())
        result[f"r{rows}w{warps}"] = (round(time_ms(kernel, scores, runs=20, warmup=1), 3), same)
    print("TOPK " + json.dumps(result), flush=True)
