"""The 64×64 block grid that every op of this package works on.

SeerAttention's gates score 64-token query blocks against 64-token key blocks: a selection is a bool block mask
[B, N, I, J] with I = J = ceil(T / 64), and only blocks on or below the diagonal (j ≤ i) exist causally.
"""

import jax
import jax.numpy as jnp

# Positions per block, for query and key blocks alike (SeerAttention's gate granularity).
BLOCK_SIZE = 64


def causal_block_mask(num_q_blocks: int, num_kv_blocks: int) -> jax.Array:
    """bool [I, J]: True where key block j may be attended by query block i (j <= i)."""
    rows = jnp.arange(num_q_blocks)[:, None]
    cols = jnp.arange(num_kv_blocks)[None, :]
    return cols <= rows
