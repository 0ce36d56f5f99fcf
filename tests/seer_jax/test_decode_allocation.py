"""`DecodeAllocation` and `DecodeConfig.for_layer`: each layer's budget interpolated between calibration points (a
context fraction as is, a token budget scaled by the layer's share ratio), checks that fail in one line, hashing and
the JSON round trip (a config without allocation writes what it wrote before allocations existed)."""

import itertools
import json

import numpy as np
import pytest

from seer_jax.decode_config import DecodeAllocation, DecodeConfig
from seer_jax.seer_config import SeerConfig

# Three layers, layer 0 dense (start_layer 1); the sparse layers' mean is each point's fraction.
ALLOCATION = DecodeAllocation(
    fractions=(0.1, 0.5, 1.0),
    layer_fractions=((1.0, 0.03, 0.17), (1.0, 0.3, 0.7), (1.0, 1.0, 1.0)),
    length=1600,
    rule="recall",
)


def expected_fraction(layer: int, fraction: float) -> float:
    """Piecewise-linear through (0, 0) and the points, written out."""
    points = [(0.0, 0.0)] + [
        (f, p[layer]) for f, p in zip(ALLOCATION.fractions, ALLOCATION.layer_fractions, strict=True)
    ]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= fraction <= x1:
            return y0 + (y1 - y0) * (fraction - x0) / (x1 - x0)
    raise AssertionError(fraction)


@pytest.mark.parametrize("fraction", [0.04, 0.1, 0.25, 0.5, 0.8, 1.0])
def test_context_fraction_is_interpolated_per_layer(fraction):
    config = DecodeConfig(block_size=16, method="context_fraction", context_fraction=fraction, allocation=ALLOCATION)
    for layer in (1, 2):
        own = config.for_layer(layer)
        assert own.allocation is None and own.method == "context_fraction"
        assert own.context_fraction == pytest.approx(expected_fraction(layer, fraction), abs=1e-12)
        assert own == DecodeConfig(block_size=16, method="context_fraction", context_fraction=own.context_fraction)
    assert np.mean([config.for_layer(layer).context_fraction for layer in (1, 2)]) == pytest.approx(fraction)


def test_token_budget_is_scaled_by_the_layers_share():
    """160 tokens of a 1600-token calibration length: fraction 0.1, where layer 1 has 0.3 and layer 2 1.7 of the
    mean: 48 and 272 tokens, in blocks of 16 (3 and 17)."""
    config = DecodeConfig(block_size=16, token_budget=160, allocation=ALLOCATION)
    assert config.for_layer(1).token_budget == 3 * 16 and config.for_layer(2).token_budget == 17 * 16
    assert config.for_layer(2) == DecodeConfig(block_size=16, token_budget=17 * 16)
    # 200 tokens, fraction 0.125: layer fractions 0.046875 and 0.203125 (interpolated), ratios 0.375 and 1.625 of
    # 12.5 blocks: 4.6875 and 20.3125, rounded to 5 and 20 blocks.
    assert expected_fraction(1, 0.125) == pytest.approx(0.046875) and expected_fraction(2, 0.125) == 0.203125
    rounded = DecodeConfig(block_size=16, token_budget=200, allocation=ALLOCATION)
    assert (rounded.for_layer(1).token_budget, rounded.for_layer(2).token_budget) == (5 * 16, 20 * 16)
    # 800 tokens: fraction 0.5, shares 0.6 and 1.4 → 480 and 1120 tokens (30 and 70 blocks).
    wide = DecodeConfig(block_size=16, token_budget=800, allocation=ALLOCATION)
    assert (wide.for_layer(1).token_budget, wide.for_layer(2).token_budget) == (480, 1120)
    # Past the calibration length the fraction is 1, where the shares are equal.
    assert DecodeConfig(block_size=16, token_budget=4000, allocation=ALLOCATION).for_layer(1).token_budget == 4000
    # A share that rounds to no block, and a zero budget.
    assert DecodeConfig(block_size=16, token_budget=16, allocation=ALLOCATION).for_layer(1).token_budget == 0
    assert DecodeConfig(block_size=16, token_budget=0, allocation=ALLOCATION).for_layer(2).token_budget == 0


def test_a_layer_without_candidates_becomes_a_zero_token_budget():
    """A fraction of 0 (a context fraction must be positive) is the equivalent token budget 0: forced blocks only."""
    allocation = DecodeAllocation(fractions=(0.2,), layer_fractions=((0.0, 0.4),), length=100)
    config = DecodeConfig(method="context_fraction", context_fraction=0.2, allocation=allocation)
    assert config.for_layer(0) == DecodeConfig(method="token_budget", token_budget=0, context_fraction=0.2)
    assert config.for_layer(1).context_fraction == pytest.approx(0.4)


def test_without_allocation_for_layer_is_the_config():
    config = DecodeConfig(method="context_fraction", context_fraction=0.3)
    assert config.for_layer(5) is config


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(fractions=(0.5, 0.1, 1.0)), "fractions must increase strictly"),
        (dict(fractions=(0.1, 0.5, 1.5)), "fractions must increase strictly"),
        (dict(fractions=(0.1,)), "one entry per calibration point"),
        (dict(layer_fractions=((1.0, 0.2), (1.0, 0.5, 0.5), (1.0, 1.0))), "same number"),
        (dict(layer_fractions=((1.0, 0.2), (1.0, 1.5), (1.0, 1.0))), r"in \[0, 1\]"),
        (dict(length=0), "length must be a positive int"),
        (dict(rule="top-p"), "rule must be one of"),
    ],
)
def test_allocation_errors_are_one_line(changes, match):
    fields = dict(fractions=(0.1, 0.5, 1.0), layer_fractions=((1.0, 0.2), (1.0, 0.5), (1.0, 1.0)), length=64)
    with pytest.raises(ValueError, match=match) as error:
        DecodeAllocation(**(fields | changes))
    assert "\n" not in str(error.value)


def test_config_errors():
    with pytest.raises(ValueError, match="needs method 'token_budget' or 'context_fraction', not 'threshold'"):
        DecodeConfig(method="threshold", threshold=0.01, allocation=ALLOCATION)
    with pytest.raises(ValueError, match="allocation must be a DecodeAllocation"):
        DecodeConfig(allocation={"fractions": [0.1]})
    with pytest.raises(ValueError, match="covers 3 layers"):
        DecodeConfig(allocation=ALLOCATION).for_layer(3)


def test_json_round_trip_and_hashing():
    """JSON lists become tuples (a DecodeConfig is a static jit argument: it must hash); SeerConfig.to_dict writes
    the allocation and reads it back, and writes no "allocation" key without one."""
    config = SeerConfig(gate=None, decode=DecodeConfig(method="context_fraction", allocation=ALLOCATION))
    saved = json.loads(json.dumps(config.to_dict()))
    assert saved["decode"]["allocation"]["layer_fractions"][0] == [1.0, 0.03, 0.17]
    restored = SeerConfig.from_dict(saved)
    assert restored == config and hash(restored.decode) == hash(config.decode)
    assert isinstance(restored.decode.allocation.layer_fractions[0], tuple)
    plain = SeerConfig(decode=DecodeConfig())
    assert "allocation" not in plain.to_dict()["decode"]
    assert SeerConfig.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain
    with pytest.raises(ValueError, match=r"seer_config.decode.allocation has unknown keys \['densities'\]"):
        SeerConfig.from_dict({"decode": {"allocation": {"densities": [0.1]}}})
