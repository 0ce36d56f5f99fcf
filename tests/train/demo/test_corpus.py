"""The built-in demo corpus (standard-library sources) and its BPE tokenizer."""

import dataclasses
import gzip
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from train.data import LoaderConfig, PackedLoader
from train.demo.bpe_tokenizer import train_bpe_tokenizer
from train.demo.corpus import (
    DemoCorpusConfig,
    build_demo_corpus,
    collect_stdlib_files,
    group_documents,
    split_documents,
)
from train.token_corpus import CorpusConfig, load_corpus

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL = {"max_files": 40, "vocab_size": 400}


def _read(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    config = DemoCorpusConfig(cache_dir=tmp_path_factory.mktemp("demo"), **SMALL)
    return config, build_demo_corpus(config)


def test_build_writes_a_disjoint_train_eval_split_of_the_stdlib(built):
    config, corpus = built
    assert not corpus.reused
    train, held_out = _read(corpus.train_path), _read(corpus.eval_path)
    assert (corpus.train_docs, corpus.eval_docs) == (len(train), len(held_out))
    assert corpus.train_chars == sum(len(d["text"]) for d in train)
    assert corpus.eval_chars == sum(len(d["text"]) for d in held_out)
    assert held_out and len(train) > 4 * len(held_out)

    expected = group_documents(collect_stdlib_files(STDLIB, max_files=40, max_file_bytes=config.max_file_bytes))
    assert sorted((d["name"], d["text"]) for d in train + held_out) == expected
    assert not {d["name"] for d in train} & {d["name"] for d in held_out}
    assert [d["name"] for d in train] == sorted(d["name"] for d in train)
    assert all(d["text"].startswith("# file: ") for d in train)
    manifest = json.loads((config.cache_dir / "manifest.json").read_text())
    assert manifest["max_files"] == 40 and manifest["train"]["documents"] == len(train)


def test_rebuild_reuses_and_a_changed_setting_rebuilds(built):
    config, corpus = built
    again = build_demo_corpus(config)
    assert again == dataclasses.replace(corpus, reused=True)
    assert again.train_path.read_bytes() == corpus.train_path.read_bytes()

    resplit = build_demo_corpus(DemoCorpusConfig(cache_dir=config.cache_dir, eval_fraction=0.3, **SMALL))
    assert not resplit.reused and resplit.eval_docs > corpus.eval_docs
    build_demo_corpus(config)  # back to the module's corpus for the other tests


def test_interrupted_build_is_not_reused(tmp_path):
    config = DemoCorpusConfig(cache_dir=tmp_path, max_files=6, vocab_size=300)
    build_demo_corpus(config)
    (tmp_path / "manifest.json").unlink()  # as if the build had stopped before its last step
    assert not build_demo_corpus(config).reused


def test_tokenizer_loads_offline_and_round_trips(built, stdlib_texts):
    _, corpus = built
    tokenizer = AutoTokenizer.from_pretrained(str(corpus.tokenizer_dir), local_files_only=True)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert len(tokenizer) == 400
    for text in [stdlib_texts[45][1], "naïve café — 中文 ✓ \t\r\n\x00 emoji 🐍"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert 0 not in ids and 1 not in ids and 2 not in ids
        assert tokenizer.decode(ids) == text


def test_the_demo_corpus_feeds_the_loader(built, tmp_path):
    _, corpus = built
    tokens = load_corpus(CorpusConfig(paths=(corpus.train_path,), tokenizer_dir=corpus.tokenizer_dir))
    assert tokens.num_docs == corpus.train_docs
    batch = next(PackedLoader(tokens, LoaderConfig(seq_len=512, batch_size=4)))
    assert batch.shape == (4, 512) and len(np.unique(batch)) > 100


def test_collection_rules(tmp_path):
    files = {
        "os.py": "import sys\n",
        "email/__init__.py": "'''email'''\n",
        "email/mime/text.py": "class MIMEText: pass",  # no final newline: one is added
        "email/_parser.py": "def parse(): pass\n",
        "encodings/utf_8.py": "import codecs\n",
        "encodings/cp1252.py": '""" Python Character Mapping Codec cp1252 generated from X with gencodec.py.\n"""\n',
        "_sysconfigdata__linux.py": "build_time_vars = {}\n",
        "huge.py": "x = 1\n" * 100,
        "latin1.py": "s = 'caf\xe9'\n",
        "site-packages/numpy.py": "third party\n",
        "dist-packages/x.py": "third party\n",
        "test/test_os.py": "tests\n",
        "unittest/test/test_case.py": "tests\n",
        "lib2to3/tests/data.py": "tests\n",
        "idlelib/editor.py": "app\n",
        "idlelib/idle_test/t.py": "tests\n",
        "config-3.11-x86_64-linux-gnu/python-config.py": "build\n",
        "__pycache__/os.py": "cache\n",
        "notes.txt": "not python\n",
    }
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("latin-1") if relative == "latin1.py" else text.encode())

    collected = collect_stdlib_files(tmp_path, max_files=None, max_file_bytes=500)
    assert [name for name, _ in collected] == [
        "email/__init__.py",
        "email/_parser.py",
        "email/mime/text.py",
        "encodings/utf_8.py",
        "os.py",
    ]
    assert group_documents(collected) == [
        (
            "email",
            "# file: email/__init__.py\n'''email'''\n"
            "# file: email/_parser.py\ndef parse(): pass\n"
            "# file: email/mime/text.py\nclass MIMEText: pass\n",
        ),
        ("encodings", "# file: encodings/utf_8.py\nimport codecs\n"),
        ("os.py", "# file: os.py\nimport sys\n"),
    ]
    assert [name for name, _ in collect_stdlib_files(tmp_path, max_files=2, max_file_bytes=500)] == [
        "email/__init__.py",
        "email/_parser.py",
    ]
    with pytest.raises(FileNotFoundError, match="standard library directory does not exist"):
        collect_stdlib_files(tmp_path / "nowhere", max_files=None, max_file_bytes=500)
    with pytest.raises(ValueError, match="only 1 document"):
        build_demo_corpus(DemoCorpusConfig(cache_dir=tmp_path / "out", stdlib_dir=tmp_path, max_files=2))


def test_split_is_deterministic_and_order_independent():
    documents = [(f"module_{i}.py", f"x = {i}\n") for i in range(50)]
    train, held_out = split_documents(documents, eval_fraction=0.1)
    assert len(held_out) == 5 and len(train) == 45
    assert sorted(train + held_out) == sorted(documents)
    shuffled = [documents[i] for i in np.random.default_rng(0).permutation(50)]
    assert {d for d in split_documents(shuffled, eval_fraction=0.1)[1]} == set(held_out)
    assert len(split_documents(documents[:3], eval_fraction=0.1)[1]) == 1  # at least one eval document


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="max_files: 1 must be at least 2"):
        DemoCorpusConfig(cache_dir=tmp_path, max_files=1)
    with pytest.raises(ValueError, match=r"eval_fraction: 1\.0 must lie strictly between 0 and 1"):
        DemoCorpusConfig(cache_dir=tmp_path, eval_fraction=1.0)
    with pytest.raises(ValueError, match="max_file_bytes: 0 must be positive"):
        DemoCorpusConfig(cache_dir=tmp_path, max_file_bytes=0)
    with pytest.raises(ValueError, match="vocab_size: 259 leaves no room for merges"):
        train_bpe_tokenizer(["a b c"], vocab_size=259, out_dir=tmp_path)
