"""Causal attention that also emits the 2D max-pooled attention map, for Hopper (Pallas Mosaic GPU).

One pass: the shared sm_90 flash-attention kernel on the dense causal schedule
(`pallas_kernels.sm90.flash_attention.dense_attention_with_row_max`) also writes each query row's maximum scaled
score per 64-key block, a slice of the row maximum its softmax needs anyway, as f32 [B, N, Jc, rows]; XLA reduces
it to the map:
    pooled[i, j] = max_{r ∈ i, c ∈ j, c ≤ r} exp2(s[r, c] · sm_scale · log2 e − lse₂[r])
                 = exp2(max_{r ∈ i} (row_max[j, r] − lse₂[r])).
The row maxima are O(T·J) (the reference Triton kernel keeps a [B, N, T, J] buffer for the whole sequence), so
the query rows go through in chunks whose buffer fits `Config.max_chunk_bytes` (4 GiB: T = 32k in one chunk at
B=1, N=32; 128k in 8), each reduced before the next chunk's kernel runs. Cost: the attention plus one write and one
read of the buffers, close to cuDNN's dense attention alone (BENCHMARKS.md). Until 2026-11-26 a second QKᵀ-only
pass recomputed the maxima instead, which cost about half an attention more (git history).
The row normalisation over j and the zeroing above the diagonal happen in XLA on the small [B, N, I, J] map.

This wrapper pads T to whole 128-row tiles (`sm90.schedule.padded_length`); padded rows are kept out of the
pooled maxima. Layout limits: `sm90.pipeline.check_supported` (bf16/fp16, H ∈ {64, 128, 256}, T == S ≤ 1M) and
64-token blocks.
"""

import dataclasses

import jax.numpy as jnp
from jax import lax

from pallas_kernels.blocks import causal_block_mask
from pallas_kernels.sm90 import flash_attention, pipeline, schedule
from pallas_kernels.sm90.flash_attention import Config as AttentionConfig
from pallas_kernels.sm90.pipeline import LOG2E
from pallas_kernels.sm90.schedule import BLOCK, TILE


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Tuning knobs."""

    attention: AttentionConfig | None = None  # None: the flash-attention kernel's default for the head dim
    max_chunk_bytes: int = 4 << 30  # the row-maxima buffer of one chunk of query rows

    def __post_init__(self):
        if self.max_chunk_bytes < 1:
            raise ValueError(f"max_chunk_bytes must be positive, got {self.max_chunk_bytes}")


DEFAULT_CONFIG = Config()


def chunk_rows(q_shape: tuple[int, ...], max_bytes: int) -> int:
    """Query rows per chunk for q of shape [B, T, N, H]: the most whole 128-row tiles whose row-maxima buffer
    f32 [B, N, Jc, rows] fits in max_bytes (all Tp rows if they fit), and never fewer than one tile."""
    batch, seq_len, num_q_heads, _ = q_shape
    padded_len = schedule.padded_length(seq_len)
    bytes_per_row = 4 * batch * num_q_heads * (-(-padded_len // BLOCK // BLOCK) * BLOCK)
    return min(max(max_bytes // bytes_per_row // TILE, 1) * TILE, padded_len)


def attention_with_pooling_sm90(q, k, v, *, sm_scale, block_size, return_lse, config: Config = DEFAULT_CONFIG):
    """Causal attention + row-normalised 2D max-pooled attention map on Hopper.

    q: [B, T, N, H]; k, v: [B, T, K, H]. Returns out [B, T, N, H], pooled f32 [B, N, I, I] (and lse f32
    [B, N, T], natural log) with I = ceil(T / 64).
    """
    pipeline.check_supported(q, k)
    if block_size != BLOCK:
        raise NotImplementedError(f"the Mosaic GPU pooling kernel uses 64-token blocks, got block_size={block_size}")
    batch, seq_len, num_q_heads, _ = q.shape
    padded_len = schedule.padded_length(seq_len)
    num_blocks = -(-seq_len // BLOCK)
    q_pad, k_pad, v_pad = (schedule.pad_rows(x, padded_len) for x in (q, k, v))
    # Padded query rows must not win a block's max: give them lse = +inf so exp2(·) = 0.
    valid_rows = jnp.arange(padded_len) < seq_len
    rows_per_chunk = chunk_rows(q.shape, config.max_chunk_bytes)
    outs, lses, raws = [], [], []
    dependency = ()
    for start in range(0, padded_len, rows_per_chunk):
        rows = range(start, min(start + rows_per_chunk, padded_len))
        # Chain the chunks, so that XLA cannot run the kernels first and hold every row-maxima buffer at once.
        q_pad, _ = lax.optimization_barrier((q_pad, dependency))
        out, lse, row_max = flash_attention.dense_attention_with_row_max(
            q_pad, k_pad, v_pad, sm_scale=sm_scale, rows=rows, config=config.attention
        )
        lse_log2 = jnp.where(valid_rows[start : rows.stop], lse * LOG2E, jnp.inf)  # [B, N, R]
        blocks = (batch, num_q_heads, len(rows) // BLOCK, BLOCK)
        relative = row_max[:, :, :num_blocks].reshape(*blocks[:2], num_blocks, *blocks[2:]) - lse_log2.reshape(
            *blocks[:2], 1, *blocks[2:]
        )  # [B, N, J, R/64, 64]
        raws.append(jnp.swapaxes(jnp.exp2(relative.max(axis=-1)), -1, -2))  # [B, N, R/64, J]
        outs.append(out)
        lses.append(lse)
        dependency = raws[-1]
    out, lse, raw = (jnp.concatenate(parts, axis) for parts, axis in ((outs, 1), (lses, -1), (raws, 2)))
    causal = causal_block_mask(num_blocks, num_blocks)  # [I, I]
    # Above the diagonal the buffers hold unspecified values (possibly NaN): select, never multiply.
    raw = jnp.where(causal, raw[:, :, :num_blocks, :num_blocks], 0.0)  # [B, N, I, I]
    pooled = raw / jnp.sum(raw, axis=-1, keepdims=True)
    out = out[:, :seq_len]
    if return_lse:
        return out, pooled, lse[..., :seq_len]
    return out, pooled
