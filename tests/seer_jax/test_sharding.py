"""Meshes, sharding rules and per-device attention: a model sharded over 1–8 CPU devices computes what it computes
unsharded (tests/conftest.py splits the CPU into 8 devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from seer_jax.forwards import distillation_inputs, gate_logits, logits_and_density
from seer_jax.gate import GateConfig, GateParam
from seer_jax.seer import SeerCausalLM, SeerConfig
from seer_jax.sharding import (
    MeshConfig,
    build_mesh,
    check_batch_size,
    logical_rules,
    shard_batch,
    shard_model,
    tree_shardings,
)
from seer_jax.sparsity import Selection
from tests.seer_jax.tiny_models import TINY, random_module, random_tokens

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8 for CPU, "
    "but jax was initialised before it (or runs on fewer accelerators)",
)

# Meshes of 1, 2, 4 and 8 devices; TINY has 4 query heads and 2 kv heads, so tensor=4 repeats kv heads.
MESHES = ("data=1", "tensor=2", "fsdp=2,tensor=2", "tensor=4", "data=2,fsdp=2,tensor=2", "data=8")


def _mesh(text: str):
    config = MeshConfig.parse(text)
    return build_mesh(config, jax.devices()[: config.num_devices])


def test_mesh_config_parses_and_rejects_bad_meshes():
    assert MeshConfig.parse("data=1,fsdp=2,tensor=2") == MeshConfig(data=1, fsdp=2, tensor=2)
    assert MeshConfig.parse(" tensor=4 ") == MeshConfig(tensor=4)
    assert str(MeshConfig.parse("fsdp=2,data=2")) == "data=2,fsdp=2,tensor=1"
    for text, message in [
        ("pipeline=2", "unknown axis 'pipeline'"),
        ("data=0", "data: mesh axis size must be a positive int"),
        ("tensor=-2", "tensor: mesh axis size must be a positive int"),
        ("fsdp=two", "fsdp: mesh axis size must be a positive int"),
        ("data=2,data=2", "appears twice"),
        ("data", "must look like"),
    ]:
        with pytest.raises(ValueError, match=message):
            MeshConfig.parse(text)
    with pytest.raises(ValueError, match="spans 4 devices, but there are 8"):
        build_mesh(MeshConfig(fsdp=2, tensor=2))
    with pytest.raises(ValueError, match="batch_size: 6 rows do not split over data × fsdp = 4"):
        check_batch_size(6, MeshConfig(data=2, fsdp=2))


def test_heads_that_do_not_split_over_tensor_are_rejected():
    three = build_mesh(MeshConfig(tensor=3), jax.devices()[:3])
    with pytest.raises(ValueError, match="tensor=3 does not divide the model's 4 query heads"):
        logical_rules(TINY, three)
    with pytest.raises(ValueError, match="tensor=8 does not divide the model's 4 query heads"):
        logical_rules(TINY, build_mesh(MeshConfig(tensor=8)))


SINGLE_LINEAR = GateConfig(hidden_size=16)  # E = H: one k weight per query head, as the released gates
EVERY_BLOCK = Selection(nz_ratio=1.0)


def _seer(gate: GateConfig = SINGLE_LINEAR, selection: Selection = EVERY_BLOCK) -> SeerCausalLM:
    """TINY with gates, every weight random (large, so attention and the pooled targets are peaky)."""
    return random_module(
        lambda: SeerCausalLM(TINY, SeerConfig(gate=gate, selection=selection), rngs=nnx.Rngs(0)), 0, weight_std=0.3
    )


def _specs(model, mesh_text: str) -> dict[str, P]:
    mesh = _mesh(mesh_text)
    model = nnx.clone(model)
    shard_model(model, mesh, logical_rules(TINY, mesh))
    layer = model.model.layers[0]
    attention, gate = layer.self_attn, layer.self_attn.attn_gate
    arrays = {
        "embed_tokens": model.model.embed_tokens.embedding,
        "lm_head": model.lm_head.kernel,
        "q_proj": attention.q_proj.kernel,
        "k_proj": attention.k_proj.kernel,
        "o_proj": attention.o_proj.kernel,
        "up_proj": layer.mlp.up_proj.kernel,
        "down_proj": layer.mlp.down_proj.kernel,
        "norm": layer.input_layernorm.scale,
        "gate_k": gate.mask_linear_k.weight,
    }
    if gate.mask_linear_q is not None:
        arrays["gate_q"] = gate.mask_linear_q.weight
    for variable in arrays.values():
        assert variable.get_value().sharding.mesh.shape == mesh.shape
    return {name: variable.get_value().sharding.spec for name, variable in arrays.items()}


def test_parameters_are_placed_as_the_rules_say():
    specs = _specs(_seer(), "data=2,fsdp=2,tensor=2")
    assert specs == {
        "embed_tokens": P("tensor", "fsdp"),  # [V, D]
        "lm_head": P("fsdp", "tensor"),  # [D, V]
        "q_proj": P("fsdp", "tensor"),  # [D, N·H]
        "k_proj": P("fsdp", "tensor"),  # [D, K·H]: 2 kv heads over tensor=2
        "o_proj": P("tensor", "fsdp"),  # [N·H, D]
        "up_proj": P("fsdp", "tensor"),  # [D, F]
        "down_proj": P("tensor", "fsdp"),  # [F, D]
        "norm": P(None),
        "gate_k": P("tensor", None, "fsdp"),  # single-linear: [N, 3H, E], one per query head
    }
    # 2 kv heads on tensor=4: each device needs one whole kv head, so k_proj stays whole; double-linear gate:
    # the k weight is per kv head (replicated like k_proj), the q weight per query head.
    specs = _specs(_seer(gate=GateConfig(hidden_size=8)), "tensor=4")
    assert specs["q_proj"] == P(None, "tensor") and specs["k_proj"] == P(None, None)
    assert specs["gate_q"] == P("tensor", None, None) and specs["gate_k"] == P(None, None, None)


def test_optimizer_state_is_sharded_like_its_parameters():
    import optax

    mesh = _mesh("fsdp=2,tensor=2")
    gates = nnx.state(_seer(), GateParam)
    state = optax.adam(1e-3).init(gates)
    shardings = tree_shardings(state, mesh, logical_rules(TINY, mesh))
    adam = shardings[0]
    weight = ("model", "layers", 0, "self_attn", "attn_gate", "mask_linear_k", "weight")
    for moments in (adam.mu, adam.nu):
        assert dict(nnx.to_flat_state(moments))[weight].get_value().spec == P("tensor", None, "fsdp")
    assert adam.count.spec == P()


def _forward(model, tokens, attention_mask):
    dense_logits, _ = model(tokens, attention_mask=attention_mask)  # the seer model's own (sparse) prefill
    sparse_logits, density = logits_and_density(model, tokens, attention_mask)
    features, targets = distillation_inputs(model, tokens, attention_mask)
    return dense_logits, sparse_logits, density, gate_logits(model, features), targets


_forward_jit = nnx.jit(_forward)


@pytest.fixture(scope="module")
def sparse_model():
    return _seer(selection=Selection(nz_ratio=0.5))


@pytest.fixture(scope="module")
def unsharded(sparse_model):
    tokens = jnp.asarray(random_tokens(0, 8, 256))
    return tokens, jax.device_get(_forward_jit(sparse_model, tokens, None))


@pytest.mark.parametrize("mesh_text", MESHES)
def test_logits_gate_logits_and_targets_match_the_unsharded_model(sparse_model, unsharded, mesh_text):
    tokens, expected = unsharded
    mesh = _mesh(mesh_text)
    model = nnx.clone(sparse_model)
    shard_model(model, mesh, logical_rules(TINY, mesh))
    with jax.set_mesh(mesh):
        got = jax.device_get(_forward_jit(model, shard_batch(np.asarray(tokens), mesh), None))
    names = ("logits", "sparse logits", "density", "gate logits", "pooled targets")
    for name, want, have in zip(names, expected, got, strict=True):
        for w, h in zip(jax.tree.leaves(want), jax.tree.leaves(have), strict=True):
            # float32 sums split over up to 4 tensor shards add in another order: a few 1e-5 on logits of size ~3
            np.testing.assert_allclose(h, w, rtol=2e-5, atol=5e-5, err_msg=f"{name} on {mesh_text}")
    assert 0.4 < float(np.mean(expected[2])) < 0.9  # really sparse (and TopK kept the same blocks)


def test_left_padded_batch_that_does_not_split_over_the_batch_axes(sparse_model):
    """3 rows on data=2,fsdp=2: attention then runs every row on each device, still per head over tensor."""
    tokens = jnp.asarray(random_tokens(1, 3, 200))
    mask = jnp.asarray(np.arange(200)[None, :] >= np.array([[0], [37], [130]]))
    expected = jax.device_get(_forward_jit(sparse_model, tokens, mask))
    mesh = _mesh("data=2,fsdp=2,tensor=2")
    model = nnx.clone(sparse_model)
    shard_model(model, mesh, logical_rules(TINY, mesh))
    with jax.set_mesh(mesh):
        got = jax.device_get(_forward_jit(model, tokens, mask))
    for want, have in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        # float32 sums split over tensor shards add in another order (as above): a few 1e-5 on logits of size ~3
        np.testing.assert_allclose(have, want, rtol=2e-5, atol=5e-5)
