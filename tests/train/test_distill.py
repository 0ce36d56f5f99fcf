"""Gate distillation: learning, frozen base, optimizer scope, bit-exact resume, config errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seer_jax.adapters import ADAPTER_FILE
from seer_jax.gate import GateConfig, GateParam
from seer_jax.model import CausalLM
from seer_jax.seer import SeerConfig, seer_from_base
from tests.seer_jax.tiny_models import random_module
from tests.train.tiny import write_docs
from train.data import LoaderConfig
from train.distill import ADAPTER_DIR, GATE_OPTIMIZER, DistillConfig, distill
from train.token_corpus import CorpusConfig
from train.trainer import TrainLoopConfig

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


@pytest.fixture(scope="module")
def data(tmp_path_factory, stdlib_texts, tokenizer_dir):
    root = tmp_path_factory.mktemp("distill_data")
    write_docs(root / "docs.jsonl.gz", stdlib_texts[:20])
    return root, tokenizer_dir


def _model():
    from seer_jax.config import ModelConfig

    config = ModelConfig.from_hf(MODEL_CONFIG)
    # Large weights make attention peaky, so the pooled target carries structure for the gate to learn.
    base = random_module(lambda: CausalLM(config, rngs=nnx.Rngs(0)), seed=3, weight_std=0.3)
    return seer_from_base(base, SeerConfig(gate=GATE), rngs=nnx.Rngs(1), gate_param_dtype=jnp.float32)


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
