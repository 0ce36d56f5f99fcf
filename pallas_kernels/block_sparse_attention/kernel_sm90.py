"""Block-sparse causal flash attention for Hopper (sm_90), written with Pallas Mosaic GPU.

Algorithm (FlashAttention-3 structure, after jax's `attention_mgpu.py`, with an index-list gather):
  * One CTA handles a 128-row query tile of one (batch, query head): two compute warpgroups own 64 rows each,
    i.e. query blocks 2t and 2t+1 of the gate's 64×64 grid; a third (memory) warpgroup streams K/V blocks with
    TMA into a `num_stages`-deep shared-memory ring.
  * The two warpgroups' block lists are merged in XLA into one ascending tile list (their union). Each entry
    packs the key-block index with one "used" bit per warpgroup. The memory warpgroup fetches every listed block
    once; a compute warpgroup whose bit is clear skips the block (it only keeps the barrier phases in step), so
    64×64 gate granularity is honoured while K/V tiles are shared by 128 query rows.
  * Each tile's schedule is copied to shared memory once (a global scalar load per step would sit on every
    warpgroup's critical path).
  * Tiles where both warpgroups use every causal block (dense layers, the pooling kernel's first pass) run the
    FA3 schedule: 128-key steps (two ring slots side by side), and a shared barrier that makes the two warpgroups
    alternate on the tensor cores so one's softmax hides behind the other's matmuls. Sparse tiles take 64-key
    steps and let the warpgroups run freely (lock-step would idle a warpgroup on every block only the other
    one uses).
  * Online softmax in the exp2 domain with `sm_scale · log2(e)` folded into one multiply; causal masking only
    inside a warpgroup's diagonal block. Rows that select no block produce zeros and lse = -inf, never NaN.
  * Grid (batch, head, query tile) with query tiles fastest, so the ~130 CTAs in flight read one K/V head and its
    prefix stays in L2 (with heads fastest they read all 8, which at 128k is 512 MB, and a random mask's scattered
    blocks came from HBM: sparsity 0.9 at 128k went from 5.5× to 7.0× cuDNN with this order). Query tiles are
    visited heaviest (last) first to shorten the causal tail.
  * Optionally (`dense_attention_with_row_max_sm90`, every tile dense) each warpgroup also writes its rows'
    maxima per 64-key block, sliced from the softmax's row maximum: one pass of `attention_with_pooling`.

Layout limits: q [B, T, N, H], k/v [B, T, K, H] (self-attention, T == S), bf16 or fp16, H ∈ {64, 128, 256},
N a multiple of K, T ≤ 1M (the tile schedule is one TMA box of ≤ 256 × 64 entries). T is padded to a multiple
of 128 by the wrapper. Anything else raises NotImplementedError.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import dispatch
from pallas_kernels.block_sparse_attention.index import causal_block_mask

BLOCK = 64  # gate granularity: rows per compute warpgroup and keys per K/V block
TILE = 2 * BLOCK  # query rows per CTA (two compute warpgroups)
_INDEX_BITS = 16  # packed tile entry: key-block index | used-by-wg0 << 16 | used-by-wg1 << 17
_LOG2E = math.log2(math.e)
_MAX_SEQ_LEN = 256 * BLOCK * BLOCK  # the tile schedule is copied as one TMA box of at most 256 × 64 entries


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Tuning knobs of the forward kernel."""

    num_stages: int = 4  # 64-key slots in the K/V shared-memory ring (paired into 128-key slots on dense tiles)

    def __post_init__(self):
        if self.num_stages < 2 or self.num_stages % 2:
            raise ValueError(f"num_stages must be an even number >= 2, got {self.num_stages}")


def default_config(head_dim: int) -> Config:
    """A deep K/V ring hides TMA latency of scattered blocks (H200, 32k, sparsity 0.9: 2 stages 4.2×, 4 stages
    5.5× over cuDNN); at head_dim 256 four stages would not fit in shared memory."""
    return Config(num_stages=4 if head_dim <= 128 else 2)


def check_supported(q: jax.Array, k: jax.Array) -> None:
    """Raises NotImplementedError unless this kernel can run these inputs on the default device."""
    if not dispatch.hopper_available():
        raise NotImplementedError(f"the Mosaic GPU kernels need a Hopper (sm_90) GPU, found {jax.devices()[0]}")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"Mosaic GPU attention supports bf16/fp16, got {q.dtype}")
    if q.shape[-1] not in (64, 128, 256):
        raise NotImplementedError(f"head_dim must be 64, 128 or 256, got {q.shape[-1]}")
    if q.shape[1] != k.shape[1]:
        raise NotImplementedError("only self-attention (T == S) is supported")
    if q.shape[1] > _MAX_SEQ_LEN:
        raise NotImplementedError(f"sequences longer than {_MAX_SEQ_LEN} tokens are not supported")


def pair_schedule(block_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Merges the block lists of each pair of rows of a block mask into one packed, ascending list per pair.

    Args:
      block_mask: bool [B, N, R, C] with R even: R rows of which consecutive pairs share a CTA, C columns.

    Returns:
      entries: int32 [B, N, R // 2, Cc // 64, 64] with Cc = C rounded up to 64 (a TMA-friendly 2D box); flattened
        over the last two axes, the first counts[...] entries of pair p list the columns used by row 2p or 2p+1,
        ascending, each packed as column | used(2p) << 16 | used(2p+1) << 17; the rest are 0.
      counts: int32 [B, N, R // 2], the sizes of the unions.
    """
    batch, heads, num_rows, num_cols = block_mask.shape
    padded_cols = -(-num_cols // BLOCK) * BLOCK
    pairs = block_mask.reshape(batch, heads, num_rows // 2, 2, num_cols)  # [B, N, R/2, 2, C]
    used_lo, used_hi = pairs[..., 0, :], pairs[..., 1, :]  # [B, N, R/2, C] each
    union = used_lo | used_hi
    counts = jnp.sum(union, axis=-1, dtype=jnp.int32)  # [B, N, R/2]
    columns = jnp.arange(num_cols, dtype=jnp.int32)
    packed = (
        columns | (used_lo.astype(jnp.int32) << _INDEX_BITS) | (used_hi.astype(jnp.int32) << (_INDEX_BITS + 1))
    )  # [B, N, R/2, C]
    slots = jnp.where(union, jnp.cumsum(union, axis=-1, dtype=jnp.int32) - 1, padded_cols)

    def compact_row(row_slots, row_packed):
        return jnp.zeros((padded_cols,), jnp.int32).at[row_slots].set(row_packed, mode="drop")

    entries = jax.vmap(jax.vmap(jax.vmap(compact_row)))(slots, packed)  # [B, N, R/2, Cc]
    return entries.reshape(batch, heads, num_rows // 2, padded_cols // BLOCK, BLOCK), counts


def tile_schedule(block_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The forward kernel's schedule: `pair_schedule` over query-block pairs, plus a dense-tile flag.

    Args:
      block_mask: bool [B, N, I, J], causal (nothing above the diagonal), I even.

    Returns:
      entries, counts: see `pair_schedule` (query tile t = query blocks 2t, 2t+1; columns = key blocks).
      dense: int32 [B, N, I // 2], 1 where both query blocks use every causal block (the 128-key fast path).
    """
    entries, counts = pair_schedule(block_mask)
    num_q_blocks = block_mask.shape[2]
    tiles = jnp.arange(num_q_blocks // 2, dtype=jnp.int32)
    own_counts = jnp.sum(block_mask.reshape(*block_mask.shape[:2], -1, 2, block_mask.shape[3]), -1, jnp.int32)
    dense = (own_counts[..., 0] == 2 * tiles + 1) & (own_counts[..., 1] == 2 * tiles + 2)  # [B, N, I/2]
    return entries, counts, dense.astype(jnp.int32)


def dense_causal_schedule(batch: int, heads: int, num_q_blocks: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The tile schedule of plain causal attention (every block on or below the diagonal)."""
    rows = jnp.arange(num_q_blocks)[:, None]
    mask = jnp.arange(num_q_blocks)[None, :] <= rows  # [I, I]
    return tile_schedule(jnp.broadcast_to(mask, (batch, heads, num_q_blocks, num_q_blocks)))


def _forward_kernel(
    # inputs
    q_ref,  # [B, Tp, N, H]
    k_ref,  # [B, Tp, K, H]
    v_ref,  # [B, Tp, K, H]
    entries_ref,  # int32 [B, N, I/2, Jc/64, 64]: packed tile schedule (see `tile_schedule`)
    counts_ref,  # int32 [B, N, I/2]
    dense_ref,  # int32 [B, N, I/2]
    # outputs
    out_ref,  # [B, Tr, N, H]: the rows of query tiles tile_offset .. tile_offset + num_tiles - 1 (Tr = 128·num_tiles)
    lse_ref,  # f32 [B, N, Tr], log2 domain (converted by the wrapper)
    # scratch
    qo_smem2,  # [2, 64, H]: each warpgroup's Q block, reused for its output
    k_smem,  # [stages/2, 128, H]: a ring of 64-key slots, paired into 128-key slots on dense tiles
    v_smem,  # [stages/2, 128, H]
    lse_smem2,  # f32 [2, 64]
    entries_smem,  # int32 [Jc/64, 64]: this tile's schedule, read by all three warpgroups
    k_barriers,  # one per 64-key slot
    v_barriers,
    q_barriers,
    entries_barrier,
    k_consumed_barriers,
    v_consumed_barriers,
    schedule_barrier,
    *,
    row_max_ref=None,  # optional output f32 [B, N, Jc, Tr]: see `dense_attention_with_row_max_sm90`
    chunk_smem2=None,  # f32 [2, 64, 64] with row_max_ref: each warpgroup's row maxima of 64 key blocks
    sm_scale: float,
    num_stages: int,
    num_tiles: int,
    tile_offset: int,
    heads_per_kv_head: int,
    all_dense: bool,
):
    batch = lax.axis_index("batch")
    tile = tile_offset + num_tiles - 1 - lax.axis_index("tile")  # heaviest causal tiles first
    head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    num_steps = counts_ref[batch, head, tile]
    dense_tile = dense_ref[batch, head, tile] != 0  # every causal block for both: the FA3 ping-pong schedule
    head_dim = q_ref.shape[-1]
    dtype = q_ref.dtype
    scale_log2 = sm_scale * _LOG2E
    num_pairs = num_stages // 2

    def read_entry(s):
        return entries_smem[lax.div(s, BLOCK), lax.rem(s, BLOCK)]

    def half_slot(smem, slot):  # the 64-key slot `slot` of a [stages/2, 128, H] ring
        return smem.at[lax.div(slot, 2), pl.ds(lax.rem(slot, 2) * BLOCK, BLOCK)]

    def perform_schedule_barrier():
        plgpu.barrier_arrive(schedule_barrier)
        plgpu.barrier_wait(schedule_barrier)

    @pl.when(wg < 2)
    def _compute_wg():
        plgpu.set_max_registers(232, action="increase")
        q_block = 2 * tile + wg
        out_rows = pl.ds((q_block - 2 * tile_offset) * BLOCK, BLOCK)  # this warpgroup's rows in the outputs
        q_smem = qo_smem2.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_block * BLOCK, BLOCK), head], q_smem, q_barriers.at[wg])
        plgpu.barrier_wait(entries_barrier)
        plgpu.barrier_wait(q_barriers.at[wg])

        m_i = plgpu.layout_cast(jnp.full((BLOCK,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.full((BLOCK,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.full((BLOCK, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)

        def causal_mask(qk, diagonal_offset: int | jax.Array):
            """Scores qk [64, n] with keys c > row + diagonal_offset set to -inf."""
            rows = plgpu.broadcasted_iota(jnp.int32, qk.shape, 0, layout=plgpu.Layout.WGMMA)
            cols = plgpu.broadcasted_iota(jnp.int32, qk.shape, 1, layout=plgpu.Layout.WGMMA)
            return jnp.where(rows + diagonal_offset >= cols, qk, -jnp.inf)

        def softmax_update(qk, carry, qk_max=None):
            """Online-softmax step on (masked) scores qk [64, n] whose row maxima are qk_max (computed if None)."""
            acc, m_i, l_i = carry
            if qk_max is None:
                qk_max = qk.max(axis=1)
            m_new = jnp.maximum(m_i, qk_max * scale_log2)
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(qk * scale_log2 - lax.broadcast_in_dim(m_new, qk.shape, [0]))
            acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_i = l_i * alpha + p.sum(axis=1)
            return (acc, m_new, l_i), p.astype(dtype)

        # Sparse tiles: 64-key steps; the warpgroups run freely, each skipping the blocks only the other one needs.
        def skip_block(slot, carry):
            plgpu.barrier_wait(k_barriers.at[slot])
            plgpu.barrier_arrive(k_consumed_barriers.at[slot])
            plgpu.barrier_wait(v_barriers.at[slot])
            plgpu.barrier_arrive(v_consumed_barriers.at[slot])
            return carry

        def attend_block(slot, carry, *, causal: bool):
            plgpu.barrier_wait(k_barriers.at[slot])

            def compute_qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(half_slot(k_smem, slot), (1, 0)))
                return acc_ref[...]

            qk = pl.run_scoped(compute_qk, plgpu.ACC((BLOCK, BLOCK), jnp.float32))  # [64, 64]
            plgpu.barrier_arrive(k_consumed_barriers.at[slot])
            (acc, m_i, l_i), p16 = softmax_update(causal_mask(qk, 0) if causal else qk, carry)
            plgpu.barrier_wait(v_barriers.at[slot])

            def compute_pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, half_slot(v_smem, slot))

            acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_consumed_barriers.at[slot])
            return acc, m_i, l_i

        def sparse_step(s, carry):
            entry = read_entry(s)
            kv_block = entry & ((1 << _INDEX_BITS) - 1)
            used = (entry >> (_INDEX_BITS + wg)) & 1
            slot = lax.rem(s, num_stages)
            branch = jnp.where(used == 0, 0, jnp.where(kv_block == q_block, 2, 1))
            return lax.switch(
                branch,
                [
                    functools.partial(skip_block, slot),
                    functools.partial(attend_block, slot, causal=False),
                    functools.partial(attend_block, slot, causal=True),
                ],
                carry,
            )

        def sparse_tile(carry):
            return lax.fori_loop(0, num_steps, sparse_step, carry)

        # Dense tiles: 128-key steps (key blocks 2p and 2p+1 side by side in one pair of slots), t + 1 of them
        # for both warpgroups, the last one causally masked. The warpgroups alternate on the tensor cores (FA3
        # ping-pong): the second starts one schedule-barrier phase late, so one's softmax hides the other's matmuls.
        def wait_pair(barriers, pair):
            plgpu.barrier_wait(barriers.at[2 * pair])
            plgpu.barrier_wait(barriers.at[2 * pair + 1])

        def arrive_pair(barriers, pair):
            plgpu.barrier_arrive(barriers.at[2 * pair])
            plgpu.barrier_arrive(barriers.at[2 * pair + 1])

        def dense_step(step, carry, *, causal: bool):
            pair = lax.rem(step, num_pairs)

            def compute_qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[pair], (1, 0)))
                perform_schedule_barrier()
                return acc_ref[...]

            qk = pl.run_scoped(compute_qk, plgpu.ACC((BLOCK, TILE), jnp.float32))  # [64, 128]
            arrive_pair(k_consumed_barriers, pair)
            if causal:  # query row r of this warpgroup sits at key offset r + 64·wg inside the last 128-key step
                qk = causal_mask(qk, wg * BLOCK)
            qk_max = None
            if row_max_ref is not None:
                # The row maxima of key blocks 2·step and 2·step + 1 are slices of the softmax's row maximum.
                block_max = (qk[:, :BLOCK].max(axis=1), qk[:, BLOCK:].max(axis=1))
                qk_max = jnp.maximum(*block_max)
                record_row_max(step, block_max)
            (acc, m_i, l_i), p16 = softmax_update(qk, carry, qk_max)
            acc, l_i, m_i, p16 = lax.optimization_barrier((acc, l_i, m_i, p16))
            plgpu.barrier_arrive(schedule_barrier)  # done with the softmax
            wait_pair(v_barriers, pair)
            plgpu.barrier_wait(schedule_barrier)  # the tensor cores are ours again

            def compute_pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[pair])
                pl.when(step < tile)(lambda: wait_pair(k_barriers, lax.rem(step + 1, num_pairs)))

            acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
            arrive_pair(v_consumed_barriers, pair)
            return acc, m_i, l_i

        def record_row_max(step, block_max):
            """Stages the scaled row maxima of key blocks 2·step, 2·step + 1 in this warpgroup's [64 blocks, 64
            rows] chunk; a full chunk (or the tile's last) goes to row_max_ref by TMA."""
            chunk_smem = chunk_smem2.at[wg]
            col = lax.rem(2 * step, BLOCK)
            # The previous chunk's store must have read the buffer (issued 32 steps ago: long done).
            pl.when((col == 0) & (step > 0))(lambda: plgpu.wait_smem_to_gmem(0, wait_read_only=True))
            for half, value in enumerate(block_max):
                chunk_smem.at[col + half][...] = value * scale_log2

            @pl.when((col == BLOCK - 2) | (step == tile))
            def _store_chunk():
                plgpu.commit_smem()
                blocks = pl.ds(lax.div(2 * step, BLOCK) * BLOCK, BLOCK)
                plgpu.copy_smem_to_gmem(chunk_smem, row_max_ref.at[batch, head, blocks, out_rows])

        def dense_tile_loop(carry):
            pl.when(wg == 1)(perform_schedule_barrier)
            wait_pair(k_barriers, 0)
            carry = lax.fori_loop(0, tile, functools.partial(dense_step, causal=False), carry)
            carry = dense_step(tile, carry, causal=True)
            pl.when(wg == 0)(perform_schedule_barrier)
            return carry

        if all_dense:
            acc, m_i, l_i = dense_tile_loop((acc, m_i, l_i))
        else:
            acc, m_i, l_i = lax.cond(dense_tile, dense_tile_loop, sparse_tile, (acc, m_i, l_i))

        # A row that attended nothing has l = 0: emit 0, not 0/0.
        l_safe = jnp.where(l_i == 0, 1.0, l_i)
        acc /= lax.broadcast_in_dim(l_safe, (BLOCK, head_dim), [0])
        q_smem[...] = acc.astype(dtype)
        lse_smem = lse_smem2.at[wg]
        lse_smem[...] = m_i + jnp.log2(l_i)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[batch, out_rows, head])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, out_rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory_wg():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, jnp.array(heads_per_kv_head, head.dtype))
        plgpu.copy_gmem_to_smem(entries_ref.at[batch, head, tile], entries_smem, entries_barrier)
        plgpu.barrier_wait(entries_barrier)

        def fetch(s, slot):
            kv_block = read_entry(s) & ((1 << _INDEX_BITS) - 1)
            window = (batch, pl.ds(kv_block * BLOCK, BLOCK), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[window], half_slot(k_smem, slot), k_barriers.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[window], half_slot(v_smem, slot), v_barriers.at[slot])

        for s in range(num_stages):
            pl.when(s < num_steps)(functools.partial(fetch, s, s))

        @pl.loop(num_stages, jnp.maximum(num_steps, num_stages))
        def _refill(s):
            slot = lax.rem(s, num_stages)
            plgpu.barrier_wait(k_consumed_barriers.at[slot])
            plgpu.barrier_wait(v_consumed_barriers.at[slot])
            fetch(s, slot)


def _forward_call(
    q, k, v, entries, counts, dense, *, sm_scale: float, config: Config, row_max: bool = False, tiles=None
):
    """Launches the kernel on query tiles `tiles` (a range; all by default); `row_max` (every tile dense) adds the
    row-maxima output."""
    batch, padded_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    tiles = tiles or range(padded_len // TILE)
    num_tiles = len(tiles)
    num_rows = num_tiles * TILE
    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    stages = config.num_stages
    num_row_max_blocks = -(-padded_len // BLOCK // BLOCK) * BLOCK  # Jc: whole 64-block chunks

    def body(q_ref, k_ref, v_ref, entries_ref, counts_ref, dense_ref, out_ref, lse_ref, row_max_ref=None):
        kernel = functools.partial(
            _forward_kernel,
            q_ref, k_ref, v_ref, entries_ref, counts_ref, dense_ref, out_ref, lse_ref,
            row_max_ref=row_max_ref,
            sm_scale=sm_scale,
            num_stages=stages,
            num_tiles=num_tiles,
            tile_offset=tiles.start,
            heads_per_kv_head=num_q_heads // num_kv_heads,
            all_dense=row_max,
        )  # fmt: skip

        def scoped(smem, barriers, consumed, schedule, chunk_smem2=None):
            kernel(*smem, *barriers, *consumed, schedule, chunk_smem2=chunk_smem2)

        chunk = (plgpu.SMEM((2, BLOCK, BLOCK), jnp.float32),) if row_max else ()
        pl.run_scoped(
            scoped,
            (
                plgpu.SMEM((2, BLOCK, head_dim), q.dtype, transforms=(tiling, swizzle)),
                plgpu.SMEM((stages // 2, TILE, head_dim), q.dtype, transforms=(tiling, swizzle)),
                plgpu.SMEM((stages // 2, TILE, head_dim), q.dtype, transforms=(tiling, swizzle)),
                plgpu.SMEM((2, BLOCK), jnp.float32),
                plgpu.SMEM(entries.shape[-2:], jnp.int32),
            ),
            (
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=2),
                plgpu.Barrier(num_barriers=1),
            ),
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            *chunk,
            collective_axes="wg",
        )

    out_type = (
        jax.ShapeDtypeStruct((batch, num_rows, num_q_heads, head_dim), q.dtype),
        jax.ShapeDtypeStruct((batch, num_q_heads, num_rows), jnp.float32),
    )
    if row_max:
        out_type += (jax.ShapeDtypeStruct((batch, num_q_heads, num_row_max_blocks, num_rows), jnp.float32),)
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(batch, num_q_heads, num_tiles),  # tiles fastest: see `kernel_sm90` on L2 reuse
        grid_names=("batch", "heads", "tile"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
    )(q, k, v, entries, counts, dense)


def dense_attention_with_row_max_sm90(
    q, k, v, *, sm_scale: float, rows: range | None = None, config: Config | None = None
):
    """Dense causal attention of query rows `rows` that also returns each row's maximum scaled score per key block.

    q/k/v already padded to 128 rows (Tp); `rows` (default: all) a range of whole 128-row query tiles. Returns, for
    those Tr rows, out [B, Tr, N, H], the natural-log logsumexp f32 [B, N, Tr] and row_max f32 [B, N, Jc, Tr]
    (Jc = Tp / 64 rounded up to 64): row_max[b, n, j, r] = max over causal keys c of block j of
    s[r, c] · sm_scale · log2(e), -inf where block j holds no causal key of row r; entries with j > r // 64 + 1 or
    j ≥ Tp / 64 are unspecified. The maxima are the softmax's own (free); storing them costs 4·B·N·Jc·Tr bytes of
    HBM, which is why `attention_with_pooling` goes through long sequences in row chunks.
    """
    config = config or default_config(q.shape[-1])
    rows = rows or range(q.shape[1])
    if rows.start % TILE or rows.stop % TILE or rows.step != 1 or not 0 <= rows.start < rows.stop <= q.shape[1]:
        raise ValueError(f"rows must be a range of whole {TILE}-row tiles within {q.shape[1]} rows, got {rows}")
    entries, counts, dense = dense_causal_schedule(q.shape[0], q.shape[2], q.shape[1] // BLOCK)
    tiles = range(rows.start // TILE, rows.stop // TILE)
    out, lse_log2, row_max = _forward_call(
        q, k, v, entries, counts, dense, sm_scale=sm_scale, config=config, row_max=True, tiles=tiles
    )
    return out, lse_log2 * (1.0 / _LOG2E), row_max


def _pad_sequence(x: jax.Array, padded_len: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, padded_len - x.shape[1]), (0, 0), (0, 0)))


def scheduled_attention_sm90(q, k, v, entries, counts, dense, *, sm_scale: float, config: Config | None = None):
    """Runs the kernel on a prepared tile schedule (see `tile_schedule`); q/k/v already padded to 128 rows.

    Returns the output [B, Tp, N, H] and the natural-log logsumexp f32 [B, N, Tp].
    """
    config = config or default_config(q.shape[-1])
    out, lse_log2 = _forward_call(q, k, v, entries, counts, dense, sm_scale=sm_scale, config=config)
    return out, lse_log2 * (1.0 / _LOG2E)


def block_sparse_attention_sm90(q, k, v, block_mask, *, sm_scale, return_lse, config: Config | None = None):
    """Block-sparse causal attention on Hopper. Same contract as the reference implementation.

    q: [B, T, N, H]; k, v: [B, T, K, H]; block_mask: bool [B, N, I, J] over I = J = ceil(T / 64) blocks (entries
    above the diagonal ignored). A mask, not a `BlockIndex`: the kernel's tile schedule is built from the mask.
    Returns out [B, T, N, H] (and lse f32 [B, N, T], natural log, -inf for rows that attend nothing).
    """
    check_supported(q, k)
    seq_len = q.shape[1]
    padded_len = -(-seq_len // TILE) * TILE
    num_padded_blocks = padded_len // BLOCK
    block_mask = block_mask & causal_block_mask(*block_mask.shape[-2:])  # [B, N, I, J]
    pad_rows = num_padded_blocks - block_mask.shape[2]
    pad_cols = num_padded_blocks - block_mask.shape[3]
    block_mask = jnp.pad(block_mask, ((0, 0), (0, 0), (0, pad_rows), (0, pad_cols)))  # [B, N, Ip, Ip]
    entries, counts, dense = tile_schedule(block_mask)
    out, lse = scheduled_attention_sm90(
        _pad_sequence(q, padded_len),
        _pad_sequence(k, padded_len),
        _pad_sequence(v, padded_len),
        entries,
        counts,
        dense,
        sm_scale=sm_scale,
        config=config,
    )
    out = out[:, :seq_len]
    if return_lse:
        return out, lse[..., :seq_len]
    return out
