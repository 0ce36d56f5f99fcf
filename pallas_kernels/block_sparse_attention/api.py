"""Public `block_sparse_attention`: argument checks, dispatch, and the custom VJP.

Forward: the Mosaic GPU kernel (`kernel_sm90`) or the reference (see `pallas_kernels.dispatch`). Backward
(`jax.custom_vjp`), from the forward's saved (q, k, v, block mask, out, lse): the Mosaic GPU kernels
(`kernel_bwd_sm90`) or `reference.block_sparse_attention_bwd`, chosen by the same dispatch policy as the forward.

Every implementation takes the selection as a bool block mask [B, N, I, J]; a `BlockIndex` is turned into one
here, once. A mask from `seer_jax` thus goes straight to the kernels' tile schedules, with no mask → index → mask
round trip. Nothing is padded here: each kernel's wrapper pads T to its own tiles (`pallas_kernels.sm90.schedule`).
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.block_sparse_attention import kernel_bwd_sm90, kernel_sm90, reference
from pallas_kernels.block_sparse_attention.index import (
    BLOCK_SIZE,
    BlockIndex,
    block_mask_from_index,
    check_block_index,
)
from pallas_kernels.validation import check_causal_qkv, default_sm_scale

_OP_NAME = "block_sparse_attention"


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_mask: jax.Array | None = None,
    index: BlockIndex | None = None,
    sm_scale: float | None = None,
    return_lse: bool = False,
    implementation: dispatch.Implementation | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Causal attention that computes only the selected 64×64 blocks (SeerAttention's sparse prefill).

    Args:
      q: [B, T, N, H] queries.
      k, v: [B, S, K, H] keys and values, same dtype as q, S == T, N a multiple of K (GQA: query head n reads
        kv head n // (N / K); K/V are never repeated).
      block_mask: bool [B, N, I, J] with I = J = ceil(T / 64): True where query block i of head n attends key
        block j. Entries above the diagonal (j > i) are ignored.
      index: the same selection as a `BlockIndex` (pass exactly one of block_mask and index). Checked against
        its contract (ranges, order, padding) when concrete, not when traced; converted to a mask.
      sm_scale: softmax scale, a Python float; `H ** -0.5` when None.
      return_lse: also return the logsumexp.
      implementation: None (auto), "mosaic" or "reference"; see `pallas_kernels.dispatch`.

    Returns:
      out: [B, T, N, H] in q.dtype. Causal masking applies inside diagonal blocks; blocks above the diagonal are
        never computed. Rows of a query block with no selected block are 0 (never NaN).
      lse (only when `return_lse`): float32 [B, N, T], natural-log logsumexp over each row's selected keys;
        -inf on rows with no selected block.

    Differentiable in q, k, v (custom VJP, same block structure as the forward, lse cotangent included).
    """
    scale = _check_args(q, k, v, block_mask=block_mask, index=index, sm_scale=sm_scale, implementation=implementation)
    return _attention(q, k, v, _as_mask(block_mask if index is None else index), scale, return_lse, implementation)


def block_sparse_attention_implementation(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_mask: jax.Array | None = None,
    index: BlockIndex | None = None,
    sm_scale: float | None = None,
    return_lse: bool = False,
    implementation: dispatch.Implementation | None = None,
) -> dispatch.Implementation:
    """Name of the implementation ("mosaic" or "reference") that `block_sparse_attention`'s forward runs here.

    Traces the dispatch abstractly (`jax.eval_shape`): nothing is computed. Accepts arrays or
    `jax.ShapeDtypeStruct`s; raises as the op would (bad arguments, or an explicit "mosaic" the kernel declines).
    The backward follows the same policy.
    """
    scale = _check_args(q, k, v, block_mask=block_mask, index=index, sm_scale=sm_scale, implementation=implementation)
    selection = block_mask if index is None else index
    return dispatch.traced_choice(
        lambda q, k, v, selection: _forward(q, k, v, _as_mask(selection), scale, return_lse, implementation),
        q,
        k,
        v,
        selection,
    )


def _check_args(q, k, v, *, block_mask, index, sm_scale, implementation) -> float:
    check_causal_qkv(q, k, v)
    dispatch.check_implementation(implementation)
    batch, num_queries, num_q_heads, _ = q.shape
    num_blocks = -(-num_queries // BLOCK_SIZE)
    if (block_mask is None) == (index is None):
        raise ValueError("pass exactly one of block_mask and index")
    if block_mask is not None:
        expected = (batch, num_q_heads, num_blocks, num_blocks)
        if block_mask.shape != expected or block_mask.dtype != jnp.bool_:
            raise ValueError(
                f"block_mask must be bool [B, N, I, J] = {expected} (blocks of {BLOCK_SIZE}), "
                f"got {block_mask.dtype} {tuple(block_mask.shape)}"
            )
    else:
        check_block_index(index, batch=batch, num_q_heads=num_q_heads, num_blocks=num_blocks)
    return default_sm_scale(sm_scale, q.shape[-1])


def _as_mask(selection: jax.Array | BlockIndex) -> jax.Array:
    """The selection as the bool [B, N, I, J] mask every implementation takes."""
    return block_mask_from_index(selection) if isinstance(selection, BlockIndex) else selection


def _forward(q, k, v, block_mask, sm_scale, return_lse, implementation):
    """(name of the implementation that ran, out or (out, lse))."""

    def mosaic():
        return kernel_sm90.block_sparse_attention_sm90(q, k, v, block_mask, sm_scale=sm_scale, return_lse=return_lse)

    def jnp_reference():
        out, lse = reference.block_sparse_attention(q, k, v, block_mask, sm_scale=sm_scale)
        return (out, lse) if return_lse else out

    return dispatch.run(_OP_NAME, implementation, mosaic=mosaic, reference=jnp_reference)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention_vjp(q, k, v, block_mask, sm_scale, return_lse, implementation):
    return _forward(q, k, v, block_mask, sm_scale, return_lse, implementation)[1]


def _attention_fwd(q, k, v, block_mask, sm_scale, return_lse, implementation):
    out, lse = _forward(q, k, v, block_mask, sm_scale, True, implementation)[1]
    return ((out, lse) if return_lse else out), (q, k, v, block_mask, out, lse)


def _attention_bwd(sm_scale, return_lse, implementation, residuals, cotangents):
    q, k, v, block_mask, out, lse = residuals
    d_out, d_lse = cotangents if return_lse else (cotangents, jnp.zeros_like(lse))
    tensors = (out, lse, d_out, d_lse)

    def mosaic():
        return kernel_bwd_sm90.block_sparse_attention_bwd_sm90(q, k, v, block_mask, *tensors, sm_scale=sm_scale)

    def jnp_reference():
        return reference.block_sparse_attention_bwd(q, k, v, block_mask, *tensors, sm_scale=sm_scale)

    _, (dq, dk, dv) = dispatch.run(_OP_NAME + " backward", implementation, mosaic=mosaic, reference=jnp_reference)
    return dq, dk, dv, None  # the block mask is boolean: no cotangent


_attention_vjp.defvjp(_attention_fwd, _attention_bwd)
_attention = jax.jit(_attention_vjp, static_argnums=(4, 5, 6))
