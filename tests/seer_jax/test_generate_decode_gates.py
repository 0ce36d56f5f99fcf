"""Decode gates in the pipeline and the generation CLI: a prefill adapter and a decode adapter loaded together
(`--gates` + `--decode-gates`), decode-only adapters, `--decode-selection`, a recorded decode allocation (used by
default and by a given budget), and the block selections reported (the adapter's defaults, the recorded measured
density, or the ones given)."""

import dataclasses
import shutil

import pytest
from flax import nnx

from seer_jax.adapters import DEFAULT_SELECTION, MeasuredDensity, gate_tensors, record_selection, save_adapter
from seer_jax.checkpoint import load_model
from seer_jax.decode_config import DecodeAllocation, DecodeConfig
from seer_jax.generate.cli import main
from seer_jax.pipeline import describe_selection, load, parse_decode_selection, split_quest_weight
from seer_jax.seer import seer_from_base
from seer_jax.seer_config import SeerConfig
from tests.seer_jax.tiny_chat_model import TEXT, write_tiny_chat_model

# One worker runs this module under `pytest -n` (pyproject: --dist loadgroup), so its module fixtures build once.
pytestmark = pytest.mark.xdist_group("generate_decode_gates")

PROMPT = " ".join(TEXT) * 3  # > 192 tokens: several blocks of 64 (prefill) and 16 (decode)
DECODE = DecodeConfig(hidden_size=16, block_size=16, qk_norm=True, token_budget=16)
DENSITY = MeasuredDensity(density=0.45, data="test continuations")
# One layer (the tiny chat model's): the plumbing, not the shares.
ALLOCATION = DecodeAllocation(fractions=(0.1, 1.0), layer_fractions=((0.1,), (1.0,)), length=256, rule="recall")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """(model directory, prefill adapter saved from a dense-selecting model, decode-only adapter with a measured
    density, the two gated models)."""
    root = tmp_path_factory.mktemp("decode-gates")
    model_dir = write_tiny_chat_model(root / "tiny-chat", seed=2)
    base, _ = load_model(model_dir)
    prefill = seer_from_base(base, SeerConfig(), rngs=nnx.Rngs(0))
    save_adapter(prefill, root / "prefill", base_model=str(model_dir), weights="safetensors")
    decode = seer_from_base(base, SeerConfig(gate=None, decode=DECODE), rngs=nnx.Rngs(1))
    save_adapter(decode, root / "decode", base_model=str(model_dir), decode_density=DENSITY)
    return model_dir, root / "prefill", root / "decode", prefill, decode


def test_parse_decode_selection():
    assert parse_decode_selection("token_budget=256", DECODE) == dataclasses.replace(DECODE, token_budget=256)
    assert parse_decode_selection("threshold=0.004", DECODE) == dataclasses.replace(
        DECODE, method="threshold", threshold=0.004
    )
    assert parse_decode_selection("context_fraction=0.1,quest_weight=0.5", DECODE) == dataclasses.replace(
        DECODE, method="context_fraction", context_fraction=0.1, quest_weight=0.5
    )
    assert parse_decode_selection("quest_weight=0.25", DECODE) == dataclasses.replace(DECODE, quest_weight=0.25)
    bad = [
        ("nz_ratio=0.1", "token_budget=N or threshold=X"),
        ("token_budget=1.5", "not an integer"),
        ("token_budget=64,threshold=0.1", "one selection and/or quest_weight"),
        ("quest_weight=1,quest_weight=2", "one selection and/or quest_weight"),
        ("quest_weight=-1", "quest_weight must be"),
    ]
    for text, match in bad:
        with pytest.raises(ValueError, match=match):
            parse_decode_selection(text, DECODE)


def test_parse_decode_selection_keeps_the_allocation():
    """A budget (token or context fraction) keeps the adapter's decode allocation; a threshold drops it."""
    allocated = dataclasses.replace(DECODE, allocation=ALLOCATION)
    assert parse_decode_selection("context_fraction=0.2", allocated) == dataclasses.replace(
        allocated, method="context_fraction", context_fraction=0.2
    )
    assert parse_decode_selection("token_budget=64", allocated) == dataclasses.replace(allocated, token_budget=64)
    assert parse_decode_selection("threshold=0.01", allocated) == dataclasses.replace(
        DECODE, method="threshold", threshold=0.01
    )
    for text, match in [("context_fraction=x", "not a number"), ("context_fraction=0", "context_fraction must be in")]:
        with pytest.raises(ValueError, match=match):
            parse_decode_selection(text, allocated)


def test_describe_selection():
    assert describe_selection(SeerConfig(selection=DEFAULT_SELECTION)) == (
        "nz_ratio=0.3, last_block_dense",
        "dense (no decode gates)",
    )
    decode = dataclasses.replace(DECODE, method="threshold", threshold=0.01, force_sink=False, start_layer=2)
    assert describe_selection(SeerConfig(gate=None, decode=decode)) == (
        "dense (no prefill gates)",
        "threshold=0.01, no sink block, dense below layer 2",
    )
    prefill = SeerConfig(selection=DEFAULT_SELECTION, quest_weight=0.25)
    assert describe_selection(prefill)[0] == "nz_ratio=0.3, last_block_dense, gate scores + 0.25 × quest scores"
    hybrid = dataclasses.replace(DECODE, token_budget=128, quest_weight=0.5)
    assert describe_selection(SeerConfig(gate=None, decode=hybrid))[1].endswith(", gate scores + 0.5 × Quest bound")


def test_load_prefill_and_decode_adapters_together(adapters):
    """The prefill adapter's default selection (DEFAULT_SELECTION: its model selected every block), the decode
    adapter's gates with a given budget; the description says which is which."""
    model_dir, prefill_dir, decode_dir, prefill, decode = adapters
    generator = load(gates=prefill_dir, decode_gates=decode_dir, decode_selection="token_budget=32")
    seer_config = generator.model.seer_config
    assert seer_config.selection == DEFAULT_SELECTION and seer_config.gate == prefill.seer_config.gate
    assert seer_config.decode == dataclasses.replace(DECODE, token_budget=32)
    assert gate_tensors(generator.model).keys() == gate_tensors(prefill).keys() | gate_tensors(decode).keys()
    assert generator.gates_description == (
        "prefill nz_ratio=0.3, last_block_dense (the adapter's default); "
        "decode token_budget=32 (2 blocks of 16) (given)"
    )
    result = generator.run([PROMPT], max_new_tokens=3)
    # 270 tokens, 5 query blocks: TopK keeps k = max(1, int((1 − √0.7) · 5)) = 1 block per row plus the diagonal, the
    # last two rows dense: 1 + 2 + 2 + 4 + 5 of the 15 causal blocks (every head alike).
    assert result.stats.prompt_tokens == 270 and result.stats.density == pytest.approx(14 / 15)
    only_decode = load(model_dir, decode_gates=decode_dir)
    assert only_decode.model.seer_config == SeerConfig(gate=None, decode=DECODE)
    assert only_decode.gates_description == (
        "prefill dense (no prefill gates); decode token_budget=16 (1 block of 16) (the adapter's default; "
        "density 0.450 measured on test continuations)"
    )
    with pytest.raises(ValueError, match="a decode selection needs decode gates; these gates are prefill gates"):
        load(gates=prefill_dir, decode_selection="token_budget=8")
    with pytest.raises(ValueError, match="no prefill gates \\(decode gates only\\)"):
        load(gates=decode_dir, selection="nz_ratio=0.5")


def test_prefill_quest_weight_at_load(adapters):
    """--selection quest_weight=W sets the prefill gates' quest weight and keeps the adapter's selection, or comes
    with one; the description says so; decode-only gates refuse it."""
    _, prefill_dir, decode_dir, _, _ = adapters
    weighted = load(gates=prefill_dir, selection="quest_weight=0.25")
    assert weighted.model.seer_config.quest_weight == 0.25
    assert weighted.model.seer_config.selection == DEFAULT_SELECTION
    assert "gate scores + 0.25 × quest scores (given)" in weighted.gates_description
    both = load(gates=prefill_dir, selection="threshold=0.02, quest_weight=0.5")
    assert both.model.seer_config.quest_weight == 0.5 and both.model.seer_config.selection.threshold == 0.02
    assert load(gates=prefill_dir, selection="nz_ratio=0.2").model.seer_config.quest_weight == 0.0
    with pytest.raises(ValueError, match="no prefill gates: a prefill quest_weight"):
        load(gates=decode_dir, selection="quest_weight=0.5")
    for text, match in [
        ("quest_weight=x", "'x' is not a number"),
        ("quest_weight=1,quest_weight=2", "one selection and/or quest_weight"),
        ("nz_ratio=0.1,threshold=0.1", "one selection and/or quest_weight"),
    ]:
        with pytest.raises(ValueError, match=match):
            split_quest_weight(text)
    assert split_quest_weight("budget=0.1") == ("budget=0.1", None)


def test_recorded_decode_allocation_is_the_default(adapters, tmp_path, capsys):
    """An adapter recording a decode allocation decodes with it by default and under a given budget; the selection
    logged names it; `--decode-selection context_fraction=F` generates."""
    model_dir, _, decode_dir, _, _ = adapters
    allocated_dir = tmp_path / "allocated"
    shutil.copytree(decode_dir, allocated_dir)
    record_selection(allocated_dir, decode=dataclasses.replace(DECODE, allocation=ALLOCATION))
    assert load(model_dir, decode_gates=allocated_dir).model.seer_config.decode.allocation == ALLOCATION
    generator = load(model_dir, decode_gates=allocated_dir, decode_selection="context_fraction=0.2")
    assert generator.model.seer_config.decode == dataclasses.replace(
        DECODE, method="context_fraction", context_fraction=0.2, allocation=ALLOCATION
    )
    assert generator.gates_description == (
        "prefill dense (no prefill gates); decode context_fraction=0.2 shared among layers by a recall allocation "
        "(calibrated at 256 tokens) (given)"
    )
    main(["--model", str(model_dir), "--decode-gates", str(allocated_dir), "--prompt", PROMPT, "--max-new-tokens", "3"])
    assert "shared among layers by a recall allocation" in capsys.readouterr().err


def test_cli_full_budget_and_every_block_equal_dense(adapters, capsys):
    """`--gates` + `--decode-gates` with every prefill block and a budget covering the context: the dense text; the
    selections are logged."""
    model_dir, prefill_dir, decode_dir, _, _ = adapters
    options = ("--prompt", PROMPT, "--max-new-tokens", "6")
    main(["--model", str(model_dir), *options])
    dense = capsys.readouterr().out
    main(
        [
            "--gates",
            str(prefill_dir),
            "--selection",
            "nz_ratio=1.0",
            "--decode-gates",
            str(decode_dir),
            "--decode-selection",
            "token_budget=100000",
            *options,
        ]
    )
    captured = capsys.readouterr()
    assert captured.out == dense
    assert (
        "block selection: prefill nz_ratio=1.0, last_block_dense (every block) (given); "
        "decode token_budget=100000 (6250 blocks of 16) (given)" in captured.err
    )
    with pytest.raises(SystemExit, match="--decode-selection needs --gates or --decode-gates"):
        main(["--model", str(model_dir), "--decode-selection", "token_budget=64", "--prompt", "x"])
