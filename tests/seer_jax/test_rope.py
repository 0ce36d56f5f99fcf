"""RoPE against HF's rotary embedding for every supported scaling, at the model's head dim and a gate's dim (128)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from seer_jax.rope import RopeConfig, apply_rope, attention_scaling, inverse_frequencies

ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 2048,
    },
    "yarn": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 4096},
    "yarn_attention_factor": {
        "rope_type": "yarn",
        "rope_theta": 1e4,
        "factor": 16.0,
        "original_max_position_embeddings": 4096,
        "attention_factor": 0.8,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
    },
    "yarn_mscale_untruncated": {
        "rope_type": "yarn",
        "rope_theta": 1e4,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "truncate": False,
    },
}


def hf_rotary(parameters: dict, dim: int) -> LlamaRotaryEmbedding:
    config = transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=2, head_dim=dim, max_position_embeddings=16384, rope_parameters=parameters
    )
    return LlamaRotaryEmbedding(config)


def ours(parameters: dict, max_position_embeddings: int = 16384) -> RopeConfig:
    return RopeConfig.from_hf({"rope_parameters": parameters, "max_position_embeddings": max_position_embeddings})


@pytest.mark.parametrize("name", ROPE_PARAMETERS)
@pytest.mark.parametrize("dim", [32, 128])
def test_frequencies_match_hf(name, dim):
    rotary = hf_rotary(dict(ROPE_PARAMETERS[name]), dim)
    rope = ours(ROPE_PARAMETERS[name])
    np.testing.assert_allclose(inverse_frequencies(rope, dim), rotary.inv_freq.numpy(), rtol=1e-6)
    assert attention_scaling(rope) == pytest.approx(rotary.attention_scaling, rel=1e-12)


@pytest.mark.parametrize("name", ROPE_PARAMETERS)
@pytest.mark.parametrize("dim", [32, 128])
def test_apply_rope_matches_hf(name, dim):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 40, 3, dim)).astype(np.float32)  # [B, T, heads, dim]
    # Frequencies agree with HF's to ~1 ulp (float32 pow rounds differently), so angle differences grow with the
    # position: compare over the first 64 (the scalings act on frequencies, so they are exercised all the same).
    positions = np.stack([np.arange(40), np.arange(40) + 24])
    rotary = hf_rotary(dict(ROPE_PARAMETERS[name]), dim)
    with torch.no_grad():
        cos, sin = rotary(torch.from_numpy(x), torch.from_numpy(positions))
        expected, _ = apply_rotary_pos_emb(torch.from_numpy(x), torch.from_numpy(x), cos, sin, unsqueeze_dim=2)
    rotated = apply_rope(jnp.asarray(x), jnp.asarray(positions), ours(ROPE_PARAMETERS[name]))
    np.testing.assert_allclose(rotated, expected.numpy(), rtol=0, atol=2e-5)


def test_apply_rope_keeps_dtype():
    x = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    assert apply_rope(x, jnp.zeros((1, 4), jnp.int32), RopeConfig()).dtype == jnp.bfloat16


def test_transformers4_keys():
    old = RopeConfig.from_hf(
        {
            "rope_theta": 1e6,
            "max_position_embeddings": 32768,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        }
    )
    assert old == RopeConfig(rope_type="yarn", theta=1e6, factor=4.0, original_max_position_embeddings=32768)
    assert RopeConfig.from_hf({"rope_theta": 5e5}) == RopeConfig(theta=5e5)
    assert RopeConfig.from_hf({}) == RopeConfig(theta=10000.0)


def test_hf_defaults_for_missing_keys():
    """yarn: factor from max / original positions; llama3 / yarn: original length from max_position_embeddings."""
    rope = RopeConfig.from_hf(
        {
            "max_position_embeddings": 8192,
            "rope_parameters": {"rope_type": "yarn", "original_max_position_embeddings": 2048},
        }
    )
    assert rope.factor == 4.0
    llama3 = dict(ROPE_PARAMETERS["llama3"])
    del llama3["original_max_position_embeddings"]
    assert ours(llama3, max_position_embeddings=4096).original_max_position_embeddings == 4096


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rope_type": "dynamic"}, "rope_type 'dynamic' is not supported"),
        ({"theta": 0.0}, "theta must be > 0"),
        ({"rope_type": "yarn", "factor": 4.0}, "original_max_position_embeddings must be a positive int"),
        (
            {"rope_type": "llama3", "original_max_position_embeddings": 8, "low_freq_factor": 4.0},
            "high_freq_factor (4.0) must be greater than low_freq_factor (4.0)",
        ),
    ],
)
def test_invalid_config(fields, message):
    with pytest.raises(ValueError) as raised:
        RopeConfig(**fields)
    assert message in str(raised.value)


def test_odd_dim_rejected():
    with pytest.raises(ValueError, match="rotary dim must be a positive even number"):
        inverse_frequencies(RopeConfig(), 7)
