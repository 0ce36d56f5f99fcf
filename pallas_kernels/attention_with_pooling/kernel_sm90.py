"""Attention with 2D max-pooled attention map for Hopper (Pallas Mosaic GPU). Being written: see issue 3."""


def attention_with_pooling_sm90(q, k, v, *, sm_scale, block_size, return_lse):
    raise NotImplementedError("the Mosaic GPU pooling kernel is not available yet")
