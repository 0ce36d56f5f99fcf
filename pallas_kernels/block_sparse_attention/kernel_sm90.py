"""Block-sparse causal flash attention for Hopper (sm_90): the forward of `block_sparse_attention`.

The kernel is the shared sm_90 flash-attention kernel (`pallas_kernels.sm90.flash_attention`, whose docstring
gives the algorithm) run over the tile schedule of the op's block mask (`pallas_kernels.sm90.schedule`): one CTA
per 128-row query tile whose two 64-row warpgroups each compute only their query block's selected key blocks.
This wrapper owns the padding: T up to whole 128-row tiles, the mask to match (blocks above the diagonal dropped).

Layout limits: `pallas_kernels.sm90.pipeline.check_supported` (bf16/fp16, H ∈ {64, 128, 256}, T == S ≤ 1M);
anything else raises NotImplementedError.
"""

from pallas_kernels.sm90 import flash_attention, pipeline, schedule
from pallas_kernels.sm90.flash_attention import Config


def block_sparse_attention_sm90(q, k, v, block_mask, *, sm_scale, return_lse, config: Config | None = None):
    """Block-sparse causal attention on Hopper. Same contract as the reference implementation.

    q: [B, T, N, H]; k, v: [B, T, K, H]; block_mask: bool [B, N, I, J] over I = J = ceil(T / 64) blocks (entries
    above the diagonal ignored). Returns out [B, T, N, H] (and lse f32 [B, N, T], natural log, -inf for rows that
    attend nothing).
    """
    pipeline.check_supported(q, k)
    seq_len = q.shape[1]
    padded_len = schedule.padded_length(seq_len)
    block_mask = schedule.pad_block_mask(block_mask, padded_len // schedule.BLOCK)  # [B, N, Ip, Ip]
    entries, counts, dense = schedule.tile_schedule(block_mask)
    q, k, v = (schedule.pad_rows(x, padded_len) for x in (q, k, v))
    out, lse = flash_attention.scheduled_attention(
        q, k, v, entries, counts, dense, sm_scale=sm_scale, config=config
    )  # [B, Tp, N, H], [B, N, Tp]
    out = out[:, :seq_len]
    if return_lse:
        return out, lse[..., :seq_len]
    return out
