"""The JSONL and atomic-write helpers every script relies on, also on a really full disk
(a 1 MB tmpfs), with device nodes and FIFOs in the way, and with hostile JSON."""

import contextlib
import os
import stat
import subprocess

import pytest

from datagen.common.cli import Terminated
from datagen.common.errors import UserError
from datagen.common.jsonl import AppendJsonl, atomic_writer, dumps, dumps_bytes, iter_jsonl, loads, repair_torn_tail
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



# --- machine faults: devices, a full disk, hostile JSON ----------------------------------

@contextlib.contextmanager
def tmpfs(folder, size="1m"):
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def char_device(path, minor):
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    return path


@pytest.mark.parametrize("minor", [3, 7])
def test_atomic_writer_refuses_a_device_and_leaves_it_alone(tmp_path, minor):
    node = char_device(tmp_path / "out.jsonl", minor)
    with pytest.raises(UserError, match=r"out\.jsonl is a character device, not a regular file; give a path"):
        with atomic_writer(node) as handle:
            handle.write("x\n")
    assert stat.S_ISCHR(os.stat(node).st_mode)
    assert files_in(tmp_path) == ["out.jsonl"]


def test_atomic_writer_follows_a_link_to_a_regular_file(tmp_path):
    (tmp_path / "real.txt").write_text("old")
    (tmp_path / "link.txt").symlink_to("real.txt")
    with atomic_writer(tmp_path / "link.txt") as handle:
        handle.write("new")
    assert (tmp_path / "link.txt").read_text() == "new"


def test_atomic_writer_on_a_full_disk_keeps_the_old_file_and_no_temporary(tmp_path):
    with tmpfs(tmp_path / "small") as small:
        (small / "out.jsonl").write_text("old\n")
        with pytest.raises(UserError) as caught:
            with atomic_writer(small / "out.jsonl", "wb") as handle:
                for _ in range(2_000):
                    handle.write(b"x" * 1_000 + b"\n")
        message = str(caught.value)
        assert message.startswith(f"{small / 'out.jsonl'}: no space left on device (")
        assert f"free in {small}); free space there or write elsewhere" in message
        assert files_in(small) == ["out.jsonl"]
        assert (small / "out.jsonl").read_text() == "old\n"


@pytest.mark.parametrize("stop", [Terminated, KeyboardInterrupt])
def test_atomic_writer_removes_its_temporary_file_on_a_signal(tmp_path, stop):
    with pytest.raises(stop):
        with atomic_writer(tmp_path / "out.jsonl") as handle:
            handle.write("half")
            raise stop()
    assert files_in(tmp_path) == []


def test_append_jsonl_on_a_full_disk_keeps_whole_lines(tmp_path):
    with tmpfs(tmp_path / "small") as small:
        path = small / "gen.jsonl"
        written = 0
        with pytest.raises(UserError, match=r"gen\.jsonl: no space left on device"):
            with AppendJsonl(path, fsync=False) as out:
                while True:
                    out.write_many([{"custom_id": f"r{written}-{i}", "text": "y" * 3_000} for i in range(7)])
                    written += 7
        assert written > 0
        lines = path.read_bytes().split(b"\n")
        assert lines[-1] == b""  # ends with a whole line
        assert [loads(line)["custom_id"] for line in lines[:-1]] == [
            f"r{n - n % 7}-{n % 7}" for n in range(written)]
        assert files_in(small) == ["gen.jsonl"]


@pytest.mark.parametrize("make", ["char", "fifo"])
def test_append_jsonl_refuses_a_device_or_fifo(tmp_path, make):
    path = tmp_path / "gen.jsonl"
    if make == "char":
        char_device(path, 7)
    else:
        os.mkfifo(path)  # opening it for appending would block until a reader came
    kind = "a character device" if make == "char" else r"a named pipe \(FIFO\)"
    with pytest.raises(UserError, match=rf"gen\.jsonl is {kind}, not a regular file"):
        AppendJsonl(path)
    assert files_in(tmp_path) == ["gen.jsonl"]


def test_iter_jsonl_names_a_line_nested_too_deep(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"a\.jsonl:2: JSON nested too deep \(over 1,024 levels"):
        list(iter_jsonl(path))


@pytest.mark.parametrize("text,escape", [('"\\ud800"', "\\ud800"), ('{"k\\udfff": 1}', "\\udfff"),
                                         ('["ok", {"a": ["x\\udbff"]}]', "\\udbff")])
def test_iter_jsonl_refuses_a_lone_surrogate(tmp_path, text, escape):
    path = tmp_path / "a.jsonl"
    path.write_text("{}\n" + text + "\n", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        list(iter_jsonl(path))
    assert str(caught.value).startswith(f"{path}:2: lone surrogate {escape} in the text ")
    assert "not valid Unicode" in str(caught.value)


def test_iter_jsonl_refuses_surrogate_bytes(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'"\xed\xa0\x80"\n')  # a surrogate encoded as if it were a character
    with pytest.raises(UserError, match=r"a\.jsonl:1: (lone surrogate|not UTF-8)"):
        list(iter_jsonl(path))


def test_a_surrogate_pair_still_parses_on_either_parser():
    assert loads('["\\ud83d\\ude00"]') == ["\U0001F600"]
    # orjson refuses NaN and the standard library decides: it refuses it too (not a number JSON allows)
    with pytest.raises(ValueError, match="NaN is not a number JSON allows"):
        loads('["\\ud83d\\ude00", NaN]')


@pytest.mark.parametrize("encode", [dumps, dumps_bytes])
def test_dumps_never_writes_invalid_utf8(encode):
    with pytest.raises(UserError, match=r"cannot write JSON: lone surrogate \\udc80 .*not valid Unicode"):
        encode({"text": "bad byte \udc80 from surrogateescape"})
    assert encode({"n": 2 ** 70, "t": "é"}) in ('{"n":1180591620717411303424,"t":"é"}',
                                                 '{"n":1180591620717411303424,"t":"é"}'.encode())
