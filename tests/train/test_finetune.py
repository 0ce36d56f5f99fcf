"""`python -m train.finetune` end to end on a tiny Llama: from scratch (bf16 compute, YaRN, remat), then
fine-tuning the result; outputs, export and the errors that must stop a run early."""

import json
import os
import re
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from seer_jax.checkpoint import is_converted, load_model
from tests.seer_jax.test_adapters import bad_adapters
from tests.train.tiny import write_docs
from train import progress as progress_module
from train.finetune import main
from train.progress import training_progress
from train.trainer import read_metrics

# One worker runs this module under `pytest -n` (pyproject: --dist loadgroup), so its module fixtures build once.
pytestmark = pytest.mark.xdist_group("finetune")

TINY = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "vocab_size": 512,  # the `tokenizer_dir` fixture's
    "bos_token_id": 0,
    "eos_token_id": 1,
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, stdlib_texts, tokenizer_dir):
    root = tmp_path_factory.mktemp("inputs")
    write_docs(root / "docs.jsonl.gz", stdlib_texts[:20])
    (root / "config.json").write_text(json.dumps(TINY))
    return root, tokenizer_dir


def common_args(inputs, out_dir, steps):
    root, tokenizer_dir = inputs
    return [
        "--data", root / "docs.jsonl.gz", "--corpus-cache", root / "cache", "--tokenizer-dir", tokenizer_dir,
        "--seq-len", "128", "--batch-size", "2", "--steps", steps, "--lr", "1e-2", "--warmup-steps", "1",
        "--schedule", "cosine", "--out", out_dir, "--checkpoint-every", "2",
    ]  # fmt: skip


def run(*args):
    main([str(arg) for arg in args])


def failure(*args) -> str:
    with pytest.raises(SystemExit) as raised:
        run(*args)
    message = raised.value.code
    assert isinstance(message, str) and message.count("\n") == 0, message
    return message


@pytest.fixture(scope="module")
def scratch_run(inputs, tmp_path_factory):
    """3 steps from scratch: bf16 compute, YaRN ×2 (64 → 128 positions), remat, float32 HF export."""
    out = tmp_path_factory.mktemp("scratch")
    root = inputs[0]
    run(
        "--init-config", root / "config.json", *common_args(inputs, out / "run", 3),
        "--yarn-factor", "2", "--remat", "--export-hf", out / "hf", "--export-dtype", "float32",
    )  # fmt: skip
    return out


def test_from_scratch_writes_run_model_and_export(scratch_run):
    run_dir, hf_dir = scratch_run / "run", scratch_run / "hf"
    lines = read_metrics(run_dir)
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all(np.isfinite(line["loss"]) for line in lines) and lines[-1]["loss"] < lines[0]["loss"]
    assert lines[0]["loss"] == pytest.approx(np.log(512), abs=0.3)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "3"]
    assert json.loads((run_dir / "finetune.json").read_text())["remat"] is True

    config = json.loads((run_dir / "config.json").read_text())
    assert config["max_position_embeddings"] == 128
    assert config["rope_parameters"] == {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 2.0,
        "original_max_position_embeddings": 64,
    }
    assert is_converted(run_dir / "model")
    model, model_config = load_model(run_dir / "model")
    assert model_config.rope.rope_type == "yarn"
    params = nnx.state(model, nnx.Param)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}  # fp32 master weights

    assert json.loads((hf_dir / "config.json").read_text()) == {**config, "dtype": "float32"}
    assert (hf_dir / "tokenizer.json").is_file()
    exported, _ = load_model(hf_dir)
    for ours, reference in zip(jax.tree.leaves(nnx.state(exported, nnx.Param)), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(ours, reference)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    assert hf_model.config.rope_parameters["rope_type"] == "yarn"


def test_fine_tuning_the_trained_model_continues_from_its_loss(inputs, scratch_run, tmp_path):
    model_dir = scratch_run / "run" / "model"
    args = common_args(inputs, tmp_path / "run", 2)
    tokenizer_at = args.index("--tokenizer-dir")
    del args[tokenizer_at : tokenizer_at + 2]  # the model directory carries the tokenizer
    run("--model", model_dir, *args, "--dtype", "float32")
    first = read_metrics(tmp_path / "run")[0]["loss"]
    scratch = read_metrics(scratch_run / "run")
    assert first < scratch[0]["loss"] - 0.1  # starts from the trained weights, not from a random init
    assert is_converted(tmp_path / "run" / "model")


def test_errors_stop_before_training(inputs, scratch_run, tmp_path):
    root = inputs[0]
    config = ("--init-config", root / "config.json")
    already = failure(*config, *common_args(inputs, scratch_run / "run", 3), "--yarn-factor", "2")
    assert "already holds checkpoints" in already
    # 128-token rows need the YaRN extension of the 64-position config.
    assert "exceeds the model's max_position_embeddings (64)" in failure(
        *config, *common_args(inputs, tmp_path / "a", 3)
    )
    assert "already exists" in failure(*config, *common_args(inputs, tmp_path / "b", 3), "--export-hf", root)
    assert "--yarn-original-max-positions needs --yarn-factor" in failure(
        *config, *common_args(inputs, tmp_path / "c", 3), "--yarn-original-max-positions", "64"
    )
    assert "--yarn-replace-scaling needs --yarn-factor" in failure(
        *config, *common_args(inputs, tmp_path / "c", 3), "--yarn-replace-scaling"
    )
    assert not (tmp_path / "a" / "checkpoints").exists()


def _with(args: list, flag: str, value) -> list:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def test_resume_refuses_changed_settings_and_accepts_allowed_ones(inputs, scratch_run, tmp_path):
    shutil.copytree(scratch_run / "run", tmp_path / "run")
    config = ("--init-config", inputs[0] / "config.json", "--yarn-factor", "2", "--resume")
    args = common_args(inputs, tmp_path / "run", 3)
    message = failure(*config, *_with(_with(_with(args, "--lr", "5e-2"), "--batch-size", "4"), "--steps", "5"))
    for change in ("loader.batch_size 2 → 4", "loop.total_steps 3 → 5", "optimizer.learning_rate 0.01 → 0.05"):
        assert change in message, message
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2", "3"]
    run(*config, *_with(args, "--checkpoint-every", "5"))  # another --out, no --remat, no export: allowed
    assert json.loads((tmp_path / "run" / "finetune.json").read_text())["loop"]["checkpoint_every"] == 5


def test_a_signal_mid_run_saves_exits_130_and_exports_nothing(inputs, tmp_path, monkeypatch):
    def stop_after_step_1(total_steps):
        bar, on_step = training_progress(total_steps)

        def on_step_then_sigint(record):
            on_step(record)
            if record.step == 1:
                os.kill(os.getpid(), signal.SIGINT)

        return bar, on_step_then_sigint

    monkeypatch.setattr(progress_module, "training_progress", stop_after_step_1)  # read when main runs
    args = common_args(inputs, tmp_path / "run", 3)
    with pytest.raises(SystemExit) as raised:
        run("--init-config", inputs[0] / "config.json", "--yarn-factor", "2", *args, "--export-hf", tmp_path / "hf")
    assert raised.value.code == 130
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2"]
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "hf").exists()


def test_bad_seer_gates_exit_with_one_line(inputs, tmp_path):
    cases = bad_adapters(tmp_path / "adapters")
    for name in ("no_tensors_key", "truncated_pth", "pickle_pth", "nan_gates"):
        directory, match = cases[name]
        args = common_args(inputs, tmp_path / name, 2)
        message = failure(
            "--init-config", inputs[0] / "config.json", "--yarn-factor", "2", *args, "--seer-gates", directory
        )
        assert re.search(match, message), (name, message)
        assert not (tmp_path / name / "checkpoints").exists()
