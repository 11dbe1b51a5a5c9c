"""The JSONL and atomic-write helpers every script relies on."""

import os

import pytest

from datagen.errors import UserError
from datagen.jsonl import AppendJsonl, atomic_writer, iter_jsonl, repair_torn_tail
from tests.util import files_in


def test_iter_jsonl_streams_objects_and_skips_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (3, {"a": 2})]


def test_iter_jsonl_names_file_and_line_of_a_malformed_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n{"a": 2\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"a\.jsonl:2: not valid JSON"):
        list(iter_jsonl(path))


def test_iter_jsonl_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        list(iter_jsonl(tmp_path / "nope.jsonl"))


def test_atomic_writer_replaces_only_on_success(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_writer(path) as handle:
            handle.write("new, half written")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert files_in(tmp_path) == ["out.txt"]
    with atomic_writer(path) as handle:
        handle.write("new")
    assert path.read_text() == "new"
    assert files_in(tmp_path) == ["out.txt"]


def test_append_jsonl_repairs_a_torn_last_line(tmp_path):
    path = tmp_path / "gen.jsonl"
    path.write_bytes(b'{"custom_id": "a"}\n{"custom_id": "b", "gener')
    with AppendJsonl(path) as out:
        out.write({"custom_id": "b"})
    assert path.read_text() == '{"custom_id": "a"}\n{"custom_id":"b"}\n'
    assert repair_torn_tail(path) == 0


def test_repair_torn_tail_of_a_single_partial_line(tmp_path):
    path = tmp_path / "gen.jsonl"
    path.write_bytes(b'{"custom_id": "a"')
    assert repair_torn_tail(path) == len(b'{"custom_id": "a"')
    assert os.path.getsize(path) == 0


def test_atomic_outputs_get_the_ordinary_file_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_writer(tmp_path / "out.txt") as handle:
            handle.write("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644

