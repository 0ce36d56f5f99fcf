"""The converters keep the tokenizer whole: HF → converted → HF preserves the tokenizer files, the chat template and
generation_config.json byte for byte, and `apply_chat_template` works on each directory as on the original.
A hub id in the local Hugging Face cache converts like its directory."""

import shutil

import pytest
from huggingface_hub import constants
from transformers import AutoTokenizer

from convert.flax_to_hf import main as flax_to_hf
from convert.hf_to_flax import main as hf_to_flax
from seer_jax.model_files import model_files
from tests.seer_jax.test_model_path import fake_hub_cache
from tests.seer_jax.tiny_chat_model import write_tiny_chat_model

MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "def fibonacci(n):"},
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return write_tiny_chat_model(tmp_path_factory.mktemp("chat") / "hf")


def chat_ids(directory) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return list(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_round_trip_keeps_tokenizer_chat_template_and_generation_config(chat_model, tmp_path):
    names = model_files(chat_model)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(names)
    assert "chat_template.jinja" in names or "chat_template" in (chat_model / "tokenizer_config.json").read_text()
    hf_to_flax(["--hf-dir", str(chat_model), "--out", str(tmp_path / "converted"), "--dtype", "float32"])
    flax_to_hf(["--model", str(tmp_path / "converted"), "--out", str(tmp_path / "exported"), "--dtype", "float32"])
    expected = chat_ids(chat_model)
    assert expected[:2] == [0, 3]  # BOS, <|im_start|>: the template ran
    for directory in (tmp_path / "converted", tmp_path / "exported"):
        assert model_files(directory) == names
        for name in names:
            assert (directory / name).read_bytes() == (chat_model / name).read_bytes(), (directory, name)
        assert chat_ids(directory) == expected


def test_hub_id_from_the_local_cache_converts(chat_model, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = fake_hub_cache(cache, "org/tiny-chat", {})
    shutil.copytree(chat_model, snapshot, dirs_exist_ok=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    hf_to_flax(["--hf-dir", "org/tiny-chat", "--out", str(tmp_path / "converted"), "--dtype", "float32"])
    assert chat_ids(tmp_path / "converted") == chat_ids(chat_model)
    with pytest.raises(SystemExit) as raised:
        hf_to_flax(["--hf-dir", "org/absent", "--out", str(tmp_path / "other")])
    assert "org/absent is neither a local directory nor in the Hugging Face cache" in raised.value.code
    assert not (tmp_path / "other").exists()
