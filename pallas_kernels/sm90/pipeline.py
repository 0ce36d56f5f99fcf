"""What every sm_90 attention kernel's warpgroups do alike: support checks, the memory warpgroup's TMA loader, the
compute warpgroups' step over a schedule entry, causal masking, and the launch parameters.

A CTA has three warpgroups (`NUM_WARPGROUPS`, axis "wg"): 0 and 1 compute, 2 streams. The memory warpgroup copies
its tile's schedule (see `schedule`) to shared memory once, because a global scalar load per step would sit on every
warpgroup's critical path, then runs `stream_blocks`: it fills all `num_stages` ring slots, and refills slot
s mod num_stages for step s once the compute warpgroups have released it. Both compute warpgroups take every step
of the union schedule; a warpgroup whose "used" bit is clear only keeps the barrier phases in step
(`schedule_branch` picks skip, off-diagonal or diagonal).
"""

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import dispatch
from pallas_kernels.sm90.schedule import BLOCK, INDEX_BITS, INDEX_MASK, MAX_SEQ_LEN

NUM_WARPGROUPS = 3  # two compute warpgroups and one memory warpgroup per CTA
GRID_NAMES = ("batch", "heads", "tile")  # tiles fastest, so that the CTAs in flight share one K/V head in L2
# Registers per thread: the compute warpgroups hold accumulators, the memory warpgroup only issues TMA copies.
COMPUTE_REGISTERS, MEMORY_REGISTERS = 232, 40
SKIP, OFF_DIAGONAL, DIAGONAL = 0, 1, 2  # `schedule_branch`'s cases
LOG2E = math.log2(math.e)  # the kernels' softmax runs in the exp2 domain: sm_scale · log2(e) is one multiply


def check_supported(q: jax.Array, k: jax.Array) -> None:
    """Raises NotImplementedError unless the sm_90 kernels can run these inputs on the default device."""
    if not dispatch.hopper_available():
        raise NotImplementedError(f"the Mosaic GPU kernels need a Hopper (sm_90) GPU, found {jax.devices()[0]}")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"Mosaic GPU attention supports bf16/fp16, got {q.dtype}")
    if q.shape[-1] not in (64, 128, 256):
        raise NotImplementedError(f"head_dim must be 64, 128 or 256, got {q.shape[-1]}")
    if q.shape[1] != k.shape[1]:
        raise NotImplementedError("only self-attention (T == S) is supported")
    if q.shape[1] > MAX_SEQ_LEN:
        raise NotImplementedError(f"sequences longer than {MAX_SEQ_LEN} tokens are not supported")


def compiler_params() -> plgpu.CompilerParams:
    return plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane)


def swizzled_smem(shape: tuple[int, ...], dtype) -> plgpu.SMEM:
    """Shared memory for a wgmma operand of 64-row blocks [..., 64, H]: (8, 64) tiles, 128-byte swizzle."""
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def entry_reader(entries_smem):
    """Step s → the packed schedule entry s of this tile, from its [Cc/64, 64] copy in shared memory."""

    def read(s):
        return entries_smem[lax.div(s, BLOCK), lax.rem(s, BLOCK)]

    return read


def block_of(entry):
    """The block index of a packed schedule entry."""
    return entry & INDEX_MASK


def used_by(entry, wg):
    """1 where warpgroup wg uses the block of a packed schedule entry, else 0."""
    return (entry >> (INDEX_BITS + wg)) & 1


def schedule_branch(used, is_diagonal):
    """The case of a step: `SKIP` when the warpgroup does not use the block (`used_by` is 0), else `DIAGONAL` when
    the block is the warpgroup's own diagonal block (it needs causal masking), else `OFF_DIAGONAL`.

    `is_diagonal` is a thunk, evaluated after `used == 0`: each kernel keeps the order of its scalar ops that it had
    before this core was factored out of it, so that the generated code did not change."""
    return jnp.where(used == 0, SKIP, jnp.where(is_diagonal(), DIAGONAL, OFF_DIAGONAL))


def skip_kv_slot(slot, k_barriers, v_barriers, k_consumed_barriers, v_consumed_barriers):
    """A compute warpgroup's step over a K/V ring slot it does not use: wait for it and release it at once."""
    plgpu.barrier_wait(k_barriers.at[slot])
    plgpu.barrier_arrive(k_consumed_barriers.at[slot])
    plgpu.barrier_wait(v_barriers.at[slot])
    plgpu.barrier_arrive(v_consumed_barriers.at[slot])


def causal_mask(scores, *, diagonal_offset=None, keys_first: bool = False):
    """A diagonal block's scores with keys after their query set to -inf.

    scores: f32 [rows, keys] in the WGMMA layout, or [keys, rows] with `keys_first` (the dK/dV kernel's sᵀ).
    Key c is visible to row r iff c ≤ r + diagonal_offset (None: no offset).
    """
    first = plgpu.broadcasted_iota(jnp.int32, scores.shape, 0, layout=plgpu.Layout.WGMMA)
    second = plgpu.broadcasted_iota(jnp.int32, scores.shape, 1, layout=plgpu.Layout.WGMMA)
    rows, cols = (second, first) if keys_first else (first, second)
    if diagonal_offset is not None:
        rows = rows + diagonal_offset
    return jnp.where(rows >= cols, scores, -jnp.inf)


def load_schedule(entries_ref, entries_smem, entries_barrier):
    """Copies this tile's schedule `entries_ref` (int32 [Cc/64, 64] in global memory) to shared memory and waits.
    The compute warpgroups wait on the same barrier before their first step."""
    plgpu.copy_gmem_to_smem(entries_ref, entries_smem, entries_barrier)
    plgpu.barrier_wait(entries_barrier)


def stream_blocks(fetch, consumed_barriers, *, num_steps, num_stages: int):
    """The memory warpgroup's TMA loop over a tile's `num_steps` schedule entries.

    `fetch(s, slot)` issues the copies of step s into ring slot `slot`; `consumed_barriers` are the barrier arrays
    (one barrier per slot each) on which the compute warpgroups release a slot. The first `num_stages` steps fill
    the ring; step s ≥ num_stages waits until slot s mod num_stages is released.
    """
    for s in range(num_stages):
        pl.when(s < num_steps)(lambda s=s: fetch(s, s))

    @pl.loop(num_stages, jnp.maximum(num_steps, num_stages))
    def _refill(s):
        slot = lax.rem(s, num_stages)
        for barriers in consumed_barriers:
            plgpu.barrier_wait(barriers.at[slot])
        fetch(s, slot)


def stream_kv_blocks(kv_refs, kv_slots, kv_barriers, consumed_barriers, *, read_entry, batch, kv_head, num_steps,
                     num_stages: int):  # fmt: skip
    """`stream_blocks` of K and V (the forward and dQ kernels): step s copies key block `block_of(read_entry(s))` of
    kv head `kv_head` from kv_refs = (k_ref, v_ref) [B, Tp, K, H] into kv_slots = (k_slot, v_slot), functions from a
    ring slot to its [64, H] shared-memory view, arriving on kv_barriers = (k_barriers, v_barriers) at the slot."""

    def fetch(s, slot):
        window = (batch, pl.ds(block_of(read_entry(s)) * BLOCK, BLOCK), kv_head)
        for ref, slot_view, barriers in zip(kv_refs, kv_slots, kv_barriers, strict=True):
            plgpu.copy_gmem_to_smem(ref.at[window], slot_view(slot), barriers.at[slot])

    stream_blocks(fetch, consumed_barriers, num_steps=num_steps, num_stages=num_stages)
