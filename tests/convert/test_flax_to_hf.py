"""`python -m convert.flax_to_hf` and `seer_jax.hf_export`: HF → converted → HF is the identity, and transformers
computes the exported model's logits as the Flax model does."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from convert.flax_to_hf import main
from convert.hf_to_flax import main as hf_to_flax
from seer_jax.checkpoint import load_model, save_converted
from seer_jax.config import ModelConfig
from seer_jax.hf_export import save_hf
from seer_jax.hf_weights import INDEX_FILE, SINGLE_FILE
from seer_jax.model import CausalLM
from tests.seer_jax.hf_reference import FAMILIES, ROPE_VARIANTS, build_hf_model

TOKENS = np.random.default_rng(0).integers(0, 128, (2, 96))
YARN_LLAMA = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def all_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def torch_logits(model: transformers.PreTrainedModel) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS)).logits.numpy()


@pytest.mark.parametrize("name", ["llama31", "qwen2_bias", "qwen3_qknorm_tied", "yarn_v4_keys"])
def test_hf_converted_hf_round_trip_is_exact(tmp_path, name):
    config_class, overrides = {**FAMILIES, **ROPE_VARIANTS}[name]
    reference = build_hf_model(config_class, overrides)
    reference.save_pretrained(tmp_path / "hf")
    hf_to_flax(["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "converted"), "--dtype", "float32"])
    main(["--model", str(tmp_path / "converted"), "--out", str(tmp_path / "exported"), "--dtype", "float32"])

    original, exported = all_tensors(tmp_path / "hf"), all_tensors(tmp_path / "exported")
    assert sorted(exported) == sorted(original)  # tied models have no lm_head.weight in either
    for name_, tensor in original.items():
        np.testing.assert_array_equal(exported[name_], tensor, err_msg=name_)
    original_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    exported_config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert exported_config == {**original_config, "dtype": "float32"}

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    # Same weights, same torch code: equal up to the last bits (MKL's results may depend on buffer alignment).
    np.testing.assert_allclose(torch_logits(reloaded), torch_logits(reference), rtol=1e-6, atol=1e-6)


def random_model(hf_config: dict) -> CausalLM:
    """A CausalLM with every parameter random (norm scales around 1, nothing left at its constant init)."""
    model = CausalLM(ModelConfig.from_hf(hf_config), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = variable.get_value()
        noise = rng.normal(0.0, 0.1 if path[-1] == "scale" else 0.05, value.shape)
        variable.set_value(jnp.asarray((1.0 if path[-1] == "scale" else 0.0) + noise, value.dtype))
    return model


def test_exported_model_computes_the_flax_logits_in_transformers(tmp_path):
    model = random_model(YARN_LLAMA)
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "config.json").write_text(json.dumps(YARN_LLAMA))
    save_converted(model, tmp_path / "converted", hf_dir=tmp_path / "source")
    main(["--model", str(tmp_path / "converted"), "--out", str(tmp_path / "exported"), "--dtype", "float32"])

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    assert reloaded.config.rope_parameters["rope_type"] == "yarn"
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(model(jnp.asarray(TOKENS))[0])  # [B, T, V]
    reference = torch_logits(reloaded)
    assert np.abs(reference).max() > 1.0
    np.testing.assert_allclose(ours, reference, rtol=0, atol=2e-5 * np.abs(reference).max())


def test_bfloat16_and_sharded_exports_load_in_transformers(tmp_path):
    model = random_model(YARN_LLAMA)
    save_hf(model, YARN_LLAMA, tmp_path / "bf16", dtype="bfloat16", max_shard_bytes=100_000)
    files = sorted(p.name for p in (tmp_path / "bf16").iterdir())
    assert INDEX_FILE in files and SINGLE_FILE not in files
    shards = [name for name in files if name.endswith(".safetensors")]
    assert len(shards) > 2 and all(name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    assert reloaded.dtype == torch.bfloat16
    kernel = np.asarray(model.model.layers[1].mlp.down_proj.kernel[...])  # [F, D]
    exported = reloaded.model.layers[1].mlp.down_proj.weight.detach().float().numpy()  # [D, F]
    np.testing.assert_array_equal(exported, np.asarray(jnp.asarray(kernel.T, jnp.bfloat16), np.float32))
    # Our loader reads the sharded export back exactly (bf16 values).
    loaded, _ = load_model(tmp_path / "bf16", dtype=jnp.bfloat16)
    np.testing.assert_array_equal(loaded.model.layers[1].mlp.down_proj.kernel[...], jnp.asarray(kernel, jnp.bfloat16))


def test_failures(capsys, tmp_path):
    model = random_model(YARN_LLAMA)
    with pytest.raises(ValueError, match="does not describe the model"):
        save_hf(model, {**YARN_LLAMA, "intermediate_size": 32}, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))

    (tmp_path / "exists").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(YARN_LLAMA))
    for args, expected in [
        (["--model", tmp_path, "--out", tmp_path / "new"], "holds no config.json"),
        (["--model", tmp_path / "model", "--out", tmp_path / "exists"], "already exists"),
        (["--model", tmp_path / "model", "--out", tmp_path / "new", "--dtype", "fp16"], "--dtype must be one of"),
        (["--model", tmp_path / "model", "--out", tmp_path / "new"], "no model.safetensors"),
    ]:
        with pytest.raises(SystemExit) as raised:
            main([str(arg) for arg in args])
        assert isinstance(raised.value.code, str) and expected in raised.value.code
        assert raised.value.code.count("\n") == 0
    assert not (tmp_path / "new").exists()
