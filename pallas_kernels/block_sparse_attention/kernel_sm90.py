"""Block-sparse flash attention for Hopper (Pallas Mosaic GPU). Being written: see issue 3."""


def block_sparse_attention_sm90(q, k, v, index, *, sm_scale, return_lse):
    raise NotImplementedError("the Mosaic GPU block-sparse kernel is not available yet")
