"""Block-sparse causal flash attention over 64×64 blocks (SeerAttention's sparse prefill)."""

from pallas_kernels.block_sparse_attention.index import (
    BlockIndex,
    block_index_from_mask,
    block_mask_from_index,
    causal_block_mask,
)

__all__ = ["BlockIndex", "block_index_from_mask", "block_mask_from_index", "causal_block_mask"]
