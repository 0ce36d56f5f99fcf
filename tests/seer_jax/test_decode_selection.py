"""Decode block selection against an independent numpy computation; the key mask and block lists it turns into."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_decode.reference import check_decode_index, selected_block_mask
from seer_jax.decode_config import DecodeConfig
from seer_jax.decode_selection import (
    available_blocks,
    decode_block_index,
    decode_block_lists,
    decode_key_mask,
    max_selected_blocks,
    select_decode_blocks,
)

BLOCK = 16
# Rows whose current block is 0 (one token; a full first block), 1 (just opened), 9 (completed at this token), 6.
LENGTHS = np.asarray([1, 16, 17, 160, 100])


# Every selection rule: budgets (with and without sink, window), context fractions, thresholds.
CONFIGS = pytest.mark.parametrize(
    "config",
    [
        DecodeConfig(block_size=BLOCK, token_budget=3 * BLOCK + 5),
        DecodeConfig(block_size=BLOCK, token_budget=2 * BLOCK, force_sink=False),
        DecodeConfig(block_size=BLOCK, token_budget=BLOCK, sliding_window=40),
        DecodeConfig(block_size=BLOCK, token_budget=0, force_sink=False, sliding_window=1),
        DecodeConfig(block_size=BLOCK, token_budget=10**5),
        DecodeConfig(block_size=BLOCK, method="context_fraction", context_fraction=0.25),
        DecodeConfig(block_size=BLOCK, method="context_fraction", context_fraction=0.07, force_sink=False),
        DecodeConfig(block_size=BLOCK, method="context_fraction", context_fraction=1.0),
        DecodeConfig(block_size=BLOCK, method="threshold", threshold=0.08),
        DecodeConfig(block_size=BLOCK, method="threshold", threshold=0.2, force_sink=False, sliding_window=33),
    ],
    ids=[
        "budget",
        "budget-no-sink",
        "budget-window",
        "window-only",
        "everything",
        "fraction",
        "fraction-no-sink",
        "fraction-everything",
        "threshold",
        "threshold-window",
    ],
)


def numpy_selection(scores: np.ndarray, lengths: np.ndarray, config: DecodeConfig) -> np.ndarray:
    """One (row, kv head) at a time, as SEER_R_SPEC §3 with docs/design.md's deviations."""
    batch, heads, _ = scores.shape
    mask = np.zeros(scores.shape, bool)
    for b in range(batch):
        current = (lengths[b] - 1) // BLOCK
        forced = {current}
        if config.force_sink:
            forced.add(0)
        if config.sliding_window:
            forced |= set(range(max(lengths[b] - config.sliding_window, 0) // BLOCK, current + 1))
        for k in range(heads):
            row = scores[b, k].astype(np.float64)
            if config.method != "threshold":
                candidates = [j for j in range(current) if j not in forced]
                ranked = sorted(candidates, key=lambda j: (-row[j], j))
                if config.method == "token_budget":
                    count = config.token_budget // BLOCK
                else:  # the row's budget: a fraction of its tokens, in float32
                    count = int(np.floor(np.float32(config.context_fraction) * np.float32(lengths[b]) / BLOCK))
                chosen = set(ranked[:count])
            else:
                if current:
                    probs = np.exp(row[:current] - row[:current].max())
                    probs /= probs.sum()
                else:
                    probs = np.zeros(0)
                chosen = {j for j in range(current) if probs[j] > config.threshold}
            for j in chosen | forced:
                mask[b, k, j] = True
    return mask


@CONFIGS
@pytest.mark.parametrize("heads", [2, 4], ids=["per-kv-head", "per-q-head"])
def test_selection_matches_numpy(config, heads):
    """Scores [B, K, J] or (Quest) [B, N, J]: each head selects on its own row of scores."""
    scores = np.random.default_rng(0).standard_normal((len(LENGTHS), heads, 12)).astype(np.float32)  # [B, K, J]
    ours = np.asarray(select_decode_blocks(jnp.asarray(scores), jnp.asarray(LENGTHS), config))
    np.testing.assert_array_equal(ours, numpy_selection(scores, LENGTHS, config))
    current = (LENGTHS - 1) // BLOCK
    assert ours[np.arange(len(LENGTHS)), :, current].all()  # the current block, always
    assert not (ours & (np.arange(12) > current[:, None, None])).any()  # never a block past it


def test_context_fraction_counts_the_rows_tokens():
    """10% of 160 tokens is 16 tokens: one block of 16 by top-k, plus the sink and the current block; 100 tokens
    allow none."""
    scores = jnp.asarray(np.random.default_rng(1).standard_normal((len(LENGTHS), 2, 12)), jnp.float32)
    config = DecodeConfig(block_size=BLOCK, method="context_fraction", context_fraction=0.1)
    selected = np.asarray(select_decode_blocks(scores, jnp.asarray(LENGTHS), config))
    np.testing.assert_array_equal(selected.sum(-1)[:, 0], [1, 1, 2, 3, 2])


def test_budget_covering_the_context_selects_every_block():
    scores = jnp.asarray(np.random.default_rng(1).standard_normal((len(LENGTHS), 2, 12)), jnp.float32)
    config = DecodeConfig(block_size=BLOCK, token_budget=12 * BLOCK, force_sink=False)
    selected = np.asarray(select_decode_blocks(scores, jnp.asarray(LENGTHS), config))
    np.testing.assert_array_equal(
        selected.sum(-1), np.repeat(available_blocks(jnp.asarray(LENGTHS), BLOCK)[:, None], 2, 1)
    )


def test_key_mask_in_each_rows_own_blocks():
    """Row 1 has 5 padding slots: its block j covers slots 5 + 16 j …; empty slots are never attended."""
    key_mask = np.arange(48)[None, :] >= np.asarray([0, 5])[:, None]
    key_mask[:, 40:] = False  # slots not written yet
    block_mask = np.zeros((2, 2, 3), bool)
    block_mask[:, 0, 0] = True
    block_mask[:, 1, 2] = True
    allowed = np.asarray(decode_key_mask(jnp.asarray(block_mask), jnp.asarray(key_mask), BLOCK))
    assert allowed.shape == (2, 2, 48)
    np.testing.assert_array_equal(np.flatnonzero(allowed[0, 0]), np.arange(16))
    np.testing.assert_array_equal(np.flatnonzero(allowed[0, 1]), np.arange(32, 40))
    np.testing.assert_array_equal(np.flatnonzero(allowed[1, 0]), np.arange(5, 21))
    np.testing.assert_array_equal(np.flatnonzero(allowed[1, 1]), np.arange(37, 40))


def test_block_index_lists_the_selection():
    block_mask = np.random.default_rng(2).random((3, 2, 7)) < 0.4
    block_mask[0, 0] = False
    index, count = (np.asarray(x) for x in decode_block_index(jnp.asarray(block_mask)))
    assert index.dtype == count.dtype == np.int32 and index.shape == (3, 2, 7)
    for b in range(3):
        for k in range(2):
            np.testing.assert_array_equal(index[b, k, : count[b, k]], np.flatnonzero(block_mask[b, k]))
            assert (index[b, k, count[b, k] :] == -1).all()
    wide, wide_count = (np.asarray(x) for x in decode_block_index(jnp.asarray(block_mask), num_slots=9))
    assert wide.shape == (3, 2, 9) and (wide[..., :7] == index).all() and (wide[..., 7:] == -1).all()
    np.testing.assert_array_equal(wide_count, count)
    narrow, narrow_count = (np.asarray(x) for x in decode_block_index(jnp.asarray(block_mask), num_slots=2))
    np.testing.assert_array_equal(narrow_count, np.minimum(count, 2))  # the first two selected blocks kept
    np.testing.assert_array_equal(narrow, np.where(np.arange(2) < narrow_count[..., None], index[..., :2], -1))


@CONFIGS
@pytest.mark.parametrize("scores_kind", ["random", "ties"])
def test_block_lists_list_the_selection(config, scores_kind):
    """`decode_block_lists` (the decode step's path: top-k ids and forced blocks, no mask) lists exactly the blocks
    `select_decode_blocks` selects, each once, within `max_selected_blocks` slots, −1 after; ragged rows whose
    current block is 0, just opened, just completed and mid-way; tied scores (ties to the lower block in both)."""
    rng = np.random.default_rng(7)
    num_blocks = 12
    scores = rng.standard_normal((len(LENGTHS), 3, num_blocks)).astype(np.float32)
    if scores_kind == "ties":
        scores = np.round(scores)  # many equal scores
    scores[1, 0, 0] = -np.inf  # a −inf candidate is still a candidate
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    num_slots = max_selected_blocks(config, num_blocks)
    index, count = (np.asarray(x) for x in decode_block_lists(jnp.asarray(scores), lengths, config, num_slots))
    assert index.shape == (len(LENGTHS), 3, num_slots) and index.dtype == count.dtype == np.int32
    check_decode_index(index, count, num_kv_blocks=num_blocks)  # in range and distinct
    expected = np.asarray(select_decode_blocks(jnp.asarray(scores), lengths, config))
    np.testing.assert_array_equal(np.asarray(selected_block_mask(index, count, num_blocks)), expected)
    np.testing.assert_array_equal(count, expected.sum(-1))
    assert (index[np.arange(num_slots) >= count[..., None]] == -1).all()


def test_block_lists_need_room_for_the_budget():
    config = DecodeConfig(block_size=BLOCK, token_budget=4 * BLOCK)
    scores, lengths = jnp.zeros((1, 1, 20)), jnp.asarray([300], jnp.int32)
    with pytest.raises(ValueError, match="num_slots=4"):
        decode_block_lists(scores, lengths, config, 4)
