"""TopK block selection: the k largest causal scores of every row of block scores, as a mask."""

from pallas_kernels.block_topk.api import block_topk_mask, block_topk_mask_implementation

__all__ = ["block_topk_mask", "block_topk_mask_implementation"]
