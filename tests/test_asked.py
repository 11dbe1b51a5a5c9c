"""Fine-tuned answers are checked to answer the requests they are joined to: each record's
``request_sha256`` (``prompts.request_digest`` of what it asked) must match the request of
its id in ``--batch_input`` (or a prompts file read with its prompt flags), by either
route's reader, or ``reformat_results.py`` refuses them (and ``--compare`` too)."""

from __future__ import annotations

import json

import pytest

from datagen.batchapi import create_batchinput
from datagen.common import prompts
from datagen.results.requests import body_prompt
from tests.test_generate_data_finetuned import run_main, tiny  # noqa: F401
from tests.test_runs import refused, run  # the one error line of a refusal: exit 1, nothing written
from tests.util import copy_files, read_jsonl, write_jsonl

IDS = [f"q{i}" for i in range(4)]
TEMPLATE = r"Question: {question}\nAnswer:"
SYSTEM = r"You answer\nbriefly."


def chat_line(custom_id, messages, model="gpt-4o-mini", max_tokens=2):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": messages, "temperature": 0, "max_completion_tokens": max_tokens}}


# A: a developer message and content parts (normalised alike by both readers); q3 asks for more
# tokens than the tiny model's context holds, so its record is a failed one.
A_LINES = [
    chat_line("q0", [{"role": "developer", "content": [{"type": "text", "text": "Answer in "},
                                                        {"type": "text", "text": "one word."}]},
                     {"role": "user", "content": "capital of france"}]),
    chat_line("q1", [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}]),
    chat_line("q2", [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "what is a haiku"}]),
    chat_line("q3", [{"role": "user", "content": "write a poem"}], max_tokens=1024),
]
# B: a judge batch with the same ids and other prompts.
B_LINES = [chat_line(custom_id, [{"role": "user", "content": f"Judge answer {custom_id}: good?"}], model="gpt-4o")
           for custom_id in IDS]


class _NoCapture:
    def readouterr(self):
        class Captured:
            out = err = ""
        return Captured()


@pytest.fixture(scope="module")
def made(tiny, tmp_path_factory):  # noqa: F811
    """gen.a.jsonl from batch input A.jsonl; genp.jsonl from prompts.jsonl with a template and a
    system prompt, and the batch inputs create_batchinput.py makes from it with the same flags."""
    import os

    folder = tmp_path_factory.mktemp("asked")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        write_jsonl("A.jsonl", A_LINES)
        write_jsonl("B.jsonl", B_LINES)
        write_jsonl("prompts.jsonl", [{"id": custom_id, "question": f"what is {k} plus one"}
                                      for k, custom_id in enumerate(IDS)])
        flags = ["--id_field", "id", "--prompt_template", TEMPLATE, "--system_prompt", SYSTEM]
        for args in (["--input_file", "A.jsonl", "--output_file", "gen.a.jsonl"],
                     ["--input_file", "prompts.jsonl", *flags, "--output_file", "genp.jsonl", "--max_new_tokens", "2",
                      "--temperature", "0"]):
            assert run_main(_NoCapture(), "--model_name_or_path", tiny["base"], *args)[0] == 0
        for name, endpoint in (("chat", "/v1/chat/completions"), ("responses", "/v1/responses")):
            assert create_batchinput.main(["--input_file", "prompts.jsonl", *flags, "--model_name", "gpt-4o-mini",
                                           "--endpoint", endpoint, "--temperature", "0",
                                           "--output_file", f"bi.{name}.jsonl"]) == 0
    finally:
        os.chdir(cwd)
    return folder


@pytest.fixture
def here(made, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return copy_files(made, tmp_path)


def test_every_record_says_what_it_asked_failed_ones_too(here):
    records = {r["custom_id"]: r for r in read_jsonl("gen.a.jsonl")}
    assert records["q3"]["error"]["code"] == "context_length_exceeded"
    for line in A_LINES:  # the results side's reader of the batch line gives the same digest
        assert records[line["custom_id"]]["request_sha256"] == prompts.request_digest(body_prompt(line["body"]))
    assert "request_sha256" not in records["q0"]["fingerprint"]


def test_the_digest_counts_developer_as_system_and_joins_content_parts():
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "input_text", "text": "brief."}]},
             {"role": "user", "content": "hi"}]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert prompts.request_digest(parts) == prompts.request_digest(plain)
    assert prompts.request_digest(plain) != prompts.request_digest([{"role": "user", "content": "Be brief."},
                                                                    {"role": "user", "content": "hi"}])


def test_answers_reformat_against_the_input_they_were_made_from(here, capsys):
    code, out, err = run(capsys, "--input_file", "gen.a.jsonl", "--batch_input", "A.jsonl",
                         "--output_file", "out.jsonl", "--keep_fields", "prompt")
    assert code == 0, err
    assert "3 ok, 1 failed, 0 missing" in out
    assert [r["id"] for r in read_jsonl("out.jsonl")] == ["q0", "q1", "q2"]
    details = json.loads(read_jsonl("out.jsonl")[0]["details"])
    assert details["request_sha256"] == read_jsonl("gen.a.jsonl")[0]["request_sha256"]


MADE_FOR_A = ("gen.a.jsonl: 4 of 4 answers were made for other prompts than --batch_input B.jsonl has "
              "(first: q0, B.jsonl:1): reformat them against the input they were made from")


def test_answers_against_another_input_are_refused(here, capsys):
    assert refused(here, capsys, "--input_file", "gen.a.jsonl", "--batch_input", "B.jsonl",
                   "--output_file", "out.jsonl") == MADE_FOR_A


def test_compare_against_another_input_is_refused(here, capsys):
    assert refused(here, capsys, "--compare", "gen.a.jsonl", "--batch_input", "B.jsonl",
                   "--output_file", "table.csv") == MADE_FOR_A


def test_compare_of_a_reformatted_file_against_another_input_is_refused(here, capsys):
    assert run(capsys, "--input_file", "gen.a.jsonl", "--batch_input", "A.jsonl", "--output_file", "ref.jsonl")[0] == 0
    line = refused(here, capsys, "--compare", "ref.jsonl", "--batch_input", "B.jsonl", "--output_file", "table.csv")
    assert line == MADE_FOR_A.replace("gen.a.jsonl: 4 of 4", "ref.jsonl: 3 of 3")
    code, _, err = run(capsys, "--compare", "ref=ref.jsonl", "raw=gen.a.jsonl", "--batch_input", "A.jsonl",
                       "--output_file", "table.csv")
    assert code == 0, err


def test_one_changed_prompt_is_found_and_named(here, capsys):
    lines = [dict(line) for line in A_LINES]
    lines[2] = chat_line("q2", [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "what is a sonnet"}])
    write_jsonl("A2.jsonl", lines)
    assert refused(here, capsys, "--input_file", "gen.a.jsonl", "--batch_input", "A2.jsonl",
                   "--output_file", "out.jsonl") == (
        "gen.a.jsonl: 1 of 4 answers were made for other prompts than --batch_input A2.jsonl has "
        "(first: q2, A2.jsonl:3): reformat them against the input they were made from")


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_answers_to_a_prompts_file_match_the_batch_input_made_from_it(here, capsys, endpoint):
    """The important equivalence: the fine-tuned route's request from a prompts file (template
    filled, system prompt first) and create_batchinput.py's line from it digest alike."""
    code, out, err = run(capsys, "--input_file", "genp.jsonl", "--batch_input", f"bi.{endpoint}.jsonl",
                         "--output_file", "out.jsonl")
    assert code == 0, err
    assert "4 ok, 0 failed, 0 missing" in out
    code, _, err = run(capsys, "--compare", "genp.jsonl", "--batch_input", f"bi.{endpoint}.jsonl",
                       "--output_file", "table.csv")
    assert code == 0, err


def test_answers_to_a_prompts_file_match_it_read_with_the_same_flags(here, capsys):
    flags = ["--prompts_file", "prompts.jsonl", "--id_field", "id", "--system_prompt", SYSTEM]
    code, out, err = run(capsys, "--input_file", "genp.jsonl", *flags, "--prompt_template", TEMPLATE,
                         "--output_file", "out.jsonl")
    assert code == 0, err
    assert "4 ok, 0 failed, 0 missing" in out
    assert refused(here, capsys, "--compare", "genp.jsonl", *flags, "--prompt_template", r"Q: {question}",
                   "--output_file", "table.csv") == (
        "genp.jsonl: 4 of 4 answers were made for other prompts than --prompts_file prompts.jsonl has "
        "(first: q0, prompts.jsonl:1 (row 0)): reformat them against the input they were made from, read with the "
        "prompt flags they were made with")


def test_older_records_without_the_digest_are_not_checked(here, capsys):
    write_jsonl("old.jsonl", [{k: v for k, v in r.items() if k != "request_sha256"} for r in read_jsonl("gen.a.jsonl")])
    code, out, err = run(capsys, "--input_file", "old.jsonl", "--batch_input", "B.jsonl", "--output_file", "out.jsonl")
    assert code == 0, err
    assert "3 ok, 1 failed, 0 missing" in out
