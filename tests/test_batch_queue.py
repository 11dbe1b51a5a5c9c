"""The queue of batch_utils.py --run --wait: many parts through an enqueued-token limit,
over real HTTP against the local stand-in (which enforces the limit per model), with
real subprocesses and real signals for the kill, Ctrl+C and torn-manifest cases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from datagen.batchapi.batch_queue import RESUBMIT_PER_FINISH
from datagen.batchapi.batchfile import part_path
from datagen.batchapi.estimates import estimate_tokens, usd
from datagen.local_batch_server import LocalBatchServer
from tests.test_batch_utils import CHAT, KEY, cli, write_key  # noqa: F401 (fixture)
from tests.util import ROOT, files_in, read_jsonl, write_jsonl

PARTS, PER_PART = 12, 5
MANIFEST = "last_batch_id.manifest.json"
COMMAND = ("--run", "--wait", "--download", "results.jsonl")


def write_parts(parts: int = PARTS, per_part: int = PER_PART) -> int:
    """STEM.part-NNN.jsonl files of equal size; returns the estimated tokens of one part."""
    tokens = set()
    for number in range(1, parts + 1):
        rows = [{"custom_id": f"p{number:03d}-{i:03d}", "method": "POST", "url": CHAT,
                 "body": {"model": "gpt-4o-mini", "max_completion_tokens": 10,
                          "messages": [{"role": "user", "content": f"question {number:03d}-{i:03d}"}]}}
                for i in range(per_part)]
        write_jsonl(part_path(Path("batchinput.jsonl"), number), rows)
        tokens.add(sum(estimate_tokens(CHAT, row["body"]) for row in rows))
    [part_tokens] = tokens
    return part_tokens


def all_ids(parts: int = PARTS, per_part: int = PER_PART) -> list[str]:
    return sorted(f"p{n:03d}-{i:03d}" for n in range(1, parts + 1) for i in range(per_part))


def part_names(parts: int = PARTS) -> list[str]:
    return [part_path(Path("batchinput.jsonl"), n).name for n in range(1, parts + 1)]


@pytest.fixture
def limited(monkeypatch):
    """The stand-in with an enqueued-token limit that admits 3 parts at a time."""
    part_tokens = write_parts()
    with LocalBatchServer(api_key=KEY, token_limit=3 * part_tokens, work_steps=8) as server:  # parts overlap
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        write_key(KEY)
        server.part_tokens = part_tokens
        yield server


def batches_by_part(server) -> dict[str, Counter]:
    """source_file -> how many of its batches ended in each status (or are still running)."""
    found: dict[str, Counter] = {}
    for batch in server.batches.values():
        name = batch.obj["metadata"]["source_file"]
        status = batch.obj["status"]
        if status == "failed" and batch.obj["errors"]["data"][0]["code"] == "token_limit_exceeded":
            status = "refused"
        found.setdefault(name, Counter())[status] += 1
    return found


def assert_each_request_once(output="results.jsonl") -> None:
    ids = [line["custom_id"] for line in read_jsonl(output)]
    assert sorted(ids) == all_ids()  # every request, none twice


def assert_no_part_twice(server) -> None:
    """Per part: exactly one batch that was not refused, and it completed."""
    for name, statuses in batches_by_part(server).items():
        kept = {status: n for status, n in statuses.items() if status != "refused"}
        assert kept == {"completed": 1}, (name, statuses)


def manifest() -> dict:
    return json.loads(Path(MANIFEST).read_text())


# --- the queue in one command ----------------------------------------------------------


def test_twelve_parts_through_a_limit_of_three(limited, cli):
    result = cli(*COMMAND)
    assert result.rc == 0, result.err
    assert_each_request_once()
    assert_no_part_twice(limited)
    statuses = batches_by_part(limited)
    # parts went one at a time until one was refused; then the limit its message states paced the rest
    assert 1 <= sum(s["refused"] for s in statuses.values()) <= 3
    assert "back in the queue until a batch of gpt-4o-mini ends" in result.err
    state = manifest()
    assert [p["state"] for p in state["parts"]] == ["done"] * PARTS
    assert state["limits"] == {"gpt-4o-mini": 3 * limited.part_tokens}  # learned from the refusal
    for part, name in zip(state["parts"], part_names()):
        assert part["file"] == name and part["batches"][-1] not in part["refused"]
        assert set(part["refused"]) <= set(part["batches"]) and part["counts"]["completed"] == PER_PART
    saved = Path("last_batch_id.tok").read_text().split()
    assert saved == [p["batches"][-1] for p in state["parts"]]
    assert sorted(files_in(".")) == sorted([*part_names(), MANIFEST, "last_batch_id.tok", "openai.tok",
                                            "last_batch_id.history.jsonl", "results.jsonl", "results.jsonl.source.json"])
    again = cli(*COMMAND)  # nothing is submitted or downloaded twice
    assert again.rc == 0 and "nothing to do" in again.out
    assert len(limited.batches) == sum(sum(s.values()) for s in statuses.values())


def test_max_enqueued_tokens_means_no_refusal(limited, cli):
    result = cli(*COMMAND, "--max_enqueued_tokens", 3 * limited.part_tokens)
    assert result.rc == 0, result.err
    assert_each_request_once()
    assert len(limited.batches) == PARTS
    assert all(b.obj["status"] == "completed" for b in limited.batches.values())


def test_refusals_are_bounded_when_the_stated_limit_is_too_high(limited, cli):
    result = cli(*COMMAND, "--max_enqueued_tokens", 6 * limited.part_tokens)  # the API admits only 3
    assert result.rc == 0, result.err
    assert_each_request_once()
    assert_no_part_twice(limited)
    refusals = sum(s["refused"] for s in batches_by_part(limited).values())
    assert refusals == 3  # the first wave only: then the limit the refusals stated paced the rest


def test_without_a_stated_limit_refusals_are_bounded_per_ended_batch(cli, monkeypatch):
    part_tokens = write_parts()
    with LocalBatchServer(api_key=KEY, token_limit=3 * part_tokens, work_steps=8, state_limit=False) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        write_key(KEY)
        result = cli(*COMMAND)
        assert result.rc == 0, result.err
        assert_each_request_once()
        assert_no_part_twice(server)
        refusals = sum(s["refused"] for s in batches_by_part(server).values())
        # one while finding the limit, then at most RESUBMIT_PER_FINISH resubmissions per ended batch
        assert 1 <= refusals <= 1 + RESUBMIT_PER_FINISH * PARTS
    assert manifest()["limits"] == {}


def test_a_part_over_the_stated_limit_alone_is_refused_before_any_upload(limited, cli):
    result = cli(*COMMAND, "--max_enqueued_tokens", limited.part_tokens - 1)
    assert result.rc == 1
    assert "batchinput.part-001.jsonl: about" in result.error_line
    assert "split the input with create_batchinput.py --max_tokens_per_file" in result.error_line
    assert not limited.batches and not limited.files
    assert sorted(files_in(".")) == sorted([*part_names(), "openai.tok"])


def test_a_part_refused_while_nothing_else_runs_is_a_failure(cli, monkeypatch):
    part_tokens = write_parts(parts=2)
    with LocalBatchServer(api_key=KEY, token_limit=part_tokens - 1) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        write_key(KEY)
        result = cli(*COMMAND)
        assert result.rc == 3
        assert "over the enqueued-token limit alone" in result.err
        # each part tried at most twice: once in the first wave, once when the queue was empty
        assert all(s["refused"] <= 2 for s in batches_by_part(server).values())
    assert not Path("results.jsonl").exists()
    assert [p["state"] for p in manifest()["parts"]] == ["failed", "failed"]


def test_cost_report_matches_the_batches_usage(limited, cli):
    result = cli(*COMMAND, "--input_price", "0.5", "--output_price", "2")
    assert result.rc == 0, result.err
    used = Counter()
    for batch in limited.batches.values():
        if batch.obj["status"] == "completed":
            usage = batch.obj["usage"]
            used.update(input=usage["input_tokens"], output=usage["output_tokens"], total=usage["total_tokens"],
                        cached=usage["input_tokens_details"]["cached_tokens"],
                        reasoning=usage["output_tokens_details"]["reasoning_tokens"])
    assert used["input"] > 0
    assert (f"tokens used: {used['input']:,} input ({used['cached']:,} cached) + {used['output']:,} output "
            f"({used['reasoning']:,} reasoning) = {used['total']:,} tokens") in result.out
    cost = (used["input"] * 0.5 + used["output"] * 2) / 1e6
    assert f"cost: {usd(cost)} at the prices given" in result.out


def test_cost_figures_keep_their_significant_digits():
    assert [usd(a) for a in (0, 1e-9, 1.5e-9, 0.00012345, 0.0001, 0.5, 2, 1234.5)] == [
        "$0.0000", "$0.000000001", "$0.0000000015", "$0.00012", "$0.0001", "$0.5000", "$2.00", "$1,234.50"]


def test_max_cost_refuses_before_anything_is_sent(limited, cli):
    before = sorted(files_in("."))
    for command in (COMMAND, ("--run",)):
        result = cli(*command, "--max_cost", "0.0001", "--input_price", "0.5", "--output_price", "2")
        assert result.rc == 1
        assert "over --max_cost $0.0001; nothing was submitted" in result.error_line
    assert not limited.batches and not limited.files
    assert sorted(files_in(".")) == before
    tiny = cli("--run", "--max_cost", "1e-9", "--input_price", "0.5", "--output_price", "2")
    assert tiny.rc == 1 and "over --max_cost $0.000000001; nothing was submitted" in tiny.error_line
    assert not limited.batches and sorted(files_in(".")) == before
    no_prices = cli(*COMMAND, "--max_cost", "5")
    assert no_prices.rc == 1 and "--max_cost needs --input_price and --output_price" in no_prices.error_line
    assert cli(*COMMAND, "--max_cost", "5", "--input_price", "0.5", "--output_price", "2").rc == 0


def test_overall_progress_bar_across_parts(limited, cli, monkeypatch):
    monkeypatch.setenv("DATAGEN_PROGRESS_INTERVAL", "0")
    result = cli(*COMMAND)
    assert result.rc == 0
    bars = [line for line in result.err.splitlines() if line.startswith("requests:")]
    total = PARTS * PER_PART
    assert bars and f"{total}/{total}" in bars[-1] and all("\r" not in line for line in bars)
    assert len({line.split("|")[2].split()[0] for line in bars}) > 2  # it moved across the parts


# --- kills, Ctrl+C and a torn manifest: real subprocesses -------------------------------------


class Client:
    """batch_utils.py in a subprocess; ``wait_for`` reads its stderr up to a line."""

    def __init__(self, server, *args: str):
        env = {**os.environ, "OPENAI_BASE_URL": server.base_url, "DATAGEN_PROGRESS_INTERVAL": "0"}
        self.out = open("client.out", "w")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "batch_utils.py"), *args, "--poll_interval", "0"],
                                     stdout=self.out, stderr=subprocess.PIPE, text=True, env=env)
        self.seen: list[str] = []

    def wait_for(self, text: str, times: int = 1, timeout: float = 120) -> None:
        timer = threading.Timer(timeout, self.proc.kill)  # a hang fails the test instead of blocking it
        timer.start()
        try:
            while sum(text in line for line in self.seen) < times:
                line = self.proc.stderr.readline()
                assert line, f"the client ended before {text!r}:\n{''.join(self.seen)}"
                self.seen.append(line)
        finally:
            timer.cancel()

    def end(self, signum: int | None = None, timeout: float = 120) -> tuple[int, str]:
        if signum is not None:
            os.kill(self.proc.pid, signum)
        err = "".join(self.seen) + self.proc.stderr.read()
        rc = self.proc.wait(timeout)
        self.out.close()
        Path("client.out").unlink()
        return rc, err


def test_sigkill_mid_run_then_the_same_command(limited, cli):
    client = Client(limited, *COMMAND)
    client.wait_for("failed of", times=4)  # some parts done, some running, some refused
    rc, _ = client.end(signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert not Path("results.jsonl").exists()
    before = manifest()
    assert any(p["state"] == "done" for p in before["parts"]) and any(p["state"] != "done" for p in before["parts"])
    result = cli(*COMMAND)
    assert result.rc == 0, result.err
    assert "continuing the queue in last_batch_id.manifest.json" in result.out
    assert_each_request_once()
    assert_no_part_twice(limited)
    assert not [name for name in files_in(".") if name.endswith(".tmp")]


@pytest.mark.parametrize("signum, rc, how", [(signal.SIGINT, 130, "interrupted by SIGINT (Ctrl+C)"),
                                              (signal.SIGTERM, 143, "terminated by SIGTERM")])
def test_ctrl_c_leaves_batches_running_and_the_rerun_picks_them_up(limited, cli, signum, rc, how):
    client = Client(limited, *COMMAND)
    client.wait_for("failed of", times=2)
    code, err = client.end(signum)
    assert code == rc, err
    assert f"batch_utils.py: {how}; the running batches go on at the API: rerun the same command to continue " \
           "the queue" in err
    assert "Traceback" not in err
    running = [b for b in limited.batches.values() if b.obj["status"] not in ("completed", "failed")]
    assert running  # Ctrl+C cancelled nothing
    check = cli("--check")
    assert check.rc == 0 and "queue (last_batch_id.manifest.json):" in check.out
    assert "running" in check.out and "enqueued: about" in check.out and "tokens of gpt-4o-mini" in check.out
    result = cli(*COMMAND)
    assert result.rc == 0, result.err
    assert_each_request_once()
    assert_no_part_twice(limited)
    assert all(b.obj["status"] in ("completed", "failed") for b in limited.batches.values())


def test_a_torn_manifest_is_rebuilt_from_the_api(limited, cli):
    client = Client(limited, *COMMAND)
    client.wait_for("failed of", times=2)
    rc, _ = client.end(signal.SIGKILL)
    assert rc == -signal.SIGKILL
    data = Path(MANIFEST).read_bytes()
    Path(MANIFEST).write_bytes(data[:len(data) // 2])  # torn in the middle
    result = cli(*COMMAND)
    assert result.rc == 0, result.err
    assert "last_batch_id.manifest.json is torn or unreadable (JSONDecodeError); rebuilding it" in result.err
    assert "at the API; following it instead of submitting again" in result.err
    assert_each_request_once()
    assert_no_part_twice(limited)
    assert [p["state"] for p in manifest()["parts"]] == ["done"] * PARTS


@pytest.mark.parametrize("args, message", [
    (("--run", "--max_enqueued_tokens", "10"), "--max_enqueued_tokens goes with --run --wait (the queue)"),
    (("--wait", "--max_cost", "1"), "--max_cost goes with --run"),
    ((*COMMAND, "--max_enqueued_tokens", "0"), "--max_enqueued_tokens must be at least 1"),
    ((*COMMAND, "--input_price", "-1"), "argument --input_price: -1 is out of range; give a number of 0 or more"),
])
def test_queue_flag_misuse_is_a_usage_error(limited, cli, args, message):
    result = cli(*args)
    assert result.rc == 2 and message in result.err
    assert not limited.batches and sorted(files_in(".")) == sorted([*part_names(), "openai.tok"])
