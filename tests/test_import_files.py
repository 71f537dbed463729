"""What `import` reads (store/ingest/files.py, store/ingest/file_input.py): gzip, bzip2 and xz
read transparently (told by their first bytes), files that are not text refused unless
``force``, and a missing file, a directory and an empty file each with their own message.

Real files in tmp_path, real stores on both engines; the lines are export envelopes (they carry
their own received_at and source), so the same content gives the same rows, chain hashes
included, however it was compressed.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import random
import threading

import pytest
from helpers import fresh_store, log_rows
from sqlalchemy import func, select

from store.db import StoreError
from store.ingest import files
from store.ingest.file_input import CorruptInput, EmptyFile, IsDirectory, NoSuchFile, NotText, unreadable_lines
from store.schema import event_log, imported_files
from store.simulate import simulate

COMPRESSORS = {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress}
SUFFIX = {"gzip": ".gz", "bzip2": ".bz2", "xz": ".xz"}


@pytest.fixture
def capture() -> bytes:
    # (No noise: a line that is not an envelope takes the time it is read, so two imports differ.)
    return "".join(line + "\n" for line in simulate(300, agents=3, seed=4, duplicate_rate=0.05)).encode()


def _records(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(imported_files).order_by(imported_files.c.id))]


def _count(engine, table=event_log) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def _plain_rows(path, kind: str) -> list[dict]:
    """The rows of the plain file imported into a new store of the same engine."""
    with fresh_store(kind) as other:
        files.import_file(other, path)
        with other.connect() as conn:
            return log_rows(conn)


def _refusal(excinfo) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, StoreError) and "\n" not in message
    return message


# -- compressed files --------------------------------------------------------------------------------

@pytest.mark.parametrize("compression", list(COMPRESSORS))
def test_a_compressed_file_imports_as_the_plain_file(engine, tmp_path, capture, compression):
    plain = tmp_path / "capture.jsonl"
    plain.write_bytes(capture)
    packed = tmp_path / f"capture.jsonl{SUFFIX[compression]}"
    packed.write_bytes(COMPRESSORS[compression](capture))

    result = files.import_file(engine, packed)
    assert result.appended == 300 and result.duplicates > 0
    with engine.connect() as conn:
        assert log_rows(conn) == _plain_rows(plain, engine.dialect.name)  # same rows, same chain hashes
    [record] = _records(engine)
    # The sha256 is of the content (what `zcat | sha256sum` prints): the plain file is the same capture.
    assert record["sha256"] == hashlib.sha256(capture).hexdigest() == result.sha256
    assert (record["file_name"], record["rows"], record["complete"]) == (packed.name, 300, True)
    with pytest.raises(files.AlreadyImported, match="already imported"):
        files.import_file(engine, plain)


def test_compression_is_told_by_the_first_bytes_not_the_name(engine, tmp_path, capture):
    disguised = tmp_path / "capture.jsonl"  # gzip, named as text
    disguised.write_bytes(gzip.compress(capture))
    assert files.import_file(engine, disguised).appended == 300
    plain_named_gz = tmp_path / "other.jsonl.gz"  # text, named as gzip
    text = "".join(line + "\n" for line in simulate(20, agents=1, seed=9)).encode()
    plain_named_gz.write_bytes(text)
    result = files.import_file(engine, plain_named_gz)
    assert (result.appended, result.quarantined) == (20, 0)
    # A text line that merely starts like bzip2's magic is text.
    odd = tmp_path / "odd.jsonl"
    odd.write_bytes(b"BZh9 is not a notification\n" + b'{"data": {}}\n')
    assert files.import_file(engine, odd).appended == 2


def test_standard_input_is_read_compressed_too(engine, capture):
    """A pipe cannot seek: the first bytes are read, looked at, and given back to the reader."""
    read_end, write_end = os.pipe()

    def write():
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(lzma.compress(capture))

    writer = threading.Thread(target=write)
    writer.start()
    with os.fdopen(read_end, "rb") as stdin:
        assert not stdin.seekable()
        result = files.import_stream(engine, stdin, file_name="stdin", source="stdin")
    writer.join()
    assert result.appended == 300 and result.sha256 == hashlib.sha256(capture).hexdigest()


@pytest.mark.parametrize("compression", ["gzip", "xz"])
def test_an_interrupted_compressed_import_resumes_with_the_rows_of_one_transaction(
        engine, tmp_path, capture, compression, monkeypatch):
    monkeypatch.setattr(files, "BATCH_LINES", 20)
    monkeypatch.setattr(files, "COMMIT_LINES", 60)
    plain = tmp_path / "capture.jsonl"
    plain.write_bytes(capture)
    packed = tmp_path / f"capture{SUFFIX[compression]}"
    packed.write_bytes(COMPRESSORS[compression](capture))
    told = []

    def stop_in_the_third_step(compressed_bytes):
        told.append(compressed_bytes)
        if len(told) == 7:  # batches 1-3 are step 1, 4-6 step 2: step 3 never commits
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.import_file(engine, packed, progress=stop_in_the_third_step)
    assert 0 < sum(told) <= packed.stat().st_size  # progress counts the file's own (compressed) bytes
    [record] = _records(engine)
    offset = record["resume_offset"]  # of the decompressed content: a line boundary
    assert (record["complete"], record["rows"]) == (False, 120) and capture[:offset].count(b"\n") == 120
    assert capture[offset - 1:offset] == b"\n"

    result = files.import_file(engine, packed)
    assert (result.resumed_at, result.appended) == (offset, 180)
    [record] = _records(engine)
    assert (record["complete"], record["rows"], record["first_seq"], record["last_seq"]) == (True, 300, 1, 300)
    with engine.connect() as conn:
        rows = log_rows(conn)
    monkeypatch.setattr(files, "COMMIT_LINES", 10**9)
    assert rows == _plain_rows(plain, engine.dialect.name)


def test_damaged_compressed_data_is_refused_and_stores_nothing(engine, tmp_path, capture):
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(capture)[:-200])
    with pytest.raises(CorruptInput) as excinfo:
        files.import_file(engine, cut)
    assert _refusal(excinfo).startswith(f"{cut}: the gzip data is damaged or cut short (")
    broken = tmp_path / "broken.bz2"
    broken.write_bytes(bz2.compress(capture)[:12] + b"\x00" * 500)
    with pytest.raises(CorruptInput, match="the bzip2 data is damaged or cut short"):
        files.import_file(engine, broken)
    assert _count(engine) == 0 and _records(engine) == []


# -- not text --------------------------------------------------------------------------------------

def test_binary_garbage_is_refused_unless_forced(engine, tmp_path):
    garbage = tmp_path / "capture.jsonl"
    garbage.write_bytes(random.Random(7).randbytes(300_000))
    with pytest.raises(NotText) as excinfo:
        files.import_file(engine, garbage)
    message = _refusal(excinfo)
    assert message.startswith(f"{garbage} does not look like text: ") and "--force" in message
    assert _count(engine) == 0 and _records(engine) == []

    result = files.import_file(engine, garbage, force=True)
    assert result.appended == result.quarantined == _count(engine) > 100
    assert _records(engine)[0]["sha256"] == hashlib.sha256(garbage.read_bytes()).hexdigest()


def test_binary_garbage_on_standard_input_and_compressed(engine, tmp_path):
    garbage = random.Random(8).randbytes(50_000)
    with (tmp_path / "g").open("wb") as f:
        f.write(garbage)
    with (tmp_path / "g").open("rb") as stdin, pytest.raises(NotText, match="^stdin does not look like text"):
        files.import_stream(engine, stdin, file_name="stdin", source="stdin")
    packed = tmp_path / "image.gz"  # what is inside counts, not the compressed bytes
    packed.write_bytes(gzip.compress(garbage))
    with pytest.raises(NotText):
        files.import_file(engine, packed)
    assert _count(engine) == 0
    result = files.import_stream(engine, [gzip.compress(garbage)], file_name="stdin", source="stdin", force=True)
    assert result.appended == result.quarantined > 0


def test_a_few_unreadable_lines_do_not_make_a_file_binary(engine, tmp_path):
    good = [line.encode() for line in simulate(10, agents=1, seed=2)]
    bad = [b'{"data": "caf\xe9"}', b"\xff\xfe{}", b'{"data": 1}\x00', b"\x00\x00", b"\xc0\xaf", b"\xed\xa0\x80"]
    half = tmp_path / "half.jsonl"
    half.write_bytes(b"\n".join(good[:5] + bad[:5]) + b"\n")  # 5 of 10: not more than half
    result = files.import_file(engine, half)
    assert (result.appended, result.quarantined) == (10, 5)
    most = tmp_path / "most.jsonl"
    most.write_bytes(b"\n\n".join(good[5:9] + bad) + b"\n")  # 6 of 10, blank lines not counted
    with pytest.raises(NotText, match=r"6 of its first 10 lines are not UTF-8 or hold NUL bytes"):
        files.import_file(engine, most)


def test_only_the_first_64_kib_decide():
    line = b'{"data": {"text": "' + "é".encode() * 40_000 + b'"}}\n'  # 80 KB: cut mid-character at 64 KiB
    head = (line * 2)[:65536]
    assert unreadable_lines(head, cut=True) == (0, 1)  # a cut line alone is judged on what is there
    assert unreadable_lines(b"ok\n" + b"\xff" * 10, cut=True) == (0, 1)  # a cut last line is not counted
    assert unreadable_lines(b"ok\n" + b"\xff" * 10) == (1, 2)


# -- a missing file, a directory, an empty file ----------------------------------------------------

def test_a_missing_file_a_directory_and_an_empty_file_have_their_own_messages(engine, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(NoSuchFile) as excinfo:
        files.import_file(engine, missing)
    assert _refusal(excinfo) == f"{missing}: no such file"

    with pytest.raises(IsDirectory) as excinfo:
        files.import_file(engine, tmp_path)
    assert _refusal(excinfo) == f"{tmp_path} is a directory"

    for name, content in [("empty.jsonl", b""), ("other-empty.jsonl", b""), ("empty.jsonl.gz", gzip.compress(b""))]:
        empty = tmp_path / name
        empty.write_bytes(content)
        with pytest.raises(EmptyFile) as excinfo:  # every time: never "already imported"
            files.import_file(engine, empty)
        assert _refusal(excinfo) == f"{empty} is empty: nothing to import"
    assert _count(engine) == 0 and _records(engine) == []
