"""`python -m seer_jax.generate` end to end on a tiny chat model (random weights, a BPE tokenizer with a chat
template): greedy output equals `generate()`'s tokens decoded, gates at a dense selection equal dense, the summary
line, --chat, standard input, a batch file, fast --help, and one-line errors.

Compilation is most of the time here: the tests share the prompt and --max-new-tokens so that the compiled prefill
and decode step are reused (the jit cache lives as long as the test process).
"""

import io
import json
import re
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

from seer_jax.adapters import save_adapter
from seer_jax.checkpoint import load_model
from seer_jax.generate import generate
from seer_jax.generate.cli import main
from seer_jax.seer import seer_from_base
from seer_jax.seer_config import SeerConfig
from seer_jax.sparsity import Selection
from tests.conftest import REPO_ROOT
from tests.seer_jax.tiny_chat_model import EOS_ID, IM_END_ID, TEXT, write_tiny_chat_model

# One worker runs this module under `pytest -n` (pyproject: --dist loadgroup), so its module fixtures build once.
pytestmark = pytest.mark.xdist_group("generate_cli")

# Long enough for 4 blocks of 64 tokens, so that selection has blocks to drop.
PROMPT = " ".join(TEXT) * 3
NEW_TOKENS = "8"
SUMMARY = re.compile(
    r"^prompt tokens (\d+) \| time to first token [\d.]+ s \(compile [\d.]+ s\) \| decode [\d.]+ tokens/s "
    r"\((\d+) new tokens\) \| block density (dense|[\d.]+)$"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_chat_model(tmp_path_factory.mktemp("generate") / "tiny-chat")


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    """Random gates for the tiny model, selecting 30% of blocks by default; its base_model is the model directory."""
    base, _ = load_model(model_dir)
    selection = Selection(method="nz_ratio", nz_ratio=0.3)
    seer = seer_from_base(base, SeerConfig(selection=selection), rngs=nnx.Rngs(1))
    directory = tmp_path_factory.mktemp("gates") / "adapter"
    save_adapter(seer, directory, base_model=str(model_dir), weights="safetensors")
    return directory


def run_cli(capsys, *args) -> tuple[str, re.Match]:
    """Runs the CLI; returns its standard output and the summary line (the last line of standard error) matched."""
    main([str(arg) for arg in args])
    captured = capsys.readouterr()
    summary = SUMMARY.match(captured.err.strip().splitlines()[-1])
    assert summary, captured.err
    return captured.out, summary


def expected_text(model_dir, ids: list[int]) -> str:
    """`generate()`'s greedy tokens for one prompt, cut at the first EOS and decoded."""
    model, _ = load_model(model_dir)
    tokens = generate(model, jnp.asarray([ids]), max_new_tokens=int(NEW_TOKENS), eos_token_id=(EOS_ID, IM_END_ID))
    generated = np.asarray(tokens)[0].tolist()
    ends = [index for index, token in enumerate(generated) if token in (EOS_ID, IM_END_ID)]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return tokenizer.decode(generated[: ends[0] if ends else None], skip_special_tokens=True)


def test_greedy_output_equals_generate(model_dir, capsys):
    out, summary = run_cli(capsys, "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS)
    ids = AutoTokenizer.from_pretrained(str(model_dir))(PROMPT)["input_ids"]
    assert out == expected_text(model_dir, ids) + "\n"
    assert int(summary[1]) == len(ids) > 192 and summary[3] == "dense"
    assert 1 <= int(summary[2]) <= int(NEW_TOKENS)


def test_gates_at_a_dense_selection_equal_dense(model_dir, adapter_dir, capsys):
    """Without --model the adapter's base model is loaded; nz_ratio=1 computes every block (density 1.0) and gives
    the dense text. (The adapter's own sparse selection: test_pipeline.)"""
    options = ("--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS)
    dense, _ = run_cli(capsys, "--model", model_dir, *options)
    every_block, summary = run_cli(capsys, "--gates", adapter_dir, "--selection", "nz_ratio=1.0", *options)
    assert every_block == dense and float(summary[3]) == 1.0


def test_chat_template_from_stdin(model_dir, capsys, monkeypatch):
    """The prompt is read from standard input and wrapped in the tokenizer's chat template; the Python API gives the
    same text."""
    from seer_jax.pipeline import load

    question = "Write fibonacci in Python."
    monkeypatch.setattr(sys, "stdin", io.StringIO(question))
    out, summary = run_cli(capsys, "--model", model_dir, "--chat", "--max-new-tokens", NEW_TOKENS)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ids[:2] == [0, 3] and int(summary[1]) == len(ids)  # <|bos|><|im_start|>user …<|im_start|>assistant\n
    assert out == load(model_dir).generate(question, chat=True, max_new_tokens=int(NEW_TOKENS))[0] + "\n"


def test_prompts_file_batch(model_dir, tmp_path, capsys):
    """A JSON string or {"prompt": ...} per line (blank lines skipped); one JSON line per completion, each equal to
    generate()'s on the left-padded batch."""
    prompts = ["def fibonacci(n):", "The quick brown fox", "class Stack:\n    def push(self, item):"]
    lines = [json.dumps(prompts[0]), "", json.dumps({"prompt": prompts[1]}), json.dumps({"prompt": prompts[2]})]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    out, summary = run_cli(
        capsys, "--model", model_dir, "--prompts-file", tmp_path / "prompts.jsonl", "--max-new-tokens", NEW_TOKENS
    )
    records = sorted((json.loads(line) for line in out.splitlines()), key=lambda record: record["index"])
    assert [record["prompt"] for record in records] == prompts
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    encoded = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    assert int(summary[1]) == sum(map(len, encoded))
    length = max(map(len, encoded))
    batch = np.array([[2] * (length - len(ids)) + ids for ids in encoded], np.int32)  # [B, T], left-padded
    mask = np.array([[False] * (length - len(ids)) + [True] * len(ids) for ids in encoded])  # [B, T]
    model, _ = load_model(model_dir)
    tokens = np.asarray(
        generate(
            model,
            jnp.asarray(batch),
            jnp.asarray(mask),
            max_new_tokens=int(NEW_TOKENS),
            eos_token_id=(EOS_ID, IM_END_ID),
            pad_token_id=2,
        )
    )
    for record, row in zip(records, tokens.tolist(), strict=True):
        ends = [index for index, token in enumerate(row) if token in (EOS_ID, IM_END_ID)]
        assert record["completion"] == tokenizer.decode(row[: ends[0] if ends else None], skip_special_tokens=True)


def test_help_is_fast_and_shows_defaults():
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "seer_jax.generate", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert time.perf_counter() - start < 2.0
    assert "(default: 256)" in done.stdout and "--prompts-file" in done.stdout
    probe = "import sys, seer_jax.generate.cli; assert 'jax' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, check=True)


def failure(capsys, *args) -> str:
    with pytest.raises(SystemExit) as raised:
        main([str(arg) for arg in args])
    message = raised.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    return message


def test_errors_are_one_line(model_dir, adapter_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert "no prompt" in failure(capsys, "--model", model_dir)
    assert "is not a directory" in failure(capsys, "--model", tmp_path / "missing", "--prompt", "x")
    assert "neither a local directory nor in the Hugging Face cache" in failure(
        capsys, "--model", "org/not-downloaded", "--prompt", "x"
    )
    (tmp_path / "not-an-adapter").mkdir()
    assert "neither seer_adapter.json nor" in failure(
        capsys, "--model", model_dir, "--gates", tmp_path / "not-an-adapter", "--prompt", "x"
    )
    assert "threshold=X, nz_ratio=Y or budget=D" in failure(
        capsys, "--gates", adapter_dir, "--selection", "top=3", "--prompt", "x"
    )
    assert "--selection needs --gates" in failure(
        capsys, "--model", model_dir, "--selection", "nz_ratio=0.5", "--prompt", "x"
    )
    message = failure(capsys, "--model", model_dir, "--prompt", PROMPT, "--max-length", "64")
    assert "exceeds max_length=64" in message and "prompt 0 has" in message
    (tmp_path / "bad.jsonl").write_text('"fine"\n{"text": "no prompt key"}\n')
    assert "bad.jsonl:2" in failure(capsys, "--model", model_dir, "--prompts-file", tmp_path / "bad.jsonl")
