"""Packing, shuffling, resuming and evaluation windows on a corpus of real standard-library sources."""

import dataclasses

import numpy as np
import pytest

from tests.train.tiny import write_docs
from train.data import LoaderConfig, LoaderState, PackedLoader, eval_windows, pack_rows
from train.token_corpus import CorpusConfig, TokenizedCorpus, load_corpus

BOS, EOS = 0, 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, stdlib_texts, tokenizer_dir) -> TokenizedCorpus:
    path = write_docs(tmp_path_factory.mktemp("corpus") / "docs.jsonl.gz", stdlib_texts[:30])
    return load_corpus(CorpusConfig(paths=(path,), tokenizer_dir=tokenizer_dir))


def _take(loader: PackedLoader, count: int) -> list[np.ndarray]:
    return [next(loader) for _ in range(count)]


def test_corpus_is_nontrivial(corpus):
    # The tests below rely on a few hundred rows of 256 tokens from documents of very different lengths.
    assert corpus.num_docs == 30 and corpus.num_tokens > 100_000
    assert corpus.doc_lengths.min() < 256 < 8192 < corpus.doc_lengths.max()


def test_pack_rows_in_source_order_is_the_token_stream(corpus):
    seq_len = 256
    num_rows = corpus.num_tokens // seq_len
    rows = pack_rows(corpus, np.arange(corpus.num_docs), np.arange(num_rows), seq_len)
    assert rows.shape == (num_rows, seq_len) and rows.dtype == np.int32
    np.testing.assert_array_equal(rows.ravel(), corpus.tokens[: num_rows * seq_len])
    assert corpus.num_tokens - rows.size == corpus.num_tokens % seq_len  # only the tail remainder is lost


def test_pack_rows_follows_the_document_order(corpus):
    seq_len = 192
    order = np.random.default_rng(7).permutation(corpus.num_docs)
    stream = np.concatenate([corpus.document(d) for d in order])
    picked = np.array([5, 0, 77, 3])
    rows = pack_rows(corpus, order, picked, seq_len)
    for row, r in zip(rows, picked, strict=True):
        np.testing.assert_array_equal(row, stream[r * seq_len : (r + 1) * seq_len])
    with pytest.raises(ValueError, match="ends past the stream"):
        pack_rows(corpus, order, np.array([len(stream) // seq_len]), seq_len)


def test_an_epoch_serves_distinct_whole_rows_separated_by_eos_bos(corpus):
    num_rows = corpus.num_tokens // 256
    batch_size = next(b for b in range(7, 20) if num_rows % b)  # leaves rows over at the end of the epoch
    loader = PackedLoader(corpus, LoaderConfig(seq_len=256, batch_size=batch_size, seed=3))
    assert loader.num_rows == num_rows
    batches = _take(loader, loader.batches_per_epoch)
    assert loader.state == LoaderState(epoch=0, row=loader.batches_per_epoch * batch_size)
    rows = np.concatenate(batches)  # [R, T]
    assert all(b.shape == (batch_size, 256) and b.dtype == np.int32 for b in batches)
    assert len({row.tobytes() for row in rows}) == len(rows)  # no row served twice in an epoch

    # Every token of the epoch's rows comes from the corpus; what is missing is the tail remainder of the stream
    # plus the leftover rows at the end of the epoch.
    vocab = int(corpus.tokens.max()) + 1
    served = np.bincount(rows.ravel(), minlength=vocab)
    available = np.bincount(corpus.tokens, minlength=vocab)
    assert (served <= available).all()
    assert available.sum() - served.sum() == corpus.num_tokens % 256 + (num_rows % batch_size) * 256

    # Inside a row, documents are joined as ... EOS BOS ...: every EOS not at a row end is followed by BOS.
    eos_rows, eos_cols = np.nonzero(rows[:, :-1] == EOS)
    assert len(eos_rows) > 0
    assert (rows[eos_rows, eos_cols + 1] == BOS).all()
    bos_rows, bos_cols = np.nonzero(rows[:, 1:] == BOS)
    assert (rows[bos_rows, bos_cols] == EOS).all()


def test_same_seed_same_batches_other_seed_other_batches(corpus):
    config = LoaderConfig(seq_len=1024, batch_size=16, seed=11)
    count = PackedLoader(corpus, config).batches_per_epoch + 5  # crosses an epoch boundary
    first = _take(PackedLoader(corpus, config), count)
    again = _take(PackedLoader(corpus, config), count)
    other = _take(PackedLoader(corpus, dataclasses.replace(config, seed=12)), count)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_epochs_differ(corpus):
    loader = PackedLoader(corpus, LoaderConfig(seq_len=1024, batch_size=16, seed=0))
    epoch0 = np.concatenate(_take(loader, loader.batches_per_epoch))
    epoch1 = np.concatenate(_take(loader, loader.batches_per_epoch))
    assert loader.state.epoch == 1
    assert {r.tobytes() for r in epoch0} != {r.tobytes() for r in epoch1}  # new document order, new rows


@pytest.mark.parametrize("where", ["start", "middle", "epoch_end", "after_epoch_end", "second_epoch"])
def test_resume_from_saved_state_yields_the_same_batches(corpus, where):
    config = LoaderConfig(seq_len=1024, batch_size=16, seed=5)
    loader = PackedLoader(corpus, config)
    per_epoch = loader.batches_per_epoch
    served = {"start": 0, "middle": 3, "epoch_end": per_epoch, "after_epoch_end": per_epoch + 1}.get(where)
    _take(loader, 2 * per_epoch - 2 if served is None else served)
    saved = dataclasses.asdict(loader.state)
    assert all(type(v) is int for v in saved.values())  # plain ints for a checkpoint
    continued = _take(loader, per_epoch + 3)  # runs into the next epoch
    resumed = _take(PackedLoader(corpus, config, state=LoaderState(**saved)), per_epoch + 3)
    for a, b in zip(continued, resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_config_and_state_errors(corpus):
    with pytest.raises(ValueError, match="seq_len: 1000 is not a positive multiple of 64"):
        LoaderConfig(seq_len=1000, batch_size=2)
    with pytest.raises(ValueError, match="seq_len: 0 is not a positive multiple of 64"):
        LoaderConfig(seq_len=0, batch_size=2)
    with pytest.raises(ValueError, match="batch_size: 0 must be positive"):
        LoaderConfig(seq_len=64, batch_size=0)
    with pytest.raises(ValueError, match="seed: -1 must be non-negative"):
        LoaderConfig(seq_len=64, batch_size=1, seed=-1)
    with pytest.raises(ValueError, match="epoch: -1 must be non-negative"):
        LoaderState(epoch=-1)
    with pytest.raises(ValueError, match="row: -2 must be non-negative"):
        LoaderState(row=-2)
    config = LoaderConfig(seq_len=1024, batch_size=16)
    rows = corpus.num_tokens // 1024
    with pytest.raises(ValueError, match=f"state.row: {rows + 1} is past this corpus's {rows} rows per epoch"):
        PackedLoader(corpus, config, state=LoaderState(epoch=2, row=rows + 1))


def test_corpus_smaller_than_one_batch(corpus):
    rows = corpus.num_tokens // 4096
    config = LoaderConfig(seq_len=4096, batch_size=rows + 1)
    message = f"corpus too small: .* make {rows} rows of seq_len 4096, fewer than one batch"
    with pytest.raises(ValueError, match=message):
        PackedLoader(corpus, config)
    PackedLoader(corpus, dataclasses.replace(config, batch_size=rows))  # exactly one batch is enough


def test_eval_windows_take_document_prefixes(corpus):
    length = 2048
    lengths = corpus.doc_lengths - 1  # BOS + text
    qualifying = np.flatnonzero(lengths >= length)
    assert 3 < len(qualifying) < corpus.num_docs  # some documents are too short and must be skipped

    windows = eval_windows(corpus, length=length, num_docs=3)
    assert windows.shape == (3, length) and windows.dtype == np.int32
    for window, doc in zip(windows, qualifying[:3], strict=True):
        np.testing.assert_array_equal(window, corpus.document(doc)[:length])
        assert window[0] == BOS and EOS not in window

    everything = eval_windows(corpus, length=length, num_docs=1000)
    assert everything.shape == (len(qualifying), length)


def test_eval_window_boundary_and_errors(corpus):
    exact = int(corpus.doc_lengths[0]) - 1  # document 0 holds exactly BOS + text of this many tokens
    np.testing.assert_array_equal(eval_windows(corpus, length=exact, num_docs=1)[0], corpus.document(0)[:-1])
    longest = int(corpus.doc_lengths.max()) - 1
    with pytest.raises(ValueError, match=f"length: no document has {longest + 1} tokens"):
        eval_windows(corpus, length=longest + 1, num_docs=1)
    with pytest.raises(ValueError, match="num_docs: 0 must be positive"):
        eval_windows(corpus, length=64, num_docs=0)
