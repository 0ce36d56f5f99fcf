"""Decode-mode perplexity: teacher-forced decoding equals token-by-token sparse generation (with a per-layer decode
allocation too); the evaluation's dense row against an independent full-forward NLL, covering budgets against dense,
the block accounting, prefill gates + decode gates as a row, the gate rows under a calibrated or recorded allocation,
the outputs, the CLI (and its fast `--help`), config checks."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seer_jax.adapters import read_adapter, record_selection, save_adapter
from seer_jax.attention import IMPLEMENTATIONS
from seer_jax.checkpoint import load_model
from seer_jax.decode_config import DecodeAllocation, DecodeConfig
from seer_jax.gate import GateConfig, GateParam
from seer_jax.generate import decode_step, generate, prefill
from seer_jax.seer import SeerCausalLM, seer_with_abstract_gates
from seer_jax.seer_config import SeerConfig
from seer_jax.sparsity import Selection
from tests.seer_jax.decode_models import DECODE_BLOCK, base_model, decode_model, padded_batch, with_decode
from tests.seer_jax.test_sparse_decode import expected_density
from tests.seer_jax.tiny_models import random_module
from tests.train.test_perplexity import write_tiny_llama
from train import eval_ppl
from train.decode_perplexity import DEFAULT_BUDGETS, DecodeBudget, teacher_forced_log_probs
from train.perplexity import DECODE_ALLOCATIONS, DTYPES, METHODS, MODES, EvalConfig, evaluate
from train.ppl_results import JSON_FILE, MARKDOWN_FILE, PLOT_FILE
from train.token_corpus import load_tokenizer

# One worker runs this module under `pytest -n` (pyproject: --dist loadgroup), so its module fixtures build once.
pytestmark = pytest.mark.xdist_group("decode_ppl")

PROMPT, NEW = 40, 30  # rows of 40 and 27 real tokens (left padding); 30 new tokens cross two 16-token blocks
LENGTH, CONTINUATION, CHUNK = 320, 128, 64  # decode steps see 192 … 319 tokens: 3 to 5 blocks of 64
NUM_DOCS = 2


def token_by_token(model, tokens, mask, generated) -> np.ndarray:
    """Log-softmax f32 [B, n − 1, V] of each decode step of generation's own loop (`prefill`, then `decode_step`
    feeding the generated tokens one by one)."""
    _, cache = prefill(model, tokens, mask, max_length=tokens.shape[1] + generated.shape[1] - 1)
    steps = []
    for i in range(generated.shape[1] - 1):
        logits, cache = decode_step(model, jnp.asarray(generated[:, i]), cache)
        steps.append(np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)))
    return np.stack(steps, axis=1)


# Layer 1's share of a 16-token budget at 16 / 160 = 0.1 is twice the mean: two blocks instead of one.
DOUBLED = DecodeAllocation(fractions=(0.1, 1.0), layer_fractions=((1.0, 0.2), (1.0, 1.0)), length=160)


@pytest.mark.parametrize(
    ("changes", "chosen"),
    [
        (dict(source="gate"), 1),
        (dict(source="quest"), 1),
        (dict(source="random"), 1),
        (dict(source="gate", allocation=DOUBLED), 2),
        (dict(source="gate", quest_weight=0.5), 1),
    ],
    ids=["gate", "quest", "random", "gate-allocated", "gate+quest"],
)
def test_teacher_forced_decoding_is_token_by_token_sparse_generation(changes, chosen):
    """Greedy sparse generation (one block by top-k, or layer 1's share of it under an allocation; no sink; layer 1
    sparse, per kv head or, quest, per query head; a left-padded ragged batch), then its tokens teacher-forced in
    chunks: each step's log-probabilities are those of generation's own decode steps, whose argmax are the generated
    tokens; layer 1 attends its `chosen` blocks plus the current one at every step."""
    decode = with_decode(token_budget=DECODE_BLOCK, force_sink=False, start_layer=1, **changes)
    model = decode_model(decode)
    tokens, mask = padded_batch(PROMPT)
    generated = np.asarray(generate(model, tokens, mask, max_new_tokens=NEW, eos_token_id=()))
    dense = np.asarray(generate(base_model(), tokens, mask, max_new_tokens=NEW, eos_token_id=()))
    assert (generated != dense).any()  # the selection changes what is generated

    steps = token_by_token(model, tokens, mask, generated)  # [B, NEW − 1, V]
    np.testing.assert_array_equal(steps.argmax(-1), generated[:, 1:])
    fed, targets = jnp.asarray(generated[:, :-1]), jnp.asarray(generated[:, 1:])
    ours, blocks = teacher_forced_log_probs(model, tokens, mask, fed, targets, chunk=8)
    expected = np.take_along_axis(steps, generated[:, 1:, None], axis=-1)[..., 0]  # [B, NEW − 1]
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)
    density = np.asarray(blocks[:, 0] / blocks[:, 1])
    assert density[0] == 1.0  # layer 0 dense
    assert density[1] == pytest.approx(expected_density(np.asarray([PROMPT, PROMPT - 13]), NEW, chosen), rel=1e-6)


@pytest.mark.parametrize("source", ["oracle", "streaming"])
def test_budget_covering_the_context_decodes_as_dense(source):
    tokens, mask = padded_batch(PROMPT)
    generated = np.asarray(generate(base_model(), tokens, mask, max_new_tokens=12, eos_token_id=()))
    fed, targets = jnp.asarray(generated[:, :-1]), jnp.asarray(generated[:, 1:])
    dense, _ = teacher_forced_log_probs(base_model(), tokens, mask, fed, targets)
    model = decode_model(with_decode(source=source, method="context_fraction", context_fraction=1.0))
    ours, blocks = teacher_forced_log_probs(model, tokens, mask, fed, targets)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(dense), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(blocks[:, 0]), np.asarray(blocks[:, 1]))


@pytest.mark.parametrize(
    ("text", "budget", "label"),
    [
        ("256", DecodeBudget(tokens=256), "256"),
        ("5%", DecodeBudget(fraction=0.05), "5%"),
        ("12.5%", DecodeBudget(fraction=0.125), "12.5%"),
        ("100%", DecodeBudget(fraction=1.0), "100%"),
    ],
)
def test_budgets_parse(text, budget, label):
    assert DecodeBudget.parse(text) == budget and str(budget) == label


@pytest.mark.parametrize("text", ["", "0%", "150%", "ten", "-5", "5 %", "1e3"])
def test_bad_budgets_are_refused(text):
    with pytest.raises(ValueError, match="decode budget"):
        DecodeBudget.parse(text)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, stdlib_texts) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for _, text in stdlib_texts[:6]))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random Llama (GQA 4/2, head_dim 16) in Hugging Face format with the test tokenizer's vocabulary."""
    return write_tiny_llama(tmp_path_factory.mktemp("model"), tokenizer_dir)


@pytest.fixture(scope="module")
def gates_dir(tmp_path_factory, model_dir) -> Path:
    """An adapter holding random prefill gates and random decode gates (Qproj, qk-norm, 64-token blocks)."""
    base, model_config = load_model(model_dir)
    seer_config = SeerConfig(
        gate=GateConfig(hidden_size=model_config.head_dim), decode=DecodeConfig(hidden_size=16, qk_norm=True)
    )
    drawn = random_module(lambda: SeerCausalLM(model_config, seer_config, rngs=nnx.Rngs(0)), 1, weight_std=0.3)
    seer = seer_with_abstract_gates(base, seer_config)
    nnx.update(seer, nnx.state(drawn, GateParam))
    directory = tmp_path_factory.mktemp("adapter") / "gates"
    save_adapter(seer, directory, base_model=str(model_dir), weights="safetensors")
    return directory


@pytest.fixture(scope="module")
def config(model_dir, gates_dir, data_file) -> EvalConfig:
    return EvalConfig(
        model=model_dir,
        data=(data_file,),
        gates=gates_dir,
        mode="decode",
        lengths=(LENGTH,),
        num_docs=NUM_DOCS,
        continuation=CONTINUATION,
        decode_budgets=(DecodeBudget(tokens=64), DecodeBudget(fraction=1.0)),
        decode_prefill=Selection(nz_ratio=0.5),
        decode_chunk=CHUNK,
        batch_size=NUM_DOCS,
        dtype="float32",
        attention="xla",
    )


@pytest.fixture(scope="module")
def result(config):
    return evaluate(config)


def _row(result, method, target=None, prefill="dense"):
    return next(r for r in result.rows if r.method == method and r.target == target and r.prefill == prefill)


def test_dense_row_is_the_full_forward_nll_of_the_continuation(result, model_dir, tokenizer_dir, stdlib_texts):
    """Dense decode mode scores the last C tokens of each window: the NLL one causal forward gives them (NumPy
    log-softmax)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    encoded = [[tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)] for _, text in stdlib_texts]
    windows = np.asarray([ids[:LENGTH] for ids in encoded[:6] if len(ids) >= LENGTH][:NUM_DOCS], np.int32)
    model, _ = load_model(model_dir)
    logits = np.asarray(nnx.jit(lambda m, t: m(t)[0])(model, windows), np.float64)[:, -CONTINUATION - 1 : -1]
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    doc_nll = -np.take_along_axis(log_probs, windows[:, -CONTINUATION:, None], axis=-1)[..., 0].mean(-1)
    dense = _row(result, "dense")
    np.testing.assert_allclose(dense.doc_nll, doc_nll, rtol=1e-5)
    assert dense.density == 1.0 and dense.sparsity == "dense" and dense.prefill_density is None
    assert result.num_docs == {LENGTH: NUM_DOCS} and result.mode == "decode"


@pytest.mark.parametrize("method", ["gate", "oracle", "quest", "streaming", "random"])
def test_budget_covering_the_context_equals_dense(result, method):
    row, dense = _row(result, method, 1.0), _row(result, "dense")
    assert row.sparsity == "context_fraction"
    np.testing.assert_allclose(row.doc_nll, dense.doc_nll, rtol=1e-5)
    assert row.density == 1.0 and row.layer_density == (1.0, 1.0)


@pytest.mark.parametrize("method", ["gate", "oracle", "quest", "streaming", "random"])
def test_one_block_budget_attends_three_blocks(result, method):
    """64 tokens = one block by top-k, plus the sink and the current block: 3 of the c + 1 blocks of every step
    (c = 2 … 4), in every head; the PPL moves."""
    steps = np.arange(CONTINUATION) + LENGTH - CONTINUATION  # real tokens at each step, the fed one included
    available = (steps - 1) // 64 + 1
    row = _row(result, method, 64.0)
    assert row.sparsity == "token_budget" and row.setting == "64 tokens"
    assert row.density == pytest.approx(3 * len(steps) / available.sum(), rel=1e-6)
    assert row.layer_density[0] == row.layer_density[1] == row.density
    assert row.ppl != _row(result, "dense").ppl


def test_prefill_gates_with_decode_gates(result):
    """The sparse-prefill rows: dense decoding after a block-sparse prefill differs from the dense model, and the
    gate's covering budget equals it; both report the prefill's density."""
    dense, sparse_prefill = _row(result, "dense"), _row(result, "dense", prefill="gate nz 0.5")
    assert sparse_prefill.ppl != dense.ppl and 0 < sparse_prefill.prefill_density < 1
    both = _row(result, "gate", 1.0, prefill="gate nz 0.5")
    np.testing.assert_allclose(both.doc_nll, sparse_prefill.doc_nll, rtol=1e-5)
    assert both.prefill_density == sparse_prefill.prefill_density
    assert _row(result, "gate", 64.0, prefill="gate nz 0.5").density < 1


def fraction_density(fraction: float) -> float:
    """A context fraction's decode density over the continuation's steps, with the sink and the current block
    forced (64-token blocks): per step of n tokens, min(floor(fraction · n / 64), c − 1) + 2 of c + 1 blocks."""
    tokens = np.arange(LENGTH - CONTINUATION, LENGTH)  # n at each step, the fed token included
    current = (tokens - 1) // 64
    count = np.floor(np.float32(fraction) * tokens.astype(np.float32) / 64).astype(int)
    return float(np.sum(np.minimum(count, current - 1) + 2) / np.sum(current + 1))


def test_gate_rows_share_the_budget_by_an_allocation(config, tmp_path):
    """--decode-allocation recall: calibrated on the prompts, recorded in the results; the gate row's label says so
    and each layer attends its own fraction; the same allocation recorded in the adapter (the default "adapter")
    gives the same row; the other sources keep a uniform budget."""
    budget = DecodeBudget(fraction=0.25)
    calibrated = dataclasses.replace(
        config, decode_allocation="recall", methods=("dense", "gate", "oracle"), decode_budgets=(budget,)
    )
    calibrated = dataclasses.replace(calibrated, decode_prefill=None)
    result = evaluate(calibrated)
    allocation = DecodeAllocation(**result.config["allocation"])
    assert allocation.rule == "recall" and allocation.length == LENGTH - CONTINUATION - 1
    shares = allocation.layer_fractions_at(0.25)
    assert np.mean(shares) == pytest.approx(0.25, abs=0.01)
    row = _row(result, "gate", 0.25)
    assert row.allocation == "recall allocation" and row.setting == "25% (recall allocation)"
    np.testing.assert_allclose(row.layer_density, [fraction_density(f) for f in shares], rtol=1e-6)
    assert row.layer_density[0] != row.layer_density[1]  # the (random) gates' shares differ by a few blocks
    oracle = _row(result, "oracle", 0.25)
    assert oracle.allocation is None and oracle.layer_density == (fraction_density(0.25),) * 2
    assert "| gate | 25% (recall allocation) | dense |" in result.to_markdown()

    recorded = tmp_path / "gates"
    shutil.copytree(config.gates, recorded)
    decode = read_adapter(recorded).seer_config.decode
    record_selection(recorded, decode=dataclasses.replace(decode, allocation=allocation))
    from_adapter = evaluate(dataclasses.replace(calibrated, gates=recorded, decode_allocation="adapter"))
    assert _row(from_adapter, "gate", 0.25) == dataclasses.replace(
        row, seconds=_row(from_adapter, "gate", 0.25).seconds
    )
    uniform = evaluate(dataclasses.replace(calibrated, gates=recorded, decode_allocation="none", methods=("gate",)))
    assert _row(uniform, "gate", 0.25).layer_density == (fraction_density(0.25),) * 2
    with pytest.raises(ValueError, match="calibrated with decode start_layer 0, not 1"):
        evaluate(dataclasses.replace(calibrated, gates=recorded, decode_allocation="adapter", start_layer=1))


def test_quest_weights_run_the_gate_rows_once_per_weight(config):
    """--decode-quest-weights 0 0.5: the gate rows twice, "gate" (the adapter's gate alone: the same rows as without
    the flag) and "gate+0.5quest", with and after the sparse prefill; the same block counts; the covering budget still
    equals dense decoding; Quest's bound changes the selection, and so the NLL, at one block."""
    both = evaluate(dataclasses.replace(config, methods=("dense", "gate"), decode_quest_weights=(0.0, 0.5)))
    plain = evaluate(dataclasses.replace(config, methods=("dense", "gate")))
    for label in ("dense", "gate nz 0.5"):
        for target in (64.0, 1.0):
            gate, hybrid = _row(both, "gate", target, label), _row(both, "gate+0.5quest", target, label)
            assert gate.doc_nll == _row(plain, "gate", target, label).doc_nll
            assert hybrid.layer_density == gate.layer_density
    np.testing.assert_allclose(_row(both, "gate+0.5quest", 1.0).doc_nll, _row(both, "dense").doc_nll, rtol=1e-5)
    assert _row(both, "gate+0.5quest", 64.0).doc_nll != _row(both, "gate", 64.0).doc_nll
    assert "| gate+0.5quest | 64 tokens | dense |" in both.to_markdown()
    assert both.config["decode_quest_weights"] == [0.0, 0.5]


def test_outputs(result, tmp_path):
    paths = result.write(tmp_path / "out")
    saved = json.loads(paths["json"].read_text())
    assert saved["mode"] == "decode" and saved["continuation"] == CONTINUATION
    assert len(saved["rows"]) == len(result.rows) == 1 + 5 * 2 + 1 + 2
    assert saved["config"]["decode_budgets"] == ["64", "100%"]
    assert saved["config"]["decode_prefill"]["nz_ratio"] == 0.5
    table = paths["markdown"].read_text()
    assert table == result.to_markdown()
    assert "| quest | 64 tokens | dense |" in table and "| gate | 100% | gate nz 0.5 (density " in table
    assert "decode density" in table
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["plot"].stat().st_size > 10_000


def test_cli_decode_mode(model_dir, data_file, tmp_path, capsys):
    """No gates: "gate" is skipped; three documents in batches of two; a fraction budget."""
    out = tmp_path / "out"
    flags = ["--mode", "decode", "--lengths", "256", "--continuation", "40", "--decode-chunk", "16"]
    flags += ["--decode-budgets", "10%", "--num-docs", "3", "--batch-size", "2", "--methods", "dense", "streaming"]
    flags += ["--dtype", "float32", "--attention", "xla"]
    eval_ppl.main(["--model", str(model_dir), "--data", str(data_file), *flags, "--out", str(out)])
    saved = json.loads((out / JSON_FILE).read_text())
    assert [(row["method"], row["sparsity"], len(row["doc_nll"])) for row in saved["rows"]] == [
        ("dense", "dense", 3),
        ("streaming", "context_fraction", 3),
    ]
    assert (out / MARKDOWN_FILE).read_text() in capsys.readouterr().out
    assert (out / PLOT_FILE).stat().st_size > 0


def test_gate_needs_decode_gates(config, model_dir, tmp_path):
    """An adapter without decode gates: asked for "gate", decode mode refuses."""
    base, model_config = load_model(model_dir)
    seer_config = SeerConfig(gate=GateConfig(hidden_size=model_config.head_dim))
    drawn = random_module(lambda: SeerCausalLM(model_config, seer_config, rngs=nnx.Rngs(0)), 1)
    seer = seer_with_abstract_gates(base, seer_config)
    nnx.update(seer, nnx.state(drawn, GateParam))
    save_adapter(seer, tmp_path / "prefill_only", base_model=str(model_dir), weights="safetensors")
    prefill_only = dataclasses.replace(config, gates=tmp_path / "prefill_only", methods=("gate",), decode_prefill=None)
    with pytest.raises(ValueError, match="decode gates"):
        evaluate(prefill_only)


def test_help_is_fast_and_shows_defaults():
    """`--help` imports no jax (it answers at once) and states the defaults; its choices are the library's."""
    code = "import sys, train.eval_ppl as m; print(m.build_parser().format_help()); print('jax' in sys.modules)"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shown.rstrip().endswith("False")
    assert "default: 256 512 1024 2048 5% 10% 25%" in " ".join(shown.split())
    assert "(default: 2048)" in shown and "(default: prefill)" in shown
    assert eval_ppl.METHOD_CHOICES == METHODS and eval_ppl.DTYPE_CHOICES == DTYPES
    assert eval_ppl.ATTENTION_CHOICES == IMPLEMENTATIONS and eval_ppl.MODE_CHOICES == MODES
    assert eval_ppl.DECODE_ALLOCATION_CHOICES == DECODE_ALLOCATIONS and "(default: adapter)" in shown
    assert tuple(DecodeBudget.parse(text) for text in eval_ppl.DEFAULT_DECODE_BUDGETS) == DEFAULT_BUDGETS


def test_decode_prefill_flag():
    assert eval_ppl.parse_selection("threshold=0.002") == Selection(method="threshold", threshold=0.002)
    assert eval_ppl.parse_selection("nz_ratio=0.1") == Selection(nz_ratio=0.1)
    for bad in ("nz=0.1", "threshold", "threshold=x", "nz_ratio=2"):
        with pytest.raises(ValueError):
            eval_ppl.parse_selection(bad)


def test_lengths_default_to_the_mode(model_dir, data_file):
    assert EvalConfig(model=model_dir, data=(data_file,)).lengths == (2048, 8192)
    assert EvalConfig(model=model_dir, data=(data_file,), mode="decode").lengths == (8192,)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(mode="generate"), "mode"),
        (dict(lengths=(129,)), "lengths"),
        (dict(continuation=0), "continuation"),
        (dict(thresholds=(0.1,)), "thresholds"),
        (dict(decode_budgets=(DecodeBudget(tokens=64), DecodeBudget(tokens=64))), "decode_budgets"),
        (dict(decode_budgets=()), "decode_budgets"),
        (dict(decode_budgets=("64",)), "decode_budgets"),
        (dict(gates=None, methods=("dense",)), "decode_prefill"),
        (dict(decode_chunk=0), "decode_chunk"),
        (dict(decode_allocation="uniform"), "decode_allocation: must be one of"),
        (dict(decode_allocation="recall", methods=("dense", "oracle")), "decode_allocation: 'recall' shares"),
        (dict(mode="prefill", decode_allocation="coverage", decode_prefill=None), "decode mode only"),
        (dict(decode_quest_weights=(0.5, 0.5)), "decode_quest_weights: need distinct"),
        (dict(decode_quest_weights=(-1.0,)), "decode_quest_weights: need distinct weights >= 0"),
        (dict(decode_quest_weights=(0.5,), methods=("dense", "quest")), "run the 'gate' method"),
        (dict(mode="prefill", decode_quest_weights=(0.5,), decode_prefill=None), "decode mode only"),
    ],
)
def test_decode_config_errors_name_the_field(config, change, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(config, **change)
