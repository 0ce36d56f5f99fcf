"""The Hopper (sm_90) core that the attention kernels share, written with Pallas Mosaic GPU.

Every kernel here has the same CTA: two compute warpgroups of 64 rows (query rows, or keys in the dK/dV kernel)
side by side in a 128-row tile, and one memory warpgroup that streams the blocks the tile's schedule lists with
TMA into a shared-memory ring. The grid is (batch, head, tile), tiles fastest.
  * `schedule`: tile constants, the packed tile-schedule format and its builders (from a block mask), padding.
  * `pipeline`: what the warpgroups of every kernel run alike: `check_supported`, the TMA loader of the memory
    warpgroup, the step dispatch over a schedule entry, causal masking of a diagonal block, compiler parameters.
  * `flash_attention`: the forward flash-attention kernel, run by `block_sparse_attention` (sparse schedules) and
    by `attention_with_pooling` (dense schedules, plus each row's maximum per key block).
The backward kernels live with their op (`block_sparse_attention/kernel_bwd_sm90.py`) and use the first two.
"""
