"""A run's stored configuration: a resume that changes a field fails with one line listing the changed fields;
the fields the caller allows may change; paths compare as absolute paths."""

import dataclasses
import json
from pathlib import Path

import pytest

from train.data import LoaderConfig
from train.distill import GATE_OPTIMIZER, MAY_CHANGE_ON_RESUME, DistillConfig
from train.lm_training import may_change_on_resume
from train.run_config import store_run_config
from train.token_corpus import CorpusConfig
from train.trainer import TrainLoopConfig


def distill_config(
    *, seq_len=128, learning_rate=1e-3, steps=500, checkpoint_every=100, out_dir="run", cache_dir=None, resume=False
) -> DistillConfig:
    return DistillConfig(
        model=Path("model"),
        corpus=CorpusConfig(paths=(Path("docs.jsonl"),), tokenizer_dir=Path("model"), cache_dir=cache_dir),
        loader=LoaderConfig(seq_len=seq_len, batch_size=2),
        optimizer=dataclasses.replace(GATE_OPTIMIZER, learning_rate=learning_rate),
        loop=TrainLoopConfig(
            out_dir=Path(out_dir), total_steps=steps, checkpoint_every=checkpoint_every, resume=resume
        ),
    )


def test_a_changed_trajectory_is_refused_listing_the_fields(tmp_path):
    path = tmp_path / "distill.json"
    store_run_config(path, distill_config(), resume=False, may_change=MAY_CHANGE_ON_RESUME)
    assert json.loads(path.read_text())["model"] == str(Path("model").absolute())
    changed = distill_config(seq_len=256, learning_rate=5e-3, steps=800, resume=True, checkpoint_every=7)
    with pytest.raises(ValueError) as raised:
        store_run_config(path, changed, resume=True, may_change=MAY_CHANGE_ON_RESUME)
    message = str(raised.value)
    assert "\n" not in message
    expected = "loader.seq_len 128 → 256; loop.total_steps 500 → 800; optimizer.learning_rate 0.001 → 0.005."
    assert expected in message, message
    assert "checkpoint_every" not in message.split("(only")[0]
    assert json.loads(path.read_text())["loader"]["seq_len"] == 128  # the stored configuration is kept


def test_allowed_changes_pass_and_are_stored(tmp_path):
    path = tmp_path / "distill.json"
    store_run_config(path, distill_config(), resume=False, may_change=MAY_CHANGE_ON_RESUME)
    allowed = distill_config(out_dir="elsewhere", cache_dir=Path("cache"), checkpoint_every=5, resume=True)
    store_run_config(path, allowed, resume=True, may_change=MAY_CHANGE_ON_RESUME)
    assert json.loads(path.read_text())["loop"]["checkpoint_every"] == 5


def test_finetune_steps_may_grow_only_under_the_constant_schedule():
    from train.optimizer import OptimizerConfig

    config = type("Config", (), {"optimizer": OptimizerConfig(learning_rate=1e-3, schedule="constant")})
    assert "loop.total_steps" in may_change_on_resume(config)
    config.optimizer = OptimizerConfig(learning_rate=1e-3, schedule="cosine")
    assert "loop.total_steps" not in may_change_on_resume(config)


def test_a_field_added_since_at_its_default_none_is_no_change(tmp_path):
    """A run stored before a field existed (here the decode config's allocation) resumes while the field is None;
    a value for it is a change."""
    from seer_jax.decode_config import DecodeAllocation, DecodeConfig

    path = tmp_path / "distill.json"
    config = dataclasses.replace(distill_config(), target="decode", decode=DecodeConfig())
    store_run_config(path, config, resume=False, may_change=MAY_CHANGE_ON_RESUME)
    stored = json.loads(path.read_text())
    del stored["decode"]["allocation"]
    path.write_text(json.dumps(stored))
    store_run_config(path, config, resume=True, may_change=MAY_CHANGE_ON_RESUME)
    path.write_text(json.dumps(stored))
    allocation = DecodeAllocation(fractions=(1.0,), layer_fractions=((1.0,),), length=64)
    allocated = dataclasses.replace(config, decode=DecodeConfig(allocation=allocation))
    with pytest.raises(ValueError, match=r"decode\.allocation\.fractions"):
        store_run_config(path, allocated, resume=True, may_change=MAY_CHANGE_ON_RESUME)
