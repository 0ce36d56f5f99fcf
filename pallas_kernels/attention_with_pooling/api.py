"""Public `attention_with_pooling`: argument checks and dispatch between the Mosaic GPU kernel and the reference.

The inputs reach the kernel unpadded: padding T up to a multiple of the block would add padded query rows to the
last block's pooled maximum, so the kernel itself must exclude rows t ≥ T of a partial last block (or raise
`NotImplementedError` so that auto-dispatch uses the reference).
"""

import functools

import jax

from pallas_kernels import dispatch
from pallas_kernels.attention_with_pooling import kernel_sm90, reference
from pallas_kernels.validation import check_causal_qkv, default_sm_scale

_OP_NAME = "attention_with_pooling"


def attention_with_pooling(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sm_scale: float | None = None,
    block_size: int = 64,
    return_lse: bool = False,
    implementation: dispatch.Implementation | None = None,
) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, jax.Array]:
    """Causal attention that also returns SeerAttention's 2D max-pooled attention map (the gate-training target).

    Args:
      q: [B, T, N, H] queries (post-RoPE).
      k, v: [B, S, K, H] keys and values, same dtype as q, S == T, N a multiple of K (GQA: query head n reads
        kv head n // (N / K); K/V are never repeated).
      sm_scale: softmax scale, a Python float; `H ** -0.5` when None.
      block_size: positions per pooled block (SeerAttention uses 64).
      return_lse: also return the logsumexp.
      implementation: None (auto), "mosaic" or "reference"; see `pallas_kernels.dispatch`.

    Returns:
      out: [B, T, N, H] in q.dtype, the causal attention output.
      pooled: float32 [B, N, I, J] with I = J = ceil(T / block_size): for query block i and key block j ≤ i, the
        largest softmax probability of a valid query row of block i on a key of block j, each row normalised to
        sum 1 over j; zero above the diagonal. A partial last block pools over its valid rows and keys.
      lse (only when `return_lse`): float32 [B, N, T], natural-log logsumexp of each row's scaled scores.

    Not differentiable on the Mosaic GPU path: the pooled map is a training target, not a trained quantity.
    Memory is O(B·N·T·H + B·N·I·J), plus on the Mosaic path a row-maxima buffer of at most 4 GiB per chunk of query
    rows (`kernel_sm90.Config.max_chunk_bytes`); see `reference` for the exact semantics.
    """
    scale = _check_args(q, k, v, sm_scale=sm_scale, block_size=block_size, implementation=implementation)
    return _attention_with_pooling(q, k, v, scale, block_size, return_lse, implementation)


def attention_with_pooling_implementation(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sm_scale: float | None = None,
    block_size: int = 64,
    return_lse: bool = False,
    implementation: dispatch.Implementation | None = None,
) -> dispatch.Implementation:
    """Name of the implementation ("mosaic" or "reference") that `attention_with_pooling` runs for these arguments.

    Traces the dispatch abstractly (`jax.eval_shape`): nothing is computed. Accepts arrays or
    `jax.ShapeDtypeStruct`s; raises as the op would (bad arguments, or an explicit "mosaic" the kernel declines).
    """
    scale = _check_args(q, k, v, sm_scale=sm_scale, block_size=block_size, implementation=implementation)
    return dispatch.traced_choice(
        lambda q, k, v: _dispatch(q, k, v, scale, block_size, return_lse, implementation), q, k, v
    )


def _check_args(q, k, v, *, sm_scale, block_size, implementation) -> float:
    check_causal_qkv(q, k, v)
    dispatch.check_implementation(implementation)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return default_sm_scale(sm_scale, q.shape[-1])


def _dispatch(q, k, v, sm_scale, block_size, return_lse, implementation):
    def mosaic():
        return kernel_sm90.attention_with_pooling_sm90(
            q, k, v, sm_scale=sm_scale, block_size=block_size, return_lse=return_lse
        )

    def jnp_reference():
        out, pooled, lse = reference.attention_with_pooling(q, k, v, sm_scale=sm_scale, block_size=block_size)
        return (out, pooled, lse) if return_lse else (out, pooled)

    return dispatch.run(_OP_NAME, implementation, mosaic=mosaic, reference=jnp_reference)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _attention_with_pooling(q, k, v, sm_scale, block_size, return_lse, implementation):
    return _dispatch(q, k, v, sm_scale, block_size, return_lse, implementation)[1]
