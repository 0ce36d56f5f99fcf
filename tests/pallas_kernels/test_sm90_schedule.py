"""The sm_90 kernels' tile schedule (`pallas_kernels.sm90.schedule`), which is plain XLA: built on CPU against a
direct reading of its format, plus the padding every kernel wrapper applies."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.inputs import BLOCK_PATTERNS, input_key, pattern_block_mask
from pallas_kernels.sm90 import schedule


@pytest.mark.parametrize("pattern", BLOCK_PATTERNS)
def test_tile_schedule_lists_each_pairs_union_ascending_with_used_bits(pattern):
    mask = np.asarray(pattern_block_mask(input_key(5), pattern, 2, 3, 10))  # [B, N, I, I], causal
    entries, counts, dense = (np.asarray(x) for x in schedule.tile_schedule(jnp.asarray(mask)))
    assert entries.shape == (2, 3, 5, 1, 64) and counts.shape == dense.shape == (2, 3, 5)
    for b, n, t in np.ndindex(2, 3, 5):
        rows = mask[b, n, 2 * t : 2 * t + 2]  # [2, J]
        union = np.flatnonzero(rows[0] | rows[1])
        flat = entries[b, n, t].reshape(-1)
        assert counts[b, n, t] == len(union)
        np.testing.assert_array_equal(flat[: len(union)] & schedule.INDEX_MASK, union)
        for wg in (0, 1):
            used = (flat[: len(union)] >> (schedule.INDEX_BITS + wg)) & 1
            np.testing.assert_array_equal(used, rows[wg, union])
        assert not flat[len(union) :].any()
        assert dense[b, n, t] == (rows[0, : 2 * t + 1].all() and rows[1, : 2 * t + 2].all())


def test_padding_to_whole_tiles():
    assert [schedule.padded_length(t) for t in (1, 128, 129, 1000)] == [128, 128, 256, 1024]
    x = jnp.ones((1, 65, 2, 8))
    padded = schedule.pad_rows(x, 128)
    assert padded.shape == (1, 128, 2, 8) and not padded[:, 65:].any()
    upper = jnp.ones((1, 1, 2, 2), bool)  # the block above the diagonal is dropped, the padding is False
    expected = np.zeros((4, 4), bool)
    expected[:2, :2] = np.tril(np.ones((2, 2), bool))
    np.testing.assert_array_equal(schedule.pad_block_mask(upper, 4)[0, 0], expected)


def test_dense_causal_schedule_marks_every_tile_dense():
    _, counts, dense = schedule.dense_causal_schedule(1, 2, 6)
    np.testing.assert_array_equal(np.asarray(counts)[0, 0], [2, 4, 6])
    assert np.asarray(dense).all()
