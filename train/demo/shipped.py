"""The embedded default's shipped model: `train/demo/seer-demo-llama/`, package data, when this checkout has it.

A small Llama (the `seer-demo-llama` preset of `train.model_source.PRESETS`) pretrained once on one GPU by
`train/demo/pretrain_shipped.sh` (its MODEL_CARD.md gives the command, data and metrics). With it, `python -m
train.distill_gates` with no `--model` skips the demo's CPU pretraining and distils gates for a model whose attention
has the long-range structure of a trained code model; without it (a checkout from before it was added), the demo
pretrains its small model on the CPU as before (`train.demo.model`).
"""

from pathlib import Path

SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "seer-demo-llama"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def shipped_model_dir() -> Path | None:
    """`SHIPPED_MODEL_DIR` when it holds a complete model (config, weights, tokenizer), else None."""
    return SHIPPED_MODEL_DIR if all((SHIPPED_MODEL_DIR / name).is_file() for name in _REQUIRED) else None
