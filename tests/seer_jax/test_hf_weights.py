"""The HF name map and the strict safetensors loader."""

import shutil

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from seer_jax.checkpoint import abstract_model
from seer_jax.config import ModelConfig
from seer_jax.hf_weights import (
    CheckpointError,
    hf_name_to_state_path,
    list_hf_tensors,
    load_hf_state,
    state_path_to_hf_name,
)
from tests.seer_jax.hf_reference import FAMILIES


@pytest.mark.parametrize(
    ("name", "path", "transpose"),
    [
        ("model.embed_tokens.weight", ("model", "embed_tokens", "embedding"), False),
        ("model.layers.3.self_attn.q_proj.weight", ("model", "layers", 3, "self_attn", "q_proj", "kernel"), True),
        ("model.layers.3.self_attn.q_proj.bias", ("model", "layers", 3, "self_attn", "q_proj", "bias"), False),
        ("model.layers.0.self_attn.k_norm.weight", ("model", "layers", 0, "self_attn", "k_norm", "scale"), False),
        ("model.layers.12.input_layernorm.weight", ("model", "layers", 12, "input_layernorm", "scale"), False),
        ("model.layers.1.mlp.down_proj.weight", ("model", "layers", 1, "mlp", "down_proj", "kernel"), True),
        ("model.norm.weight", ("model", "norm", "scale"), False),
        ("lm_head.weight", ("lm_head", "kernel"), True),
    ],
)
def test_name_map(name, path, transpose):
    assert hf_name_to_state_path(name) == (path, transpose)
    assert state_path_to_hf_name(path) == name


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.0.mlp.act.weight"])
def test_unknown_names_have_no_rule(name):
    assert hf_name_to_state_path(name) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_parameters_are_exactly_the_checkpoint_tensors(family, hf_checkpoint):
    _, directory = hf_checkpoint(family)
    model = abstract_model(ModelConfig.from_hf(directory))
    ours = {state_path_to_hf_name(path) for path, _ in nnx.to_flat_state(nnx.state(model))}
    assert ours == set(list_hf_tensors(directory))


def test_loads_and_transposes(hf_checkpoint):
    hf_model, directory = hf_checkpoint("qwen2_bias")
    _, state = nnx.split(abstract_model(ModelConfig.from_hf(directory)))
    seen = []
    load_hf_state(state, directory, progress=lambda names: (seen.append(name) or name for name in names))
    assert sorted(seen) == sorted(list_hf_tensors(directory))
    hf_state = {name: tensor.numpy() for name, tensor in hf_model.state_dict().items()}
    attention = state["model"]["layers"][1]["self_attn"]
    np.testing.assert_array_equal(
        attention["v_proj"]["kernel"][...], hf_state["model.layers.1.self_attn.v_proj.weight"].T
    )
    np.testing.assert_array_equal(attention["v_proj"]["bias"][...], hf_state["model.layers.1.self_attn.v_proj.bias"])


def copy_with(directory, tmp_path, edit):
    target = tmp_path / "hf"
    shutil.copytree(directory, target)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors")
    return target


def test_rotary_buffers_are_skipped(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("llama31")
    buffer = np.ones((16,), np.float32)
    target = copy_with(
        directory, tmp_path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": buffer})
    )
    _, state = nnx.split(abstract_model(ModelConfig.from_hf(target)))
    load_hf_state(state, target)


def test_lm_head_in_a_tied_checkpoint_is_unmapped(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("qwen3_qknorm_tied")
    target = copy_with(directory, tmp_path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
    _, state = nnx.split(abstract_model(ModelConfig.from_hf(target)))
    with pytest.raises(CheckpointError, match=r"match no model parameter: lm_head\.weight; check that config\.json"):
        load_hf_state(state, target)


def test_torch_pickles_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="holds only torch pickle weights; re-save them as safetensors"):
        list_hf_tensors(tmp_path)
