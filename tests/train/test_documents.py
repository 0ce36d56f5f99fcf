"""Unreadable document files: one ValueError line naming the file (and the line), whether the first record or a
later one is bad."""

import gzip
import json

import pytest

from train.documents import open_documents

GOOD = b"".join(json.dumps({"text": f"document {i} " * 40}).encode() + b"\n" for i in range(400))


CASES = [
    ("truncated.jsonl.gz", gzip.compress(GOOD)[:-200], r"truncated\.jsonl\.gz: the gzip stream is truncated"),
    ("bad.jsonl.gz", b"plain text, not gzip\n" * 4, r"bad\.jsonl\.gz: not a valid gzip file"),
    ("latin1.jsonl", GOOD + '{"text": "café"}\n'.encode("latin-1"), r"latin1\.jsonl:401: not UTF-8 text"),
    ("latin1.txt", "line one\ncafé\n".encode("latin-1"), r"latin1\.txt:2: not UTF-8 text"),
    ("first_bad.jsonl", b'{"text": "a"\n' + GOOD, r"first_bad\.jsonl:1: malformed JSON"),
    ("later_bad.jsonl", GOOD + b'{"text": "b"\n' + GOOD, r"later_bad\.jsonl:401: malformed JSON"),
]


@pytest.mark.parametrize(("name", "data", "match"), [pytest.param(*case, id=case[0]) for case in CASES])
def test_unreadable_files_are_named(tmp_path, name, data, match):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match) as raised:
        for _ in open_documents([path]).text_batches(64):
            pass
    assert "\n" not in str(raised.value)
