"""Backward of block-sparse causal flash attention for Hopper (sm_90), written with Pallas Mosaic GPU.

Recomputation from the forward's logsumexp over the same 64×64 blocks, with the forward's CTA layout and the
shared sm_90 core (`pallas_kernels.sm90`: two compute warpgroups × 64 rows or keys, one TMA warpgroup, pair
schedules from `schedule.pair_schedule` in which each warpgroup skips the blocks only its partner uses):
  * dK/dV: CTA = (batch, query head, key tile of key blocks 2u, 2u+1), looping over the query blocks that
    selected them (the transposed mask). Per block: sᵀ = k qᵀ, pᵀ = exp2(sᵀ·scale·log2 e − lse₂), dv += pᵀ dO,
    dpᵀ = v dOᵀ, dsᵀ = pᵀ ⊙ (dpᵀ − δ), dk += dsᵀ q. dK/dV come out per query head and each GQA group is summed
    in XLA (as in jax's `attention_mgpu` backward).
  * dQ, fused (the default up to 192k tokens, FlashAttention-3's layout): the same CTA also computes the block's
    dq partial ds k (dsᵀ staged in shared memory as the transposed A operand) and adds it into an f32 dQ in
    global memory with a TMA reduce-add; XLA scales and casts it. Five matmuls per block instead of the seven of
    two kernels, for 32 KB of L2 reductions per block and warpgroup (faster than two kernels on the H200:
    BENCHMARKS.md, "dQ fused into the dK/dV kernel").
  * dQ, separate (longer sequences, where the fused layout's shared memory does not fit): CTA = (batch, query
    head, query tile of query blocks 2t, 2t+1) over the forward's schedule; per block s = q kᵀ and dp = dO vᵀ
    (issued together), p, ds = p ⊙ (dp − δ), dq += ds k.
δ = rowsum(dO ⊙ out) − d_lse is computed in XLA (the d_lse term makes the logsumexp output differentiable).
Rows that selected nothing are never visited, so their -inf logsumexp never enters an exp.

Padding as the forward's wrapper (T to whole 128-row tiles, the mask to match). Layout limits as the forward
(bf16/fp16, T == S ≤ 1M) with H ∈ {64, 128}: H = 256 does not fit shared memory.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sm90 import pipeline, schedule
from pallas_kernels.sm90.pipeline import LOG2E
from pallas_kernels.sm90.schedule import BLOCK, TILE

_NUM_STAGES = 3
# dK/dV keeps two [64, H] f32 accumulators live next to sᵀ and dpᵀ: the compute warpgroups take 240 registers (the
# memory warpgroup only issues TMA copies), which with the loop-variant K/V index leaves 4 bytes of spills.
_DKV_COMPUTE_REGISTERS, _DKV_MEMORY_REGISTERS = 240, 24
# The fused layout's shared memory: K, V (64 KB), a 2-stage Q/dO ring (64 KB), dsᵀ (16 KB), the f32 dq staging
# (64 KB), then the schedule at 4 bytes per query block. Up to 3072 query blocks (192k tokens) this stays under the
# H200's 227 KB with Mosaic's alignment padding; longer sequences take the two-kernel layout.
_FUSED_NUM_STAGES = 2
_FUSED_MAX_BLOCKS = 3072


def _dq_kernel(
    # inputs
    q_ref,  # [B, Tp, N, H]
    k_ref,  # [B, Tp, K, H]
    v_ref,  # [B, Tp, K, H]
    do_ref,  # [B, Tp, N, H]
    lse_ref,  # f32 [B, N, Tp], log2 domain of the scaled scores
    delta_ref,  # f32 [B, N, Tp]
    entries_ref,  # int32 [B, N, I/2, Jc/64, 64]
    counts_ref,  # int32 [B, N, I/2]
    # outputs
    dq_ref,  # [B, Tp, N, H]
    # scratch
    q_smem2,  # [2, 64, H], reused for dq
    do_smem2,  # [2, 64, H]
    k_smem,  # [stages, 64, H]
    v_smem,  # [stages, 64, H]
    lse_smem2,  # f32 [2, 64]
    delta_smem2,  # f32 [2, 64]
    entries_smem,  # int32 [Jc/64, 64]
    k_barriers,
    v_barriers,
    row_barriers,  # [4·2]: q, dO, lse, delta (index 2n + wg)
    entries_barrier,
    k_consumed_barriers,
    v_consumed_barriers,
    *,
    sm_scale: float,
    num_stages: int,
    heads_per_kv_head: int,
):
    batch, head, wg = (lax.axis_index(name) for name in ("batch", "heads", "wg"))
    tile = lax.axis_size("tile") - 1 - lax.axis_index("tile")  # heaviest causal tiles first
    num_steps = counts_ref[batch, head, tile]
    read_entry = pipeline.entry_reader(entries_smem)
    dtype = q_ref.dtype
    head_dim = q_ref.shape[-1]
    scale_log2 = sm_scale * LOG2E

    @pl.when(wg < 2)
    def _compute_wg():
        plgpu.set_max_registers(pipeline.COMPUTE_REGISTERS, action="increase")
        q_block = 2 * tile + wg
        rows = pl.ds(q_block * BLOCK, BLOCK)
        q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
        sources = (q_ref.at[batch, rows, head], do_ref.at[batch, rows, head])
        sources += (lse_ref.at[batch, head, rows], delta_ref.at[batch, head, rows])
        targets = (q_smem, do_smem, lse_smem2.at[wg], delta_smem2.at[wg])
        for n, (src, dst) in enumerate(zip(sources, targets, strict=True)):
            plgpu.copy_gmem_to_smem(src, dst, row_barriers.at[2 * n + wg])
        plgpu.barrier_wait(entries_barrier)
        for n in range(4):
            plgpu.barrier_wait(row_barriers.at[2 * n + wg])
        lse = plgpu.load(lse_smem2.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1))  # [64]
        delta = plgpu.load(delta_smem2.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1))  # [64]
        dq = plgpu.layout_cast(jnp.full((BLOCK, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)

        def skip_block(slot, dq):
            pipeline.skip_kv_slot(slot, k_barriers, v_barriers, k_consumed_barriers, v_consumed_barriers)
            return dq

        def grad_block(slot, dq, *, causal: bool):
            plgpu.barrier_wait(k_barriers.at[slot])
            plgpu.barrier_wait(v_barriers.at[slot])

            def compute_s_dp(s_ref, dp_ref):  # both matmuls in flight at once, one wait (as dK/dV pairs dV, dPᵀ)
                plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                plgpu.wgmma(dp_ref, do_smem, plgpu.transpose_ref(v_smem.at[slot], (1, 0)))
                return s_ref[...], dp_ref[...]

            block = plgpu.ACC((BLOCK, BLOCK), jnp.float32)
            s, dp = pl.run_scoped(compute_s_dp, block, block)  # [64 queries, 64 keys] each
            plgpu.barrier_arrive(v_consumed_barriers.at[slot])
            if causal:
                s = pipeline.causal_mask(s)
            p = jnp.exp2(s * scale_log2 - lax.broadcast_in_dim(lse, s.shape, [0]))
            ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))

            def compute_dq(acc_ref):
                plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem.at[slot])

            dq = pl.run_state(compute_dq)(plgpu.ACC.init(dq))
            plgpu.barrier_arrive(k_consumed_barriers.at[slot])
            return dq

        def step(s, dq):
            entry = read_entry(s)
            used = pipeline.used_by(entry, wg)
            slot = lax.rem(s, num_stages)
            branch = pipeline.schedule_branch(used, lambda: pipeline.block_of(entry) == q_block)
            branches = [  # indexed by pipeline.SKIP, OFF_DIAGONAL, DIAGONAL
                functools.partial(skip_block, slot),
                functools.partial(grad_block, slot, causal=False),
                functools.partial(grad_block, slot, causal=True),
            ]
            return lax.switch(branch, branches, dq)

        dq = lax.fori_loop(0, num_steps, step, dq)
        q_smem[...] = (dq * sm_scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[batch, rows, head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory_wg():
        plgpu.set_max_registers(pipeline.MEMORY_REGISTERS, action="decrease")
        kv_head = lax.div(head, jnp.array(heads_per_kv_head, head.dtype))
        pipeline.load_schedule(entries_ref.at[batch, head, tile], entries_smem, entries_barrier)

        slots = (lambda slot: k_smem.at[slot], lambda slot: v_smem.at[slot])
        barriers = ((k_barriers, v_barriers), (k_consumed_barriers, v_consumed_barriers))
        pipeline.stream_kv_blocks((k_ref, v_ref), slots, *barriers, read_entry=read_entry, batch=batch,
                                  kv_head=kv_head, num_steps=num_steps, num_stages=num_stages)  # fmt: skip


def _dkv_kernel(
    # inputs
    q_ref,  # [B, Tp, N, H]
    k_ref,  # [B, Tp, K, H]
    v_ref,  # [B, Tp, K, H]
    do_ref,  # [B, Tp, N, H]
    lse_ref,  # f32 [B, N, Tp], log2 domain
    delta_ref,  # f32 [B, N, Tp]
    entries_ref,  # int32 [B, N, J/2, Ic/64, 64]: pairs of key blocks, columns = query blocks
    counts_ref,  # int32 [B, N, J/2]
    *rest,
    sm_scale: float,
    num_stages: int,
    heads_per_kv_head: int,
    fused_dq: bool = False,
):
    if fused_dq:
        dq_acc_ref, *rest = rest  # input f32 [B, Tp, N, H], zeros on entry, Σ over key blocks of ds k on exit
    (
        # outputs
        dk_ref,  # [B, Tp, N, H], per query head
        dv_ref,  # [B, Tp, N, H], per query head
        # scratch
        k_smem2,  # [2, 64, H], reused for dk
        v_smem2,  # [2, 64, H], reused for dv
        q_smem,  # [stages, 64, H]
        do_smem,  # [stages, 64, H]
        lse_smem,  # f32 [stages, 64]
        delta_smem,  # f32 [stages, 64]
        entries_smem,  # int32 [Ic/64, 64]
        kv_barriers,  # [2·2]: k, v (index 2n + wg)
        ring_barriers,  # [4·stages]: q, dO, lse, delta (index n·stages + slot)
        entries_barrier,
        consumed_barriers,  # [stages], two arrivals
        *fused_scratch,  # with fused_dq: ds_smem2 [2, 64, 64] (each warpgroup's dsᵀ), dq_smem2 f32 [2, 64, H]
    ) = rest
    ds_smem2, dq_smem2 = fused_scratch or (None, None)
    # Key tile 0 has the most query blocks below it: the natural order is already heaviest first.
    batch, tile, head, wg = (lax.axis_index(name) for name in ("batch", "tile", "heads", "wg"))
    num_steps = counts_ref[batch, head, tile]
    read_entry = pipeline.entry_reader(entries_smem)
    dtype = q_ref.dtype
    head_dim = q_ref.shape[-1]
    scale_log2 = sm_scale * LOG2E
    kv_head = lax.div(head, jnp.array(heads_per_kv_head, head.dtype))

    @pl.when(wg < 2)
    def _compute_wg():
        plgpu.set_max_registers(_DKV_COMPUTE_REGISTERS, action="increase")
        kv_block = 2 * tile + wg
        keys = pl.ds(kv_block * BLOCK, BLOCK)
        k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
        plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head], k_smem, kv_barriers.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, kv_head], v_smem, kv_barriers.at[2 + wg])
        plgpu.barrier_wait(entries_barrier)
        plgpu.barrier_wait(kv_barriers.at[wg])
        plgpu.barrier_wait(kv_barriers.at[2 + wg])
        zeros = jnp.full((BLOCK, head_dim), 0, jnp.float32)
        dk = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
        dv = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)

        def wait_slot(slot):
            for n in range(4):
                plgpu.barrier_wait(ring_barriers.at[n * num_stages + slot])

        def skip_block(slot, carry):
            wait_slot(slot)
            plgpu.barrier_arrive(consumed_barriers.at[slot])
            return carry

        def grad_block(slot, kv_index, query_block, carry, *, causal: bool):
            k_smem, v_smem = k_smem2.at[kv_index], v_smem2.at[kv_index]  # this warpgroup's, see `step`
            dk, dv = carry
            wait_slot(slot)

            def compute_st(acc_ref):
                plgpu.wgmma(acc_ref, k_smem, plgpu.transpose_ref(q_smem.at[slot], (1, 0)))
                return acc_ref[...]

            st = pl.run_scoped(compute_st, plgpu.ACC((BLOCK, BLOCK), jnp.float32))  # [64 keys, 64 queries]
            if causal:
                st = pipeline.causal_mask(st, keys_first=True)
            lse = plgpu.load(lse_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))  # [64 queries]
            pt = jnp.exp2(st * scale_log2 - lax.broadcast_in_dim(lse, st.shape, [1]))

            def compute_dv_dpt(refs):
                dv_ref, dpt_ref = refs
                plgpu.wgmma(dv_ref, pt.astype(dtype), do_smem.at[slot])
                plgpu.wgmma(dpt_ref, v_smem, plgpu.transpose_ref(do_smem.at[slot], (1, 0)))

            dpt_zeros = plgpu.layout_cast(jnp.full((BLOCK, BLOCK), 0, jnp.float32), plgpu.Layout.WGMMA)
            dv, dpt = pl.run_state(compute_dv_dpt)((plgpu.ACC.init(dv), plgpu.ACC.init(dpt_zeros)))
            delta = plgpu.load(delta_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))  # [64 queries]
            dst = pt * (dpt - lax.broadcast_in_dim(delta, st.shape, [1]))

            def compute_dk(acc_ref):
                plgpu.wgmma(acc_ref, dst.astype(dtype), q_smem.at[slot])

            dk = pl.run_state(compute_dk)(plgpu.ACC.init(dk))
            plgpu.barrier_arrive(consumed_barriers.at[slot])
            if fused_dq:
                add_partial_dq(dst.astype(dtype), k_smem, query_block)
            return dk, dv

        def add_partial_dq(dst16, k_smem, query_block):
            """dq[query block] += ds k of this key block, by TMA reduce-add into dq_acc_ref: dsᵀ goes through shared
            memory (the wgmma's A operand, transposed), the f32 partial through swizzled shared memory (unswizzled,
            its 8-way bank conflicts made the fused backward slower than two kernels; BENCHMARKS.md)."""
            ds_smem, dq_smem = ds_smem2.at[wg], dq_smem2.at[wg]
            ds_smem[...] = dst16
            plgpu.commit_smem()

            def compute_dq(acc_ref):
                plgpu.wgmma(acc_ref, plgpu.transpose_ref(ds_smem, (1, 0)), k_smem)
                return acc_ref[...]

            dq = pl.run_scoped(compute_dq, plgpu.ACC((BLOCK, head_dim), jnp.float32))  # [64 queries, H]
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous step's reduce has read dq_smem
            dq_smem[...] = dq
            plgpu.commit_smem()
            rows = pl.ds(query_block * BLOCK, BLOCK)
            plgpu.copy_smem_to_gmem(dq_smem, dq_acc_ref.at[batch, rows, head], reduction_op="add")

        def step(s, carry):
            entry = read_entry(s)
            used = pipeline.used_by(entry, wg)
            slot = lax.rem(s, num_stages)
            query_block = pipeline.block_of(entry)
            branch = pipeline.schedule_branch(used, lambda: query_block == kv_block)
            # Always wg (entries are < 2^18), but LLVM cannot prove it: with a constant index it hoists the 16
            # wgmma descriptors of this warpgroup's K and V (32 registers) out of the loop, and ptxas then spilled
            # 212 bytes per thread in the loop (the backward's time in BENCHMARKS.md, "dK/dV spilled registers").
            kv_index = wg + (entry >> 30)
            branches = [  # indexed by pipeline.SKIP, OFF_DIAGONAL, DIAGONAL
                functools.partial(skip_block, slot),
                functools.partial(grad_block, slot, kv_index, query_block, causal=False),
                functools.partial(grad_block, slot, kv_index, query_block, causal=True),
            ]
            return lax.switch(branch, branches, carry)

        dk, dv = lax.fori_loop(0, num_steps, step, (dk, dv))
        k_smem[...] = (dk * sm_scale).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[batch, keys, head])
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[batch, keys, head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory_wg():
        plgpu.set_max_registers(_DKV_MEMORY_REGISTERS, action="decrease")
        pipeline.load_schedule(entries_ref.at[batch, head, tile], entries_smem, entries_barrier)

        def fetch(s, slot):
            rows = pl.ds(pipeline.block_of(read_entry(s)) * BLOCK, BLOCK)
            sources = (q_ref.at[batch, rows, head], do_ref.at[batch, rows, head])
            sources += (lse_ref.at[batch, head, rows], delta_ref.at[batch, head, rows])
            targets = (q_smem.at[slot], do_smem.at[slot], lse_smem.at[slot], delta_smem.at[slot])
            for n, (src, dst) in enumerate(zip(sources, targets, strict=True)):
                plgpu.copy_gmem_to_smem(src, dst, ring_barriers.at[n * num_stages + slot])

        pipeline.stream_blocks(fetch, (consumed_barriers,), num_steps=num_steps, num_stages=num_stages)


def _launch(kernel, inputs, out_types, scratch, *, num_tiles, batch, num_q_heads):
    def body(*refs):
        pl.run_scoped(
            lambda *scoped: kernel(*refs, *(x for group in scoped for x in group)),
            *scratch,
            collective_axes="wg",
        )

    # `pl.kernel` with a Mosaic GPU mesh, not `plgpu.kernel`: the latter's batching wrapper (custom_vmap) rejects
    # writes to a `jax.new_ref` operand, which the fused dQ accumulates into.
    mesh = plgpu.Mesh(
        grid=(batch, num_q_heads, num_tiles),  # tiles fastest: see `sm90.flash_attention` on L2 reuse
        grid_names=pipeline.GRID_NAMES,
        num_threads=pipeline.NUM_WARPGROUPS,
        thread_name="wg",
        kernel_name="body",
    )
    return pl.kernel(body, out_type=out_types, mesh=mesh, compiler_params=pipeline.compiler_params())(*inputs)


def block_sparse_attention_bwd_sm90(
    q, k, v, block_mask, out, lse, d_out, d_lse, *, sm_scale, fused_dq: bool | None = None
):
    """Gradients of block-sparse attention on Hopper; the same contract as `reference.block_sparse_attention_bwd`.

    q, out, d_out: [B, T, N, H]; k, v: [B, T, K, H]; block_mask: bool [B, N, I, J] (entries above the diagonal
    ignored); lse, d_lse: f32 [B, N, T]. Returns dq [B, T, N, H] and
    dk, dv [B, T, K, H] (summed over each kv head's group of query heads).
    `fused_dq`: the one-kernel layout (None: whenever its shared memory fits, up to 192k tokens; see the module).
    """
    pipeline.check_supported(q, k)
    if q.shape[-1] > 128:
        raise NotImplementedError("the Mosaic GPU backward supports head_dim <= 128")
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    padded_len = schedule.padded_length(seq_len)
    num_blocks = padded_len // BLOCK
    q_p, k_p, v_p, do_p = (schedule.pad_rows(x, padded_len) for x in (q, k, v, d_out))
    rows = ((0, 0), (0, 0), (0, padded_len - seq_len))
    # Padded rows carry a zero cotangent; a finite lse there keeps their (unused) probabilities finite.
    lse_p = jnp.pad(jnp.where(jnp.isfinite(lse), lse, 0.0), rows) * LOG2E  # [B, N, Tp]
    delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32)) - d_lse
    delta_p = jnp.pad(delta, rows)  # [B, N, Tp]
    block_mask = schedule.pad_block_mask(block_mask, num_blocks)  # [B, N, Ip, Ip]
    # [B, N, J, I]: the query blocks of each key block
    kv_entries, kv_counts = schedule.pair_schedule(jnp.swapaxes(block_mask, -1, -2))
    if fused_dq is None:
        fused_dq = num_blocks <= _FUSED_MAX_BLOCKS
    stages = _FUSED_NUM_STAGES if fused_dq else _NUM_STAGES

    def rows_smem(n):
        return pipeline.swizzled_smem((n, BLOCK, head_dim), q.dtype)

    common = dict(num_tiles=padded_len // TILE, batch=batch, num_q_heads=num_q_heads)
    kernel_args = dict(sm_scale=sm_scale, num_stages=stages, heads_per_kv_head=group)
    if fused_dq:
        dq_acc = jax.new_ref(jnp.zeros(q_p.shape, jnp.float32))  # [B, Tp, N, H]
        f32_transforms = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
        dq_scratch = (
            pipeline.swizzled_smem((2, BLOCK, BLOCK), q.dtype),
            plgpu.SMEM((2, BLOCK, head_dim), jnp.float32, transforms=f32_transforms),
        )
        dkv_inputs, dkv_scratch = (dq_acc,), (dq_scratch,)
    else:
        dkv_inputs = dkv_scratch = ()
        q_entries, q_counts = schedule.pair_schedule(block_mask)
        dq = _launch(
            functools.partial(_dq_kernel, **kernel_args),
            (q_p, k_p, v_p, do_p, lse_p, delta_p, q_entries, q_counts),
            jax.ShapeDtypeStruct(q_p.shape, q.dtype),
            (
                (rows_smem(2), rows_smem(2), rows_smem(stages), rows_smem(stages)),
                (plgpu.SMEM((2, BLOCK), jnp.float32), plgpu.SMEM((2, BLOCK), jnp.float32)),
                (plgpu.SMEM(q_entries.shape[-2:], jnp.int32),),
                (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages)),
                (plgpu.Barrier(num_barriers=8), plgpu.Barrier(num_barriers=1)),
                (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            ),
            **common,
        )
    per_head = jax.ShapeDtypeStruct(q_p.shape, q.dtype)
    dk_heads, dv_heads = _launch(
        functools.partial(_dkv_kernel, **kernel_args, fused_dq=fused_dq),
        (q_p, k_p, v_p, do_p, lse_p, delta_p, kv_entries, kv_counts, *dkv_inputs),
        (per_head, per_head),
        (
            (rows_smem(2), rows_smem(2), rows_smem(stages), rows_smem(stages)),
            (plgpu.SMEM((stages, BLOCK), jnp.float32), plgpu.SMEM((stages, BLOCK), jnp.float32)),
            (plgpu.SMEM(kv_entries.shape[-2:], jnp.int32),),
            (plgpu.Barrier(num_barriers=4), plgpu.Barrier(num_barriers=4 * stages)),
            (plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_arrivals=2, num_barriers=stages)),
            *dkv_scratch,
        ),
        **common,
    )
    if fused_dq:
        dq = (dq_acc[...] * sm_scale).astype(q.dtype)

    def group_sum(x):  # [B, Tp, N, H] per query head → [B, T, K, H]
        x = x[:, :seq_len].astype(jnp.float32).reshape(batch, seq_len, num_kv_heads, group, head_dim)
        return x.sum(axis=3).astype(k.dtype)

    return dq[:, :seq_len], group_sum(dk_heads), group_sum(dv_heads)
