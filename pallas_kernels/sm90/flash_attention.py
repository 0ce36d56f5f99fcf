"""Causal flash attention over a tile schedule for Hopper (sm_90), written with Pallas Mosaic GPU.

The forward kernel of `block_sparse_attention` (sparse schedules) and of `attention_with_pooling` (the dense causal
schedule, plus each row's maximum per key block).

Algorithm (FlashAttention-3 structure, after jax's `attention_mgpu.py`, with an index-list gather):
  * One CTA handles a 128-row query tile of one (batch, query head): two compute warpgroups own 64 rows each,
    i.e. query blocks 2t and 2t+1 of the gate's 64×64 grid; a third (memory) warpgroup streams K/V blocks with
    TMA into a `num_stages`-deep shared-memory ring (`pipeline.stream_blocks`).
  * The two warpgroups' block lists are merged in XLA into one ascending tile list (their union, `schedule`).
    The memory warpgroup fetches every listed block once; a compute warpgroup whose bit is clear skips the block
    (it only keeps the barrier phases in step), so 64×64 gate granularity is honoured while K/V tiles are shared
    by 128 query rows.
  * Tiles where both warpgroups use every causal block (dense layers, `attention_with_pooling`) run the FA3
    schedule: 128-key steps (two ring slots side by side), and a shared barrier that makes the two warpgroups
    alternate on the tensor cores so one's softmax hides behind the other's matmuls. Sparse tiles take 64-key
    steps and let the warpgroups run freely (lock-step would idle a warpgroup on every block only the other
    one uses).
  * Online softmax in the exp2 domain with `sm_scale · log2(e)` folded into one multiply; causal masking only
    inside a warpgroup's diagonal block. Rows that select no block produce zeros and lse = -inf, never NaN.
  * Grid (batch, head, query tile) with query tiles fastest, so the ~130 CTAs in flight read one K/V head and its
    prefix stays in L2 (with heads fastest they read all 8, which at 128k is 512 MB, and a random mask's scattered
    blocks come from HBM; measured in BENCHMARKS.md, "Grid order"). Query tiles are visited heaviest (last) first
    to shorten the causal tail.
  * Optionally (`dense_attention_with_row_max`, every tile dense) each warpgroup also writes its rows' maxima per
    64-key block, sliced from the softmax's row maximum: one pass of `attention_with_pooling`.

Layout limits: q [B, Tp, N, H], k/v [B, Tp, K, H] already padded to whole 128-row tiles by the caller
(`schedule.padded_length`), bf16 or fp16, H ∈ {64, 128, 256}, N a multiple of K, T ≤ 1M
(`pipeline.check_supported`, which the op wrappers call).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sm90 import pipeline
from pallas_kernels.sm90.pipeline import LOG2E
from pallas_kernels.sm90.schedule import BLOCK, TILE, dense_causal_schedule


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Tuning knobs of the forward kernel."""

    num_stages: int = 4  # 64-key slots in the K/V shared-memory ring (paired into 128-key slots on dense tiles)

    def __post_init__(self):
        if self.num_stages < 2 or self.num_stages % 2:
            raise ValueError(f"num_stages must be an even number >= 2, got {self.num_stages}")


def default_config(head_dim: int) -> Config:
    """A deep K/V ring hides the TMA latency of scattered blocks (4 stages beat 2 clearly at sparsity 0.9, and 5
    lost; BENCHMARKS.md, "Kernel history"); at head_dim 256 four stages would not fit in shared memory."""
    return Config(num_stages=4 if head_dim <= 128 else 2)


def _forward_kernel(
    # inputs
    q_ref,  # [B, Tp, N, H]
    k_ref,  # [B, Tp, K, H]
    v_ref,  # [B, Tp, K, H]
    entries_ref,  # int32 [B, N, I/2, Jc/64, 64]: packed tile schedule (see `schedule`)
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
    row_max_ref=None,  # optional output f32 [B, N, Jc, Tr]: see `dense_attention_with_row_max`
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
    scale_log2 = sm_scale * LOG2E
    num_pairs = num_stages // 2
    read_entry = pipeline.entry_reader(entries_smem)

    def half_slot(smem, slot):  # the 64-key slot `slot` of a [stages/2, 128, H] ring
        return smem.at[lax.div(slot, 2), pl.ds(lax.rem(slot, 2) * BLOCK, BLOCK)]

    def perform_schedule_barrier():
        plgpu.barrier_arrive(schedule_barrier)
        plgpu.barrier_wait(schedule_barrier)

    @pl.when(wg < 2)
    def _compute_wg():
        plgpu.set_max_registers(pipeline.COMPUTE_REGISTERS, action="increase")
        q_block = 2 * tile + wg
        out_rows = pl.ds((q_block - 2 * tile_offset) * BLOCK, BLOCK)  # this warpgroup's rows in the outputs
        q_smem = qo_smem2.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_block * BLOCK, BLOCK), head], q_smem, q_barriers.at[wg])
        plgpu.barrier_wait(entries_barrier)
        plgpu.barrier_wait(q_barriers.at[wg])

        m_i = plgpu.layout_cast(jnp.full((BLOCK,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.full((BLOCK,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.full((BLOCK, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)

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
            pipeline.skip_kv_slot(slot, k_barriers, v_barriers, k_consumed_barriers, v_consumed_barriers)
            return carry

        def attend_block(slot, carry, *, causal: bool):
            plgpu.barrier_wait(k_barriers.at[slot])

            def compute_qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(half_slot(k_smem, slot), (1, 0)))
                return acc_ref[...]

            qk = pl.run_scoped(compute_qk, plgpu.ACC((BLOCK, BLOCK), jnp.float32))  # [64, 64]
            plgpu.barrier_arrive(k_consumed_barriers.at[slot])
            (acc, m_i, l_i), p16 = softmax_update(pipeline.causal_mask(qk, diagonal_offset=0) if causal else qk, carry)
            plgpu.barrier_wait(v_barriers.at[slot])

            def compute_pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, half_slot(v_smem, slot))

            acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_consumed_barriers.at[slot])
            return acc, m_i, l_i

        def sparse_step(s, carry):
            entry = read_entry(s)
            kv_block = pipeline.block_of(entry)
            used = pipeline.used_by(entry, wg)
            slot = lax.rem(s, num_stages)
            branches = [  # indexed by pipeline.SKIP, OFF_DIAGONAL, DIAGONAL
                functools.partial(skip_block, slot),
                functools.partial(attend_block, slot, causal=False),
                functools.partial(attend_block, slot, causal=True),
            ]
            return lax.switch(pipeline.schedule_branch(used, lambda: kv_block == q_block), branches, carry)

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
                qk = pipeline.causal_mask(qk, diagonal_offset=wg * BLOCK)
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
        plgpu.set_max_registers(pipeline.MEMORY_REGISTERS, action="decrease")
        kv_head = lax.div(head, jnp.array(heads_per_kv_head, head.dtype))
        pipeline.load_schedule(entries_ref.at[batch, head, tile], entries_smem, entries_barrier)

        slots = (functools.partial(half_slot, k_smem), functools.partial(half_slot, v_smem))
        barriers = ((k_barriers, v_barriers), (k_consumed_barriers, v_consumed_barriers))
        pipeline.stream_kv_blocks((k_ref, v_ref), slots, *barriers, read_entry=read_entry, batch=batch,
                                  kv_head=kv_head, num_steps=num_steps, num_stages=num_stages)  # fmt: skip


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
                pipeline.swizzled_smem((2, BLOCK, head_dim), q.dtype),
                pipeline.swizzled_smem((stages // 2, TILE, head_dim), q.dtype),
                pipeline.swizzled_smem((stages // 2, TILE, head_dim), q.dtype),
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
        grid=(batch, num_q_heads, num_tiles),  # tiles fastest: see the module docstring on L2 reuse
        grid_names=pipeline.GRID_NAMES,
        num_threads=pipeline.NUM_WARPGROUPS,
        thread_name="wg",
        compiler_params=pipeline.compiler_params(),
    )(q, k, v, entries, counts, dense)


def scheduled_attention(q, k, v, entries, counts, dense, *, sm_scale: float, config: Config | None = None):
    """Runs the kernel on a prepared tile schedule (see `schedule.tile_schedule`); q/k/v padded to Tp rows.

    Returns the output [B, Tp, N, H] and the natural-log logsumexp f32 [B, N, Tp].
    """
    config = config or default_config(q.shape[-1])
    out, lse_log2 = _forward_call(q, k, v, entries, counts, dense, sm_scale=sm_scale, config=config)
    return out, lse_log2 * (1.0 / LOG2E)


def dense_attention_with_row_max(q, k, v, *, sm_scale: float, rows: range | None = None, config: Config | None = None):
    """Dense causal attention of query rows `rows` that also returns each row's maximum scaled score per key block.

    q/k/v padded to Tp rows; `rows` (default: all) a range of whole 128-row query tiles. Returns, for those Tr
    rows, out [B, Tr, N, H], the natural-log logsumexp f32 [B, N, Tr] and row_max f32 [B, N, Jc, Tr]
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
    return out, lse_log2 * (1.0 / LOG2E), row_max
