"""Adapters record their base model (config and a weight fingerprint) and refuse another base unless allowed."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from seer_jax.adapters import load_seer_model, read_adapter, save_adapter
from seer_jax.base_identity import base_identity, check_base_identity
from seer_jax.checkpoint import load_model, save_converted
from seer_jax.gate import GateConfig
from seer_jax.hf_weights import CheckpointError
from seer_jax.model import CausalLM
from tests.seer_jax.test_adapters import SINGLE, bf16_base, gated, official_config, official_tensors, write_official
from tests.seer_jax.tiny_models import TINY, random_module


def _as_float32(base: CausalLM) -> CausalLM:
    graphdef, state = nnx.split(base)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.float32), state))


def test_the_recorded_base_passes_in_any_dtype_and_another_is_refused(tmp_path):
    save_adapter(gated(bf16_base(), SINGLE), tmp_path / "adapter", base_model="org/tiny", weights="safetensors")
    adapter = read_adapter(tmp_path / "adapter")
    assert adapter.base_identity == base_identity(bf16_base())
    check_base_identity(adapter.base_identity, bf16_base(), adapter="a")
    check_base_identity(adapter.base_identity, _as_float32(bf16_base()), adapter="a")

    other_weights = random_module(lambda: CausalLM(TINY, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), 7)
    with pytest.raises(CheckpointError, match="trained on another base model: the weights differ") as raised:
        check_base_identity(adapter.base_identity, other_weights, adapter=str(tmp_path / "adapter"))
    assert str(tmp_path / "adapter") in str(raised.value) and "--allow-other-base" in str(raised.value)
    more_kv_heads = random_module(lambda: CausalLM(dataclasses.replace(TINY, num_kv_heads=4), rngs=nnx.Rngs(0)), 0)
    with pytest.raises(CheckpointError, match="num_kv_heads 2 ≠ 4"):
        check_base_identity(adapter.base_identity, more_kv_heads, adapter="a")
    check_base_identity(adapter.base_identity, other_weights, adapter="a", allow_other_base=True)


def test_official_adapters_are_checked_by_their_config(tmp_path):
    config = {**official_config(gate_hidden_size=16), "num_key_value_heads": 4}
    write_official(tmp_path / "official", config, official_tensors(0), fmt="safetensors")
    with pytest.raises(CheckpointError, match="num_kv_heads 4 ≠ 2"):
        check_base_identity(read_adapter(tmp_path / "official").base_identity, bf16_base(), adapter="official")


def test_load_seer_model_refuses_another_base_unless_allowed(tmp_path, hf_checkpoint):
    _, hf_dir = hf_checkpoint("llama31")
    base, config = load_model(hf_dir)
    seer_config = dataclasses.replace(SINGLE, gate=GateConfig(hidden_size=config.head_dim))
    save_adapter(gated(base, seer_config), tmp_path / "adapter", base_model=str(hf_dir), weights="safetensors")
    other = random_module(lambda: CausalLM(config, rngs=nnx.Rngs(0)), 5)
    save_converted(other, tmp_path / "other", hf_dir=hf_dir)
    with pytest.raises(CheckpointError, match="the weights differ"):
        load_seer_model(tmp_path / "adapter", base_path=tmp_path / "other")
    load_seer_model(tmp_path / "adapter", base_path=tmp_path / "other", allow_other_base=True)
    assert json.loads((tmp_path / "adapter" / "seer_adapter.json").read_text())["base_identity"]["fingerprint"]
