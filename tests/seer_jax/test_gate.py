"""AttnGate: pooling and logits against naive NumPy, single/double-linear structure, GateParam, config checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seer_jax.config import ModelConfig
from seer_jax.gate import MASKED_LOGIT, AttnGate, GateConfig, GateParam, pool_blocks
from seer_jax.model import CausalLM
from seer_jax.rope import RopeConfig, attention_scaling, inverse_frequencies
from tests.seer_jax.tiny_models import random_module

YARN = RopeConfig(rope_type="yarn", theta=10000.0, factor=4.0, original_max_position_embeddings=64)
CONFIG = ModelConfig(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_q_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope=YARN,
    max_position_embeddings=1024,
)
POOL_OPS = ("max", "min", "avg")
# One compilation per shape instead of one per primitive (eager dispatch is slow on CPU).
pool = jax.jit(pool_blocks, static_argnames=("ops", "block_size"))
gate_logits = nnx.jit(lambda gate, q, k: gate(q, k))
gate_scores = nnx.jit(lambda gate, features: gate.score(features))


def random_qk(seed: int, length: int, batch: int = 2) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, length, CONFIG.num_q_heads, CONFIG.head_dim), np.float32)
    k = rng.standard_normal((batch, length, CONFIG.num_kv_heads, CONFIG.head_dim), np.float32) * 2.0 + 0.5
    return jnp.asarray(q), jnp.asarray(k)


@functools.cache
def make_gate(gate_config: GateConfig) -> AttnGate:
    return random_module(lambda: AttnGate(CONFIG, gate_config, param_dtype=jnp.float32, rngs=nnx.Rngs(0)), 3)


def naive_pool(x: np.ndarray, ops, block_size: int, lengths=None) -> np.ndarray:
    batch, length, heads, dim = x.shape
    num_blocks = -(-length // block_size)
    lengths = [length] * batch if lengths is None else lengths
    out = np.zeros((batch, num_blocks, heads, len(ops) * dim))
    reducers = {"max": np.max, "min": np.min, "avg": np.mean}
    for b in range(batch):
        for i in range(num_blocks):
            block = x[b, i * block_size : min((i + 1) * block_size, lengths[b])]
            if len(block):
                out[b, i] = np.concatenate([reducers[op](block, axis=0) for op in ops], axis=-1)
    return out


def naive_rope(x: np.ndarray, positions: np.ndarray, rope: RopeConfig) -> np.ndarray:
    """x [B, I, heads, E] rotated by positions [I] (rotate-half), in float64."""
    angles = positions[:, None] * inverse_frequencies(rope, x.shape[-1]).astype(np.float64)  # [I, E / 2]
    cos, sin = (np.cos(angles) * attention_scaling(rope))[:, None], (np.sin(angles) * attention_scaling(rope))[:, None]
    first, second = np.split(x, 2, axis=-1)
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def naive_logits(gate: AttnGate, q: np.ndarray, k: np.ndarray) -> np.ndarray:
    config = gate.gate_config
    q_pooled = naive_pool(q, config.q_ops, config.block_size)  # [B, I, N, Cq]
    k_pooled = naive_pool(k, config.k_ops, config.block_size)  # [B, J, K, Ck]
    group = CONFIG.num_q_heads // CONFIG.num_kv_heads
    k_weight = np.asarray(gate.mask_linear_k.weight[...], np.float64)
    if gate.mask_linear_q is None:
        q_gate = q_pooled
        k_gate = np.stack(
            [k_pooled[:, :, n // group] @ k_weight[n] for n in range(CONFIG.num_q_heads)], axis=2
        )  # [B, J, N, E]
    else:
        q_weight = np.asarray(gate.mask_linear_q.weight[...], np.float64)
        q_gate = np.stack([q_pooled[:, :, n] @ q_weight[n] for n in range(CONFIG.num_q_heads)], axis=2)
        k_gate = np.stack([k_pooled[:, :, h] @ k_weight[h] for h in range(CONFIG.num_kv_heads)], axis=2)
    num_blocks = q_gate.shape[1]
    positions = np.arange(num_blocks) * config.block_size  # every block sits at its first token
    q_gate, k_gate = naive_rope(q_gate, positions, CONFIG.rope), naive_rope(k_gate, positions, CONFIG.rope)
    if gate.mask_linear_q is not None:
        k_gate = k_gate[:, :, np.arange(CONFIG.num_q_heads) // group]  # kv head shared by its G query heads
    logits = np.einsum("bine,bjne->bnij", q_gate, k_gate) / np.sqrt(config.hidden_size)
    return np.where(np.tril(np.ones((num_blocks, num_blocks), bool)), logits, MASKED_LOGIT)


@pytest.mark.parametrize(
    "length,ops", [(200, POOL_OPS), (37, POOL_OPS), (128, POOL_OPS), (200, ("avg",)), (37, ("max", "avg"))]
)
def test_pooling_matches_numpy(length, ops):
    q, _ = random_qk(length, length)
    pooled = pool(q, ops, block_size=64)
    assert pooled.shape == (2, -(-length // 64), CONFIG.num_q_heads, len(ops) * CONFIG.head_dim)
    np.testing.assert_allclose(pooled, naive_pool(np.asarray(q, np.float64), ops, 64), rtol=1e-6, atol=1e-6)


def test_pooling_ignores_positions_past_each_row_length():
    """Row 1 has 70 valid tokens: block 1 pools 6 of them, blocks 2 and 3 pool nothing (zeros)."""
    q, _ = random_qk(1, 200)
    pooled = pool(q.astype(jnp.bfloat16), POOL_OPS, block_size=64, lengths=jnp.asarray([200, 70]))
    expected = naive_pool(np.asarray(q.astype(jnp.bfloat16), np.float64), POOL_OPS, 64, lengths=[200, 70])
    assert pooled.dtype == jnp.float32
    np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-6)
    assert not np.asarray(pooled[1, 2:]).any() and np.asarray(pooled[1, 1]).all()


@pytest.mark.parametrize(
    "gate_config,length",
    [
        (GateConfig(hidden_size=16), 200),  # single-linear (E == H, one q op), ragged last block
        (GateConfig(hidden_size=8), 37),  # double-linear (E != H), shorter than one block
        (GateConfig(gate_type="Qmaxavg_Kmaxmin", hidden_size=16), 200),  # double-linear (two q ops)
    ],
    ids=["single", "double_hidden", "double_ops"],
)
def test_logits_match_numpy(gate_config, length):
    """Pooling, per-head projections, RoPE (yarn, with its attention scaling) at i · 64, scale, causal mask."""
    gate = make_gate(gate_config)
    q, k = random_qk(5, length)
    logits = gate_logits(gate, q, k)
    num_blocks = -(-length // 64)
    assert logits.shape == (2, CONFIG.num_q_heads, num_blocks, num_blocks) and logits.dtype == jnp.float32
    expected = naive_logits(gate, np.asarray(q, np.float64), np.asarray(k, np.float64))
    np.testing.assert_allclose(logits, expected, rtol=2e-5, atol=2e-6)
    upper = np.triu(np.ones((num_blocks, num_blocks), bool), k=1)
    assert (np.asarray(logits)[..., upper] == MASKED_LOGIT).all()
    assert np.isfinite(jax.nn.log_softmax(logits, axis=-1)).all()


def test_rope_uses_block_start_positions():
    """Rotating at the blocks' indices (0, 1, 2, …) instead of their first tokens (0, 64, …) gives other logits."""
    gate = make_gate(GateConfig(hidden_size=16))
    q, k = random_qk(6, 256)
    features = gate.pool(q, k)
    block_size_one = make_gate(GateConfig(hidden_size=16, block_size=1))
    np.testing.assert_array_equal(block_size_one.mask_linear_k.weight[...], gate.mask_linear_k.weight[...])
    assert not np.allclose(gate_scores(gate, features), gate_scores(block_size_one, features), atol=1e-3)


def test_pool_and_score_compose_and_stop_gradients():
    gate = make_gate(GateConfig(hidden_size=8))
    q, k = random_qk(7, 150)
    np.testing.assert_array_equal(gate_logits(gate, q, k), gate_scores(gate, gate.pool(q, k)))

    def loss(q, k):
        logits = gate(q, k)
        return jnp.sum(jnp.where(logits > MASKED_LOGIT, logits, 0.0) ** 2)

    dq, dk = jax.jit(jax.grad(loss, argnums=(0, 1)))(q, k)
    assert not np.asarray(dq).any() and not np.asarray(dk).any()
    features = gate.pool(q, k)
    grads = nnx.jit(nnx.grad(lambda gate: jnp.sum(jax.nn.log_softmax(gate.score(features)) ** 2)))(gate)
    assert all(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(grads))


@pytest.mark.parametrize(
    "gate_config,expected",
    [
        (GateConfig(hidden_size=16), {"mask_linear_k": ((4, 48, 16), "q_heads")}),
        (
            GateConfig(hidden_size=16, force_double=True),
            {"mask_linear_q": ((4, 16, 16), "q_heads"), "mask_linear_k": ((2, 48, 16), "kv_heads")},
        ),
        (
            GateConfig(gate_type="Qmaxavg_Kmaxmin", hidden_size=16),
            {"mask_linear_q": ((4, 32, 16), "q_heads"), "mask_linear_k": ((2, 32, 16), "kv_heads")},
        ),
        (
            GateConfig(hidden_size=24),
            {"mask_linear_q": ((4, 16, 24), "q_heads"), "mask_linear_k": ((2, 48, 24), "kv_heads")},
        ),
    ],
    ids=["single", "force_double", "two_q_ops", "hidden_ne_head_dim"],
)
def test_parameter_shapes_and_axes(gate_config, expected):
    gate = nnx.eval_shape(lambda: AttnGate(CONFIG, gate_config, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    params = dict(nnx.to_flat_state(nnx.state(gate, GateParam)))
    assert set(params) == {(name, "weight") for name in expected}
    assert len(params) == len(jax.tree.leaves(nnx.state(gate)))
    for name, (shape, head_axis) in expected.items():
        variable = params[(name, "weight")]
        assert variable.get_value().shape == shape and variable.get_value().dtype == jnp.bfloat16
        assert variable.get_metadata()["out_sharding"] == (head_axis, "gate_in", "gate_hidden")


def test_gate_free_model_has_no_gate_params():
    model = nnx.eval_shape(lambda: CausalLM(CONFIG, rngs=nnx.Rngs(0)))
    assert not jax.tree.leaves(nnx.state(model, GateParam))


def test_init_is_normal_with_initializer_range():
    gate = AttnGate(CONFIG, GateConfig(hidden_size=16), param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    weight = np.asarray(gate.mask_linear_k.weight[...])
    assert abs(weight.std() - CONFIG.initializer_range) < 0.002 and abs(weight.mean()) < 0.002


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gate_type="Qavg_Kminmax"), "in the order max, min, avg"),
        (dict(gate_type="Qavgavg_Kmax"), "once each"),
        (dict(gate_type="Qproj_Kmax"), "gate_type must look like"),
        (dict(hidden_size=15), "hidden_size"),
        (dict(block_size=0), "block_size"),
    ],
)
def test_gate_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GateConfig(**kwargs)


def test_gate_type_ops():
    config = GateConfig(gate_type="Qavg_Kmaxmin")
    assert config.q_ops == ("avg",) and config.k_ops == ("max", "min")
    assert config.single_linear(128) and not config.single_linear(64)


def test_wrong_input_shapes_raise():
    gate = make_gate(GateConfig(hidden_size=16))
    q, k = random_qk(0, 64)
    with pytest.raises(ValueError, match="AttnGate takes q"):
        gate(k, q)
