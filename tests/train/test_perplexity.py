"""Perplexity vs. density: the protocol against an independent NLL, sparse-equals-dense at nz_ratio 1, TopK densities,
budget rows at their densities, the output files, the CLI, config checks, and (testbed) dense PPL against Hugging
Face torch."""

import dataclasses
import gzip
import json
import math
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer

from seer_jax.adapters import attach_gates, read_adapter, save_adapter
from seer_jax.calibration import budget_for_density
from seer_jax.checkpoint import load_model
from seer_jax.gate import GateConfig, GateParam
from seer_jax.seer import SeerCausalLM, SeerConfig, seer_with_abstract_gates
from seer_jax.sparsity import topk_per_row
from tests.seer_jax.test_adapters import bad_adapters
from tests.seer_jax.tiny_models import random_module
from train.eval_ppl import main
from train.perplexity import EvalConfig, evaluate
from train.ppl_results import JSON_FILE, MARKDOWN_FILE, PLOT_FILE, EvalResult, PplRow
from train.token_corpus import load_tokenizer

# One worker runs this module under `pytest -n` (pyproject: --dist loadgroup), so its module fixtures build once.
pytestmark = pytest.mark.xdist_group("perplexity")

LENGTH = 512  # J = 8 key blocks
NUM_DOCS = 2
SPARSE_METHODS = ("gate", "oracle", "quest", "streaming", "random")
TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    # A large init makes attention peaked, so which blocks are kept matters.
    initializer_range=0.3,
)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, stdlib_texts) -> Path:
    """Seven real sources, the 2nd to 4th too short for LENGTH tokens."""
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for _, text in stdlib_texts[:7]))
    return path


def write_tiny_llama(directory: Path, tokenizer_dir: Path) -> Path:
    """A tiny random Llama (TINY_LLAMA, seed 0) in Hugging Face format whose vocabulary is the test tokenizer's."""
    tokenizer = load_tokenizer(tokenizer_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_LLAMA,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("model"), tokenizer_dir)


@pytest.fixture(scope="module")
def gates_dir(tmp_path_factory, model_dir) -> Path:
    """An adapter with random single-linear gates (drawn from NumPy: no random-init compiles)."""
    base, model_config = load_model(model_dir)
    seer_config = SeerConfig(gate=GateConfig(hidden_size=model_config.head_dim))
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
        lengths=(LENGTH,),
        num_docs=NUM_DOCS,
        nz_ratios=(1.0, 0.5),
        thresholds=(0.05,),
        start_layer=1,
        batch_size=NUM_DOCS,
        dtype="float32",  # the same numerics on a GPU
        attention="xla",
    )


@pytest.fixture(scope="module")
def result(config):
    return evaluate(config)


def _row(result, method, target=None):
    return next(row for row in result.rows if row.method == method and row.target == target)


def test_dense_ppl_is_exp_of_an_independent_mean_nll(result, model_dir, tokenizer_dir, stdlib_texts):
    """BOS + text of the first documents holding LENGTH tokens; NLL from NumPy's log-softmax of the model's logits."""
    tokenizer = load_tokenizer(tokenizer_dir)
    encoded = [[tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)] for _, text in stdlib_texts]
    windows = np.asarray([ids[:LENGTH] for ids in encoded[:7] if len(ids) >= LENGTH][:NUM_DOCS], np.int32)
    model, _ = load_model(model_dir)
    logits = np.asarray(nnx.jit(lambda m, t: m(t)[0])(model, windows), np.float64)[:, :-1]  # [B, T-1, V]
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    doc_nll = -np.take_along_axis(log_probs, windows[:, 1:, None], axis=-1)[..., 0].mean(-1)  # [B]

    dense = _row(result, "dense")
    assert result.num_docs == {LENGTH: NUM_DOCS}
    np.testing.assert_allclose(dense.doc_nll, doc_nll, rtol=1e-5)
    assert dense.ppl == pytest.approx(math.exp(doc_nll.mean()), rel=1e-5)
    assert dense.density == 1.0


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_nz_ratio_one_equals_dense(result, method):
    """Block-sparse attention over every causal block; one forward serves all methods (none consults its source)."""
    row, dense = _row(result, method, 1.0), _row(result, "dense")
    np.testing.assert_allclose(row.doc_nll, dense.doc_nll, rtol=1e-5)
    # the block-sparse path ran (its kernel is reported), not the dense model; its NLLs may equal dense's bit for bit
    assert result.environment["block_sparse_attention"] == {str(LENGTH): "reference"}
    assert row.doc_nll == _row(result, "oracle", 1.0).doc_nll
    assert row.density == 1.0 and row.layer_density == (1.0, 1.0)


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_topk_density_is_the_expected_count(result, method):
    """k blocks per row (fewer in the first rows), plus the forced diagonal when TopK missed it; streaming keeps the
    sink and the k − 1 blocks ending at the diagonal, so exactly k. Layer 0 is below start_layer: dense."""
    num_blocks = LENGTH // 64
    k = topk_per_row(0.5, num_blocks)
    causal = num_blocks * (num_blocks + 1) / 2
    fewest = sum(min(i + 1, k) for i in range(num_blocks)) / causal
    most = sum(min(i + 1, k + 1) for i in range(num_blocks)) / causal
    row = _row(result, method, 0.5)
    assert row.layer_density[0] == 1.0
    assert row.density == row.layer_density[1]  # the mean over sparse layers only
    if method == "streaming":
        assert row.density == pytest.approx(fewest, abs=1e-6)
    else:
        assert fewest - 1e-6 <= row.density <= most + 1e-6
    assert row.ppl != _row(result, "dense").ppl


def test_gate_threshold_reports_what_it_selected(result):
    row = _row(result, "gate", 0.05)
    assert row.sparsity == "threshold"
    assert 0 < row.density < 1
    assert row.layer_density[0] == 1.0


def test_quest_weights_run_the_gate_rows_once_per_weight(config, result):
    """--quest-weights 0 0.5: the gate rows twice, "gate" (the same as without the flag: the adapter records no
    weight) and "gate+0.5quest"; nz_ratio 1 still equals dense; at 0.5 about the same block counts (TopK) but another
    selection, and a threshold selects from the weighted scores (another density)."""
    both = evaluate(dataclasses.replace(config, methods=("dense", "gate"), quest_weights=(0.0, 0.5)))
    for target in (1.0, 0.5, 0.05):
        assert _row(both, "gate", target).doc_nll == _row(result, "gate", target).doc_nll
    hybrid = _row(both, "gate+0.5quest", 1.0)
    np.testing.assert_allclose(hybrid.doc_nll, _row(both, "dense").doc_nll, rtol=1e-5)
    topk, plain = _row(both, "gate+0.5quest", 0.5), _row(both, "gate", 0.5)
    # TopK keeps k blocks per row either way (plus the diagonal when its top-k missed it): nearly the same density
    assert topk.density == pytest.approx(plain.density, abs=0.02) and topk.doc_nll != plain.doc_nll
    assert _row(both, "gate+0.5quest", 0.05).density != _row(both, "gate", 0.05).density
    assert "| gate+0.5quest | nz 0.5 |" in both.to_markdown() and both.config["quest_weights"] == [0.0, 0.5]


def test_outputs(result, tmp_path):
    paths = result.write(tmp_path / "out")
    saved = json.loads(paths["json"].read_text())
    assert len(saved["rows"]) == len(result.rows) == 1 + 2 * len(SPARSE_METHODS) + 1
    assert saved["config"]["methods"] == ["dense", *SPARSE_METHODS] and saved["config"]["start_layer"] == 1
    assert saved["environment"]["device"]["platform"] == jax.default_backend()
    assert saved["rows"][0]["ppl"] == pytest.approx(result.rows[0].ppl)
    table = paths["markdown"].read_text()
    assert table == result.to_markdown()
    assert "| gate | threshold 0.05 |" in table and "| random | nz 0.5 |" in table
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["plot"].stat().st_size > 10_000


def test_cli(model_dir, data_file, tmp_path, capsys):
    """Three documents in batches of two (a smaller last batch); no gates, so "gate" is skipped."""
    out = tmp_path / "out"
    flags = ["--lengths", "256", "--num-docs", "3", "--batch-size", "2", "--dtype", "float32", "--attention", "xla"]
    flags += ["--methods", "dense", "streaming", "--nz-ratios", "0.5"]
    main(["--model", str(model_dir), "--data", str(data_file), *flags, "--out", str(out)])
    saved = json.loads((out / JSON_FILE).read_text())
    assert [(row["method"], len(row["doc_nll"])) for row in saved["rows"]] == [("dense", 3), ("streaming", 3)]
    assert (out / MARKDOWN_FILE).read_text() in capsys.readouterr().out
    assert (out / PLOT_FILE).stat().st_size > 0


def test_cli_reports_bad_flags(model_dir, data_file, tmp_path):
    with pytest.raises(SystemExit, match="nz_ratios"):
        main(["--model", str(model_dir), "--data", str(data_file), "--nz-ratios", "1.5", "--out", str(tmp_path)])


def test_dtype_and_attention_default_to_the_device(model_dir, data_file):
    config = EvalConfig(model=model_dir, data=(data_file,))
    on_gpu = jax.default_backend() == "gpu"
    assert (config.dtype, config.attention) == (("bfloat16", "cudnn") if on_gpu else ("float32", "xla"))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(model=Path("/nonexistent")), "model"),
        (dict(data=()), "data"),
        (dict(gates=Path("/nonexistent")), "gates"),
        (dict(lengths=(1,)), "lengths"),
        (dict(lengths=(256, 256)), "lengths"),
        (dict(num_docs=0), "num_docs"),
        (dict(nz_ratios=(0.0,)), "nz_ratios"),
        (dict(nz_ratios=()), "nz_ratios"),
        (dict(thresholds=(1.0,)), "thresholds"),
        (dict(gates=None, thresholds=(0.1,)), "thresholds"),
        (dict(methods=("dense", "sliding")), "methods"),
        (dict(methods=("gate",), gates=None), "methods"),
        (dict(start_layer=-1), "start_layer"),
        (dict(batch_size=0), "batch_size"),
        (dict(dtype="float16"), "dtype"),
        (dict(attention="flash"), "attention"),
        (dict(attention="cudnn", dtype="float32"), "attention"),
        (dict(quest_weights=(0.5, 0.5)), "quest_weights: need distinct"),
        (dict(quest_weights=(-1.0,)), "quest_weights: need distinct weights >= 0"),
        (dict(quest_weights=(0.5,), methods=("dense", "quest")), "quest_weights: apply to the 'gate' rows"),
    ],
)
def test_config_errors_name_the_field(config, change, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(config, **change)


@pytest.mark.parametrize(("change", "message"), [(dict(lengths=(2048,)), "max_position_embeddings")])
def test_evaluate_rejects_what_the_model_cannot_run(config, change, message):
    with pytest.raises(ValueError, match=message):
        evaluate(dataclasses.replace(config, **change))


@pytest.mark.testbed
def test_testbed_dense_ppl_matches_hugging_face(testbed_dir, tmp_path):
    """First 4 documents of eval_stdlib holding 1024 tokens (BOS + text), float32: our PPL equals HF torch's."""
    hf_dir, length, num_docs = testbed_dir / "seer-tiny-llama", 1024, 4
    # Every eval_stdlib document holds over 1024 tokens, so its first lines are the first documents that qualify;
    # copying them spares tokenizing the whole file.
    data = tmp_path / "eval_stdlib_head.jsonl"
    with gzip.open(testbed_dir / "data" / "eval_stdlib.jsonl.gz", "rt") as lines:
        data.write_text("".join(next(lines) for _ in range(num_docs)))
    config = EvalConfig(
        model=hf_dir,
        data=(data,),
        lengths=(length,),
        num_docs=num_docs,
        methods=("dense",),
        dtype="float32",
        attention="xla",
    )
    ours = evaluate(config).rows[0]

    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    bos = json.loads((hf_dir / "config.json").read_text())["bos_token_id"]
    windows = []
    with open(data) as lines:
        for line in lines:
            ids = [bos, *tokenizer.encode(json.loads(line)["text"]).ids]
            if len(ids) >= length:
                windows.append(ids[:length])
            if len(windows) == num_docs:
                break
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        tokens = torch.tensor(windows)
        logits = model(input_ids=tokens).logits[:, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(-1)
    reference = math.exp(float(nll.mean()))
    assert ours.ppl == pytest.approx(reference, rel=1e-3)
    np.testing.assert_allclose(ours.doc_nll, nll.numpy(), rtol=1e-3)


def test_a_non_finite_loss_stops_the_evaluation_naming_the_forward(model_dir, data_file, tmp_path, capsys):
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    for file in model_dir.iterdir():
        (poisoned / file.name).write_bytes(file.read_bytes())
    weights = safetensors.numpy.load_file(poisoned / "model.safetensors")
    weights["model.norm.weight"][:] = np.nan
    safetensors.numpy.save_file(weights, poisoned / "model.safetensors", metadata={"format": "pt"})
    args = ["--model", poisoned, "--data", data_file, "--lengths", LENGTH, "--num-docs", NUM_DOCS]
    args += ["--methods", "dense", "--dtype", "float32", "--attention", "xla", "--out", tmp_path / "out"]
    with pytest.raises(SystemExit) as raised:
        main([str(arg) for arg in args])
    message = raised.value.code
    assert isinstance(message, str) and "\n" not in message, message
    assert f"forward L={LENGTH} dense [1/1]" in message and "NaN/inf" in message, message
    assert not (tmp_path / "out").exists()


def test_bad_adapter_files_exit_with_one_line(model_dir, data_file, tmp_path):
    for name, (directory, match) in bad_adapters(tmp_path / "adapters").items():
        args = ["--model", model_dir, "--gates", directory, "--data", data_file, "--lengths", LENGTH]
        args += ["--methods", "gate", "--dtype", "float32", "--attention", "xla", "--out", tmp_path / "out"]
        with pytest.raises(SystemExit) as raised:
            main([str(arg) for arg in args])
        message = raised.value.code
        assert isinstance(message, str) and "\n" not in message and re.search(match, message), (name, message)


def test_gates_on_another_base_are_refused_unless_allowed(model_dir, gates_dir, data_file, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for file in model_dir.iterdir():
        (other / file.name).write_bytes(file.read_bytes())
    weights = safetensors.numpy.load_file(other / "model.safetensors")
    weights["model.layers.0.self_attn.k_proj.weight"] *= 2.0  # another checkpoint of the same architecture
    safetensors.numpy.save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    args = ["--model", other, "--gates", gates_dir, "--data", data_file, "--lengths", LENGTH, "--num-docs", 1]
    args += ["--methods", "gate", "--nz-ratios", "0.5", "--dtype", "float32", "--attention", "xla"]
    with pytest.raises(SystemExit) as raised:
        main([str(arg) for arg in [*args, "--out", tmp_path / "refused"]])
    message = raised.value.code
    assert isinstance(message, str) and "\n" not in message, message
    assert f"the gate adapter {gates_dir} was trained on another base model: the weights differ" in message
    main([str(arg) for arg in [*args, "--out", tmp_path / "allowed", "--allow-other-base"]])
    assert (tmp_path / "allowed" / JSON_FILE).is_file()


def test_table_flags_rows_that_cannot_reach_their_nz_ratio():
    """A TopK row denser than its nz_ratio by more than the margin (StreamingLLM's floor) is marked, others not."""

    def row(method, sparsity, target, density):
        return PplRow(
            method=method,
            sparsity=sparsity,
            target=target,
            length=1024,
            doc_nll=(3.0,),
            density=density,
            layer_density=(density,),
            seconds=1.0,
        )

    rows = (
        row("dense", "dense", None, 1.0),
        row("streaming", "nz_ratio", 0.1, 0.228),
        row("gate", "nz_ratio", 0.1, 0.12),
    )
    assert [r.misses_target for r in rows] == [False, True, False]
    table = EvalResult(rows=rows, config={"dtype": "float32"}, environment={}, num_docs={1024: 1}, title="t")
    lines = table.to_markdown().splitlines()
    assert "0.228 ↑" in next(line for line in lines if line.startswith("| streaming"))
    assert "↑" not in next(line for line in lines if line.startswith("| gate"))
    assert any(line.startswith("↑ the method cannot reach") for line in lines)


@pytest.fixture(scope="module")
def budget_gates_dir(tmp_path_factory, model_dir, gates_dir, data_file) -> Path:
    """`gates_dir`'s gates with layer 0 dense and a budget allocation calibrated on the evaluation windows."""
    base, _ = load_model(model_dir)
    adapter = read_adapter(gates_dir)
    seer = attach_gates(
        base, dataclasses.replace(adapter, seer_config=dataclasses.replace(adapter.seer_config, start_layer=1))
    )
    tokens = evaluate_windows(model_dir, data_file)
    directory = tmp_path_factory.mktemp("budget") / "gates"
    selection = budget_for_density(seer, jax.numpy.asarray(tokens), density=0.3)
    save_adapter(seer, directory, base_model=str(model_dir), weights="safetensors", selection=selection)
    return directory


def evaluate_windows(model_dir: Path, data_file: Path) -> np.ndarray:
    """The evaluation's windows ([NUM_DOCS, LENGTH]: BOS + text of the first documents that long)."""
    tokenizer = load_tokenizer(model_dir)
    texts = [json.loads(line)["text"] for line in data_file.read_text().splitlines()]
    encoded = [[tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)] for text in texts]
    return np.asarray([ids[:LENGTH] for ids in encoded if len(ids) >= LENGTH][:NUM_DOCS], np.int32)


def test_gate_budget_rows_reach_their_densities(config, budget_gates_dir, gates_dir):
    """Budget rows (gate only) share each density by the adapter's allocation and reach it within one block per
    document (the only sparse layer's share is the whole budget); an adapter without an allocation is an error."""
    budgets = (0.3, 0.6)
    budget_config = dataclasses.replace(
        config,
        gates=budget_gates_dir,
        methods=("dense", "gate"),
        nz_ratios=(),
        thresholds=(),
        budgets=budgets,
        start_layer=None,
    )
    result = evaluate(budget_config)
    one_block = 1 / (TINY_LLAMA["num_attention_heads"] * 8 * 9 // 2)  # of one document's causal blocks
    for budget in budgets:
        row = _row(result, "gate", budget)
        assert row.sparsity == "budget" and row.setting == f"budget {budget:g}"
        assert row.layer_density[0] == 1.0 and row.density == row.layer_density[1]
        assert budget - one_block < row.density <= budget + 1e-6
        assert row.ppl != _row(result, "dense").ppl
    assert "| gate | budget 0.3 |" in result.to_markdown()
    with pytest.raises(ValueError, match="records no budget allocation"):
        evaluate(dataclasses.replace(budget_config, gates=gates_dir))
    for change in (dict(budgets=(0.0,)), dict(gates=None, methods=None, budgets=(0.1,))):
        with pytest.raises(ValueError, match="budgets"):
            dataclasses.replace(budget_config, **change)


def test_force_sink_keeps_block_zero_in_every_sparse_row(config, result, tmp_path):
    """StreamingLLM keeps the sink already: its row is unchanged. The gate's TopK gains the sink on top of its
    blocks: denser, and a different PPL. The caption says so; decode mode refuses the prefill flag."""
    with_sink = evaluate(
        dataclasses.replace(config, methods=("streaming", "gate"), nz_ratios=(0.5,), thresholds=(), force_sink=True)
    )
    streaming, gate = _row(with_sink, "streaming", 0.5), _row(with_sink, "gate", 0.5)
    np.testing.assert_allclose(streaming.doc_nll, _row(result, "streaming", 0.5).doc_nll, rtol=1e-6)
    assert streaming.density == _row(result, "streaming", 0.5).density
    assert gate.density > _row(result, "gate", 0.5).density and gate.ppl != _row(result, "gate", 0.5).ppl
    assert "the sink block kept in every row" in with_sink.to_markdown()
    with pytest.raises(ValueError, match="force_sink"):
        dataclasses.replace(config, mode="decode", lengths=(LENGTH,), continuation=64, force_sink=True)
