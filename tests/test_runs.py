"""Several runs at once (issue 19): records of different runs are never merged, each run keeps
its name however it is given, stray ids, CSV tables that read back exactly, and numbers
that are not numbers."""

from __future__ import annotations

import csv
import json

import pytest

from datagen.results import reformat_results
from tests.reformat_fixtures import batch_line, chat_body, expired_line, ft_line, ok_line
from tests.test_generate_data_finetuned import run_main, tiny  # noqa: F401
from tests.util import copy_files, files_in, read_jsonl, write_jsonl

GPT = "gpt-4o-mini-2024-07-18"
IDS = [f"p{i}" for i in range(4)]
PREFIX = "reformat_results.py: error: "


def run(capsys, *args):
    code = reformat_results.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def refused(tmp_path, capsys, *args) -> str:
    """The one error line of a refusal: exit 1, no file written (no output, no failed file)."""
    before = files_in(tmp_path)
    code, _, err = run(capsys, *args)
    assert code == 1, err
    assert files_in(tmp_path) == before
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(PREFIX)
    return line[len(PREFIX):]


def columns(path) -> list[str]:
    return list(read_jsonl(path)[0])


# --- several adapters and the base, generated for real -------------------------------------


@pytest.fixture(scope="module")
def generated(tiny, tmp_path_factory):  # noqa: F811
    """generate_data_finetuned.py with two named adapters and the base: gen.a/b/base.jsonl."""
    import os

    from datagen import tinymodel

    folder = tmp_path_factory.mktemp("runs")
    second = tinymodel.build_tiny_adapter(tiny["base"], folder / "ckpt-2", seed=5)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        write_jsonl("prompts.jsonl", [{"id": i, "prompt": f"question {i} about things", "topic": f"t{i}"} for i in IDS])
        code = run_main(_NoCapture(), "--model_name_or_path", tiny["base"], "--input_file", "prompts.jsonl",
                        "--id_field", "id", "--output_file", "gen.jsonl", "--max_new_tokens", "4",
                        "--temperature", "0", "--adapter_path", f"a={tiny['adapter']}",
                        "--adapter_path", f"b={second}", "--with_base")[0]
    finally:
        os.chdir(cwd)
    assert code == 0
    return folder


class _NoCapture:
    def readouterr(self):
        class Captured:
            out = err = ""
        return Captured()


@pytest.fixture
def gen(generated, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return copy_files(generated, tmp_path)


def test_generated_records_carry_their_run_name(gen):
    assert {r["run"] for r in read_jsonl("gen.a.jsonl")} == {"a"}
    assert {r["run"] for r in read_jsonl("gen.b.jsonl")} == {"b"}
    assert {r["run"] for r in read_jsonl("gen.base.jsonl")} == {"base"}


def test_reformat_of_several_adapters_and_the_base_is_refused(gen, capsys):
    line = refused(gen, capsys, "--input_file", "gen.*.jsonl", "--output_file", "out.jsonl")
    assert line == ("the --input_file files hold 3 runs: a (gen.a.jsonl); b (gen.b.jsonl); base (gen.base.jsonl); "
                    "records of different runs are never merged: reformat each run on its own, or put them side "
                    "by side with --compare 'gen.*.jsonl'")


def test_reformat_of_one_adapter_has_its_run_column(gen, capsys):
    code, _, err = run(capsys, "--input_file", "gen.a.jsonl", "--output_file", "a.jsonl")
    assert code == 0, err
    rows = read_jsonl("a.jsonl")
    assert columns("a.jsonl")[:5] == ["id", "generated_text", "source", "run", "model"]
    assert {r["run"] for r in rows} == {"a"} and len(rows) == 4


@pytest.mark.parametrize("given", [["gen.jsonl"], ["gen.*.jsonl"], ["gen.a.jsonl", "gen.b.jsonl", "gen.base.jsonl"],
                                   ["reformatted"]], ids=["stem", "glob", "files", "reformatted"])
def test_compare_names_each_run_from_its_records(gen, capsys, given):
    if given == ["reformatted"]:
        for name in ("a", "b", "base"):
            assert run(capsys, "--input_file", f"gen.{name}.jsonl", "--output_file", f"r_{name}.parquet")[0] == 0
        given = ["r_a.parquet", "r_b.parquet", "r_base.parquet"]
    code, out, err = run(capsys, "--compare", *given, "--prompts_file", "prompts.jsonl", "--id_field", "id",
                         "--output_file", "t.jsonl")
    assert code == 0, err
    assert columns("t.jsonl") == ["id", "prompt", "a", "a.status", "b", "b.status", "base", "base.status"]
    rows = read_jsonl("t.jsonl")
    texts = {name: {r["custom_id"]: r["generated_text"] for r in read_jsonl(f"gen.{name}.jsonl")}
             for name in ("a", "b", "base")}
    assert [r["id"] for r in rows] == IDS
    assert all(r[name] == texts[name][r["id"]] for r in rows for name in texts)
    assert [line.split(":")[0] for line in out.splitlines()[:3]] == ["a", "b", "base"]


def test_compare_name_given_by_the_user(gen, capsys):
    code, _, err = run(capsys, "--compare", "first=gen.a.jsonl", "gen.b.jsonl", "--output_file", "t.jsonl")
    assert code == 0, err
    assert columns("t.jsonl") == ["id", "first", "first.status", "b", "b.status"]
    # A NAME names one run: a glob of three runs cannot take one.
    line = refused(gen, capsys, "--compare", "all=gen.*.jsonl", "--output_file", "t2.jsonl")
    assert line.startswith("--compare all=gen.*.jsonl holds 3 runs: a (gen.a.jsonl); b (gen.b.jsonl); base "
                           "(gen.base.jsonl); a NAME names one run")


def test_compare_name_collision_is_an_error_with_the_fix(gen, capsys):
    line = refused(gen, capsys, "--compare", "gen.a.jsonl", "a=gen.base.jsonl", "--output_file", "t.jsonl")
    assert line == ("--compare: 2 runs are named 'a' (gen.a.jsonl; gen.base.jsonl); give each its own name: "
                    "--compare A=gen.a.jsonl B=gen.base.jsonl (NAME=PATH)")
    line = refused(gen, capsys, "--compare", "id=gen.a.jsonl", "--output_file", "t.jsonl")
    assert line == "--compare: run 'id' (gen.a.jsonl) would make a second column 'id'; name it: --compare NAME=gen.a.jsonl"


# --- one run whatever its per-request parameters; two runs that differ only in settings -----------------


def test_shards_with_per_request_parameters_are_one_run(tiny, tmp_path, capsys):  # noqa: F811
    """Each shard holds several max_completion_tokens values (generation fingerprints): one run."""
    write_jsonl("bi.jsonl", [{**batch_line(f"k{i}", f"tell me about {i}"), "body": {
        **batch_line(f"k{i}", f"tell me about {i}")["body"], "max_completion_tokens": (2, 3)[i % 2]}}
        for i in range(6)])
    for shard in range(3):
        code, _, err = run_main(capsys, "--model_name_or_path", tiny["base"], "--input_file", "bi.jsonl",
                                "--adapter_path", f"a={tiny['adapter']}", "--output_file", "gen.jsonl",
                                "--shard_index", shard, "--num_shards", 3)
        assert code == 0, err
    variants = {json.loads(line)["fingerprint"]["generation"] for line in open("gen.shard-000-of-003.jsonl")}
    assert len(variants) > 1  # the shard itself mixes parameters
    for given in (["--input_file", "gen.shard-*.jsonl"], ["--input_file", "gen.jsonl"]):
        code, out, err = run(capsys, *given, "--batch_input", "bi.jsonl", "--output_file", "r.jsonl")
        assert code == 0, err
        assert out.splitlines()[0] == "6 ok, 0 failed, 0 missing"
    code, out, err = run(capsys, "--compare", "gen.jsonl", "--batch_input", "bi.jsonl", "--output_file", "t.jsonl")
    assert code == 0, err
    assert out.splitlines()[-1] == "wrote t.jsonl (6 rows, 6 requests, 1 run)"
    # The stem's records read twice (a glob over the merged file and its shards): one run, deduplicated.
    with open("gen.all.jsonl", "w", encoding="utf-8") as merged:
        for shard in range(3):
            merged.write(open(f"gen.shard-00{shard}-of-003.jsonl", encoding="utf-8").read())
    code, out, err = run(capsys, "--input_file", "gen.*.jsonl", "--batch_input", "bi.jsonl", "--output_file",
                         "r2.jsonl")
    assert code == 0, err
    assert out.splitlines()[0] == "6 ok, 0 failed, 0 missing"
    assert "6 custom_id(s) were read more than once" in err


def test_two_runs_of_one_adapter_at_two_temperatures_are_told_apart(tiny, tmp_path, capsys):  # noqa: F811
    write_jsonl("prompts.jsonl", [{"id": i, "prompt": f"question {i}"} for i in IDS])
    for temperature in ("0.7", "1.0"):
        code, _, err = run_main(capsys, "--model_name_or_path", tiny["base"], "--input_file", "prompts.jsonl",
                                "--id_field", "id", "--adapter_path", f"a={tiny['adapter']}", "--max_new_tokens", 3,
                                "--temperature", temperature, "--output_file", f"gen_t{temperature}.jsonl")
        assert code == 0, err
    message = ("gen_t0.7.jsonl and gen_t1.0.jsonl both answer 'p0' for run 'a', with different generation settings "
               "(temperature 0.7 vs 1.0): they are two runs, never merged; put them side by side with "
               "--compare a_0.7=gen_t0.7.jsonl a_1.0=gen_t1.0.jsonl (or reformat each on its own)")
    assert refused(tmp_path, capsys, "--input_file", "gen_t0.7.jsonl", "gen_t1.0.jsonl",
                   "--output_file", "r.jsonl") == message
    assert refused(tmp_path, capsys, "--compare", "gen_t*.jsonl", "--output_file", "t.jsonl") == \
        "--compare gen_t*.jsonl: " + message
    code, out, err = run(capsys, "--compare", "a_0.7=gen_t0.7.jsonl", "a_1.0=gen_t1.0.jsonl", "--output_file",
                         "t.jsonl")  # the command suggested
    assert code == 0, err
    assert columns("t.jsonl") == ["id", "a_0.7", "a_0.7.status", "a_1.0", "a_1.0.status"]


def test_a_torn_last_line_says_the_generation_was_interrupted_and_a_rerun_repairs_it(tiny, tmp_path,  # noqa: F811
                                                                                      capsys):
    write_jsonl("prompts.jsonl", [{"id": i, "prompt": f"question {i}"} for i in IDS])
    command = ["--model_name_or_path", tiny["base"], "--input_file", "prompts.jsonl", "--id_field", "id",
               "--max_new_tokens", 3, "--temperature", 0, "--output_file", "gen.jsonl"]
    assert run_main(capsys, *command)[0] == 0
    data = open("gen.jsonl", "rb").read()
    last = data.rindex(b"\n", 0, len(data) - 1) + 1
    open("gen.jsonl", "wb").write(data[:last + 40])  # a kill mid-line: the last record is cut off
    line = refused(tmp_path, capsys, "--input_file", "gen.jsonl", "--output_file", "r.jsonl")
    assert line.startswith("gen.jsonl:4: not valid JSON (Unterminated string starting at column ")  # not "at at"
    assert line.endswith("; the last line is cut off: the generation that wrote this file was interrupted; rerun "
                         "the same generate_data_finetuned.py command to repair it (finished records are kept)")
    assert run_main(capsys, *command)[0] == 0  # the rerun the message asks for
    code, out, err = run(capsys, "--input_file", "gen.jsonl", "--output_file", "r.jsonl")
    assert code == 0, err
    assert out.splitlines()[0] == "4 ok, 0 failed, 0 missing"


# --- a --compare table and a reformatted file are not raw runs ---------------------------------------------


@pytest.mark.parametrize("table", ["table.jsonl", "table.parquet", "long.jsonl"])
def test_a_compare_table_is_not_a_run(gen, capsys, table):
    extra = ["--long"] if table.startswith("long") else []
    code, _, err = run(capsys, "--compare", "gen.a.jsonl", "gen.b.jsonl", *extra, "--output_file", table)
    assert code == 0, err
    where = f"{table}:row 1" if table.endswith(".parquet") else f"{table}:1"
    message = (f"{where}: a row of a --compare table (NAME.status columns, no source), not a run's results; "
               "give each run's own files (its raw results or its reformatted output)")
    assert refused(gen, capsys, "--compare", table, "gen.base.jsonl", "--output_file", "t2.csv") == message
    if not table.endswith(".parquet"):
        assert refused(gen, capsys, "--input_file", table, "--output_file", "r.jsonl") == message


def test_an_output_over_a_stem_that_stands_for_files_is_refused(gen, capsys):
    assert refused(gen, capsys, "--compare", "gen.jsonl", "--output_file", "gen.jsonl") == (
        "--output_file gen.jsonl is --compare gen.jsonl, which stands for its shards or adapters' files; "
        "writing it would hide them: choose another output path")
    assert refused(gen, capsys, "--compare", "all=gen.a.jsonl", "--output_file", "./gen.a.jsonl").startswith(
        "--output_file gen.a.jsonl is the same file as the input gen.a.jsonl")
    write_jsonl("g.shard-000-of-002.jsonl", [ft_line("p0")])
    write_jsonl("g.shard-001-of-002.jsonl", [ft_line("p1")])
    assert refused(gen, capsys, "--input_file", "g.jsonl", "--output_file", "g.jsonl") == (
        "--output_file g.jsonl is --input_file g.jsonl, which stands for its shards or adapters' files; "
        "writing it would hide them: choose another output path")


def test_an_already_reformatted_file_is_not_reformatted_again(gen, capsys):
    assert run(capsys, "--input_file", "gen.a.jsonl", "--output_file", "r_a.jsonl")[0] == 0
    assert refused(gen, capsys, "--input_file", "r_a.jsonl", "--output_file", "again.jsonl") == (
        "r_a.jsonl:1: already reformatted (reformat_results.py's output, keyed by id); it needs no --input_file "
        "run: use it as it is, or give it to --compare beside other runs")


def test_prompts_file_ids_without_id_field_suggest_it(gen, capsys):
    code, _, err = run(capsys, "--input_file", "gen.a.jsonl", "--prompts_file", "prompts.jsonl",
                       "--output_file", "r.jsonl")
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        f"{PREFIX}4 of the 4 requests have no result; they are listed in r.failed.jsonl (reason missing); no id "
        "matched: the rows of prompts.jsonl have an 'id' field, pass --id_field id (the ids are request-<row> "
        "without it)")
    code, out, err = run(capsys, "--input_file", "gen.a.jsonl", "--prompts_file", "prompts.jsonl", "--id_field", "id",
                         "--output_file", "r.jsonl")
    assert code == 0, err


# --- OpenAI results of two batches with the same ids ---------------------------------------------


def sidecar(path, batch_id, sha, model="gpt-4o-mini", source="batchinput.jsonl", retry_of=(), retry_sha=()):
    """A download's provenance sidecar (contract 3), as batch_utils.py --download writes it."""
    data = {"format": "datagen.batch_results/1",
            "batches": [{"id": batch_id, "status": "completed", "input_file_id": "file-" + batch_id[6:],
                         "source_file": source, "source_sha256": sha, "retry_of": list(retry_of),
                         "retry_of_sha256": list(retry_sha), "endpoint": "/v1/chat/completions", "model": model}],
            "service": "api.openai.com", "downloaded": "2025-01-01T00:00:00Z"}
    with open(f"{path}.source.json", "w", encoding="utf-8") as handle:
        json.dump(data, handle)


def two_batches(tmp_path):
    (tmp_path / "res1").mkdir()
    (tmp_path / "res2").mkdir()
    write_jsonl("res1/results.jsonl", [ok_line(i, chat_body(f"answer {i}")) for i in IDS])
    write_jsonl("res2/results.jsonl", [ok_line(i, chat_body(f"judge {i}")) for i in IDS])
    sidecar("res1/results.jsonl", "batch_aaa", "a" * 64, source="answers.jsonl")
    sidecar("res2/results.jsonl", "batch_bbb", "b" * 64, source="judge.jsonl")


def test_two_batches_with_the_same_ids_are_two_runs(tmp_path, capsys):
    two_batches(tmp_path)
    line = refused(tmp_path, capsys, "--input_file", "res1/results.jsonl", "res2/results.jsonl")
    assert line.startswith("the --input_file files hold 2 runs: gpt-4o-mini (res1/results.jsonl); "
                           "gpt-4o-mini (res2/results.jsonl); records of different runs are never merged")
    line = refused(tmp_path, capsys, "--compare", "res1/results.jsonl", "res2/results.jsonl", "--output_file", "t.csv")
    assert line == ("--compare: 2 runs are named 'gpt-4o-mini' (res1/results.jsonl; res2/results.jsonl); give each "
                    "its own name: --compare A=res1/results.jsonl B=res2/results.jsonl (NAME=PATH)")
    code, out, err = run(capsys, "--compare", "answers=res1/results.jsonl", "judge=res2/results.jsonl",
                         "--output_file", "t.jsonl")
    assert code == 0, err
    assert read_jsonl("t.jsonl")[0] == {"id": "p0", "answers": "answer p0", "answers.status": "ok",
                                        "judge": "judge p0", "judge.status": "ok"}
    # The run column is the model as requested (the sidecar's), not the dated one of the answer.
    assert run(capsys, "--input_file", "res1/results.jsonl", "--output_file", "r1.jsonl")[0] == 0
    assert {(r["run"], r["model"]) for r in read_jsonl("r1.jsonl")} == {("gpt-4o-mini", GPT)}


def test_a_download_and_its_retry_download_are_one_run(tmp_path, capsys):
    write_jsonl("results.jsonl", [ok_line(i, chat_body(f"first {i}")) for i in IDS[:3]])
    write_jsonl("results.jsonl.errors.jsonl", [expired_line("p3")])
    sidecar("results.jsonl", "batch_aaa", "a" * 64)
    write_jsonl("results-retry.jsonl", [ok_line("p3", chat_body("retried p3"))])
    sidecar("results-retry.jsonl", "batch_rrr", "c" * 64, source="retry.jsonl", retry_of=["batch_aaa"],
            retry_sha=["a" * 64])
    write_jsonl("batchinput.jsonl", [batch_line(i, f"Q {i}") for i in IDS])
    code, out, err = run(capsys, "--input_file", "results.jsonl", "results-retry.jsonl", "--output_file", "r.jsonl")
    assert code == 0, err
    assert [(r["id"], r["generated_text"]) for r in read_jsonl("r.jsonl")] == [
        ("p0", "first p0"), ("p1", "first p1"), ("p2", "first p2"), ("p3", "retried p3")]
    assert out.splitlines()[0] == "4 ok, 0 failed, 0 missing"


def test_shards_of_one_run_are_one_run(tmp_path, capsys):
    write_jsonl("g.shard-000-of-002.jsonl", [ft_line("p0"), ft_line("p1")])
    write_jsonl("g.shard-001-of-002.jsonl", [ft_line("p2"), {**ft_line("p3"), "generation": {"seed": 7}}])
    code, out, err = run(capsys, "--input_file", "g.jsonl", "--output_file", "r.jsonl")
    assert code == 0, err
    assert {r["run"] for r in read_jsonl("r.jsonl")} == {"lora-v1"}


def test_a_hand_made_file_of_two_models_is_refused(tmp_path, capsys):
    write_jsonl("mixed.jsonl", [ok_line("p0", chat_body("x")), ok_line("p1", chat_body("y", model="gpt-4o")),
                                expired_line("p2")])
    line = refused(tmp_path, capsys, "--input_file", "mixed.jsonl", "--output_file", "r.jsonl")
    assert line.startswith(f"the --input_file files hold 2 runs: {GPT} (mixed.jsonl); gpt-4o (mixed.jsonl); ")
    write_jsonl("mixed-ft.jsonl", [ft_line("p0"), {**ft_line("p0"), "adapter": "out/lora-v2"}])
    line = refused(tmp_path, capsys, "--input_file", "mixed-ft.jsonl", "--output_file", "r.jsonl")
    assert line.startswith("the --input_file files hold 2 runs: lora-v1 (mixed-ft.jsonl); lora-v2 (mixed-ft.jsonl)")


# --- stray ids --------------------------------------------------------------------------------------


def test_stray_ids_are_counted_named_and_left_out(tmp_path, capsys):
    write_jsonl("batchinput.jsonl", [batch_line(i, f"Q {i}") for i in IDS])
    write_jsonl("complete.jsonl", [{**ft_line(i, f"c {i}"), "run": "complete"} for i in IDS])
    write_jsonl("more.jsonl", [{**ft_line(i, f"m {i}"), "run": "more", "adapter": "out/m"}
                               for i in IDS + ["x9", "x10", "x11", "x12"]])
    code, out, err = run(capsys, "--compare", "complete.jsonl", "more.jsonl", "--batch_input", "batchinput.jsonl",
                         "--output_file", "t.jsonl")
    assert code == 0, err
    assert out.splitlines() == [
        "complete: 4 ok, 0 failed, 0 missing (complete.jsonl)",
        "more: 4 ok, 0 failed, 0 missing, 4 not in --batch_input and left out (x9, x10, x11, ...) (more.jsonl)",
        "wrote t.jsonl (4 rows, 4 requests, 2 runs)"]
    assert [r["id"] for r in read_jsonl("t.jsonl")] == IDS


# --- CSV that reads back exactly --------------------------------------------------------------------

NASTY = ["carriage\rreturn", "new\nline", "both\r\nends", "nul\x00byte", 'a "quoted" word', "comma, here",
         "tab\there", "ends with\r", "\r", "back\\slash"]


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_csv_tables_read_back_exactly_in_every_reader(tmp_path, capsys, suffix):
    import pandas as pd
    from datasets import load_dataset

    from datagen.common import prompts

    ids = [f"q{k}" for k in range(len(NASTY))]
    write_jsonl("prompts.jsonl", [{"id": i, "prompt": f"say {k}", "topic": text} for k, (i, text)
                                  in enumerate(zip(ids, NASTY))])
    write_jsonl("gen.jsonl", [{**ft_line(i, text), "run": "nasty"} for i, text in zip(ids, NASTY)])
    delimiter = "\t" if suffix == ".tsv" else ","
    outputs = {f"r{suffix}": "generated_text", f"t{suffix}": "nasty"}
    code, _, err = run(capsys, "--input_file", "gen.jsonl", "--prompts_file", "prompts.jsonl", "--id_field", "id",
                       "--keep_fields", "topic", "--output_file", f"r{suffix}")
    assert code == 0, err
    code, _, err = run(capsys, "--compare", "gen.jsonl", "--prompts_file", "prompts.jsonl", "--id_field", "id",
                       "--keep_fields", "topic", "--output_file", f"t{suffix}")
    assert code == 0, err
    for name, column in outputs.items():
        frame = pd.read_csv(name, sep=delimiter, keep_default_na=False)
        assert list(frame["id"]) == ids and list(frame[column]) == NASTY and list(frame["topic"]) == NASTY
        data = load_dataset("csv", data_files=name, delimiter=delimiter, keep_default_na=False, split="train",
                            cache_dir=str(tmp_path / "hf"))
        assert data["id"] == ids and data[column] == NASTY and data["topic"] == NASTY
        with open(name, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter=delimiter))
        assert [r["id"] for r in rows] == ids and [r[column] for r in rows] == NASTY
        rows = [row.data for row in prompts.iter_rows(name, "csv")]
        assert [r["id"] for r in rows] == ids and [r[column] for r in rows] == NASTY


# --- numbers that are not numbers -----------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ('"prompt_tokens": NaN', "gen.jsonl:2: NaN is not a number JSON allows"),
    ('"completion_tokens": Infinity', "gen.jsonl:2: Infinity is not a number JSON allows"),
    ('"completion_tokens": -Infinity', "gen.jsonl:2: -Infinity is not a number JSON allows"),
    ('"prompt_tokens": 1e999', "gen.jsonl:2: the number 1e999 is too large for a double"),
    ('"prompt_tokens": "12"', "gen.jsonl:2: prompt_tokens must be a whole number of tokens (0 or more), got '12'"),
    ('"prompt_tokens": -3', "gen.jsonl:2: prompt_tokens must be a whole number of tokens (0 or more), got -3"),
    ('"completion_tokens": true', "gen.jsonl:2: completion_tokens must be a whole number of tokens (0 or more), got True"),
    ('"completion_tokens": 2.5', "gen.jsonl:2: completion_tokens must be a whole number of tokens (0 or more), got 2.5"),
], ids=["nan", "inf", "-inf", "overflow", "string", "negative", "bool", "fraction"])
def test_a_token_count_that_is_not_a_number_is_refused(tmp_path, capsys, text, message):
    good = json.dumps(ft_line("p0"))
    bad = json.dumps(ft_line("p1")).replace('"prompt_tokens": 14', "X").replace('"completion_tokens": 3', "Y")
    key = text.split(":")[0].strip('"')
    bad = bad.replace("X" if key == "prompt_tokens" else "Y", text).replace("X", '"prompt_tokens": 1') \
        .replace("Y", '"completion_tokens": 1')
    (tmp_path / "gen.jsonl").write_text(good + "\n" + bad + "\n", encoding="utf-8")
    assert message in refused(tmp_path, capsys, "--input_file", "gen.jsonl", "--output_file", "r.jsonl")


def test_an_openai_usage_that_is_not_a_number_is_refused(tmp_path, capsys):
    body = chat_body()
    body["usage"]["prompt_tokens"] = "14"
    write_jsonl("results.jsonl", [ok_line("p0", chat_body()), ok_line("p1", body)])
    assert refused(tmp_path, capsys, "--input_file", "results.jsonl") == (
        "results.jsonl:2: usage.prompt_tokens must be a whole number of tokens (0 or more), got '14'; fix the file "
        "or write null where the count is unknown")


# --- --prompts_file asks only for the prompt flags it uses ----------------------------------------------


def test_keep_fields_without_prompt_need_no_prompt_flag(tmp_path, capsys):
    write_jsonl("questions.jsonl", [{"qid": i, "question": f"Q {i}?", "topic": f"t{i}"} for i in IDS])
    write_jsonl("gen.jsonl", [ft_line(i) for i in IDS])
    code, _, err = run(capsys, "--input_file", "gen.jsonl", "--prompts_file", "questions.jsonl", "--id_field", "qid",
                       "--keep_fields", "topic", "--output_file", "r.jsonl")
    assert code == 0, err
    assert [(r["id"], r["topic"]) for r in read_jsonl("r.jsonl")] == [(i, f"t{i}") for i in IDS]
    # The prompt is built from the prompts file, so it needs the flags that built it.
    line = refused(tmp_path, capsys, "--input_file", "gen.jsonl", "--prompts_file", "questions.jsonl", "--id_field",
                   "qid", "--keep_fields", "topic,prompt", "--output_file", "r2.jsonl")
    assert "no 'prompt' field (--prompt_field)" in line
    code, _, err = run(capsys, "--input_file", "gen.jsonl", "--prompts_file", "questions.jsonl", "--id_field", "qid",
                       "--prompt_field", "question", "--keep_fields", "topic,prompt", "--output_file", "r2.jsonl")
    assert code == 0, err
    assert read_jsonl("r2.jsonl")[0]["prompt"] == [{"role": "user", "content": "Q p0?"}]


# --- end to end: real downloads (batch_utils.py against the local Batch API stand-in) ----------------

from tests.test_batch_utils import api, chat_row, cli, saved_ids, server, write_input  # noqa: E402,F401,F811


def test_downloads_of_two_batches_with_the_same_ids_are_two_runs(api, cli, capsys, tmp_path):  # noqa: F811
    write_jsonl("answers.jsonl", [chat_row(f"q{i}", f"question {i}") for i in range(3)])
    write_jsonl("judge.jsonl", [chat_row(f"q{i}", f"grade answer {i}") for i in range(3)])  # the same ids
    assert cli("--run", "--file", "answers.jsonl", "--wait", "--download", "resA.jsonl").rc == 0
    assert cli("--run", "--file", "judge.jsonl", "--wait", "--download", "resB.jsonl").rc == 0
    line = refused(tmp_path, capsys, "--input_file", "resA.jsonl", "resB.jsonl", "--output_file", "out.jsonl")
    assert line.startswith("the --input_file files hold 2 runs: gpt-4o-mini (resA.jsonl); gpt-4o-mini (resB.jsonl); ")
    line = refused(tmp_path, capsys, "--compare", "resA.jsonl", "resB.jsonl", "--output_file", "t.csv")
    assert line.endswith("give each its own name: --compare A=resA.jsonl B=resB.jsonl (NAME=PATH)")
    code, _, err = run(capsys, "--compare", "answer=resA.jsonl", "judge=resB.jsonl", "--batch_input", "answers.jsonl",
                       "--output_file", "t.jsonl")
    assert code == 1 and "resB.jsonl: its results come from batch" in err  # engineer B's check: not this input
    code, _, err = run(capsys, "--compare", "answer=resA.jsonl", "judge=resB.jsonl", "--output_file", "t.jsonl")
    assert code == 0, err
    assert read_jsonl("t.jsonl")[0] == {"id": "q0", "answer": "echo: question 0", "answer.status": "ok",
                                        "judge": "echo: grade answer 0", "judge.status": "ok"}


def test_a_download_and_its_retry_download_are_one_run_end_to_end(api, cli, capsys):  # noqa: F811
    write_input(n=6)
    assert cli("--run").rc == 0
    [original] = saved_ids()
    api.step(original, 2)
    api.expire(original)  # q0-q2 answered, q3-q5 expired
    assert cli("--wait", "--download", "results.jsonl").rc == 4
    assert cli("--retry_failed", "retry.jsonl").rc == 0
    assert cli("--run", "--file", "retry.jsonl", "--wait", "--download", "retried.jsonl").rc == 0
    code, out, err = run(capsys, "--input_file", "results.jsonl", "retried.jsonl", "--batch_input", "batchinput.jsonl",
                         "--output_file", "out.jsonl")
    assert code == 0, err
    assert out.splitlines()[0] == "6 ok, 0 failed, 0 missing"
    assert {r["run"] for r in read_jsonl("out.jsonl")} == {"gpt-4o-mini"}
    # Given to --compare as two PATHs: one run too (they answer the same batch input).
    code, out, err = run(capsys, "--compare", "results.jsonl", "retried.jsonl", "--batch_input", "batchinput.jsonl",
                         "--output_file", "t.jsonl")
    assert code == 0, err
    assert out.splitlines() == [
        "gpt-4o-mini: 6 ok, 0 failed, 0 missing (results.jsonl, results.jsonl.errors.jsonl, retried.jsonl)",
        "wrote t.jsonl (6 rows, 6 requests, 1 run)"]


def test_a_run_whose_results_file_is_empty_is_named_by_it(api, cli, capsys, tmp_path):  # noqa: F811
    write_input(n=3)
    assert cli("--run").rc == 0
    [original] = saved_ids()
    api.expire(original)  # nothing answered: an empty results file and its errors file
    assert cli("--wait", "--download", "results.jsonl").rc == 4
    assert (tmp_path / "results.jsonl").stat().st_size == 0
    (tmp_path / "other").mkdir()
    write_jsonl("other/results.jsonl", [ok_line(f"q{i}", chat_body(f"a{i}", model="gpt-4o-mini")) for i in range(3)])
    line = refused(tmp_path, capsys, "--compare", "other/results.jsonl", "results.jsonl", "--output_file", "t.csv")
    assert line == ("--compare: 2 runs are named 'gpt-4o-mini' (other/results.jsonl; results.jsonl (+1 files)); give "
                    "each its own name: --compare A=other/results.jsonl B=results.jsonl (NAME=PATH)")
