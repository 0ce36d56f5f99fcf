"""Where a run's model comes from: YaRN config rewriting, presets, and building from a directory or from scratch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seer_jax.config import ModelConfig
from seer_jax.hf_export import save_hf
from seer_jax.rope import RopeConfig
from tests.train.tiny import TINY_HF_CONFIG, tiny_model
from train.model_source import YarnConfig, apply_yarn, build_model, preset_config, read_hf_config
from train.token_corpus import load_tokenizer

LLAMA3_8B_ROPE = {"rope_theta": 500000.0, "max_position_embeddings": 8192}  # transformers-4 keys


def test_yarn_as_in_the_spec():
    # SPEC §8: {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}, 4 × 8192 positions.
    base = {**TINY_HF_CONFIG, **LLAMA3_8B_ROPE, "rope_scaling": None}
    del base["rope_parameters"]
    yarn = apply_yarn(base, YarnConfig(factor=4.0, original_max_position_embeddings=8192))
    assert "rope_theta" not in yarn and "rope_scaling" not in yarn
    assert yarn["rope_parameters"] == {
        "rope_type": "yarn",
        "rope_theta": 500000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert yarn["max_position_embeddings"] == 32768
    config = ModelConfig.from_hf(yarn)
    assert config.rope == RopeConfig(
        rope_type="yarn", theta=500000.0, factor=4.0, original_max_position_embeddings=8192
    )
    assert config.max_position_embeddings == 32768
    assert base["max_position_embeddings"] == 8192  # the input is not modified


def test_yarn_defaults_to_the_configs_context_and_refuses_scaled_rope():
    yarn = apply_yarn(TINY_HF_CONFIG, YarnConfig(factor=2.0))
    assert yarn["rope_parameters"]["original_max_position_embeddings"] == 128
    assert yarn["max_position_embeddings"] == 256
    llama31 = {**TINY_HF_CONFIG, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}
    with pytest.raises(ValueError, match=r"already scales RoPE.*--yarn-replace-scaling"):
        apply_yarn(llama31, YarnConfig(factor=4.0))
    replaced = apply_yarn(llama31, YarnConfig(factor=4.0, original_max_position_embeddings=64, replace_scaling=True))
    assert ModelConfig.from_hf(replaced).rope == RopeConfig(
        rope_type="yarn", theta=5e5, factor=4.0, original_max_position_embeddings=64
    )
    assert replaced["max_position_embeddings"] == 256
    with pytest.raises(ValueError, match="factor"):
        YarnConfig(factor=1.0)


def test_build_model_from_a_directory_with_yarn_keeps_the_weights(tmp_path):
    source = tiny_model(seed=5)
    save_hf(source, TINY_HF_CONFIG, tmp_path / "hf", dtype="float32")
    assert read_hf_config(tmp_path / "hf")["vocab_size"] == TINY_HF_CONFIG["vocab_size"]
    yarn_config = apply_yarn(TINY_HF_CONFIG, YarnConfig(factor=4.0))
    options = dict(dtype=jnp.float32, param_dtype=jnp.float32, attention_implementation="xla")
    model = build_model(yarn_config, model_dir=tmp_path / "hf", seed=0, **options)
    assert model.config == ModelConfig.from_hf(yarn_config)
    assert all(layer.self_attn.rope.rope_type == "yarn" for layer in model.model.layers)
    for ours, reference in zip(
        jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(source, nnx.Param)), strict=True
    ):
        np.testing.assert_array_equal(ours, reference)

    wider = {**TINY_HF_CONFIG, "intermediate_size": 64}
    with pytest.raises(ValueError, match="more than RoPE"):
        build_model(wider, model_dir=tmp_path / "hf", seed=0, **options)
    scratch = build_model(TINY_HF_CONFIG, model_dir=None, seed=7, **options)
    again = build_model(TINY_HF_CONFIG, model_dir=None, seed=7, **options)
    kernel = lambda m: np.asarray(m.model.layers[0].mlp.up_proj.kernel[...])
    np.testing.assert_array_equal(kernel(scratch), kernel(again))  # the seed fixes the random init
    assert not np.array_equal(kernel(scratch), kernel(source))


def test_preset_takes_vocabulary_and_special_tokens_from_the_tokenizer(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    config = preset_config("demo-llama", tokenizer)
    assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"]) == (512, 0, 1)
    model_config = ModelConfig.from_hf(config)
    assert (model_config.num_layers, model_config.hidden_size, model_config.head_dim) == (4, 128, 64)
    assert (model_config.num_q_heads, model_config.num_kv_heads) == (4, 2)
    with pytest.raises(ValueError, match="preset"):
        preset_config("no-such-preset", tokenizer)
