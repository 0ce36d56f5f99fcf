"""Gate distillation of prefill gates, decode gates and both: learning, frozen base, optimizer scope, bit-exact
resume, the adapter, a recorded density budget, a recorded decode allocation, config errors."""

import argparse
import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seer_jax.adapters import ADAPTER_FILE, attach_gates, read_adapter
from seer_jax.calibration import choose_budget, threshold_for_density
from seer_jax.decode_calibration import decode_allocation
from seer_jax.decode_config import DecodeConfig
from seer_jax.decode_gate import DECODE_GATE_PARAMS
from seer_jax.forwards import block_density
from seer_jax.gate import GateConfig, GateParam
from seer_jax.model import CausalLM
from seer_jax.seer import SeerConfig, seer_from_base, seer_with_abstract_gates
from tests.seer_jax.tiny_models import random_module
from tests.train.tiny import write_docs
from train.data import LoaderConfig, eval_windows
from train.distill import ADAPTER_DIR, GATE_OPTIMIZER, DistillConfig, distill
from train.distill_gates import (
    BUDGET_CALIBRATION_WINDOWS,
    record_default_selections,
    record_prefill_selection,
)
from train.distill_gates import main as distill_gates_main
from train.token_corpus import CorpusConfig, load_corpus
from train.trainer import TrainLoopConfig

# One worker runs this module under `pytest -n` (pyproject: --dist loadgroup), so its module fixtures build once.
pytestmark = pytest.mark.xdist_group("distill")

MODEL_CONFIG = {
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "bos_token_id": 0,
    "eos_token_id": 1,
}
GATE = GateConfig(hidden_size=32)  # = head_dim: single-linear mode, as the released gates
# The official decode recipe (Qproj, Kmaxminavg, q/k norm, RoPE) with E = head_dim, 32-token blocks (16 per row).
DECODE = DecodeConfig(hidden_size=32, block_size=32, qk_norm=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory, stdlib_texts, tokenizer_dir):
    root = tmp_path_factory.mktemp("distill_data")
    write_docs(root / "docs.jsonl.gz", stdlib_texts[:20])
    return root, tokenizer_dir


def _base():
    from seer_jax.config import ModelConfig

    config = ModelConfig.from_hf(MODEL_CONFIG)
    # Large weights make attention peaky, so the pooled target carries structure for the gate to learn.
    return random_module(lambda: CausalLM(config, rngs=nnx.Rngs(0)), seed=3, weight_std=0.3)


def _model(decode=None):
    seer_config = SeerConfig(gate=GATE, decode=decode)
    return seer_from_base(_base(), seer_config, rngs=nnx.Rngs(1), gate_param_dtype=jnp.float32)


def _config(data, out_dir, steps, *, seq_len=512, warmup_steps=1, resume=False, **overrides):
    root, tokenizer_dir = data
    config = DistillConfig(
        model=root / "unused",  # the tests pass the model in
        corpus=CorpusConfig(paths=(root / "docs.jsonl.gz",), tokenizer_dir=tokenizer_dir, cache_dir=root / "cache"),
        loader=LoaderConfig(seq_len=seq_len, batch_size=2),
        optimizer=dataclasses.replace(GATE_OPTIMIZER, learning_rate=1e-3, warmup_steps=warmup_steps),
        loop=TrainLoopConfig(out_dir=out_dir, total_steps=steps, checkpoint_every=2, resume=resume),
        gate=GATE,
        dtype="float32",
    )
    return dataclasses.replace(config, **overrides)


def _losses(out_dir):
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_run(data, tmp_path_factory):
    model = _model()
    base_before = jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(GateParam))))
    out_dir = tmp_path_factory.mktemp("straight")
    result = distill(_config(data, out_dir, steps=8), model=model)
    return model, result, base_before, out_dir


def test_distillation_lowers_the_loss_and_exports_the_adapter(straight_run):
    _, result, _, out_dir = straight_run
    losses = _losses(out_dir)
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
    assert (result.adapter_dir / ADAPTER_FILE).is_file() and result.adapter_dir == out_dir / ADAPTER_DIR


def test_base_weights_are_bit_identical_and_only_gates_have_optimizer_state(straight_run):
    model, result, base_before, _ = straight_run
    base_after = jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(GateParam))))
    for before, after in zip(jax.tree.leaves(base_before), jax.tree.leaves(base_after), strict=True):
        np.testing.assert_array_equal(before, after)
    gate_size = sum(x.size for x in jax.tree.leaves(nnx.state(model, GateParam)))
    opt_arrays = [x for x in jax.tree.leaves(result.train.state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in opt_arrays) == 2 * gate_size  # Adam's two moments, for the gates only


def test_resume_is_bit_exact(data, straight_run, tmp_path):
    model, _, _, straight_dir = straight_run
    out_dir = tmp_path / "resumed"
    stopped = distill(_config(data, out_dir, steps=8), model=_model(), on_step=_stop_after(4))
    assert stopped.train.stopped_by == "SIGINT" and stopped.train.step == 5
    assert stopped.adapter_dir is None and not (out_dir / ADAPTER_DIR).exists()  # half-trained: not exported
    resumed = _model()
    assert distill(_config(data, out_dir, steps=8, resume=True), model=resumed).adapter_dir == out_dir / ADAPTER_DIR
    assert _losses(out_dir) == _losses(straight_dir)
    trained, again = nnx.state(model, GateParam), nnx.state(resumed, GateParam)
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _stop_after(steps):
    """An on_step hook that sends SIGINT to this process after `steps` steps (the loop saves and returns)."""
    import os
    import signal

    def on_step(record):
        if record.step == steps:
            os.kill(os.getpid(), signal.SIGINT)

    return on_step


def test_config_errors_name_the_field(data, tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        _config(data, tmp_path, steps=4, seq_len=100)
    with pytest.raises(ValueError, match="warmup_steps"):
        _config(data, tmp_path, steps=4, warmup_steps=4)
    with pytest.raises(ValueError, match="dtype"):
        _config(data, tmp_path, steps=4, dtype="float16")


def _values(model, selector):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, selector))]


PREFILL_GATES = nnx.All(GateParam, nnx.Not(DECODE_GATE_PARAMS))
BASE = nnx.All(nnx.Param, nnx.Not(GateParam))


@pytest.fixture(scope="module")
def decode_run(data, tmp_path_factory):
    model = _model(DECODE)
    before = {name: _values(model, selector) for name, selector in (("base", BASE), ("prefill", PREFILL_GATES))}
    decode_before = _values(model, DECODE_GATE_PARAMS)
    out_dir = tmp_path_factory.mktemp("decode")
    result = distill(_config(data, out_dir, steps=8, target="decode", decode=DECODE), model=model)
    return model, result, before, decode_before, out_dir


def test_decode_distillation_lowers_the_loss_and_trains_only_the_decode_gates(decode_run):
    model, result, before, decode_before, out_dir = decode_run
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.85 * np.mean(losses[:2]), losses  # 26 → 20.7 at seed 0
    assert {"decode_kl/layer_0", "decode_kl/layer_1"} <= set(lines[0]) and "kl/layer_0" not in lines[0]
    np.testing.assert_allclose(losses[0], 10 * (lines[0]["decode_kl/layer_0"] + lines[0]["decode_kl/layer_1"]))
    for name, selector in (("base", BASE), ("prefill", PREFILL_GATES)):
        for was, now in zip(before[name], _values(model, selector), strict=True):
            np.testing.assert_array_equal(was, now)
    decode_after = _values(model, DECODE_GATE_PARAMS)
    assert all(not np.array_equal(was, now) for was, now in zip(decode_before, decode_after, strict=True))
    decode_size = sum(x.size for x in decode_after)
    opt_arrays = [x for x in jax.tree.leaves(result.train.state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in opt_arrays) == 2 * decode_size  # Adam's two moments, for the decode gates only


def test_decode_adapter_holds_the_decode_gates_and_config(decode_run):
    model, result, _, _, out_dir = decode_run
    run_config = json.loads((out_dir / "distill.json").read_text())
    assert run_config["target"] == "decode" and run_config["decode"] == dataclasses.asdict(DECODE)
    adapter = read_adapter(result.adapter_dir)
    assert adapter.seer_config.decode == DECODE
    assert any(".decode_gate.attngate_linear_q." in name for name in adapter.tensors)
    loaded = attach_gates(_base(), adapter)
    for trained, read in zip(_values(model, GateParam), _values(loaded, GateParam), strict=True):
        np.testing.assert_array_equal(trained, read)


def test_decode_resume_is_bit_exact(data, decode_run, tmp_path):
    model, _, _, _, straight_dir = decode_run
    out_dir = tmp_path / "resumed"
    config = _config(data, out_dir, steps=8, target="decode", decode=DECODE)
    stopped = distill(config, model=_model(DECODE), on_step=_stop_after(3))
    assert stopped.train.stopped_by == "SIGINT" and stopped.train.step == 4 and stopped.adapter_dir is None
    resumed = _model(DECODE)
    distill(dataclasses.replace(config, loop=dataclasses.replace(config.loop, resume=True)), model=resumed)
    assert _losses(out_dir) == _losses(straight_dir)
    for a, b in zip(_values(model, GateParam), _values(resumed, GateParam), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="target"):  # the run's target is part of its trajectory
        distill(_config(data, out_dir, steps=8, resume=True), model=_model())


def test_both_targets_train_both_gates_from_one_forward(data, tmp_path):
    model = _model(DECODE)
    base_before, prefill_before, decode_before = (_values(model, s) for s in (BASE, PREFILL_GATES, DECODE_GATE_PARAMS))
    distill(_config(data, tmp_path, steps=3, target="both", decode=DECODE), model=model)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        np.testing.assert_allclose(line["loss"], line["prefill_loss"] + line["decode_loss"], rtol=1e-5)
        assert line["prefill_loss"] > 0 and line["decode_loss"] > 0 and "kl/layer_1" in line
    for was, now in zip(base_before, _values(model, BASE), strict=True):
        np.testing.assert_array_equal(was, now)
    for selector, was_all in ((PREFILL_GATES, prefill_before), (DECODE_GATE_PARAMS, decode_before)):
        assert all(not np.array_equal(was, now) for was, now in zip(was_all, _values(model, selector), strict=True))


def test_decode_config_errors_name_the_field(data, tmp_path):
    with pytest.raises(ValueError, match="target"):
        _config(data, tmp_path, steps=4, target="decoder", decode=DECODE)
    with pytest.raises(ValueError, match="decode"):
        _config(data, tmp_path, steps=4, target="decode")
    with pytest.raises(ValueError, match="decode"):
        _config(data, tmp_path, steps=4, decode=DECODE)
    with pytest.raises(ValueError, match="decode_slice_ratio"):
        _config(data, tmp_path, steps=4, target="both", decode=DECODE, decode_slice_ratio=1.0)
    with pytest.raises(ValueError, match="seq_len"):
        _config(data, tmp_path, steps=4, seq_len=64, target="decode", decode=dataclasses.replace(DECODE, block_size=64))
    with pytest.raises(ValueError, match="decode_quest_in_loss: needs decode gates with a quest_weight > 0"):
        _config(data, tmp_path, steps=4, target="decode", decode=DECODE, decode_quest_in_loss=True)


def test_budget_density_records_a_calibrated_budget(data, straight_run, tmp_path):
    """--budget-density: the adapter's default selection becomes the budget `choose_budget` picks (calibrated on the
    first distillation windows, ranked by NLL on the next ones), recorded with its quest weight and the density the
    sparse model reaches on the calibration windows; every candidate is in
    OUT/budget_candidates.json, the chosen one marked. An explicit --quest-weight is the only weight tried."""
    model, result, _, _ = straight_run
    config = _config(data, tmp_path / "run", steps=8)
    config.loop.out_dir.mkdir(parents=True)
    windows = eval_windows(load_corpus(config.corpus), length=512, num_docs=2 * BUDGET_CALIBRATION_WINDOWS)
    assert len(windows) == 2 * BUDGET_CALIBRATION_WINDOWS
    calibration, scoring = (jnp.asarray(part) for part in np.split(windows, 2))
    for quest_weight, weights in ((None, (0.0, 0.5)), (0.5, (0.5,))):
        adapter_dir = tmp_path / f"adapter_{quest_weight}"
        shutil.copytree(result.adapter_dir, adapter_dir)
        run = dataclasses.replace(result, adapter_dir=adapter_dir)
        record_prefill_selection(config, run, 0.4, budget=True, quest_weight=quest_weight)
        chosen, candidates = choose_budget(model, calibration, scoring, density=0.4, quest_weights=weights)
        adapter = read_adapter(adapter_dir)
        assert adapter.seer_config.selection == chosen.selection
        assert adapter.seer_config.quest_weight == chosen.quest_weight
        assert adapter.seer_config.selection.allocation.length == 512
        sparse = seer_with_abstract_gates(model, dataclasses.replace(adapter.seer_config, selection=chosen.selection))
        reached = float(jnp.mean(block_density(sparse, calibration)))
        assert adapter.prefill_density.density == pytest.approx(reached, abs=1e-6)
        # within a block per layer and window of 0.4, or above where a forced sink does not fit in a short row's share
        one_block = 1 / (4 * 8 * 9 // 2)  # of a window's causal blocks in one layer
        assert 0.4 - one_block < reached <= 0.4 + (0.03 if chosen.selection.force_sink else 1e-6)
        assert f"{BUDGET_CALIBRATION_WINDOWS} calibration windows of 512 tokens" in adapter.prefill_density.data
        report = json.loads((config.loop.out_dir / "budget_candidates.json").read_text())
        assert report["scoring_windows"] == BUDGET_CALIBRATION_WINDOWS and report["length"] == 512
        rows = report["candidates"]
        assert [(row["quest_weight"], row["force_sink"]) for row in rows] == [
            (c.quest_weight, c.selection.force_sink) for c in candidates
        ]
        np.testing.assert_allclose([row["nll"] for row in rows], [c.nll for c in candidates], rtol=1e-6)
        assert [row["chosen"] for row in rows] == [c is chosen for c in candidates]
        assert sum(row["chosen"] for row in rows) == 1
    with pytest.raises(SystemExit):
        distill_gates_main(
            ["--model", "m", "--data", "d", "--out", "o", "--target", "decode", "--budget-density", "0.1"]
        )


@pytest.mark.parametrize("quest_weight", [0.0, 0.5])
def test_default_prefill_selection_is_a_calibrated_threshold(data, straight_run, tmp_path, quest_weight):
    """Without --budget-density: the adapter's default selection becomes the threshold that keeps
    --default-density of the blocks on the first distillation windows (`threshold_for_density`), recorded with the
    density the sparse model reaches there; with --quest-weight on the weighted scores, the weight recorded too."""
    model, result, _, _ = straight_run
    model = seer_with_abstract_gates(model, dataclasses.replace(model.seer_config, quest_weight=quest_weight))
    adapter_dir = tmp_path / "adapter"
    shutil.copytree(result.adapter_dir, adapter_dir)
    config = _config(data, tmp_path / "run", steps=8)
    args = argparse.Namespace(
        budget_density=None, default_density=0.3, decode_allocation=None, quest_weight=quest_weight
    )
    record_default_selections(args, config, dataclasses.replace(result, adapter_dir=adapter_dir))
    adapter = read_adapter(adapter_dir)
    windows = jnp.asarray(eval_windows(load_corpus(config.corpus), length=512, num_docs=BUDGET_CALIBRATION_WINDOWS))
    expected, estimated = threshold_for_density(model, windows, density=0.3)
    assert adapter.seer_config.selection == expected and 0 < expected.threshold < 1
    assert adapter.seer_config.quest_weight == quest_weight
    assert json.loads((adapter_dir / ADAPTER_FILE).read_text())["format"] == (4 if quest_weight else 1)
    sparse = seer_with_abstract_gates(model, dataclasses.replace(model.seer_config, selection=expected))
    np.testing.assert_allclose(adapter.prefill_density.density, float(jnp.mean(block_density(sparse, windows))))
    assert abs(adapter.prefill_density.density - estimated) < 0.02  # the dense-logit estimate is close
    assert f"{len(windows)} calibration windows of 512 tokens" in adapter.prefill_density.data
    with pytest.raises(SystemExit):
        distill_gates_main(["--model", "m", "--data", "d", "--out", "o", "--default-density", "0"])
    for flags in (["--quest-weight", "-1"], ["--target", "decode", "--quest-weight", "0.5"]):
        with pytest.raises(SystemExit):
            distill_gates_main(["--model", "m", "--data", "d", "--out", "o", *flags])


def test_decode_allocation_is_recorded_when_asked(data, decode_run, tmp_path):
    """--decode-allocation recall: the recall rule's allocation, calibrated on the first distillation windows from
    the run's slice ratio on, joins the adapter's decode config (format 3); by default ("none", uniform budgets:
    better on the testbed) nothing is recorded; asking for one without decode gates is a one-line CLI error."""
    model, result, _, _, _ = decode_run
    config = _config(data, tmp_path / "run", steps=8, target="decode", decode=DECODE, decode_slice_ratio=0.25)
    copies = {}
    for name, flag in (("recall", "recall"), ("default", None)):
        copies[name] = tmp_path / name
        shutil.copytree(result.adapter_dir, copies[name])
        args = argparse.Namespace(decode_allocation=flag, budget_density=None, default_density=0.3, quest_weight=0.0)
        record_default_selections(args, config, dataclasses.replace(result, adapter_dir=copies[name]))
    windows = eval_windows(load_corpus(config.corpus), length=512, num_docs=BUDGET_CALIBRATION_WINDOWS)
    expected = decode_allocation(model, jnp.asarray(windows), rule="recall", scored_from=0.25)
    assert read_adapter(copies["recall"]).seer_config.decode == dataclasses.replace(DECODE, allocation=expected)
    assert expected.rule == "recall" and expected.length == 512
    assert json.loads((copies["recall"] / ADAPTER_FILE).read_text())["format"] == 3
    assert read_adapter(copies["default"]).seer_config.decode == DECODE
    with pytest.raises(SystemExit):
        distill_gates_main(["--model", "m", "--data", "d", "--out", "o", "--decode-allocation", "recall"])
