"""Causal attention that also emits SeerAttention's 2D max-pooled attention map (the gate-training target)."""

from pallas_kernels.attention_with_pooling.api import (
    attention_with_pooling,
    attention_with_pooling_implementation,
)

__all__ = ["attention_with_pooling", "attention_with_pooling_implementation"]
