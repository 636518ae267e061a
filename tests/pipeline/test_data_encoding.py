"""Data files whose text is not UTF-8 (another encoding, a binary file) are a DataError naming
the file and the row (JSONL, parquet) or the line and byte offset (JSON)."""
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax.pipeline.data_formats import DataError, read_rows

GOOD = b'{"prompt": "1+2=", "completion": "3"}\n'


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_jsonl_names_the_row_of_the_bad_byte(tmp_path):
    # a blank line is not a row: the Latin-1 line is row 2, line 3
    path = _write(tmp_path / "latin1.jsonl", GOOD + b"\n" + '{"prompt": "café", "completion": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"^{path} row 2: .*not valid UTF-8"):
        read_rows(path)


def test_jsonl_that_is_binary(tmp_path):
    path = _write(tmp_path / "random.jsonl", bytes([0x80]) + os.urandom(500))
    with pytest.raises(DataError, match=rf"^{path} row 1: byte 0x80 at offset 0 is not valid UTF-8"):
        read_rows(path)


def test_utf16_jsonl(tmp_path):
    path = _write(tmp_path / "utf16.jsonl", GOOD.decode().encode("utf-16"))
    with pytest.raises(DataError, match=rf"^{path} row 1: byte 0xff at offset 0 is not valid UTF-8"):
        read_rows(path)


def test_json_array_names_line_and_byte_offset(tmp_path):
    data = b'[{"prompt": "1+2=", "completion": "3"},\n {"prompt": "caf\xe9", "completion": "x"}]'
    path = _write(tmp_path / "latin1.json", data)
    offset = data.index(b"\xe9")
    with pytest.raises(DataError, match=rf"^{path}: line 2: byte 0xe9 at offset {offset} is not valid UTF-8"):
        read_rows(path)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = _write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + GOOD + b'{"prompt": 5}\n')  # row 2 forces the json module
    rows, unreadable = read_rows(path)
    assert [row["prompt"] for row in rows] == ["1+2=", 5] and unreadable == []


def test_parquet_names_row_and_column(tmp_path):
    raw = pa.array([b"1+2=", b"4+4=", b"bad\xff"], type=pa.binary())
    # arrow checks UTF-8 when casting, not when building from buffers: write bytes as a string column
    prompts = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"completion": pa.array(["3", "8", "0"]), "prompt": prompts}), path)
    with pytest.raises(DataError, match=rf"^{path} row 3: column 'prompt' is not valid UTF-8 text"):
        read_rows(path)


def test_binary_parquet(tmp_path):
    path = _write(tmp_path / "random.parquet", os.urandom(300))
    with pytest.raises(DataError, match=rf"^{path}: cannot be read as parquet"):
        read_rows(path)
