"""A tokenized document corpus: every document as token ids in one flat array, cached on disk.

Each document is stored as `[BOS] text EOS`: BOS first when the tokenizer defines one, then the text tokenized
without special tokens, then EOS. The text is tokenized without the tokenizer's own special-token template
because templates differ across families (the testbed and Llama-3 tokenizers add nothing or only BOS, Qwen has
no BOS at all); placing the two ids explicitly gives every tokenizer the same layout. BOS at each document start
makes a document look the same inside a packed training row as at evaluation time ("BOS + text"); EOS marks
where one document ends and the next begins. Empty texts are skipped.

Cache layout (`cache_dir` given): `cache_dir/<key>/{tokens.npy, doc_starts.npy, meta.json}`, where `<key>` is a
hash of the source files (resolved path, size, modification time), the text field, the tokenizer (the bytes of
its `save_pretrained` files) and the format version. Entries are written to a temporary directory and renamed
into place, so a reader never sees a partial entry. Cached arrays are memory-mapped, not read into memory.
"""

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from seer_jax.staging import new_staging_dir
from train.documents import Documents, open_documents

_log = logging.getLogger(__name__)

_FORMAT_VERSION = 1
# Documents per tokenizer call: enough to keep the fast tokenizer's threads busy, few enough that the Python
# lists of ids it returns stay small.
_TOKENIZE_BATCH = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    """Where the documents are, how to tokenize them, and where to cache the result.

    paths: data files or directories (see `train.documents` for the formats).
    tokenizer_dir: a local directory `transformers.AutoTokenizer` loads (usually the model directory).
    text_field: the column holding the text in json/jsonl/parquet/saved datasets.
    cache_dir: where tokenized corpora are cached; None tokenizes on every call.
    """

    paths: tuple[Path, ...]
    tokenizer_dir: Path
    text_field: str = "text"
    cache_dir: Path | None = None

    def __post_init__(self):
        if not self.paths:
            raise ValueError("paths: no data paths given")
        if not self.text_field:
            raise ValueError("text_field: must be a non-empty column name")


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """Documents as token ids.

    tokens: [num_tokens] int32 — the documents concatenated in source order, each as `[BOS] text EOS`.
    doc_starts: [num_docs + 1] int64 — document i is `tokens[doc_starts[i]:doc_starts[i + 1]]`; the last entry
      is `num_tokens`.
    bos_id: the BOS id at each document start, or None when the tokenizer has no BOS token.
    eos_id: the EOS id at each document end.
    """

    tokens: np.ndarray
    doc_starts: np.ndarray
    bos_id: int | None
    eos_id: int

    def __post_init__(self):
        if self.doc_starts.ndim != 1 or len(self.doc_starts) < 2:
            raise ValueError("doc_starts: needs at least one document ([num_docs + 1] offsets)")
        if self.doc_starts[0] != 0 or self.doc_starts[-1] != len(self.tokens):
            raise ValueError(f"doc_starts: must run from 0 to num_tokens ({len(self.tokens)})")

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def doc_lengths(self) -> np.ndarray:
        """[num_docs] int64: tokens per document, BOS and EOS included."""
        return np.diff(self.doc_starts)

    def document(self, index: int) -> np.ndarray:
        """[doc_length] int32: document `index` as `[BOS] text EOS`."""
        return self.tokens[self.doc_starts[index] : self.doc_starts[index + 1]]


def load_tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    """The fast (Rust `tokenizers`) tokenizer saved in a local directory; never reaches the network."""
    tokenizer_dir = Path(tokenizer_dir).expanduser()
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer directory does not exist: {tokenizer_dir}")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if not tokenizer.is_fast:
        raise ValueError(f"tokenizer in {tokenizer_dir} is not a fast tokenizer (no tokenizer.json backend)")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer in {tokenizer_dir} has no EOS token; packing needs one between documents")
    return tokenizer


def load_corpus(config: CorpusConfig, *, on_batch: Callable[[int], None] | None = None) -> TokenizedCorpus:
    """Opens, tokenizes (or loads from the cache) and validates a corpus.

    on_batch: called after each tokenized batch with the number of documents read in it, empty ones included
      (for a progress bar); not called on a cache hit.
    Raises FileNotFoundError / ValueError for a missing path, unreadable format, missing text field, missing
    tokenizer, or a source without any non-empty document.
    """
    documents = open_documents(config.paths, text_field=config.text_field)
    tokenizer = load_tokenizer(config.tokenizer_dir)
    if config.cache_dir is None:
        return tokenize_documents(documents, tokenizer, on_batch=on_batch)
    entry = Path(config.cache_dir).expanduser() / _cache_key(documents, tokenizer)
    if (entry / "meta.json").is_file():
        try:
            return _read_entry(entry)
        except (OSError, ValueError, KeyError) as error:  # a damaged cache entry is rebuilt, not fatal
            _log.warning("tokenized-corpus cache entry %s is damaged (%s); tokenizing again", entry, error)
            shutil.rmtree(entry, ignore_errors=True)
    corpus = tokenize_documents(documents, tokenizer, on_batch=on_batch)
    _write_entry(entry, corpus, documents, config)
    return _read_entry(entry)


def tokenize_documents(
    documents: Documents, tokenizer: PreTrainedTokenizerBase, *, on_batch: Callable[[int], None] | None = None
) -> TokenizedCorpus:
    """Tokenizes every non-empty document into `[BOS] text EOS` (see the module docstring)."""
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    prefix = np.array([] if bos_id is None else [bos_id], np.int32)
    suffix = np.array([eos_id], np.int32)
    pieces, lengths = [], []
    for batch in documents.text_batches(_TOKENIZE_BATCH):
        texts = [t for t in batch if t]
        # The backend's encode_batch_fast gives the same ids as `tokenizer(texts)` for about 60% of the CPU time,
        # as it skips the character offsets nobody here reads.
        for encoding in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False):
            pieces += [prefix, np.asarray(encoding.ids, np.int32), suffix]
            lengths.append(len(prefix) + len(encoding.ids) + 1)
        if on_batch is not None:
            on_batch(len(batch))
    if not lengths:
        raise ValueError(f"no non-empty documents in {', '.join(str(f) for f in documents.files[:3])}")
    doc_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedCorpus(tokens=np.concatenate(pieces), doc_starts=doc_starts, bos_id=bos_id, eos_id=eos_id)


def _cache_key(documents: Documents, tokenizer: PreTrainedTokenizerBase) -> str:
    digest = hashlib.sha256()
    files = []
    for f in documents.files:
        stat = f.stat()
        files.append([str(f.resolve()), stat.st_size, stat.st_mtime_ns])
    digest.update(json.dumps([_FORMAT_VERSION, files, documents.text_field]).encode())
    with tempfile.TemporaryDirectory() as saved:
        for name in sorted(Path(p).name for p in tokenizer.save_pretrained(saved)):
            digest.update(name.encode() + b"\0" + (Path(saved) / name).read_bytes())
    return digest.hexdigest()[:20]


def _write_entry(entry: Path, corpus: TokenizedCorpus, documents: Documents, config: CorpusConfig) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = new_staging_dir(entry)
    np.save(staging / "tokens.npy", corpus.tokens)
    np.save(staging / "doc_starts.npy", corpus.doc_starts)
    meta = {
        "format": _FORMAT_VERSION,
        "files": [str(f) for f in documents.files],
        "text_field": documents.text_field,
        "tokenizer_dir": str(config.tokenizer_dir),
        "bos_id": corpus.bos_id,
        "eos_id": corpus.eos_id,
        "num_docs": corpus.num_docs,
        "num_tokens": corpus.num_tokens,
    }
    (staging / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(staging, entry)
    except OSError:
        # Another process wrote the same entry first; theirs is identical.
        for f in staging.iterdir():
            f.unlink()
        staging.rmdir()


def _read_entry(entry: Path) -> TokenizedCorpus:
    meta = json.loads((entry / "meta.json").read_text())
    return TokenizedCorpus(
        tokens=np.load(entry / "tokens.npy", mmap_mode="r"),
        doc_starts=np.load(entry / "doc_starts.npy"),
        bos_id=meta["bos_id"],
        eos_id=meta["eos_id"],
    )
