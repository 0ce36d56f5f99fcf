"""SeerCausalLM: dense equivalence, sparse prefill against masked dense attention, left padding, density report,
distillation inputs, generation, config checks, and (GPU) the Mosaic kernels inside the model."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.attention_with_pooling import attention_with_pooling
from pallas_kernels.block_sparse_attention import block_sparse_attention_implementation
from seer_jax.forwards import block_density, distillation_inputs, gate_logits, logits_and_density
from seer_jax.gate import GateConfig, GateParam
from seer_jax.generate import generate
from seer_jax.model import CausalLM, positions_from_mask
from seer_jax.rope import apply_rope
from seer_jax.seer import SeerCausalLM, SeerConfig, seer_from_base
from seer_jax.sparsity import Selection, select_blocks
from tests.seer_jax.hf_reference import relative_error
from tests.seer_jax.tiny_models import HOPPER_TINY, TINY, hopper_base_model, random_module, random_tokens

GATE = GateConfig(hidden_size=TINY.head_dim)  # single-linear, as the released gates
SPARSE = SeerConfig(gate=GATE, selection=Selection(nz_ratio=0.3))
LENGTH = 200  # 4 blocks, the last one partial


@functools.cache
def base_model() -> CausalLM:
    return random_module(lambda: CausalLM(TINY, rngs=nnx.Rngs(0)), 0, weight_std=0.3)


@functools.cache
def seer_model(seer_config: SeerConfig) -> SeerCausalLM:
    """The base model's weights plus gates drawn from seed 1 (the same gates for every config)."""
    gates = random_module(lambda: SeerCausalLM(TINY, SPARSE, rngs=nnx.Rngs(0)), 1, weight_std=0.3)
    seer = seer_from_base(base_model(), seer_config, rngs=nnx.Rngs(0))
    nnx.update(seer, nnx.state(gates, GateParam))
    return seer


@nnx.jit
def forward(model, tokens, mask):
    return model(tokens, attention_mask=mask)[0]


def padded_batch(length: int = LENGTH) -> tuple[jax.Array, jax.Array]:
    """Row 0 unpadded, row 1 with 130 padding tokens (70 real: one full block and a partial one)."""
    mask = np.arange(length)[None, :] >= np.asarray([0, 130])[:, None]
    return jnp.asarray(np.where(mask, random_tokens(0, 2, length), 0)), jnp.asarray(mask)


def test_dense_selection_equals_dense_model():
    """Every causal block computed by block_sparse_attention: the logits equal the dense model's (GQA, padding).

    Eager execution is covered by `test_sparse_layer_matches_masked_dense_attention`.
    """
    tokens, mask = padded_batch()
    seer = seer_model(SeerConfig(gate=GATE, selection=Selection(nz_ratio=1.0)))
    dense = np.asarray(forward(base_model(), tokens, mask))
    np.testing.assert_allclose(
        np.asarray(forward(seer, tokens, mask))[np.asarray(mask)], dense[np.asarray(mask)], atol=2e-5, rtol=0
    )


def test_sparse_prefill_differs_from_dense_but_is_finite():
    tokens, mask = padded_batch()
    sparse = np.asarray(forward(seer_model(SPARSE), tokens, mask))
    dense = np.asarray(forward(base_model(), tokens, mask))
    assert np.isfinite(sparse).all()
    real = np.asarray(mask)
    assert np.abs(sparse - dense)[real].max() > 1e-2
    np.testing.assert_allclose(sparse[0, :64], dense[0, :64], atol=2e-5)  # block 0 sees only itself anyway


def test_sparse_layer_matches_masked_dense_attention():
    """One layer's prefill (eager) equals softmax attention restricted to its block mask (computed independently)."""
    attention = seer_model(SPARSE).model.layers[1].self_attn
    hidden = jnp.asarray(np.random.default_rng(2).standard_normal((2, LENGTH, TINY.hidden_size)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(LENGTH), (2, LENGTH))
    out, (keys, _, _), collected = attention(hidden, positions, key_mask=None, collect=frozenset({"block_mask"}))
    block_mask = np.asarray(collected["block_mask"])
    assert block_mask.sum() < 2 * TINY.num_q_heads * 10  # some of the 10 causal blocks of each head are skipped

    q, k, v = (np.asarray(x, np.float64) for x in attention.project_qkv(hidden))
    q = np.asarray(apply_rope(jnp.asarray(q), positions, TINY.rope), np.float64)
    k = np.asarray(apply_rope(jnp.asarray(k), positions, TINY.rope), np.float64)
    np.testing.assert_allclose(keys, k, atol=1e-5)
    group = TINY.num_q_heads // TINY.num_kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # [B, S, N, H]
    blocks = np.arange(LENGTH) // 64
    allowed = block_mask[:, :, blocks][:, :, :, blocks] & np.tril(np.ones((LENGTH, LENGTH), bool))  # [B, N, T, S]
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(TINY.head_dim)
    logits = np.where(allowed, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = np.einsum("bnts,bsnh->btnh", probs, v).reshape(2, LENGTH, -1)
    expected = context @ np.asarray(attention.o_proj.kernel[...], np.float64)
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_left_padded_row_equals_the_prompt_alone():
    """Rows are attended from their first real token: padding changes neither the blocks nor the outputs."""
    tokens, mask = padded_batch()
    seer = seer_model(SPARSE)
    padded = np.asarray(forward(seer, tokens, mask))
    alone = np.asarray(forward(seer, tokens[1:, 130:], None))
    np.testing.assert_allclose(padded[1, 130:], alone[0], atol=2e-5, rtol=0)


def test_block_density_report():
    """[L, N] table: ≈ nz_ratio per sparse layer and head at J = 64, 1.0 below start_layer."""
    seer = seer_model(dataclasses.replace(SPARSE, start_layer=1))
    tokens = jnp.asarray(random_tokens(3, 1, 64 * 64))
    density = np.asarray(nnx.jit(block_density)(seer, tokens, None))
    assert density.shape == (TINY.num_layers, TINY.num_q_heads)
    np.testing.assert_array_equal(density[0], 1.0)
    np.testing.assert_allclose(density[1], 0.3, atol=0.02)


def test_logits_and_density_equal_the_forward_and_the_report():
    tokens, mask = padded_batch()
    seer = seer_model(SPARSE)
    logits, density = nnx.jit(logits_and_density)(seer, tokens, mask)
    np.testing.assert_array_equal(density, nnx.jit(block_density)(seer, tokens, mask))
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(forward(seer, tokens, mask))[real], atol=1e-5)


def test_threshold_zero_computes_every_real_block():
    """Threshold 0 is dense like nz_ratio 1 (the same path); the padded row's padding blocks are not counted."""
    tokens, mask = padded_batch()
    seer = seer_model(SeerConfig(gate=GATE, selection=Selection(method="threshold", threshold=0.0)))
    density = np.asarray(nnx.jit(block_density)(seer, tokens, mask))
    np.testing.assert_array_equal(density, 1.0)


def test_oracle_source_in_the_model():
    tokens, mask = padded_batch()
    seer = seer_model(dataclasses.replace(SPARSE, source="oracle"))
    logits, density = nnx.jit(
        lambda model, tokens, mask: (model(tokens, attention_mask=mask)[0], block_density(model, tokens, mask))
    )(seer, tokens, mask)
    assert np.isfinite(np.asarray(logits)).all()
    assert ((np.asarray(density) > 0.3) & (np.asarray(density) < 1)).all()


@pytest.mark.parametrize("source", ["gate", "quest", "streaming", "random"])
def test_sources_select_causal_blocks_in_row_coordinates(source):
    """With left padding, blocks count from each row's first real token: row 1 (70 real tokens) has 2 blocks."""
    _, mask = padded_batch()
    attention = seer_model(dataclasses.replace(SPARSE, source=source)).model.layers[1].self_attn
    hidden = jnp.asarray(np.random.default_rng(5).standard_normal((2, LENGTH, TINY.hidden_size)), jnp.float32)
    out, _, collected = nnx.jit(
        lambda attention, hidden, mask: attention(
            hidden, positions_from_mask(mask), key_mask=mask, collect=frozenset({"block_mask"})
        )
    )(attention, hidden, mask)
    assert np.isfinite(np.asarray(out)).all()
    block_mask = np.asarray(collected["block_mask"])
    assert np.diagonal(block_mask, axis1=-2, axis2=-1).all() and not np.triu(block_mask, k=1).any()
    if source == "streaming":  # one block per row (nz 0.3 of 4): the sink, then the diagonal
        np.testing.assert_array_equal(block_mask[:, :, :, 0], True)
        assert block_mask.sum() == 2 * TINY.num_q_heads * 7


def test_quest_weight_scores_select_and_leave_the_gate_logits_alone():
    """quest_weight 0.5: "block_scores" (collected even when the selection keeps every block, as calibration needs)
    are the gate's logits plus 0.5 × the quest source's scores of the same layer inputs; "gate_logits" stay the
    gate's own (fine-tuning's loss); the sparse layer selects from the weighted scores, like the quest source when the
    weight swamps the logits."""
    _, mask = padded_batch()
    hidden = jnp.asarray(np.random.default_rng(6).standard_normal((2, LENGTH, TINY.hidden_size)), jnp.float32)

    def collected(config, names):
        attention = seer_model(config).model.layers[1].self_attn
        return nnx.jit(
            lambda attention, hidden, mask: attention(
                hidden, positions_from_mask(mask), key_mask=mask, collect=frozenset(names)
            )[2]
        )(attention, hidden, mask)

    every = dataclasses.replace(SPARSE, selection=Selection())
    names = {"block_scores", "gate_logits"}
    gate = collected(every, names)
    quest = collected(dataclasses.replace(every, source="quest"), {"block_scores"})["block_scores"]
    weighted = collected(dataclasses.replace(every, quest_weight=0.5), names)
    np.testing.assert_array_equal(np.asarray(gate["block_scores"]), np.asarray(gate["gate_logits"]))
    np.testing.assert_array_equal(np.asarray(weighted["gate_logits"]), np.asarray(gate["gate_logits"]))
    expected = np.asarray(gate["gate_logits"]) + 0.5 * np.asarray(quest)
    np.testing.assert_allclose(np.asarray(weighted["block_scores"]), expected, rtol=1e-5, atol=1e-5)
    sparse = collected(dataclasses.replace(SPARSE, quest_weight=0.5), {"block_scores", "block_mask"})
    lengths = jnp.sum(mask, axis=-1)
    chosen = select_blocks(sparse["block_scores"], SPARSE.selection, lengths)
    np.testing.assert_array_equal(np.asarray(sparse["block_mask"]), np.asarray(chosen))
    # A weight that swamps the logits selects what the quest source selects, which is not what the gate selects.
    swamped = collected(dataclasses.replace(SPARSE, quest_weight=1e4), {"block_mask"})["block_mask"]
    quest_mask = collected(dataclasses.replace(SPARSE, source="quest"), {"block_mask"})["block_mask"]
    np.testing.assert_array_equal(np.asarray(swamped), np.asarray(quest_mask))
    assert not np.array_equal(np.asarray(collected(SPARSE, {"block_mask"})["block_mask"]), np.asarray(quest_mask))


def test_distillation_inputs():
    """Features are the gate's pooling of each layer's pre-RoPE q/k; targets are the layer's pooled attention."""
    seer = seer_model(SPARSE)
    tokens = jnp.asarray(random_tokens(4, 2, LENGTH))
    features, targets = nnx.jit(distillation_inputs)(seer, tokens, None)
    assert len(features) == len(targets) == TINY.num_layers

    @nnx.jit
    def first_layer(model, tokens):
        attention = model.model.layers[0].self_attn
        q, k, v = attention.project_qkv(model.model.layers[0].input_layernorm(model.model.embed_tokens(tokens)))
        positions = positions_from_mask(jnp.ones(tokens.shape, bool))
        rotated = apply_rope(q, positions, TINY.rope), apply_rope(k, positions, TINY.rope)
        return attention.attn_gate.pool(q, k), attention_with_pooling(*rotated, v)[1]

    expected_features, expected_target = first_layer(seer, tokens)
    np.testing.assert_allclose(features[0].q, expected_features.q, atol=1e-5)
    np.testing.assert_allclose(features[0].k, expected_features.k, atol=1e-5)
    np.testing.assert_allclose(targets[0], expected_target, atol=1e-5)
    np.testing.assert_allclose(np.asarray(targets[1]).sum(-1), 1.0, atol=1e-5)

    def loss(model):
        return sum(
            jnp.sum(target * jax.nn.log_softmax(logits))
            for target, logits in zip(targets, gate_logits(model, features), strict=True)
        )

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, GateParam)))(seer)
    assert jax.tree.leaves(grads) and all(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(grads))
    assert {path for path, _ in nnx.to_flat_state(grads)} == {
        path for path, _ in nnx.to_flat_state(nnx.state(seer, GateParam))
    }


def test_generate_sparse_prefill_dense_decode():
    """Greedy tokens equal the argmax of a teacher-forced sparse forward over prompt + generated tokens.

    With last_block_dense, the rows of the generated tokens (in the last two block rows) are dense in that forward,
    as in decoding, and the prompt's earlier rows select the same blocks as in the prefill.
    """
    tokens, mask = padded_batch()
    seer = seer_model(dataclasses.replace(SPARSE, selection=Selection(nz_ratio=0.3, last_block_dense=True)))
    generated = np.asarray(generate(seer, tokens, mask, max_new_tokens=4, eos_token_id=()))
    assert ((generated >= 0) & (generated < TINY.vocab_size)).all()
    full_tokens = jnp.concatenate([tokens, jnp.asarray(generated[:, :3])], axis=1)
    full_mask = jnp.concatenate([mask, jnp.ones((2, 3), bool)], axis=1)
    logits = np.asarray(forward(seer, full_tokens, full_mask))
    np.testing.assert_array_equal(np.argmax(logits[:, LENGTH - 1 :], axis=-1), generated)
    assert not np.array_equal(logits[:, LENGTH - 1], np.asarray(forward(base_model(), tokens, mask))[:, -1])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gate=GateConfig(block_size=32)), "gate.block_size must be 64"),
        (dict(source="bigbird"), "source must be one of"),
        (dict(source="streaming", selection=Selection(method="threshold", threshold=0.01)), "use selection method"),
        (dict(start_layer=-1), "start_layer"),
        (dict(quest_weight=-0.1), "quest_weight must be a finite number >= 0"),
        (dict(quest_weight=float("inf")), "quest_weight"),
    ],
)
def test_seer_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SeerConfig(**kwargs)


def test_seer_config_dict_round_trip():
    config = SeerConfig(
        gate=GateConfig(gate_type="Qavg_Kmaxmin"),
        selection=Selection(method="threshold", threshold=2e-3),
        start_layer=2,
        source="oracle",
    )
    assert SeerConfig.from_dict(config.to_dict()) == config
    assert "force_sink" not in config.to_dict()["selection"]  # readable by versions from before the field
    with_sink = dataclasses.replace(config, selection=dataclasses.replace(config.selection, force_sink=True))
    assert with_sink.to_dict()["selection"]["force_sink"] is True
    assert SeerConfig.from_dict(with_sink.to_dict()) == with_sink
    with pytest.raises(ValueError, match=r"seer_config.selection has unknown keys \['topk'\]"):
        SeerConfig.from_dict({"selection": {"topk": 3}})
    assert "quest_weight" not in config.to_dict()  # 0: written as before the field existed
    weighted = dataclasses.replace(config, source="gate", quest_weight=0.25)
    assert weighted.to_dict()["quest_weight"] == 0.25 and SeerConfig.from_dict(weighted.to_dict()) == weighted


def test_model_checks():
    with pytest.raises(ValueError, match="start_layer"):
        nnx.eval_shape(lambda: SeerCausalLM(TINY, SeerConfig(start_layer=3), rngs=nnx.Rngs(0)))
    mistral = dataclasses.replace(TINY, model_type="mistral", sliding_window=4096)
    with pytest.raises(ValueError, match="sliding-window"):
        nnx.eval_shape(lambda: SeerCausalLM(mistral, SeerConfig(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="expected a SeerCausalLM"):
        block_density(base_model(), jnp.ones((1, 8), jnp.int32))


@pytest.mark.gpu
def test_mosaic_kernels_in_the_model():
    """On Hopper (bf16, head_dim 128) the prefill runs the Mosaic kernels: with every block kept it equals the dense
    cuDNN model; sparse prefill and distillation targets are finite."""
    config = HOPPER_TINY
    base = hopper_base_model()
    tokens, mask = padded_batch(300)
    q = jax.ShapeDtypeStruct((2, 300, config.num_q_heads, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 300, config.num_kv_heads, 128), jnp.bfloat16)
    block_mask = jax.ShapeDtypeStruct((2, config.num_q_heads, 5, 5), jnp.bool_)
    assert block_sparse_attention_implementation(q, kv, kv, block_mask=block_mask) == "mosaic"

    gate = GateConfig(hidden_size=128)
    dense = forward(base, tokens, mask)
    every_block_model = seer_from_base(base, SeerConfig(gate=gate), rngs=nnx.Rngs(1))
    every_block = forward(every_block_model, tokens, mask)
    assert relative_error(every_block, dense, np.asarray(mask)) <= 2e-2
    sparse = seer_from_base(base, dataclasses.replace(SPARSE, gate=gate), rngs=nnx.Rngs(1))
    assert np.isfinite(np.asarray(forward(sparse, tokens, mask), np.float32)).all()
    _, targets = nnx.jit(distillation_inputs)(every_block_model, tokens, None)
    np.testing.assert_allclose(np.asarray(targets[1]).sum(-1), 1.0, atol=1e-3)


def test_collect_names_are_checked():
    """A plain model collects nothing, a SeerAttention model only `COLLECTABLE` names, and on a decode step only
    `DECODE_COLLECTABLE` names."""
    tokens = jnp.asarray(random_tokens(6, 1, 70))
    with pytest.raises(ValueError, match="collects nothing"):
        base_model().forward(tokens, collect=("density",))
    with pytest.raises(ValueError, match="cannot collect"):
        seer_model(SPARSE).forward(tokens, collect=("attention_probs",))
    _, cache, collected = seer_model(SPARSE).forward(tokens, collect=("density", "block_mask"))
    assert [sorted(layer) for layer in collected] == [["block_mask", "density"]] * TINY.num_layers
    with pytest.raises(ValueError, match="on a decode step"):
        seer_model(SPARSE).forward(tokens[:, :1], cache=cache.padded_to(71), collect=("density",))


def test_dense_layers_fuse_attention_and_target_with_dense_gradients():
    """Below `start_layer`, a forward that collects the target takes the layer's output from the pooling kernel:
    the logits equal the plain forward's and the gradients of the base weights equal the dense model's."""
    tokens = jnp.asarray(random_tokens(8, 2, LENGTH))
    seer = seer_model(dataclasses.replace(SPARSE, start_layer=TINY.num_layers))  # every layer dense

    def loss(model, collect):
        logits = model.forward(tokens, collect=collect)[0].astype(jnp.float32)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    base_weights = nnx.All(nnx.Param, nnx.Not(GateParam))
    fused_loss, fused = nnx.jit(  # compiled: op by op the gradients take most of a minute on CPU
        nnx.value_and_grad(lambda m: loss(m, ("target",)), argnums=nnx.DiffState(0, base_weights))
    )(seer)
    plain_loss, plain = nnx.jit(nnx.value_and_grad(lambda m: loss(m, ()), argnums=nnx.DiffState(0, base_weights)))(seer)
    np.testing.assert_allclose(fused_loss, plain_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(fused), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
