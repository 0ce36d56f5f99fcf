"""`seer_jax.pipeline`: one call loads model, tokenizer and gates (a hub id from the local cache included); text in,
text out, streamed as it is decoded, with its stats."""

import shutil

import pytest
from flax import nnx
from huggingface_hub import constants

from seer_jax.adapters import save_adapter
from seer_jax.checkpoint import load_model
from seer_jax.pipeline import Generator, PromptTooLongError, load, parse_selection
from seer_jax.seer import SeerCausalLM, seer_from_base
from seer_jax.seer_config import SeerConfig
from seer_jax.sparsity import Selection
from tests.seer_jax.test_model_path import fake_hub_cache
from tests.seer_jax.tiny_chat_model import EOS_ID, IM_END_ID, write_tiny_chat_model

# One worker runs this module under `pytest -n` (pyproject: --dist loadgroup), so its module fixtures build once.
pytestmark = pytest.mark.xdist_group("pipeline")

PROMPT = "def fibonacci(n):\n    a, b = 0, 1\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_chat_model(tmp_path_factory.mktemp("pipeline") / "tiny-chat", seed=1)


def test_parse_selection():
    assert parse_selection("threshold=0.003") == Selection(method="threshold", threshold=0.003)
    keeps = Selection(method="threshold", threshold=0.01, last_block_dense=True)
    assert parse_selection("nz_ratio=0.25", keeps) == Selection(
        method="nz_ratio", nz_ratio=0.25, threshold=0.01, last_block_dense=True
    )
    from seer_jax.sparsity import BudgetAllocation

    allocation = BudgetAllocation(densities=(0.1, 1.0), layer_densities=((0.05, 0.15), (1.0, 1.0)), length=256)
    recorded = Selection(method="budget", budget=0.1, allocation=allocation)
    assert parse_selection("budget=0.2", recorded) == Selection(method="budget", budget=0.2, allocation=allocation)
    assert parse_selection("budget=0.2") == Selection(method="budget", budget=0.2)  # no allocation: uniform
    for text, match in [("topk=3", "threshold=X, nz_ratio=Y or budget=D"), ("threshold=a", "not a number")]:
        with pytest.raises(ValueError, match=match):
            parse_selection(text)
    with pytest.raises(ValueError, match="nz_ratio must be in"):
        parse_selection("nz_ratio=2")


def test_load_a_hub_id_and_stream_text(model_dir, tmp_path, monkeypatch):
    """The model is found in a fake local hub cache; text arrives in pieces whose concatenation is the completion;
    EOS tokens come from config.json and generation_config.json."""
    snapshot = fake_hub_cache(tmp_path / "hub", "org/tiny-chat", {})
    shutil.copytree(model_dir, snapshot, dirs_exist_ok=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    generator = load("org/tiny-chat")
    assert isinstance(generator, Generator) and not generator.is_sparse
    assert set(generator.eos_token_ids) == {EOS_ID, IM_END_ID} and generator.max_length == 1024
    pieces, done = [], []
    result = generator.run(
        [PROMPT],
        max_new_tokens=12,
        on_text=lambda row, text: pieces.append((row, text)),
        on_done=lambda row, text: done.append((row, text)),
    )
    text = result.texts[0]
    assert done == [(0, text)] and "".join(piece for _, piece in pieces) == text
    assert len(pieces) > 1 and {row for row, _ in pieces} == {0}  # streamed, not printed at the end
    assert len(result.tokens[0]) <= 12 and generator.tokenizer.decode(result.tokens[0]) == text
    stats = result.stats
    assert stats.prompt_tokens == len(generator.encode([PROMPT])[0]) and stats.density is None
    assert stats.ttft_seconds > 0 and stats.decode_tokens == stats.new_tokens - 1 and stats.decode_tokens_per_second > 0
    assert "block density dense" in stats.summary()
    assert generator.generate(PROMPT, max_new_tokens=12) == [text]  # same shapes: no recompilation
    with pytest.raises(PromptTooLongError, match="exceeds max_length=1024"):
        generator.generate(PROMPT, max_new_tokens=1020)


def test_load_errors(model_dir, tmp_path):
    with pytest.raises(ValueError, match="a selection needs gates"):
        load(model_dir, selection="nz_ratio=0.5")
    with pytest.raises(ValueError, match="no model given"):
        load()
    (tmp_path / "no-tokenizer").mkdir()
    shutil.copy(model_dir / "config.json", tmp_path / "no-tokenizer")
    shutil.copy(model_dir / "model.safetensors", tmp_path / "no-tokenizer")
    with pytest.raises(ValueError, match="no usable tokenizer in"):
        load(tmp_path / "no-tokenizer")
    generator = load(tmp_path / "no-tokenizer", tokenizer=model_dir)
    with pytest.raises(ValueError, match="empty after tokenization"):
        generator.generate("")


def test_gated_generator_reports_density(model_dir, tmp_path):
    """The adapter's own selection (nz_ratio 0.3) computes a fraction of the blocks of a 3-block prompt."""
    base, _ = load_model(model_dir)
    seer = seer_from_base(base, SeerConfig(selection=Selection(nz_ratio=0.3)), rngs=nnx.Rngs(0))
    save_adapter(seer, tmp_path / "adapter", base_model=str(model_dir), weights="safetensors")
    generator = load(gates=tmp_path / "adapter")
    assert isinstance(generator.model, SeerCausalLM) and generator.is_sparse
    result = generator.run([PROMPT * 12], max_new_tokens=2)
    assert result.stats.prompt_tokens > 2 * 64 and 0 < result.stats.density < 0.9
    assert f"block density {result.stats.density:.3f}" in result.stats.summary()
