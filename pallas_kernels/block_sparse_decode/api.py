"""Public `block_sparse_decode`: argument checks, dispatch (see `pallas_kernels.dispatch`) and the output layout.

The contract of the inputs and the semantics are stated in `reference` (module docstring, `check_decode_index`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch
from pallas_kernels.block_sparse_decode import kernel_sm90, reference
from pallas_kernels.validation import default_sm_scale, is_concrete

_OP_NAME = "block_sparse_decode"
MAX_QUERIES = 8  # draft tokens per row (speculative decoding)


def block_sparse_decode(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    block_index: jax.Array,
    block_count: jax.Array,
    *,
    block_size: int = 64,
    sm_scale: float | None = None,
    return_lse: bool = False,
    implementation: dispatch.Implementation | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Decode attention of the newest token(s) of each row over the selected key blocks of its KV cache.

    Args:
      q: [B, N, H] one query token per row, or [B, T, N, H] with 1 ≤ T ≤ 8 (draft tokens): query t of row b sits
        at position lengths[b] − T + t and attends the selected keys at positions ≤ its own.
      k_cache, v_cache: [B, S, K, H] (keys already rotated), same dtype as q; N a multiple of K (query head n
        reads kv head n // (N / K); the G = N / K heads of a group share the selection and every K/V tile loaded).
      lengths: int32 [B], in [0, S]: valid cache positions per row, the T new tokens included. Keys at positions
        ≥ lengths[b] are never attended.
      block_index: int32 [B, K, M]: per (row, kv head), the selected key-block ids (block j covers positions
        j·block_size … (j+1)·block_size − 1) in slots 0 … block_count − 1: distinct, in [0, ceil(S / block_size)),
        any order; slots ≥ block_count are padding and never read (any value, −1 by convention).
      block_count: int32 [B, K], in [0, M]: valid slots per (row, kv head); 0 selects nothing.
        Checked against this contract when concrete (`reference.check_decode_index`), not when traced.
      block_size: positions per block, a Python int (the kernel supports 64; the reference any size).
      sm_scale: softmax scale, a Python float; `H ** -0.5` when None.
      return_lse: also return the logsumexp.
      implementation: None (auto), "mosaic" or "reference"; see `pallas_kernels.dispatch`.

    Returns:
      out: same shape as q, in q.dtype. A query that attends no key (nothing selected, or no selected position at
        or before its own) gives 0, never NaN. The partial block holding position lengths[b] − 1 is attended only
        if selected; its positions past a query's own are masked.
      lse (only when `return_lse`): float32 [B, N] (or [B, N, T] for 4-D q), natural-log logsumexp of the scaled
        scores over the attended keys; −inf where nothing is attended.
    """
    scale = _check_args(q, k_cache, v_cache, lengths, block_index, block_count, block_size, sm_scale, implementation)
    return _decode(
        q, k_cache, v_cache, lengths, block_index, block_count, block_size, scale, return_lse, implementation
    )


def block_sparse_decode_implementation(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    block_index: jax.Array,
    block_count: jax.Array,
    *,
    block_size: int = 64,
    sm_scale: float | None = None,
    return_lse: bool = False,
    implementation: dispatch.Implementation | None = None,
) -> dispatch.Implementation:
    """Name of the implementation ("mosaic" or "reference") that `block_sparse_decode` runs for these arguments.

    Traces the dispatch abstractly (`jax.eval_shape`): nothing is computed. Accepts arrays or
    `jax.ShapeDtypeStruct`s; raises as the op would (bad arguments, or an explicit "mosaic" the kernel declines).
    """
    scale = _check_args(q, k_cache, v_cache, lengths, block_index, block_count, block_size, sm_scale, implementation)

    def dispatch_fn(*arrays):
        return _dispatch(*arrays, block_size, scale, return_lse, implementation)

    return dispatch.traced_choice(dispatch_fn, q, k_cache, v_cache, lengths, block_index, block_count)


def _check_args(q, k_cache, v_cache, lengths, block_index, block_count, block_size, sm_scale, implementation):
    dispatch.check_implementation(implementation)
    if q.ndim not in (3, 4):
        raise ValueError(f"q must be [B, N, H] or [B, T, N, H], got shape {q.shape}")
    batch, num_q_heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    num_queries = q.shape[1] if q.ndim == 4 else 1
    if not 1 <= num_queries <= MAX_QUERIES:
        raise ValueError(f"T (query tokens per row) must be in [1, {MAX_QUERIES}], got {num_queries}")
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must be [B, S, K, H] of one shape, got {k_cache.shape}, {v_cache.shape}")
    cache_batch, cache_len, num_kv_heads, cache_head_dim = k_cache.shape
    if (cache_batch, cache_head_dim) != (batch, head_dim):
        raise ValueError(f"q {q.shape} and the caches {k_cache.shape} disagree on B or H")
    if cache_len == 0:
        raise ValueError("the caches must have at least one position (S >= 1)")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if not q.dtype == k_cache.dtype == v_cache.dtype or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q and the caches must share one floating dtype, got {q.dtype}, {k_cache.dtype}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if lengths.shape != (batch,) or lengths.dtype != jnp.int32:
        raise ValueError(f"lengths must be int32 [B] = ({batch},), got {lengths.dtype} {tuple(lengths.shape)}")
    if block_index.ndim != 3 or block_index.shape[:2] != (batch, num_kv_heads) or block_index.shape[2] < 1:
        raise ValueError(f"block_index must be [B, K, M] = ({batch}, {num_kv_heads}, M ≥ 1), got {block_index.shape}")
    if block_count.shape != (batch, num_kv_heads):
        raise ValueError(f"block_count must be [B, K] = ({batch}, {num_kv_heads}), got {block_count.shape}")
    if block_index.dtype != jnp.int32 or block_count.dtype != jnp.int32:
        raise ValueError(f"block_index and block_count must be int32, got {block_index.dtype}, {block_count.dtype}")
    arrays = (lengths, block_index, block_count)
    if all(isinstance(array, jax.Array) for array in arrays) and is_concrete(*arrays):
        lengths_min, lengths_max = int(np.asarray(lengths).min()), int(np.asarray(lengths).max())
        if lengths_min < 0 or lengths_max > cache_len:
            raise ValueError(f"lengths must be in [0, S = {cache_len}], got values in [{lengths_min}, {lengths_max}]")
        reference.check_decode_index(block_index, block_count, num_kv_blocks=-(-cache_len // block_size))
    return default_sm_scale(sm_scale, head_dim)


def _dispatch(q, k_cache, v_cache, lengths, block_index, block_count, block_size, sm_scale, return_lse, implementation):
    """(name of the implementation that ran, out or (out, lse)), out in q's layout."""
    queries = q if q.ndim == 4 else q[:, None]  # [B, T, N, H]
    args = (queries, k_cache, v_cache, lengths, block_index, block_count)

    def mosaic():
        return kernel_sm90.block_sparse_decode_sm90(*args, block_size=block_size, sm_scale=sm_scale)

    def jnp_reference():
        return reference.block_sparse_decode(*args, block_size=block_size, sm_scale=sm_scale)

    chosen, (out, lse) = dispatch.run(_OP_NAME, implementation, mosaic=mosaic, reference=jnp_reference)
    if q.ndim == 3:
        out, lse = out[:, 0], lse[..., 0]  # [B, N, H], [B, N]
    return chosen, ((out, lse) if return_lse else out)


@functools.partial(jax.jit, static_argnums=(6, 7, 8, 9))
def _decode(q, k_cache, v_cache, lengths, block_index, block_count, block_size, sm_scale, return_lse, implementation):
    return _dispatch(
        q, k_cache, v_cache, lengths, block_index, block_count, block_size, sm_scale, return_lse, implementation
    )[1]
