"""NaN and inf in q, k or v propagate through block-sparse attention as through dense attention: every row that
attends a poisoned position (or whose query is poisoned) is non-finite, every other row is unchanged, and rows
that select nothing stay exactly 0 (lse -inf). Run against every implementation (the kernel on the H200)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention_with_pooling import attention_with_pooling
from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.inputs import pattern_block_mask, random_qkv
from pallas_kernels.shapes import TEST_SHAPES
from tests.pallas_kernels import harness, oracle

SHAPE = next(shape for shape in TEST_SHAPES if shape.name == "g4_h64_t1000")
POISONS = {"nan": np.nan, "inf": np.inf}
# (tensor, position): q at a query row; k/v at the first position of a block, so that no row of an earlier block
# (which never selects it) shares a 64-row tile with it in the oracle's products.
CASES = [("q", 700), ("k", 320), ("v", 320)]


def _poisoned(q, k, v, tensor: str, position: int, value: float):
    arrays = {"q": q, "k": k, "v": v}
    arrays[tensor] = arrays[tensor].at[0, position, 0].set(value)
    return arrays["q"], arrays["k"], arrays["v"]


@pytest.mark.parametrize("implementation", harness.IMPLEMENTATIONS)
@pytest.mark.parametrize("poison", sorted(POISONS))
@pytest.mark.parametrize(("tensor", "position"), CASES)
@pytest.mark.parametrize("pattern", ["half", "empty_rows"])
def test_nonfinite_input_propagates_like_dense_attention(request, implementation, poison, tensor, position, pattern):
    qkv_key, mask_key = jax.random.split(harness.case_key(request))
    q, k, v = random_qkv(qkv_key, SHAPE, harness.DTYPES[implementation])
    mask = pattern_block_mask(mask_key, pattern, SHAPE.batch, SHAPE.num_q_heads, SHAPE.num_blocks())
    allowed = oracle.token_mask(mask, SHAPE.seq_len)  # [B, N, T, S]
    if tensor == "q":  # the first query row from `position` on whose head 0 attends something (random masks vary)
        attending = np.flatnonzero(allowed[0, 0, position:].any(axis=-1))
        position += int(attending[0]) if attending.size else 0
    q, k, v = _poisoned(q, k, v, tensor, position, POISONS[poison])
    out, lse = block_sparse_attention(q, k, v, block_mask=mask, return_lse=True, implementation=implementation)
    out = np.asarray(out.astype(jnp.float32))  # [B, T, N, H]
    lse = np.asarray(lse)  # [B, N, T]

    group = SHAPE.num_q_heads // SHAPE.num_kv_heads
    poisoned_rows = np.zeros(allowed.shape[:3], bool)  # [B, N, T]
    if tensor == "q":
        poisoned_rows[0, 0, position] = allowed[0, 0, position].any()
    else:
        poisoned_rows[0, :group] = allowed[0, :group, :, position]  # the query heads of kv head 0
    assert poisoned_rows.any(), "the poisoned position is not selected by any row: the case tests nothing"
    empty_rows = ~allowed.any(axis=-1)  # [B, N, T]

    rows_nonfinite = ~np.isfinite(out).all(axis=-1).transpose(0, 2, 1)  # [B, N, T]
    np.testing.assert_array_equal(rows_nonfinite, poisoned_rows, err_msg="non-finite rows differ from dense's")
    np.testing.assert_array_equal(out.transpose(0, 2, 1, 3)[empty_rows], 0.0, err_msg="empty rows are not 0")
    assert np.isneginf(lse[empty_rows]).all(), "empty rows' lse is not -inf"
    if tensor != "v":  # a poisoned score makes the row's normaliser, hence its lse, non-finite too
        assert not np.isfinite(lse[poisoned_rows]).any(), "poisoned rows have a finite lse"

    clean_out, clean_lse = oracle.dense_attention(*_clean(q, k, v), sm_scale=SHAPE.head_dim**-0.5, block_mask=mask)
    clean_rows = ~poisoned_rows.transpose(0, 2, 1)  # [B, T, N]
    tolerance = harness.TOLERANCES[q.dtype]
    harness.assert_close(out[clean_rows], clean_out[clean_rows], tolerance, "out of the other rows")
    harness.assert_lse_close(lse[~poisoned_rows], clean_lse[~poisoned_rows], tolerance)


def _clean(q, k, v):
    """The inputs with the poisoned entries replaced by 0 (they matter only on the poisoned rows)."""
    return tuple(jnp.where(jnp.isfinite(x), x, 0) for x in (q, k, v))


@pytest.mark.parametrize("implementation", harness.IMPLEMENTATIONS)
@pytest.mark.parametrize("poison", sorted(POISONS))
@pytest.mark.parametrize(("tensor", "position"), CASES[:2])
def test_nonfinite_input_propagates_through_attention_with_pooling(request, implementation, poison, tensor, position):
    q, k, v = random_qkv(harness.case_key(request), SHAPE, harness.DTYPES[implementation])
    q, k, v = _poisoned(q, k, v, tensor, position, POISONS[poison])
    out, pooled, lse = attention_with_pooling(q, k, v, return_lse=True, implementation=implementation)
    out, pooled, lse = (np.asarray(x.astype(jnp.float32)) for x in (out, pooled, lse))

    group = SHAPE.num_q_heads // SHAPE.num_kv_heads
    poisoned_rows = np.zeros((SHAPE.batch, SHAPE.num_q_heads, SHAPE.seq_len), bool)  # [B, N, T]
    if tensor == "q":
        poisoned_rows[0, 0, position] = True
    else:
        poisoned_rows[0, :group, position:] = True  # every later row of the kv head's query heads sees key c
    rows_nonfinite = ~np.isfinite(out).all(axis=-1).transpose(0, 2, 1)  # [B, N, T]
    np.testing.assert_array_equal(rows_nonfinite, poisoned_rows, err_msg="non-finite rows differ from dense's")
    assert not np.isfinite(lse[poisoned_rows]).any() and np.isfinite(lse[~poisoned_rows]).all()
    block_rows = np.pad(poisoned_rows, ((0, 0), (0, 0), (0, -SHAPE.seq_len % 64)))
    clean_blocks = ~block_rows.reshape(*poisoned_rows.shape[:2], -1, 64).any(axis=-1)  # [B, N, I]
    assert np.isfinite(pooled[clean_blocks]).all(), "a query block without poisoned rows has a non-finite pooled row"
