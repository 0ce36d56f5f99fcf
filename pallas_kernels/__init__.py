"""Attention kernels for SeerAttention: Pallas GPU kernels, each beside a pure-jnp reference.

One subpackage per op (`block_sparse_attention`, `attention_with_pooling`: Pallas Mosaic GPU for Hopper;
`block_topk`: Pallas Triton); `sm90` holds the Hopper core the Mosaic GPU kernels share (tile schedule, TMA
pipeline, the flash-attention forward kernel).

Axes follow `seer_jax`'s alphabet (B batch, T queries, S keys, N query heads, K kv heads, H head dim,
I query blocks, J key blocks). This package never imports model code.
"""
