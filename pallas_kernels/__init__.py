"""Attention kernels for SeerAttention: Pallas Mosaic GPU (Hopper) kernels, each beside a pure-jnp reference.

Axes follow `seer_jax`'s alphabet (B batch, T queries, S keys, N query heads, K kv heads, H head dim,
I query blocks, J key blocks). This package never imports model code.
"""
