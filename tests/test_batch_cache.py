"""The answer cache on the OpenAI route, end to end: batch_utils.py over the real openai SDK
against the local Batch API stand-in, counting the request lines the stand-in received.
A rerun uploads only the lines never answered; --download merges the cached answers into
the same output (each id once, each cached line saying where it came from)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from datagen.cache import maintenance, resolve_cache_dir
from datagen.cache.__main__ import main as cache_main
from datagen.local_batch_server import LocalBatchServer
from tests.test_batch_utils import KEY, api, chat_row, cli, server, write_input  # noqa: F401 (fixtures)
from tests.util import files_in, read_jsonl, write_jsonl


def uploads(api) -> list[list[str]]:
    """The custom_ids of every batch input the stand-in received, in upload order."""
    return [[json.loads(line)["custom_id"] for line in stored.path.read_text().splitlines() if line.strip()]
            for stored in api.files.values() if stored.obj["purpose"] == "batch"]


def entries() -> int:
    root = resolve_cache_dir()
    return sum(info.entries for info in maintenance.namespaces(root)) if root.is_dir() else 0


def ids_of(path) -> Counter:
    return Counter(line["custom_id"] for line in read_jsonl(path))


def no_temp_files(folder=".") -> bool:
    return not [name for name in files_in(folder) if name.startswith(".") or ".upload" in name]


def reformat(capsys, *args):
    from datagen.results import reformat_results

    code = reformat_results.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_grown_input_uploads_only_the_new_lines(api, cli, capsys):
    write_input(n=30)
    first = cli("--run", "--wait", "--download", "r1.jsonl")
    assert first.rc == 0, first.err
    [first_id] = [line.split()[1] for line in first.out.splitlines() if line.startswith("submitted ")]
    assert entries() == 30
    write_input(n=40)  # the same 30 requests, and 10 new ones
    second = cli("--run", "--wait", "--download", "r2.jsonl")
    assert second.rc == 0, second.err
    assert uploads(api)[-1] == [f"q{i}" for i in range(30, 40)]
    assert "(10 requests, /v1/chat/completions, gpt-4o-mini, about" in second.out
    assert "; 30 answered from the cache)" in second.out
    assert (f"saved 40 output lines to r2.jsonl (10 from 1 batch(es), 30 from the answer cache, first answered by "
            f"{first_id})") in second.out
    assert ids_of("r2.jsonl") == Counter(f"q{i}" for i in range(40))
    old = {line["custom_id"]: line for line in read_jsonl("r1.jsonl")}
    merged = {line["custom_id"]: line for line in read_jsonl("r2.jsonl")}
    created = merged["q0"]["cached"]["created"]
    assert created.endswith("Z") and len(created) == 20
    for i in range(30):  # the answer as first downloaded, plus where it came from
        assert merged[f"q{i}"] == {**old[f"q{i}"], "cached": {"batch_id": first_id, "created": created}}
    assert all("cached" not in merged[f"q{i}"] for i in range(30, 40))
    assert entries() == 40
    manifest = json.loads(Path("last_batch_id.manifest.json").read_text())
    [part] = manifest["parts"]
    assert part["file"] == "batchinput.jsonl" and part["cached"] == 30 and part["requests"] == 10
    assert part["sha256"] == hashlib.sha256(Path("batchinput.jsonl").read_bytes()).hexdigest()
    uploaded = "".join(line for line in Path("batchinput.jsonl").read_text().splitlines(keepends=True)[30:])
    assert part["uploaded_sha256"] == hashlib.sha256(uploaded.encode()).hexdigest()
    sidecar = json.loads(Path("r2.jsonl.source.json").read_text())
    assert sidecar["cached"] == {"lines": 30, "from_batches": [first_id], "parts": [
        {"source_file": "batchinput.jsonl", "source_sha256": part["sha256"], "lines": 30}]}
    assert no_temp_files()
    code, out, err = reformat(capsys, "--input_file", "r2.jsonl", "--batch_input", "batchinput.jsonl",
                              "--output_file", "out.jsonl")
    assert code == 0 and "40 ok" in out + err, out + err
    records = read_jsonl("out.jsonl")
    cached = [r for r in records if "cached" in json.loads(r["details"])]
    assert len(records) == 40 and len(cached) == 30
    assert json.loads(cached[0]["details"])["cached"] == {"batch_id": first_id, "created": created}
    # the same command again: nothing submitted, the output stays whole
    before = Path("r2.jsonl").read_bytes()
    again = cli("--run", "--wait", "--download", "r2.jsonl")
    assert again.rc == 0 and "nothing to do" in again.out and len(uploads(api)) == 2
    assert Path("r2.jsonl").read_bytes() == before
    alone = cli("--download", "r2.jsonl")
    assert alone.rc == 0 and ids_of("r2.jsonl") == Counter(f"q{i}" for i in range(40)) and len(uploads(api)) == 2


def test_a_file_fully_answered_submits_nothing(api, cli, capsys):
    write_input(n=5)
    assert cli("--run", "--wait", "--download", "r1.jsonl").rc == 0
    [first_id] = [batch["id"] for batch in json.loads(Path("r1.jsonl.source.json").read_text())["batches"]]
    run = cli("--run")
    assert run.rc == 0 and len(uploads(api)) == 1 and len(api.batches) == 1
    assert run.out.splitlines()[0] == ("all 5 requests of batchinput.jsonl are in the answer cache: nothing "
                                       "submitted; --download OUTPUT writes them")
    assert Path("last_batch_id.tok").read_text() == ""
    check = cli("--check")
    assert check.rc == 1 and check.err.endswith("last_batch_id.tok holds no batch: the last --run (batchinput.jsonl) "
                                                 "was answered whole from the answer cache and submitted nothing; "
                                                 "--download OUTPUT writes its answers\n")
    down = cli("--download", "r2.jsonl")
    assert down.rc == 0, down.err
    assert f"saved 5 output lines to r2.jsonl (5 from the answer cache, first answered by {first_id})" in down.out
    assert ids_of("r2.jsonl") == Counter(f"q{i}" for i in range(5))
    assert all(line["cached"]["batch_id"] == first_id for line in read_jsonl("r2.jsonl"))
    sidecar = json.loads(Path("r2.jsonl.source.json").read_text())
    assert sidecar["batches"] == [] and sidecar["cached"]["lines"] == 5
    code, out, err = reformat(capsys, "--input_file", "r2.jsonl", "--batch_input", "batchinput.jsonl",
                              "--output_file", "out.jsonl")
    assert code == 0 and "5 ok" in out + err
    write_input("other.jsonl", n=5, prefix="z")
    refused = reformat(capsys, "--input_file", "r2.jsonl", "--batch_input", "other.jsonl", "--output_file", "o2.jsonl")
    assert refused[0] == 1 and "r2.jsonl: 5 of its lines come from the answer cache for input batchinput.jsonl" \
        in refused[2]
    one = cli("--run", "--wait", "--download", "r3.jsonl")  # in one command
    assert one.rc == 0 and "all 5 requests of batchinput.jsonl are in the answer cache" in one.out
    assert ids_of("r3.jsonl") == Counter(f"q{i}" for i in range(5)) and len(uploads(api)) == 1


def test_multi_part_input_with_one_part_answered(api, cli, capsys):
    write_input("batchinput.part-001.jsonl", n=4, prefix="a")
    assert cli("--run", "--wait", "--download", "r1.jsonl").rc == 0
    write_input("batchinput.part-002.jsonl", n=3, prefix="b")
    result = cli("--run", "--wait", "--download", "r2.jsonl")
    assert result.rc == 0, result.err
    assert "batchinput.part-001.jsonl: all 4 requests are in the answer cache; nothing to submit" in result.out
    assert uploads(api)[-1] == ["b0", "b1", "b2"] and len(api.batches) == 2
    assert ids_of("r2.jsonl") == Counter(["a0", "a1", "a2", "a3", "b0", "b1", "b2"])
    code, out, err = reformat(capsys, "--input_file", "r2.jsonl", "--batch_input", "batchinput.jsonl",
                              "--output_file", "out.jsonl")
    assert code == 0 and "7 ok" in out + err


def test_another_model_parameter_or_service_never_hits(api, cli, monkeypatch):
    rows = write_input(n=3)
    assert cli("--run", "--wait", "--download", "r1.jsonl").rc == 0
    variants = {"model.jsonl": [chat_row(r["custom_id"], r["body"]["messages"][0]["content"], model="gpt-4o")
                                for r in rows],
                "temperature.jsonl": [{**r, "body": {**r["body"], "temperature": 0.5}} for r in rows]}
    for name, variant in variants.items():
        write_jsonl(name, variant)
        result = cli("--run", "--file", name, "--wait", "--download", f"{name}.out")
        assert result.rc == 0 and uploads(api)[-1] == ["q0", "q1", "q2"], (name, result.err)
        assert "answered from the cache" not in result.out
    with LocalBatchServer(api_key=KEY) as other:  # the same requests to another service
        monkeypatch.setenv("OPENAI_BASE_URL", other.base_url)
        result = cli("--run", "--wait", "--download", "other.jsonl")
        assert result.rc == 0 and uploads(other) == [["q0", "q1", "q2"]]
    assert entries() == 12


def test_errors_expired_and_cancelled_requests_never_enter(api, cli):
    write_input(n=6, special={1: "[fail]", 4: "[timeout]"})
    first = cli("--run", "--wait", "--download", "r1.jsonl")
    assert first.rc == 0 and entries() == 4
    again = cli("--run", "--wait", "--download", "r2.jsonl", "--ids_file", "again.tok")  # a rerun elsewhere
    assert again.rc == 0, again.err
    assert uploads(api)[-1] == ["q1", "q4"] and entries() == 4
    assert ids_of("r2.jsonl") == Counter(["q0", "q2", "q3", "q5"])
    assert ids_of("r2.jsonl.errors.jsonl") == Counter(["q1", "q4"])

    write_input("exp.jsonl", n=6, prefix="e")
    assert cli("--run", "--file", "exp.jsonl", "--ids_file", "e.tok").rc == 0
    [expired] = Path("e.tok").read_text().split()
    api.step(expired, 2)  # validated, first half answered
    api.expire(expired)
    assert cli("--wait", "--download", "e1.jsonl", "--ids_file", "e.tok").rc == 4
    assert entries() == 4 + 3
    assert cli("--run", "--file", "exp.jsonl", "--ids_file", "e2.tok").rc == 0
    assert uploads(api)[-1] == ["e3", "e4", "e5"]

    write_input("can.jsonl", n=4, prefix="c")
    assert cli("--run", "--file", "can.jsonl", "--ids_file", "c.tok").rc == 0
    assert cli("--cancel", "--ids_file", "c.tok").rc == 0
    assert cli("--wait", "--download", "c1.jsonl", "--ids_file", "c.tok").rc == 5
    assert entries() == 7
    assert cli("--run", "--file", "can.jsonl", "--ids_file", "c2.tok").rc == 0
    assert uploads(api)[-1] == ["c0", "c1", "c2", "c3"]


def test_no_cache_and_refresh_cache(api, cli):
    write_input(n=4)
    assert cli("--run", "--wait", "--download", "r1.jsonl").rc == 0 and entries() == 4
    segments = sorted(p.name for p in resolve_cache_dir().rglob("*.seg"))
    off = cli("--run", "--wait", "--download", "r2.jsonl", "--no_cache", "--force", "--ids_file", "b.tok")
    assert off.rc == 0 and uploads(api)[-1] == ["q0", "q1", "q2", "q3"]
    assert sorted(p.name for p in resolve_cache_dir().rglob("*.seg")) == segments and entries() == 4
    assert all("cached" not in line for line in read_jsonl("r2.jsonl"))
    fresh = cli("--run", "--wait", "--download", "r3.jsonl", "--refresh_cache", "--force", "--ids_file", "c.tok")
    assert fresh.rc == 0 and uploads(api)[-1] == ["q0", "q1", "q2", "q3"]
    assert entries() == 8  # written again: the new entries win on lookup
    assert all("cached" not in line for line in read_jsonl("r3.jsonl"))


def test_cache_cleared_between_run_and_download(api, cli):
    write_input(n=4)
    assert cli("--run", "--wait", "--download", "r1.jsonl").rc == 0
    write_input(n=6)
    run = cli("--run")
    assert run.rc == 0 and uploads(api)[-1] == ["q4", "q5"] and "; 4 answered from the cache)" in run.out
    assert cache_main(["--clear"]) == 0
    assert cli("--wait").rc == 0
    before = files_in(".")
    lost = cli("--download", "r2.jsonl")
    assert lost.rc == 1 and lost.error_line == (
        "batch_utils.py: error: 4 of the 4 answers r2.jsonl takes from the answer cache are gone from it (cleared "
        "since --run?); nothing was written: submit them again with python batch_utils.py --run --file "
        "batchinput.jsonl, then --wait --download r2.jsonl")
    assert files_in(".") == before and entries() == 2  # the downloaded answers entered the cache
    assert cli("--run").rc == 0 and uploads(api)[-1] == ["q0", "q1", "q2", "q3"]
    assert cli("--wait").rc == 0
    assert cli("--download", "r2.jsonl").rc == 0 and ids_of("r2.jsonl") == Counter(f"q{i}" for i in range(6))


def test_an_upload_uses_its_plan_unless_the_cache_lost_answers_since(tmp_path):
    """One look-up per run: the upload takes the lines the plan found missing, and looks up
    again only when a segment that held the others is gone (here: the cache cleared)."""
    from datagen.batchapi import batch_cache
    from datagen.batchapi.batch_state import Manifest, Part
    from datagen.cache import AnswerCache, openai_key

    rows = read_jsonl(write_jsonl(tmp_path / "in.jsonl", [chat_row(f"q{i}", f"question {i}") for i in range(5)]))
    cache = AnswerCache(tmp_path / "cache")
    for row in rows[:3]:
        cache.put("gpt-4o-mini", openai_key("svc", row["url"], row["body"], row["custom_id"]), {"response": {}})
    cache.flush()
    part = Part(str(tmp_path / "in.jsonl"), "sha", 5, 0, 0, "gpt-4o-mini", rows[0]["url"])
    batch_cache.plan(cache, "svc", [part])
    assert (part.cached, part.requests, part.planned.lines) == (3, 2, [3, 4])
    assert "planned" not in json.loads(Manifest(tmp_path / "m.json", "in.jsonl", [part]).text())["parts"][0]
    with batch_cache.upload_of(cache, "svc", part, tmp_path) as upload:
        assert [line["custom_id"] for line in read_jsonl(upload)] == ["q3", "q4"]
    cache.close()
    shutil.rmtree(cache.folder("gpt-4o-mini"))
    with batch_cache.upload_of(cache, "svc", part, tmp_path) as upload:
        assert [line["custom_id"] for line in read_jsonl(upload)] == [f"q{i}" for i in range(5)]
    assert (part.cached, part.requests) == (0, 5)


def test_a_failed_upload_leaves_no_subset_file(api, cli):
    write_input(n=3)
    assert cli("--run", "--wait", "--download", "r1.jsonl").rc == 0
    write_input(n=5)
    api.inject(status=400, count=1, method="POST", path="/files")
    failed = cli("--run", "--max_retries", "0")
    assert failed.rc == 1 and "uploading batchinput.jsonl" in failed.error_line
    assert no_temp_files() and len(uploads(api)) == 1


@pytest.mark.parametrize("flag", ["--no_cache", "--refresh_cache"])
def test_cache_flags_are_in_help(flag):
    from datagen.batchapi import batch_utils

    assert flag in batch_utils.build_parser().format_help()


def test_dry_run_counts_only_what_will_be_paid(api, cli, capsys):
    from datagen.batchapi import create_batchinput

    def make(n: int, *flags: str) -> str:
        write_jsonl("prompts.jsonl", [{"prompt": f"prompt number {i}"} for i in range(n)])
        code = create_batchinput.main(["--input_file", "prompts.jsonl", "--model_name", "gpt-4o-mini",
                                       "--max_tokens", "16", "--temperature", "0", *flags])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    make(3)
    assert cli("--run", "--wait", "--download", "r1.jsonl").rc == 0 and entries() == 3
    out = make(5, "--dry_run", "--input_price", "1", "--output_price", "1")
    assert "total: 5 requests in 1 file(s)" in out
    assert "answer cache: 3 of them are answered already and are not submitted; to pay: 2 requests, about" in out
    assert "output: at most 32 output tokens" in out
    make(5)
    result = cli("--run", "--wait", "--download", "r2.jsonl")
    assert result.rc == 0 and uploads(api)[-1] == ["request-3", "request-4"] and len(read_jsonl("r2.jsonl")) == 5


def test_sampled_rows_asking_the_same_keep_their_own_answers(api, cli):
    """Rows repeating one prompt are several samples when the API samples (no temperature):
    each id keeps its own answer, and a new id is asked; at temperature 0 one answer serves all."""
    sampled = [chat_row(f"d{i}", "same question") for i in range(3)]
    greedy = [{**chat_row(f"g{i}", "same question"), "body": {**chat_row("x", "same question")["body"],
                                                              "temperature": 0}} for i in range(2)]
    write_jsonl("batchinput.jsonl", sampled + greedy)
    assert cli("--run", "--wait", "--download", "r1.jsonl").rc == 0
    first = {line["custom_id"]: line["response"] for line in read_jsonl("r1.jsonl")}
    assert len({first[f"d{i}"]["request_id"] for i in range(3)}) == 3  # three samples
    write_jsonl("batchinput.jsonl", sampled + [chat_row("d3", "same question")] + greedy +
                [{**greedy[0], "custom_id": "g2"}])
    assert cli("--run", "--wait", "--download", "r2.jsonl", "--ids_file", "b.tok").rc == 0
    assert uploads(api)[-1] == ["d3"]  # the new sample is asked; g2 is answered by g0/g1's answer
    second = {line["custom_id"]: line for line in read_jsonl("r2.jsonl")}
    assert ids_of("r2.jsonl") == Counter({i: 1 for i in ["d0", "d1", "d2", "d3", "g0", "g1", "g2"]})
    for i in range(3):  # each earlier sample comes back to its own id
        assert second[f"d{i}"]["response"] == first[f"d{i}"] and "cached" in second[f"d{i}"]
    assert "cached" not in second["d3"] and "cached" in second["g2"]


def test_refresh_cache_submits_a_completed_file_again_and_its_answers_win(api, cli):
    write_input(n=3)
    assert cli("--run", "--wait", "--download", "r1.jsonl").rc == 0
    fresh = cli("--run", "--wait", "--download", "r2.jsonl", "--refresh_cache", "--ids_file", "b.tok")
    assert fresh.rc == 0 and uploads(api)[-1] == ["q0", "q1", "q2"]  # asked anew, without --force
    assert cli("--run", "--wait", "--download", "r3.jsonl", "--ids_file", "c.tok").rc == 0
    assert len(uploads(api)) == 2  # answered from the cache: the refreshed answers
    refreshed = {line["custom_id"]: line["response"] for line in read_jsonl("r2.jsonl")}
    assert {line["custom_id"]: line["response"] for line in read_jsonl("r3.jsonl")} == refreshed


def test_no_cache_names_an_earlier_batch_that_answered_only_part_of_the_file(api, cli):
    write_input(n=2)
    assert cli("--run", "--wait", "--download", "r1.jsonl").rc == 0
    write_input(n=5)
    assert cli("--run", "--wait", "--download", "r2.jsonl", "--ids_file", "b.tok").rc == 0
    refused = cli("--run", "--wait", "--download", "r3.jsonl", "--no_cache", "--ids_file", "c.tok")
    assert refused.rc == 1 and refused.err.count("\n") == 1
    assert "(completed) for 3 of its 5 requests, the answer cache answering the others" in refused.err
    assert "--force" in refused.err and not Path("r3.jsonl").exists()
