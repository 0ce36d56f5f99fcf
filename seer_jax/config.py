"""`ModelConfig`: the architecture of a Llama-family causal LM, read from a Hugging Face `config.json`.

Supported `model_type`s and what differs between them (all are pre-norm RMSNorm + GQA attention + SwiGLU MLP):

| model_type | q/k/v bias            | o_proj bias      | per-head q/k RMSNorm | sliding window                       |
| ---------- | --------------------- | ---------------- | -------------------- | ------------------------------------ |
| llama      | `attention_bias`      | `attention_bias` | no                   | —                                    |
| mistral    | no                    | no               | no                   | `sliding_window`: see below          |
| qwen2      | always                | no               | no                   | `use_sliding_window=true` rejected   |
| qwen3      | `attention_bias`      | `attention_bias` | yes                  | `use_sliding_window=true` rejected   |

Mistral's `sliding_window` only changes attention for sequences longer than the window, so it is kept in the config
and the model raises a `ValueError` when asked to attend over more keys than the window; shorter sequences are exact.

Field names follow this project's spelled-out convention; the HF key each comes from is given in the docstring.
"""

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from seer_jax.rope import RopeConfig

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# transformers' defaults for keys a config.json may omit, where the families disagree.
_FAMILY_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048},
    "mistral": {"num_key_value_heads": 8, "max_position_embeddings": 4096 * 32},
    "qwen2": {"num_key_value_heads": 32, "max_position_embeddings": 32768},
    "qwen3": {"num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768},
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a decoder-only LM (HF key in parentheses).

    Attributes:
      model_type: one of `MODEL_TYPES` (`model_type`).
      vocab_size: V (`vocab_size`).
      hidden_size: D (`hidden_size`).
      intermediate_size: F, the SwiGLU width (`intermediate_size`).
      num_layers: L (`num_hidden_layers`).
      num_q_heads: N (`num_attention_heads`).
      num_kv_heads: K (`num_key_value_heads`; defaults to N).
      head_dim: H (`head_dim`; defaults to D // N).
      rms_norm_eps: epsilon of every RMSNorm (`rms_norm_eps`).
      rope: rotary embedding (`rope_parameters`, or `rope_theta` + `rope_scaling`).
      max_position_embeddings: the context length the checkpoint declares (`max_position_embeddings`).
      tie_word_embeddings: `lm_head` reuses `embed_tokens` (`tie_word_embeddings`).
      qkv_bias: q_proj, k_proj and v_proj have biases.
      o_proj_bias: o_proj has a bias.
      mlp_bias: gate_proj, up_proj and down_proj have biases (Llama's `mlp_bias`).
      qk_norm: per-head RMSNorm of q and k before RoPE (Qwen3's `q_norm` / `k_norm`).
      sliding_window: Mistral's attention window (`sliding_window`), or None.
      initializer_range: stddev of the random init of weights (`initializer_range`).
      bos_token_id, pad_token_id: special tokens, or None (`bos_token_id`, `pad_token_id`).
      eos_token_ids: end-of-sequence tokens (`eos_token_id`, an int or a list).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; expected one of {MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_q_heads", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even int (RoPE rotates pairs), got {self.head_dim!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads ({self.num_kv_heads}) must divide num_q_heads ({self.num_q_heads}) for grouped-query "
                "attention"
            )
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.max_position_embeddings <= 0:
            raise ValueError(f"max_position_embeddings must be > 0, got {self.max_position_embeddings}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be None or > 0, got {self.sliding_window}")
        if not isinstance(self.eos_token_ids, tuple):
            raise ValueError(f"eos_token_ids must be a tuple of ints, got {self.eos_token_ids!r}")

    @property
    def num_q_per_kv(self) -> int:
        """G = N // K."""
        return self.num_q_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any]) -> "ModelConfig":
        """Builds the config from an HF `config.json`: a dict, the file's path, or the directory holding it."""
        hf = _read_hf_config(source) if isinstance(source, str | os.PathLike) else dict(source)
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"config.json model_type {model_type!r} is not supported; expected one of {MODEL_TYPES}")
        hf = {**_FAMILY_DEFAULTS[model_type], **{key: value for key, value in hf.items() if value is not None}}
        hidden_act = hf.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"config.json hidden_act {hidden_act!r} is not supported; only 'silu' (SwiGLU)")
        if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
            raise ValueError(
                f"config.json use_sliding_window=true is not supported for {model_type} (only full attention); "
                "set it to false"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if hf.get(key) is None:
                raise ValueError(f"config.json is missing {key!r}")
        num_q_heads = hf["num_attention_heads"]
        if not isinstance(num_q_heads, int) or num_q_heads <= 0:  # before hidden_size // num_q_heads below
            raise ValueError(f"config.json num_attention_heads must be a positive int, got {num_q_heads!r}")
        head_dim = hf.get("head_dim")
        if head_dim is None:
            if hf["hidden_size"] % num_q_heads:
                raise ValueError(
                    f"config.json has no head_dim and hidden_size ({hf['hidden_size']}) is not a multiple of "
                    f"num_attention_heads ({num_q_heads}); add head_dim"
                )
            head_dim = hf["hidden_size"] // num_q_heads
        attention_bias = bool(hf.get("attention_bias", False))
        biases = {
            "llama": (attention_bias, attention_bias),
            "mistral": (False, False),
            "qwen2": (True, False),
            "qwen3": (attention_bias, attention_bias),
        }
        qkv_bias, o_proj_bias = biases[model_type]
        eos = hf.get("eos_token_id")
        eos_token_ids = () if eos is None else tuple(eos) if isinstance(eos, list | tuple) else (eos,)
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_q_heads=num_q_heads,
            num_kv_heads=hf.get("num_key_value_heads", num_q_heads),  # 0 is refused, not read as "absent"
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf(hf),
            max_position_embeddings=hf["max_position_embeddings"],
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_proj_bias=o_proj_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
            initializer_range=float(hf.get("initializer_range", 0.02)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_token_ids,
            pad_token_id=hf.get("pad_token_id"),
        )


def _read_hf_config(source: str | os.PathLike) -> dict[str, Any]:
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}; point at a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-download or fix the file") from error
