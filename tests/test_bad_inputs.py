"""Bad inputs a new user tries, across the four scripts: each one gives exactly one line on
stderr that says what is wrong, the exit code 1 (2 for bad usage), no traceback, and
leaves the folder as it was (no output, no temporary file).

The table is the one the issue asks for; add a case here when a user finds a new one.
"""

from __future__ import annotations

import contextlib
import os
import stat

import pytest

from datagen.batchapi import batch_utils
from datagen.batchapi import create_batchinput
from datagen.finetuned import generate_data_finetuned
from datagen.results import reformat_results
from tests.test_generate_data_finetuned import tiny  # noqa: F401  (the tiny models fixture)
from tests.util import files_in, write_jsonl

SCRIPTS = {"create": create_batchinput, "batch": batch_utils, "generate": generate_data_finetuned,
           "reformat": reformat_results}
CHAT = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}


def line(obj) -> dict:
    return {**CHAT, "body": {**CHAT["body"], **obj}}


def files(**contents):
    """A setup that writes files (text, bytes, or rows for a JSONL file)."""
    def setup(tmp_path):
        for name, content in contents.items():
            name = name.replace("__", ".")
            path = tmp_path / name
            if isinstance(content, bytes):
                path.write_bytes(content)
            elif isinstance(content, list):
                write_jsonl(path, content)
            else:
                path.write_text(content, encoding="utf-8")
    return setup


def mknod(name: str, minor: int):
    def setup(tmp_path):
        files(p__jsonl=[{"prompt": "hi"}])(tmp_path)
        os.mknod(tmp_path / name, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    return setup


PROMPTS = files(p__jsonl=[{"id": "a", "prompt": "hi"}, {"id": "b", "prompt": "ho"}])
C = ["--model_name", "m"]

# (name, script, args, setup, exit code, words the one line must hold)
CASES = [
    ("missing input", "create", ["--input_file", "nope.jsonl", *C], None, 1, "nope.jsonl"),
    ("input is a folder", "create", ["--input_file", ".", *C], None, 1, "."),
    ("empty input", "create", ["--input_file", "p.jsonl", *C], files(p__jsonl=""), 1, "p.jsonl"),
    ("row is a list", "create", ["--input_file", "p.jsonl", *C], files(p__jsonl="[1, 2]\n"), 1, "p.jsonl:1"),
    ("broken JSON line 2", "create", ["--input_file", "p.jsonl", *C], files(p__jsonl='{"prompt": "a"}\n{"prompt": \n'),
     1, "p.jsonl:2"),
    ("no prompt field", "create", ["--input_file", "p.jsonl", *C], files(p__jsonl=[{"text": "a"}]), 1, "p.jsonl:1"),
    ("prompt is a number", "create", ["--input_file", "p.jsonl", *C], files(p__jsonl=[{"prompt": 5}]), 1, "p.jsonl:1"),
    ("prompt is null", "create", ["--input_file", "p.jsonl", *C], files(p__jsonl=[{"prompt": None}]), 1, "p.jsonl:1"),
    ("id field missing", "create", ["--input_file", "p.jsonl", "--id_field", "qid", *C], PROMPTS, 1, "qid"),
    ("duplicate ids", "create", ["--input_file", "p.jsonl", "--id_field", "id", *C],
     files(p__jsonl=[{"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}]), 1, "duplicate"),
    ("template field unknown", "create", ["--input_file", "p.jsonl", "--prompt_template", "Q: {nope}", *C], PROMPTS,
     1, "nope"),
    ("template format spec", "create", ["--input_file", "p.jsonl", "--prompt_template", "{prompt:d}", *C], PROMPTS,
     1, "prompt"),
    ("output is the input", "create", ["--input_file", "p.jsonl", "--output_file", "p.jsonl", *C], PROMPTS, 1,
     "same file"),
    ("output folder missing", "create", ["--input_file", "p.jsonl", "--output_file", "no/x.jsonl", *C], PROMPTS, 1,
     "does not exist"),
    ("output is a folder", "create", ["--input_file", "p.jsonl", "--output_file", ".", *C], PROMPTS, 1, "directory"),
    ("output is /dev/null-like", "create", ["--input_file", "p.jsonl", "--output_file", "null", *C],
     mknod("null", 3), 1, "not a regular file"),
    ("output is /dev/full-like", "create", ["--input_file", "p.jsonl", "--output_file", "full", *C],
     mknod("full", 7), 1, "not a regular file"),
    ("temperature 5", "create", ["--input_file", "p.jsonl", "--temperature", "5", *C], PROMPTS, 2, "--temperature"),
    ("temperature nan", "create", ["--input_file", "p.jsonl", "--temperature", "nan", *C], PROMPTS, 2, "--temperature"),
    ("top_p 7", "create", ["--input_file", "p.jsonl", "--top_p", "7", *C], PROMPTS, 2, "--top_p"),
    ("n 100000", "create", ["--input_file", "p.jsonl", "--n", "100000", *C], PROMPTS, 2, "--n"),
    ("max_tokens 0", "create", ["--input_file", "p.jsonl", "--max_tokens", "0", *C], PROMPTS, 2, "--max_tokens"),
    ("seed abc", "create", ["--input_file", "p.jsonl", "--seed", "abc", *C], PROMPTS, 2, "--seed"),
    ("no model", "create", ["--input_file", "p.jsonl"], PROMPTS, 2, "--model_name"),
    ("CSV unterminated quote", "create", ["--input_file", "p.csv", *C],
     files(p__csv='prompt\n"a\nb\nc\n'), 1, "p.csv:2"),
    ("CSV duplicate header", "create", ["--input_file", "p.csv", *C], files(p__csv="prompt,prompt\na,b\n"), 1,
     "prompt"),
    ("not UTF-8", "create", ["--input_file", "p.jsonl", *C], files(p__jsonl=b'{"prompt": "\xff\xfe"}\n'), 1,
     "p.jsonl"),
    ("truncated JSON array", "create", ["--input_file", "p.json", *C], files(p__json='[{"prompt": "a"}, {"pro'), 1,
     "p.json"),
    ("parquet that is not", "create", ["--input_file", "p.parquet", *C], files(p__parquet=b"not parquet"), 1,
     "p.parquet"),
    ("nested 100,000 deep", "create", ["--input_file", "p.jsonl", *C],
     files(p__jsonl='{"prompt": ' + "[" * 100000 + "]" * 100000 + "}\n"), 1, "p.jsonl:1"),
    ("lone surrogate", "create", ["--input_file", "p.jsonl", *C], files(p__jsonl='{"prompt": "\\ud800"}\n'), 1,
     "p.jsonl:1"),
    # batch_utils.py
    ("run without a key", "batch", ["--run", "--file", "b.jsonl"], files(b__jsonl=[CHAT]), 1, "key"),
    ("empty key file", "batch", ["--run", "--file", "b.jsonl"], files(b__jsonl=[CHAT], openai__tok=""), 1,
     "openai.tok"),
    ("key file is a folder", "batch", ["--check", "--id", "batch_x"], lambda p: (p / "openai.tok").mkdir(), 1, "openai.tok"),
    ("ids file is a folder", "batch", ["--check"], lambda p: (files(openai__tok="sk-test")(p),
                                                           (p / "last_batch_id.tok").mkdir()), 1, "last_batch_id.tok"),
    ("check with no batch yet", "batch", ["--check"], files(openai__tok="sk-test"), 1, "last_batch_id.tok"),
    ("run a missing file", "batch", ["--run", "--file", "nope.jsonl"], files(openai__tok="sk-test"), 1, "nope.jsonl"),
    ("run a .txt file", "batch", ["--run", "--file", "b.txt"], files(b__txt="x", openai__tok="sk-test"), 1, ".jsonl"),
    ("temperature as a string", "batch", ["--run", "--file", "b.jsonl"],
     files(b__jsonl=[line({"temperature": "0.7"})], openai__tok="sk-test"), 1, "b.jsonl:1"),
    ("content is null", "batch", ["--run", "--file", "b.jsonl"],
     files(b__jsonl=[{**CHAT, "body": {"model": "m", "messages": [{"role": "user", "content": None}]}}],
           openai__tok="sk-test"), 1, "b.jsonl:1"),
    ("download to a device", "batch", ["--download", "null", "--id", "batch_x"],
     lambda p: (files(openai__tok="sk-test")(p), os.mknod(p / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))),
     1, "not a regular file"),
    # reformat_results.py
    ("reformat a missing file", "reformat", ["--input_file", "nope.jsonl", "--source_type", "openai"], None, 1,
     "nope.jsonl"),
    ("glob matches nothing", "reformat", ["--input_file", "res*.jsonl"], None, 1, "matches no file"),
    ("results are not results", "reformat", ["--input_file", "r.jsonl"], files(r__jsonl=[{"x": 1}]), 1, "r.jsonl:1"),
    ("reformat output is the input", "reformat", ["--input_file", "r.jsonl", "--output_file", "r.jsonl"],
     files(r__jsonl=[{"custom_id": "a", "generated_text": "x", "source": "finetuned"}]), 1, "same file"),
]


@pytest.mark.parametrize("name, script, args, setup, code, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, name, script, args, setup, code, words):
    if setup:
        setup(tmp_path)
    before = files_in(tmp_path)
    with pytest.raises(SystemExit) if code == 2 else contextlib.nullcontext() as exited:
        result = SCRIPTS[script].main(args)
    if code == 2:
        result = exited.value.code
    err = capsys.readouterr().err
    assert result == code, err
    assert "Traceback" not in err
    lines = [text for text in err.splitlines() if "error:" in text]
    assert len(lines) == 1 and words in lines[0], err
    assert files_in(tmp_path) == before, "left files behind"


GENERATE_CASES = [
    ("model folder missing", ["--model_name_or_path", "./nope"], None, "no such folder"),
    ("adapter folder missing", ["--adapter_path", "nope"], None, "--adapter_path"),
    ("batch size 0", ["--batch_size", "0"], None, "--batch_size"),
    ("shard out of range", ["--shard_index", "5", "--num_shards", "2"], None, "out of range"),
    ("top_p in a batch line", ["--input_file", "b.jsonl"], files(b__jsonl=[line({"top_p": 7})]), "b.jsonl:1"),
    ("seed abc in a batch line", ["--input_file", "b.jsonl"], files(b__jsonl=[line({"seed": "abc"})]), "b.jsonl:1"),
    ("output is a device", ["--output_file", "null"], mknod("null", 3), "not a regular file"),
]


@pytest.mark.parametrize("name, extra, setup, words", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_bad_generate_input_is_one_line_and_leaves_nothing(tiny, tmp_path, capsys, name, extra, setup, words):  # noqa: F811
    files(p__jsonl=[{"prompt": "hi"}])(tmp_path)
    if setup:
        setup(tmp_path)
    before = files_in(tmp_path)
    args = ["--model_name_or_path", str(tiny["base"]), "--input_file", "p.jsonl", "--output_file", "g.jsonl",
            "--max_new_tokens", "2"]
    code = generate_data_finetuned.main([*args, *extra])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    lines = [text for text in err.splitlines() if "error:" in text]
    assert len(lines) == 1 and words in lines[0], err
    assert files_in(tmp_path) == before


def test_the_table_is_large_enough():
    assert len(CASES) + len(GENERATE_CASES) >= 40
