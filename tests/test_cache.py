"""The answer cache (datagen.cache): keys, storage, concurrency, kills, memory, the CLI.

Writers run as real processes; the tests wait for events (a line on a pipe, lines in a
file), never for a fixed time."""

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from datagen.cache import (AnswerCache, add_cache_args, finetuned_key, finetuned_namespace, open_cache, openai_key,
                           resolve_cache_dir, service_of)
from datagen.cache import __main__ as cache_cli
from datagen.cache.keys import key_of, namespace_folder
from datagen.cache.segments import CLOSED, list_segments
from datagen.common import cli

ROOT = Path(__file__).resolve().parent.parent
URL = "/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi 東京"}], "temperature": 0}
FINGERPRINT = {"model": "m1", "adapter": "a1", "engine": "hf", "generation": {"max_new_tokens": 32}}

# A child process that writes ``n`` entries (or forever with n = -1) into the namespace "shared".
WRITER = """
import itertools, sys
from datagen.cache import AnswerCache
from datagen.cache.keys import key_of
root, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()
cache = AnswerCache(root)
for i in (itertools.count() if n < 0 else range(n)):
    cache.put("shared", key_of({"tag": tag, "i": i}), {"tag": tag, "i": i, "text": "x" * (i % 300)})
cache.close()
print("done", flush=True)
"""


def expected(tag, i):
    return {"tag": tag, "i": i, "text": "x" * (i % 300)}


def start_writer(root, tag, n):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(root), tag, str(n)], env=env, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdout.readline() == "ready\n"
    return process


def wait_until(condition, what, limit=300.0):
    """Poll for an event; the limit only keeps a broken test from hanging forever."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def segment_lines(root, namespace="shared"):
    """Every line of every segment of a namespace, as bytes (the last one maybe torn)."""
    return [line for seg in list_segments(Path(root) / namespace_folder(namespace))
            for line in seg.read_bytes().split(b"\n")]


# --- keys --------------------------------------------------------------------------


def test_put_lookup_get_roundtrip(tmp_path):
    keys = [openai_key("api.openai.com", URL, {**BODY, "n": i}) for i in range(5)]
    with AnswerCache(tmp_path) as cache:
        for i, key in enumerate(keys[:4]):
            cache.put("gpt-4o-mini", key, {"response": {"i": i, "text": "東京\n\"q\""}, "batch_id": "batch_1"})
        assert set(cache.lookup("gpt-4o-mini", keys)) == set(keys[:4])  # its own puts, before close
    cache = AnswerCache(tmp_path)
    found = cache.lookup("gpt-4o-mini", set(keys))
    assert set(found) == set(keys[:4])
    assert cache.get(found[keys[2]]) == {"response": {"i": 2, "text": "東京\n\"q\""}, "batch_id": "batch_1"}
    assert dict(cache.get_many("gpt-4o-mini", keys)) == {
        key: {"response": {"i": i, "text": "東京\n\"q\""}, "batch_id": "batch_1"} for i, key in enumerate(keys[:4])}
    assert cache.lookup("gpt-4o", keys) == {}  # another namespace never answers
    assert list(cache.get_many("gpt-4o", keys)) == []


def test_take_leaves_in_the_dict_what_the_cache_lacks(tmp_path):
    """Many keys at once: 32-byte key -> the caller's payload; each key found is taken out
    of the dict (the newest entry wins), its value read in the same pass."""
    keys = [key_of({"i": i}) for i in range(6)]
    with AnswerCache(tmp_path) as cache:
        for i, key in enumerate(keys[:4]):
            cache.put("m", key, {"i": i})
        cache.put("m", keys[0], {"i": "again"})
    (segment,) = list_segments(tmp_path / namespace_folder("m"))
    with open(segment, "ab") as handle:  # an entry's shape, a key that is not hex: never found, not damaged
        handle.write(b"z" * 64 + b'\t{"i": 9}\n')
    cache = AnswerCache(tmp_path)
    wanted = {bytes.fromhex(key): number for number, key in enumerate(keys)}
    taken = [(payload, value) for _, payload, value in cache.take_values("m", wanted)]
    assert taken == [(0, {"i": 0}), (1, {"i": 1}), (2, {"i": 2}), (3, {"i": 3})]
    assert wanted == {bytes.fromhex(keys[4]): 4, bytes.fromhex(keys[5]): 5} and cache.skipped == 0
    wanted = dict.fromkeys([bytes.fromhex(keys[1]), bytes.fromhex(keys[5])])
    [(key, payload, location)] = cache.take("m", wanted)
    assert (key, payload, cache.get(location)) == (bytes.fromhex(keys[1]), None, {"i": 1})
    assert list(wanted) == [bytes.fromhex(keys[5])]


def test_every_part_of_a_key_matters():
    base = openai_key("api.openai.com", URL, BODY)
    assert openai_key("api.openai.com", URL, dict(reversed(list(BODY.items())))) == base  # field order: same
    variants = [
        openai_key("myazure.openai.azure.com", URL, BODY),
        openai_key("127.0.0.1:8765", URL, BODY),
        openai_key("api.openai.com", "/v1/responses", BODY),
        openai_key("api.openai.com", URL, {**BODY, "model": "gpt-4o"}),
        openai_key("api.openai.com", URL, {**BODY, "temperature": 0.7}),
        openai_key("api.openai.com", URL, {**BODY, "messages": [{"role": "user", "content": "Hi 東京 "}]}),
        openai_key("api.openai.com", URL, {**BODY, "max_tokens": 10}),
    ]
    fine = finetuned_key(FINGERPRINT, [1, 2, 3], 0)
    variants += [
        fine,
        finetuned_key({**FINGERPRINT, "model": "m2"}, [1, 2, 3], 0),
        finetuned_key({**FINGERPRINT, "adapter": "a2"}, [1, 2, 3], 0),
        finetuned_key({**FINGERPRINT, "engine": "vllm"}, [1, 2, 3], 0),
        finetuned_key({**FINGERPRINT, "generation": {"max_new_tokens": 33}}, [1, 2, 3], 0),
        finetuned_key(FINGERPRINT, [1, 2, 4], 0),
        finetuned_key(FINGERPRINT, [1, 2, 3], 1),
        finetuned_key(FINGERPRINT, [1, 2, 3], None),
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert all(len(key) == 64 and int(key, 16) >= 0 for key in variants)
    # the same key as in format 1 from the start: the sha256 of the whole material's canonical JSON
    material = {"route": "openai", "format": 1, "service": "api.openai.com", "url": URL, "body": BODY}
    assert base == key_of(material) == hashlib.sha256(json.dumps(
        material, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


@pytest.mark.parametrize("base_url, service", [
    (None, "api.openai.com"), ("https://api.openai.com/v1", "api.openai.com"),
    ("https://MyAzure.openai.azure.com/openai/v1/", "myazure.openai.azure.com"),
    ("http://127.0.0.1:8765/v1", "127.0.0.1:8765"), ("https://host:443/v1", "host"),
])
def test_service_is_the_host_and_port(base_url, service):
    assert service_of(base_url) == service


def test_namespaces_are_safe_folder_names(tmp_path):
    names = ["gpt-4o-mini", "base+lora_a", finetuned_namespace("/models/llama 3", "../adapters/a"), "a/b", "a_b"]
    folders = [namespace_folder(name) for name in names]
    assert len(set(folders)) == len(names)
    assert all("/" not in f and not f.startswith(".") for f in folders)
    with AnswerCache(tmp_path) as cache:
        for name in names:
            cache.put(name, key_of({"n": name}), {"n": name})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(folders)


def test_the_newest_entry_wins_and_compact_keeps_it(tmp_path):
    """A key put by a later run (--refresh_cache) is what every later lookup finds."""
    key = key_of({"request": 1})
    for answer in ("first", "second", "third"):
        with AnswerCache(tmp_path) as cache:
            cache.put("m", key, {"answer": answer})
    assert dict(AnswerCache(tmp_path).get_many("m", [key])) == {key: {"answer": "third"}}
    assert cache_cli.main(["--cache_dir", str(tmp_path), "--compact"]) == 0
    assert len(list_segments(AnswerCache(tmp_path).folder("m"))) == 1
    assert dict(AnswerCache(tmp_path).get_many("m", [key])) == {key: {"answer": "third"}}


# --- concurrency, kills, damage ------------------------------------------------------


def test_two_processes_write_at_once_and_lose_nothing(tmp_path):
    n = 5000
    writers = [start_writer(tmp_path, tag, n) for tag in ("a", "b")]
    for process in writers:  # the start barrier: both are ready, then both go
        process.stdin.write("go\n")
        process.stdin.flush()
    for process in writers:
        assert process.stdout.readline() == "done\n"
        assert process.wait() == 0
    keys = {key_of({"tag": tag, "i": i}): (tag, i) for tag in ("a", "b") for i in range(n)}
    values = dict(AnswerCache(tmp_path).get_many("shared", keys))
    assert values == {key: expected(*keys[key]) for key in keys}
    assert len(list_segments(tmp_path / namespace_folder("shared"))) == 2  # one file per writer
    lines = segment_lines(tmp_path)
    assert len(lines) == 2 * n + 4  # every entry, two "#closed", two empty ends: each file ends in "\n"
    assert all(line[64:66] == b"\t{" and line.endswith(b"}") for line in lines if line not in (b"", CLOSED.strip()))


def test_sigkill_mid_write_tears_nothing_and_a_new_writer_appends(tmp_path):
    process = start_writer(tmp_path, "k", -1)
    process.stdin.write("go\n")
    process.stdin.flush()
    wait_until(lambda: len(segment_lines(tmp_path)) > 3000, "3,000 lines in the segment")
    process.send_signal(signal.SIGKILL)
    process.wait()
    (segment,) = list_segments(tmp_path / namespace_folder("shared"))
    data = segment.read_bytes()
    if data.endswith(b"\n"):  # the kill fell between two writes: tear the last line by hand
        with open(segment, "ab") as handle:
            handle.write(key_of({"tag": "k", "i": -1}).encode() + b'\t{"tag": "k", "i"')
        data = segment.read_bytes()
    complete, torn = data.rsplit(b"\n", 1)
    whole = complete.split(b"\n")
    assert torn and CLOSED.strip() not in whole
    keys = {key_of({"tag": "k", "i": i}): i for i in range(len(whole))}
    assert {line[:64].decode() for line in whole} == set(keys)  # lines are written in order, whole
    cache = AnswerCache(tmp_path)
    assert dict(cache.get_many("shared", [*keys, torn[:64].decode()])) == {k: expected("k", i) for k, i in keys.items()}
    assert cache.skipped == 0
    new = key_of({"tag": "new"})
    with AnswerCache(tmp_path) as writer:
        writer.put("shared", new, {"tag": "new"})
    found = AnswerCache(tmp_path).lookup("shared", [*keys, new])
    assert len(found) == len(keys) + 1 and found[new].segment != str(segment)


def test_a_forked_child_writes_its_own_segment(tmp_path):
    cache = AnswerCache(tmp_path)
    cache.put("m", key_of({"parent": 0}), {"by": "parent"})  # still waiting in memory at the fork
    pid = os.fork()
    if pid == 0:  # the child: never appends to its parent's file
        cache.put("m", key_of({"child": 0}), {"by": "child"})
        cache.close()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    cache.put("m", key_of({"parent": 1}), {"by": "parent"})
    cache.close()
    keys = [key_of({"parent": 0}), key_of({"child": 0}), key_of({"parent": 1})]
    values = dict(AnswerCache(tmp_path).get_many("m", keys))
    assert [values[key]["by"] for key in keys] == ["parent", "child", "parent"]
    assert len(list_segments(tmp_path / namespace_folder("m"))) == 2

def test_damaged_lines_are_skipped_with_a_warning(tmp_path, caplog):
    keys = [key_of({"i": i}) for i in range(4)]
    with AnswerCache(tmp_path) as cache:
        for i, key in enumerate(keys):
            cache.put("m", key, {"i": i})
    (segment,) = list_segments(tmp_path / namespace_folder("m"))
    lines = segment.read_bytes().split(b"\n")
    lines[1:1] = [b"garbage written by hand \xff", b""]
    lines[4] = keys[2].encode() + b"\t{not json}"  # the right shape, but not JSON
    segment.write_bytes(b"\n".join(lines))
    cache = AnswerCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="datagen.cache"):
        values = dict(cache.get_many("m", keys))
    assert values == {keys[0]: {"i": 0}, keys[1]: {"i": 1}, keys[3]: {"i": 3}}
    assert cache.skipped == 2
    assert "skipped 2 damaged line(s) in m" in caplog.text and "damaged entry" in caplog.text


def test_a_cache_that_cannot_be_written_warns_once_and_the_run_goes_on(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = AnswerCache(blocker)
    with caplog.at_level(logging.WARNING, logger="datagen.cache"):
        cache.put("m", key_of({"i": 1}), {"i": 1})
        cache.put("m", key_of({"i": 2}), {"i": 2})
        cache.close()
    assert cache.write is False and caplog.text.count("cannot write") == 1


# --- memory --------------------------------------------------------------------------


def test_lookup_memory_is_bounded_by_the_keys_asked_for(tmp_path):
    n, filler = 200_000, "answer text " * 40  # about 500 bytes a value, 100 MB in all
    with AnswerCache(tmp_path) as cache:
        for i in range(n):
            cache.put("big", key_of({"i": i}), {"i": i, "text": filler})
    total = sum(seg.stat().st_size for seg in list_segments(tmp_path / namespace_folder("big")))
    assert total > 90_000_000
    wanted = [key_of({"i": i}) for i in range(0, n, n // 1000)]
    cache = AnswerCache(tmp_path)
    tracemalloc.start()
    try:
        found = cache.lookup("big", wanted)
        lookup_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        count = sum(1 for _ in cache.get_many("big", wanted))
        read_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(found) == count == 1000
    # a few read blocks (about 5 MB here), where holding the values would take all 100 MB
    assert lookup_peak < total / 10 and read_peak < total / 10, (lookup_peak, read_peak, total)


# --- where it lives, the flags -------------------------------------------------------


def test_location_order_flag_env_xdg_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DATAGEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert resolve_cache_dir() == tmp_path / "home/.cache/datagen/answers"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert resolve_cache_dir() == tmp_path / "home/.cache/datagen/answers"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir() == tmp_path / "xdg/datagen/answers"
    monkeypatch.setenv("DATAGEN_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert resolve_cache_dir("~/c") == tmp_path / "home/c"


def parse(argv):
    parser = argparse.ArgumentParser()
    add_cache_args(parser)
    return parser.parse_args(argv)


def test_flags_no_cache_and_refresh_cache(tmp_path, capsys):
    key = key_of({"i": 1})
    with open_cache(parse(["--cache_dir", str(tmp_path)])) as cache:
        cache.put("m", key, {"i": 1})
    assert open_cache(parse(["--no_cache", "--cache_dir", str(tmp_path)])) is None
    refresh = open_cache(parse(["--refresh_cache", "--cache_dir", str(tmp_path)]))
    assert refresh.lookup("m", [key]) == {}  # reads nothing
    refresh.put("m", key_of({"i": 2}), {"i": 2})  # but writes
    refresh.close()
    assert len(open_cache(parse(["--cache_dir", str(tmp_path)])).lookup("m", [key, key_of({"i": 2})])) == 2
    with pytest.raises(SystemExit) as exit_info:
        parse(["--no_cache", "--refresh_cache"])
    assert exit_info.value.code == 2


def run_open(argv, capsys):
    parser = cli.make_parser(None, prog="prog")
    add_cache_args(parser)
    status = cli.run(parser, lambda args: open_cache(args).close(), argv)
    return status, capsys.readouterr().err


@pytest.mark.parametrize("where, message", [("file", "is not a folder"), ("proc", "answer cache /proc/")])
def test_a_bad_cache_dir_is_one_line(tmp_path, capsys, where, message):
    path = tmp_path / "a-file" if where == "file" else Path("/proc/datagen-cache-test")
    if where == "file":
        path.write_text("x")
    status, err = run_open(["--cache_dir", str(path)], capsys)
    assert status == 1 and err.count("\n") == 1 and message in err and "--no_cache" in err, err
    if where == "file":
        assert cache_cli.main(["--cache_dir", str(path), "--info"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not a folder" in err


# --- the CLI -------------------------------------------------------------------------


def fill(root):
    with AnswerCache(root) as cache:
        for i in range(3):
            cache.put("gpt-4o-mini", key_of({"i": i}), {"i": i})
        for i in range(2):
            cache.put("base+lora_a", key_of({"j": i}), {"j": i})


def rows(text):
    return {line.split()[-1]: line.split() for line in text.splitlines()[2:-1]}


def test_cli_info_clear_one_model_then_all(tmp_path, capsys):
    fill(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")  # never removed: not the cache's
    assert cache_cli.main(["--cache_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"answer cache: {tmp_path}"
    table = rows(out)
    assert table["gpt-4o-mini"][0] == "3" and table["gpt-4o-mini"][3] == "1"
    assert table["base+lora_a"][0] == "2"
    assert out.splitlines()[-1].startswith("2 model(s), 5 entries, ")

    assert cache_cli.main(["--cache_dir", str(tmp_path), "--clear", "--model", "gpt-4o-mini"]) == 0
    assert "removed gpt-4o-mini: 3 entries" in capsys.readouterr().out
    assert AnswerCache(tmp_path).lookup("gpt-4o-mini", [key_of({"i": 0})]) == {}
    assert len(AnswerCache(tmp_path).lookup("base+lora_a", [key_of({"j": 0}), key_of({"j": 1})])) == 2
    assert cache_cli.main(["--cache_dir", str(tmp_path), "--info"]) == 0
    assert list(rows(capsys.readouterr().out)) == ["base+lora_a"]

    assert cache_cli.main(["--cache_dir", str(tmp_path), "--clear", "--model", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model 'nope'" in err and "base+lora_a" in err
    assert cache_cli.main(["--cache_dir", str(tmp_path), "--clear"]) == 0
    assert "cleared 1 model(s)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert cache_cli.main(["--cache_dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "empty"


def test_cli_compact_merges_finished_segments_only(tmp_path, capsys):
    keys = [key_of({"i": i}) for i in range(4)]
    for answer in ("first", "second"):  # two finished runs answering the same requests
        with AnswerCache(tmp_path) as cache:
            for key in keys:
                cache.put("m", key, {"answer": answer})
    live = AnswerCache(tmp_path)  # a writer still at work in this process
    live.put("m", key_of({"live": 1}), {"answer": "live"})
    live.flush()
    folder = tmp_path / namespace_folder("m")
    assert len(list_segments(folder)) == 3
    assert cache_cli.main(["--cache_dir", str(tmp_path), "--compact"]) == 0
    assert "compacted m: 2 segments into one, 4 entries kept, 4 duplicates" in capsys.readouterr().out
    assert len(list_segments(folder)) == 2
    live.close()
    values = dict(AnswerCache(tmp_path).get_many("m", [*keys, key_of({"live": 1})]))
    assert values == {**{key: {"answer": "second"} for key in keys}, key_of({"live": 1}): {"answer": "live"}}


def test_cli_help_is_short():
    with pytest.raises(SystemExit):
        cache_cli.main(["--help"])
    assert len(cache_cli.build_parser().format_help().splitlines()) <= 100



def test_clear_and_compact_touch_only_the_caches_own_files(tmp_path, capsys):
    """A --cache_dir pointed at the wrong folder: files that merely end in .seg, and a folder
    whose name file names another folder, are never listed, cleared or compacted."""
    root = tmp_path / "data"
    fill(root)
    corpus = root / "corpus"
    corpus.mkdir()
    for name in ("utt1.seg", "utt2.seg", "utt1.wav"):
        (corpus / name).write_bytes(b"audio\n")
    stray = root / "copied"
    stray.mkdir()
    (stray / "namespace.json").write_text('{"namespace": "gpt-4o-mini"}')  # not this folder's name
    (stray / "20261207T000000.000000Z-h-1-abcdef.seg").write_bytes(b"x\n")
    old = time.time() - 48 * 3600
    for path in [*corpus.iterdir(), *stray.iterdir()]:
        os.utime(path, (old, old))
    before = {p: p.read_bytes() for p in [*corpus.iterdir(), *stray.iterdir()]}
    assert cache_cli.main(["--cache_dir", str(root), "--info"]) == 0
    assert "corpus" not in capsys.readouterr().out
    assert cache_cli.main(["--cache_dir", str(root), "--compact"]) == 0
    assert cache_cli.main(["--cache_dir", str(root), "--clear"]) == 0
    assert {p: p.read_bytes() for p in [*corpus.iterdir(), *stray.iterdir()]} == before
    assert not (root / namespace_folder("gpt-4o-mini")).exists()  # the cache's own folder is gone


def test_a_sampled_request_is_keyed_with_its_id_a_greedy_one_is_not():
    greedy = {**BODY, "temperature": 0}
    sampled = {k: v for k, v in BODY.items() if k != "temperature"}  # the API's default: temperature 1
    assert openai_key("s", URL, greedy, "a") == openai_key("s", URL, greedy, "b") == openai_key("s", URL, greedy)
    assert openai_key("s", URL, sampled, "a") != openai_key("s", URL, sampled, "b")
    warm = {**greedy, "temperature": 0.7}
    assert openai_key("s", URL, warm, "a") != openai_key("s", URL, warm, "b")
    assert openai_key("s", URL, {**sampled, "top_p": 0}, "a") == openai_key("s", URL, {**sampled, "top_p": 0}, "b")
    embedding = {"model": "text-embedding-3-small", "input": "hi"}
    assert openai_key("s", "/v1/embeddings", embedding, "a") == openai_key("s", "/v1/embeddings", embedding, "b")
