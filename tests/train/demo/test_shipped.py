"""The embedded default with the shipped pretrained model: no CPU pretraining, its own tokenizer, its settings; the
shipped weights themselves."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer

import train.demo.corpus as corpus_module
import train.demo.model as demo_model
import train.demo.shipped as shipped
from train import distill_gates
from train.demo.corpus import DemoCorpusConfig, build_demo_corpus


def test_a_corpus_without_tokenizer(tmp_path):
    config = DemoCorpusConfig(cache_dir=tmp_path, max_files=8, vocab_size=None)
    corpus = build_demo_corpus(config)
    assert corpus.tokenizer_dir is None and not (tmp_path / "tokenizer").exists()
    assert corpus.train_path.is_file() and corpus.eval_path.is_file() and not corpus.reused
    assert build_demo_corpus(config) == dataclasses.replace(corpus, reused=True)
    with_tokenizer = build_demo_corpus(dataclasses.replace(config, vocab_size=300))  # another setting: rebuilt
    assert not with_tokenizer.reused and (with_tokenizer.tokenizer_dir / "tokenizer.json").is_file()


def _fake_model_dir(path):
    path.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (path / name).write_text("{}")
    return path


@pytest.mark.parametrize("present", [True, False], ids=["shipped", "absent"])
def test_the_demo_uses_the_shipped_model_when_present(tmp_path, monkeypatch, present):
    """With `train/demo/seer-demo-llama` complete, the demo distils and evaluates it at its settings and never
    pretrains; without it, the CPU-pretrained demo model and the old settings."""
    model_dir = _fake_model_dir(tmp_path / "shipped") if present else tmp_path / "missing"
    monkeypatch.setattr(shipped, "SHIPPED_MODEL_DIR", model_dir)
    corpora, distilled, evaluated = [], [], []
    demo_dir = _fake_model_dir(tmp_path / "demo-model")

    def fake_corpus(config):
        corpora.append(config)
        return corpus_module.DemoCorpus(
            train_path=tmp_path / "train.jsonl.gz",
            eval_path=tmp_path / "eval.jsonl.gz",
            tokenizer_dir=None if config.vocab_size is None else tmp_path / "tokenizer",
            train_docs=9,
            eval_docs=1,
            train_chars=90,
            eval_chars=10,
            reused=False,
        )

    def fake_pretrain(config, on_step=None):
        assert not present, "the shipped model is not pretrained again"
        return demo_model.DemoModel(
            model_dir=demo_dir,
            reused=True,
            train_loss=5.0,
            eval_loss=6.0,
            eval_perplexity=403.0,
            train_seconds=1.0,
            tokens_per_second=1.0,
        )

    monkeypatch.setattr(corpus_module, "build_demo_corpus", fake_corpus)
    monkeypatch.setattr(demo_model, "pretrain_demo_model", fake_pretrain)

    def fake_distillation(config):
        distilled.append(config)
        config.adapter_dir.mkdir(parents=True)  # what the evaluation reads

    monkeypatch.setattr(distill_gates, "run_distillation", fake_distillation)
    monkeypatch.setattr(distill_gates, "record_default_selections", lambda args, config, result: None)
    monkeypatch.setattr(distill_gates, "run_evaluation", lambda config, out: evaluated.append(config))
    distill_gates.main(["--demo-cache", str(tmp_path / "cache")])

    (config,), (eval_config,) = distilled, evaluated
    settings = distill_gates.SHIPPED_DISTILL if present else distill_gates.DEMO_DISTILL
    expected_eval = distill_gates.SHIPPED_EVAL if present else distill_gates.DEMO_EVAL
    assert config.model == eval_config.model == (model_dir if present else demo_dir)
    assert (config.loader.seq_len, config.loader.batch_size) == (settings["seq_len"], settings["batch_size"])
    assert config.loop.total_steps == settings["steps"] and config.gate.hidden_size == settings["gate_hidden_size"]
    assert eval_config.lengths == expected_eval["lengths"] and eval_config.nz_ratios == expected_eval["nz_ratios"]
    assert [c.vocab_size is None for c in corpora] == [present]  # the shipped model brings its own tokenizer


@pytest.mark.skipif(shipped.shipped_model_dir() is None, reason="this checkout has no shipped demo model")
def test_the_shipped_model_is_a_trained_code_model():
    """The shipped weights load and model held-out Python source: next-token perplexity of 512 tokens of a
    held-out standard-library module near the model card's 18.0 (a corrupt or untrained model gives ~4096), and the
    card's metrics match the files beside it."""
    from seer_jax.checkpoint import load_model

    model_dir = shipped.shipped_model_dir()
    model, config = load_model(model_dir)
    assert (config.num_layers, config.hidden_size, config.vocab_size) == (4, 192, 4096)
    package = Path(json.__file__).parent  # `json`: held out of the shipped model's training build
    source = (package / "decoder.py").read_text() + (package / "encoder.py").read_text()
    ids = [0, *Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(source).ids[:511]]  # BOS + 511 tokens
    tokens = jnp.asarray([ids], jnp.int32)
    logits, _ = model(tokens)
    logits = logits[0]  # [T, V]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:-1].astype(jnp.float32)), tokens[0, 1:, None], axis=-1)
    perplexity = float(np.exp(np.mean(np.asarray(nll))))
    assert 3.0 < perplexity < 40.0, perplexity
    card = (model_dir / "MODEL_CARD.md").read_text()
    evaluated = json.loads((model_dir / "eval_results.json").read_text())["rows"]
    for row in evaluated:
        assert f"| {row['length']:,} | {row['ppl']:.2f} |" in card
