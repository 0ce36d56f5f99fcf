"""BlockIndex: conversions from/to block masks, causal clipping, padding, empty rows, contract checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import (
    BlockIndex,
    block_index_from_mask,
    block_mask_from_index,
    causal_block_mask,
    check_block_index,
)
from pallas_kernels.inputs import BLOCK_PATTERNS, input_key, pattern_block_mask


def _expected_rows(mask: np.ndarray):
    """Yield (b, n, i, selected key blocks of row i, causally clipped, ascending) from a bool [B, N, I, J] mask."""
    batch, num_q_heads, num_q_blocks, _ = mask.shape
    for b in range(batch):
        for n in range(num_q_heads):
            for i in range(num_q_blocks):
                yield b, n, i, np.flatnonzero(mask[b, n, i, : i + 1])


@pytest.mark.parametrize("pattern", BLOCK_PATTERNS)
def test_index_from_mask_lists_causal_blocks_ascending_padded_with_diagonal(pattern):
    mask = pattern_block_mask(input_key(0), pattern, 2, 3, 9)
    noise = jax.random.bernoulli(input_key(1), 0.5, mask.shape)
    noisy_mask = mask | (noise & ~causal_block_mask(9, 9))  # blocks above the diagonal must be dropped
    index = block_index_from_mask(noisy_mask)
    assert index.indices.dtype == jnp.int32 and index.indices.shape == (2, 3, 9, 9)
    assert index.counts.dtype == jnp.int32 and index.counts.shape == (2, 3, 9)
    indices, counts = np.asarray(index.indices), np.asarray(index.counts)
    for b, n, i, selected in _expected_rows(np.asarray(mask)):
        assert counts[b, n, i] == len(selected)
        np.testing.assert_array_equal(indices[b, n, i, : len(selected)], selected)
        assert (indices[b, n, i, len(selected) :] == i).all(), "padding must be the diagonal index i"
    check_block_index(index, batch=2, num_q_heads=3, num_blocks=9)


@pytest.mark.parametrize("pattern", BLOCK_PATTERNS)
def test_round_trips(pattern):
    mask = pattern_block_mask(input_key(2), pattern, 1, 2, 17)
    index = block_index_from_mask(mask)
    np.testing.assert_array_equal(np.asarray(block_mask_from_index(index)), np.asarray(mask))
    again = block_index_from_mask(block_mask_from_index(index))
    np.testing.assert_array_equal(np.asarray(again.indices), np.asarray(index.indices))
    np.testing.assert_array_equal(np.asarray(again.counts), np.asarray(index.counts))


def test_upper_triangle_only_gives_empty_rows():
    upper = jnp.broadcast_to(~causal_block_mask(5, 5), (1, 1, 5, 5))
    index = block_index_from_mask(upper)
    np.testing.assert_array_equal(np.asarray(index.counts), 0)
    np.testing.assert_array_equal(np.asarray(index.indices)[0, 0], np.repeat(np.arange(5)[:, None], 5, axis=1))
    assert not np.asarray(block_mask_from_index(index)).any()


def _valid_index() -> BlockIndex:
    return block_index_from_mask(pattern_block_mask(input_key(3), "half", 1, 2, 6))


def _with(index: BlockIndex, *, indices=None, counts=None) -> BlockIndex:
    return BlockIndex(
        indices=index.indices if indices is None else indices, counts=index.counts if counts is None else counts
    )


def _broken_indices():
    index = _valid_index()
    last = index.indices[0, 0, 5]
    return [
        pytest.param(_with(index, counts=index.counts.at[0, 0, 2].set(4)), "counts out of range", id="count>i+1"),
        pytest.param(_with(index, counts=index.counts.at[0, 1, 0].set(-1)), "counts out of range", id="count<0"),
        pytest.param(_with(index, indices=index.indices.at[0, 0, 1, 0].set(2)), "out of range", id="above-diagonal"),
        pytest.param(_with(index, indices=index.indices.at[0, 0, 3, -1].set(-1)), "out of range", id="negative"),
        pytest.param(
            _with(index, indices=index.indices.at[0, 0, 5].set(last[::-1]), counts=index.counts.at[0, 0, 5].set(6)),
            "ascending",
            id="descending",
        ),
        pytest.param(
            _with(index, indices=index.indices.at[0, 1, 4].set(0), counts=index.counts.at[0, 1, 4].set(0)),
            "padding",
            id="padding-not-diagonal",
        ),
        pytest.param(_with(index, counts=index.counts[..., :5]), "counts must be", id="counts-shape"),
        pytest.param(_with(index, indices=index.indices.astype(jnp.int16)), "indices must be", id="indices-dtype"),
    ]


@pytest.mark.parametrize(("index", "message"), _broken_indices())
def test_check_block_index_rejects_broken_indices(index, message):
    with pytest.raises(ValueError, match=message):
        check_block_index(index, batch=1, num_q_heads=2, num_blocks=6)


def test_check_block_index_skips_values_when_traced():
    broken = _with(_valid_index(), counts=_valid_index().counts + 7)

    @jax.jit
    def check(index):
        check_block_index(index, batch=1, num_q_heads=2, num_blocks=6)
        return index.counts

    check(broken)  # no ValueError: values are unknown while tracing
    with pytest.raises(ValueError, match="counts out of range"):
        check_block_index(broken, batch=1, num_q_heads=2, num_blocks=6)
