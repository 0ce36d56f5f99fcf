"""Attention ops run per device on their local batch rows and heads, under `jax.shard_map`, when a mesh is active.

The Mosaic GPU kernels (`pallas_kernels`) are custom calls that XLA's SPMD partitioner cannot split, so on a mesh
(`jax.set_mesh`, axes from `seer_jax.sharding`) every attention op goes through `per_device_heads`: inside
`jax.shard_map` each device calls the op on its rows of the batch (split over data × fsdp) and its query heads
(split over tensor) with the kv heads those query heads read. Attention never mixes heads or rows, so no
collective is needed and the result equals the unsharded op's. Without a mesh (or on a one-device mesh) the op is
called as it is.

Arguments and results are described in the axis alphabet (`"BTNH"`, `"BSKH"`, `"BS"`, `"BNIJ"`): B splits over
data × fsdp when they divide it (else every device takes every row), N over tensor, K over tensor. Kv heads fewer
than the tensor size (K < tensor, K dividing it) are repeated up to the tensor size first: device d then holds
kv head d // (tensor / K), the one its query heads d·N/tensor … read (q head n reads kv head n // G).
"""

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from pallas_kernels.attention_with_pooling import attention_with_pooling
from pallas_kernels.block_sparse_attention import (
    BLOCK_SIZE,
    block_sparse_attention,
    block_sparse_attention_implementation,
)
from pallas_kernels.block_sparse_decode import block_sparse_decode
from seer_jax.attention import dot_product_attention
from seer_jax.sharding import BATCH_AXES, HEAD_AXIS


def block_sparse_attention_per_device(q: jax.Array, k: jax.Array, v: jax.Array, block_mask: jax.Array) -> jax.Array:
    """`block_sparse_attention` (q [B, T, N, H], k/v [B, S, K, H], block_mask [B, N, I, J]) → [B, T, N, H], each
    device on its rows and heads."""

    def attention(q, k, v, block_mask):
        return block_sparse_attention(q, k, v, block_mask=block_mask)

    return per_device_heads(attention, [(q, "BTNH"), (k, "BSKH"), (v, "BSKH"), (block_mask, "BNIJ")], "BTNH")


def block_sparse_decode_per_device(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    block_index: jax.Array,
    block_count: jax.Array,
    starts: jax.Array,
    *,
    block_size: int,
) -> jax.Array:
    """`block_sparse_decode` (q [B, N, H], caches [B, S, K, H], lengths and starts int32 [B], block_index int32
    [B, K, M], block_count int32 [B, K]) → [B, N, H], each device on its rows and heads."""

    def attention(q, k_cache, v_cache, lengths, block_index, block_count, starts):
        return block_sparse_decode(
            q, k_cache, v_cache, lengths, block_index, block_count, starts=starts, block_size=block_size
        )

    layouts = ["BNH", "BSKH", "BSKH", "B", "BKM", "BK", "B"]
    arrays = (q, k_cache, v_cache, lengths, block_index, block_count, starts)
    return per_device_heads(attention, list(zip(arrays, layouts, strict=True)), "BNH")


def sparse_prefill_implementation(
    batch: int, length: int, *, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: jnp.dtype
) -> str:
    """The implementation ("mosaic" or "reference") that `block_sparse_attention_per_device` runs for a prefill of
    `length` tokens of this shape (per device, as the op sees it); nothing is computed."""
    num_blocks = -(-length // BLOCK_SIZE)
    q = jax.ShapeDtypeStruct((batch, length, num_q_heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((batch, length, num_kv_heads, head_dim), dtype)
    mask = jax.ShapeDtypeStruct((batch, num_q_heads, num_blocks, num_blocks), jnp.bool_)
    return block_sparse_attention_implementation(q, kv, kv, block_mask=mask)


def attention_with_pooling_per_device(
    q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int, implementation: str = "xla"
) -> tuple[jax.Array, jax.Array]:
    """`attention_with_pooling` (q [B, T, N, H], k/v [B, S, K, H]) → out [B, T, N, H] and the pooled map
    f32 [B, N, I, J], each device on its rows and heads.

    Differentiable in q, k, v through `out` only: the pooled map is a target (its cotangent is dropped), and the
    gradient of `out` is dense causal attention's, recomputed with `seer_jax.attention`'s `implementation` (the
    Mosaic kernel has no backward of its own).
    """

    def attention(q, k, v):
        return _pooled_attention(q, k, v, block_size, implementation)

    return per_device_heads(attention, [(q, "BTNH"), (k, "BSKH"), (v, "BSKH")], ("BTNH", "BNIJ"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _pooled_attention(q, k, v, block_size, implementation):
    return attention_with_pooling(q, k, v, block_size=block_size)


def _pooled_attention_fwd(q, k, v, block_size, implementation):
    return attention_with_pooling(q, k, v, block_size=block_size), (q, k, v)


def _pooled_attention_bwd(block_size, implementation, residuals, cotangents):
    del block_size
    d_out, _ = cotangents  # the pooled map is a training target: no gradient flows back through it

    def dense(q, k, v):
        return dot_product_attention(q, k, v, causal=True, implementation=implementation)

    _, vjp = jax.vjp(dense, *residuals)
    return vjp(d_out)


_pooled_attention.defvjp(_pooled_attention_fwd, _pooled_attention_bwd)


def per_device_heads(
    op: Callable[..., jax.Array | tuple[jax.Array, ...]],
    args: Sequence[tuple[jax.Array | None, str]],
    out_layouts: str | tuple[str, ...],
):
    """`op(*arrays)` with each device computing its own rows and heads when a mesh is active (module docstring).

    Args:
      op: the per-device computation; it receives the arrays in order (None stays None).
      args: (array or None, layout) pairs, layouts in the axis alphabet; at least one has an N axis.
      out_layouts: the layout of `op`'s result, or a tuple of layouts for a tuple of results.
    """
    mesh = jax.sharding.get_abstract_mesh()
    arrays = [array for array, _ in args]
    if mesh.empty or mesh.size == 1:
        return op(*arrays)
    sizes = dict(mesh.shape)
    tensor = sizes.get(HEAD_AXIS, 1)
    dims = {}
    for array, layout in args:
        if array is not None:
            if array.ndim != len(layout):
                raise ValueError(f"layout {layout!r} does not match an argument of shape {array.shape}")
            for letter, size in zip(layout, array.shape, strict=True):
                dims.setdefault(letter, size)
    num_q_heads, num_kv_heads = dims["N"], dims.get("K", tensor)
    if num_q_heads % tensor:
        raise ValueError(f"mesh: tensor={tensor} does not divide the {num_q_heads} query heads")
    if num_kv_heads % tensor:
        if tensor % num_kv_heads:
            raise ValueError(f"mesh: tensor={tensor} and the {num_kv_heads} kv heads do not divide one another")
        repeats = tensor // num_kv_heads
        arrays = [
            array if array is None or "K" not in layout else jnp.repeat(array, repeats, axis=layout.index("K"))
            for array, (_, layout) in zip(arrays, args, strict=True)
        ]
    batch_axes = tuple(axis for axis in BATCH_AXES if sizes.get(axis, 1) > 1)
    rows = 1
    for axis in batch_axes:
        rows *= sizes[axis]
    head_axis = HEAD_AXIS if tensor > 1 else None
    letter_axes = {"B": (batch_axes or None) if dims.get("B", 1) % rows == 0 else None, "N": head_axis, "K": head_axis}

    def spec(layout: str) -> PartitionSpec:
        return PartitionSpec(*(letter_axes.get(letter) for letter in layout))

    present = [index for index, array in enumerate(arrays) if array is not None]

    def local(*present_arrays):
        full = [None] * len(arrays)
        for index, array in zip(present, present_arrays, strict=True):
            full[index] = array
        return op(*full)

    out_specs = spec(out_layouts) if isinstance(out_layouts, str) else tuple(spec(x) for x in out_layouts)
    mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=tuple(spec(args[index][1]) for index in present),
        out_specs=out_specs,
        # Unchecked: the ops' loop carries (references and kernels) start device-invariant, which the checker
        # rejects. The specs are exact (an axis an argument or result does not mention holds identical copies), so
        # the unchecked transpose (output cotangents divided over, input cotangents summed over, the unmentioned
        # axes) gives the exact gradients.
        check_vma=False,
    )
    return mapped(*(arrays[index] for index in present))
