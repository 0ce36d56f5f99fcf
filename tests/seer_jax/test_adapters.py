"""Gate adapters: bit-exact round trips (Orbax, safetensors), official-format import (.pth, .safetensors), errors."""

import dataclasses
import functools
import json
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from flax import nnx

from seer_jax.adapters import (
    OFFICIAL_PTH,
    OFFICIAL_SAFETENSORS,
    Adapter,
    attach_gates,
    gate_tensors,
    load_seer_model,
    read_adapter,
    save_adapter,
)
from seer_jax.checkpoint import load_model
from seer_jax.gate import GateConfig, GateParam
from seer_jax.hf_weights import CheckpointError
from seer_jax.model import CausalLM
from seer_jax.seer import SeerCausalLM, SeerConfig, seer_with_abstract_gates
from seer_jax.sparsity import Selection
from tests.seer_jax.tiny_models import TINY, random_module

SINGLE = SeerConfig(gate=GateConfig(hidden_size=16), selection=Selection(nz_ratio=0.2, last_block_dense=True))
DOUBLE = SeerConfig(
    gate=GateConfig(gate_type="Qavg_Kmaxmin", hidden_size=8), selection=Selection(method="threshold", threshold=2e-3)
)


@functools.cache
def bf16_base() -> CausalLM:
    return random_module(lambda: CausalLM(TINY, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), 0)


def gated(base: CausalLM, seer_config: SeerConfig, seed: int = 1) -> SeerCausalLM:
    config, param_dtype = base.config, base.model.embed_tokens.embedding.get_value().dtype
    gates = random_module(
        lambda: SeerCausalLM(config, seer_config, param_dtype=param_dtype, rngs=nnx.Rngs(0)), seed, weight_std=0.5
    )
    seer = seer_with_abstract_gates(base, seer_config)
    nnx.update(seer, nnx.state(gates, GateParam))
    return seer


def assert_bit_exact(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        np.testing.assert_array_equal(np.asarray(actual[name]).view(np.uint16), np.asarray(value).view(np.uint16))


@pytest.mark.parametrize("weights,seer_config", [("orbax", SINGLE), ("safetensors", DOUBLE)])
def test_round_trip_is_bit_exact(tmp_path, weights, seer_config):
    seer = gated(bf16_base(), seer_config)
    save_adapter(seer, tmp_path / "adapter", base_model="org/tiny-llama", weights=weights)
    adapter = read_adapter(tmp_path / "adapter")
    assert adapter.seer_config == seer_config and adapter.base_model == "org/tiny-llama"
    assert_bit_exact(dict(adapter.tensors), gate_tensors(seer))
    attached = attach_gates(bf16_base(), adapter)
    assert isinstance(attached, SeerCausalLM) and attached.seer_config == seer_config
    assert_bit_exact(gate_tensors(attached), gate_tensors(seer))
    base_params = nnx.to_flat_state(nnx.state(bf16_base(), nnx.Param))
    attached_params = dict(nnx.to_flat_state(nnx.state(attached, nnx.Param)))
    for path, variable in base_params:
        assert attached_params[path].get_value() is variable.get_value()  # shared, not copied
    with pytest.raises(CheckpointError, match="already exists"):
        save_adapter(seer, tmp_path / "adapter", base_model="org/tiny-llama")
    threshold = Selection(method="threshold", threshold=0.02)
    reselected = attach_gates(bf16_base(), adapter, selection=threshold)
    assert reselected.seer_config == dataclasses.replace(seer_config, selection=threshold)
    assert reselected.model.layers[1].self_attn.seer_config.selection == threshold
    assert_bit_exact(gate_tensors(reselected), gate_tensors(seer))


def official_config(**seerattn) -> dict:
    return {
        "model_type": "llama",
        "num_hidden_layers": TINY.num_layers,
        "num_attention_heads": TINY.num_q_heads,
        "base_model": "meta-llama/Llama-3.1-8B-Instruct",
        "use_flash_rope": True,
        **{f"seerattn_{key}": value for key, value in seerattn.items()},
    }


def official_tensors(seed: int, *, layers: int = TINY.num_layers, heads: int = TINY.num_q_heads) -> dict:
    """bf16 torch tensors as the official single-linear gates: mask_linear_k.weight [N, 3H, E]."""
    generator = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{layer}.self_attn.attn_gate.mask_linear_k.weight": torch.randn(
            heads, 3 * TINY.head_dim, TINY.head_dim, generator=generator
        ).to(torch.bfloat16)
        for layer in range(layers)
    }


def write_official(directory, config: dict, tensors: dict, *, fmt: str) -> None:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    if fmt == "pth":
        torch.save(tensors, directory / OFFICIAL_PTH)
    else:
        safetensors.torch.save_file(tensors, str(directory / OFFICIAL_SAFETENSORS))


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_official_adapter_import(tmp_path, fmt):
    config = official_config(
        sparsity_method="nz_ratio", nz_ratio=0.1, gate_hidden_size=16, last_block_dense=False, gate_block_size=64
    )
    tensors = official_tensors(0)
    write_official(tmp_path / "official", config, tensors, fmt=fmt)
    adapter = read_adapter(tmp_path / "official")
    assert adapter.base_model == "meta-llama/Llama-3.1-8B-Instruct"
    assert adapter.seer_config == SeerConfig(
        gate=GateConfig(gate_type="Qavg_Kmaxminavg", hidden_size=16), selection=Selection(nz_ratio=0.1)
    )
    seer = attach_gates(bf16_base(), adapter)
    expected = {name: tensor.view(torch.int16).numpy() for name, tensor in tensors.items()}
    actual = {name: np.asarray(value).view(np.int16) for name, value in gate_tensors(seer).items()}
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])


def test_official_defaults_and_double_linear(tmp_path):
    """Defaults of the official config (threshold 0, last_block_dense) and a forced double-linear gate."""
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(TINY.num_layers):
        prefix = f"model.layers.{layer}.self_attn.attn_gate"
        tensors[f"{prefix}.mask_linear_q.weight"] = torch.randn(4, 16, 16, generator=generator)
        tensors[f"{prefix}.mask_linear_k.weight"] = torch.randn(2, 48, 16, generator=generator)
    write_official(
        tmp_path / "official", official_config(gate_hidden_size=16, gate_force_double=True), tensors, fmt="pth"
    )
    adapter = read_adapter(tmp_path / "official")
    assert adapter.seer_config.selection == Selection(method="threshold", threshold=0.0, last_block_dense=True)
    seer = attach_gates(bf16_base(), adapter)
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(gate_tensors(seer)[name], tensor.to(torch.bfloat16).float().numpy())


def official_adapter(**changes) -> Adapter:
    tensors = {name: tensor.float().numpy() for name, tensor in official_tensors(0).items()}
    for name, value in changes.items():
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    return Adapter(seer_config=SeerConfig(gate=GateConfig(hidden_size=16)), base_model=None, tensors=tensors)


LAYER = "model.layers.{}.self_attn.attn_gate.mask_linear_k.weight"


@pytest.mark.parametrize(
    "changes,match",
    [
        ({LAYER.format(1): None}, r"no tensor for gate\(s\) model\.layers\.1\.self_attn\.attn_gate\.mask_linear_k"),
        ({LAYER.format(2): np.ones((4, 48, 16))}, r"model\.layers\.2\.self_attn\.attn_gate\.mask_linear_k\.weight ma"),
        (
            {LAYER.format(0): np.ones((8, 48, 16))},
            r"model\.layers\.0\.self_attn\.attn_gate\.mask_linear_k\.weight \[8, 48, 16\] \(expected \[4, 48, 16\]\)",
        ),
        ({"model.layers.0.self_attn.attn_gate.attngate_linear_k.weight": np.ones(3)}, "decode-gate names: read"),
    ],
    ids=["missing_layer", "extra_layer", "head_count", "decode_gate"],
)
def test_mismatched_tensors_are_named(changes, match):
    with pytest.raises(CheckpointError, match=match):
        attach_gates(bf16_base(), official_adapter(**changes))


def test_official_config_errors(tmp_path):
    write_official(tmp_path / "decode", official_config(token_budget=4096), official_tensors(0), fmt="safetensors")
    with pytest.raises(CheckpointError, match="decode-gate keys"):
        read_adapter(tmp_path / "decode")
    write_official(tmp_path / "v1", {"nz_ratio": 0.5}, official_tensors(0), fmt="safetensors")
    with pytest.raises(CheckpointError, match="no seerattn_"):
        read_adapter(tmp_path / "v1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        read_adapter(tmp_path / "empty")


def test_pth_without_torch_names_the_extra(tmp_path, monkeypatch):
    write_official(tmp_path / "official", official_config(gate_hidden_size=16), official_tensors(0), fmt="pth")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match=r"pip install 'seer-jax\[torch\]'"):
        read_adapter(tmp_path / "official")


def test_load_seer_model_composes_with_the_base_checkpoint(tmp_path, hf_checkpoint):
    _, hf_dir = hf_checkpoint("llama31")
    base, config = load_model(hf_dir)
    seer_config = dataclasses.replace(SINGLE, gate=GateConfig(hidden_size=config.head_dim))
    seer = gated(base, seer_config)
    save_adapter(seer, tmp_path / "adapter", base_model=str(hf_dir), weights="safetensors")
    loaded = load_seer_model(tmp_path / "adapter")
    assert_bit_exact(gate_tensors(loaded), gate_tensors(seer))
    expected = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
    for path, variable in nnx.to_flat_state(nnx.state(loaded, nnx.All(nnx.Param, nnx.Not(GateParam)))):
        np.testing.assert_array_equal(variable.get_value(), expected[path].get_value())
    save_adapter(seer, tmp_path / "elsewhere", base_model="org/not-here")
    with pytest.raises(CheckpointError, match=r"org/not-here is neither a local directory .* as base_path"):
        load_seer_model(tmp_path / "elsewhere")
    assert gate_tensors(load_seer_model(tmp_path / "elsewhere", base_path=hf_dir)).keys() == gate_tensors(seer).keys()


def test_base_model_is_found_from_any_directory(tmp_path, hf_checkpoint, monkeypatch):
    """A base path typed relative to the working directory is recorded absolute and relative to the adapter: the
    adapter loads from another working directory, after the run directory moves, and (older adapters) from the
    path as typed, looked up under the adapter's ancestors."""
    _, hf_dir = hf_checkpoint("llama31")
    shutil.copytree(hf_dir, tmp_path / "run" / "model")
    base, config = load_model(tmp_path / "run" / "model")
    seer = gated(base, dataclasses.replace(SINGLE, gate=GateConfig(hidden_size=config.head_dim)))
    monkeypatch.chdir(tmp_path)
    save_adapter(seer, "run/gates/adapter", base_model="run/model", weights="safetensors")
    marker_path = tmp_path / "run" / "gates" / "adapter" / "seer_adapter.json"
    marker = json.loads(marker_path.read_text())
    assert marker["base_model"] == str(tmp_path / "run" / "model")
    assert marker["base_model_relative"] == "../../model"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert read_adapter(tmp_path / "run" / "gates" / "adapter").base_model == str(tmp_path / "run" / "model")
    assert_bit_exact(gate_tensors(load_seer_model(tmp_path / "run" / "gates" / "adapter")), gate_tensors(seer))
    shutil.move(tmp_path / "run", tmp_path / "moved")  # the recorded absolute path is gone
    moved = tmp_path / "moved" / "gates" / "adapter"
    assert read_adapter(moved).base_model == str(tmp_path / "moved" / "model")
    assert_bit_exact(gate_tensors(load_seer_model(moved)), gate_tensors(seer))
    del marker["base_model_relative"]  # as older adapters: the path as typed in the run's working directory
    marker["base_model"] = "moved/model"
    (moved / "seer_adapter.json").write_text(json.dumps(marker))
    assert read_adapter(moved).base_model == str(tmp_path / "moved" / "model")
    marker["base_model"] = "org/tiny-llama"  # a hub id stays as recorded
    (moved / "seer_adapter.json").write_text(json.dumps(marker))
    assert read_adapter(moved).base_model == "org/tiny-llama"


class _Payload:
    """A pickled object that `torch.load(weights_only=True)` must refuse."""

    def __reduce__(self):
        return (print, ("unpickled",))


def bad_adapters(tmp_path) -> dict:
    """name → (adapter directory, expected message): the bad files a hostile user tried."""
    seer = gated(bf16_base(), SINGLE)
    cases = {}
    for name in ("no_tensors_key", "not_json", "orbax_gates_missing", "orbax_gates_truncated"):
        save_adapter(seer, tmp_path / name, base_model="org/tiny", weights="orbax")
    marker_path = tmp_path / "no_tensors_key" / "seer_adapter.json"
    marker = json.loads(marker_path.read_text())
    del marker["tensors"]
    marker_path.write_text(json.dumps(marker))
    cases["no_tensors_key"] = "has no 'tensors' entry"
    (tmp_path / "not_json" / "seer_adapter.json").write_bytes(b'{"format": 1, "tens')
    cases["not_json"] = "seer_adapter.json is not valid JSON"
    shutil.rmtree(tmp_path / "orbax_gates_missing" / "gates")
    cases["orbax_gates_missing"] = "gates is missing"
    for file in (tmp_path / "orbax_gates_truncated" / "gates").rglob("*"):
        if file.is_file() and file.stat().st_size > 64 and "d" in file.parent.name:
            file.write_bytes(file.read_bytes()[:16])
    cases["orbax_gates_truncated"] = "gates.* is damaged or missing"
    tensors = official_tensors(0)
    write_official(tmp_path / "truncated_pth", official_config(gate_hidden_size=16), tensors, fmt="pth")
    pth = tmp_path / "truncated_pth" / OFFICIAL_PTH
    pth.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    cases["truncated_pth"] = "attn_gate_weights.pth is not a readable torch file .*truncated or corrupt"
    write_official(
        tmp_path / "pickle_pth", official_config(gate_hidden_size=16), {**tensors, "x": _Payload()}, fmt="pth"
    )
    cases["pickle_pth"] = "holds pickled Python objects besides tensors and is refused: unpickling them could run"
    nan = {name: tensor.clone() for name, tensor in tensors.items()}
    next(iter(nan.values()))[0, 0, 0] = float("nan")
    write_official(tmp_path / "nan_gates", official_config(gate_hidden_size=16), nan, fmt="safetensors")
    cases["nan_gates"] = r"gate tensor\(s\) model\.layers\.0\.self_attn\.attn_gate\.mask_linear_k\.weight hold NaN/inf"
    return {name: (tmp_path / name, match) for name, match in cases.items()}


def test_bad_adapter_files_raise_one_line_naming_the_file(tmp_path):
    for name, (directory, match) in bad_adapters(tmp_path).items():
        with pytest.raises(CheckpointError, match=match) as raised:
            read_adapter(directory)
        message = str(raised.value)
        assert "\n" not in message and str(directory) in message, (name, message)
