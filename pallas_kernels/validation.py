"""Argument checks shared by the attention ops' public functions (shapes and dtypes only: never data)."""

import jax
import jax.numpy as jnp


def check_causal_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """q [B, T, N, H], k and v [B, S, K, H]: same dtype (floating), N a multiple of K, T == S (causal, square)."""
    for name, array in (("q", q), ("k", k), ("v", v)):
        if array.ndim != 4:
            raise ValueError(f"{name} must have rank 4 ([B, T, N, H] / [B, S, K, H]), got shape {array.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, S, K, H], got {k.shape} and {v.shape}")
    batch, num_queries, num_q_heads, head_dim = q.shape
    _, num_keys, num_kv_heads, _ = k.shape
    sizes = {"batch": batch, "num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
    empty = [name for name, size in sizes.items() if size == 0]
    if empty:  # else `H ** -0.5` or `N % K` divides by zero
        raise ValueError(f"{', '.join(empty)} must be at least 1, got q {q.shape} and k/v {k.shape}")
    if k.shape[0] != batch:
        raise ValueError(f"q and k/v must have the same batch size, got {batch} and {k.shape[0]}")
    if k.shape[3] != head_dim:
        raise ValueError(f"q and k/v must have the same head_dim, got {head_dim} and {k.shape[3]}")
    if num_queries != num_keys:
        raise ValueError(f"causal attention needs T == S (q and k/v lengths), got T={num_queries} and S={num_keys}")
    if num_queries == 0:
        raise ValueError("sequence length must be at least 1, got 0")
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"the number of query heads must be a multiple of the number of kv heads (GQA), "
            f"got num_q_heads={num_q_heads} and num_kv_heads={num_kv_heads}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q, k and v must be floating point, got {q.dtype}")


def default_sm_scale(sm_scale: float | None, head_dim: int) -> float:
    """The softmax scale as a Python float: `head_dim ** -0.5` when None, else `sm_scale` (must be > 0)."""
    if sm_scale is None:
        return head_dim**-0.5
    if isinstance(sm_scale, jax.core.Tracer):
        raise ValueError("sm_scale must be a Python number, not a traced value (it is a compile-time constant)")
    if not sm_scale > 0:
        raise ValueError(f"sm_scale must be positive, got {sm_scale}")
    return float(sm_scale)


def is_concrete(*arrays: jax.Array) -> bool:
    """True when none of `arrays` is traced, i.e. their values can be checked on the host."""
    return not any(isinstance(array, jax.core.Tracer) for array in arrays)
