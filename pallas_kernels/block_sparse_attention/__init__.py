"""Block-sparse causal flash attention over 64×64 blocks (SeerAttention's sparse prefill)."""

from pallas_kernels.block_sparse_attention.api import (
    block_sparse_attention,
    block_sparse_attention_implementation,
)
from pallas_kernels.block_sparse_attention.index import (
    BLOCK_SIZE,
    BlockIndex,
    block_index_from_mask,
    block_mask_from_index,
    causal_block_mask,
    check_block_index,
)

__all__ = [
    "BLOCK_SIZE",
    "BlockIndex",
    "block_index_from_mask",
    "block_mask_from_index",
    "block_sparse_attention",
    "block_sparse_attention_implementation",
    "causal_block_mask",
    "check_block_index",
]
