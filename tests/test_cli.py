"""The shared command-line plumbing: progress bars in log files, the main wrapper, real
signals (SIGTERM, SIGINT) sent to this process, OS faults and special files as one line."""

import errno
import os
import shutil
import signal
import socket
import stat

import pytest

from datagen.common import cli, files, signals
from datagen.common.cli import (Terminated, check_output_path, describe_os_error, held_signals, make_parser, run,
                         set_interrupt_hint)
from datagen.common.errors import UserError


def test_progress_in_a_log_file_prints_plain_lines_once(monkeypatch, capsys):
    from datagen.common.cli import progress

    monkeypatch.setenv("DATAGEN_PROGRESS_INTERVAL", "0")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    for _ in progress(range(3), desc="rows", unit="row", delay=0):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines)
    assert lines[-1].startswith("rows: 100%") and "3/3" in lines[-1]
    assert len(lines) == len(set(lines))  # the final state is not printed twice


def test_run_turns_a_user_error_into_one_line_and_exit_1(capsys):
    def body(args):
        raise UserError("bad thing\nspread over lines; fix it")

    assert run(make_parser("doc", prog="tool.py"), body, []) == 1
    assert capsys.readouterr().err == "tool.py: error: bad thing spread over lines; fix it\n"


def test_run_keeps_the_traceback_of_a_bug():
    def body(args):
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        run(make_parser("doc", prog="tool.py"), body, [])


# --- signals and OS faults ---------------------------------------------------------------

def wait_for_the_signal():
    """Spin until the handler raises (it runs between bytecodes of the main thread)."""
    for _ in range(10_000_000):
        pass
    raise AssertionError("the signal never came")


@pytest.mark.parametrize("signum,code,words", [(signal.SIGTERM, 143, "terminated by SIGTERM"),
                                               (signal.SIGINT, 130, "interrupted by SIGINT (Ctrl+C)")])
def test_a_real_signal_becomes_one_line_with_the_hint(capsys, signum, code, words):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    cleaned = []

    def body(args):
        set_interrupt_hint("kept 3 records in out.jsonl; rerun the same command to resume")
        try:
            os.kill(os.getpid(), signum)
            wait_for_the_signal()
        finally:
            cleaned.append(True)

    assert run(make_parser("doc", prog="tool.py"), body, []) == code
    assert capsys.readouterr().err == f"tool.py: {words}; kept 3 records in out.jsonl; rerun the same command to resume\n"
    assert cleaned == [True]
    assert {s: signal.getsignal(s) for s in before} == before  # handlers put back
    assert signals.hint_text() == signals.DEFAULT_HINT


def test_terminated_is_not_an_exception_so_cleanup_code_sees_it():
    assert issubclass(Terminated, BaseException) and not issubclass(Terminated, Exception)


def test_the_default_hint_and_a_hint_computed_when_the_signal_comes(capsys):
    def body(args):
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for_the_signal()

    assert run(make_parser("doc", prog="tool.py"), body, []) == 143
    assert capsys.readouterr().err == "tool.py: terminated by SIGTERM; no output written\n"
    done = []

    def counting(args):
        set_interrupt_hint(lambda: f"kept {len(done)} records")
        done.extend([1, 2])
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for_the_signal()

    assert run(make_parser("doc", prog="tool.py"), counting, []) == 143
    assert capsys.readouterr().err == "tool.py: terminated by SIGTERM; kept 2 records\n"


def test_held_signals_finish_the_block_then_raise(capsys):
    steps = []

    def body(args):
        with held_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100_000):  # plenty of chances for the handler to run
                pass
            steps.append("block finished")
        steps.append("after the block")

    assert run(make_parser("doc", prog="tool.py"), body, []) == 143
    assert steps == ["block finished"]


def test_a_second_signal_does_not_cut_the_cleanup_short(capsys):
    steps = []

    def body(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            wait_for_the_signal()
        finally:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100_000):
                pass
            steps.append("cleaned up")

    assert run(make_parser("doc", prog="tool.py"), body, []) == 143
    assert steps == ["cleaned up"]
    assert capsys.readouterr().err.endswith("tool.py: terminated by SIGTERM; no output written\n")


def test_an_os_error_that_reaches_run_is_one_line(tmp_path, capsys):
    def body(args):
        open(tmp_path / "missing" / "x.jsonl")

    assert run(make_parser("doc", prog="tool.py"), body, []) == 1
    assert capsys.readouterr().err == (
        f"tool.py: error: {tmp_path / 'missing' / 'x.jsonl'}: no such file or directory; check the path\n")


def test_disk_full_names_the_path_and_the_space_left(tmp_path):
    message = describe_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), tmp_path / "out.jsonl")
    assert message.startswith(f"{tmp_path / 'out.jsonl'}: no space left on device (")
    assert f"free in {tmp_path}); free space there or write elsewhere" in message
    free = shutil.disk_usage(tmp_path).free
    assert files._size(free) in message
    quota = describe_os_error(OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "x")))
    assert quota.startswith(f"{tmp_path / 'x'}: disk quota exceeded (")
    assert describe_os_error(OSError(errno.EROFS, "Read-only file system"), "/mnt/x") == (
        "/mnt/x: read-only file system; write elsewhere")


def bound_unix_socket(path):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))  # the socket file stays after close


@pytest.mark.parametrize("make,kind", [
    (lambda p: os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3)), "a character device"),
    (os.mkfifo, "a named pipe (FIFO)"),
    (lambda p: bound_unix_socket(p), "a socket"),
], ids=["char", "fifo", "socket"])
def test_check_output_path_refuses_special_files(tmp_path, make, kind):
    path = tmp_path / "out.jsonl"
    make(path)
    with pytest.raises(UserError) as caught:
        check_output_path(path, [])
    assert str(caught.value) == f"--output_file {path} is {kind}, not a regular file; give a path to a regular file"


def test_check_output_path_takes_a_link_to_a_regular_file(tmp_path):
    (tmp_path / "real.jsonl").write_text("")
    (tmp_path / "link.jsonl").symlink_to("real.jsonl")
    assert check_output_path(tmp_path / "link.jsonl", []) == tmp_path / "link.jsonl"


def test_a_stop_string_that_starts_with_a_dash(tmp_path, capsys):
    """--stop '---' (argparse alone takes '---' for a flag) reaches the body on both routes."""
    from datagen.batchapi import create_batchinput
    from datagen.finetuned import generate_data_finetuned
    from tests.util import read_jsonl, write_jsonl

    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    assert create_batchinput.main(["--input_file", "p.jsonl", "--model_name", "m", "--stop", "---",
                                   "--stop", "-x", "--temperature", "0"]) == 0
    assert read_jsonl("batchinput.jsonl")[0]["body"]["stop"] == ["---", "-x"]
    args = generate_data_finetuned.build_parser().parse_args(
        cli.glue_dash_values(generate_data_finetuned.build_parser(),
                             ["--model_name_or_path", "m", "--input_file", "p.jsonl", "--stop", "---"]))
    assert args.stop == ["---"]
    # A flag after --stop is still a flag (argparse then says --stop lacks its value).
    with pytest.raises(SystemExit):
        create_batchinput.main(["--input_file", "p.jsonl", "--model_name", "m", "--stop", "--temperature", "0"])
    assert "--stop" in capsys.readouterr().err
