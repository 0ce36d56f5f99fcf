"""Adapters with SeerAttention-R decode gates: our format with prefill gates, decode gates or both (bit-exact round
trips that decode as the saved model), decode-only adapters on a densely prefilling model, the official decode
format (torch state dict with official names + config.json with official keys) against a natively built model,
combining a prefill and a decode adapter, a per-layer decode allocation (format 3, recorded into an existing
adapter; adapters without one are written and read as before), and one-line errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from seer_jax.adapters import (
    OFFICIAL_PTH,
    MeasuredDensity,
    attach_gates,
    combine_adapters,
    gate_tensors,
    read_adapter,
    record_selection,
    save_adapter,
)
from seer_jax.decode_config import DecodeAllocation, DecodeConfig
from seer_jax.decode_gate import DECODE_GATE_PARAMS
from seer_jax.forwards import decode_logits_and_density
from seer_jax.gate import GateParam
from seer_jax.hf_weights import CheckpointError
from seer_jax.seer import SeerCausalLM, seer_with_abstract_gates
from seer_jax.seer_config import SeerConfig
from seer_jax.sparsity import Selection
from tests.seer_jax.decode_models import (
    DECODE,
    DECODE_BLOCK,
    SPARSE_PREFILL,
    base_model,
    decode_model,
    padded_batch,
    with_decode,
)
from tests.seer_jax.tiny_models import TINY, random_tokens

# One block chosen by top-k, no sink, layer 0 dense: decoding differs from dense (test_sparse_decode).
SMALL = with_decode(token_budget=DECODE_BLOCK, force_sink=False, start_layer=1)
PROMPT, NEW = 40, 12
decode_logits = nnx.jit(decode_logits_and_density)


def teacher_forced(model: SeerCausalLM) -> tuple[np.ndarray, np.ndarray]:
    """Logits [B, NEW, V] and decode density [L] of a fixed continuation after a left-padded prompt."""
    tokens, mask = padded_batch(PROMPT)
    continuation = jnp.asarray(random_tokens(5, 2, NEW))
    logits, density = decode_logits(model, tokens, mask, continuation)
    return np.asarray(logits), np.asarray(density)


def assert_same_tensors(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(np.asarray(actual[name]), np.asarray(value), err_msg=name)


def decode_only(decode: DecodeConfig = SMALL) -> SeerCausalLM:
    """The base model with decode_model's decode gates and no prefill gates."""
    model = seer_with_abstract_gates(base_model(), SeerConfig(gate=None, decode=decode))
    nnx.update(model, nnx.state(decode_model(decode), DECODE_GATE_PARAMS))
    return model


@pytest.mark.parametrize("weights", ["orbax", "safetensors"])
def test_both_gates_round_trip_and_decode_as_saved(tmp_path, weights):
    """Prefill and decode gates, their configs and the decode selection come back bit-exact; the attached model
    decodes (sparsely) exactly as the saved one."""
    model = decode_model(SMALL, SPARSE_PREFILL)
    save_adapter(model, tmp_path / "adapter", base_model="org/tiny", weights=weights)
    adapter = read_adapter(tmp_path / "adapter")
    assert adapter.seer_config == model.seer_config and adapter.seer_config.decode == SMALL
    names = set(adapter.tensors)
    assert any(".self_attn.attn_gate.mask_linear_k." in name for name in names)
    assert any(".self_attn.decode_gate.attngate_qnorm." in name for name in names)
    assert_same_tensors(adapter.tensors, gate_tensors(model))
    attached = attach_gates(base_model(), adapter)
    assert_same_tensors(gate_tensors(attached), gate_tensors(model))
    logits, density = teacher_forced(attached)
    expected_logits, expected_density = teacher_forced(model)
    np.testing.assert_array_equal(logits, expected_logits)
    np.testing.assert_array_equal(density, expected_density)
    assert density[0] == 1.0 and density[1] < 0.8  # layer 1 decodes sparsely, as saved


def test_decode_only_adapter_attaches_to_a_dense_prefill():
    """gate=None: the adapter holds decode gates only; the model prefills as the base model does (bit-exact) and
    decodes as a model with a dense prefill selection does; a sparse prefill selection is refused."""
    model = decode_only()
    assert all(layer.self_attn.attn_gate is None for layer in model.model.layers)
    assert not any(".attn_gate." in name for name in gate_tensors(model))
    tokens, mask = padded_batch(PROMPT)
    base_logits, _ = base_model()(tokens, attention_mask=mask)
    logits, _ = model(tokens, attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(base_logits))
    expected_logits, expected_density = teacher_forced(decode_model(SMALL))  # prefill: every block, block-sparse
    actual_logits, actual_density = teacher_forced(model)
    np.testing.assert_allclose(actual_logits, expected_logits, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(actual_density, expected_density)
    with pytest.raises(ValueError, match=r"no prefill gates: dense prefill\) but selection .* drops blocks"):
        SeerConfig(gate=None, selection=Selection(nz_ratio=0.5), decode=SMALL)
    with pytest.raises(ValueError, match="both None"):
        SeerConfig(gate=None)


def test_decode_only_round_trip(tmp_path):
    model = decode_only()
    save_adapter(model, tmp_path / "adapter", base_model="org/tiny", weights="safetensors")
    adapter = read_adapter(tmp_path / "adapter")
    assert adapter.seer_config == SeerConfig(gate=None, decode=SMALL)  # no default prefill selection without gates
    attached = attach_gates(base_model(), adapter)
    np.testing.assert_array_equal(teacher_forced(attached)[0], teacher_forced(model)[0])
    with pytest.raises(ValueError, match="no prefill gates \\(decode gates only\\)"):
        attach_gates(base_model(), adapter, selection=Selection(nz_ratio=0.5))
    budget = dataclasses.replace(SMALL, token_budget=4 * DECODE_BLOCK)
    reselected = attach_gates(base_model(), adapter, decode=budget)
    assert reselected.seer_config.decode == budget
    assert teacher_forced(reselected)[1][1] > teacher_forced(attached)[1][1]  # a larger budget attends more
    with pytest.raises(ValueError, match="structure \\(hidden_size 8 → 16\\)"):
        attach_gates(base_model(), adapter, decode=dataclasses.replace(SMALL, hidden_size=16))


# One block by top-k shared 0.25 : 1.75 among the layers at 16 / 160 tokens: layer 0 picks none, layer 1 two blocks.
ALLOCATED = with_decode(
    token_budget=DECODE_BLOCK,
    force_sink=False,
    allocation=DecodeAllocation(
        fractions=(0.1, 1.0), layer_fractions=((0.025, 0.175), (1.0, 1.0)), length=160, rule="recall"
    ),
)


def test_decode_allocation_round_trip(tmp_path):
    """A decode config with an allocation is written as format 3 and comes back equal; the attached model decodes as
    the saved one, differently from the uniform budget; without an allocation the format stays 1 and the JSON has no
    allocation key."""
    model = decode_only(ALLOCATED)
    save_adapter(model, tmp_path / "allocated", base_model="org/tiny", weights="safetensors")
    marker = json.loads((tmp_path / "allocated" / "seer_adapter.json").read_text())
    assert marker["format"] == 3 and marker["seer_config"]["decode"]["allocation"]["length"] == 160
    adapter = read_adapter(tmp_path / "allocated")
    assert adapter.seer_config.decode == ALLOCATED
    attached = attach_gates(base_model(), adapter)
    logits, density = teacher_forced(attached)
    expected_logits, expected_density = teacher_forced(model)
    np.testing.assert_array_equal(logits, expected_logits)
    np.testing.assert_array_equal(density, expected_density)
    uniform = teacher_forced(decode_only(dataclasses.replace(ALLOCATED, allocation=None)))[1]
    assert density[0] < uniform[0] and density[1] > uniform[1]  # layer 0 no block, layer 1 two instead of one
    save_adapter(decode_only(SMALL), tmp_path / "plain", base_model="org/tiny")
    plain = json.loads((tmp_path / "plain" / "seer_adapter.json").read_text())
    assert plain["format"] == 1 and "allocation" not in plain["seer_config"]["decode"]
    three_layers = dataclasses.replace(ALLOCATED.allocation, layer_fractions=((0.1, 0.1, 0.1), (1.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match="the decode allocation covers 3 layers, the model has 2"):
        attach_gates(base_model(), adapter, decode=dataclasses.replace(ALLOCATED, allocation=three_layers))


def test_record_a_decode_allocation_into_an_adapter(tmp_path):
    """record_selection(decode=...) turns a format-1 decode adapter (written before allocations: its JSON has no
    allocation key) into a format-3 one with the allocation, leaving weights and prefill density alone and dropping
    the replaced decode config's density; a config for other gates or another layer count is refused."""
    save_adapter(
        decode_model(SMALL, SPARSE_PREFILL),
        tmp_path / "adapter",
        base_model="org/tiny",
        decode_density=MeasuredDensity(density=0.4, data="old"),
    )
    path = tmp_path / "adapter" / "seer_adapter.json"
    assert json.loads(path.read_text())["format"] == 1
    before = read_adapter(tmp_path / "adapter")
    record_selection(tmp_path / "adapter", decode=ALLOCATED)
    after = read_adapter(tmp_path / "adapter")
    assert json.loads(path.read_text())["format"] == 3
    assert after.seer_config == dataclasses.replace(before.seer_config, decode=ALLOCATED)
    assert after.decode_density is None
    assert_same_tensors(after.tensors, before.tensors)
    three_layers = dataclasses.replace(ALLOCATED.allocation, layer_fractions=((0.1, 0.1, 0.1), (1.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match="covers 3 layers, the adapter's gates 2"):
        record_selection(tmp_path / "adapter", decode=dataclasses.replace(ALLOCATED, allocation=three_layers))
    with pytest.raises(ValueError, match="structure"):
        record_selection(tmp_path / "adapter", decode=dataclasses.replace(ALLOCATED, hidden_size=16))
    with pytest.raises(ValueError, match="needs a prefill selection, a decode config or both"):
        record_selection(tmp_path / "adapter")


# --- official SeerAttention-R decode adapters ----------------------------------------------------------------------

GROUP = TINY.num_q_heads // TINY.num_kv_heads
HIDDEN = 8


def official_decode_tensors(seed: int, *, qk_norm: bool = True, group: int = GROUP) -> dict[str, torch.Tensor]:
    """bf16 torch tensors named and shaped as the official decode gates (Qproj, Kmaxminavg)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(TINY.num_layers):
        prefix = f"model.layers.{layer}.self_attn.attn_gate"
        shapes = {
            "attngate_linear_q": (TINY.num_kv_heads, group, TINY.head_dim, HIDDEN),
            "attngate_linear_k": (TINY.num_kv_heads, 3 * TINY.head_dim, HIDDEN),
            **({"attngate_qnorm": (HIDDEN,), "attngate_knorm": (HIDDEN,)} if qk_norm else {}),
        }
        for module, shape in shapes.items():
            scale = 0.3 if len(shape) > 1 else 0.2
            value = torch.randn(*shape, generator=generator) * scale + (1.0 if len(shape) == 1 else 0.0)
            tensors[f"{prefix}.{module}.weight"] = value.to(torch.bfloat16)
    return tensors


def official_decode_config(**seerattn) -> dict:
    """config.json as distillation_decode.py writes it: the base config plus the training keys."""
    keys = {
        "k_seq_pooling_type": "Kmaxminavg",
        "gate_block_size": DECODE_BLOCK,
        "q_head_pooling_type": "Qproj",
        "gate_hidden_size": HIDDEN,
        "loss_slice_ratio": 0.5,
        "use_qk_norm": True,
        "use_rope": True,
        **seerattn,
    }
    return {
        "model_type": "llama",
        "num_hidden_layers": TINY.num_layers,
        "num_attention_heads": TINY.num_q_heads,
        "num_key_value_heads": TINY.num_kv_heads,
        "base_model": "org/tiny-reasoner",
        **{f"seerattn_{key}": value for key, value in keys.items() if value is not None},
    }


def write_official_decode(directory, config: dict, tensors: dict) -> None:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(tensors, directory / OFFICIAL_PTH)


def natively_built(tensors: dict[str, torch.Tensor], decode: DecodeConfig, prefill=None) -> SeerCausalLM:
    """The base model with decode gates set module by module from the official tensors (no name mapping)."""
    gate = None if prefill is None else prefill.seer_config.gate
    selection = Selection() if prefill is None else prefill.seer_config.selection
    model = seer_with_abstract_gates(base_model(), SeerConfig(gate=gate, selection=selection, decode=decode))
    if prefill is not None:
        nnx.update(model, nnx.state(prefill, nnx.All(GateParam, nnx.Not(DECODE_GATE_PARAMS))))
    for index, layer in enumerate(model.model.layers):
        gate_module = layer.self_attn.decode_gate
        for module in ("attngate_linear_q", "attngate_linear_k", "attngate_qnorm", "attngate_knorm"):
            weight = tensors[f"model.layers.{index}.self_attn.attn_gate.{module}.weight"].float().numpy()
            getattr(gate_module, module).weight.set_value(jnp.asarray(weight))
    return model


def test_official_decode_adapter_imports_and_decodes_as_a_native_model(tmp_path):
    tensors = official_decode_tensors(0)
    config = official_decode_config(sparsity_method="token_budget", token_budget=DECODE_BLOCK, start_layer=1)
    write_official_decode(tmp_path / "official", config, tensors)
    adapter = read_adapter(tmp_path / "official")
    expected_decode = DecodeConfig(
        hidden_size=HIDDEN, block_size=DECODE_BLOCK, qk_norm=True, token_budget=DECODE_BLOCK, start_layer=1
    )
    assert adapter.seer_config == SeerConfig(gate=None, decode=expected_decode)
    assert adapter.base_model == "org/tiny-reasoner"
    assert adapter.base_identity == {
        "config": {"model_type": "llama", "num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2}
    }
    renamed = {name.replace(".attn_gate.", ".decode_gate."): tensor for name, tensor in tensors.items()}
    assert sorted(adapter.tensors) == sorted(renamed)
    for name, tensor in renamed.items():  # bit-exact bf16
        np.testing.assert_array_equal(np.asarray(adapter.tensors[name]).view(np.int16), tensor.view(torch.int16))
    attached = attach_gates(base_model(), adapter)
    logits, density = teacher_forced(attached)
    native_logits, native_density = teacher_forced(natively_built(tensors, expected_decode))
    np.testing.assert_array_equal(logits, native_logits)
    np.testing.assert_array_equal(density, native_density)
    assert density[0] == 1.0 and density[1] < 1.0
    dense_logits, _ = teacher_forced(decode_only(with_decode(token_budget=10**6)))
    assert np.abs(logits - dense_logits).max() > 1e-3  # the gates' selection changes the decoding


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({}, DecodeConfig(hidden_size=HIDDEN, block_size=DECODE_BLOCK, qk_norm=True)),  # token_budget 4096
        (
            {"threshold": 0.004},
            DecodeConfig(hidden_size=HIDDEN, block_size=16, qk_norm=True, method="threshold", threshold=0.004),
        ),
        (
            {
                "sparsity_method": "threshold",
                "use_qk_norm": None,
                "sliding_window_size": 32,
                "implementation": "seer_sparse",
            },
            DecodeConfig(
                hidden_size=HIDDEN, block_size=DECODE_BLOCK, qk_norm=True, method="threshold", sliding_window=32
            ),
        ),
    ],
    ids=["no_method", "threshold_only", "qk_norm_from_tensors"],
)
def test_official_decode_defaults(tmp_path, changes, expected):
    """Without a method: the token budget (the official default, threshold 0, keeps every block), unless a positive
    threshold is given; without use_qk_norm: whether the norm tensors exist."""
    write_official_decode(tmp_path / "official", official_decode_config(**changes), official_decode_tensors(0))
    assert read_adapter(tmp_path / "official").seer_config.decode == expected


def test_official_decode_errors_are_one_line(tmp_path):
    def failure(name, config, tensors, match):
        write_official_decode(tmp_path / name, config, tensors)
        with pytest.raises(CheckpointError, match=match) as raised:
            adapter = read_adapter(tmp_path / name)
            attach_gates(base_model(), adapter)
        assert "\n" not in str(raised.value)

    tensors = official_decode_tensors(0)
    failure(
        "nz_ratio", official_decode_config(sparsity_method="nz_ratio"), tensors, "'nz_ratio' is not a decode method"
    )
    failure("qorig", official_decode_config(q_head_pooling_type="Qorig"), tensors, "q_head_pooling must be one of")
    failure("prefill_keys", official_decode_config(nz_ratio=0.1), tensors, r"prefill-gate keys \['seerattn_nz_ratio'\]")
    mixed = {**tensors, "model.layers.0.self_attn.attn_gate.mask_linear_k.weight": torch.zeros(4, 48, 16)}
    failure("mixed", official_decode_config(), mixed, "both prefill .* and decode .* tensors")
    failure(
        "group",
        official_decode_config(),
        official_decode_tensors(0, group=GROUP + 1),
        r"decode_gate\.attngate_linear_q\.weight \[2, 3, 16, 8\] \(expected \[2, 2, 16, 8\]\)",
    )
    failure(
        "no_norm",
        official_decode_config(use_qk_norm=True),
        official_decode_tensors(0, qk_norm=False),
        "no tensor for gate",
    )
    failure(
        "norm_not_configured",
        official_decode_config(use_qk_norm=False),
        tensors,
        r"attngate_qnorm\.weight match no gate .* \(decode-gate q/k norm weights, but .* qk_norm False\)",
    )


# --- a prefill adapter and a decode adapter in one model --------------------------------------------------------


def test_combine_official_prefill_and_decode_adapters(tmp_path):
    """The only way to run an official prefill + decode pair: prefill gates and selection from the first, decode
    gates and config from the second; the model prefills as the prefill adapter's model and decodes as a native
    model with both gates."""
    prefill_model = decode_model(None, SPARSE_PREFILL)  # random prefill gates, no decode gates
    save_adapter(prefill_model, tmp_path / "prefill", base_model="org/tiny")
    tensors = official_decode_tensors(1)
    config = official_decode_config(sparsity_method="token_budget", token_budget=DECODE_BLOCK, start_layer=1)
    write_official_decode(tmp_path / "decode", config, tensors)
    prefill, decode = read_adapter(tmp_path / "prefill"), read_adapter(tmp_path / "decode")
    combined = combine_adapters(prefill, decode)
    assert combined.seer_config == dataclasses.replace(prefill.seer_config, decode=decode.seer_config.decode)
    assert combined.base_model == "org/tiny" and sorted(combined.tensors) == sorted(
        {**prefill.tensors, **decode.tensors}
    )
    assert combined.base_identity["fingerprint"] == prefill.base_identity["fingerprint"]
    model = attach_gates(base_model(), combined)
    tokens, mask = padded_batch(PROMPT)
    logits, _ = model(tokens, attention_mask=mask)
    expected, _ = prefill_model(tokens, attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(expected))
    native = natively_built(tensors, decode.seer_config.decode, prefill=prefill_model)
    np.testing.assert_array_equal(teacher_forced(model)[0], teacher_forced(native)[0])
    # Each part alone; the other kind of gate in an adapter is left out.
    assert combine_adapters(None, decode).seer_config == decode.seer_config
    both = combine_adapters(prefill, decode)
    assert combine_adapters(both, None).seer_config == prefill.seer_config
    assert sorted(combine_adapters(None, both).tensors) == sorted(decode.tensors)
    with pytest.raises(CheckpointError, match="holds no decode gates"):
        combine_adapters(prefill, prefill)
    with pytest.raises(CheckpointError, match="holds no prefill gates"):
        combine_adapters(decode, decode)
    other_base = dataclasses.replace(decode, base_identity={"config": {"num_layers": 3}})
    with pytest.raises(CheckpointError, match="different base models: num_layers 2 ≠ 3"):
        combine_adapters(prefill, other_base)


def test_saved_defaults_and_measured_density(tmp_path):
    """A model that selects every block (as distillation does) saves DEFAULT_SELECTION; a given selection, decode
    config and their measured densities are recorded and come back."""
    from seer_jax.adapters import DEFAULT_SELECTION, MeasuredDensity

    dense = decode_model(DECODE)  # dense prefill selection, token budget 10**6
    save_adapter(dense, tmp_path / "default", base_model="org/tiny")
    adapter = read_adapter(tmp_path / "default")
    assert adapter.seer_config.selection == DEFAULT_SELECTION and adapter.seer_config.decode == DECODE
    assert attach_gates(base_model(), adapter).seer_config.selection == DEFAULT_SELECTION
    assert adapter.prefill_density is None and adapter.decode_density is None
    selection = Selection(method="threshold", threshold=0.01)
    prefill_density = MeasuredDensity(density=0.31, data="test data: 2 × 40 tokens")
    decode_density = MeasuredDensity(density=0.42, data="test continuations")
    save_adapter(
        dense,
        tmp_path / "measured",
        base_model="org/tiny",
        selection=selection,
        decode=SMALL,
        prefill_density=prefill_density,
        decode_density=decode_density,
    )
    adapter = read_adapter(tmp_path / "measured")
    assert adapter.seer_config.selection == selection and adapter.seer_config.decode == SMALL
    assert adapter.prefill_density == prefill_density and adapter.decode_density == decode_density
    with pytest.raises(ValueError, match="prefill_density needs the prefill selection"):
        save_adapter(dense, tmp_path / "x", base_model="org/tiny", prefill_density=prefill_density)
    with pytest.raises(ValueError, match="decode_density given, but the model has no decode gates"):
        save_adapter(decode_model(None), tmp_path / "x", base_model="org/tiny", decode_density=decode_density)
    with pytest.raises(ValueError, match="density must be in"):
        MeasuredDensity(density=0.0, data="x")
    assert not (tmp_path / "x").exists()


def test_gate_features_need_prefill_gates():
    tokens = jnp.asarray(random_tokens(0, 1, 20))
    with pytest.raises(ValueError, match="no prefill gates"):
        decode_only().forward(tokens, collect=("gate_logits",))
    assert jax.tree.leaves(nnx.state(decode_only(), nnx.All(GateParam, nnx.Not(DECODE_GATE_PARAMS)))) == []
