"""The decode AttnGate against numpy, its weights and names, and DecodeConfig (checks, SeerConfig round trip)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seer_jax.config import ModelConfig
from seer_jax.decode_config import DecodeConfig
from seer_jax.decode_gate import DECODE_GATE_PARAMS, DecodeAttnGate, from_official_name, official_name
from seer_jax.gate import GateConfig, GateParam
from seer_jax.rope import attention_scaling, inverse_frequencies
from seer_jax.seer import SeerCausalLM
from seer_jax.seer_config import SeerConfig
from seer_jax.sparsity import Selection
from tests.seer_jax.tiny_models import TINY, random_module


def numpy_rope(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of x [B, T, heads, dim] at positions [B, T] with TINY's (llama3-scaled) frequencies."""
    inv_freq = inverse_frequencies(TINY.rope, x.shape[-1]).astype(np.float64)
    angles = positions[..., None, None] * inv_freq  # [B, T, 1, dim / 2]
    cos, sin = np.cos(angles) * attention_scaling(TINY.rope), np.sin(angles) * attention_scaling(TINY.rope)
    first, second = np.split(x, 2, axis=-1)
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def numpy_norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * weight


def build_gate(config: DecodeConfig, model: ModelConfig = TINY) -> DecodeAttnGate:
    return random_module(
        lambda: DecodeAttnGate(model, config, param_dtype=jnp.float32, rngs=nnx.Rngs(0)), 3, weight_std=0.3
    )


@pytest.mark.parametrize("pooling", ["Qproj", "Qavgproj", "Qavg"])
def test_query_matches_numpy(pooling):
    hidden = TINY.head_dim if pooling == "Qavg" else 8
    gate = build_gate(DecodeConfig(q_head_pooling=pooling, hidden_size=hidden, qk_norm=True))
    q = np.random.default_rng(0).standard_normal((2, 3, TINY.num_q_heads, TINY.head_dim))  # [B, T, N, H]
    positions = np.asarray([[0, 5, 77], [1, 64, 1000]])
    grouped = q.reshape(2, 3, TINY.num_kv_heads, -1, TINY.head_dim)  # [B, T, K, G, H]
    if pooling == "Qproj":
        weight = np.asarray(gate.attngate_linear_q.weight[...], np.float64)
        assert weight.shape == (TINY.num_kv_heads, 2, TINY.head_dim, hidden)  # [K, G, H, E]
        expected = np.einsum("btkgh,kghe->btke", grouped, weight)
    else:
        expected = grouped.mean(axis=3)
        if pooling == "Qavgproj":
            weight = np.asarray(gate.attngate_linear_q.weight[...], np.float64)
            assert weight.shape == (TINY.num_kv_heads, TINY.head_dim, hidden)  # [K, H, E]
            expected = np.einsum("btkh,khe->btke", expected, weight)
        else:
            assert gate.attngate_linear_q is None
    expected = numpy_rope(numpy_norm(expected, np.asarray(gate.attngate_qnorm.weight[...])), positions)
    ours = gate.query(jnp.asarray(q, jnp.float32), jnp.asarray(positions))
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=2e-5, atol=2e-5)


def test_keys_pool_max_min_avg_then_project_norm_and_rotate_at_block_starts():
    gate = build_gate(DecodeConfig(hidden_size=8, block_size=4, qk_norm=True))
    k = np.random.default_rng(1).standard_normal((2, 10, TINY.num_kv_heads, TINY.head_dim))  # [B, S, K, H]
    lengths = np.asarray([10, 6])
    pooled = np.zeros((2, 3, TINY.num_kv_heads, 3 * TINY.head_dim))
    for b in range(2):
        for j in range(3):
            block = k[b, j * 4 : min((j + 1) * 4, lengths[b])]
            if len(block):
                pooled[b, j] = np.concatenate([block.max(0), block.min(0), block.mean(0)], axis=-1)
    ours_pooled = np.asarray(gate.pool(jnp.asarray(k, jnp.float32), lengths=jnp.asarray(lengths)))
    np.testing.assert_allclose(ours_pooled, pooled, rtol=1e-6, atol=1e-6)
    weight = np.asarray(gate.attngate_linear_k.weight[...], np.float64)
    assert weight.shape == (TINY.num_kv_heads, 3 * TINY.head_dim, 8)  # [K, 3H, E], rows max | min | avg
    positions = np.asarray([[0, 4, 8], [0, 4, 8]])
    expected = numpy_rope(
        numpy_norm(np.einsum("bjkc,kce->bjke", pooled, weight), np.asarray(gate.attngate_knorm.weight[...])), positions
    )
    ours = gate.keys(jnp.asarray(pooled, jnp.float32), jnp.asarray(positions))
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=2e-5, atol=2e-5)
    q_gate = np.random.default_rng(2).standard_normal((2, TINY.num_kv_heads, 8))  # [B, K, E]
    scores = gate.scores(jnp.asarray(q_gate, jnp.float32), ours)
    np.testing.assert_allclose(
        np.asarray(scores), np.einsum("bke,bjke->bkj", q_gate, expected) / np.sqrt(8), rtol=2e-5, atol=2e-5
    )


def test_weights_are_gate_params_at_the_official_names():
    config = SeerConfig(gate=GateConfig(hidden_size=TINY.head_dim), decode=DecodeConfig(hidden_size=8, qk_norm=True))
    model = nnx.eval_shape(lambda: SeerCausalLM(TINY, config, rngs=nnx.Rngs(0)))
    decode = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, DECODE_GATE_PARAMS))}
    every_gate = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, GateParam))}
    official = {official_name(name) for name in decode}
    assert official == {
        f"model.layers.{layer}.self_attn.attn_gate.{leaf}.weight"
        for layer in range(TINY.num_layers)
        for leaf in ("attngate_linear_q", "attngate_linear_k", "attngate_qnorm", "attngate_knorm")
    }
    assert {from_official_name(name) for name in official} == decode
    prefill = every_gate - decode
    assert prefill == {f"model.layers.{layer}.self_attn.attn_gate.mask_linear_k.weight" for layer in range(2)}
    assert {official_name(name) for name in prefill} == {from_official_name(name) for name in prefill} == prefill


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q_head_pooling="Qorig"), "q_head_pooling"),
        (dict(k_pooling="Kavgmax"), "order max, min, avg"),
        (dict(k_pooling="maxmin"), "k_pooling must look like"),
        (dict(hidden_size=7), "hidden_size must be even"),
        (dict(block_size=0), "block_size"),
        (dict(method="nz_ratio"), "method"),
        (dict(token_budget=-1), "token_budget"),
        (dict(threshold=1.0), "threshold"),
        (dict(sliding_window=-64), "sliding_window"),
        (dict(start_layer=1.5), "start_layer"),
        (dict(force_sink=1), "force_sink"),
        (dict(source="sliding"), "source must be one of"),
        (dict(source="random", method="threshold"), "ranks blocks without probabilities"),
        (dict(method="context_fraction", context_fraction=0.0), "context_fraction"),
        (dict(context_fraction=1.5), "context_fraction"),
        (dict(quest_weight=-0.5), "quest_weight must be a finite number >= 0"),
        (dict(quest_weight=float("nan")), "quest_weight"),
        (dict(quest_weight=True), "quest_weight"),
    ],
)
def test_decode_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecodeConfig(**kwargs)


def test_qavg_needs_the_head_dim_and_start_layer_the_layers():
    with pytest.raises(ValueError, match="'Qavg' needs hidden_size == head_dim"):
        nnx.eval_shape(
            lambda: DecodeAttnGate(TINY, DecodeConfig(q_head_pooling="Qavg"), param_dtype=jnp.float32, rngs=nnx.Rngs(0))
        )
    with pytest.raises(ValueError, match=r"decode\.start_layer"):
        nnx.eval_shape(lambda: SeerCausalLM(TINY, SeerConfig(decode=DecodeConfig(start_layer=3)), rngs=nnx.Rngs(0)))


def test_seer_config_with_decode_round_trips():
    config = SeerConfig(
        selection=Selection(nz_ratio=0.5),
        decode=DecodeConfig(q_head_pooling="Qavgproj", method="threshold", threshold=4e-3, sliding_window=128),
    )
    assert SeerConfig.from_dict(config.to_dict()) == config
    quest = SeerConfig(decode=DecodeConfig(source="quest", method="context_fraction", context_fraction=0.05))
    assert SeerConfig.from_dict(quest.to_dict()) == quest
    assert SeerConfig.from_dict(SeerConfig().to_dict()).decode is None
    hybrid = SeerConfig(decode=DecodeConfig(quest_weight=0.25))
    assert hybrid.to_dict()["decode"]["quest_weight"] == 0.25 and SeerConfig.from_dict(hybrid.to_dict()) == hybrid
    assert "quest_weight" not in config.to_dict()["decode"]  # 0, the official gate: written as before it existed
    assert hybrid.decode.keeps_key_bounds and not quest.decode.keeps_key_bounds
    assert not dataclasses.replace(hybrid.decode, source="oracle").keeps_key_bounds  # other sources ignore it
    with pytest.raises(ValueError, match=r"seer_config.decode has unknown keys \['budget'\]"):
        SeerConfig.from_dict({"decode": {"budget": 3}})
    with pytest.raises(ValueError, match="decode must be a DecodeConfig"):
        SeerConfig(decode={"token_budget": 64})
