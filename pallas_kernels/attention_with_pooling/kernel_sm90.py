"""Causal attention that also emits the 2D max-pooled attention map, for Hopper (Pallas Mosaic GPU).

By default one pass: the dense causal flash attention kernel also writes each query row's maximum scaled score per
64-key block (a slice of the row maximum its softmax needs anyway), f32 [B, N, Jc, rows], and XLA reduces it:
    pooled[i, j] = exp2(max_{r ∈ i} (row_max[j, r] − lse₂[r])).
That buffer is O(T·J), so long sequences go through in chunks of query rows, each chunk's buffer at most
`Config.single_pass_max_bytes` (4 GiB: T = 32k in one chunk at B=1, N=32; 128k in 8) and reduced before the next
chunk starts. Cost: the attention plus one write and one read of the buffers.

With `single_pass_max_bytes=0`, two passes, so that HBM holds nothing of size O(T·J) (the reference Triton kernel
keeps a [B, N, T, J] buffer):
  1. Dense causal flash attention (the block-sparse kernel with every causal block scheduled) gives the output
     and each row's logsumexp.
  2. A QKᵀ-only kernel with the same CTA layout (2 compute warpgroups × 64 query rows, a TMA warpgroup
     streaming K blocks) turns each 64×64 score block into one number:
         pooled[i, j] = max_{r ∈ i, c ∈ j, c ≤ r} exp2(s[r, c] · sm_scale · log2 e − lse₂[r])
                      = exp2(max_r (max_c s[r, c] · sm_scale · log2 e − lse₂[r]))
     i.e. a row max (already needed by any softmax) and one subtraction per row per block. The max across the
     64 query rows is deferred: each warpgroup stores its per-row values of 64 key blocks in a [64, 64] shared
     buffer and reduces it along rows in the WGMMA layout (no cross-warp reduction, whose shared scratch the two
     compute warpgroups would race on). The resulting row of J maxima stays in shared memory until the end.
The row normalisation over j and the zeroing above the diagonal happen in XLA on the small [B, N, I, J] map.

Layout limits: as the block-sparse kernel (bf16/fp16, H ∈ {64, 128, 256}, T == S, T padded to 128 rows).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse_attention.kernel_sm90 import (
    BLOCK,
    TILE,
    check_supported,
    dense_attention_with_row_max_sm90,
    dense_causal_schedule,
    scheduled_attention_sm90,
)
from pallas_kernels.block_sparse_attention.kernel_sm90 import Config as AttentionConfig

_LOG2E = math.log2(math.e)
_TMA_CHUNK = 256  # a TMA box holds at most 256 elements per dimension


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Tuning knobs of both passes."""

    attention: AttentionConfig | None = None  # None: the block-sparse kernel's default for the head dim
    pooling_stages: int = 2  # depth of the K shared-memory ring of pass 2
    single_pass_max_bytes: int = 4 << 30  # row-maxima buffer of one query-row chunk; 0: the two-pass kernels

    def __post_init__(self):
        if self.pooling_stages < 1:
            raise ValueError(f"pooling_stages must be >= 1, got {self.pooling_stages}")
        if self.single_pass_max_bytes < 0:
            raise ValueError(f"single_pass_max_bytes must be >= 0, got {self.single_pass_max_bytes}")


DEFAULT_CONFIG = Config()


def _pooling_kernel(
    # inputs
    q_ref,  # [B, Tp, N, H]
    k_ref,  # [B, Tp, K, H]
    lse_ref,  # f32 [B, N, Tp], log2 domain of the scaled scores; +inf on padded rows
    # outputs
    pooled_ref,  # f32 [B, N, Ip, Jc]; only j <= i is meaningful (Jc = Ip rounded up to 64)
    # scratch
    q_smem2,  # [2, 64, H]
    k_smem,  # [stages, 64, H]
    lse_smem2,  # f32 [2, 64]
    chunk_smem2,  # f32 [2, 64, 64]: per key block of the current chunk, each query row's log2 max probability
    pooled_smem2,  # f32 [2, Jc]
    k_barriers,
    q_barriers,
    lse_barriers,
    k_consumed_barriers,
    *,
    sm_scale: float,
    num_stages: int,
    num_tiles: int,
    heads_per_kv_head: int,
):
    batch = lax.axis_index("batch")
    tile = num_tiles - 1 - lax.axis_index("tile")
    head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    num_steps = 2 * tile + 2  # key blocks 0 .. 2t+1; the first warpgroup skips the last one
    num_cols = pooled_ref.shape[-1]
    scale_log2 = sm_scale * _LOG2E

    @pl.when(wg < 2)
    def _compute_wg():
        plgpu.set_max_registers(232, action="increase")
        q_block = 2 * tile + wg
        q_smem, lse_smem = q_smem2.at[wg], lse_smem2.at[wg]
        chunk_smem, pooled_smem = chunk_smem2.at[wg], pooled_smem2.at[wg]
        rows = pl.ds(q_block * BLOCK, BLOCK)
        plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem, q_barriers.at[wg])
        plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem, lse_barriers.at[wg])
        plgpu.barrier_wait(q_barriers.at[wg])
        plgpu.barrier_wait(lse_barriers.at[wg])
        lse = plgpu.load(lse_smem, (), layout=plgpu.Layout.WGMMA.reduce(1))  # [64]

        def skip_block(slot):
            plgpu.barrier_wait(k_barriers.at[slot])
            plgpu.barrier_arrive(k_consumed_barriers.at[slot])

        def pool_block(slot, kv_block, *, causal: bool):
            plgpu.barrier_wait(k_barriers.at[slot])

            def compute_qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                return acc_ref[...]

            qk = pl.run_scoped(compute_qk, plgpu.ACC((BLOCK, BLOCK), jnp.float32))  # [64, 64]
            plgpu.barrier_arrive(k_consumed_barriers.at[slot])
            if causal:
                r = plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0, layout=plgpu.Layout.WGMMA)
                c = plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1, layout=plgpu.Layout.WGMMA)
                qk = jnp.where(r >= c, qk, -jnp.inf)
            # log2 of each query row's largest probability inside this key block: [64]
            chunk_smem.at[lax.rem(kv_block, BLOCK)][...] = qk.max(axis=1) * scale_log2 - lse

        def flush_chunk(chunk):
            # Max over the query rows of the last 64 key blocks: a row reduction, no cross-warp traffic.
            # Once per 64 steps, so a bank-conflicted load is fine.
            log_p = plgpu.load(chunk_smem, (), layout=plgpu.Layout.WGMMA, optimized=False)  # [64 blocks, 64 rows]
            pooled_smem.at[pl.ds(chunk * BLOCK, BLOCK)][...] = jnp.exp2(log_p.max(axis=1))

        def step(s, carry):
            slot = lax.rem(s, num_stages)
            branch = jnp.where(s > q_block, 0, jnp.where(s == q_block, 2, 1))
            lax.switch(
                branch,
                [
                    lambda: skip_block(slot),
                    lambda: pool_block(slot, s, causal=False),
                    lambda: pool_block(slot, s, causal=True),
                ],
            )
            chunk_done = (lax.rem(s, BLOCK) == BLOCK - 1) | (s == num_steps - 1)
            pl.when(chunk_done)(lambda: flush_chunk(lax.div(s, BLOCK)))
            return carry

        lax.fori_loop(0, num_steps, step, None)
        plgpu.commit_smem()

        def write_chunk(start, size):
            plgpu.copy_smem_to_gmem(
                pooled_smem.at[pl.ds(start, size)], pooled_ref.at[batch, head, q_block, pl.ds(start, size)]
            )

        for start in range(0, num_cols, _TMA_CHUNK):
            pl.when(start <= q_block)(functools.partial(write_chunk, start, min(_TMA_CHUNK, num_cols - start)))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory_wg():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, jnp.array(heads_per_kv_head, head.dtype))

        def fetch(s, slot):
            plgpu.copy_gmem_to_smem(
                k_ref.at[batch, pl.ds(s * BLOCK, BLOCK), kv_head], k_smem.at[slot], k_barriers.at[slot]
            )

        for s in range(num_stages):
            pl.when(s < num_steps)(functools.partial(fetch, s, s))

        @pl.loop(num_stages, jnp.maximum(num_steps, num_stages))
        def _refill(s):
            slot = lax.rem(s, num_stages)
            plgpu.barrier_wait(k_consumed_barriers.at[slot])
            fetch(s, slot)


def _pooling_call(q, k, lse_log2, *, sm_scale: float, num_stages: int):
    batch, padded_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    num_tiles = padded_len // TILE
    num_blocks = padded_len // BLOCK
    num_cols = -(-num_blocks // BLOCK) * BLOCK
    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)

    def body(q_ref, k_ref, lse_ref, pooled_ref):
        kernel = functools.partial(
            _pooling_kernel,
            q_ref, k_ref, lse_ref, pooled_ref,
            sm_scale=sm_scale,
            num_stages=num_stages,
            num_tiles=num_tiles,
            heads_per_kv_head=num_q_heads // num_kv_heads,
        )  # fmt: skip
        pl.run_scoped(
            lambda smem, barriers, consumed: kernel(*smem, *barriers, consumed),
            (
                plgpu.SMEM((2, BLOCK, head_dim), q.dtype, transforms=(tiling, swizzle)),
                plgpu.SMEM((num_stages, BLOCK, head_dim), q.dtype, transforms=(tiling, swizzle)),
                plgpu.SMEM((2, BLOCK), jnp.float32),
                plgpu.SMEM((2, BLOCK, BLOCK), jnp.float32),
                plgpu.SMEM((2, num_cols), jnp.float32),
            ),
            (
                plgpu.Barrier(num_barriers=num_stages),
                plgpu.Barrier(num_barriers=2),
                plgpu.Barrier(num_barriers=2),
            ),
            plgpu.Barrier(num_arrivals=2, num_barriers=num_stages),
            collective_axes="wg",
        )

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((batch, num_q_heads, num_blocks, num_cols), jnp.float32),
        grid=(batch, num_q_heads, num_tiles),  # tiles fastest: see `kernel_sm90` on L2 reuse
        grid_names=("batch", "heads", "tile"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
    )(q, k, lse_log2)


def single_pass_chunk_rows(q_shape: tuple[int, ...], max_bytes: int) -> int:
    """Query rows per chunk of the one-pass path for q of shape [B, T, N, H]: the most whole 128-row tiles whose
    row-maxima buffer f32 [B, N, Jc, rows] fits in max_bytes (all Tp rows if they fit); 0 if not even one tile does
    (then the two-pass kernels run)."""
    batch, seq_len, num_q_heads, _ = q_shape
    padded_len = -(-seq_len // TILE) * TILE
    bytes_per_row = 4 * batch * num_q_heads * (-(-padded_len // BLOCK // BLOCK) * BLOCK)
    return min(max_bytes // bytes_per_row // TILE * TILE, padded_len)


def attention_with_pooling_sm90(q, k, v, *, sm_scale, block_size, return_lse, config: Config = DEFAULT_CONFIG):
    """Causal attention + row-normalised 2D max-pooled attention map on Hopper.

    q: [B, T, N, H]; k, v: [B, T, K, H]. Returns out [B, T, N, H], pooled f32 [B, N, I, I] (and lse f32
    [B, N, T], natural log) with I = ceil(T / 64).
    """
    check_supported(q, k)
    if block_size != BLOCK:
        raise NotImplementedError(f"the Mosaic GPU pooling kernel uses 64-token blocks, got block_size={block_size}")
    batch, seq_len, num_q_heads, _ = q.shape
    padded_len = -(-seq_len // TILE) * TILE
    num_blocks = -(-seq_len // BLOCK)
    pad = ((0, 0), (0, padded_len - seq_len), (0, 0), (0, 0))
    q_pad, k_pad, v_pad = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    # Padded query rows must not win a block's max: give them lse = +inf so exp2(·) = 0.
    valid_rows = jnp.arange(padded_len) < seq_len
    chunk_rows = single_pass_chunk_rows(q.shape, config.single_pass_max_bytes)
    if chunk_rows:
        outs, lses, raws = [], [], []
        dependency = ()
        for start in range(0, padded_len, chunk_rows):
            rows = range(start, min(start + chunk_rows, padded_len))
            # Chain the chunks, so that XLA cannot run the kernels first and hold every row-maxima buffer at once.
            q_pad, _ = lax.optimization_barrier((q_pad, dependency))
            out, lse, row_max = dense_attention_with_row_max_sm90(
                q_pad, k_pad, v_pad, sm_scale=sm_scale, rows=rows, config=config.attention
            )
            lse_log2 = jnp.where(valid_rows[start : rows.stop], lse * _LOG2E, jnp.inf)  # [B, N, R]
            blocks = (batch, num_q_heads, len(rows) // BLOCK, BLOCK)
            relative = row_max[:, :, :num_blocks].reshape(*blocks[:2], num_blocks, *blocks[2:]) - lse_log2.reshape(
                *blocks[:2], 1, *blocks[2:]
            )  # [B, N, J, R/64, 64]
            raws.append(jnp.swapaxes(jnp.exp2(relative.max(axis=-1)), -1, -2))  # [B, N, R/64, J]
            outs.append(out)
            lses.append(lse)
            dependency = raws[-1]
        out, lse, raw = (jnp.concatenate(parts, axis) for parts, axis in ((outs, 1), (lses, -1), (raws, 2)))
    else:
        entries, counts, dense = dense_causal_schedule(batch, num_q_heads, padded_len // BLOCK)
        out, lse = scheduled_attention_sm90(
            q_pad, k_pad, v_pad, entries, counts, dense, sm_scale=sm_scale, config=config.attention
        )
        lse_log2 = jnp.where(valid_rows, lse * _LOG2E, jnp.inf)  # [B, N, Tp]
        raw = _pooling_call(q_pad, k_pad, lse_log2, sm_scale=sm_scale, num_stages=config.pooling_stages)
    causal = jnp.arange(num_blocks)[None, :] <= jnp.arange(num_blocks)[:, None]  # [I, I]
    # Above the diagonal the buffers hold unspecified values (possibly NaN): select, never multiply.
    raw = jnp.where(causal, raw[:, :, :num_blocks, :num_blocks], 0.0)  # [B, N, I, I]
    pooled = raw / jnp.sum(raw, axis=-1, keepdims=True)
    out = out[:, :seq_len]
    if return_lse:
        return out, pooled, lse[..., :seq_len]
    return out, pooled
