"""The demo model: trained once on a small standard-library corpus, then served from the cache."""

import json
import math

import numpy as np
import pytest
import torch
import transformers

from seer_jax.checkpoint import load_model
from train.demo.model import MANIFEST_FILE, DemoModelConfig, pretrain_demo_model
from train.model_source import PRESETS
from train.trainer import read_metrics


@pytest.mark.slow
def test_pretrains_once_then_reuses(tmp_path):
    config = DemoModelConfig(cache_dir=tmp_path, steps=3, seq_len=64, batch_size=2, warmup_steps=1, max_files=40)
    demo = pretrain_demo_model(config)
    assert not demo.reused and demo.model_dir == tmp_path / "model"
    _, model_config = load_model(demo.model_dir)
    assert model_config.num_layers == PRESETS["demo-llama"]["num_hidden_layers"]
    assert math.isfinite(demo.eval_loss) and demo.eval_loss < math.log(model_config.vocab_size)
    assert demo.eval_perplexity == pytest.approx(math.exp(demo.eval_loss))
    assert demo.train_loss == pytest.approx(np.mean([line["loss"] for line in read_metrics(tmp_path / "run")]))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(demo.model_dir, dtype=torch.float32)
    assert hf_model.config.num_hidden_layers == model_config.num_layers
    assert transformers.AutoTokenizer.from_pretrained(demo.model_dir).eos_token == "<|eos|>"

    model_files = {p: p.stat().st_mtime_ns for p in demo.model_dir.iterdir()}
    again = pretrain_demo_model(config)
    assert again.reused and again.eval_loss == demo.eval_loss
    assert {p: p.stat().st_mtime_ns for p in demo.model_dir.iterdir()} == model_files
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["settings"]["steps"] == 3
