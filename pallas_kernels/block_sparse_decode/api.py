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
    starts: jax.Array | None = None,
    block_size: int = 64,
    sm_scale: float | None = None,
    return_lse: bool = False,
    implementation: dispatch.Implementation | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Decode attention of the newest token(s) of each row over the selected key blocks of its KV cache.

    Positions and slots: row b's valid tokens are its positions 0 … lengths[b] − 1, and position p lives at cache
    slot starts[b] + p. A right-aligned cache (every row's tokens from slot 0) has starts = 0, the default. A
    left-padded cache (`seer_jax.kv_cache.KVCache`: all rows share one write position W, row b's P_b padding slots
    first, its real tokens in slots [P_b, W)) maps with starts = P_b and lengths = W − P_b (the real-token count,
    `key_mask.sum(-1)`), and blocks numbered in the row's own tokens (block j = its real tokens j·64 … j·64 + 63,
    as `seer_jax.decode_selection` numbers them): no realignment of the cache is needed.

    Args:
      q: [B, N, H] one query token per row, or [B, T, N, H] with 1 ≤ T ≤ 8 (draft tokens): query t of row b sits
        at position lengths[b] − T + t and attends the selected keys at positions ≤ its own.
      k_cache, v_cache: [B, S, K, H] (keys already rotated), same dtype as q; N a multiple of K (query head n
        reads kv head n // (N / K); the G = N / K heads of a group share the selection and every K/V tile loaded).
        Every value must be finite: keys that are read but masked (the rest of a row's last selected block) are
        weighted by 0.
      lengths: int32 [B], in [0, S − starts[b]]: valid positions per row, the T new tokens included. Keys at
        positions ≥ lengths[b] are never attended.
      block_index: int32 [B, K, M]: per (row, kv head), the selected key-block ids (block j covers positions
        j·block_size … (j+1)·block_size − 1, i.e. slots starts[b] + j·block_size …) in slots 0 … block_count − 1:
        distinct, in [0, ceil(S / block_size)), any order; slots ≥ block_count are padding and never read (any
        value, −1 by convention).
      block_count: int32 [B, K], in [0, M]: valid slots per (row, kv head); 0 selects nothing.
        Checked against this contract when concrete (`reference.check_decode_index`), not when traced.
      starts: int32 [B] or None (all 0): the cache slot of each row's position 0, with starts[b] ≥ 0 and
        starts[b] + lengths[b] ≤ S (checked when concrete, like lengths).
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
    scale = _check_args(
        q, k_cache, v_cache, lengths, block_index, block_count, starts, block_size, sm_scale, implementation
    )
    starts = jnp.zeros_like(lengths) if starts is None else starts
    return _decode(
        q, k_cache, v_cache, lengths, block_index, block_count, starts, block_size, scale, return_lse, implementation
    )


def block_sparse_decode_implementation(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    block_index: jax.Array,
    block_count: jax.Array,
    *,
    starts: jax.Array | None = None,
    block_size: int = 64,
    sm_scale: float | None = None,
    return_lse: bool = False,
    implementation: dispatch.Implementation | None = None,
) -> dispatch.Implementation:
    """Name of the implementation ("mosaic" or "reference") that `block_sparse_decode` runs for these arguments.

    Traces the dispatch abstractly (`jax.eval_shape`): nothing is computed. Accepts arrays or
    `jax.ShapeDtypeStruct`s; raises as the op would (bad arguments, or an explicit "mosaic" the kernel declines).
    """
    scale = _check_args(
        q, k_cache, v_cache, lengths, block_index, block_count, starts, block_size, sm_scale, implementation
    )
    starts = jax.ShapeDtypeStruct(lengths.shape, jnp.int32) if starts is None else starts

    def dispatch_fn(*arrays):
        return _dispatch(*arrays, block_size, scale, return_lse, implementation)

    return dispatch.traced_choice(dispatch_fn, q, k_cache, v_cache, lengths, block_index, block_count, starts)


def _check_args(
    q, k_cache, v_cache, lengths, block_index, block_count, starts, block_size, sm_scale, implementation
):  # fmt: skip
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
    if starts is not None and (starts.shape != (batch,) or starts.dtype != jnp.int32):
        raise ValueError(f"starts must be int32 [B] = ({batch},), got {starts.dtype} {tuple(starts.shape)}")
    arrays = (lengths, block_index, block_count) + (() if starts is None else (starts,))
    if all(isinstance(array, jax.Array) for array in arrays) and is_concrete(*arrays):
        lengths_min, lengths_max = int(np.asarray(lengths).min()), int(np.asarray(lengths).max())
        if lengths_min < 0 or lengths_max > cache_len:
            raise ValueError(f"lengths must be in [0, S = {cache_len}], got values in [{lengths_min}, {lengths_max}]")
        if starts is not None:
            starts_min, ends_max = int(np.asarray(starts).min()), int((np.asarray(starts) + np.asarray(lengths)).max())
            if starts_min < 0 or ends_max > cache_len:
                raise ValueError(
                    f"starts must be >= 0 with starts + lengths <= S = {cache_len}, got min start {starts_min}, "
                    f"max end {ends_max}"
                )
        reference.check_decode_index(block_index, block_count, num_kv_blocks=-(-cache_len // block_size))
    return default_sm_scale(sm_scale, head_dim)


def _dispatch(
    q, k_cache, v_cache, lengths, block_index, block_count, starts, block_size, sm_scale, return_lse, implementation
):  # fmt: skip
    """(name of the implementation that ran, out or (out, lse)), out in q's layout."""
    queries = q if q.ndim == 4 else q[:, None]  # [B, T, N, H]
    args = (queries, k_cache, v_cache, lengths, block_index, block_count)

    def mosaic():
        return kernel_sm90.block_sparse_decode_sm90(*args, starts=starts, block_size=block_size, sm_scale=sm_scale)

    def jnp_reference():
        return reference.block_sparse_decode(*args, starts=starts, block_size=block_size, sm_scale=sm_scale)

    chosen, (out, lse) = dispatch.run(_OP_NAME, implementation, mosaic=mosaic, reference=jnp_reference)
    if q.ndim == 3:
        out, lse = out[:, 0], lse[..., 0]  # [B, N, H], [B, N]
    return chosen, ((out, lse) if return_lse else out)


@functools.partial(jax.jit, static_argnums=(7, 8, 9, 10))
def _decode(
    q, k_cache, v_cache, lengths, block_index, block_count, starts, block_size, sm_scale, return_lse, implementation
):  # fmt: skip
    return _dispatch(
        q, k_cache, v_cache, lengths, block_index, block_count, starts, block_size, sm_scale, return_lse,
        implementation,
    )[1]  # fmt: skip
