"""Degenerate shapes are refused by the ops' argument checks with a ValueError naming the size, not a
ZeroDivisionError from the default softmax scale or the GQA ratio."""

import jax.numpy as jnp
import pytest

from pallas_kernels.attention_with_pooling import attention_with_pooling
from pallas_kernels.block_sparse_attention import block_sparse_attention


@pytest.mark.parametrize(
    ("q_shape", "kv_shape", "name"),
    [((1, 64, 2, 0), (1, 64, 2, 0), "head_dim"), ((1, 64, 2, 8), (1, 64, 0, 8), "num_kv_heads"),
     ((0, 64, 2, 8), (0, 64, 2, 8), "batch")],
)  # fmt: skip
def test_zero_sizes_are_refused_naming_the_field(q_shape, kv_shape, name):
    q, kv = jnp.ones(q_shape), jnp.ones(kv_shape)
    with pytest.raises(ValueError, match=f"{name} must be at least 1"):
        block_sparse_attention(q, kv, kv, block_mask=jnp.ones((q_shape[0], q_shape[2], 1, 1), bool))
    with pytest.raises(ValueError, match=f"{name} must be at least 1"):
        attention_with_pooling(q, kv, kv)
