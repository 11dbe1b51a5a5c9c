"""Machine faults are part of the error model: real signals, a really full disk, real
device nodes and hostile JSON, each ending in one line, a known exit code and a folder
holding nothing it should not."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datagen.common.errors import UserError
from datagen.results.reformat import ResultStore
from tests.reformat_fixtures import chat_body, ok_line
from tests.util import ROOT, files_in, run_script

MODEL = "gpt-4o-mini"


def one_line(stderr: str, prog: str) -> str:
    """The one line the script printed for its failure (log lines before it are fine)."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"{prog}:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def write_prompts(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(f'{{"prompt": "question {i}: what is the capital of France, and why is it there?"}}\n')
    return path


def write_results(path: Path, n: int) -> Path:
    line = json.dumps(ok_line("request-0", chat_body()))
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(line.replace('"request-0"', f'"request-{i}"') + "\n")
    return path


@contextlib.contextmanager
def tmpfs(folder: Path, options: str = "size=1m"):
    """A small, real tmpfs at ``folder``: writing more than its size fails with ENOSPC."""
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def char_device(path: Path, minor: int) -> Path:
    """A device node with /dev/null's (1, 3) or /dev/full's (1, 7) numbers, in tmp_path."""
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    return path


def start(script: str, *args, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                            env={**os.environ, "TQDM_DISABLE": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(process: subprocess.Popen, found, what: str, timeout: float = 120) -> None:
    """Poll until ``found()`` is true (the event the signal must come after)."""
    deadline = time.monotonic() + timeout
    while not found():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"finished (exit {process.returncode}) before {what}; give it more work\n{err}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.002)


def temp_files(folder: Path) -> list[str]:
    return [name for name in files_in(folder) if name.endswith(".tmp")]


# --- signals --------------------------------------------------------------------------


SIGNALS = [(signal.SIGTERM, 143, "terminated by SIGTERM; no output written"),
           (signal.SIGINT, 130, "interrupted by SIGINT (Ctrl+C); no output written")]


@pytest.mark.parametrize("signum,code,message", SIGNALS, ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_run_leaves_no_part_of_the_batch_input(tmp_path, signum, code, message):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 400_000)
    out = tmp_path / "out"
    out.mkdir()
    process = start("create_batchinput.py", "--input_file", prompts, "--model_name", MODEL,
                    "--output_file", out / "batchinput.jsonl", cwd=tmp_path)
    wait_for(process, lambda: temp_files(out), "a .tmp part in the output folder")
    os.kill(process.pid, signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert one_line(err, "create_batchinput.py") == f"create_batchinput.py: {message}"
    assert files_in(out) == []


@pytest.mark.parametrize("signum,code,message", SIGNALS, ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_run_removes_the_reformat_temporary_folder(tmp_path, signum, code, message):
    results = write_results(tmp_path / "results.jsonl", 200_000)
    temp = tmp_path / "tmp"
    temp.mkdir()
    process = start("reformat_results.py", "--input_file", results, "--output_file", "out.jsonl",
                    cwd=tmp_path, env={"TMPDIR": str(temp)})
    wait_for(process, lambda: any(p.name.startswith("reformat-results-") for p in temp.iterdir()),
             "a reformat-results-* folder in TMPDIR")
    os.kill(process.pid, signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert one_line(err, "reformat_results.py") == f"reformat_results.py: {message}"
    assert files_in(temp) == []
    assert files_in(tmp_path) == ["results.jsonl", "tmp"]


def test_sigterm_while_writing_the_reformatted_output_leaves_nothing(tmp_path):
    results = write_results(tmp_path / "results.jsonl", 300_000)
    temp = tmp_path / "tmp"
    temp.mkdir()
    process = start("reformat_results.py", "--input_file", results, "--output_file", "out.jsonl",
                    cwd=tmp_path, env={"TMPDIR": str(temp)})
    wait_for(process, lambda: temp_files(tmp_path), "the output's temporary file")
    os.kill(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert one_line(err, "reformat_results.py") == "reformat_results.py: terminated by SIGTERM; no output written"
    assert files_in(tmp_path) == ["results.jsonl", "tmp"]
    assert files_in(temp) == []


# --- a full disk ------------------------------------------------------------------------


def test_disk_full_while_writing_the_batch_input(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 20_000)  # about 4 MB of batch lines
    with tmpfs(tmp_path / "small") as small:
        done = run_script("create_batchinput.py", "--input_file", prompts, "--model_name", MODEL,
                          "--output_file", small / "batchinput.jsonl", cwd=tmp_path)
        assert done.returncode == 1, done.stderr
        line = one_line(done.stderr, "create_batchinput.py")
        assert f"error: {small / 'batchinput.jsonl'}: no space left on device" in line
        assert f"free in {small}); free space there or write elsewhere" in line
        assert files_in(small) == []


def test_disk_full_while_writing_the_reformatted_output(tmp_path):
    results = write_results(tmp_path / "results.jsonl", 20_000)
    (tmp_path / "tmp").mkdir()
    with tmpfs(tmp_path / "small") as small:
        done = run_script("reformat_results.py", "--input_file", results, "--output_file",
                          small / "out.jsonl", cwd=tmp_path, env={"TMPDIR": str(tmp_path / "tmp")})
        assert done.returncode == 1, done.stderr
        line = one_line(done.stderr, "reformat_results.py")
        assert f"error: {small / 'out.jsonl'}: no space left on device" in line
        assert files_in(small) == []
    assert files_in(tmp_path / "tmp") == []


def test_disk_full_in_tmpdir_while_reformatting(tmp_path):
    results = write_results(tmp_path / "results.jsonl", 20_000)
    with tmpfs(tmp_path / "small") as small:
        done = run_script("reformat_results.py", "--input_file", results, "--output_file", "out.jsonl",
                          cwd=tmp_path, env={"TMPDIR": str(small)})
        assert done.returncode == 1, done.stderr
        line = one_line(done.stderr, "reformat_results.py")
        assert f"error: temporary folder (TMPDIR) {small}: no space left on device" in line
        assert "TMPDIR sets the temporary folder" in line
        assert files_in(small) == []
    assert files_in(tmp_path) == ["results.jsonl", "small"]


# --- device nodes as outputs -----------------------------------------------------------------


@pytest.mark.parametrize("minor", [3, 7], ids=["null", "full"])
def test_create_batchinput_refuses_a_device_as_output(tmp_path, minor):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 3)
    node = char_device(tmp_path / "out.jsonl", minor)
    done = run_script("create_batchinput.py", "--input_file", prompts, "--model_name", MODEL,
                      "--output_file", node, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert one_line(done.stderr, "create_batchinput.py") == (
        f"create_batchinput.py: error: --output_file {node} is a character device, not a regular file; "
        "give a path to a regular file")
    assert stat.S_ISCHR(os.stat(node).st_mode) and os.stat(node).st_rdev == os.makedev(1, minor)
    assert files_in(tmp_path) == ["out.jsonl", "prompts.jsonl"]


@pytest.mark.parametrize("minor", [3, 7], ids=["null", "full"])
@pytest.mark.parametrize("flag", ["--output_file", "--failed_file"])
def test_reformat_results_refuses_a_device_as_output(tmp_path, minor, flag):
    results = write_results(tmp_path / "results.jsonl", 3)
    node = char_device(tmp_path / "node.jsonl", minor)
    other = "--failed_file" if flag == "--output_file" else "--output_file"
    done = run_script("reformat_results.py", "--input_file", results, flag, node, other, "other.jsonl",
                      cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert one_line(done.stderr, "reformat_results.py") == (
        f"reformat_results.py: error: {flag} {node} is a character device, not a regular file; "
        "give a path to a regular file")
    assert stat.S_ISCHR(os.stat(node).st_mode) and os.stat(node).st_rdev == os.makedev(1, minor)
    assert files_in(tmp_path) == ["node.jsonl", "results.jsonl"]


# --- hostile JSON in a prompts file -------------------------------------------------------------


@pytest.mark.parametrize("line,message", [
    ("[" * 100_000 + "]" * 100_000, "prompts.jsonl:2: JSON nested too deep (over 1,024 levels"),
    ('{"prompt": "half a pair \\ud800 here"}', "prompts.jsonl:2: lone surrogate \\ud800 in the text"),
    ('{"prompt": "a low one \\udc01"}', "prompts.jsonl:2: lone surrogate \\udc01 in the text"),
], ids=["deep", "high-surrogate", "low-surrogate"])
def test_hostile_json_is_one_line_with_file_and_line(tmp_path, line, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n' + line + "\n", encoding="utf-8")
    done = run_script("create_batchinput.py", "--input_file", prompts, "--model_name", MODEL, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    error = one_line(done.stderr, "create_batchinput.py")
    assert message in error
    if "surrogate" in message:
        assert "not valid Unicode" in error
    assert files_in(tmp_path) == ["prompts.jsonl"]


def test_a_valid_surrogate_pair_is_kept(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "smile \\ud83d\\ude00"}\n', encoding="utf-8")
    done = run_script("create_batchinput.py", "--input_file", prompts, "--model_name", MODEL, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    line = json.loads((tmp_path / "batchinput.jsonl").read_text(encoding="utf-8"))
    assert line["body"]["messages"][0]["content"] == "smile \U0001F600"


# --- the reformat store's own faults, and a read-only disk ---------------------------------------


def fill(folder: Path, leave: int) -> None:
    """Fill a tmpfs until only ``leave`` bytes are free."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "filler", "wb") as handle:
        handle.write(b"x" * max(0, free - leave))


def test_sqlite_database_full_in_tmpdir_names_the_folder_and_removes_it(tmp_path):
    with tmpfs(tmp_path / "small") as small:
        fill(small, 64 * 1024)
        with pytest.raises(UserError) as caught:
            with ResultStore(str(small)) as store:
                # empty records: only SQLite's pages grow, until "database or disk is full"
                store.add_results((f"request-{i}", True, b"", 0, None, None) for i in range(300_000))
        assert str(caught.value).startswith(f"temporary folder (TMPDIR) {small}: no space left on device (")
        assert "database or disk is full" in str(caught.value.__context__)
        assert files_in(small) == ["filler"]


def test_a_full_tmpdir_before_the_store_exists(tmp_path):
    with tmpfs(tmp_path / "small") as small:
        fill(small, 0)
        with pytest.raises(UserError, match="no space left on device"):
            ResultStore(str(small))
        assert files_in(small) == ["filler"]


def test_a_read_only_output_folder_is_one_line(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 3)
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        done = run_script("create_batchinput.py", "--input_file", prompts, "--model_name", MODEL,
                          "--output_file", ro / "batchinput.jsonl", cwd=tmp_path)
        assert done.returncode == 1, done.stderr
        assert one_line(done.stderr, "create_batchinput.py") == (
            f"create_batchinput.py: error: {ro / 'batchinput.jsonl'}: read-only file system; write elsewhere")
        assert files_in(ro) == []


def test_a_read_only_temporary_folder_is_one_line(tmp_path):
    # (a read-only $TMPDIR itself is passed over by Python's tempfile, which picks another)
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        with pytest.raises(UserError) as caught:
            ResultStore(str(ro))
        assert str(caught.value) == f"temporary folder (TMPDIR) {ro}: read-only file system; write elsewhere"


def test_a_lone_surrogate_in_a_result_line_is_one_line(tmp_path):
    results = write_results(tmp_path / "results.jsonl", 3)
    lines = results.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].replace("Paris", "Par\\udc00is")
    results.write_text("\n".join(lines) + "\n", encoding="utf-8")
    done = run_script("reformat_results.py", "--input_file", results, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    line = one_line(done.stderr, "reformat_results.py")
    assert f"error: {results}:2: lone surrogate \\udc00 in the text 'Par\\udc00is" in line
    assert files_in(tmp_path) == ["results.jsonl"]
