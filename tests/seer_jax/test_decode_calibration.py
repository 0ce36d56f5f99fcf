"""`seer_jax.decode_calibration`: the candidate keys against a per-row loop; the order statistic against a stable
sort of every key; the recall rule gives a layer whose gate ranks blocks poorly more blocks than one whose gate ranks
them as the true attention does; on a model the allocation is the numpy computation from its dense forward, its
points hold their mean fraction, dense layers have fraction 1; errors."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest

from seer_jax.decode_calibration import candidate_keys, decode_allocation, kept_fractions
from seer_jax.decode_config import DecodeConfig
from seer_jax.forwards import decode_distillation_inputs, decode_gate_logits
from tests.seer_jax.decode_models import DECODE_BLOCK, decode_model, padded_batch, with_decode

BLOCK = 4
LENGTH = 40  # 10 blocks of 4


def synthetic(seed: int, batch: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(scores with ties, mass normalised over each row's completed earlier blocks), f32 [B, T, J]."""
    rng = np.random.default_rng(seed)
    num_blocks = LENGTH // BLOCK
    completed = np.arange(num_blocks)[None, :] < (np.arange(LENGTH) // BLOCK)[:, None]  # [T, J]
    mass = np.where(completed, rng.dirichlet(np.full(num_blocks, 0.3), (batch, LENGTH)), 0.0)
    mass /= np.maximum(mass.sum(-1, keepdims=True), 1e-30)
    scores = np.round(rng.standard_normal((batch, LENGTH, num_blocks)), 1)  # ties
    return scores.astype(np.float32), mass.astype(np.float32)


def loop_keys(scores, mass, decode: DecodeConfig) -> dict[tuple[int, int, int], float]:
    """Per (row, token, candidate block): the mass of the forced scored blocks and the candidates ranked above it."""
    keys = {}
    for b, t in np.ndindex(*scores.shape[:2]):
        n, current = t + 1, t // decode.block_size
        window = max(n - decode.sliding_window, 0) // decode.block_size if decode.sliding_window else current + 1
        forced = {j for j in range(current) if (decode.force_sink and j == 0) or j >= window}
        candidates = sorted((j for j in range(current) if j not in forced), key=lambda j: (-scores[b, t, j], j))
        covered = sum(float(mass[b, t, j]) for j in forced)
        for j in candidates:
            keys[b, t, j] = covered
            covered += float(mass[b, t, j])
    return keys


@pytest.mark.parametrize(
    "decode",
    [DecodeConfig(block_size=BLOCK), DecodeConfig(block_size=BLOCK, force_sink=False, sliding_window=6)],
    ids=["sink", "window"],
)
def test_candidate_keys_are_the_mass_ranked_before(decode):
    scores, mass = synthetic(0)
    counted = np.arange(LENGTH) >= 13
    keys = np.asarray(candidate_keys(jnp.asarray(scores), jnp.asarray(mass), jnp.asarray(counted), decode))
    expected = loop_keys(scores, mass, decode)
    for (b, t, j), key in expected.items():
        if counted[t]:
            assert keys[b, t, j] == pytest.approx(key, abs=1e-6), (b, t, j)
    chosen = np.zeros(keys.shape, bool)
    for b, t, j in expected:
        chosen[b, t, j] = counted[t]
    assert np.isinf(keys[~chosen]).all() and np.isfinite(keys[chosen]).all()


def stable_sort_counts(keys: list[np.ndarray], keep: int) -> np.ndarray:
    """The first `keep` of every key by a stable sort of their concatenation (ties to the lower layer), per layer."""
    layer_of = np.concatenate([np.full(layer.size, index) for index, layer in enumerate(keys)])
    order = np.argsort(np.concatenate(keys), kind="stable")[:keep]
    return np.bincount(layer_of[order], minlength=len(keys))


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.62, 0.9])
def test_order_statistic_is_a_stable_sort(fraction):
    """Keys with many ties across layers: the counts are a stable sort's; past every candidate there is no point."""
    rng = np.random.default_rng(1)
    keys = [rng.integers(0, 20, size).astype(np.float32) / 20 for size in (300, 170, 240)]
    row_blocks = 280.0
    shares = kept_fractions(keys, row_blocks, fraction)
    keep = math.floor(fraction * row_blocks * 3 + 1e-6)
    if keep > 710:
        assert shares is None
        return
    np.testing.assert_array_equal(shares * row_blocks, stable_sort_counts(keys, keep))
    assert shares.mean() == pytest.approx(fraction, abs=1 / row_blocks)


def test_recall_gives_a_poorly_ranking_gate_more_blocks():
    """Three layers with the same true attention: a gate that ranks as the attention, a random gate and a reversed
    one. The recall rule fills every row to a common recall, so the worse the ranking, the more blocks; the coverage
    rule (the attention's own ranking) gives them the same keys, hence the same blocks up to ties."""
    decode = DecodeConfig(block_size=BLOCK)
    random_scores, mass = synthetic(2, batch=8)
    counted = jnp.asarray(np.arange(LENGTH) >= LENGTH // 2)
    row_blocks = float(8 * np.sum(np.arange(LENGTH // 2, LENGTH) + 1) / BLOCK)
    recall = [
        np.asarray(candidate_keys(jnp.asarray(scores), jnp.asarray(mass), counted, decode))
        for scores in (mass, random_scores, -mass)
    ]
    recall = [layer[np.isfinite(layer)] for layer in recall]
    for fraction in (0.1, 0.2, 0.4):
        shares = kept_fractions(recall, row_blocks, fraction)
        assert shares[0] < shares[1] < shares[2] and shares[2] > 2 * shares[0], (fraction, shares)
        assert shares.mean() == pytest.approx(fraction, abs=1 / row_blocks)
    coverage = np.asarray(candidate_keys(jnp.asarray(mass), jnp.asarray(mass), counted, decode))
    coverage = coverage[np.isfinite(coverage)]
    shares = kept_fractions([coverage] * 3, row_blocks, 0.2)
    assert shares.max() - shares.min() <= 1 / row_blocks + 1e-12


def reference_allocation(model, tokens, mask, fraction: float, rule: str) -> np.ndarray:
    """numpy from the dense forward's decode targets and gate logits: per sparse layer the candidates of the rows
    t >= max(block, floor(L_b / 2)), keyed by the mass their row holds before them (gate order or mass order), the
    first ⌊fraction · Σ (t + 1) / block · layers⌋ of one order (ties to the lower layer), counted per layer."""
    decode = model.seer_config.decode
    features, targets = decode_distillation_inputs(model, tokens, mask)
    logits = decode_gate_logits(model, features)
    lengths = np.asarray(features[0].lengths)
    sparse = range(decode.start_layer, len(targets))
    keys, row_blocks = [[] for _ in sparse], 0.0
    for b in range(tokens.shape[0]):
        rows = range(max(decode.block_size, math.floor(lengths[b] * 0.5)), lengths[b])
        row_blocks += model.config.num_kv_heads * sum((t + 1) / decode.block_size for t in rows)
        for index, layer in enumerate(sparse):
            mass = np.asarray(targets[layer], np.float64)[b]  # [K, T, J]
            scores = np.asarray(logits[layer])[b] if rule == "recall" else mass
            for k in range(mass.shape[0]):
                ranked = loop_keys(scores[k][None], mass[k][None], decode)
                keys[index] += [key for (_, t, _), key in ranked.items() if t in rows]
    keep = math.floor(fraction * row_blocks * len(keys) + 1e-6)
    return stable_sort_counts([np.asarray(layer) for layer in keys], keep) / row_blocks, row_blocks


@pytest.mark.parametrize("rule", ["recall", "coverage"])
def test_model_allocation_is_the_numpy_order_statistic(rule):
    """Two sparse layers, a left-padded batch: each asked fraction is a point (exact, keyed by the fraction asked)
    whose layer fractions are the numpy computation's up to a float32 near-tie (one block) and whose mean is the
    fraction up to one block; 1.0 is a point with every layer at 1; layers differ."""
    model = decode_model(with_decode(method="context_fraction"))
    tokens, mask = padded_batch(200, (0, 37))
    allocation = decode_allocation(model, tokens, mask, fractions=(0.1, 0.25), rule=rule)
    assert allocation.fractions == (0.1, 0.25, 1.0) and allocation.length == 200 and allocation.rule == rule
    assert allocation.layer_fractions[-1] == (1.0, 1.0)
    for fraction, shares in zip(allocation.fractions[:2], allocation.layer_fractions, strict=False):
        expected, row_blocks = reference_allocation(model, tokens, mask, fraction, rule)
        np.testing.assert_allclose(shares, expected, atol=1.01 / row_blocks)
        assert np.mean(shares) == pytest.approx(fraction, abs=1 / (2 * row_blocks))
        assert allocation.layer_fractions_at(fraction) == shares
    assert abs(allocation.layer_fractions[0][0] - allocation.layer_fractions[0][1]) > 0.01


def test_dense_layers_have_fraction_one_and_errors():
    tokens, mask = padded_batch(200, (0, 37))
    one_sparse = decode_allocation(decode_model(with_decode(start_layer=1)), tokens, mask, fractions=(0.1, 0.3))
    assert all(point[0] == 1.0 for point in one_sparse.layer_fractions)
    np.testing.assert_allclose([point[1] for point in one_sparse.layer_fractions], one_sparse.fractions, atol=0.01)
    model = decode_model(with_decode())
    with pytest.raises(ValueError, match="rule must be one of"):
        decode_allocation(model, tokens, mask, rule="top-p")
    with pytest.raises(ValueError, match="fractions must be in"):
        decode_allocation(model, tokens, mask, fractions=(0.0,))
    with pytest.raises(ValueError, match="no row to calibrate on"):
        decode_allocation(model, tokens[:, :DECODE_BLOCK], None)
    with pytest.raises(ValueError, match="needs decode gates"):
        decode_allocation(decode_model(None), tokens, mask)
    with pytest.raises(ValueError, match="no sparse decode layer"):
        decode_allocation(decode_model(dataclasses.replace(with_decode(), start_layer=2)), tokens, mask)
