"""Random inputs shared by the kernel tests and `pallas_kernels.bench`: q/k/v and block masks. Never zeros."""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.blocks import causal_block_mask
from pallas_kernels.shapes import AttentionShape

# Standard deviation of the scaled scores q·k·H^-0.5 for `random_qkv`'s q and k. Around 2.5 a row's largest
# probability is typically 0.1–0.5 at a few thousand keys: peaky like a trained model's attention, so the pooled
# map is far from uniform, yet not one-hot.
SCORE_STD = 2.5

# Test patterns for `pattern_block_mask`.
BLOCK_PATTERNS = ("dense", "half", "sparse90", "diagonal", "empty_rows")


def input_key(seed: int) -> jax.Array:
    """PRNG key for test and benchmark inputs. XLA's RngBitGenerator ("rbg") compiles in a fraction of a second
    where the default threefry takes seconds per shape on CPU; its statistical quality is ample for inputs."""
    return jax.random.key(seed, impl="rbg")


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def random_qkv(key: jax.Array, shape: AttentionShape, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normal q [B, T, N, H], k and v [B, T, K, H] in `dtype`; q and k scaled so the scores have std SCORE_STD."""
    q_key, k_key, v_key = jax.random.split(key, 3)
    qk_std = SCORE_STD**0.5
    q = qk_std * jax.random.normal(q_key, shape.q_shape, jnp.float32)
    k = qk_std * jax.random.normal(k_key, shape.kv_shape, jnp.float32)
    v = jax.random.normal(v_key, shape.kv_shape, jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3), static_argnames=("sparsity", "keep_diagonal"))
def random_block_mask(
    key: jax.Array, batch: int, num_q_heads: int, num_blocks: int, *, sparsity: float, keep_diagonal: bool = True
) -> jax.Array:
    """bool [B, N, I, I]: each causal block kept with probability 1 − sparsity, independently per (b, n, i, j).

    This is the SeerAttention benchmark's random mask (per-row masks that keep the diagonal); the achieved
    density (`causal_density`) is close to 1 − sparsity, a little above it because of the forced diagonal.
    """
    keep = jax.random.uniform(key, (batch, num_q_heads, num_blocks, num_blocks)) >= sparsity  # [B, N, I, J]
    if keep_diagonal:
        keep = keep | jnp.eye(num_blocks, dtype=bool)
    return keep & causal_block_mask(num_blocks, num_blocks)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def pattern_block_mask(key: jax.Array, pattern: str, batch: int, num_q_heads: int, num_blocks: int) -> jax.Array:
    """bool [B, N, I, I] for one of `BLOCK_PATTERNS`.

    dense: every causal block. half / sparse90: `random_block_mask` at sparsity 0.5 / 0.9. diagonal: the diagonal
    only. empty_rows: half of the rows (b, n, i) select nothing; the others keep random causal blocks, the diagonal
    not forced.
    """
    shape = (batch, num_q_heads, num_blocks, num_blocks)
    causal = causal_block_mask(num_blocks, num_blocks)
    if pattern == "dense":
        return jnp.broadcast_to(causal, shape)
    if pattern == "half":
        return random_block_mask(key, batch, num_q_heads, num_blocks, sparsity=0.5)
    if pattern == "sparse90":
        return random_block_mask(key, batch, num_q_heads, num_blocks, sparsity=0.9)
    if pattern == "diagonal":
        return jnp.broadcast_to(jnp.eye(num_blocks, dtype=bool), shape)
    if pattern == "empty_rows":
        blocks_key, rows_key = jax.random.split(key)
        mask = random_block_mask(blocks_key, batch, num_q_heads, num_blocks, sparsity=0.5, keep_diagonal=False)
        nonempty_rows = jax.random.bernoulli(rows_key, 0.5, shape[:3])  # [B, N, I]
        return mask & nonempty_rows[..., None]
    raise ValueError(f"pattern must be one of {BLOCK_PATTERNS}, got {pattern!r}")


def causal_density(block_mask: jax.Array) -> float:
    """Fraction of the causal blocks (j ≤ i) that `block_mask` [B, N, I, I] keeps."""
    batch, num_q_heads, num_blocks, _ = block_mask.shape
    kept = jnp.sum(block_mask & causal_block_mask(num_blocks, num_blocks))
    return float(kept) / (batch * num_q_heads * num_blocks * (num_blocks + 1) / 2)
