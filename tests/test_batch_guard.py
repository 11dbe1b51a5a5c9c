"""batch_utils.py refuses what would be silently wrong: submitting the same file twice,
losing the original ids on a retry, odd key and state files, a --base_url that is not a
Batch API, and a --download onto a device. Real HTTP (the local stand-in, or a tiny
http.server that answers the wrong thing), real files and device nodes."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import stat
import subprocess
import threading
from pathlib import Path

import openai
import pytest

from datagen.local_batch_server import LocalBatchServer
from tests.test_batch_utils import (KEY, api, chat_row, cli, saved_ids, server, write_input,  # noqa: F401 (fixtures)
                                    write_key)
from tests.util import files_in, read_jsonl, run_script, write_jsonl

ALREADY = "was already submitted as batch {id} ({state}); download its results with: python batch_utils.py --wait " \
          "--download batchinput.results.jsonl --id {id} (or --check --id), or pass --force to submit it again (you " \
          "pay twice)"


def ids_file_lines() -> list[str]:
    return Path("last_batch_id.tok").read_text().splitlines()


def no_temporary_files(folder=".") -> bool:
    return not [name for name in files_in(folder) if name.endswith(".tmp")]


# --- the same file is not submitted twice ------------------------------------------------


def test_run_twice_is_refused_while_live_and_once_completed(api, cli):
    write_input(n=3)
    assert cli("--run").rc == 0
    [batch_id] = saved_ids()
    again = cli("--run")
    assert again.rc == 1
    assert f"batchinput.jsonl {ALREADY.format(id=batch_id, state='in_progress')}" in again.error_line
    assert cli("--wait").rc == 0
    done = cli("--run", "--wait", "--download", "results.jsonl")
    assert done.rc == 1 and ALREADY.format(id=batch_id, state="completed") in done.error_line
    uploads = [hit for hit in api.hits if hit[:2] == ("POST", "/files")]
    assert list(api.batches) == [batch_id] and len(uploads) == 1
    assert saved_ids() == [batch_id] and not Path("results.jsonl").exists()
    forced = cli("--run", "--force")
    assert forced.rc == 0 and len(api.batches) == 2 and saved_ids() == [list(api.batches)[1]]


def test_earlier_batch_found_in_the_recent_list_without_the_ids_file(api, cli):
    write_input(n=2)
    assert cli("--run").rc == 0
    [batch_id] = saved_ids()
    Path("last_batch_id.tok").unlink()
    again = cli("--run", "--ids_file", "other.tok")
    assert again.rc == 1 and ALREADY.format(id=batch_id, state="validating") in again.error_line
    assert sorted(files_in(".")) == ["batchinput.jsonl", "last_batch_id.history.jsonl", "last_batch_id.manifest.json",
                                     "openai.tok"]  # the first --run's manifest; the refused one wrote nothing


def test_edited_file_is_a_new_submission(api, cli):
    write_input(n=2)
    assert cli("--run").rc == 0
    write_input(n=3)  # different content, same name
    assert cli("--run").rc == 0 and len(api.batches) == 2


@pytest.mark.parametrize("ending", ["expired", "cancelled", "failed"])
def test_a_batch_that_did_not_complete_does_not_block(cli, monkeypatch, ending):
    with LocalBatchServer(api_key=KEY, token_limit=2 if ending == "failed" else None) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        write_key(KEY)
        write_input(n=3)
        assert cli("--run").rc == 0
        [first] = saved_ids()
        if ending == "expired":
            server.expire(first)
        elif ending == "cancelled":
            assert cli("--cancel").rc == 0
        assert cli("--wait").rc == {"expired": 4, "cancelled": 5, "failed": 3}[ending]
        assert server.batches[first].obj["status"] == ending
        again = cli("--run")
        assert again.rc == 0 and len(server.batches) == 2 and saved_ids() != [first]


def test_one_part_already_submitted_blocks_the_whole_run(api, cli):
    write_input("batchinput.part-001.jsonl", n=2, prefix="a")
    write_input("batchinput.part-002.jsonl", n=2, prefix="b")
    assert cli("--run", "--file", "batchinput.part-002.jsonl").rc == 0
    [batch_id] = saved_ids()
    result = cli("--run")
    assert result.rc == 1
    assert f"batchinput.part-002.jsonl {ALREADY.format(id=batch_id, state='in_progress')}" in result.error_line
    uploads = [hit for hit in api.hits if hit[:2] == ("POST", "/files")]
    assert list(api.batches) == [batch_id] and len(uploads) == 1 and saved_ids() == [batch_id]


def test_a_service_that_cannot_list_batches_still_submits(api, cli):
    write_input(n=1)
    api.inject(404, count=1, method="GET", path="^/batches$")
    result = cli("--run")
    assert result.rc == 0 and "cannot list batches: only the ids in last_batch_id.tok were checked" in result.err
    assert len(api.batches) == 1


def test_local_server_stores_and_returns_metadata(server):
    metadata = {"source_file": "x.jsonl", "source_sha256": "ab" * 32, "description": "é ok"}
    with openai.OpenAI(api_key=KEY, base_url=server.base_url) as client:
        uploaded = client.files.create(file=("x.jsonl", b'{"custom_id": "a"}\n'), purpose="batch")
        created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata=metadata)
        plain = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        metadata["description"] = "changed by the caller afterwards"
        assert created.metadata["description"] == "é ok"
        assert client.batches.retrieve(created.id).metadata == {**metadata, "description": "é ok"}
        listed = {batch.id: batch.metadata for batch in client.batches.list()}
        assert listed == {created.id: {**metadata, "description": "é ok"}, plain.id: None}
        with pytest.raises(openai.BadRequestError, match="at most 16 string pairs"):
            client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={f"k{i}": "v" for i in range(17)})


# --- --retry_failed keeps the original ids ------------------------------------------------


def expired_after_three(api, cli) -> str:
    """A batch of six whose q0-q2 were answered and q3-q5 expired; its id."""
    write_input(n=6)
    assert cli("--run").rc == 0
    [original] = saved_ids()
    api.step(original, 2)
    api.expire(original)
    assert cli("--wait").rc == 4
    return original


def test_retry_keeps_the_original_ids_beside_the_retries(api, cli):
    original = expired_after_three(api, cli)
    retry = cli("--retry_failed", "retry.jsonl")
    assert retry.rc == 0 and "keeps the 1 original batch id(s)" in retry.out
    digest = hashlib.sha256(Path("retry.jsonl").read_bytes()).hexdigest()
    assert ids_file_lines() == [original, f"# retry: retry.jsonl sha256={digest}"]
    assert cli("--check").rc == 0  # the note is no id
    rerun = cli("--run", "--file", "retry.jsonl", "--wait", "--download", "retried.jsonl")
    assert rerun.rc == 0 and "after the 1 batch(es) they retry" in rerun.out
    [_, retried] = ids_file_lines()
    assert ids_file_lines() == [original, retried] and api.batches[retried].obj["metadata"]["retry_of"] == original
    assert {line["custom_id"] for line in read_jsonl("retried.jsonl")} == {"q3", "q4", "q5"}
    merged = cli("--download", "all.jsonl")  # every saved id: the originals and the retry
    assert merged.rc == 0 and {line["custom_id"] for line in read_jsonl("all.jsonl")} == {f"q{i}" for i in range(6)}
    nothing = cli("--retry_failed", "retry2.jsonl")  # the retry answered them: nothing is paid for twice
    assert nothing.rc == 0 and "nothing to retry" in nothing.out and not Path("retry2.jsonl").exists()
    assert no_temporary_files()
    write_input("other.jsonl", n=1, prefix="z")  # an unrelated run replaces the ids, as before
    assert cli("--run", "--file", "other.jsonl").rc == 0 and len(saved_ids()) == 1


def test_retry_of_a_retry_keeps_what_still_fails(api, cli):
    write_input(n=3, special={1: "[fail]"})
    assert cli("--run", "--wait").rc == 0
    [original] = saved_ids()
    assert cli("--retry_failed", "retry.jsonl").rc == 0
    assert cli("--run", "--file", "retry.jsonl", "--wait").rc == 0
    again = cli("--retry_failed", "retry2.jsonl")
    assert again.rc == 0 and "wrote 1 requests that failed or expired (1 invalid_prompt)" in again.out
    assert [line["custom_id"] for line in read_jsonl("retry2.jsonl")] == ["q1"]
    assert ids_file_lines()[0] == original and len(saved_ids()) == 2


# --- downloaded results carry where they came from ---------------------------------------


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def reformat(capsys, *args):
    from datagen.results import reformat_results

    code = reformat_results.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_judge_batch_in_the_same_folder_never_passes_for_the_answers(api, cli, capsys):
    write_input("answers.jsonl", n=3)
    assert cli("--run", "--file", "answers.jsonl", "--wait", "--download", "resA.jsonl").rc == 0
    [a_id] = saved_ids()
    write_jsonl("judge.jsonl", [chat_row(f"q{i}", f"grade answer {i}") for i in range(3)])  # the same ids
    assert cli("--run", "--file", "judge.jsonl", "--wait", "--download", "resB.jsonl").rc == 0
    [b_id] = saved_ids()
    again = cli("--run", "--file", "answers.jsonl", "--no_cache")  # with the cache it would pay nothing
    assert again.rc == 1 and again.error_line == (
        f"batch_utils.py: error: answers.jsonl was already submitted as batch {a_id} (completed); download its "
        f"results with: python batch_utils.py --wait --download answers.results.jsonl --id {a_id} (or --check "
        "--id), or pass --force to submit it again (you pay twice)")
    assert len(api.batches) == 2
    check = cli("--check")  # acts on the last run's batch: says which input it was made from
    assert check.rc == 0 and f"{b_id} (from judge.jsonl): completed" in check.out
    down = cli("--download", "results.jsonl")
    assert down.rc == 0 and f"downloading {b_id} (from judge.jsonl): completed" in down.out
    sidecar = json.loads(Path("results.jsonl.source.json").read_text())
    [batch] = sidecar["batches"]
    assert batch == {"id": b_id, "status": "completed", "input_file_id": api.batches[b_id].obj["input_file_id"],
                     "source_file": "judge.jsonl", "source_sha256": sha("judge.jsonl"), "retry_of": [],
                     "retry_of_sha256": [], "endpoint": "/v1/chat/completions", "model": "gpt-4o-mini"}
    assert sidecar["format"] == "datagen.batch_results/1" and sidecar["service"] == api.base_url.split("/")[2]
    assert sidecar["downloaded"].endswith("Z")
    before = files_in(".")
    refused = reformat(capsys, "--input_file", "results.jsonl", "--batch_input", "answers.jsonl",
                       "--output_file", "out.jsonl")
    assert refused[0] == 1 and refused[2].strip() == (
        f"reformat_results.py: error: results.jsonl: its results come from batch {b_id} (input judge.jsonl, sha256 "
        f"{sha('judge.jsonl')[:12]}), not from --batch_input answers.jsonl (sha256 {sha('answers.jsonl')[:12]}); "
        f"download its results with: python batch_utils.py --download answers.results.jsonl --id {a_id}")
    assert files_in(".") == before  # no output, no failed file
    compared = reformat(capsys, "--compare", "resA.jsonl", "resB.jsonl", "--batch_input", "answers.jsonl",
                        "--output_file", "table.csv")
    assert compared[0] == 1 and f"resB.jsonl: its results come from batch {b_id} (input judge.jsonl" in compared[2]
    assert files_in(".") == before
    assert cli("--download", "answers.results.jsonl", "--id", a_id).rc == 0  # the hint, as printed
    code, out, err = reformat(capsys, "--input_file", "answers.results.jsonl", "--batch_input", "answers.jsonl",
                              "--output_file", "out.jsonl")
    assert code == 0 and "3 ok, 0 failed, 0 missing" in out and "cannot check" not in err
    assert [line["generated_text"] for line in read_jsonl("out.jsonl")] == [f"echo: question q{i}" for i in range(3)]


def test_results_without_a_sidecar_are_accepted_with_a_warning(api, cli, capsys):
    write_input(n=2)
    assert cli("--run", "--wait", "--download", "results.jsonl").rc == 0
    Path("elsewhere.jsonl").write_bytes(Path("results.jsonl").read_bytes())
    code, out, err = reformat(capsys, "--input_file", "elsewhere.jsonl", "--batch_input", "batchinput.jsonl")
    assert code == 0 and "2 ok, 0 failed, 0 missing" in out
    assert "elsewhere.jsonl has no elsewhere.jsonl.source.json beside it (downloaded elsewhere?): only its model " \
           "(gpt-4o-mini) was checked against --batch_input batchinput.jsonl" in err


def test_results_without_a_sidecar_must_answer_the_model_asked_for(api, cli, capsys, monkeypatch):
    """A judge batch's results (gpt-4o) copied without their sidecar are not answers to a
    gpt-4o-mini batch input; OpenAI's dated names pass; another service only warns."""
    write_input("answers.jsonl", n=3)  # gpt-4o-mini
    assert cli("--run", "--file", "answers.jsonl", "--wait").rc == 0
    [a_id] = saved_ids()
    write_jsonl("judge.jsonl", [chat_row(f"q{i}", f"grade answer {i}", model="gpt-4o") for i in range(3)])
    assert cli("--run", "--file", "judge.jsonl", "--wait", "--download", "resJ.jsonl").rc == 0
    Path("web.jsonl").write_bytes(Path("resJ.jsonl").read_bytes())  # no web.jsonl.source.json
    monkeypatch.delenv("OPENAI_BASE_URL")  # OpenAI itself
    before = files_in(".")
    refusal = (f"reformat_results.py: error: web.jsonl: its answers come from gpt-4o, not from the gpt-4o-mini that "
               f"--batch_input answers.jsonl asks for (it has no web.jsonl.source.json to say which batch it is); "
               f"download its results with: python batch_utils.py --download answers.results.jsonl --id {a_id}")
    code, _, err = reformat(capsys, "--input_file", "web.jsonl", "--batch_input", "answers.jsonl",
                            "--output_file", "out.jsonl")
    assert code == 1 and err.strip() == refusal
    code, _, err = reformat(capsys, "--compare", "web.jsonl", "--batch_input", "answers.jsonl",
                            "--output_file", "table.csv")
    assert code == 1 and err.strip() == refusal
    assert files_in(".") == before
    monkeypatch.setenv("OPENAI_BASE_URL", "https://api.openai.com/v1")  # OpenAI named: refused the same
    assert reformat(capsys, "--input_file", "web.jsonl", "--batch_input", "answers.jsonl")[0] == 1
    monkeypatch.delenv("OPENAI_BASE_URL")

    def rewrite(source, target, old, new, extra=None):
        lines = read_jsonl(source)
        for line in lines:
            body = line["response"]["body"]
            assert body["model"] == old
            body["model"] = new
            body.update(extra or {})
        write_jsonl(target, lines)

    Path("judge.jsonl").rename("judge-gpt-4o.jsonl")  # the dated name OpenAI answers with passes
    rewrite("resJ.jsonl", "dated.jsonl", "gpt-4o", "gpt-4o-2024-08-06")
    code, out, _ = reformat(capsys, "--input_file", "dated.jsonl", "--batch_input", "judge-gpt-4o.jsonl",
                            "--output_file", "dated.out.jsonl")
    assert code == 0 and "3 ok, 0 failed, 0 missing" in out
    rewrite("resJ.jsonl", "mini.jsonl", "gpt-4o", "gpt-4o-mini-2024-07-18")  # gpt-4o is a prefix, not the model
    code, _, err = reformat(capsys, "--input_file", "mini.jsonl", "--batch_input", "judge-gpt-4o.jsonl",
                            "--output_file", "mini.out.jsonl")
    assert code == 1 and "mini.jsonl: its answers come from gpt-4o-mini-2024-07-18, not from the gpt-4o that " \
        "--batch_input judge-gpt-4o.jsonl asks for" in err and not Path("mini.out.jsonl").exists()
    # Azure names deployments, and its answers carry prompt_filter_results: a warning only
    rewrite("resJ.jsonl", "azure.jsonl", "gpt-4o", "gpt-4o-2024-11-20", {"prompt_filter_results": []})
    code, out, err = reformat(capsys, "--input_file", "azure.jsonl", "--batch_input", "answers.jsonl",
                              "--output_file", "azure.out.jsonl")
    assert code == 0 and "3 ok" in out and "azure.jsonl: its answers come from gpt-4o-2024-11-20, not from the " \
        "gpt-4o-mini that --batch_input answers.jsonl asks for; only a warning, as Azure (its answers carry " \
        "prompt_filter_results) may name models otherwise than OpenAI: check that they answer it" in err
    monkeypatch.setenv("OPENAI_BASE_URL", api.base_url)  # another service: a warning only
    code, out, err = reformat(capsys, "--input_file", "web.jsonl", "--batch_input", "answers.jsonl",
                              "--output_file", "web.out.jsonl")
    assert code == 0 and "as the service at OPENAI_BASE_URL (127.0.0.1) may name models otherwise" in err


def test_retry_results_belong_to_the_original_input(api, cli, capsys):
    original = expired_after_three(api, cli)
    assert cli("--retry_failed", "retry.jsonl").rc == 0
    assert cli("--run", "--file", "retry.jsonl", "--wait", "--download", "retried.jsonl").rc == 0
    [retried] = [i for i in saved_ids() if i != original]
    [batch] = json.loads(Path("retried.jsonl.source.json").read_text())["batches"]
    assert (batch["id"], batch["source_file"], batch["retry_of"], batch["retry_of_sha256"]) == \
        (retried, "retry.jsonl", [original], [sha("batchinput.jsonl")])
    code, out, _ = reformat(capsys, "--input_file", "retried.jsonl", "--batch_input", "batchinput.jsonl",
                            "--fail_on", "none")
    assert code == 0 and "3 ok, 0 failed, 3 missing" in out
    assert cli("--download", "all.jsonl").rc == 0  # the original and the retry
    code, out, _ = reformat(capsys, "--input_file", "all.jsonl", "--batch_input", "batchinput.jsonl",
                            "--output_file", "all.out.jsonl")
    assert code == 0 and "6 ok, 0 failed, 0 missing" in out
    write_input("other.jsonl", n=6, prefix="q")  # another input with the same ids is still refused
    Path("other.jsonl").write_text(Path("other.jsonl").read_text().replace("question", "grade"))
    code, _, err = reformat(capsys, "--input_file", "all.jsonl", "--batch_input", "other.jsonl",
                            "--output_file", "x.jsonl")
    assert code == 1 and f"all.jsonl: its results come from batch {original} (input batchinput.jsonl" in err
    assert "pass the --batch_input these results answer" in err and not Path("x.jsonl").exists()


def test_a_retry_of_a_retry_leads_back_to_the_original_input(api, cli, capsys):
    write_input(n=6)
    assert cli("--run").rc == 0
    [original] = saved_ids()
    api.expire(original)  # nothing answered
    assert cli("--wait").rc == 4 and cli("--retry_failed", "retry.jsonl").rc == 0
    assert cli("--run", "--file", "retry.jsonl").rc == 0
    [first_retry] = [i for i in saved_ids() if i != original]
    api.step(first_retry, 2)
    api.expire(first_retry)  # some answered, the rest expired
    assert cli("--wait").rc == 4 and cli("--retry_failed", "retry2.jsonl").rc == 0
    assert Path("retry2.jsonl").read_bytes() != Path("retry.jsonl").read_bytes()
    assert cli("--run", "--file", "retry2.jsonl", "--wait", "--download", "r2.jsonl").rc == 0
    [batch] = json.loads(Path("r2.jsonl.source.json").read_text())["batches"]
    assert batch["source_file"] == "retry2.jsonl" and batch["retry_of"] == [original, first_retry]
    assert batch["retry_of_sha256"] == [sha("batchinput.jsonl")]
    code, out, err = reformat(capsys, "--input_file", "r2.jsonl", "--batch_input", "batchinput.jsonl",
                              "--fail_on", "none")
    assert code == 0 and "0 failed" in out and "cannot check" not in err


def test_download_never_overwrites_a_batch_input(api, cli):
    """`--download A.jsonl` where A.jsonl is what the batch was made from: refused, by its
    first line (a request line) and by the name the batch metadata keeps."""
    write_input("answers.jsonl", n=3)
    assert cli("--run", "--file", "answers.jsonl", "--wait").rc == 0
    [batch_id] = saved_ids()
    original = Path("answers.jsonl").read_bytes()
    before = sorted(files_in("."))
    result = cli("--download", "answers.jsonl", "--id", batch_id)
    assert result.rc == 1 and result.error_line == (
        "batch_utils.py: error: --download answers.jsonl is a batch input (its first line is an OpenAI request line) "
        "and would be overwritten; choose another name, e.g. --download answers.results.jsonl")
    write_input("other.jsonl", n=2, prefix="z")  # any batch input, not only this batch's
    assert cli("--download", "other.jsonl").rc == 1
    Path("notes.jsonl").write_text('{"note": "the input, edited after the run"}\n')
    os.mkdir("sub")
    os.replace("answers.jsonl", "answers.jsonl.bak")
    Path("answers.jsonl").write_bytes(Path("notes.jsonl").read_bytes())
    by_name = cli("--download", "sub/../answers.jsonl")
    assert by_name.rc == 1 and by_name.error_line == (
        f"batch_utils.py: error: --download sub/../answers.jsonl is the batch input {batch_id} (from answers.jsonl) "
        "was made from and would be overwritten; choose another name, e.g. --download answers.results.jsonl")
    os.replace("answers.jsonl.bak", "answers.jsonl")
    assert Path("answers.jsonl").read_bytes() == original
    assert sorted(files_in(".")) == sorted(before + ["other.jsonl", "notes.jsonl", "sub"]) and no_temporary_files()
    assert not [hit for hit in api.hits if hit[1].endswith("/content")]  # nothing was downloaded
    assert cli("--download", "answers.results.jsonl").rc == 0  # the name suggested


def test_download_never_replaces_the_results_of_other_batches(api, cli):
    write_input("answers.jsonl", n=3)
    assert cli("--run", "--file", "answers.jsonl", "--wait", "--download", "resA.jsonl").rc == 0
    [a_id] = saved_ids()
    write_jsonl("judge.jsonl", [chat_row(f"q{i}", f"grade answer {i}") for i in range(3)])
    assert cli("--run", "--file", "judge.jsonl").rc == 0
    [b_id] = saved_ids()
    kept = {name: Path(name).read_bytes() for name in ("resA.jsonl", "resA.jsonl.source.json")}
    before = sorted(files_in("."))
    refusal = (f"batch_utils.py: error: --download resA.jsonl holds the results of {a_id} (from answers.jsonl), "
               f"not of {b_id}; choose another name, or delete resA.jsonl and resA.jsonl.source.json to replace them")
    for command in (("--download", "resA.jsonl"), ("--wait", "--download", "resA.jsonl")):  # before any wait
        result = cli(*command)
        assert result.rc == 1 and result.error_line == refusal
    assert api.batches[b_id].obj["status"] != "completed"  # it was not waited for
    write_input("more.jsonl", n=2, prefix="m")
    queued = cli("--run", "--file", "more.jsonl", "--wait", "--download", "resA.jsonl")  # before any upload
    assert queued.rc == 1 and queued.error_line == refusal.replace(f"not of {b_id}", "not of the batches of more.jsonl")
    assert len(api.batches) == 2
    assert sorted(files_in(".")) == sorted(before + ["more.jsonl"])
    assert {name: Path(name).read_bytes() for name in kept} == kept
    again = cli("--download", "resA.jsonl", "--id", a_id)  # the same batches again: a rerun
    assert again.rc == 0 and Path("resA.jsonl").read_bytes() == kept["resA.jsonl"]
    Path("resA.jsonl.source.json").unlink()  # without a sidecar nothing says what it holds: replaced
    assert cli("--wait", "--download", "resA.jsonl").rc == 0
    assert json.loads(Path("resA.jsonl.source.json").read_text())["batches"][0]["id"] == b_id


def test_a_failed_download_leaves_no_sidecar(api, cli):
    write_input(n=3)
    assert cli("--run", "--wait").rc == 0
    api.drop_downloads(count=99, after_bytes=10)
    result = cli("--download", "results.jsonl", "--max_retries", "0")
    assert result.rc == 1 and not [n for n in files_in(".") if n.startswith("results") or n.endswith(".tmp")]


# --- key and state files ----------------------------------------------------------------


def test_key_file_with_a_bom_works(api, cli):
    Path("openai.tok").write_bytes(b"\xef\xbb\xbf" + KEY.encode() + b"\r\n")
    write_input(n=1)
    assert cli("--run").rc == 0


@pytest.mark.parametrize("where", ["openai.tok", "env"])
def test_non_ascii_key_is_refused_by_position_never_shown(server, cli, monkeypatch, where):
    bad = KEY[:7] + "\u00e9" + KEY[8:]  # position 8
    if where == "env":
        monkeypatch.setenv("OPENAI_API_KEY", bad)
    else:
        write_key(bad)
    write_input(n=1)
    result = cli("--run")
    assert result.rc == 1 and f"the key has a non-ASCII character at position 8 (of {len(KEY)})" in result.error_line
    assert bad not in result.err + result.out and bad[8:] not in result.err and server.hits == []


def make_loop(path: str) -> None:
    os.symlink(path, path)  # reading it fails with ELOOP, even for root


@pytest.mark.parametrize("make, message", [
    (lambda p: os.mkdir(p), "is a folder; put the API key in a file"),
    (lambda p: os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 7)), "is not a regular file (a device, pipe or socket)"),
    (lambda p: Path(p).write_text(""), "is empty; put your API key on its one line"),
    (make_loop, "cannot read the API key (Too many levels of symbolic links)"),
    (lambda p: os.symlink("gone.tok", p), "no such file (or a broken link)"),
])
@pytest.mark.parametrize("flag", [[], ["--key_file", "my.key"]])
def test_bad_key_file_is_one_line(server, cli, monkeypatch, make, message, flag):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # a key file that is there wins, even a bad one
    name = flag[1] if flag else "openai.tok"
    make(name)
    result = cli("--check", "--id", "batch_abc", *flag)
    assert result.rc == 1 and message in result.error_line and server.hits == []
    assert result.error_line.startswith(f"batch_utils.py: error: {' '.join(flag) or name}")


@pytest.mark.parametrize("make, message", [
    (lambda p: os.mkdir(p), "last_batch_id.tok is not a regular file (a folder or a device); remove it"),
    (lambda p: os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3)), "is not a regular file"),
    (make_loop, "last_batch_id.tok: cannot read it (Too many levels of symbolic links)"),
    (lambda p: Path(p).write_text(""), "last_batch_id.tok is empty; pass --id BATCH_ID"),
])
def test_bad_ids_file_is_one_line(api, cli, make, message):
    make("last_batch_id.tok")
    for action in (["--check"], ["--wait"], ["--download", "out.jsonl"], ["--retry_failed", "retry.jsonl"]):
        result = cli(*action)
        assert result.rc == 1 and message in result.error_line, action
    assert api.hits == [] and not Path("out.jsonl").exists() and no_temporary_files()


@pytest.mark.parametrize("make", [lambda p: os.mkdir(p), lambda p: os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3)),
                                  make_loop])
def test_run_refuses_a_bad_ids_file_before_uploading(api, cli, make):
    write_input(n=1)
    make("last_batch_id.tok")
    result = cli("--run")
    assert result.rc == 1 and "last_batch_id.tok" in result.error_line and api.hits == []
    assert os.path.lexists("last_batch_id.tok") and not os.path.isfile("last_batch_id.tok")


def test_an_empty_ids_file_is_replaced_by_run(api, cli):
    write_input(n=1)
    Path("last_batch_id.tok").write_text("\n")
    assert cli("--run").rc == 0 and len(saved_ids()) == 1


# --- a --base_url that is not a Batch API -------------------------------------------------


class WrongServer:
    """Answers every request with the same body (an HTML page, ``{}``, or JSON of another
    shape), or with the body ``routes`` gives for the start of its path."""

    def __init__(self, body: bytes, content_type: str, routes: dict | None = None):
        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body, content_type = next((answer for prefix, answer in (routes or {}).items()
                                           if self.path.startswith(prefix)), default)
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = answer

            def log_message(self, *args):
                pass

        default = (body, content_type)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("body, content_type, shown", [
    (b"<!doctype html><html><body>Welcome to nginx!</body></html>", "text/html", "got an HTML page"),
    (b"{}", "application/json", "got {}"),
    (b'{"id": 3, "data": 5, "status": "done"}', "application/json", '"id":3'),
    (b'[1, 2]', "application/json", "got [1,2]"),
])
@pytest.mark.parametrize("action", [["--run"], ["--run", "--force"], ["--check", "--id", "batch_abc"], [],
                                    ["--download", "out.jsonl", "--id", "batch_abc"],
                                    ["--cancel", "--id", "batch_abc"]])
def test_base_url_that_is_not_a_batch_api_is_one_line(tmp_path, body, content_type, shown, action):
    write_key(KEY)
    write_input(n=1)
    with WrongServer(body, content_type) as url:
        done = run_script("batch_utils.py", *action, "--base_url", url, "--max_retries", "0", cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"batch_utils.py: error: --base_url {url} does not answer like the OpenAI Batch API (")
    assert line.endswith("; check --base_url / OPENAI_BASE_URL") and shown in line
    assert "None: None" not in done.stdout and KEY not in done.stdout + done.stderr
    assert sorted(files_in(tmp_path)) == ["batchinput.jsonl", "openai.tok"]


def test_download_of_an_html_page_instead_of_the_output_file(tmp_path):
    """A proxy that answers the batch but sends a login page for the file content."""
    write_key(KEY)
    batch = {"id": "batch_abc", "object": "batch", "endpoint": "/v1/chat/completions", "status": "completed",
             "input_file_id": "file-in", "output_file_id": "file-out", "error_file_id": None,
             "completion_window": "24h", "created_at": 1, "request_counts": {"total": 1, "completed": 1, "failed": 0}}
    page = b"<html><body>Please log in</body></html>"
    with WrongServer(page, "text/html", {"/v1/batches/": (json.dumps(batch).encode(), "application/json")}) as url:
        done = run_script("batch_utils.py", "--download", "out.jsonl", "--id", "batch_abc", "--base_url", url,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"batch_utils.py: error: --base_url {url} does not answer like the "
                                                   "OpenAI Batch API (downloading the output of batch_abc file-out: "
                                                   "got an HTML page)")
    assert sorted(files_in(tmp_path)) == ["openai.tok"]


# --- --download onto something that is not a regular file ---------------------------------


@pytest.mark.parametrize("target", ["results.jsonl", "results.jsonl.errors.jsonl"])
@pytest.mark.parametrize("with_errors", [True, False])
def test_download_onto_a_device_is_refused_and_the_node_kept(api, cli, target, with_errors):
    write_input(n=3, special={1: "[fail]"} if with_errors else None)
    assert cli("--run", "--wait").rc == 0
    os.mknod(target, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    before = sorted(files_in("."))
    result = cli("--download", "results.jsonl")
    assert result.rc == 1 and f"--download {target} is a character device, not a regular file" in result.error_line
    info = os.stat(target)
    assert stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(1, 3)
    assert sorted(files_in(".")) == before and no_temporary_files()


def test_download_onto_a_device_is_refused_before_submitting(api, cli):
    write_input(n=1)
    os.mknod("results.jsonl", stat.S_IFCHR | 0o666, os.makedev(1, 7))
    result = cli("--run", "--wait", "--download", "results.jsonl")
    assert result.rc == 1 and "is a character device, not a regular file" in result.error_line and api.hits == []
    assert stat.S_ISCHR(os.stat("results.jsonl").st_mode)


def test_failed_download_leaves_no_temporary_file(api, cli):
    write_input(n=20, special={2: "[fail]"})
    assert cli("--run", "--wait").rc == 0
    api.inject(500, count=10, method="GET", path="/content$", skip=1)  # the output comes, the errors fail
    result = cli("--download", "results.jsonl", "--max_retries", "0")
    assert result.rc == 1 and "downloading the errors of batch_" in result.error_line
    assert sorted(files_in(".")) == ["batchinput.jsonl", "last_batch_id.history.jsonl", "last_batch_id.manifest.json", "last_batch_id.tok",
                                     "openai.tok"]


# --- the ids file is replaced atomically -------------------------------------------------


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs holding an ids file, then filled to the last byte."""
    folder = tmp_path / "small"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], check=True)
    try:
        (folder / "ids.tok").write_text("batch_old111\n")
        with open(folder / "filler", "wb", buffering=0) as handle, contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * 4096)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_ids_file_on_a_full_disk_keeps_the_old_one_and_names_the_new_ids(api, cli, full_disk):
    write_input(n=2)
    result = cli("--run", "--ids_file", full_disk / "ids.tok")
    [batch_id] = list(api.batches)
    assert result.rc == 1 and "no space left" in result.error_line.lower()
    assert result.error_line.endswith(f"the batch ids were not saved, note them: {batch_id} (pass them with --id)")
    assert (full_disk / "ids.tok").read_text() == "batch_old111\n"
    assert sorted(files_in(full_disk)) == ["filler", "ids.tok"]
