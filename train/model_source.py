"""The model a training run starts from, and its Hugging Face config: a checkpoint, a config.json, or a preset.

A run is described by an HF config dict (what `config.json` holds), because that is what an exported model must
carry; `ModelConfig.from_hf` reads the architecture from it. The dict comes from a model directory (converted or
HF), from a `config.json` to train from scratch, or from a named preset (`PRESETS`, whose vocabulary and special
tokens are filled in from the tokenizer). `apply_yarn` rewrites its RoPE settings for YaRN context extension
(docs/design.md §5) before the model is built: only RoPE and `max_position_embeddings` change, never a weight's shape.
"""

import copy
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from transformers import PreTrainedTokenizerBase

from seer_jax.checkpoint import abstract_model, load_model
from seer_jax.config import ModelConfig
from seer_jax.model import CausalLM
from seer_jax.rope import RopeConfig

# Architectures to train from scratch; `vocab_size` and the special tokens come from the tokenizer.
# The embedded demo's model (`train.demo.model`): a small Llama that trains on the standard-library corpus in about
# two minutes on 2 CPU cores. Four query heads share two kv heads (G = 2); head_dim 64 like the large Llamas and the
# kernels' tested shapes (so N·H = 256 > D). Hidden 128 rather than 256: at this budget (~300k tokens) the narrower
# model is twice as fast per token and reaches a lower loss.
_DEMO_LLAMA: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
}
PRESETS: dict[str, dict[str, Any]] = {
    "demo-llama": _DEMO_LLAMA,
    # The shipped pretrained model of the embedded default (`train/demo/seer-demo-llama/`, its model card there): the
    # demo's architecture, wider, trained once on the H200 on Python source at 2048 tokens; small enough (~2.6M
    # parameters, ~5 MB in bf16) to ship as package data. Tied embeddings keep it small.
    "seer-demo-llama": {**_DEMO_LLAMA, "hidden_size": 192, "intermediate_size": 512, "tie_word_embeddings": True},
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class YarnConfig:
    """factor: context extension (max positions = factor × original). original_max_position_embeddings: the
    context the model was trained for; None: its config's `max_position_embeddings`. replace_scaling: allow a
    model whose RoPE is already scaled (Llama-3.1's `llama3`, `linear`) to have that scaling replaced by YaRN.
    """

    factor: float
    original_max_position_embeddings: int | None = None
    replace_scaling: bool = False

    def __post_init__(self):
        if not self.factor > 1:
            raise ValueError(f"factor: {self.factor} must be > 1 (YaRN extends the context)")
        if self.original_max_position_embeddings is not None and self.original_max_position_embeddings <= 0:
            raise ValueError(
                f"original_max_position_embeddings: {self.original_max_position_embeddings} must be positive"
            )


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The dict in `path` (a config.json file, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    return json.loads(path.read_text())


def preset_config(name: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The HF config of preset `name`, with the vocabulary size and special-token ids of `tokenizer`."""
    if name not in PRESETS:
        raise ValueError(f"preset: {name!r} is not one of {sorted(PRESETS)}")
    return {
        **copy.deepcopy(PRESETS[name]),
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def apply_yarn(hf_config: Mapping[str, Any], yarn: YarnConfig) -> dict[str, Any]:
    """A copy of `hf_config` with YaRN RoPE scaling (docs/design.md §5) in transformers-5 form.

    `rope_parameters` becomes {rope_type: yarn, rope_theta, factor, original_max_position_embeddings} (the legacy
    `rope_theta` / `rope_scaling` keys are dropped) and `max_position_embeddings` becomes factor × original.

    YaRN replaces an existing scaling rather than composing with it (HF has no rope type for a composition, and the
    export must load in transformers), so a model with scaled RoPE needs `yarn.replace_scaling`: its interpolated
    low frequencies go back to the base `rope_theta` spectrum before YaRN's ramp, which fine-tuning then adapts to.
    """
    model_config = ModelConfig.from_hf(hf_config)
    if model_config.rope.rope_type != "default" and not yarn.replace_scaling:
        raise ValueError(
            f"yarn: the model already scales RoPE ({model_config.rope.rope_type!r}); YaRN would replace that "
            "scaling (the official recipe starts from Meta-Llama-3-8B, default RoPE): pass --yarn-replace-scaling "
            "to do so"
        )
    original = yarn.original_max_position_embeddings or model_config.max_position_embeddings
    out = {
        key: value for key, value in copy.deepcopy(dict(hf_config)).items() if key not in ("rope_theta", "rope_scaling")
    }
    out["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": model_config.rope.theta,
        "factor": float(yarn.factor),
        "original_max_position_embeddings": original,
    }
    out["max_position_embeddings"] = round(yarn.factor * original)
    return out


def build_model(
    hf_config: Mapping[str, Any],
    *,
    model_dir: Path | None,
    seed: int,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    attention_implementation: str,
    mesh: Mesh | None = None,
) -> CausalLM:
    """The model `hf_config` describes: weights from `model_dir` (converted or HF), or random from `seed` if None.

    `hf_config` may differ from `model_dir`'s own config.json in RoPE and context length only (`apply_yarn`).
    mesh: place loaded weights on it as they are read (`seer_jax.checkpoint.load_model`); a random init is made on
    the default device.
    """
    config = ModelConfig.from_hf(hf_config)
    options = dict(dtype=dtype, param_dtype=param_dtype, attention_implementation=attention_implementation)
    if model_dir is None:
        return CausalLM(config, rngs=nnx.Rngs(seed), **options)
    loaded, loaded_config = load_model(model_dir, mesh=mesh, **options)
    if loaded_config == config:
        return loaded
    unchanged = dataclasses.replace(config, rope=RopeConfig(), max_position_embeddings=1)
    if dataclasses.replace(loaded_config, rope=RopeConfig(), max_position_embeddings=1) != unchanged:
        raise ValueError(f"the config differs from {model_dir}'s in more than RoPE and max_position_embeddings")
    model = abstract_model(config, **options)
    nnx.update(model, nnx.state(loaded))
    return model
