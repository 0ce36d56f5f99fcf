"""`load_model` / `save_converted`: both directory kinds, dtypes, atomic writes; the testbed loaded directly."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from seer_jax.checkpoint import MARKER_FILE, abstract_model, is_converted, load_model, save_converted
from seer_jax.config import ModelConfig
from seer_jax.hf_weights import CheckpointError


def params_of(model) -> list[jax.Array]:
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_abstract_model_allocates_nothing(hf_checkpoint):
    _, directory = hf_checkpoint("mistral")
    model = abstract_model(ModelConfig.from_hf(directory), param_dtype=jnp.bfloat16)
    leaves = params_of(model)
    assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.bfloat16)}


def test_save_then_load_round_trip(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("qwen2_bias")
    bf16, config = load_model(directory, dtype=jnp.bfloat16)
    out = tmp_path / "converted"
    save_converted(bf16, out, hf_dir=directory)
    assert is_converted(out) and json.loads((out / MARKER_FILE).read_text())["param_dtype"] == "bfloat16"
    assert (out / "config.json").read_text() == (directory / "config.json").read_text()
    assert not list(tmp_path.glob(".converted.*"))  # no staging directory left

    restored, restored_config = load_model(out, param_dtype=jnp.float32)
    assert restored_config == config
    for ours, saved in zip(params_of(restored), params_of(bf16), strict=True):
        assert ours.dtype == jnp.float32
        np.testing.assert_array_equal(ours, np.asarray(saved, np.float32))

    with pytest.raises(CheckpointError, match="already exists"):
        save_converted(bf16, out, hf_dir=directory)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"no config\.json in"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config\.json is missing 'vocab_size'"):
        load_model(tmp_path)


@pytest.mark.testbed
def test_testbed_loads_from_the_hf_directory(testbed_dir):
    """The sharded bf16 checkpoint loads without conversion; every tensor arrives bit-exact (transposed)."""
    hf_dir = testbed_dir / "seer-tiny-llama"
    model, config = load_model(hf_dir, dtype=jnp.bfloat16)
    assert (config.num_layers, config.rope.rope_type, config.tie_word_embeddings) == (6, "llama3", False)
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    for name, ours in [
        ("model.layers.5.self_attn.q_proj.weight", model.model.layers[5].self_attn.q_proj.kernel[...].T),
        ("model.layers.0.mlp.up_proj.weight", model.model.layers[0].mlp.up_proj.kernel[...].T),
        ("model.embed_tokens.weight", model.model.embed_tokens.embedding[...]),
        ("lm_head.weight", model.lm_head.kernel[...].T),
    ]:
        with safe_open(str(hf_dir / index[name]), framework="flax") as reader:
            np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(reader.get_tensor(name), np.float32))


@pytest.mark.parametrize("damage", ["truncated_data", "missing_params", "bad_marker", "truncated_safetensors"])
def test_a_corrupt_model_directory_is_one_line_naming_the_file(hf_checkpoint, tmp_path, damage):
    _, directory = hf_checkpoint("llama31")
    if damage == "truncated_safetensors":
        out = tmp_path / "hf"
        out.mkdir()
        for file in directory.iterdir():
            (out / file.name).write_bytes(file.read_bytes())
        weights = next(out.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        match = f"{weights}"
    else:
        out = tmp_path / "converted"
        save_converted(load_model(directory)[0], out, hf_dir=directory)
        if damage == "truncated_data":
            for file in (out / "params").rglob("*"):
                if file.is_file() and file.parent.name == "d":
                    file.write_bytes(file.read_bytes()[:10])
            match = r"params/.*d/\w+ is damaged or missing .*convert it again \(python -m convert\.hf_to_flax\)"
        elif damage == "missing_params":
            for file in (out / "params").rglob("*"):
                if file.is_file():
                    file.unlink()
            match = r"params is damaged or missing .*convert it again"
        else:
            (out / MARKER_FILE).write_text('{"format": ')
            match = rf"{MARKER_FILE} is not valid JSON"
    with pytest.raises(CheckpointError, match=match) as raised:
        load_model(out)
    assert "\n" not in str(raised.value)
