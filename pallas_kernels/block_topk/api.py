"""Public `block_topk_mask`: argument checks and dispatch between the Pallas Triton kernel and the reference.

The dispatch policy is `pallas_kernels.dispatch`'s; this op's kernel is written with Pallas Triton (see
`kernel_triton` for why), so its implementations are "triton" and "reference".
"""

import functools

import jax

from pallas_kernels import dispatch
from pallas_kernels.block_topk import kernel_triton, reference

_OP_NAME = "block_topk_mask"


def block_topk_mask(scores: jax.Array, k: int, *, implementation: dispatch.Implementation | None = None) -> jax.Array:
    """The k largest causal block scores of every row, as a mask.

    Args:
      scores: float [..., I, J] block scores (e.g. gate logits [B, N, I, J]); larger is more important.
      k: blocks to keep per row, a positive Python int; a row with fewer than k causal blocks keeps them all.
      implementation: None (auto), "triton" (the Pallas Triton kernel) or "reference"; see `pallas_kernels.dispatch`.

    Returns:
      bool [..., I, J]: for row i, the k largest scores among key blocks j ≤ i, ties broken towards lower j;
      False above the diagonal. Both implementations return the same mask (`reference` states the semantics).
    """
    _check_args(scores, k, implementation)
    return _block_topk_mask(scores, k, implementation)


def block_topk_mask_implementation(
    scores: jax.Array, k: int, *, implementation: dispatch.Implementation | None = None
) -> dispatch.Implementation:
    """Name of the implementation ("triton" or "reference") that `block_topk_mask` runs for these arguments."""
    _check_args(scores, k, implementation)
    return dispatch.traced_choice(lambda scores: _dispatch(scores, k, implementation), scores)


def _check_args(scores, k, implementation) -> None:
    dispatch.check_implementation(implementation, "triton")
    if len(scores.shape) < 2:
        raise ValueError(f"scores must be [..., I, J], got shape {scores.shape}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")


def _dispatch(scores, k, implementation):
    def triton():
        return kernel_triton.topk_mask_triton(scores, k)

    return dispatch.run(_OP_NAME, implementation, triton=triton, reference=lambda: reference.block_topk_mask(scores, k))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _block_topk_mask(scores, k, implementation):
    return _dispatch(scores, k, implementation)[1]
