"""`threshold_for_density`: the threshold it finds gives, in a real sparse forward, the density it reports, the
densest one not above the target; an adapter records it with that density and attaches with it.
`budget_for_density`: each layer's share is the numpy order statistic over all layers, the sparse forward reaches
it, and it survives an adapter round trip; adapters from before budgets still load. `choose_budget`: every
candidate's NLL and density are those of its own sparse forward, and the lowest NLL is chosen."""

import dataclasses
import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seer_jax.adapters import MeasuredDensity, attach_gates, read_adapter, record_selection, save_adapter
from seer_jax.calibration import budget_allocation, budget_for_density, choose_budget, threshold_for_density
from seer_jax.forwards import block_density
from seer_jax.gate import GateConfig, GateParam
from seer_jax.hf_weights import CheckpointError
from seer_jax.model import CausalLM
from seer_jax.seer import SeerCausalLM, seer_with_abstract_gates
from seer_jax.seer_config import SeerConfig
from seer_jax.sparsity import Selection
from tests.seer_jax.tiny_models import TINY, random_module, random_tokens
from train.losses import next_token_nll

LENGTH = 6 * 64 + 20  # 7 query blocks
LAST = TINY.num_layers - 1


@functools.cache
def gated(start_layer: int, quest_weight: float = 0.0) -> SeerCausalLM:
    """Random base and gates (the same for every quest_weight); layers below start_layer dense."""
    base = random_module(lambda: CausalLM(TINY, rngs=nnx.Rngs(0)), 0, weight_std=0.3)
    seer_config = SeerConfig(gate=GateConfig(hidden_size=TINY.head_dim), start_layer=start_layer)
    seer_config = dataclasses.replace(seer_config, quest_weight=quest_weight)
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


@pytest.mark.parametrize("quest_weight", [0.0, 0.5])
@pytest.mark.parametrize("target", [0.75, 0.9])
def test_threshold_reaches_the_reported_density(target, quest_weight):
    """Only the last layer sparse (its gate sees the inputs of dense layers, as in the calibration's forward): the
    sparse forward's density is exactly the one reported, at most the target, and one more block would exceed it.
    (Layer 0 is dense: densities start at 0.5 + 0.5 · the diagonal's share.) With a Quest weight the calibration
    ranks the scores the sparse forward selects by, gate + w · quest."""
    model = gated(LAST, quest_weight)
    selection, density = threshold_for_density(model, *batch(), density=target)
    assert selection.method == "threshold" and 0 < selection.threshold < 1 and not selection.last_block_dense
    assert measured(model, selection) == pytest.approx(density, abs=1e-6)
    rows = np.ceil(np.asarray(batch()[1].sum(-1)) / 64)  # real query-block rows per row: 7 and 4
    one_block = 1 / (TINY.num_layers * TINY.num_q_heads * np.sum(rows * (rows + 1) / 2))
    assert target - one_block < density <= target


def test_threshold_without_a_mask_counts_every_row():
    """Without an attention mask every row of the batch counts its blocks (the calibration once counted the first
    row's only, so a batch of 2 kept about half the blocks asked for)."""
    model = gated(LAST)
    tokens = batch()[0][:, -6 * 64 :]  # both rows' last 384 tokens: all real
    selection, density = threshold_for_density(model, tokens, density=0.75)
    sparse = seer_with_abstract_gates(model, dataclasses.replace(model.seer_config, selection=selection))
    reached = float(jnp.mean(block_density(sparse, tokens)))
    assert reached == pytest.approx(density, abs=1e-6)
    one_block = 1 / (TINY.num_layers * TINY.num_q_heads * 2 * 21)  # 2 rows of 6 query blocks
    assert 0.75 - one_block < density <= 0.75


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


def budget_model(scales: tuple[float, ...]) -> SeerCausalLM:
    """`gated(0)` with each layer's gate logits scaled (the key projection times scales[layer]): 0 makes a gate
    with no opinion (uniform probabilities over each row), a large scale a confident one."""
    model = gated(0)
    model = seer_with_abstract_gates(model, model.seer_config)
    nnx.update(model, nnx.state(gated(0), GateParam))
    for layer, scale in zip(model.model.layers, scales, strict=True):
        weight = layer.self_attn.attn_gate.mask_linear_k.weight
        weight.set_value(weight.get_value() * scale)
    return model


def reference_shares(model: SeerCausalLM, density: float, source: str = "gate", rule: str = "coverage") -> np.ndarray:
    """numpy, from the dense forward's gate logits (source "gate") or true attention ("attention": the pooled
    attention map, normalised here): each layer's fraction of its causal blocks among the diagonal plus the
    ⌊density · all⌋ − diagonal first off-diagonal blocks of every layer, head and row together, by probability
    (rule "probability") or by the mass their row holds before them (rule "coverage": diagonal, then higher
    probabilities first)."""
    dense = seer_with_abstract_gates(model, dataclasses.replace(model.seer_config, selection=Selection()))
    name = {"gate": "gate_logits", "attention": "target"}[source]
    _, _, collected = dense.forward(*batch()[:1], attention_mask=batch()[1], collect=(name,))
    lengths = np.asarray(batch()[1].sum(-1))
    probabilities, layer_of, counted, forced = [], [], 0, 0
    for index, layer in enumerate(collected):
        values = np.asarray(layer[name], np.float64)  # [B, N, I, J] row-aligned
        rows = values.shape[-1]
        causal = np.tril(np.ones((rows, rows), bool))
        real = np.arange(rows)[None, :] * 64 < lengths[:, None]  # [B, I]
        if source == "gate":
            masked = np.where(causal, values, -np.inf)
            p = np.exp(masked - masked.max(-1, keepdims=True))
        else:
            p = np.where(causal, values, 0.0)
        p /= np.maximum(p.sum(-1, keepdims=True), 1e-30)
        candidates = np.broadcast_to((real[:, :, None] & causal & ~np.eye(rows, dtype=bool))[:, None], p.shape)
        if rule == "coverage":
            key = np.zeros_like(p)
            for b, n, i in np.ndindex(*p.shape[:3]):
                ranked = [i] + [j for j in np.argsort(-p[b, n, i], kind="stable") if j != i]
                key[b, n, i, ranked] = -(np.cumsum(p[b, n, i, ranked]) - p[b, n, i, ranked])  # minus: larger first
            probabilities.append(key[candidates])
        else:
            probabilities.append(p[candidates])
        layer_of.append(np.full(candidates.sum(), index))
        counted = TINY.num_q_heads * np.sum(real[:, :, None] & causal)
        forced = TINY.num_q_heads * np.sum(real)
    num_layers = len(collected)
    keep = int(np.floor(density * num_layers * counted - num_layers * forced + 1e-6))
    order = np.argsort(-np.concatenate(probabilities), kind="stable")[:keep]
    kept = np.bincount(np.concatenate(layer_of)[order], minlength=num_layers)
    return (forced + kept) / counted


def layer_densities(model: SeerCausalLM, selection: Selection) -> np.ndarray:
    sparse = seer_with_abstract_gates(model, dataclasses.replace(model.seer_config, selection=selection))
    return np.asarray(block_density(sparse, *batch())).mean(axis=1)  # [L]


# One block of one layer, as a fraction of that layer's causal blocks (4 heads × (28 + 10) blocks).
ONE_BLOCK = 1 / (TINY.num_q_heads * 38)


@pytest.mark.parametrize("rule", ["coverage", "probability"])
@pytest.mark.parametrize("target", [0.45, 0.6])
def test_budget_reaches_its_target_with_the_gates_shares(target, rule):
    """Every layer sparse: the calibrated shares are the numpy order statistic over all layers, and the sparse
    forward reaches each layer's share (so the target on average) within one block per layer and batch row,
    although from the second layer on its gate logits differ from the dense calibration forward's."""
    model = budget_model((4.0, 1.0))
    selection = budget_for_density(model, *batch(), density=target, rule=rule)
    assert selection.method == "budget" and selection.budget == target and not selection.last_block_dense
    assert selection.allocation.length == LENGTH
    expected = reference_shares(model, target, rule=rule)
    np.testing.assert_allclose(selection.allocation.layer_budgets(target), expected, atol=1e-9)
    achieved = layer_densities(model, selection)
    assert np.all(achieved <= expected + 1e-6) and np.all(achieved > expected - 2 * ONE_BLOCK)
    assert target - 2 * ONE_BLOCK < achieved.mean() <= target + 1e-6


def test_budget_shares_from_attention():
    """shares_from="attention": the order statistic runs on the true pooled attention (the gates' distillation
    target), whatever the gates say: gates without any opinion (logits × 0) still get the attention's shares."""
    model = budget_model((0.0, 0.0))
    covered = budget_allocation(model, *batch(), densities=(0.5,), shares_from="attention", rule="coverage")
    np.testing.assert_allclose(covered.layer_budgets(0.5), reference_shares(model, 0.5, "attention"), atol=1e-9)
    selection = budget_for_density(model, *batch(), density=0.5, shares_from="attention", rule="probability")
    expected = reference_shares(model, 0.5, "attention", rule="probability")
    np.testing.assert_allclose(selection.allocation.layer_budgets(0.5), expected, atol=1e-9)
    assert abs(expected[0] - expected[1]) > 2 * ONE_BLOCK  # the layers' attention differs
    achieved = layer_densities(model, selection)
    assert np.all(achieved <= expected + 1e-6) and np.all(achieved > expected - 2 * ONE_BLOCK)
    with pytest.raises(ValueError, match="shares_from"):
        budget_allocation(model, *batch(), shares_from="oracle")
    with pytest.raises(ValueError, match="rule"):
        budget_allocation(model, *batch(), rule="top-p")


def test_budget_is_not_uniform():
    """A confident gate (logits × 50: about one block per row) and one without opinion (logits × 0: uniform rows):
    once the confident layer has its blocks, the budget goes to the unsure one; swapping the gates swaps the
    shares. A uniform budget (no allocation) gives both layers the target instead."""
    target = 0.6
    rule = "probability"  # the default
    confident_first = budget_model((50.0, 0.0))
    shares = layer_densities(confident_first, budget_for_density(confident_first, *batch(), density=target))
    confident_last = budget_model((0.0, 50.0))
    swapped = layer_densities(confident_last, budget_for_density(confident_last, *batch(), density=target))
    np.testing.assert_allclose(shares, reference_shares(confident_first, target, rule=rule), atol=2 * ONE_BLOCK)
    np.testing.assert_allclose(swapped, reference_shares(confident_last, target, rule=rule), atol=2 * ONE_BLOCK)
    assert shares[1] > shares[0] + 0.2 and swapped[0] > swapped[1] + 0.2
    uniform = layer_densities(confident_first, Selection(method="budget", budget=target))
    np.testing.assert_allclose(uniform, target, atol=2 * ONE_BLOCK)


def test_budget_allocation_points_and_limits():
    """The allocation's points: the diagonal alone (equal shares), the requested densities, every block (1.0);
    below every row's diagonal share a budget keeps the diagonal only; start_layer's dense layers have share 1."""
    model = budget_model((4.0, 0.0))
    allocation = budget_allocation(model, *batch(), densities=(0.5,))
    assert allocation.densities == (11 / 38, 0.5, 1.0)
    assert allocation.layer_densities[0] == (11 / 38, 11 / 38) and allocation.layer_densities[-1] == (1.0, 1.0)
    np.testing.assert_allclose(
        allocation.layer_densities[1], reference_shares(model, 0.5, rule="probability"), atol=1e-9
    )  # the default rule
    floor = layer_densities(model, budget_for_density(model, *batch(), density=0.05))
    np.testing.assert_allclose(floor, 11 / 38, atol=1e-6)
    one_sparse = budget_allocation(gated(LAST), *batch(), densities=(0.5,))
    assert all(point[0] == 1.0 for point in one_sparse.layer_densities)
    np.testing.assert_allclose(one_sparse.densities, [p[1] for p in one_sparse.layer_densities], atol=ONE_BLOCK)
    with pytest.raises(ValueError, match="density must be in"):
        budget_for_density(model, *batch(), density=1.5)


def test_budget_round_trips_through_an_adapter(tmp_path):
    """save_adapter writes a budget as format 2; read_adapter gives the same selection (allocation included);
    the attached model reaches the same densities; record_selection turns a format-1 adapter into a budget one."""
    model = budget_model((4.0, 0.0))
    selection = budget_for_density(model, *batch(), density=0.5)
    save_adapter(model, tmp_path / "budget", base_model="org/tiny", selection=selection)
    assert json.loads((tmp_path / "budget" / "seer_adapter.json").read_text())["format"] == 2
    adapter = read_adapter(tmp_path / "budget")
    assert adapter.seer_config.selection == selection
    attached = attach_gates(budget_model((4.0, 0.0)), adapter)
    np.testing.assert_array_equal(
        layer_densities(attached, attached.seer_config.selection), layer_densities(model, selection)
    )

    save_adapter(model, tmp_path / "plain", base_model="org/tiny")
    marker = json.loads((tmp_path / "plain" / "seer_adapter.json").read_text())
    assert marker["format"] == 1
    record = MeasuredDensity(density=0.49, data="2 random rows of 404 tokens")
    record_selection(tmp_path / "plain", selection, prefill_density=record)
    recorded = read_adapter(tmp_path / "plain")
    assert recorded.seer_config.selection == selection and recorded.prefill_density == record
    assert set(recorded.tensors) == set(adapter.tensors)
    with pytest.raises(ValueError, match="covers 2 layers, the model has 3"):
        attach_gates(CausalLM(dataclasses.replace(TINY, num_layers=3), rngs=nnx.Rngs(0)), recorded)


def test_adapters_written_before_budgets_still_load(tmp_path):
    """A format-1 marker whose selection has no budget or allocation keys (as every adapter written before them)
    reads as before; an unknown format number is refused."""
    model = gated(LAST)
    selection = Selection(method="threshold", threshold=0.01, last_block_dense=True)
    save_adapter(model, tmp_path / "old", base_model="org/tiny", selection=selection)
    path = tmp_path / "old" / "seer_adapter.json"
    marker = json.loads(path.read_text())
    for key in ("budget", "allocation"):
        del marker["seer_config"]["selection"][key]
    path.write_text(json.dumps(marker))
    assert read_adapter(tmp_path / "old").seer_config.selection == selection
    path.write_text(json.dumps(marker | {"format": 99}))
    with pytest.raises(CheckpointError, match="adapter format 99"):
        read_adapter(tmp_path / "old")


def test_choose_budget_keeps_the_candidate_of_lowest_nll():
    """Each candidate (quest weight 0 / 0.5 × sink not forced / forced) is the budget calibrated on the calibration
    windows with its weight, its NLL and density those of its own sparse forward on the scoring windows (computed
    here independently, on the batch at once); the chosen one has the lowest NLL, and the switches matter."""
    model = gated(1)  # layer 0 dense, layer 1 sparse
    # 16 blocks per row: enough candidates that the diagonal and the sink fit in the budget (shorter rows keep
    # only their forced blocks, whatever the switches)
    calibration = jnp.asarray(random_tokens(3, 2, 1024))
    scoring = jnp.asarray(random_tokens(5, 2, 1024))
    chosen, candidates = choose_budget(model, calibration, scoring, density=0.3)
    assert [(c.quest_weight, c.selection.force_sink) for c in candidates] == [
        (0.0, False), (0.0, True), (0.5, False), (0.5, True)
    ]  # fmt: skip
    for candidate in candidates:
        weighted = gated(1, candidate.quest_weight)
        budget = budget_for_density(weighted, calibration, density=0.3)
        assert candidate.selection == dataclasses.replace(budget, force_sink=candidate.selection.force_sink)
        sparse = seer_with_abstract_gates(
            weighted, dataclasses.replace(weighted.seer_config, selection=candidate.selection)
        )
        logits, _ = sparse(scoring)
        assert candidate.nll == pytest.approx(float(jnp.mean(next_token_nll(logits, scoring))), rel=1e-5)
        assert candidate.density == pytest.approx(float(jnp.mean(block_density(sparse, scoring))), abs=1e-6)
    assert chosen.nll == min(c.nll for c in candidates) and chosen in candidates
    assert len({round(c.nll, 6) for c in candidates}) == 4  # each switch changes the sparse model
    assert max(c.density for c in candidates) - min(c.density for c in candidates) < 1e-6  # the sink counts
    with pytest.raises(ValueError, match="density"):
        choose_budget(model, calibration, scoring, density=0)
    with pytest.raises(ValueError, match="at least one"):
        choose_budget(model, calibration, scoring, density=0.4, force_sink=())
