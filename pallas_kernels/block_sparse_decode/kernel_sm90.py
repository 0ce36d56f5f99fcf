"""Block-sparse decode attention for Hopper (sm_90), written with Pallas Mosaic GPU (flash-decoding split-K).

Algorithm (SeerAttention-R's index-based decode kernels, on a warp-specialised TMA pipeline):
  * One CTA per (batch row b, kv head k, split s): grid (B, K, num_splits). The T·G query rows of a kv group
    (T draft tokens × G query heads, row r = t·G + g) form one 64-row wgmma tile, so every K/V block loaded serves
    the whole group (decode is memory-bound: the wasted rows cost tensor-core time, which is idle anyway, not
    bytes). With one token (T = 1) the group's G heads are consecutive rows of q, and the kernel copies them by TMA
    straight into the tile's first G rows; rows G … 63 hold whatever shared memory held, which is harmless: every
    row of QKᵀ, the softmax and PV depends only on its own query row, and those rows are never written out. With
    T > 1 the rows interleave tokens and heads, and the wrapper packs them, zero-padded (`pack_queries`).
  * Split-K over the selected blocks, balanced on the real count: split s of (b, k) takes list slots
    [s·c, min((s+1)·c, n)) with n = block_count[b, k] and c = ceil(n / num_splits), so a sparse row's work is
    spread over all its CTAs, and no padding slot is ever read. With 32-key blocks c is even and a step takes two
    list slots (below). Both warpgroups read the block ids of their slots
    straight from global memory (a scalar load each, issued ahead of the barrier wait that follows it).
  * A memory warpgroup streams those K/V blocks by TMA into a `num_stages`-deep ring; the compute warpgroup runs
    QKᵀ and PV on the tensor cores with an online softmax in the exp2 domain. Keys past a query's own position (the
    row's partial block, draft tokens) are masked with iota on every block, so the list may be in any order.
    With `Config.compute_warpgroups` = 2 (the default) two compute warpgroups take alternate steps, each with its
    own online softmax, and write their partials as two splits, so one's softmax overlaps the other's matmuls. Step
    s uses ring slot s % num_stages, so the ring depth must be even: each warpgroup then always waits on the same
    slots, and its barrier phases stay in step.
  * 32-key blocks (the decode gate's other size) go two per step: list slots 2i and 2i + 1 of a split fill rows
    0 … 31 and 32 … 63 of one 64-key ring slot, so QKᵀ and PV are the 64-key block's (a PV over 32 keys cannot
    be issued: with the 128-byte swizzle, wgmma's contraction comes in groups of 64 bf16). A split's odd last
    slot pairs with itself, its second copy masked. At head_dim 64 a step may hold 128 keys
    (`Config.keys_per_step`): two 64-key blocks or four 32-key ones, filled the same way, so a step moves 32 KB of
    K and V as at head_dim 128 and a long split pays the per-step cost half as often; the slots past a split's
    end repeat its last one, masked.
  * Block j of row b (block size n, 64 or 32) is positions j·n … j·n + n − 1 = cache slots starts[b] + j·n …: a
    window at any slot, not a multiple of n (left-padded caches). The TMA copies it at that dynamic slot, which
    needs a shared-memory layout without the usual 8-row tiling (a tiled copy splits the slot into tile and row,
    so its start must be a multiple of 8): each 64-column half of H is copied as one untiled [n, 64] box with the
    128-byte swizzle, and read by wgmma through an aliased (8, 64)-tiled view of the same bytes (`_ring`). Rows
    of a window past the cache's last slot S − 1 are out of bounds for the TMA, which fills them with zeros (never
    NaN, never the next row's slots); they are past the row's length, so masked anyway.
  * Each CTA writes its normalised partial output (float32, the first T·G rows rounded up to 8: a 64-row
    write was 4 MB per step at batch 1 and 128k, for 4 rows used) and its log2-domain lse; `combine`
    (XLA, a few µs) merges the splits by their logsumexp. A split with nothing to do writes out 0, lse −inf
    (weight 0); a query that attends nothing ends as out 0, lse −inf, never NaN: the running max starts at a
    finite −1e30, so fully masked blocks never make inf − inf.

Layout limits: q [B, T, N, H] with T·G ≤ 64, caches [B, S, K, H] (any S), bf16 or fp16, H ∈ {64, 128},
block_size 32 or 64 (the decode gate's sizes; 32-key blocks two per 64-key step). Anything else raises
NotImplementedError (the dispatcher then runs the reference).
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

BLOCK = 64  # query rows per wgmma tile, columns per swizzled half of H, and the default keys per K/V block
BLOCK_SIZES = (32, 64)  # keys per K/V block (the decode gate's block size) the kernel supports
_LOG2E = math.log2(math.e)
_M_INIT = -1e30  # running-max floor (log2 domain): finite, so masked blocks give exp2(-inf) = 0, never inf - inf


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Tuning knobs of the decode kernel."""

    num_splits: int  # CTAs per (row, kv head), each over ~1/num_splits of the selected blocks
    num_stages: int = 4  # depth of the K/V shared-memory ring (64-key steps in flight per CTA)
    # Compute warpgroups per CTA: with 2 they take alternate steps of the ring, each with its own online softmax, and
    # write their partials as two splits (one's softmax overlaps the other's matmuls; `combine` merges them). The
    # field's default is the one-warpgroup kernel; `default_config`, which the op uses, picks 2.
    compute_warpgroups: int = 1
    # Keys per ring step: 64, or 128 at head_dim 64, where a 64-key step is only 8 KB of K (and 8 of V) and the
    # per-step cost, not bandwidth, bounds a long split. A step of 128 keys holds two 64-key blocks (four 32-key ones).
    keys_per_step: int = BLOCK

    def __post_init__(self):
        if self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {self.num_splits}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.compute_warpgroups not in (1, 2):
            raise ValueError(f"compute_warpgroups must be 1 or 2, got {self.compute_warpgroups}")
        if self.compute_warpgroups == 2 and self.num_stages % 2:
            # Step s goes to warpgroup s % 2 and ring slot s % num_stages: with an odd ring a slot's fills alternate
            # between the warpgroups, each waits on every other phase of its barrier, and the kernel hangs (seen on
            # the H200 with a 3-deep ring).
            raise ValueError(f"two compute warpgroups need an even num_stages, got {self.num_stages}")
        if self.keys_per_step not in (BLOCK, 2 * BLOCK):
            raise ValueError(f"keys_per_step must be {BLOCK} or {2 * BLOCK}, got {self.keys_per_step}")


def num_sms() -> int:
    """Streaming multiprocessors of the default device (132 on an H200 SXM)."""
    return getattr(jax.devices()[0], "core_count", 132)


def default_config(*, batch: int, num_kv_heads: int, num_slots: int, head_dim: int, block_size: int = BLOCK) -> Config:
    """One wave of CTAs, one per SM (the ring takes most of its shared memory): as many splits as fit in
    sms // (B·K), but at least 256 keys (4 blocks of 64, 8 of 32) per split. 136 CTAs for 132 SMs leave 4 for a
    second wave (B=1, 128k, sparsity 0 took 0.25 ms with 17 splits, 0.18 ms with 16). More splits do not pay: in
    device traces (B=1, 128k, sparsity 0.9) 16 / 24 / 32 splits took 19.0 / 26.3 / 25.1 µs of kernel time, and at
    B=16 (128k, 0.9) 1 / 2 / 3 splits 208 / 215 / 219 µs (two waves of half-length CTAs looked ~10% faster in
    wall-clock timing, which the device trace does not confirm).

    A step moves 32 KB of K and V: 64 keys at head_dim 128, 128 keys at 64 (`Config.keys_per_step`; at B=1 and
    sparsity 0 0.87–0.89× cuDNN against 0.76× at 32k and 0.85× at 128k with 64-key steps in an 8-deep ring, at
    B=16 1.00× against 0.95–0.98×, device time, two interleaved runs each). The ring holds 4 steps, 128 KiB in
    flight per SM; a 5-deep ring at head_dim 128 gained nothing at B=1 (19.6 against 19.0 µs), a 6-deep one does
    not fit in shared memory. A split of at most 32 steps (B=1 and 128k at sparsity 0.9: 13) runs a 2-deep ring:
    20.3 against 21.6 µs, three interleaved runs each (3-deep 20.9), while at B=16 (205 steps) 2-deep was slower
    (213 against 208 µs); why is not profiled. Two compute warpgroups: at B=16, 128k, sparsity 0 the kernel took
    1.98 ms against 2.05–2.15 ms with one (0.96× cuDNN against 0.88–0.92×, two interleaved runs each); at sparsity
    0.9 and at B=1 they change nothing measurable (9.10–9.15× against 9.12–9.14×; 6.29–6.30× against 6.24–6.36×).
    BENCHMARKS.md, issue 18."""
    keys = 2 * BLOCK if head_dim == BLOCK else BLOCK
    per_step = keys // block_size
    splits = max(1, num_sms() // (batch * num_kv_heads))
    splits = min(splits, max(1, num_slots * block_size // (4 * BLOCK)))
    steps = -(-num_slots // (splits * per_step))  # per split, when every list slot is used
    stages = 2 if steps <= 32 else 4
    return Config(num_splits=splits, num_stages=stages, compute_warpgroups=2, keys_per_step=keys)


def check_supported(q: jax.Array, k_cache: jax.Array, block_size: int) -> None:
    """Raises NotImplementedError unless this kernel can run these inputs on the default device."""
    if not dispatch.hopper_available():
        raise NotImplementedError(f"the Mosaic GPU kernels need a Hopper (sm_90) GPU, found {jax.devices()[0]}")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"Mosaic GPU decode supports bf16/fp16, got {q.dtype}")
    if q.shape[-1] not in (64, 128):
        raise NotImplementedError(f"head_dim must be 64 or 128, got {q.shape[-1]}")
    if block_size not in BLOCK_SIZES:
        raise NotImplementedError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    num_queries, num_q_heads = q.shape[1], q.shape[2]
    rows = num_queries * (num_q_heads // k_cache.shape[2])
    if rows > BLOCK:
        raise NotImplementedError(f"T · G query rows per kv head must be <= {BLOCK}, got {rows}")


def _decode_kernel(
    # inputs
    q_ref,  # [B, 1, N, H] (direct_q: the raw queries) or [B, K, 64, H] (each group's T·G rows, zero-padded)
    k_ref,  # [B, S, K, H]
    v_ref,  # [B, S, K, H]
    lengths_ref,  # int32 [B]
    starts_ref,  # int32 [B]: cache slot of each row's position 0
    index_ref,  # int32 [B, K, M]: block lists
    count_ref,  # int32 [B, K]
    # outputs
    out_ref,  # f32 [B, K, splits·W, R, H]: each split's (and compute warpgroup's) normalised partial output (R = T·G
    # rounded up to 8)
    lse_ref,  # f32 [B, K, splits·W, R]: their logsumexps, log2 domain (−inf: nothing attended)
    # scratch
    q_smem,  # [H/64, 64, 64]: the query rows, by 64-column half of H (`_ring`: a copy view and a wgmma view)
    k_ring,  # [stages, H/64, keys, 64]: K of one step's 64 or 128 keys (1, 2 or 4 blocks) by half of H (`_ring`)
    v_ring,  # [stages, H/64, keys, 64]: V, likewise
    out_smem,  # f32 [64, H] ([W, 64, H] with W = 2 compute warpgroups)
    lse_smem,  # f32 [64] ([W, 64])
    k_barriers,
    v_barriers,
    q_barrier,
    k_consumed_barriers,
    v_consumed_barriers,
    *,
    sm_scale: float,
    num_stages: int,
    num_splits: int,
    num_queries: int,
    group: int,
    direct_q: bool,
    block_size: int,
    compute_warpgroups: int,
    interpret: bool,
):
    batch = lax.axis_index("batch")
    kv_head = lax.axis_index("kv_heads")
    split = lax.axis_index("split")
    wg = lax.axis_index("wg")
    k_copy, k_mma = (k_ring, k_ring) if interpret else k_ring
    v_copy, v_mma = (v_ring, v_ring) if interpret else v_ring
    keys = k_mma.shape[-2]  # keys per step (`Config.keys_per_step`)
    per_step = keys // block_size  # list slots per step: 1, 2 or 4
    count = count_ref[batch, kv_head]
    per_split = lax.div(count + (num_splits * per_step - 1), num_splits * per_step) * per_step  # a multiple of it
    first = split * per_split
    end = first + jnp.clip(count - first, 0, per_split)  # this split's list slots: [first, end)
    num_steps = lax.div(end - first + (per_step - 1), per_step)
    q_copy, q_mma = (q_smem, q_smem) if interpret else q_smem
    num_halves = q_mma.shape[0]
    head_dim = num_halves * BLOCK
    dtype = q_mma.dtype
    out_rows = lse_ref.shape[-1]
    scale_log2 = sm_scale * _LOG2E

    # Register layouts are Mosaic GPU lowering hints, which jax's GPU interpreter (CPU) cannot lower.
    def full(shape, value, layout):
        array = jnp.full(shape, value, jnp.float32)
        return array if interpret else plgpu.layout_cast(array, layout)

    def iota(dimension):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, (BLOCK, keys), dimension)
        return plgpu.broadcasted_iota(jnp.int32, (BLOCK, keys), dimension, layout=plgpu.Layout.WGMMA)

    def scores(slot):
        """Q Kᵀ of the block in ring slot `slot` on the tensor cores, f32 [64 rows, keys]: one wgmma per half."""
        if interpret:  # the interpreter's wgmma takes no transposed operand
            q = jnp.concatenate([q_mma[half] for half in range(num_halves)], axis=-1)  # [64, H]
            k = jnp.concatenate([k_mma[slot, half] for half in range(num_halves)], axis=-1)  # [64, H]
            return jnp.dot(q, k.T, preferred_element_type=jnp.float32)

        def scoped(acc_ref):
            for half in range(num_halves):
                plgpu.wgmma(acc_ref, q_mma.at[half], k_mma.at[slot, half].transpose((1, 0)))
            return acc_ref[...]

        return pl.run_scoped(scoped, plgpu.ACC((BLOCK, keys), jnp.float32))

    def weighted_values(p16, slot):
        """p16 [64 rows, keys] @ the V block in ring slot `slot`, f32 [64 rows, H]: one wgmma per half."""
        if interpret:
            v = jnp.concatenate([v_mma[slot, half] for half in range(num_halves)], axis=-1)  # [64, H]
            return jnp.dot(p16, v, preferred_element_type=jnp.float32)

        def scoped(acc_ref):
            for half in range(num_halves):
                columns = slice(half * BLOCK, (half + 1) * BLOCK)
                plgpu.wgmma(acc_ref.at[:, columns], p16, v_mma.at[slot, half])
            return acc_ref[...]

        return pl.run_scoped(scoped, plgpu.ACC((BLOCK, head_dim), jnp.float32))

    def read_block_ids(s):
        """The block ids of the split's step s (per_step of them), loaded from the list in global memory; a split's
        odd last slot is read twice (the second copy is masked)."""
        slot = first + s * per_step
        return [index_ref[batch, kv_head, jnp.minimum(slot + i, end - 1) if i else slot] for i in range(per_step)]

    def copy_q():
        for half in range(num_halves):
            columns = pl.ds(half * BLOCK, BLOCK)
            if direct_q:  # the group's G heads, consecutive in q: the tile's rows 0 … G − 1
                heads = pl.ds(kv_head * group, group)
                plgpu.copy_gmem_to_smem(q_ref.at[batch, 0, heads, columns], q_copy.at[half, pl.ds(0, group)], q_barrier)
            else:
                plgpu.copy_gmem_to_smem(q_ref.at[batch, kv_head, :, columns], q_copy.at[half], q_barrier)

    num_compute = compute_warpgroups

    @pl.when(wg < num_compute)
    def _compute_wg():
        plgpu.set_max_registers(232, action="increase")
        if num_compute == 1:
            copy_q()
        else:
            pl.when(wg == 0)(copy_q)  # one copy; every compute warpgroup waits on it
        # Query row r = t·G + g sits at position lengths[b] − T + t and attends keys up to it.
        rows = iota(0)
        cols = iota(1)
        last_position = lengths_ref[batch] - num_queries
        limits = last_position + (lax.div(rows, group) if num_queries > 1 else 0)  # [64, 64]: key ≤ limit
        plgpu.barrier_wait(q_barrier)

        m_i = full((BLOCK,), _M_INIT, plgpu.Layout.WGMMA.reduce(1))
        l_i = full((BLOCK,), 0, plgpu.Layout.WGMMA.reduce(1))
        acc = full((BLOCK, head_dim), 0, plgpu.Layout.WGMMA)

        def step(i, carry):
            acc, m_i, l_i = carry
            s = i if num_compute == 1 else i * num_compute + wg  # compute warpgroup w takes steps w, w + W, …
            slot = lax.rem(s, num_stages)
            block_ids = read_block_ids(s)
            key_offset = block_ids[0] * block_size  # position of column 0's key
            if per_step > 1:  # column c: key c % n of the step's block c // n, or past every limit when a slot repeats
                column_block = lax.div(cols, block_size)
                offsets = [key_offset] + [
                    jnp.where(first + per_step * s + i < end, block_ids[i] * block_size - i * block_size, 1 << 30)
                    for i in range(1, per_step)
                ]
                for i in range(1, per_step):  # [64, keys]: offsets[i] from column i·n on
                    from_here = jnp.minimum(jnp.maximum(column_block - (i - 1), 0), 1)  # 1 in columns ≥ i·n
                    key_offset = key_offset + from_here * (offsets[i] - offsets[i - 1])
            plgpu.barrier_wait(k_barriers.at[slot])

            qk = scores(slot)  # [64 rows, keys]
            plgpu.barrier_arrive(k_consumed_barriers.at[slot])
            qk = jnp.where(cols + key_offset <= limits, qk * scale_log2, -jnp.inf)
            m_new = jnp.maximum(m_i, qk.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(qk - lax.broadcast_in_dim(m_new, qk.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            plgpu.barrier_wait(v_barriers.at[slot])

            # PV into a fresh accumulator, added in registers (64 adds per thread; runs in jax's GPU interpreter).
            pv = weighted_values(p16, slot)  # [64 rows, H]
            plgpu.barrier_arrive(v_consumed_barriers.at[slot])
            return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_new, l_i

        my_steps = num_steps if num_compute == 1 else lax.div(num_steps - wg + (num_compute - 1), num_compute)
        acc, m_i, l_i = lax.fori_loop(0, my_steps, step, (acc, m_i, l_i))
        empty = l_i == 0  # nothing attended by this row in this split: out 0, lse −inf (weight 0 in `combine`)
        acc /= lax.broadcast_in_dim(jnp.where(empty, 1.0, l_i), (BLOCK, head_dim), [0])
        out_buf, lse_buf, part = out_smem, lse_smem, split
        if num_compute > 1:  # each compute warpgroup's partial is a split of its own
            out_buf, lse_buf, part = out_smem.at[wg], lse_smem.at[wg], split * num_compute + wg
        out_buf[...] = acc
        lse_buf[...] = jnp.where(empty, -jnp.inf, m_i + jnp.log2(jnp.where(empty, 1.0, l_i)))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_buf.at[pl.ds(0, out_rows)], out_ref.at[batch, kv_head, part])
        plgpu.copy_smem_to_gmem(lse_buf.at[pl.ds(0, out_rows)], lse_ref.at[batch, kv_head, part])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == num_compute)
    def _memory_wg():
        plgpu.set_max_registers(40, action="decrease")
        row_start = starts_ref[batch]

        def fetch(ring, barrier, cache_ref, slot, block_ids):
            """Copies the step's blocks of (b, kv head) from `cache_ref` into ring slot `slot`, half by half."""
            for i, block_id in enumerate(block_ids):
                first_key = row_start + block_id * block_size  # its first cache slot: dynamic, any alignment
                for half in range(num_halves):
                    window = (batch, pl.ds(first_key, block_size), kv_head, pl.ds(half * BLOCK, BLOCK))
                    rows = (
                        ring.at[slot, half] if per_step == 1 else ring.at[slot, half, pl.ds(i * block_size, block_size)]
                    )
                    plgpu.copy_gmem_to_smem(cache_ref.at[window], rows, barrier.at[slot])

        for s in range(num_stages):

            @pl.when(s < num_steps)
            def _prologue(s=s):
                block_ids = read_block_ids(s)
                fetch(k_copy, k_barriers, k_ref, s, block_ids)
                fetch(v_copy, v_barriers, v_ref, s, block_ids)

        @pl.loop(num_stages, jnp.maximum(num_steps, num_stages))
        def _refill(s):
            slot = lax.rem(s, num_stages)
            block_ids = read_block_ids(s)  # loaded while the slot's previous blocks are still in use
            plgpu.barrier_wait(k_consumed_barriers.at[slot])
            fetch(k_copy, k_barriers, k_ref, slot, block_ids)
            plgpu.barrier_wait(v_consumed_barriers.at[slot])
            fetch(v_copy, v_barriers, v_ref, slot, block_ids)

        if interpret:
            # Drain: observe the last `num_stages` consumptions too. jax's GPU interpreter checks that a thread
            # observes every phase of a barrier it waits on; on the GPU the unobserved last phases are harmless (the
            # CTA ends), so the compiled kernel skips this.
            @pl.loop(jnp.maximum(num_steps, num_stages) - num_stages, num_steps)
            def _drain(s):
                slot = lax.rem(s, num_stages)
                plgpu.barrier_wait(k_consumed_barriers.at[slot])
                plgpu.barrier_wait(v_consumed_barriers.at[slot])


def _ring(shape, dtype, *, interpret: bool):
    """The K (or V) ring [stages, H/64, 64, 64] or the query tile [H/64, 64, 64], as (copy view, wgmma view) of
    the same shared memory.

    The TMA fills it through the copy view: untiled, 128-byte swizzle, so a block's first cache slot may be any
    integer. wgmma reads it through the wgmma view: (8, 64)-tiled, 128-byte swizzle. A [64, 64] half (64 rows of
    128 bytes) has the same bytes in both: eight-row tiles of 64 columns are consecutive 128-byte rows, and the
    swizzle is a function of the shared-memory address. Both views start at the union's first byte (each group of
    a RefUnion is laid out from offset 0). jax's GPU interpreter has no RefUnion: there one plain buffer serves as
    both (it ignores layouts).
    """
    swizzle = plgpu.SwizzleTransform(128)
    mma_view = plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, BLOCK)), swizzle))
    if interpret:
        return mma_view
    return plgpu.RefUnion(plgpu.SMEM(shape, dtype, transforms=(swizzle,)), mma_view)


def split_partials(
    q,
    k_cache,
    v_cache,
    lengths,
    starts,
    index,
    count,
    *,
    num_queries: int,
    group: int,
    sm_scale: float,
    config: Config,
    block_size: int = BLOCK,
    interpret=None,
):
    """Runs the kernel. q [B, T, N, H]; starts int32 [B]; index int32 [B, K, M] of `block_size`-key blocks;
    `interpret`: jax's GPU interpreter params.

    Returns out f32 [B, K, P, R, H] and lse f32 [B, K, P, R] (log2 domain) per partial (P = splits × compute
    warpgroups), for query rows r = t·G + g < T·G (rows up to R, T·G rounded up to 8, are padding).
    """
    batch, _, _, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    direct_q = num_queries == 1  # G consecutive heads per group: copied by the kernel, no packing kernel
    if not direct_q:
        q = pack_queries(q, num_kv_heads)  # [B, K, 64, H]
    out_rows = -(-(num_queries * group) // 8) * 8
    stages, splits, compute_wgs = config.num_stages, config.num_splits, config.compute_warpgroups
    keys = config.keys_per_step
    if keys * head_dim > BLOCK * 128:
        raise NotImplementedError(f"keys_per_step {keys} needs head_dim 64 (shared memory), got {head_dim}")
    per_wg = () if compute_wgs == 1 else (compute_wgs,)  # the output buffers: one per compute warpgroup
    halves = head_dim // BLOCK
    swizzle = plgpu.SwizzleTransform(128)

    def body(q_ref, k_ref, v_ref, lengths_ref, starts_ref, index_ref, count_ref, out_ref, lse_ref):
        kernel = functools.partial(
            _decode_kernel,
            q_ref, k_ref, v_ref, lengths_ref, starts_ref, index_ref, count_ref, out_ref, lse_ref,
            sm_scale=sm_scale, num_stages=stages, num_splits=splits, num_queries=num_queries, group=group,
            direct_q=direct_q, block_size=block_size, compute_warpgroups=compute_wgs, interpret=interpret is not None,
        )  # fmt: skip

        def scoped(smem, barriers):
            kernel(*smem, *barriers)

        ring_shape = (stages, halves, keys, BLOCK)
        pl.run_scoped(
            scoped,
            (
                _ring((halves, BLOCK, BLOCK), q.dtype, interpret=interpret is not None),
                _ring(ring_shape, q.dtype, interpret=interpret is not None),
                _ring(ring_shape, q.dtype, interpret=interpret is not None),
                plgpu.SMEM(
                    (*per_wg, BLOCK, head_dim), jnp.float32, transforms=(plgpu.TilingTransform((8, 32)), swizzle)
                ),
                plgpu.SMEM((*per_wg, BLOCK), jnp.float32),
            ),
            (
                # one TMA per block of a step and half of H
                plgpu.Barrier(num_arrivals=halves * (keys // block_size), num_barriers=stages),
                plgpu.Barrier(num_arrivals=halves * (keys // block_size), num_barriers=stages),
                plgpu.Barrier(num_arrivals=halves, num_barriers=1),
                plgpu.Barrier(num_arrivals=1, num_barriers=stages),
                plgpu.Barrier(num_arrivals=1, num_barriers=stages),
            ),
            collective_axes="wg",
        )

    out_type = (
        jax.ShapeDtypeStruct((batch, num_kv_heads, splits * compute_wgs, out_rows, head_dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, num_kv_heads, splits * compute_wgs, out_rows), jnp.float32),
    )
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(batch, num_kv_heads, splits),
        grid_names=("batch", "kv_heads", "split"),
        num_threads=compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret,
    )(q, k_cache, v_cache, lengths, starts, index, count)


def pack_queries(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """q [B, T, N, H] → [B, K, 64, H]: row t·G + g of kv group k holds query t of head k·G + g; rows ≥ T·G are 0."""
    batch, num_queries, num_q_heads, head_dim = q.shape
    group = num_q_heads // num_kv_heads
    rows = q.reshape(batch, num_queries, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)  # [B, K, T, G, H]
    rows = rows.reshape(batch, num_kv_heads, num_queries * group, head_dim)  # [B, K, T·G, H]
    return jnp.pad(rows, ((0, 0), (0, 0), (0, BLOCK - num_queries * group), (0, 0)))  # [B, K, 64, H]


def combine(out_splits: jax.Array, lse_splits_log2: jax.Array, *, num_queries: int, group: int):
    """Merges the splits' partials by their logsumexp: out [B, T, N, H] float32, lse [B, N, T] (natural log).

    out_splits f32 [B, K, splits, R, H] (normalised per split), lse_splits_log2 f32 [B, K, splits, R], R ≥ T·G.
    Splits with lse −inf weigh 0; a row whose splits are all empty gets out 0 and lse −inf.
    """
    batch, num_kv_heads, _, _, head_dim = out_splits.shape
    rows = num_queries * group
    lse = lse_splits_log2[..., :rows] * (1.0 / _LOG2E)  # [B, K, splits, R]
    lse_max = jnp.max(lse, axis=2)  # [B, K, R]
    lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    weights = jnp.exp(lse - lse_max[:, :, None])  # [B, K, splits, R], 0 for empty splits
    total = jnp.sum(weights, axis=2)  # [B, K, R]
    out = jnp.einsum("bksr,bksrh->bkrh", weights, out_splits[..., :rows, :])  # [B, K, R, H]
    out = out / jnp.where(total == 0, 1.0, total)[..., None]
    lse = jnp.where(total == 0, -jnp.inf, lse_max + jnp.log(jnp.where(total == 0, 1.0, total)))  # [B, K, R]
    out = out.reshape(batch, num_kv_heads, num_queries, group, head_dim).transpose(0, 2, 1, 3, 4)  # [B, T, K, G, H]
    out = out.reshape(batch, num_queries, num_kv_heads * group, head_dim)  # [B, T, N, H]
    lse = lse.reshape(batch, num_kv_heads, num_queries, group).transpose(0, 1, 3, 2)  # [B, K, G, T]
    return out, lse.reshape(batch, num_kv_heads * group, num_queries)  # [B, N, T]


def block_sparse_decode_sm90(
    q, k_cache, v_cache, lengths, block_index, block_count, *, starts, block_size: int, sm_scale: float,
    config: Config | None = None, interpret=None,
):  # fmt: skip
    """Block-sparse decode on Hopper; the reference's contract. q [B, T, N, H], caches [B, S, K, H], lengths and
    starts int32 [B], block_index int32 [B, K, M], block_count int32 [B, K] → out [B, T, N, H] in q.dtype, lse f32
    [B, N, T].

    `interpret` (jax's `InterpretGPUParams`) runs the kernel in jax's GPU interpreter on CPU (tests only).
    """
    if interpret is None:
        check_supported(q, k_cache, block_size)
    batch, num_queries, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    num_slots = block_index.shape[-1]
    config = config or default_config(
        batch=batch, num_kv_heads=num_kv_heads, num_slots=num_slots, head_dim=head_dim, block_size=block_size
    )
    out_splits, lse_splits = split_partials(
        q, k_cache, v_cache, lengths, starts, block_index, block_count,
        num_queries=num_queries, group=group, sm_scale=sm_scale, config=config, block_size=block_size,
        interpret=interpret,
    )  # fmt: skip
    out, lse = combine(out_splits, lse_splits, num_queries=num_queries, group=group)
    return out.astype(q.dtype), lse
