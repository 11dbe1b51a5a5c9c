"""batch_utils.py end to end: the real openai SDK over HTTP against the local Batch API
stand-in (datagen/local_batch_server.py), every flag, the partial-result, multi-part,
retry-failed and fault cases. Every call also checks that the key is in no output."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from datagen.batchapi import batch_utils
from datagen.local_batch_server import LocalBatchServer
from tests.util import ROOT, files_in, read_jsonl, write_jsonl

KEY = "sk-test-5ecret-key-0123456789abcdef"
CHAT = "/v1/chat/completions"


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        lines = [line for line in self.err.splitlines() if line.startswith("batch_utils.py: error:")]
        assert len(lines) == 1, self.err
        return lines[0]


@pytest.fixture
def server(monkeypatch):
    with LocalBatchServer(api_key=KEY) as running:
        monkeypatch.setenv("OPENAI_BASE_URL", running.base_url)
        yield running


@pytest.fixture
def api(server):
    """A key in ./openai.tok (mode 600) and OPENAI_BASE_URL pointing at the stand-in."""
    write_key(KEY)
    return server


def write_key(text: str, path: str = "openai.tok", mode: int = 0o600) -> Path:
    path = Path(path)
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def cli(capsys):
    def call(*args: str) -> Result:
        try:
            rc = batch_utils.main([*map(str, args), "--poll_interval", "0"] if "--poll_interval" not in args
                                  else list(map(str, args)))
        except SystemExit as exc:  # argparse: bad usage
            rc = exc.code
        out, err = capsys.readouterr()
        assert KEY not in out + err
        return Result(rc, out, err)
    return call


def chat_row(custom_id: str, text: str, model: str = "gpt-4o-mini") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": model, "messages": [{"role": "user", "content": text}]}}


def write_input(path="batchinput.jsonl", n: int = 10, prefix: str = "q", special: dict | None = None) -> list[dict]:
    """n chat requests q0..q{n-1}; ``special`` maps an index to a marker ([fail], [timeout])."""
    rows = [chat_row(f"{prefix}{i}", f"question {prefix}{i}" + (" " + special[i] if special and i in special else ""))
            for i in range(n)]
    write_jsonl(path, rows)
    return rows


def saved_ids() -> list[str]:
    """The batch ids in last_batch_id.tok (not its "# retry: ..." notes)."""
    return [line for line in Path("last_batch_id.tok").read_text().splitlines() if line and not line.startswith("#")]


def by_id(path) -> dict:
    return {line["custom_id"]: line for line in read_jsonl(path)}


def chat_text(line: dict) -> str:
    return line["response"]["body"]["choices"][0]["message"]["content"]


# --- the happy path --------------------------------------------------------------------


def test_run_wait_download_in_one_command(api, cli):
    rows = write_input(n=10, special={3: "[fail]", 7: "[timeout]"})
    result = cli("--run", "--wait", "--download", "results.jsonl", "--description", "eval v2")
    assert result.rc == 0, result.err
    [batch_id] = saved_ids()
    assert f"submitted {batch_id} for batchinput.jsonl (10 requests" in result.out
    assert "saved 8 output lines to results.jsonl" in result.out
    assert "saved 2 failed requests to results.jsonl.errors.jsonl (1 invalid_prompt, 1 request_timeout)" in result.out
    output = read_jsonl("results.jsonl")
    answered_in_input_order = [r["custom_id"] for r in rows if r["custom_id"] not in ("q3", "q7")]
    assert [line["custom_id"] for line in output] != answered_in_input_order  # shuffled by the API
    assert {line["custom_id"]: chat_text(line) for line in output} == {
        f"q{i}": f"echo: question q{i}" for i in range(10) if i not in (3, 7)}
    errors = by_id("results.jsonl.errors.jsonl")
    assert errors["q3"]["response"]["status_code"] == 400 and errors["q7"]["error"]["code"] == "request_timeout"
    assert sorted(files_in(".")) == ["batchinput.jsonl", "last_batch_id.history.jsonl", "last_batch_id.manifest.json",
                                     "last_batch_id.tok", "openai.tok", "results.jsonl", "results.jsonl.errors.jsonl",
                                     "results.jsonl.source.json"]
    digest = hashlib.sha256(Path("batchinput.jsonl").read_bytes()).hexdigest()
    assert api.batches[batch_id].obj["metadata"] == {"source_file": "batchinput.jsonl", "source_sha256": digest,
                                                     "description": "eval v2"}


def test_separate_commands_and_check(api, cli):
    write_input(n=4)
    assert cli("--run").rc == 0
    [batch_id] = saved_ids()
    check = cli("--check")
    assert check.rc == 0 and check.out.startswith(f"{batch_id} (from batchinput.jsonl): in_progress")
    assert "requests: 4 total, 0 completed, 0 failed" in check.out and "expires" in check.out
    raw = cli("--check", "--json")
    [obj] = [json.loads(line) for line in raw.out.splitlines()]
    assert obj["id"] == batch_id and obj["status"] == "in_progress" and obj["request_counts"]["total"] == 4
    assert cli("--wait").rc == 0
    done = cli("--check", "--id", batch_id)
    assert f"{batch_id} (from batchinput.jsonl): completed" in done.out and "requests: 4 total, 4 completed, 0 failed" in done.out
    assert "files: input file-" in done.out and "errors -" in done.out
    result = cli("--download", "results.jsonl")
    assert result.rc == 0 and "saved 4 output lines" in result.out and "no failed requests" in result.out
    assert len(read_jsonl("results.jsonl")) == 4 and not Path("results.jsonl.errors.jsonl").exists()


@pytest.mark.parametrize("endpoint, body, text_of", [
    ("/v1/responses", {"input": "hello"},
     lambda b: [c["text"] for i in b["output"] if i["type"] == "message" for c in i["content"]
                if c["type"] == "output_text"][0]),
    ("/v1/completions", {"prompt": "hello"}, lambda b: b["choices"][0]["text"]),
    ("/v1/embeddings", {"input": "hello"}, lambda b: len(b["data"][0]["embedding"])),
])
def test_endpoint_is_taken_from_the_file(api, cli, endpoint, body, text_of):
    write_jsonl("batchinput.jsonl", [{"custom_id": "a", "method": "POST", "url": endpoint,
                                      "body": {"model": "m", **body}}])
    assert cli("--run", "--wait", "--download", "out.jsonl").rc == 0
    [batch] = api.batches.values()
    assert batch.obj["endpoint"] == endpoint
    [line] = read_jsonl("out.jsonl")
    assert text_of(line["response"]["body"]) == ("echo: hello" if endpoint != "/v1/embeddings" else 8)


def test_list_recent_batches(api, cli):
    empty = cli()
    assert empty.rc == 0 and "no batches at" in empty.out
    write_input(n=2)
    for description in ("first", "second", "third"):  # the same file again: --force
        assert cli("--run", "--force", "--description", description).rc == 0
    listing = cli("--limit", "2")
    lines = listing.out.splitlines()
    assert lines[0].startswith("2 most recent batch(es) at http://127.0.0.1:")
    assert lines[1].split() == ["batch", "status", "created", "endpoint", "completed/failed/total", "description",
                                "or", "input"]
    assert lines[2].startswith(f"* {saved_ids()[0]}") and lines[2].endswith("third")
    assert lines[3].endswith("second") and not lines[3].startswith("*") and len(lines) == 4


def test_list_counts_completed_and_failed_apart(api, cli):
    """A batch whose 2 requests all failed is 0/2/2, never "2/2"."""
    write_input("failing.jsonl", n=2, special={0: "[fail]", 1: "[fail]"})
    assert cli("--run", "--file", "failing.jsonl", "--wait").rc == 0
    [batch_id] = saved_ids()
    [header, row] = cli().out.splitlines()[1:]
    assert row.split()[0:3] == ["*", batch_id, "completed"] and row.split()[-2:] == ["0/2/2", "failing.jsonl"]
    assert header.index("completed/failed/total") + len("completed/failed/total") == row.index("0/2/2") + 5


def test_key_from_environment_and_key_file(server, cli, monkeypatch):
    write_input(n=1)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert cli("--run").rc == 0
    monkeypatch.delenv("OPENAI_API_KEY")
    write_key(KEY, "secret.key")
    assert cli("--check", "--key_file", "secret.key").rc == 0
    missing = cli("--check", "--key_file", "nope.key")
    assert missing.rc == 1 and "--key_file nope.key: no such file" in missing.error_line


def test_base_url_flag_azure_style_path(server, cli, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL")
    write_key(KEY)
    write_input(n=2)
    azure_like = f"http://127.0.0.1:{server.port}/openai/v1/"
    result = cli("--run", "--wait", "--download", "out.jsonl", "--base_url", azure_like)
    assert result.rc == 0 and len(read_jsonl("out.jsonl")) == 2


def test_progress_bar_lines_in_a_log(api, cli, monkeypatch):
    monkeypatch.setenv("DATAGEN_PROGRESS_INTERVAL", "0")
    write_input(n=6)
    result = cli("--run", "--wait")
    assert result.rc == 0
    bar_lines = [line for line in result.err.splitlines() if line.startswith("requests:")]
    assert bar_lines and "6/6" in bar_lines[-1] and all("\r" not in line for line in bar_lines)
    assert "in_progress -> finalizing (6/6 done, 0 failed)" in result.err


# --- multi-part runs ------------------------------------------------------------------


def test_multi_part_run_check_wait_download(api, cli):
    write_input("batchinput.part-001.jsonl", n=4, prefix="a", special={1: "[fail]"})
    write_input("batchinput.part-002.jsonl", n=4, prefix="b")
    write_input("batchinput.part-003.jsonl", n=3, prefix="c", special={0: "[timeout]"})
    run = cli("--run")
    assert run.rc == 0 and "saved 3 batch id(s) in last_batch_id.tok" in run.out
    ids = saved_ids()
    assert len(ids) == 3 and [api.batches[i].obj["metadata"]["source_file"] for i in ids] == [
        f"batchinput.part-00{n}.jsonl" for n in (1, 2, 3)]
    check = cli("--check")
    assert [line.split(" ")[0] for line in check.out.splitlines() if line.startswith("batch_")] == ids
    some = cli("--check", "--id", f"{ids[2]},{ids[0]}")
    assert [line.split(" ")[0] for line in some.out.splitlines() if line.startswith("batch_")] == [ids[2], ids[0]]
    assert cli("--wait").rc == 0
    result = cli("--download", "results.jsonl")
    assert result.rc == 0 and "saved 9 output lines to results.jsonl (from 3 batches)" in result.out
    assert set(by_id("results.jsonl")) == {"a0", "a2", "a3", "b0", "b1", "b2", "b3", "c1", "c2"}
    assert set(by_id("results.jsonl.errors.jsonl")) == {"a1", "c0"}


def test_multi_part_cancel_acts_on_all(api, cli):
    write_input("batchinput.part-001.jsonl", n=2, prefix="a")
    write_input("batchinput.part-002.jsonl", n=2, prefix="b")
    assert cli("--run").rc == 0
    result = cli("--cancel")
    assert result.rc == 0 and result.out.count(": cancelling (") == 2
    assert cli("--wait").rc == 5
    assert {b.obj["status"] for b in api.batches.values()} == {"cancelled"}


# --- partial results ------------------------------------------------------------------


def test_expired_batch_keeps_finished_requests_and_retry_failed(api, cli):
    rows = write_input(n=6)
    assert cli("--run").rc == 0
    [batch_id] = saved_ids()
    api.step(batch_id, 2)  # validated, first half answered
    api.expire(batch_id)
    wait = cli("--wait")
    assert wait.rc == 4 and f"{batch_id} (from batchinput.jsonl): expired (3 completed, 3 failed of 6)" in wait.out
    result = cli("--download", "results.jsonl")
    assert result.rc == 0 and "saved 3 failed requests to results.jsonl.errors.jsonl (3 batch_expired)" in result.out
    assert set(by_id("results.jsonl")) == {"q0", "q1", "q2"}
    assert set(by_id("results.jsonl.errors.jsonl")) == {"q3", "q4", "q5"}
    retry = cli("--retry_failed", "retry.jsonl")
    assert retry.rc == 0 and "wrote 3 requests that failed or expired (3 batch_expired) to retry.jsonl" in retry.out
    assert read_jsonl("retry.jsonl") == rows[3:]  # the very same lines, in input order
    again = cli("--run", "--wait", "--download", "retried.jsonl", "--file", "retry.jsonl")
    assert again.rc == 0 and set(by_id("retried.jsonl")) == {"q3", "q4", "q5"}


def test_cancelled_batch_download_and_exit_status(api, cli):
    write_input(n=4)
    assert cli("--run").rc == 0
    [batch_id] = saved_ids()
    api.step(batch_id, 2)  # half answered
    api.hold()  # so that --cancel's own status check does not move it on
    assert cli("--cancel").rc == 0
    api.hold(False)
    result = cli("--wait", "--download", "results.jsonl")
    assert result.rc == 5
    assert set(by_id("results.jsonl")) == {"q0", "q1"}
    assert [line["error"]["code"] for line in read_jsonl("results.jsonl.errors.jsonl")] == ["batch_cancelled"] * 2
    assert "already cancelled" in cli("--cancel").out


@pytest.mark.parametrize("empty_file_ids", [False, True])
def test_completed_batch_without_output_file(cli, monkeypatch, empty_file_ids):
    """Every request failed: no output file at all (its id null, or an empty string)."""
    with LocalBatchServer(api_key=KEY, empty_file_ids=empty_file_ids) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        write_key(KEY)
        write_input(n=2, special={0: "[fail]", 1: "[timeout]"})
        result = cli("--run", "--wait", "--download", "results.jsonl")
        [batch] = server.batches.values()
        assert batch.obj["output_file_id"] == ("" if empty_file_ids else None)
    assert result.rc == 0 and "saved 0 output lines to results.jsonl" in result.out
    assert Path("results.jsonl").read_text() == "" and len(read_jsonl("results.jsonl.errors.jsonl")) == 2


def test_retry_failed_from_a_downloaded_errors_file_without_the_api(cli):
    rows = write_input(n=5)
    write_jsonl("errors.jsonl", [
        {"id": "r1", "custom_id": "q1", "response": None, "error": {"code": "batch_expired", "message": "x"}},
        {"id": "r2", "custom_id": "q4", "response": {"status_code": 500, "body": {"error": {"message": "boom"}}},
         "error": None}])
    result = cli("--retry_failed", "retry.jsonl", "--errors_file", "errors.jsonl")
    assert result.rc == 0 and "(1 batch_expired, 1 http_500)" in result.out
    assert read_jsonl("retry.jsonl") == [rows[1], rows[4]]


def test_retry_failed_refusals(api, cli):
    write_input(n=3)
    write_jsonl("errors.jsonl", [{"custom_id": "zz", "response": None, "error": {"code": "batch_expired"}}])
    result = cli("--retry_failed", "retry.jsonl", "--errors_file", "errors.jsonl")
    assert result.rc == 1 and "1 failed custom_id(s) are not in batchinput.jsonl (e.g. 'zz')" in result.error_line
    same = cli("--retry_failed", "batchinput.jsonl", "--errors_file", "errors.jsonl")
    assert same.rc == 1 and "is the same file as the input" in same.error_line
    assert sorted(files_in(".")) == ["batchinput.jsonl", "errors.jsonl", "openai.tok"]
    write_jsonl("errors.jsonl", [])
    assert "nothing to retry" in cli("--retry_failed", "retry.jsonl", "--errors_file", "errors.jsonl").out
    assert not Path("retry.jsonl").exists()
    assert cli("--run").rc == 0
    busy = cli("--retry_failed", "retry.jsonl")
    assert busy.rc == 1 and "is in_progress; wait for it with --wait before --retry_failed" in busy.error_line


# --- batches the API refused ------------------------------------------------------------


def test_server_side_validation_failure_is_reported_with_line_numbers(api, cli):
    import openai

    write_input("sneaky.jsonl", n=3)
    path = Path("sneaky.jsonl")
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace("gpt-4o-mini", "gpt-4o")  # the local check would have caught this
    path.write_text("\n".join(lines) + "\n")
    with openai.OpenAI(api_key=KEY, base_url=api.base_url) as client, open(path, "rb") as handle:
        uploaded = client.files.create(file=handle, purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    wait = cli("--wait", "--id", batch.id)
    assert wait.rc == 3 and "input refused: line 2: mismatched_model" in wait.out
    check = cli("--check", "--id", batch.id)
    assert f"{batch.id}: failed" in check.out and "    line 2: mismatched_model: The model 'gpt-4o'" in check.out
    download = cli("--download", "results.jsonl", "--id", batch.id)
    assert download.rc == 1 and "failed: its input was refused (line 2: mismatched_model" in download.error_line
    assert not Path("results.jsonl").exists()


def test_token_limit_failure_exit_status(cli, monkeypatch):
    with LocalBatchServer(api_key=KEY, token_limit=2) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        write_key(KEY)
        write_input(n=3)
        result = cli("--run", "--wait", "--download", "results.jsonl")
    assert result.rc == 3 and "token_limit_exceeded" in result.out
    assert not Path("results.jsonl").exists()


# --- bad input and faults: one line, no partial file ----------------------------------------


def test_no_key(server, cli):
    write_input(n=1)
    result = cli("--run")
    assert result.rc == 1
    assert result.error_line == ("batch_utils.py: error: no API key: put it in openai.tok in this folder "
                                 "(then chmod 600 openai.tok), pass --key_file FILE, or set OPENAI_API_KEY")
    assert server.hits == [] and not Path("last_batch_id.tok").exists()


def test_empty_key_file(server, cli, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the file wins, and it is empty: say so
    write_key("\n")
    result = cli("--check", "--id", "batch_abc")
    assert result.rc == 1 and "openai.tok is empty; put your API key on its one line" in result.error_line


def test_wrong_key(server, cli):
    write_key("sk-wrong-0000000000000000")
    write_input(n=1)
    result = cli("--run")
    assert result.rc == 1
    assert ("looking for earlier batches of batchinput.jsonl: the API refused the key from openai.tok (401 "
            "invalid_api_key)"
            in result.error_line)
    assert "sk-wrong-0000000000000000" not in result.err and not Path("last_batch_id.tok").exists()


def test_unknown_batch_id(api, cli):
    result = cli("--check", "--id", "batch_doesnotexist")
    assert result.rc == 1 and "batch batch_doesnotexist: not found at http://127.0.0.1:" in result.error_line
    assert "check --id or last_batch_id.tok" in result.error_line


@pytest.mark.parametrize("action", [["--check"], ["--download", "results.jsonl"], ["--wait"], ["--cancel"]])
def test_no_saved_id(api, cli, action):
    result = cli(*action)
    assert result.rc == 1
    assert ("no batch id: last_batch_id.tok does not exist here; pass --id BATCH_ID, or submit a batch with "
            "--run first") in result.error_line
    assert sorted(files_in(".")) == ["openai.tok"]


@pytest.mark.parametrize("content, message", [
    ("batch_ok123\nthis is not an id\n",
     "last_batch_id.tok:2: 'this is not an id' is not a batch id; the file is corrupt"),
    ('{"id": "batch_1"}\n', "last_batch_id.tok:1: '{\"id\": \"batch_1\"}' is not a batch id"),
    ("\n\n", "last_batch_id.tok is empty"),
])
def test_corrupt_ids_file(api, cli, content, message):
    Path("last_batch_id.tok").write_text(content)
    result = cli("--download", "results.jsonl")
    assert result.rc == 1 and message in result.error_line
    assert not Path("results.jsonl").exists() and api.hits == []


def test_binary_ids_file(api, cli):
    Path("last_batch_id.tok").write_bytes(b"\xff\xfe\x00garbage")
    result = cli("--check")
    assert result.rc == 1 and "last_batch_id.tok is corrupt (not text)" in result.error_line


def test_download_while_in_progress(api, cli):
    write_input(n=4)
    assert cli("--run").rc == 0
    cli("--check")  # validating -> in_progress
    result = cli("--download", "results.jsonl")
    assert result.rc == 1
    assert "is in_progress (2/4 requests done); nothing to download yet: wait for it with --wait" in result.error_line
    assert sorted(files_in(".")) == ["batchinput.jsonl", "last_batch_id.history.jsonl", "last_batch_id.manifest.json",
                                     "last_batch_id.tok", "openai.tok"]  # every --run keeps its manifest


@pytest.mark.parametrize("lines, message", [
    ([chat_row("a", "x"), chat_row("a", "y")],
     "batchinput.jsonl:2: duplicate custom_id 'a' (first at batchinput.jsonl:1)"),
    ([chat_row("a", "x"), chat_row("b", "y", model="gpt-4o")], "batchinput.jsonl:2: model 'gpt-4o' differs"),
    ([chat_row("a", "x"), {"custom_id": "b"}], "batchinput.jsonl:2: missing method, url, body"),
    ([], "batchinput.jsonl: no requests; the batch file is empty"),
])
def test_local_check_refuses_before_any_upload(api, cli, lines, message):
    write_jsonl("batchinput.jsonl", lines)
    result = cli("--run", "--wait", "--download", "results.jsonl")
    assert result.rc == 1 and message in result.error_line
    assert api.hits == [] and sorted(files_in(".")) == ["batchinput.jsonl", "openai.tok"]


def test_local_check_covers_every_part_before_uploading(api, cli):
    write_input("batchinput.part-001.jsonl", n=2, prefix="a")
    Path("batchinput.part-002.jsonl").write_text('{"custom_id": "b0", "method": "POST"\n')
    result = cli("--run")
    assert result.rc == 1 and "batchinput.part-002.jsonl:1: not valid JSON" in result.error_line
    assert api.hits == [] and not Path("last_batch_id.tok").exists()


def test_missing_input_file(api, cli):
    result = cli("--run", "--file", "nothing.jsonl")
    assert result.rc == 1 and "nothing.jsonl: no such file (and no nothing.part-001.jsonl parts)" in result.error_line


def test_download_to_a_missing_folder_is_refused_before_submitting(api, cli):
    write_input(n=1)
    result = cli("--run", "--wait", "--download", "no/such/folder/results.jsonl")
    assert result.rc == 1 and "folder no/such/folder does not exist" in result.error_line and api.hits == []


def test_description_too_long(api, cli):
    write_input(n=1)
    result = cli("--run", "--description", "x" * 513)
    assert result.rc == 1 and "--description is 513 characters" in result.error_line and api.hits == []


@pytest.mark.parametrize("args, message", [
    (["--cancel", "--run"], "--cancel goes alone"),
    (["--run", "--download", "out.jsonl"], "--run --download needs --wait"),
    (["--run", "--id", "batch_abc"], "--run makes new batches"),
    (["--retry_failed", "r.jsonl", "--wait"], "--retry_failed goes alone"),
    (["--json"], "--json goes with --check"),
    (["--max_retries", "-1"], "--max_retries must be 0 or more"),
])
def test_bad_usage_exits_2(cli, args, message, capsys):
    result = cli(*args)
    assert result.rc == 2 and message in result.err


@pytest.mark.parametrize("args, message", [
    (["--run", "--max_cost", "nan", "--input_price", "1", "--output_price", "1"],
     "argument --max_cost: nan is not a finite number; give a number of 0 or more"),
    (["--run", "--wait", "--max_cost", "5", "--input_price", "nan", "--output_price", "1"],
     "argument --input_price: nan is not a finite number; give a number of 0 or more"),
    (["--run", "--max_cost", "5", "--input_price", "1", "--output_price", "inf"],
     "argument --output_price: inf is not a finite number; give a number of 0 or more"),
    (["--run", "--max_cost=-inf", "--input_price", "1", "--output_price", "1"],
     "argument --max_cost: -inf is not a finite number; give a number of 0 or more"),
    (["--wait", "--poll_interval", "NaN"], "argument --poll_interval: NaN is not a finite number"),
    (["--run", "--max_cost", "1e400"], "argument --max_cost: 1e400 is not a finite number"),
])
def test_numbers_that_are_not_numbers_are_refused_before_any_upload(api, cli, args, message):
    write_input(n=2, special=None)
    result = cli(*args)
    assert result.rc == 2 and f"batch_utils.py: error: {message}" in result.err
    assert api.hits == [] and sorted(files_in(".")) == ["batchinput.jsonl", "openai.tok"]


@pytest.mark.parametrize("script, args, message", [
    ("create_batchinput.py", ["--input_file", "p.jsonl", "--model_name", "m", "--dry_run", "--input_price", "nan"],
     "argument --input_price: nan is not a finite number"),
    ("generate_data_finetuned.py", ["--model_name_or_path", "m", "--input_file", "p.jsonl",
                                    "--gpu_memory_utilization", "nan"],
     "argument --gpu_memory_utilization: nan is not a finite number; give a number from "
     "0.01 to 1"),
])
def test_every_script_refuses_non_finite_float_flags(capsys, script, args, message):
    import importlib

    package = {"create_batchinput.py": "datagen.batchapi", "generate_data_finetuned.py": "datagen.finetuned"}
    module = importlib.import_module(f"{package[script]}.{script[:-3]}")  # the root scripts are thin shims
    with pytest.raises(SystemExit) as exit_info:
        module.build_parser().parse_args(args)
    assert exit_info.value.code == 2 and f"{script}: error: {message}" in capsys.readouterr().err


def test_local_stand_in_refuses_a_non_finite_step(capsys):
    from datagen.local_batch_server.__main__ import main as server_main

    with pytest.raises(SystemExit) as exit_info:
        server_main(["--step_seconds", "nan"])
    assert exit_info.value.code == 2 and "argument --step_seconds: nan is not a finite number" in \
        capsys.readouterr().err


def test_cost_guard_never_passes_a_nan_estimate():
    from datagen.batchapi.batch_state import Part
    from datagen.batchapi.estimates import check_cost
    from datagen.common.errors import UserError

    parts = [Part("a.jsonl", "0" * 64, 1, 10, 10, "m", CHAT)]
    with pytest.raises(UserError, match="give finite prices and cap"):
        check_cost(parts, 1.0, float("nan"), 1.0)
    with pytest.raises(UserError, match="give finite prices and cap"):
        check_cost(parts, float("nan"), 1.0, 1.0)
    check_cost(parts, 1.0, 1.0, 1.0)  # 20 tokens at $1 per 1M: under the cap


def test_cost_cap_holds_on_text_that_is_not_english(api, cli):
    """chars / 4 would estimate 1,000 CJK characters at 250 tokens, a quarter of the bill."""
    from datagen.batchapi.estimates import input_tokens

    assert input_tokens({"prompt": "abcd" * 10}) == 10 and input_tokens({"prompt": "日本語の文章"}) == 6
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert input_tokens({"prompt": "abcd", "response_format": schema}) == -(-(4 + len(json.dumps(schema))) // 4)
    row = chat_row("a", "語" * 1000)
    row["body"]["max_completion_tokens"] = 1
    write_jsonl("batchinput.jsonl", [row])
    result = cli("--run", "--max_cost", "0.5", "--input_price", "1000", "--output_price", "1000")  # $0.001 a token
    assert result.rc == 1 and "over --max_cost $0.5000; nothing was submitted" in result.error_line
    assert api.hits == []


@pytest.mark.parametrize("name, content, message", [
    ("questions.csv", "id,prompt\na,hi\n",
     "questions.csv is a prompts file, not a batch input (OpenAI request lines); make one with: python "
     "create_batchinput.py --input_file questions.csv --model_name MODEL --output_file batchinput.jsonl"),
    ("questions.parquet", "not really parquet", "questions.parquet is a prompts file, not a batch input"),
    ("questions.jsonl", '{"id": "a", "prompt": "hi"}\n',
     "questions.jsonl is a prompts file, not a batch input (OpenAI request lines); make one with: python "
     "create_batchinput.py --input_file questions.jsonl --model_name MODEL --output_file batchinput.jsonl"),
    ("results.jsonl", '{"id": "batch_req_1", "custom_id": "a", "response": {"status_code": 200, "body": {}}, '
                      '"error": null}\n',
     "results.jsonl is an OpenAI results file (Batch API output lines), not a batch input; reformat it with: "
     "python reformat_results.py --input_file results.jsonl --batch_input BATCHINPUT.jsonl"),
    ("gen.a.jsonl", '{"custom_id": "q0", "generated_text": "HH", "finish_reason": "length", "prompt_tokens": 21, '
                    '"completion_tokens": 2, "source": "finetuned", "run": "a", "model": "tiny/base"}\n',
     "gen.a.jsonl is a fine-tuned generations file (generate_data_finetuned.py), not a batch input; reformat it "
     "with: python reformat_results.py --input_file gen.a.jsonl --batch_input BATCHINPUT.jsonl"),
    ("gen.b.jsonl", '{"custom_id": "q0", "error": {"code": "too_long", "message": "over the context"}, '
                    '"source": "finetuned", "run": "b"}\n',  # a failed record first
     "gen.b.jsonl is a fine-tuned generations file (generate_data_finetuned.py), not a batch input"),
    ("ref_a.jsonl", '{"id": "q0", "generated_text": "HH", "source": "finetuned", "run": "a", "model": "tiny/base", '
                    '"finish_reason": "length"}\n',
     "ref_a.jsonl is already reformatted (reformat_results.py output), not a batch input; compare it with: python "
     "reformat_results.py --compare ref_a.jsonl OTHER.jsonl --batch_input BATCHINPUT.jsonl"),
    ("table.jsonl", '{"id": "q0", "prompt": "hi", "a": "HH", "a.status": "ok", "b": "", "b.status": "failed"}\n',
     "table.jsonl is a --compare table (reformat_results.py output), not a batch input; make one from the prompts "
     "file with: python create_batchinput.py --input_file PROMPTS --model_name MODEL"),
])
def test_run_on_a_file_that_is_not_a_batch_input_says_what_it_is(api, cli, name, content, message):
    Path(name).write_text(content)
    result = cli("--run", "--file", name)
    assert result.rc == 1 and message in result.error_line
    assert api.hits == [] and sorted(files_in(".")) == sorted([name, "openai.tok"])


# --- faults survived ------------------------------------------------------------------


def test_429_and_500_bursts_on_upload_and_polling(api, cli):
    write_input(n=4)
    api.inject(429, count=3, method="POST", path="^/files$")
    api.inject(500, count=2, method="POST", path="^/batches$")
    api.inject(429, count=2, method="GET", path="^/batches/")
    api.inject(500, count=2, method="GET", path="^/batches/")
    result = cli("--run", "--wait", "--download", "results.jsonl")
    assert result.rc == 0, result.err
    statuses = [(method, path.split("/")[1], status) for method, path, status in api.hits]
    assert statuses[0] == ("GET", "batches", 200)  # the look for an earlier batch of the same file
    statuses = statuses[1:]
    assert statuses[:4] == [("POST", "files", 429)] * 3 + [("POST", "files", 200)]
    assert statuses[4:7] == [("POST", "batches", 500)] * 2 + [("POST", "batches", 200)]
    assert [s for m, p, s in statuses if m == "GET" and p == "batches"][:5] == [429, 429, 500, 500, 200]
    assert len(read_jsonl("results.jsonl")) == 4


def test_retries_exhausted_is_one_line(api, cli):
    write_input(n=1)
    api.inject(429, count=10, method="POST", path="^/files$")
    result = cli("--run", "--max_retries", "2")
    assert result.rc == 1
    assert "uploading batchinput.jsonl: rate limited (429) after 2 retries" in result.error_line
    assert "raise --max_retries" in result.error_line and not Path("last_batch_id.tok").exists()


def test_second_part_failing_keeps_the_first_id(api, cli):
    write_input("batchinput.part-001.jsonl", n=2, prefix="a")
    write_input("batchinput.part-002.jsonl", n=2, prefix="b")
    api.inject(500, count=1, method="POST", path="^/batches$", skip=1)  # the second create fails
    result = cli("--run", "--max_retries", "0")
    assert result.rc == 1
    assert ("creating the batch for batchinput.part-002.jsonl: the server failed (500) (retries are off: "
            "--max_retries 0)") in result.error_line
    assert "1 batch(es) made before this one are saved in last_batch_id.tok" in result.error_line
    assert len(saved_ids()) == 1 and api.batches[saved_ids()[0]].obj["metadata"]["source_file"] == \
        "batchinput.part-001.jsonl"


def test_dropped_download_leaves_nothing_and_a_rerun_completes(api, cli):
    write_input(n=20, special={5: "[fail]"})
    assert cli("--run", "--wait").rc == 0
    api.drop_downloads(count=1, after_bytes=700)
    result = cli("--download", "results.jsonl", "--max_retries", "0")
    assert result.rc == 1
    assert "the connection dropped after" in result.error_line
    assert "nothing was saved; rerun the same command to download it again" in result.error_line
    assert sorted(files_in(".")) == ["batchinput.jsonl", "last_batch_id.history.jsonl", "last_batch_id.manifest.json", "last_batch_id.tok",
                                     "openai.tok"]
    rerun = cli("--download", "results.jsonl", "--max_retries", "0")
    assert rerun.rc == 0 and len(read_jsonl("results.jsonl")) == 19
    assert len(read_jsonl("results.jsonl.errors.jsonl")) == 1


def test_dropped_download_is_restarted_within_the_command(api, cli):
    write_input(n=20)
    assert cli("--run", "--wait").rc == 0
    api.drop_downloads(count=1, after_bytes=700)
    result = cli("--download", "results.jsonl", "--max_retries", "1")
    assert result.rc == 0 and "connection dropped after" in result.err and "retry 1 of 1" in result.err
    lines = read_jsonl("results.jsonl")
    assert len(lines) == 20 and len({line["custom_id"] for line in lines}) == 20


def test_download_errors_after_the_sdk_retries_are_one_line(api, cli):
    write_input(n=2)
    assert cli("--run", "--wait").rc == 0
    api.inject(500, count=10, method="GET", path="/content$")
    result = cli("--download", "results.jsonl", "--max_retries", "1")
    assert result.rc == 1 and "downloading the output of batch_" in result.error_line
    assert "the server failed (500) after 1 retries" in result.error_line
    assert sorted(files_in(".")) == ["batchinput.jsonl", "last_batch_id.history.jsonl", "last_batch_id.manifest.json", "last_batch_id.tok",
                                     "openai.tok"]


def test_download_never_overwrites_the_input_or_state_files(api, cli):
    write_input(n=1)
    for target in ("batchinput.jsonl", "openai.tok"):
        result = cli("--run", "--wait", "--download", target)
        assert result.rc == 1 and "is the same file as the input" in result.error_line and api.hits == []


def test_outputs_get_the_usual_file_mode(api, cli):
    write_input(n=2, special={0: "[fail]"})
    old = os.umask(0o022)
    try:
        assert cli("--run", "--wait", "--download", "results.jsonl").rc == 0
    finally:
        os.umask(old)
    assert Path("results.jsonl").stat().st_mode & 0o777 == 0o644
    assert Path("results.jsonl.errors.jsonl").stat().st_mode & 0o777 == 0o644


def test_stale_errors_file_is_removed(api, cli):
    Path("results.jsonl.errors.jsonl").write_text('{"old": true}\n')
    write_input(n=2)
    assert cli("--run", "--wait", "--download", "results.jsonl").rc == 0
    assert not Path("results.jsonl.errors.jsonl").exists()


# --- the key --------------------------------------------------------------------------


def test_warning_when_key_file_is_readable_by_others(api, cli):
    write_input(n=1)
    write_key(KEY, mode=0o644)
    result = cli("--check", "--id", "batch_nope")
    assert "openai.tok is readable by other users (mode 644); protect the key with: chmod 600 openai.tok" in result.err
    write_key(KEY, mode=0o600)
    assert "readable by other users" not in cli("--check", "--id", "batch_nope").err


def test_key_never_printed_even_at_debug(server, tmp_path):
    """Run the script as a user would, with every log switched on, through success and failure."""
    write_key(KEY)
    write_input(n=3, special={1: "[fail]"})
    env = {"OPENAI_BASE_URL": server.base_url, "OPENAI_LOG": "debug", "DATAGEN_PROGRESS_INTERVAL": "0"}
    outputs = []
    server.inject(429, count=1)
    for args in (["--run", "--wait", "--download", "r.jsonl", "--poll_interval", "0"], ["--check"],
                 ["--check", "--json"], [], ["--retry_failed", "retry.jsonl"], ["--check", "--id", "batch_nope"]):
        done = subprocess.run([sys.executable, str(ROOT / "batch_utils.py"), *args, "--log_level", "DEBUG"],
                              cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == (1 if "batch_nope" in args else 0), done.stderr
    write_key(KEY + "-wrong")
    done = subprocess.run([sys.executable, str(ROOT / "batch_utils.py"), "--check", "--log_level", "DEBUG"],
                          cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "401" in done.stderr
    outputs.append(done.stdout + done.stderr)
    everything = "\n".join(outputs)
    assert "DEBUG Batch API at http://127.0.0.1:" in everything  # the debug logs did run
    assert KEY not in everything and KEY[8:] not in everything


# --- Ctrl+C while waiting -------------------------------------------------------------


def test_ctrl_c_stops_waiting_and_leaves_the_batch_alone(api, tmp_path):
    write_input(n=2)
    api.hold()
    done = subprocess.run([sys.executable, str(ROOT / "batch_utils.py"), "--run"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    [batch_id] = saved_ids()
    process = subprocess.Popen([sys.executable, str(ROOT / "batch_utils.py"), "--wait", "--poll_interval", "0.05"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in process.stderr:  # wait until it is polling
        seen.append(line)
        if f"{batch_id}: validating" in line:
            break
    process.send_signal(signal.SIGINT)
    rest_out, rest_err = process.communicate(timeout=60)
    assert process.returncode == 130, "".join(seen) + rest_err
    assert "stopped waiting; the batch(es) go on at the API" in rest_err
    assert "batch_utils.py: interrupted" in rest_err
    assert api.batches[batch_id].obj["status"] == "validating"
    assert not [hit for hit in api.hits if hit[1].endswith("/cancel")]
