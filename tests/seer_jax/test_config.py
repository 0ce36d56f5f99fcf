"""`ModelConfig.from_hf`: every family, both RoPE key styles, and clear errors for what is not supported."""

import json

import pytest
import transformers

from seer_jax.config import ModelConfig
from seer_jax.rope import RopeConfig
from tests.train.tiny import TINY_HF_CONFIG

# The testbed's config.json (transformers-5 `rope_parameters`), trimmed to the keys that matter.
TESTBED_STYLE = {
    "model_type": "llama",
    "vocab_size": 8192,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "rms_norm_eps": 1e-05,
    "max_position_embeddings": 16384,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
    "rope_parameters": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 2048,
        "rope_theta": 500000.0,
        "rope_type": "llama3",
    },
}


def transformers4_style(config: dict) -> dict:
    """The same config as Llama 3.1 checkpoints ship it: `rope_theta` + `rope_scaling`."""
    old = {key: value for key, value in config.items() if key != "rope_parameters"}
    scaling = dict(config["rope_parameters"])
    old["rope_theta"] = scaling.pop("rope_theta")
    old["rope_scaling"] = scaling
    return old


def test_testbed_style_config():
    config = ModelConfig.from_hf(TESTBED_STYLE)
    assert (config.num_layers, config.num_q_heads, config.num_kv_heads, config.head_dim) == (6, 4, 2, 128)
    assert config.num_q_per_kv == 2
    assert config.rope == RopeConfig(
        rope_type="llama3",
        theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=2048,
    )
    assert config.eos_token_ids == (1,) and config.pad_token_id == 2
    assert not (config.qkv_bias or config.o_proj_bias or config.qk_norm or config.tie_word_embeddings)


def test_transformers4_keys_give_the_same_config():
    assert ModelConfig.from_hf(transformers4_style(TESTBED_STYLE)) == ModelConfig.from_hf(TESTBED_STYLE)


def test_reads_a_directory_or_a_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TESTBED_STYLE))
    expected = ModelConfig.from_hf(TESTBED_STYLE)
    assert ModelConfig.from_hf(tmp_path) == expected
    assert ModelConfig.from_hf(str(tmp_path / "config.json")) == expected


@pytest.mark.parametrize(
    ("config_class", "kwargs", "expected"),
    [
        (transformers.LlamaConfig, {"attention_bias": True}, dict(qkv_bias=True, o_proj_bias=True, qk_norm=False)),
        (transformers.MistralConfig, {"sliding_window": 4096}, dict(qkv_bias=False, sliding_window=4096)),
        (transformers.Qwen2Config, {}, dict(qkv_bias=True, o_proj_bias=False, sliding_window=None)),
        (transformers.Qwen3Config, {"tie_word_embeddings": True}, dict(qk_norm=True, tie_word_embeddings=True)),
    ],
)
def test_families(config_class, kwargs, expected):
    hf = config_class(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, **kwargs).to_dict()
    config = ModelConfig.from_hf(hf)
    for field, value in expected.items():
        assert getattr(config, field) == value, field


def test_eos_list_and_derived_head_dim():
    hf = {**TESTBED_STYLE, "eos_token_id": [1, 7], "head_dim": None}
    config = ModelConfig.from_hf(hf)
    assert config.eos_token_ids == (1, 7)
    assert config.head_dim == 512 // 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gemma"}, "model_type 'gemma' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"num_key_value_heads": 3}, "num_kv_heads (3) must divide num_q_heads (4)"),
        ({"head_dim": None, "num_attention_heads": 5}, "add head_dim"),
        ({"head_dim": 127}, "head_dim must be a positive even int"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps must be > 0"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic' is not supported"),
        ({"rope_parameters": {"rope_type": "longrope"}}, "rope_type 'longrope' is not supported"),
        ({"rope_parameters": {"rope_type": "linear"}}, "rope_parameters.factor is required for rope_type 'linear'"),
        ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
        ({"rope_parameters": {"rope_type": "default", "mrope_section": [2]}}, "keys ['mrope_section']"),
        ({"vocab_size": None}, "config.json is missing 'vocab_size'"),
    ],
)
def test_errors_name_the_field(change, message):
    with pytest.raises(ValueError) as raised:
        ModelConfig.from_hf({**TESTBED_STYLE, **change})
    assert message in str(raised.value)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_sliding_window_rejected(model_type):
    hf = {**TESTBED_STYLE, "model_type": model_type, "use_sliding_window": True, "sliding_window": 4096}
    with pytest.raises(ValueError, match="use_sliding_window=true is not supported"):
        ModelConfig.from_hf(hf)


def test_qwen_sliding_window_off_is_ignored():
    hf = {**TESTBED_STYLE, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 4096}
    assert ModelConfig.from_hf(hf).sliding_window is None


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        ModelConfig.from_hf(tmp_path)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"num_attention_heads": 0, "head_dim": None}, "num_attention_heads must be a positive int, got 0"),
        ({"head_dim": 0}, "head_dim must be a positive even int"),
        ({"num_key_value_heads": 0}, "num_kv_heads must be a positive int, got 0"),
    ],
)
def test_zero_head_sizes_name_the_field(changes, match):
    hf = {**TINY_HF_CONFIG, **changes}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf({key: value for key, value in hf.items() if value is not None})
