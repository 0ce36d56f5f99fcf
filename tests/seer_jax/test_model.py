"""`CausalLM` structure: HF-mirroring state paths, parameter types and logical axes, and its guard rails."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seer_jax.config import ModelConfig
from seer_jax.model import CausalLM, positions_from_mask
from seer_jax.rope import RopeConfig

CONFIG = ModelConfig(
    model_type="qwen3",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_q_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope=RopeConfig(theta=10000.0),
    max_position_embeddings=128,
    qkv_bias=True,
    qk_norm=True,
)
LOGICAL_AXES = {"vocab", "embed", "q_heads", "kv_heads", "mlp", "norm"}


def abstract(config: ModelConfig = CONFIG) -> CausalLM:
    return nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))


def run_abstract(model: CausalLM, tokens_shape: tuple[int, int], **kwargs):
    """Traces a forward (shapes and trace-time checks) without computing it."""
    return nnx.eval_shape(lambda model: model(jnp.ones(tokens_shape, jnp.int32), **kwargs), model)


def test_state_paths_and_logical_axes():
    model = abstract()
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert len(params) == len(jax.tree.leaves(nnx.state(model)))  # nothing but nnx.Param
    expected = {
        ("model", "embed_tokens", "embedding"): ((64, 32), ("vocab", "embed")),
        ("model", "layers", 1, "self_attn", "q_proj", "kernel"): ((32, 64), ("embed", "q_heads")),
        ("model", "layers", 1, "self_attn", "q_proj", "bias"): ((64,), ("q_heads",)),
        ("model", "layers", 1, "self_attn", "k_proj", "kernel"): ((32, 32), ("embed", "kv_heads")),
        ("model", "layers", 0, "self_attn", "o_proj", "kernel"): ((64, 32), ("q_heads", "embed")),
        ("model", "layers", 0, "self_attn", "k_norm", "scale"): ((16,), ("norm",)),
        ("model", "layers", 0, "mlp", "down_proj", "kernel"): ((48, 32), ("mlp", "embed")),
        ("model", "layers", 0, "post_attention_layernorm", "scale"): ((32,), ("norm",)),
        ("model", "norm", "scale"): ((32,), ("norm",)),
        ("lm_head", "kernel"): ((32, 64), ("embed", "vocab")),
    }
    for path, (shape, axes) in expected.items():
        assert params[path].get_value().shape == shape, path
        assert params[path].get_metadata()["out_sharding"] == axes, path
    for path, variable in params.items():
        assert set(variable.get_metadata()["out_sharding"]) <= LOGICAL_AXES, path
        assert variable.get_value().ndim == len(variable.get_metadata()["out_sharding"]), path
    assert ("model", "layers", 0, "self_attn", "o_proj", "bias") not in params


def test_tied_embeddings_have_no_lm_head():
    model = abstract(dataclasses.replace(CONFIG, tie_word_embeddings=True))
    assert model.lm_head is None
    assert not any(path[0] == "lm_head" for path, _ in nnx.to_flat_state(nnx.state(model)))


def test_forward_shapes():
    logits, cache = run_abstract(abstract(), (2, 5), last_only=True)
    assert logits.shape == (2, 1, 64) and logits.dtype == jnp.float32
    assert len(cache.keys) == 2 and cache.keys[0].shape == (2, 5, 2, 16) and cache.key_mask.shape == (2, 5)


def test_positions_count_real_tokens():
    mask = jnp.asarray([[True, True, True], [False, True, True]])
    np.testing.assert_array_equal(positions_from_mask(mask), [[0, 1, 2], [0, 0, 1]])


def test_sliding_window_limit():
    model = abstract(dataclasses.replace(CONFIG, model_type="mistral", sliding_window=4))
    run_abstract(model, (1, 4))  # within the window: exact
    with pytest.raises(ValueError, match="exceeds the model's sliding_window"):
        run_abstract(model, (1, 5))


def test_decode_takes_one_token():
    model = abstract()
    _, cache = run_abstract(model, (1, 3))
    cache = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), cache).padded_to(6)
    with pytest.raises(ValueError, match="one token per step"):
        run_abstract(model, (1, 2), cache=cache)
    logits, cache = run_abstract(model, (1, 1), cache=cache)
    assert logits.shape == (1, 1, 64) and cache.keys[0].shape == (1, 6, 2, 16)


def test_unknown_attention_implementation():
    with pytest.raises(ValueError, match="attention_implementation 'flash' is not one of"):
        nnx.eval_shape(lambda: CausalLM(CONFIG, attention_implementation="flash", rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("batch, length", [(2, 37), (3, 8)])
def test_long_calls_run_the_mlp_over_sequence_chunks(monkeypatch, batch, length):
    """Above `MLP_TOKEN_CHUNK` tokens the MLP runs over padded sequence chunks: the same logits and gradients as one
    call (here with a chunk of 10 tokens: 2 x 37 -> 5 chunks of 5 positions, the last padded; 3 x 8 -> 3 of 3)."""
    model = CausalLM(CONFIG, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CONFIG.vocab_size, (batch, length)), jnp.int32)

    def loss_and_grads():
        def loss(model):
            logits, _ = model(tokens)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits

        # Compiled (a fresh function each call, so each traces with the MLP_TOKEN_CHUNK of its time): op by op the
        # gradients take a minute on CPU.
        (value, logits), grads = nnx.jit(lambda model: nnx.value_and_grad(loss, has_aux=True)(model))(model)
        return value, logits, grads

    whole_loss, whole, whole_grads = loss_and_grads()
    calls = []
    original_map = jax.lax.map
    monkeypatch.setattr(jax.lax, "map", lambda f, xs, **kw: calls.append(xs.shape) or original_map(f, xs, **kw))
    monkeypatch.setattr("seer_jax.model.MLP_TOKEN_CHUNK", 10)
    chunked_loss, chunked, chunked_grads = loss_and_grads()
    chunk = max(10 // batch, 1)
    assert calls and calls[0] == (-(-length // chunk), batch, chunk, CONFIG.hidden_size)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunked_loss, whole_loss, rtol=1e-6)
    for (path, a), (_, b) in zip(nnx.to_flat_state(whole_grads), nnx.to_flat_state(chunked_grads), strict=True):
        np.testing.assert_allclose(b.get_value(), a.get_value(), rtol=1e-4, atol=1e-7, err_msg=str(path))
