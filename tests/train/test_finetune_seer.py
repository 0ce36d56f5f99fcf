"""`python -m train.finetune --seer-gates`: SeerAttention fine-tuning (block-sparse attention, LM + gate loss)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seer_jax.adapters import load_seer_model
from seer_jax.checkpoint import is_converted
from seer_jax.gate import GateConfig
from tests.train.tiny import write_docs
from train.data import LoaderConfig
from train.distill import GATE_OPTIMIZER, DistillConfig, distill
from train.finetune import main
from train.token_corpus import CorpusConfig
from train.trainer import TrainLoopConfig, read_metrics

TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "vocab_size": 512,  # the `tokenizer_dir` fixture's
    "bos_token_id": 0,
    "eos_token_id": 1,
}


@pytest.fixture(scope="module")
def gated_model(tmp_path_factory, stdlib_texts, tokenizer_dir):
    """A tiny model pretrained for 3 steps, and gates distilled for it (4 steps)."""
    root = tmp_path_factory.mktemp("seer_ft")
    data = write_docs(root / "docs.jsonl.gz", stdlib_texts[:20])
    (root / "config.json").write_text(json.dumps(TINY))
    common = ["--data", data, "--corpus-cache", root / "cache", "--tokenizer-dir", tokenizer_dir,
              "--seq-len", "256", "--batch-size", "2", "--warmup-steps", "1", "--checkpoint-every", "100"]  # fmt: skip
    main([str(a) for a in ["--init-config", root / "config.json", *common, "--steps", "3", "--lr", "1e-2",
                           "--dtype", "float32", "--out", root / "pretrain"]])  # fmt: skip
    distill(
        DistillConfig(
            model=root / "pretrain" / "model",
            corpus=CorpusConfig(paths=(data,), tokenizer_dir=tokenizer_dir, cache_dir=root / "cache"),
            loader=LoaderConfig(seq_len=256, batch_size=2),
            optimizer=dataclasses.replace(GATE_OPTIMIZER, warmup_steps=1),
            loop=TrainLoopConfig(out_dir=root / "distill", total_steps=4, checkpoint_every=100),
            gate=GateConfig(hidden_size=32),
            dtype="float32",
        )
    )
    return root, common


def test_seer_fine_tuning_trains_both_losses_and_writes_model_and_gates(gated_model):
    root, common = gated_model
    out = root / "seer"
    main([str(a) for a in ["--model", root / "pretrain" / "model", *common, "--steps", "4", "--lr", "3e-3",
                           "--dtype", "float32", "--seer-gates", root / "distill" / "adapter", "--nz-ratio", "0.5",
                           "--out", out]])  # fmt: skip
    lines = read_metrics(out)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    for line in lines:
        assert np.isclose(line["loss"], line["lm_loss"] + line["gate_loss"], rtol=1e-5)
        assert line["gate_loss"] > 0 and np.isfinite(line["lm_loss"])
    assert lines[-1]["lm_loss"] < lines[0]["lm_loss"]
    assert is_converted(out / "model")
    model = load_seer_model(out / "adapter", base_path=out / "model", attention_implementation="xla")
    assert model.seer_config.selection.nz_ratio == 0.5
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, 512, (1, 256)), jnp.int32)
    logits, _ = jax.jit(lambda t: model(t))(tokens)
    assert np.isfinite(np.asarray(logits)).all()


def test_seer_mode_with_remat_trains_the_same(gated_model):
    root, common = gated_model
    runs = {}
    for name, extra in (("plain", []), ("remat", ["--remat"])):
        args = ["--model", root / "pretrain" / "model", *common, "--steps", "2", "--lr", "3e-3", "--dtype", "float32",
                "--seer-gates", root / "distill" / "adapter", *extra, "--out", root / f"remat-{name}"]  # fmt: skip
        main([str(a) for a in args])
        runs[name] = read_metrics(root / f"remat-{name}")
    for plain, remat in zip(runs["plain"], runs["remat"], strict=True):
        for key in ("loss", "lm_loss", "gate_loss", "grad_norm"):
            assert np.isclose(remat[key], plain[key], rtol=1e-5), (key, remat[key], plain[key])
