"""Local text documents, read through `datasets` without touching the network.

A source is one or more paths. Each path is a file, a directory of files, or a directory written by
`datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk`. Formats, by file name:

    .txt                                  one document per file (the whole file is the text)
    .json .jsonl .json.gz .jsonl.gz       one document per record; the text is the `text_field` column
    .parquet                              one document per row; the text is the `text_field` column

A `.txt` file is one document (not one per line) because the corpora this project trains on are source files
and books, where a line is far too short to be a document. A directory of files is searched recursively
(hidden entries skipped) and read in sorted path order. All files of one source must share one format. A
`save_to_disk` directory holding a `DatasetDict` is read from its `train` split.

Files are streamed (`streaming=True`), so nothing is copied into (or left in) the Hugging Face datasets cache:
the only reader is one tokenization pass, whose result `train.token_corpus` caches itself.
"""

import dataclasses
import gzip
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets
import pyarrow

_SUFFIX_FORMATS = {
    ".txt": "text",
    ".json": "json",
    ".jsonl": "json",
    ".json.gz": "json",
    ".jsonl.gz": "json",
    ".parquet": "parquet",
}
_SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")


@dataclasses.dataclass(frozen=True)
class Documents:
    """An opened, validated document source.

    `files` lists every file the documents come from (for a `save_to_disk` directory: every file in it), in
    read order; their names, sizes and modification times identify the source for caching.
    """

    files: tuple[Path, ...]
    text_field: str
    dataset: datasets.Dataset | datasets.IterableDataset

    def text_batches(self, batch_size: int) -> Iterator[list[str]]:
        """Yields the document texts in source order, `batch_size` at a time (the last batch may be short).

        Raises ValueError naming the file (and line) when a file turns out unreadable while streaming: a truncated
        or bad gzip stream, text that is not UTF-8, malformed JSON.
        """
        for batch in _naming_bad_files(self.dataset.iter(batch_size=batch_size), self.files):
            texts = batch[self.text_field]
            for text in texts:
                if not isinstance(text, str):
                    raise ValueError(
                        f"field {self.text_field!r} holds {type(text).__name__} values, expected text "
                        f"(source: {_describe(self.files)})"
                    )
            yield texts


def open_documents(paths: Sequence[str | os.PathLike], *, text_field: str = "text") -> Documents:
    """Opens local documents; raises before any tokenization if the source cannot be read as text.

    Raises:
      FileNotFoundError: a path does not exist.
      ValueError: no paths, an unsupported or mixed format, no documents at all, or no `text_field` column.
    """
    if not paths:
        raise ValueError("paths: no data paths given")
    if not text_field:
        raise ValueError("text_field: must be a non-empty column name")
    resolved = [Path(p).expanduser() for p in paths]
    for path in resolved:
        if not path.exists():
            raise FileNotFoundError(f"data path does not exist: {path}")

    saved = [p for p in resolved if _is_saved_dataset(p)]
    if saved:
        if len(resolved) > 1:
            raise ValueError(f"a save_to_disk directory ({saved[0]}) must be the only data path")
        dataset, files = _load_saved(saved[0]), _all_files(saved[0])
    else:
        files = [f for p in resolved for f in (_data_files(p) if p.is_dir() else [p])]
        formats = {_format_of(f) for f in files}
        if len(formats) > 1:
            raise ValueError(f"data files mix formats {sorted(formats)}; give files of one format: {_describe(files)}")
        (builder,) = formats
        # An empty file holds no documents, and the json builder fails (StopIteration) when the first file is one.
        nonempty = [f for f in files if f.stat().st_size > 0]
        if not nonempty:
            raise ValueError(f"no documents in {_describe(files)}: every file is empty")
        options = {"sample_by": "document"} if builder == "text" else {}
        # A streaming builder only leaves a lock file in its cache dir, and reading never touches it again.
        with tempfile.TemporaryDirectory() as builder_cache:
            try:  # the builder reads the first file to infer its features
                dataset = datasets.load_dataset(
                    builder,
                    data_files=[str(f) for f in nonempty],
                    split="train",
                    streaming=True,
                    cache_dir=builder_cache,
                    **options,
                )
            except _READ_ERRORS as error:
                raise ValueError(_locate_read_error(files, error)) from None

    first = next(_naming_bad_files(iter(dataset), files), None)
    if first is None:
        raise ValueError(f"no documents in {_describe(files)}")
    if text_field not in first:
        raise ValueError(f"text_field: no column {text_field!r} in {_describe(files)}; columns are {sorted(first)}")
    return Documents(files=tuple(files), text_field=text_field, dataset=dataset)


def _format_of(path: Path) -> str:
    name = path.name.lower()
    for suffix, builder in _SUFFIX_FORMATS.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return builder
    raise ValueError(f"unsupported data file {path}: expected one of {', '.join(_SUFFIX_FORMATS)}")


def _data_files(directory: Path) -> list[Path]:
    files = sorted(
        f
        for f in directory.rglob("*")
        if f.is_file()
        and not any(part.startswith(".") for part in f.relative_to(directory).parts)
        and any(f.name.lower().endswith(s) for s in _SUFFIX_FORMATS)
    )
    if not files:
        raise ValueError(f"no data files ({', '.join(_SUFFIX_FORMATS)}) under {directory}")
    return files


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in _SAVED_DATASET_MARKERS)


def _load_saved(path: Path) -> datasets.Dataset:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"saved DatasetDict {path} has no 'train' split (splits: {sorted(loaded)})")
        loaded = loaded["train"]
    return loaded


def _all_files(directory: Path) -> list[Path]:
    return sorted(f for f in directory.rglob("*") if f.is_file())


def _describe(files: Sequence[Path]) -> str:
    shown = ", ".join(str(f) for f in files[:3])
    return shown if len(files) <= 3 else f"{shown} and {len(files) - 3} more files"


# What a streaming read raises on a bad file: EOFError (truncated gzip), OSError (gzip.BadGzipFile), UnicodeDecodeError,
# pyarrow's ArrowInvalid (malformed JSON; a ValueError).
_READ_ERRORS = (EOFError, OSError, UnicodeDecodeError, pyarrow.ArrowException)


def _naming_bad_files(records: Iterator, files: Sequence[Path]) -> Iterator:
    """`records`, with a read error turned into one ValueError line naming the bad file (and line)."""
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except _READ_ERRORS as error:
            raise ValueError(_locate_read_error(files, error)) from None
        yield record


def _locate_read_error(files: Sequence[Path], error: BaseException) -> str:
    """Re-reads the text files one by one (only after a failure) to say which file and line is bad."""
    for path in files:
        name = path.name.lower()
        if not name.endswith((".txt", ".json", ".jsonl", ".json.gz", ".jsonl.gz")):
            continue
        opener = gzip.open if name.endswith(".gz") else open
        line_number = 0
        try:
            with opener(path, "rb") as f:
                for raw in f:
                    line_number += 1
                    text = raw.decode("utf-8")
                    if name.endswith((".jsonl", ".jsonl.gz")) and text.strip():
                        json.loads(text)
        except EOFError:
            return f"{path}: the gzip stream is truncated (it ends before its end-of-stream marker); re-download it"
        except gzip.BadGzipFile as bad:
            return f"{path}: not a valid gzip file ({bad}); re-download it or drop the .gz suffix"
        except UnicodeDecodeError as bad:
            return f"{path}:{line_number}: not UTF-8 text ({bad.reason} at byte {bad.start}); re-encode it as UTF-8"
        except json.JSONDecodeError as bad:
            return f"{path}:{line_number}: malformed JSON ({bad.msg} at column {bad.colno}); fix or remove the line"
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return f"cannot read {_describe(files)}: {reason}"
