"""Block selection: TopK density, threshold monotonicity, the budget's per-layer order statistic, no empty rows,
dense limits."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seer_jax.sparsity import (
    BudgetAllocation,
    Selection,
    block_density,
    masked_softmax,
    select_blocks,
    topk_per_row,
)


def _random_scores(seed: int, shape) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 3.0


@pytest.mark.parametrize("num_blocks", [64, 128, 200])
@pytest.mark.parametrize("nz_ratio", [0.1, 0.3, 0.5, 0.8])
def test_topk_density_matches_target(num_blocks, nz_ratio):
    scores = _random_scores(num_blocks, (2, 3, num_blocks, num_blocks))
    mask = select_blocks(scores, Selection(method="nz_ratio", nz_ratio=nz_ratio))
    density = np.asarray(block_density(mask))
    assert density.shape == (3,)
    np.testing.assert_allclose(density, nz_ratio, atol=0.02)


def test_topk_keeps_the_largest_scores_per_row():
    scores = _random_scores(1, (1, 2, 40, 40))
    mask = np.asarray(select_blocks(scores, Selection(method="nz_ratio", nz_ratio=0.3)))
    s = np.asarray(scores)
    k = topk_per_row(0.3, 40)
    for i in range(40):
        row = np.where(np.arange(40) <= i, s[0, 0, i], -np.inf)
        expected = set(np.argsort(-row, kind="stable")[: min(k, i + 1)]) | {i}
        assert set(np.flatnonzero(mask[0, 0, i])) == expected


@pytest.mark.parametrize(
    "method,kwargs",
    [("nz_ratio", {"nz_ratio": 0.05}), ("threshold", {"threshold": 0.9}), ("budget", {"budget": 0.01})],
)
@pytest.mark.parametrize("last_block_dense", [False, True])
def test_no_row_is_ever_empty_and_mask_is_causal(method, kwargs, last_block_dense):
    scores = _random_scores(3, (2, 4, 33, 33))
    mask = np.asarray(select_blocks(scores, Selection(method=method, last_block_dense=last_block_dense, **kwargs)))
    assert mask.any(axis=-1).all()
    assert np.diagonal(mask, axis1=-2, axis2=-1).all()
    assert not np.triu(mask, k=1).any()
    if last_block_dense:
        assert np.tril(np.ones((33, 33), bool))[-2:].sum() == mask[0, 0, -2:].sum()


def test_threshold_is_monotone():
    scores = _random_scores(4, (1, 4, 48, 48))
    densities = [
        float(np.mean(block_density(select_blocks(scores, Selection(method="threshold", threshold=t)))))
        for t in (0.0, 1e-3, 1e-2, 5e-2, 0.2)
    ]
    assert densities[0] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(densities))
    assert densities[-1] < 0.2


def test_threshold_selects_on_softmax_probabilities():
    scores = _random_scores(5, (1, 1, 16, 16))
    probs = np.asarray(masked_softmax(scores))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    mask = np.asarray(select_blocks(scores, Selection(method="threshold", threshold=0.1)))
    expected = (probs > 0.1) | np.eye(16, dtype=bool)
    np.testing.assert_array_equal(mask, expected & np.tril(np.ones((16, 16), bool)))


@pytest.mark.parametrize(
    "selection",
    [Selection(method="nz_ratio", nz_ratio=1.0), Selection(method="threshold"), Selection(method="budget", budget=1.0)],
)
def test_dense_settings_keep_every_causal_block(selection):
    mask = np.asarray(select_blocks(_random_scores(6, (1, 2, 9, 9)), selection))
    np.testing.assert_array_equal(mask[0, 0], np.tril(np.ones((9, 9), bool)))


def test_selection_validates_fields():
    with pytest.raises(ValueError, match="nz_ratio"):
        Selection(nz_ratio=0.0)
    with pytest.raises(ValueError, match="threshold"):
        Selection(method="threshold", threshold=1.5)
    with pytest.raises(ValueError, match="method"):
        Selection(method="topk")
    with pytest.raises(ValueError, match="budget"):
        Selection(method="budget", budget=0.0)
    with pytest.raises(ValueError, match="allocation applies to method 'budget' only"):
        Selection(method="threshold", threshold=0.1, allocation=ALLOCATION)
    with pytest.raises(ValueError, match="increase strictly"):
        BudgetAllocation(densities=(0.5, 0.4), layer_densities=((0.5, 0.5), (0.4, 0.4)), length=64)


def test_select_blocks_under_jit():
    scores = _random_scores(7, (1, 2, 20, 20))
    sel = Selection(method="nz_ratio", nz_ratio=0.4, last_block_dense=True)
    np.testing.assert_array_equal(jax.jit(lambda s: select_blocks(s, sel))(scores), select_blocks(scores, sel))


@pytest.mark.parametrize("shape", [(1, 2, 600, 600), (2, 1, 300, 500), (1, 1, 500, 300)], ids=str)
def test_topk_by_row_bands_equals_full_row_topk(shape):
    """TopK runs per band of rows on the band's causal columns only (rows 0-255, 256-511, ...); the mask
    must equal a stable full-row TopK, ties (scores rounded to 0.5) broken towards lower j, short rows kept whole.
    (Shifted away from 0: top_k orders -0.0 below +0.0, numpy treats them as a tie.)"""
    scores = jnp.round(_random_scores(5, shape) * 2) / 2 + 100.0
    nz_ratio = 0.1
    mask = np.asarray(select_blocks(scores, Selection(method="nz_ratio", nz_ratio=nz_ratio)))
    num_q_blocks, num_kv_blocks = shape[-2:]
    k = topk_per_row(nz_ratio, num_kv_blocks)
    s = np.asarray(scores)
    for b, n, i in itertools.product(range(shape[0]), range(shape[1]), range(num_q_blocks)):
        row = np.where(np.arange(num_kv_blocks) <= i, s[b, n, i], -np.inf)
        causal = min(i + 1, num_kv_blocks)
        expected = set(np.argsort(-row, kind="stable")[: min(k, causal)])
        if i < num_kv_blocks:
            expected |= {i}  # the diagonal is always kept
        assert set(np.flatnonzero(mask[b, n, i])) == expected, (b, n, i)


def test_last_block_dense_keeps_each_rows_last_real_rows():
    """With lengths, the two dense rows are those of each row's last real tokens (rows 1-2 for 150 tokens, 4-5 for
    all 384), not the last rows of the padded mask; the rest of the mask is the plain selection."""
    scores = _random_scores(8, (2, 3, 6, 6))
    lengths = jnp.asarray([384, 150])
    selection = Selection(method="nz_ratio", nz_ratio=0.05, last_block_dense=True)
    mask = np.asarray(select_blocks(scores, selection, lengths))
    plain = np.asarray(select_blocks(scores, Selection(method="nz_ratio", nz_ratio=0.05)))
    causal = np.tril(np.ones((6, 6), bool))
    for row, dense_rows in ((0, [4, 5]), (1, [1, 2])):
        expected = plain[row].copy()
        expected[:, dense_rows] = causal[dense_rows]
        np.testing.assert_array_equal(mask[row], expected)
    full_rows = select_blocks(scores, selection, jnp.asarray([384, 384]))
    np.testing.assert_array_equal(full_rows, select_blocks(scores, selection))


def test_block_density_counts_real_rows_only():
    """Rows past a row's real tokens are not counted; without lengths every row is."""
    mask = np.zeros((2, 1, 4, 4), bool)
    mask[:, :, np.arange(4), np.arange(4)] = True  # the diagonal: 4 of 10 causal blocks
    mask[1, 0, 3] = True  # padding rows of row 1 (100 real tokens: rows 0-1) selected in full
    lengths = jnp.asarray([256, 100])
    # row 0: 4 of 10 blocks; row 1: rows 0-1 only, 2 of 3 blocks
    np.testing.assert_allclose(block_density(jnp.asarray(mask), lengths), [(4 + 2) / (10 + 3)])
    np.testing.assert_allclose(block_density(jnp.asarray(mask)), [(4 + 7) / 20])


def _budget_reference(scores: np.ndarray, budget: float, lengths: np.ndarray, force_sink: bool = False) -> np.ndarray:
    """numpy: per batch row, the forced blocks of real rows (the diagonal; with `force_sink` also column 0) plus the
    ⌊budget · causal blocks⌋ − forced other causal blocks of real rows with the highest row-softmax probability over
    all heads (stable: lower (n, i, j) first)."""
    batch, heads, rows, cols = scores.shape
    causal = np.tril(np.ones((rows, cols), bool))
    mask = np.zeros(scores.shape, bool)
    for b in range(batch):
        real = np.arange(rows) * 64 < lengths[b]
        logits = np.where(causal, scores[b].astype(np.float64), -np.inf)
        probabilities = np.exp(logits - logits.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)  # [N, I, J]
        forced_blocks = np.eye(rows, cols, dtype=bool) | (force_sink & (np.arange(cols)[None, :] == 0))
        candidates = np.broadcast_to(real[:, None] & causal & ~forced_blocks, probabilities.shape)
        counted, forced = heads * np.sum(real[:, None] & causal), heads * np.sum(real[:, None] & forced_blocks)
        keep = max(int(np.floor(budget * counted + 1e-3)) - forced, 0)
        flat = np.where(candidates, probabilities, -1.0).ravel()
        chosen = np.argsort(-flat, kind="stable")[:keep]
        mask[b].reshape(-1)[chosen] = True
        mask[b] |= real[None, :, None] & forced_blocks & causal  # the forced blocks of real rows
    return mask


@pytest.mark.parametrize("budget", [0.07, 0.2, 0.5, 0.9])
def test_budget_keeps_the_most_probable_blocks_over_heads_and_rows(budget):
    """The budget mask is a per-row order statistic over heads × rows × blocks of the softmax probabilities, and its
    density is ⌊budget · causal blocks⌋ / causal blocks of each row (the diagonal included), not a per-row TopK:
    heads and rows get different numbers of blocks."""
    scores = _random_scores(9, (2, 3, 12, 12))
    lengths = np.asarray([12 * 64, 7 * 64 - 30])  # the second row: 7 real query-block rows
    mask = np.asarray(select_blocks(scores, Selection(method="budget", budget=budget), jnp.asarray(lengths)))
    expected = _budget_reference(np.asarray(scores), budget, lengths)
    real = np.arange(12)[None, :] * 64 < lengths[:, None]  # [B, I]
    np.testing.assert_array_equal(mask & real[:, None, :, None], expected)
    for b, rows in enumerate((12, 7)):
        counted = 3 * rows * (rows + 1) // 2
        single = np.asarray(block_density(jnp.asarray(mask[b : b + 1]), jnp.asarray(lengths[b : b + 1])))
        assert single.mean() == pytest.approx(max(np.floor(budget * counted + 1e-3), 3 * rows) / counted, abs=1e-6)
    if budget > 12 / 78:  # above the diagonal's share: heads and rows keep different numbers of blocks
        assert np.ptp(mask[0].sum(-1)[:, 6:]) > 0 and np.ptp(mask[0].sum((-1, -2))) > 0


@pytest.mark.parametrize("budget", [0.5, 0.7])  # above the diagonal's and the sink's share (23/78, 13/28)
def test_budget_with_the_sink_counts_it_against_the_budget(budget):
    """With `force_sink` the sink column is kept in every real row and counts against the budget: the same density
    as without it, fewer blocks chosen by probability."""
    scores = _random_scores(11, (2, 3, 12, 12))
    lengths = jnp.asarray([12 * 64, 7 * 64 - 30])
    mask = np.asarray(select_blocks(scores, Selection(method="budget", budget=budget, force_sink=True), lengths))
    expected = _budget_reference(np.asarray(scores), budget, np.asarray(lengths), force_sink=True)
    real = np.arange(12)[None, :] * 64 < np.asarray(lengths)[:, None]  # [B, I]
    np.testing.assert_array_equal(mask & real[:, None, :, None], expected)
    assert (mask[..., 0] | ~real[:, None, :]).all()  # the sink in every real row
    plain = select_blocks(scores, Selection(method="budget", budget=budget), lengths)
    density = np.mean(block_density(jnp.asarray(mask), lengths))  # per head it differs: the budget pools heads
    assert density == pytest.approx(float(np.mean(block_density(plain, lengths))), abs=1e-6)
    assert not np.array_equal(mask, np.asarray(plain))


@pytest.mark.parametrize("selection", [Selection(nz_ratio=0.1), Selection(method="threshold", threshold=0.2)])
def test_the_sink_comes_on_top_of_topk_and_threshold(selection):
    scores = _random_scores(12, (2, 3, 20, 20))
    plain = np.asarray(select_blocks(scores, selection))
    with_sink = np.asarray(select_blocks(scores, dataclasses.replace(selection, force_sink=True)))
    np.testing.assert_array_equal(with_sink, plain | (np.arange(20)[None, :] == 0))  # column 0, causal everywhere
    assert (with_sink != plain).any()


ALLOCATION = BudgetAllocation(
    densities=(0.2, 0.5, 1.0), layer_densities=((0.3, 0.1), (0.8, 0.2), (1.0, 1.0)), length=512
)


def test_allocation_interpolates_each_layer_and_keeps_the_mean():
    """for_layer gives each layer its share of the budget, interpolated linearly between calibration points (so
    the mean stays the budget), scaled below the first; select_blocks refuses a selection not resolved per layer."""
    selection = Selection(method="budget", budget=0.35, allocation=ALLOCATION)
    shares = [selection.for_layer(layer).budget for layer in range(2)]
    np.testing.assert_allclose(shares, [0.55, 0.15])
    assert np.mean(shares) == pytest.approx(0.35)
    assert selection.for_layer(0).allocation is None and selection.for_layer(0).method == "budget"
    assert Selection(method="budget", budget=0.1, allocation=ALLOCATION).for_layer(1).budget == pytest.approx(0.05)
    assert Selection(method="threshold", threshold=0.1).for_layer(5) == Selection(method="threshold", threshold=0.1)
    with pytest.raises(ValueError, match="covers 2 layers"):
        selection.for_layer(2)
    with pytest.raises(ValueError, match="for_layer"):
        select_blocks(_random_scores(1, (1, 1, 4, 4)), selection)
