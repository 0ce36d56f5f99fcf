"""TopK block selection for GPUs, written with Pallas Triton: the k largest causal scores of every row as a mask.

Algorithm, per row of block scores (one Triton program holds `rows` rows of the [B·N·I, J] matrix in registers):
  * Map each float score to an int32 key with the same order (negative floats have their 31 low bits flipped);
    blocks above the diagonal get the smallest key, so they can never be chosen.
  * Find the row's k-th largest key exactly by building it bit by bit from the top (sign first): a bit stays set
    when at least k keys are ≥ the candidate. That is 32 counting passes over registers, no sort.
  * Keep every key above the threshold, and of the keys equal to it the first `k − count(above)` by column (a
    running count of ties), which is `lax.top_k`'s tie order: lower j first.
Rows with fewer than k causal blocks keep them all. The scores are read once and the mask written once, where
XLA's `top_k` sorts every row (the reference; both timed in BENCHMARKS.md, "TopK as a Pallas Triton kernel").

Why Triton rather than Mosaic GPU: this is a row-wise count-and-scan over arbitrary widths with no matrix
multiply; Pallas Triton lowers reductions and `cumsum` over a [rows, J] register tile directly.

Layout limits: J ≤ 32768 (a row must fit one program's registers); rows and columns are padded to powers of two
by the wrapper. Anything else raises NotImplementedError.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_INT32_MIN = -(2**31)
_MAX_WIDTH = 32768


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Tuning knobs: rows per Triton program (a power of two) and warps per program."""

    rows_per_program: int
    num_warps: int

    def __post_init__(self):
        if self.rows_per_program < 1 or self.rows_per_program & (self.rows_per_program - 1):
            raise ValueError(f"rows_per_program must be a power of two, got {self.rows_per_program}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")


def default_config(width: int) -> Config:
    """About 8192 keys per program (32 int32 registers per thread at 8 warps) for a padded row width."""
    rows = max(1, min(16, 8192 // width))
    return Config(rows_per_program=rows, num_warps=8 if rows * width >= 4096 else 4)


def _sortable_keys(scores: jax.Array) -> jax.Array:
    """f32 → int32 keys with the same order (IEEE bits, the negative ones' magnitude bits flipped)."""
    bits = lax.bitcast_convert_type(scores, jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _topk_kernel(
    # inputs
    scores_ref,  # [R, Jp]: R rows of the flattened [B·N·I, J] scores, columns padded to Jp
    # outputs
    mask_ref,  # int8 [R, Jp]
    *,
    k: int,
    num_q_blocks: int,
    num_kv_blocks: int,
):
    rows, width = scores_ref.shape
    first_row = pl.program_id(0) * rows
    q_block = lax.rem(first_row + lax.broadcasted_iota(jnp.int32, (rows, 1), 0), num_q_blocks)  # [R, 1]
    column = lax.broadcasted_iota(jnp.int32, (rows, width), 1)
    causal = (column <= q_block) & (column < num_kv_blocks)
    keys = jnp.where(causal, _sortable_keys(scores_ref[...].astype(jnp.float32)), _INT32_MIN)  # [R, Jp]
    wanted = jnp.minimum(jnp.minimum(q_block + 1, num_kv_blocks), k)  # [R, 1]

    def count(selected):  # [R, Jp] bool → [R, 1] int32
        return jnp.sum(selected.astype(jnp.int32), axis=1, keepdims=True)

    # The largest t with count(keys >= t) >= wanted is the wanted-th largest key; t grows monotonically with its
    # two's-complement bits once the sign is fixed.
    threshold = jnp.where(count(keys >= 0) >= wanted, jnp.int32(0), jnp.int32(_INT32_MIN))  # [R, 1]
    for bit in range(30, -1, -1):
        candidate = threshold | (1 << bit)
        threshold = jnp.where(count(keys >= candidate) >= wanted, candidate, threshold)
    above = keys > threshold
    ties = keys == threshold
    tie_rank = jnp.cumsum(ties.astype(jnp.int32), axis=1)  # 1-based rank of each tie, by column
    chosen = above | (ties & (tie_rank <= wanted - count(above)))
    mask_ref[...] = (chosen & causal).astype(jnp.int8)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def topk_mask_triton(scores: jax.Array, k: int, *, config: Config | None = None, interpret: bool = False) -> jax.Array:
    """bool [..., I, J]: the k largest causal scores of every row of `scores` [..., I, J] (lower j wins ties).

    `interpret` runs the same kernel through Pallas' interpreter (any device; for tests).
    """
    if not interpret and jax.devices()[0].platform != "gpu":
        raise NotImplementedError(f"the Triton TopK kernel needs a GPU, found {jax.devices()[0]}")
    if not jnp.issubdtype(scores.dtype, jnp.floating) or jnp.dtype(scores.dtype).itemsize > 4:
        raise NotImplementedError(f"scores must be float16/bfloat16/float32, got {scores.dtype}")
    num_q_blocks, num_kv_blocks = scores.shape[-2:]
    if num_kv_blocks > _MAX_WIDTH:
        raise NotImplementedError(f"at most {_MAX_WIDTH} key blocks per row, got {num_kv_blocks}")
    width = max(16, _next_power_of_two(num_kv_blocks))
    config = config or default_config(width)
    rows_per_program = config.rows_per_program
    flat = scores.reshape(-1, num_kv_blocks)  # [B·N·I, J]
    num_rows = flat.shape[0]
    padded_rows = -(-num_rows // rows_per_program) * rows_per_program
    flat = jnp.pad(flat, ((0, padded_rows - num_rows), (0, width - num_kv_blocks)))  # [M, Jp]
    mask = pl.pallas_call(
        functools.partial(_topk_kernel, k=k, num_q_blocks=num_q_blocks, num_kv_blocks=num_kv_blocks),
        out_shape=jax.ShapeDtypeStruct(flat.shape, jnp.int8),
        grid=(padded_rows // rows_per_program,),
        in_specs=[pl.BlockSpec((rows_per_program, width), lambda r: (r, 0))],
        out_specs=pl.BlockSpec((rows_per_program, width), lambda r: (r, 0)),
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=interpret,
    )(flat)
    return mask[:num_rows, :num_kv_blocks].reshape(scores.shape) != 0
