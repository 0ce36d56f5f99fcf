"""Block-sparse decode attention over 64-key blocks (SeerAttention-R's sparse decode), split-K on Hopper."""

from pallas_kernels.block_sparse_decode.api import (
    MAX_QUERIES,
    block_sparse_decode,
    block_sparse_decode_implementation,
)
from pallas_kernels.block_sparse_decode.reference import check_decode_index, selected_block_mask

__all__ = [
    "MAX_QUERIES",
    "block_sparse_decode",
    "block_sparse_decode_implementation",
    "check_decode_index",
    "selected_block_mask",
]
