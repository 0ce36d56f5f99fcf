"""Pure-jnp TopK block selection: the oracle, the CPU path and the statement of semantics of `block_topk_mask`.

For every row i of block scores [..., I, J], the k largest scores among the causal key blocks j ≤ i are kept (all
of them when the row has fewer than k), ties broken towards lower j as `lax.top_k` does (it orders floats totally:
-0.0 below +0.0). Nothing above the diagonal is ever kept.

XLA's `top_k` sorts whole rows and costs about its element count, so the rows run in bands, each over only the
columns its rows can see: rows [start, stop) have causal keys j < stop. That is the same selection for about 56%
of the work at I = J = 2048.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.blocks import causal_block_mask

_MIN_BAND_ROWS = 256  # see `row_bands`


def row_bands(num_q_blocks: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of equal length: 256 rows, or I / 8 for I > 2048 (at most 8 top_k calls). 256 rows
    were the fastest band size measured on the H200 at I = J = 2048 (BENCHMARKS.md, "TopK alone")."""
    rows = max(_MIN_BAND_ROWS, -(-num_q_blocks // 8))
    return [(start, min(start + rows, num_q_blocks)) for start in range(0, num_q_blocks, rows)]


def block_topk_mask(scores: jax.Array, k: int) -> jax.Array:
    """bool [..., I, J]: the k largest causal scores of every row of `scores` [..., I, J] (lower j wins ties)."""
    num_q_blocks, num_kv_blocks = scores.shape[-2:]
    causal = causal_block_mask(num_q_blocks, num_kv_blocks)
    masked = jnp.where(causal, scores.astype(jnp.float32), -jnp.inf)
    bands = []
    for start, stop in row_bands(num_q_blocks):
        width = min(stop, num_kv_blocks)
        band = masked[..., start:stop, :width]  # [..., rows, width]
        _, top = jax.lax.top_k(band, min(k, width))  # [..., rows, k]
        leading = jnp.indices(top.shape[:-1], sparse=True)  # broadcastable leading and row indices
        chosen = jnp.zeros(band.shape, jnp.bool_).at[(*(ix[..., None] for ix in leading), top)].set(True)
        bands.append(jnp.pad(chosen, [(0, 0)] * (chosen.ndim - 1) + [(0, num_kv_blocks - width)]))
    return jnp.concatenate(bands, axis=-2) & causal
