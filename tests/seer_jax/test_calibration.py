"""`threshold_for_density`: the threshold it finds gives, in a real sparse forward, the density it reports, the
densest one not above the target; an adapter records it with that density and attaches with it."""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seer_jax.adapters import MeasuredDensity, attach_gates, read_adapter, save_adapter
from seer_jax.calibration import threshold_for_density
from seer_jax.forwards import block_density
from seer_jax.gate import GateConfig, GateParam
from seer_jax.model import CausalLM
from seer_jax.seer import SeerCausalLM, seer_with_abstract_gates
from seer_jax.seer_config import SeerConfig
from seer_jax.sparsity import Selection
from tests.seer_jax.tiny_models import TINY, random_module, random_tokens

LENGTH = 6 * 64 + 20  # 7 query blocks
LAST = TINY.num_layers - 1


@functools.cache
def gated(start_layer: int) -> SeerCausalLM:
    """Random base and gates; layers below start_layer dense."""
    base = random_module(lambda: CausalLM(TINY, rngs=nnx.Rngs(0)), 0, weight_std=0.3)
    seer_config = SeerConfig(gate=GateConfig(hidden_size=TINY.head_dim), start_layer=start_layer)
    gates = random_module(lambda: SeerCausalLM(TINY, seer_config, rngs=nnx.Rngs(0)), 1, weight_std=0.5)
    seer = seer_with_abstract_gates(base, seer_config)
    nnx.update(seer, nnx.state(gates, GateParam))
    return seer


def batch() -> tuple[jnp.ndarray, jnp.ndarray]:
    mask = np.arange(LENGTH)[None, :] >= np.asarray([0, 150])[:, None]  # the second row left-padded
    return jnp.asarray(np.where(mask, random_tokens(3, 2, LENGTH), 0)), jnp.asarray(mask)


def measured(model: SeerCausalLM, selection: Selection) -> float:
    """The mean block density of a real sparse forward with `selection`."""
    sparse = seer_with_abstract_gates(model, dataclasses.replace(model.seer_config, selection=selection))
    return float(jnp.mean(block_density(sparse, *batch())))


@pytest.mark.parametrize("target", [0.75, 0.9])
def test_threshold_reaches_the_reported_density(target):
    """Only the last layer sparse (its gate sees the inputs of dense layers, as in the calibration's forward): the
    sparse forward's density is exactly the one reported, at most the target, and one more block would exceed it.
    (Layer 0 is dense: densities start at 0.5 + 0.5 · the diagonal's share.)"""
    model = gated(LAST)
    selection, density = threshold_for_density(model, *batch(), density=target)
    assert selection.method == "threshold" and 0 < selection.threshold < 1 and not selection.last_block_dense
    assert measured(model, selection) == pytest.approx(density, abs=1e-6)
    rows = np.ceil(np.asarray(batch()[1].sum(-1)) / 64)  # real query-block rows per row: 7 and 4
    one_block = 1 / (TINY.num_layers * TINY.num_q_heads * np.sum(rows * (rows + 1) / 2))
    assert target - one_block < density <= target


def test_threshold_over_all_sparse_layers_and_limits():
    """All layers sparse: the reported density is the dense forward's estimate, close to the sparse forward's; a
    target below the forced blocks drops every other block; a target of 1 keeps everything."""
    model = gated(0)
    selection, density = threshold_for_density(model, *batch(), density=0.5)
    assert density <= 0.5 and measured(model, selection) == pytest.approx(density, abs=0.05)
    floor_selection, floor = threshold_for_density(model, *batch(), density=0.01)
    # The diagonal only: 7 + 4 of the 28 + 10 causal blocks of rows of 7 and 4 query blocks.
    assert floor == 11 / 38 and measured(model, floor_selection) == pytest.approx(floor, abs=1e-6)
    assert threshold_for_density(model, *batch(), density=1.0) == (Selection(method="threshold", threshold=0.0), 1.0)
    with pytest.raises(ValueError, match="density must be in"):
        threshold_for_density(model, *batch(), density=0.0)


def test_recorded_in_an_adapter(tmp_path):
    """The calibrated selection and the sparse forward's density go into the adapter; attaching uses them."""
    model = gated(LAST)
    selection, _ = threshold_for_density(model, *batch(), density=0.6)
    record = MeasuredDensity(density=measured(model, selection), data="2 random rows of 404 tokens")
    save_adapter(model, tmp_path / "adapter", base_model="org/tiny", selection=selection, prefill_density=record)
    adapter = read_adapter(tmp_path / "adapter")
    assert adapter.seer_config.selection == selection and adapter.prefill_density == record
    attached = attach_gates(gated(LAST), adapter)
    assert float(jnp.mean(block_density(attached, *batch()))) == pytest.approx(record.density, abs=1e-6)
