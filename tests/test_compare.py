"""reformat_results.py --compare: runs of both routes side by side, joined on the id, from raw
and from reformatted files, shards and several adapters, with failed and missing requests."""

from __future__ import annotations

import csv

import pytest

from datagen.results import reformat_results
from tests.reformat_fixtures import (batch_line, chat_body, chat_body_n, expired_line, ft_line, http_error_line,
                                     ok_line)
from tests.util import files_in, read_jsonl, run_script, write_jsonl

GPT = "gpt-4o-mini-2024-07-18"
FT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
IDS = [f"request-{i}" for i in range(5)]
RUNS = [GPT, "base", "lora-a", "lora-b"]


def run(capsys, *args):
    code = reformat_results.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def ft(custom_id, text, adapter, **more):
    return {**ft_line(custom_id, text, **more), "adapter": adapter}


def write_runs():
    """The batch input, an OpenAI output with its error file, and a fine-tuned run with two
    adapters (one of them sharded) and the base model, as generate_data_finetuned.py names them.

    request-3: OpenAI failed, lora-b missing; request-4: OpenAI missing; base answers only
    request-0 (request-1 failed), so its other requests are missing."""
    write_jsonl("batchinput.jsonl", [batch_line(i, f"Question {i}?") for i in IDS])
    write_jsonl("results.jsonl", [ok_line("request-2", chat_body("gpt 2")), ok_line("request-0", chat_body("gpt 0")),
                                  ok_line("request-1", chat_body_n(["gpt 1", "gpt 1b", "gpt 1c"]))])
    write_jsonl("results.jsonl.errors.jsonl", [expired_line("request-3")])
    write_jsonl("gen.lora-a.jsonl", [ft(i, f"a {i}", "out/lora-a") for i in reversed(IDS)])
    write_jsonl("gen.lora-b.shard-000-of-002.jsonl", [ft(i, f"b {i}", "out/lora-b") for i in IDS[0:3:2]])
    write_jsonl("gen.lora-b.shard-001-of-002.jsonl", [ft("request-1", "b request-1", "out/lora-b")])
    write_jsonl("gen.base.jsonl", [ft("request-0", "base 0", None),
                                   {"custom_id": "request-1", "error": {"code": "context_length_exceeded",
                                                                        "message": "too long"},
                                    "source": "finetuned", "model": FT_MODEL, "adapter": None}])


def expected_wide():
    text = {GPT: {"request-0": "gpt 0", "request-1": "gpt 1", "request-2": "gpt 2"},
            "base": {"request-0": "base 0"},
            "lora-a": {i: f"a {i}" for i in IDS},
            "lora-b": {i: f"b {i}" for i in ("request-0", "request-1", "request-2")}}
    failed = {(GPT, "request-3"), ("base", "request-1")}
    rows = []
    for i in IDS:
        row = {"id": i, "prompt": [{"role": "user", "content": f"Question {i}?"}]}
        for name in RUNS:
            row[name] = text[name].get(i)
            row[f"{name}.status"] = "ok" if i in text[name] else "failed" if (name, i) in failed else "missing"
        rows.append(row)
    return rows


COMPARE = ["--compare", "results.jsonl", "gen.jsonl", "--batch_input", "batchinput.jsonl"]


def test_raw_runs_side_by_side_with_failed_and_missing(tmp_path, capsys):
    write_runs()
    code, out, err = run(capsys, *COMPARE, "--output_file", "table.jsonl")
    # Requests are missing: the table is written and the run exits 1, saying where they are.
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        f"reformat_results.py: error: 6 results are missing ({GPT}: 1, base: 3, lora-b: 2); they are the rows "
        "with status missing in table.jsonl; pass --fail_on none to accept them")
    assert read_jsonl("table.jsonl") == expected_wide()
    assert out.splitlines() == [
        f"{GPT}: 3 ok, 1 failed, 1 missing (results.jsonl, results.jsonl.errors.jsonl)",
        "base: 1 ok, 1 failed, 3 missing (gen.base.jsonl)",
        "lora-a: 5 ok, 0 failed, 0 missing (gen.lora-a.jsonl)",
        "lora-b: 3 ok, 0 failed, 2 missing (gen.lora-b.shard-000-of-002.jsonl, gen.lora-b.shard-001-of-002.jsonl)",
        "wrote table.jsonl (5 rows, 5 requests, 4 runs)"]
    code, _, err = run(capsys, *COMPARE, "--output_file", "table.jsonl", "--fail_on", "none")
    assert code == 0, err
    assert read_jsonl("table.jsonl") == expected_wide()
    code, _, err = run(capsys, *COMPARE, "--output_file", "table.jsonl", "--fail_on", "missing,error")
    assert code == 1 and err.strip().splitlines()[-1] == (
        "reformat_results.py: error: results that fail the run (--fail_on missing,error): 2 failed, 6 missing; "
        "see the status columns of table.jsonl")
    assert read_jsonl("table.jsonl") == expected_wide()


def test_reformatted_runs_give_the_same_table(tmp_path, capsys):
    """From reformatted files (JSONL and Parquet, with their .failed.jsonl beside them)."""
    write_runs()
    reformat = [("results.jsonl", "r_openai.jsonl"), ("gen.lora-a.jsonl", "r.lora-a.jsonl"),
                ("gen.lora-b.shard-*.jsonl", "r.lora-b.parquet"), ("gen.base.jsonl", "r.base.jsonl")]
    for raw, out in reformat:
        code, _, err = run(capsys, "--input_file", raw, "--batch_input", "batchinput.jsonl", "--output_file", out,
                           "--keep_fields", "prompt", "--fail_on", "none")
        assert code == 0, err
    code, _, err = run(capsys, "--compare", "r_openai.jsonl", "r.jsonl", "--batch_input", "batchinput.jsonl",
                       "--fail_on", "none", "--output_file", "table.jsonl")
    assert code == 0, err
    assert read_jsonl("table.jsonl") == expected_wide()
    # Without --batch_input the kept prompt comes from the reformatted files; no exit 1 then,
    # but a request no run has cannot be known.
    code, _, err = run(capsys, "--compare", "r_openai.jsonl", "r.jsonl", "--output_file", "table2.jsonl")
    assert code == 0, err
    assert read_jsonl("table2.jsonl") == expected_wide()


def test_long_table_has_a_row_per_request_run_and_sample(tmp_path, capsys):
    import pyarrow.parquet as pq

    write_runs()
    code, _, err = run(capsys, *COMPARE, "--long", "--fail_on", "none", "--output_file", "long.parquet")
    assert code == 0, err
    rows = pq.read_table("long.parquet").to_pylist()
    assert len(rows) == 5 * 4 + 2  # request-1's three OpenAI samples
    by_key = {(r["id"], r["run"], r["sample"]): r for r in rows}
    assert [by_key[("request-1", GPT, k)]["generated_text"] for k in range(3)] == ["gpt 1", "gpt 1b", "gpt 1c"]
    failed = by_key[("request-1", "base", None)]
    assert (failed["status"], failed["error"], failed["model"], failed["generated_text"]) == (
        "failed", "context_length_exceeded: too long", FT_MODEL, None)
    assert by_key[("request-3", GPT, None)]["error"].startswith("batch_expired: This request could not")
    assert by_key[("request-4", GPT, None)]["status"] == "missing"
    assert by_key[("request-0", "lora-b", 0)]["adapter"] == "out/lora-b"
    assert pq.read_schema("long.parquet").field("sample").type == "int64"
    assert [r["prompt"] for r in rows[:4]] == [[{"role": "user", "content": "Question request-0?"}]] * 4


def test_csv_table_with_kept_fields_and_names_given(tmp_path, capsys):
    """Two runs of one model must be named (NAME=PATH); kept fields come from the prompts file."""
    write_jsonl("prompts.jsonl", [{"qid": "x", "prompt": "X?", "gold": 1}, {"qid": "y", "prompt": "Y?", "gold": "2"}])
    write_jsonl("one.jsonl", [ok_line("x", chat_body("one x")), ok_line("y", chat_body("one y"))])
    write_jsonl("two.jsonl", [ok_line("y", chat_body("two y")), http_error_line("x")])
    args = ["--prompts_file", "prompts.jsonl", "--id_field", "qid", "--keep_fields", "gold", "--output_file", "t.csv"]
    assert _bad(tmp_path, capsys, ["--compare", "one.jsonl", "two.jsonl", *args]).endswith(
        f"2 runs are named {GPT!r} (one.jsonl; two.jsonl); give each its own name: "
        "--compare A=one.jsonl B=two.jsonl (NAME=PATH)")
    code, _, err = run(capsys, "--compare", "one=one.jsonl", "two=two.jsonl", *args)
    assert code == 0, err
    with open("t.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows == [
        ["id", "prompt", "gold", "one", "one.status", "two", "two.status"],
        ["x", '[{"role":"user","content":"X?"}]', "1", "one x", "ok", "", "failed"],
        ["y", '[{"role":"user","content":"Y?"}]', "2", "one y", "ok", "two y", "ok"]]


def test_runs_without_requests_are_joined_in_natural_order(tmp_path, capsys):
    write_jsonl("a.jsonl", [ft(f"q{i}", f"a{i}", "out/a") for i in (10, 2)])
    write_jsonl("b.jsonl", [ft(f"q{i}", f"b{i}", "out/b") for i in (1, 2)])
    code, out, err = run(capsys, "--compare", "a.jsonl", "b.jsonl", "--output_file", "t.jsonl")
    assert code == 0, err
    assert read_jsonl("t.jsonl") == [
        {"id": "q1", "a": None, "a.status": "missing", "b": "b1", "b.status": "ok"},
        {"id": "q2", "a": "a2", "a.status": "ok", "b": "b2", "b.status": "ok"},
        {"id": "q10", "a": "a10", "a.status": "ok", "b": None, "b.status": "missing"}]


def test_compare_runs_as_a_script(tmp_path):
    write_runs()
    done = run_script("reformat_results.py", *COMPARE, "--output_file", "t.csv", "--fail_on", "none", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "wrote t.csv (5 rows, 5 requests, 4 runs)"
    with open(tmp_path / "t.csv", newline="", encoding="utf-8") as handle:
        assert [row["id"] for row in csv.DictReader(handle)] == IDS


def _bad(tmp_path, capsys, args):
    before = files_in(tmp_path)
    code, _, err = run(capsys, *args)
    assert code == 1
    assert files_in(tmp_path) == before  # no table, no temporary file
    line = err.strip().splitlines()[-1]
    assert line.startswith("reformat_results.py: error: ")
    return line


@pytest.mark.parametrize("args, message", [
    (["--compare", "nothing.jsonl"], "--compare nothing.jsonl: no such file"),
    (["--compare", "prompts.jsonl"], "prompts.jsonl:1: neither a raw result line (custom_id) nor a reformatted line"),
    (["--compare", "one.jsonl", "one.jsonl"], "error: --compare: one.jsonl is given twice; give each run once"),
    (["--compare", "one.jsonl", "./one.jsonl"],
     "error: --compare: one.jsonl is given twice (one.jsonl and ./one.jsonl); give each run once"),
    (["--compare", "=one.jsonl"], "error: --compare =one.jsonl: the NAME before '=' is empty; give NAME=PATH, or "
                                  "PATH alone to name the run from its records"),
    (["--compare", "one.jsonl", "--failed_file", "f.jsonl"], "--failed_file is not used with --compare"),
    (["--input_file", "one.jsonl", "--long"], "--long shapes the --compare table"),
    (["--compare", "one.jsonl", "--output_file", "one.jsonl"], "is the same file as the input"),
    (["--compare", "one.csv"], "--compare one.csv: a CSV table has lost the types"),
], ids=["missing", "not-results", "twice", "twice-spelt-otherwise", "empty-name", "failed-file", "long-alone",
        "over-input", "csv"])
def test_bad_compare(tmp_path, capsys, args, message):
    write_jsonl("prompts.jsonl", [{"prompt": "X?"}])
    write_jsonl("one.jsonl", [ok_line("x", chat_body())])
    (tmp_path / "one.csv").write_text("id,generated_text\nx,hi\n")
    assert message in _bad(tmp_path, capsys, args)
