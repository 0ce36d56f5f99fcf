"""Fixtures for the data-pipeline tests: real text (standard-library sources) and a small tokenizer trained on it."""

import sysconfig
from pathlib import Path

import pytest

from train.demo.bpe_tokenizer import train_bpe_tokenizer
from train.demo.corpus import collect_stdlib_files

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session")
def stdlib_texts() -> list[tuple[str, str]]:
    """(relative path, text) of the first 60 collected standard-library files: real code of varied lengths."""
    return collect_stdlib_files(STDLIB, max_files=60, max_file_bytes=256_000)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, stdlib_texts) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer((text for _, text in stdlib_texts), vocab_size=512, out_dir=out)
    return out
