"""Packed language-model rows from a tokenized corpus, resumable, plus evaluation windows.

Packing (as in the SeerAttention prefill pipeline, docs/design.md §5, but without pad tokens): each epoch the
documents (each `[BOS] text EOS`, see `train.token_corpus`) are put in a seeded random order and concatenated
into one stream, which is cut into rows of exactly `seq_len` tokens. Rows therefore cross document boundaries;
the EOS/BOS pair marks them. The stream's tail of `num_tokens % seq_len` tokens that does not fill a row is
dropped; the order differs per epoch, so the dropped tail is a different document's end each epoch. The rows are
then served in a second seeded random order, `batch_size` at a time; the `num_rows % batch_size` rows left over
at the end of an epoch are skipped (again different ones each epoch). No other token is lost.

Both orders come from `numpy.random.default_rng((seed, epoch))`, so the batch sequence is a pure function of
(corpus, seq_len, batch_size, seed), and `LoaderState` (epoch, row: two plain ints) is enough to resume it
exactly: a loader built from a saved state yields the batch the saved loader would have yielded next. Rows are
gathered on demand, so a memory-mapped corpus is never loaded whole.
"""

import dataclasses

import numpy as np

from train.token_corpus import TokenizedCorpus

# AttnGate blocks are 64 tokens (the block size of every released prefill gate), so a row must hold whole blocks.
SEQ_LEN_MULTIPLE = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """seq_len: tokens per row (a multiple of 64). batch_size: rows per batch. seed: fixes both shuffles."""

    seq_len: int
    batch_size: int
    seed: int = 0

    def __post_init__(self):
        if self.seq_len <= 0 or self.seq_len % SEQ_LEN_MULTIPLE:
            raise ValueError(f"seq_len: {self.seq_len} is not a positive multiple of {SEQ_LEN_MULTIPLE}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size: {self.batch_size} must be positive")
        if self.seed < 0:
            raise ValueError(f"seed: {self.seed} must be non-negative")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoaderState:
    """Where a loader stands: `row` rows of epoch `epoch`'s shuffled row order have been served.

    Save it in a checkpoint as `dataclasses.asdict(state)` (two ints); restore with `LoaderState(**saved)`.
    """

    epoch: int = 0
    row: int = 0

    def __post_init__(self):
        if self.epoch < 0:
            raise ValueError(f"epoch: {self.epoch} must be non-negative")
        if self.row < 0:
            raise ValueError(f"row: {self.row} must be non-negative")


def pack_rows(corpus: TokenizedCorpus, doc_order: np.ndarray, rows: np.ndarray, seq_len: int) -> np.ndarray:
    """[len(rows), seq_len] int32: rows `rows` of the stream of documents concatenated in `doc_order`.

    Row r is stream tokens `[r * seq_len, (r + 1) * seq_len)`; every row must lie inside the stream.
    """
    lengths = corpus.doc_lengths[doc_order]  # [num_docs]
    ends = np.cumsum(lengths)  # [num_docs], stream offset where each document in `doc_order` ends
    if len(rows) and (np.max(rows) + 1) * seq_len > ends[-1]:
        raise ValueError(f"rows: row {np.max(rows)} ends past the stream ({ends[-1]} tokens)")
    out = np.empty((len(rows), seq_len), np.int32)  # [R, T]
    for i, row in enumerate(rows):
        position, filled = int(row) * seq_len, 0
        k = int(np.searchsorted(ends, position, side="right"))  # the document holding `position`
        while filled < seq_len:
            doc = doc_order[k]
            offset = position - (ends[k] - lengths[k])
            take = min(seq_len - filled, int(ends[k] - position))
            start = corpus.doc_starts[doc] + offset
            out[i, filled : filled + take] = corpus.tokens[start : start + take]
            filled, position, k = filled + take, position + take, k + 1
    return out


class PackedLoader:
    """An endless iterator of [batch_size, seq_len] int32 batches of packed rows (see the module docstring).

    Raises ValueError at construction when the corpus holds fewer tokens than one batch of rows.
    """

    def __init__(self, corpus: TokenizedCorpus, config: LoaderConfig, *, state: LoaderState | None = None):
        self.corpus = corpus
        self.config = config
        self.num_rows = corpus.num_tokens // config.seq_len
        if self.num_rows < config.batch_size:
            raise ValueError(
                f"corpus too small: {corpus.num_tokens} tokens in {corpus.num_docs} documents make "
                f"{self.num_rows} rows of seq_len {config.seq_len}, fewer than one batch of batch_size "
                f"{config.batch_size} ({config.batch_size * config.seq_len} tokens)"
            )
        state = state or LoaderState()
        if state.row > self.num_rows:
            raise ValueError(f"state.row: {state.row} is past this corpus's {self.num_rows} rows per epoch")
        self._epoch, self._row = state.epoch, state.row
        self._orders: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // self.config.batch_size

    @property
    def state(self) -> LoaderState:
        """The position after the last batch served; a loader built with it continues from there."""
        return LoaderState(epoch=self._epoch, row=self._row)

    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> np.ndarray:
        batch_size = self.config.batch_size
        if self._row + batch_size > self.num_rows:
            self._epoch, self._row = self._epoch + 1, 0
        doc_order, row_order = self._epoch_orders(self._epoch)
        rows = row_order[self._row : self._row + batch_size]
        self._row += batch_size
        return pack_rows(self.corpus, doc_order, rows, self.config.seq_len)  # [B, T]

    def _epoch_orders(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._orders is None or self._orders[0] != epoch:
            rng = np.random.default_rng((self.config.seed, epoch))
            doc_order = rng.permutation(self.corpus.num_docs)
            row_order = rng.permutation(self.num_rows)
            self._orders = (epoch, doc_order, row_order)
        return self._orders[1], self._orders[2]


def eval_windows(corpus: TokenizedCorpus, *, length: int, num_docs: int) -> np.ndarray:
    """[n, length] int32: the first `length` tokens (BOS + text) of the first `num_docs` long-enough documents.

    A document qualifies when BOS + text (EOS not counted) holds at least `length` tokens, so no window crosses
    a document end; this is the testbed's perplexity protocol ("first L tokens (BOS + text) of the first 16
    documents that are that long"). n = min(num_docs, qualifying documents); ValueError if none qualifies.
    """
    if length <= 0:
        raise ValueError(f"length: {length} must be positive")
    if num_docs <= 0:
        raise ValueError(f"num_docs: {num_docs} must be positive")
    qualifying = np.flatnonzero(corpus.doc_lengths - 1 >= length)[:num_docs]
    if not len(qualifying):
        longest = int(corpus.doc_lengths.max()) - 1
        raise ValueError(f"length: no document has {length} tokens (the longest has {longest} before EOS)")
    starts = corpus.doc_starts[qualifying]
    return np.stack([corpus.tokens[s : s + length] for s in starts]).astype(np.int32)  # [n, length]
