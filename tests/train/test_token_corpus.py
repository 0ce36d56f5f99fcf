"""Reading local documents in every supported format, tokenizing them into `[BOS] text EOS`, and the cache."""

import gzip
import json
import re
from pathlib import Path

import datasets
import numpy as np
import pytest

from train.token_corpus import CorpusConfig, load_corpus, load_tokenizer


@pytest.fixture(scope="module")
def texts(stdlib_texts) -> list[str]:
    # Five real sources of different lengths, one with non-ASCII text.
    chosen = [text for _, text in stdlib_texts[5:10]]
    return [*chosen[:-1], chosen[-1] + "\n# naïve café — 中文 ✓\n"]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def _corpus(paths, tokenizer_dir, **kwargs):
    return load_corpus(CorpusConfig(paths=tuple(Path(p) for p in paths), tokenizer_dir=tokenizer_dir, **kwargs))


def _write_format(kind: str, directory: Path, texts: list[str]) -> Path:
    """Writes `texts` as one source of format `kind`; returns the path to load."""
    records = [{"name": f"doc{i}", "text": t} for i, t in enumerate(texts)]
    if kind in ("jsonl", "jsonl.gz", "json.gz"):
        return _write_jsonl(directory / f"docs.{kind}", records)
    if kind == "json":
        path = directory / "docs.json"
        path.write_text(json.dumps(records))
        return path
    if kind == "parquet":
        path = directory / "docs.parquet"
        datasets.Dataset.from_list(records).to_parquet(str(path))
        return path
    if kind == "txt-dir":
        for i, t in enumerate(texts):
            # Nested and zero-padded names: the directory is read recursively in sorted path order.
            sub = directory / "txt" / ("a" if i < 2 else "b")
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{i:02d}.txt").write_text(t, encoding="utf-8")
        return directory / "txt"
    if kind == "saved":
        datasets.Dataset.from_list(records).save_to_disk(str(directory / "saved"))
        return directory / "saved"
    if kind == "saved-dict":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(directory / "dict"))
        return directory / "dict"
    raise AssertionError(kind)


def test_layout_is_bos_text_eos_per_document(tmp_path, tokenizer_dir, texts):
    corpus = _corpus([_write_format("jsonl", tmp_path, texts)], tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    assert (corpus.bos_id, corpus.eos_id) == (0, 1)
    assert corpus.num_docs == len(texts)
    assert corpus.tokens.dtype == np.int32 and corpus.doc_starts.dtype == np.int64
    for i, text in enumerate(texts):
        expected = [0, *tokenizer(text, add_special_tokens=False)["input_ids"], 1]
        np.testing.assert_array_equal(corpus.document(i), expected)
        assert tokenizer.decode(corpus.document(i)[1:-1]) == text
    assert corpus.num_tokens == corpus.doc_starts[-1] == sum(len(corpus.document(i)) for i in range(len(texts)))


@pytest.mark.parametrize("kind", ["json", "jsonl.gz", "json.gz", "parquet", "txt-dir", "saved", "saved-dict"])
def test_every_format_gives_the_same_corpus(tmp_path, tokenizer_dir, texts, kind):
    reference = _corpus([_write_format("jsonl", tmp_path, texts)], tokenizer_dir)
    corpus = _corpus([_write_format(kind, tmp_path, texts)], tokenizer_dir)
    np.testing.assert_array_equal(corpus.tokens, reference.tokens)
    np.testing.assert_array_equal(corpus.doc_starts, reference.doc_starts)


def test_several_paths_are_read_in_the_given_order(tmp_path, tokenizer_dir, texts):
    first = _write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts[:2]])
    second = _write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[2:]])
    reference = _corpus([_write_format("jsonl", tmp_path, texts)], tokenizer_dir)
    corpus = _corpus([first, second], tokenizer_dir)
    np.testing.assert_array_equal(corpus.tokens, reference.tokens)


def test_custom_text_field_and_empty_texts_skipped(tmp_path, tokenizer_dir, texts):
    path = _write_jsonl(tmp_path / "code.jsonl", [{"content": t} for t in [texts[0], "", texts[1]]])
    batches = []
    config = CorpusConfig(paths=(path,), tokenizer_dir=tokenizer_dir, text_field="content")
    corpus = load_corpus(config, on_batch=batches.append)
    assert corpus.num_docs == 2
    assert batches == [3]  # progress counts every document read


def test_missing_path(tmp_path, tokenizer_dir):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(FileNotFoundError, match=f"data path does not exist: {re.escape(str(missing))}"):
        _corpus([missing], tokenizer_dir)


def test_missing_text_field_names_the_columns(tmp_path, tokenizer_dir, texts):
    path = _write_jsonl(tmp_path / "docs.jsonl", [{"name": "a", "content": texts[0]}])
    with pytest.raises(ValueError, match=r"text_field: no column 'text' in .*columns are \['content', 'name'\]"):
        _corpus([path], tokenizer_dir)


def test_empty_file(tmp_path, tokenizer_dir):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match=r"no documents in .*empty\.jsonl"):
        _corpus([path], tokenizer_dir)


def test_only_empty_texts(tmp_path, tokenizer_dir):
    path = _write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": ""}])
    with pytest.raises(ValueError, match=r"no non-empty documents in .*blank\.jsonl"):
        _corpus([path], tokenizer_dir)


def test_non_text_field(tmp_path, tokenizer_dir):
    path = _write_jsonl(tmp_path / "numbers.jsonl", [{"text": 3}, {"text": 4}])
    with pytest.raises(ValueError, match="field 'text' holds int values, expected text"):
        _corpus([path], tokenizer_dir)


def test_unsupported_and_mixed_formats(tmp_path, tokenizer_dir, texts):
    csv = tmp_path / "docs.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unsupported data file .*docs\.csv: expected one of \.txt, \.json"):
        _corpus([csv], tokenizer_dir)
    jsonl = _write_format("jsonl", tmp_path, texts)
    txt = tmp_path / "one.txt"
    txt.write_text(texts[0])
    with pytest.raises(ValueError, match=r"data files mix formats \['json', 'text'\]"):
        _corpus([jsonl, txt], tokenizer_dir)


def test_directory_without_data_files(tmp_path, tokenizer_dir):
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"no data files .* under"):
        _corpus([tmp_path], tokenizer_dir)


def test_config_and_tokenizer_errors(tmp_path, tokenizer_dir, texts):
    with pytest.raises(ValueError, match="paths: no data paths given"):
        CorpusConfig(paths=(), tokenizer_dir=tokenizer_dir)
    with pytest.raises(ValueError, match="text_field: must be a non-empty column name"):
        CorpusConfig(paths=(tmp_path,), tokenizer_dir=tokenizer_dir, text_field="")
    path = _write_format("jsonl", tmp_path, texts)
    with pytest.raises(FileNotFoundError, match=r"tokenizer directory does not exist: .*no-model"):
        _corpus([path], tmp_path / "no-model")


def test_cache_is_reused_and_keyed_by_source(tmp_path, tokenizer_dir, texts):
    cache = tmp_path / "cache"
    path = _write_format("jsonl", tmp_path, texts)
    batches = []
    first = load_corpus(
        CorpusConfig(paths=(path,), tokenizer_dir=tokenizer_dir, cache_dir=cache), on_batch=batches.append
    )
    assert sum(batches) == len(texts)
    (entry,) = cache.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["doc_starts.npy", "meta.json", "tokens.npy"]

    batches.clear()
    again = load_corpus(
        CorpusConfig(paths=(path,), tokenizer_dir=tokenizer_dir, cache_dir=cache), on_batch=batches.append
    )
    assert batches == []  # served from the cache, not tokenized
    assert isinstance(again.tokens, np.memmap)
    np.testing.assert_array_equal(again.tokens, first.tokens)
    np.testing.assert_array_equal(again.doc_starts, first.doc_starts)
    assert [p.name for p in cache.iterdir()] == [entry.name]

    _write_jsonl(path, [{"text": t} for t in texts[:3]])  # the source changes: a new entry
    changed = _corpus([path], tokenizer_dir, cache_dir=cache)
    assert changed.num_docs == 3
    assert len(list(cache.iterdir())) == 2


@pytest.mark.testbed
def test_testbed_tokenizer_loads_offline(tmp_path, testbed_dir):
    model_dir = testbed_dir / "seer-tiny-llama"
    tokenizer = load_tokenizer(model_dir)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    ids = tokenizer("def f(x):\n    return x\n", add_special_tokens=False)["input_ids"]
    assert 0 not in ids and 1 not in ids  # the tokenizer adds no special tokens itself
    assert tokenizer.decode(ids) == "def f(x):\n    return x\n"

    with gzip.open(testbed_dir / "data" / "eval_stdlib.jsonl.gz", "rt", encoding="utf-8") as f:
        heads = [json.loads(next(f))["text"][:20_000] for _ in range(2)]
    corpus = _corpus([_write_jsonl(tmp_path / "heads.jsonl", [{"text": t} for t in heads])], model_dir)
    for i, text in enumerate(heads):
        np.testing.assert_array_equal(
            corpus.document(i), [0, *tokenizer(text, add_special_tokens=False)["input_ids"], 1]
        )


@pytest.mark.parametrize("damage", ["truncated_tokens", "bad_meta"])
def test_a_damaged_cache_entry_is_rebuilt_with_a_warning(tmp_path, tokenizer_dir, texts, caplog, damage):
    path = _write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    cache = tmp_path / "cache"
    expected = _corpus([path], tokenizer_dir, cache_dir=cache)
    expected_tokens = np.array(expected.tokens)  # off the memory map of the file damaged below
    (entry,) = cache.iterdir()
    if damage == "truncated_tokens":
        tokens = entry / "tokens.npy"
        tokens.write_bytes(tokens.read_bytes()[: tokens.stat().st_size // 2])
    else:
        (entry / "meta.json").write_text('{"format": 1, "bos')
    again = _corpus([path], tokenizer_dir, cache_dir=cache)
    np.testing.assert_array_equal(again.tokens, expected_tokens)
    np.testing.assert_array_equal(again.doc_starts, expected.doc_starts)
    assert any(f"cache entry {entry} is damaged" in message for message in caplog.messages)
