"""reformat_results.py and datagen.results.reformat: every source kind and endpoint, multi-file
merge, duplicates, failures, order and joins, n > 1, CSV/Parquet output, bad inputs."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from datagen.results import answers, lines, reformat_results
from datagen.results.output import COLUMNS
from datagen.results.store import natural_key
from datagen.common.errors import UserError
from tests.reformat_fixtures import (COMPLETIONS_BODY, EMBEDDINGS_BODY, GENERATION, RESPONSES_BODY,
                                     batch_line, chat_body, chat_body_n, expired_line, ft_line,
                                     VLLM_BODY, http_error_line, ok_line, vllm_error_line, vllm_ok_line)
from tests.util import files_in, read_jsonl, run_script, write_jsonl

GPT = "gpt-4o-mini-2024-07-18"
CHAT_USAGE = {"prompt_tokens": 14, "completion_tokens": 7, "reasoning_tokens": 0}
FT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
FT_DETAILS = {"adapter_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
              "generation": GENERATION, "created": 1732531200}


def record(custom_id, text, finish_reason, *, source, model, adapter="", refusal=False, usage, details,
           samples=None, run=None):
    """The one output record, built here by hand (every column, in order, none null). The
    run name: OpenAI's model; a fine-tuned record without one, its adapter folder's name."""
    samples = samples or [(text, finish_reason)]
    run = run or (model if source == "openai" else adapter.rstrip("/").split("/")[-1] or "base")
    return {"id": custom_id, "generated_text": text, "source": source, "run": run, "model": model, "adapter": adapter,
            "finish_reason": finish_reason, "refusal": refusal, "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
            "reasoning_tokens": usage.get("reasoning_tokens", 0),
            "samples": [{"text": t, "finish_reason": f} for t, f in samples], "details": details}


def chat_record(custom_id, text="Paris is the capital of France.", finish_reason="stop", **more):
    return record(custom_id, text, finish_reason, source="openai", model=GPT, usage=CHAT_USAGE,
                  details={"endpoint": "chat"}, **more)


def ft_record(custom_id, text="Paris.", finish_reason="stop", *, details=None, **more):
    return record(custom_id, text, finish_reason, source="finetuned", model=FT_MODEL, adapter="out/lora-v1",
                  usage={"prompt_tokens": 14, "completion_tokens": 3}, details={**FT_DETAILS, **(details or {})},
                  **more)


def user(text):
    return [{"role": "user", "content": text}]


def parsed(row):
    """A written record with its ``details`` JSON text parsed (for exact comparison)."""
    assert isinstance(row["details"], str)
    return {**row, "details": json.loads(row["details"])}


def read_out(path):
    return [parsed(row) for row in read_jsonl(path)]


def run(capsys, *args):
    code = reformat_results.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- response bodies (pure functions, exact equality) -----------------------------------


def test_chat_answer_is_the_message_content():
    assert answers.chat_answer(chat_body()) == answers.Answer(
        texts=["Paris is the capital of France."], finish_reasons=["stop"], usage=CHAT_USAGE, model=GPT)


def test_chat_null_content_with_refusal_becomes_the_text():
    answer = answers.chat_answer(chat_body(None, refusal="I'm sorry, I can't help with that."))
    assert (answer.texts, answer.refusal, answer.finish_reasons) == (
        ["I'm sorry, I can't help with that."], True, ["stop"])


def test_chat_choices_in_index_order():
    body = chat_body_n(["a", "b", "c"], ["stop", "length", "stop"])
    body["choices"].reverse()
    answer = answers.chat_answer(body)
    assert (answer.texts, answer.finish_reasons) == (["a", "b", "c"], ["stop", "length", "stop"])


def test_chat_tool_calls_keep_the_calls_and_empty_text():
    body = chat_body(None, "tool_calls")
    calls = [{"id": "call_abc", "type": "function",
              "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]
    body["choices"][0]["message"]["tool_calls"] = calls
    answer = answers.chat_answer(body)
    assert (answer.texts, answer.tool_calls, answer.refusal) == ([""], calls, False)


def test_responses_answer_skips_reasoning_and_joins_output_text():
    assert answers.responses_answer(RESPONSES_BODY) == answers.Answer(
        texts=["Paris is the capital of France."], finish_reasons=["stop"], model="o4-mini-2025-04-16",
        usage={"prompt_tokens": 36, "completion_tokens": 87, "reasoning_tokens": 64})


def test_responses_incomplete_at_max_output_tokens_is_length():
    body = dict(RESPONSES_BODY, status="incomplete", incomplete_details={"reason": "max_output_tokens"},
                output=[RESPONSES_BODY["output"][0]])  # only reasoning: the budget ran out
    answer = answers.responses_answer(body)
    assert (answer.texts, answer.finish_reasons) == ([""], ["length"])


def test_responses_failed_status_is_an_error():
    body = dict(RESPONSES_BODY, status="failed", output=[],
                error={"code": "server_error", "message": "The model failed to generate a response."})
    assert answers.responses_answer(body).error == ("server_error", "The model failed to generate a response.")


def test_responses_refusal_part():
    body = dict(RESPONSES_BODY, output=[{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                                         "content": [{"type": "refusal", "refusal": "I can't help with that."}]}])
    answer = answers.responses_answer(body)
    assert (answer.texts, answer.refusal) == (["I can't help with that."], True)


def test_completions_answer_is_the_choice_text():
    assert answers.completions_answer(COMPLETIONS_BODY) == answers.Answer(
        texts=["\n\nThis is indeed a test"], finish_reasons=["length"], model="gpt-3.5-turbo-instruct",
        usage={"prompt_tokens": 5, "completion_tokens": 7})


def test_embeddings_answer_keeps_the_vectors():
    assert answers.embeddings_answer(EMBEDDINGS_BODY) == answers.Answer(
        embeddings=[[0.0023064255, -0.009327292, -0.0028842222]], model="text-embedding-3-small",
        usage={"prompt_tokens": 8})


def test_body_endpoint_by_object_and_by_shape():
    assert [answers.body_endpoint(b) for b in (chat_body(), RESPONSES_BODY, COMPLETIONS_BODY, EMBEDDINGS_BODY)] == \
        ["chat", "responses", "completions", "embeddings"]
    shapeless = {k: v for k, v in chat_body().items() if k != "object"}
    assert answers.body_endpoint(shapeless) == "chat"
    assert answers.body_endpoint({"results": [{"flagged": False}]}) is None  # moderations


# --- one raw line into a result --------------------------------------------------------------


@pytest.mark.parametrize("line, expected", [
    (expired_line("r1"), {"id": "r1", "reason": "error", "status_code": None, "error_code": "batch_expired",
                          "message": "This request could not be executed before the completion window expired.",
                          "source": "openai"}),
    (http_error_line("r2", status=429, code="rate_limit_exceeded", message="Rate limit reached."),
     {"id": "r2", "reason": "error", "status_code": 429, "error_code": "rate_limit_exceeded",
      "message": "Rate limit reached.", "source": "openai"}),
    (vllm_error_line("r3"), {"id": "r3", "reason": "error", "status_code": 400, "error_code": None,
                             "message": "The model does not support Chat Completions API", "source": "openai"}),
    (vllm_error_line("r4", {"error": {"message": "maximum context length is 4096 tokens", "type": "BadRequestError",
                                      "param": None, "code": 400}}),
     {"id": "r4", "reason": "error", "status_code": 400, "error_code": "BadRequestError",
      "message": "maximum context length is 4096 tokens", "source": "openai"}),
    (dict(ok_line("r5", chat_body()), error={"code": "server_error", "message": "boom"}),
     {"id": "r5", "reason": "error", "status_code": 200, "error_code": "server_error", "message": "boom",
      "source": "openai"}),
    (expired_line("", code="batch_cancelled", message="cancelled"),
     {"id": "", "reason": "error", "status_code": None, "error_code": "batch_cancelled", "message": "cancelled",
      "source": "openai"}),
])
def test_openai_failures_become_failed_records(line, expected):
    result = lines.openai_result(line, "f.jsonl:1")
    assert (result.ok, result.record) == (False, expected)


def test_openai_success_record():
    result = lines.openai_result(ok_line("q1", chat_body()), "f.jsonl:1")
    assert (result.ok, parsed(result.record)) == (True, chat_record("q1"))


def test_finetuned_record_with_samples():
    samples = [{"text": "Paris.", "finish_reason": "stop", "completion_tokens": 3},
               {"text": "It is Paris, the", "finish_reason": "length", "completion_tokens": 8}]
    result = lines.finetuned_result(ft_line("q1", samples=samples, completion_tokens=11), "g.jsonl:1")
    assert parsed(result.record) == {
        **ft_record("q1", samples=[("Paris.", "stop"), ("It is Paris, the", "length")],
                    details={"sample_completion_tokens": [3, 8]}), "completion_tokens": 11}
    assert result.ok and result.cut_off


def test_length_and_empty_as_failure_options():
    options = lines.ResultOptions(treat_length_as_failure=True, treat_empty_as_failure=True)
    cut = lines.openai_result(ok_line("a", chat_body("Paris is", "length")), "f:1", options)
    assert (cut.ok, parsed(cut.record)) == (False, {
        "id": "a", "reason": "length", "status_code": None, "error_code": None,
        "message": "the answer was cut off at the token limit (finish_reason length)",
        **{k: v for k, v in chat_record("a", "Paris is", "length").items() if k != "id"}})
    empty = lines.finetuned_result(ft_line("b", "  "), "g:1", options)
    assert (empty.ok, empty.record["reason"], empty.record["generated_text"]) == (False, "empty", "  ")
    refusal = lines.openai_result(ok_line("c", chat_body(None, refusal="No.")), "f:1", options)
    assert refusal.ok and refusal.record["refusal"] is True


def test_natural_key_orders_numbers_as_numbers():
    ids = ["request-10", "request-2", "b", "request-1", "a-07", "a-7x", "request-100"]
    assert sorted(ids, key=lambda i: (natural_key(i), i)) == \
        ["a-07", "a-7x", "b", "request-1", "request-2", "request-10", "request-100"]


# --- the script ------------------------------------------------------------------------------


def test_seed_openai_output_with_its_error_file(tmp_path, capsys):
    write_jsonl("results.jsonl", [ok_line("request-10", chat_body("Ten.")), ok_line("request-2", chat_body())])
    write_jsonl("results.jsonl.errors.jsonl", [expired_line("request-1"), http_error_line("request-3")])
    code, out, err = run(capsys, "--input_file", "results.jsonl", "--output_file", "out.jsonl",
                         "--source_type", "openai")
    assert code == 0
    assert read_out("out.jsonl") == [chat_record("request-2"), chat_record("request-10", "Ten.")]
    assert read_jsonl("out.failed.jsonl") == [
        {"id": "request-1", "reason": "error", "status_code": None, "error_code": "batch_expired",
         "message": "This request could not be executed before the completion window expired.", "source": "openai"},
        {"id": "request-3", "reason": "error", "status_code": 400, "error_code": "context_length_exceeded",
         "message": "This model's maximum context length is 128000 tokens.", "source": "openai"}]
    assert out.splitlines()[0] == "2 ok, 2 failed, 0 missing"
    assert "also reading results.jsonl.errors.jsonl" in err


@pytest.mark.parametrize("body, expected", [
    (RESPONSES_BODY, record("q", "Paris is the capital of France.", "stop", source="openai",
                            model="o4-mini-2025-04-16", details={"endpoint": "responses"},
                            usage={"prompt_tokens": 36, "completion_tokens": 87, "reasoning_tokens": 64})),
    (COMPLETIONS_BODY, record("q", "\n\nThis is indeed a test", "length", source="openai",
                              model="gpt-3.5-turbo-instruct", details={"endpoint": "completions"},
                              usage={"prompt_tokens": 5, "completion_tokens": 7})),
    (EMBEDDINGS_BODY, record("q", "", "", source="openai", model="text-embedding-3-small",
                             usage={"prompt_tokens": 8},
                             details={"endpoint": "embeddings",
                                      "embeddings": [[0.0023064255, -0.009327292, -0.0028842222]]})),
    (chat_body(None, refusal="I can't help with that."),
     chat_record("q", "I can't help with that.", refusal=True)),
], ids=["responses", "completions", "embeddings", "chat-refusal"])
def test_every_endpoint(tmp_path, capsys, body, expected):
    write_jsonl("results.jsonl", [ok_line("q", body)])
    code, out, _ = run(capsys, "--input_file", "results.jsonl", "--output_file", "out.jsonl")
    assert code == 0 and read_out("out.jsonl") == [expected]


def test_vllm_run_batch_file_with_inline_failures(tmp_path, capsys):
    write_jsonl("vllm.jsonl", [vllm_ok_line("a"), vllm_error_line("b")])
    code, out, _ = run(capsys, "--input_file", "vllm.jsonl", "--output_file", "out.jsonl")
    assert code == 0
    assert read_out("out.jsonl") == [record("a", "Hello there!", "stop", source="openai",
                                            model="meta-llama/Llama-3.1-8B-Instruct", details={"endpoint": "chat"},
                                            usage={"prompt_tokens": 12, "completion_tokens": 3})]
    assert [r["id"] for r in read_jsonl("out.failed.jsonl")] == ["b"]
    assert out.startswith("1 ok, 1 failed, 0 missing\n")


def test_finetuned_shards_by_glob_keep_provenance(tmp_path, capsys):
    write_jsonl("gen.shard-000-of-002.jsonl", [ft_line("request-2", "Two."), ft_line("request-0", "Zero.")])
    write_jsonl("gen.shard-001-of-002.jsonl", [ft_line("request-1", "One.", "length")])
    code, out, err = run(capsys, "--input_file", "gen.shard-*-of-002.jsonl", "--output_file", "ft.jsonl",
                         "--source_type", "finetuned")
    assert code == 0
    assert read_out("ft.jsonl") == [ft_record("request-0", "Zero."), ft_record("request-1", "One.", "length"),
                                      ft_record("request-2", "Two.")]
    assert "1 answer(s) were cut off" in err


def test_missing_generations_file_stands_for_its_shards(tmp_path, capsys):
    write_jsonl("gen.shard-000-of-002.jsonl", [ft_line("x")])
    code, out, err = run(capsys, "--input_file", "gen.jsonl", "--output_file", "ft.jsonl")
    assert code == 0 and [r["id"] for r in read_jsonl("ft.jsonl")] == ["x"]
    assert "only 1 of 2 shards" in err


def test_multi_part_merge_and_duplicates_resolved_for_the_success(tmp_path, capsys):
    # Part 1: x expired, y succeeded. Resubmission (part 2): x succeeded, y succeeded again.
    write_jsonl("results-1.jsonl", [ok_line("y", chat_body("first y"))])
    write_jsonl("results-1.jsonl.errors.jsonl", [expired_line("x")])
    write_jsonl("results-2.jsonl", [ok_line("x", chat_body("x at last")), ok_line("y", chat_body("second y"))])
    code, out, err = run(capsys, "--input_file", "results-*.jsonl", "--output_file", "out.jsonl")
    assert code == 0
    assert read_out("out.jsonl") == [chat_record("x", "x at last"), chat_record("y", "first y")]
    assert read_jsonl("out.failed.jsonl") == []
    assert out.startswith("2 ok, 0 failed, 0 missing\n")
    assert "2 custom_id(s) were read more than once (e.g. 'x'): kept the success for 1, the first one read for 1" in err


def test_failures_with_empty_ids_are_never_merged(tmp_path, capsys):
    write_jsonl("results.jsonl.errors.jsonl", [expired_line(""), expired_line("", n=1), expired_line("z")])
    code, out, _ = run(capsys, "--input_file", "results.jsonl.errors.jsonl", "--output_file", "out.jsonl")
    assert code == 0 and [r["id"] for r in read_jsonl("out.failed.jsonl")] == ["", "", "z"]
    assert out.startswith("0 ok, 3 failed, 0 missing\n")


def test_batch_input_order_missing_and_extra_ids(tmp_path, capsys):
    write_jsonl("batchinput.jsonl", [batch_line(i, f"Q {i}") for i in ("zeta", "alpha", "mid", "gone")])
    write_jsonl("results.jsonl", [ok_line("mid", chat_body("M")), ok_line("stray", chat_body("S")),
                                  ok_line("zeta", chat_body("Z"))])
    write_jsonl("results.jsonl.errors.jsonl", [http_error_line("alpha")])
    code, out, err = run(capsys, "--input_file", "results.jsonl", "--batch_input", "batchinput.jsonl",
                         "--output_file", "out.jsonl", "--keep_fields", "prompt")
    # A missing request fails the run by default; the files are written all the same.
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        "reformat_results.py: error: 1 of the 4 requests have no result; they are listed in out.failed.jsonl "
        "(reason missing); pass --fail_on none to accept a partial result")
    prompt = lambda i: {"prompt": [{"role": "user", "content": f"Q {i}"}]}  # noqa: E731
    assert read_out("out.jsonl") == [{**chat_record("zeta", "Z"), **prompt("zeta")},
                                       {**chat_record("mid", "M"), **prompt("mid")},
                                       {**chat_record("stray", "S"), "prompt": None}]
    failed = read_jsonl("out.failed.jsonl")
    assert [(r["id"], r["reason"]) for r in failed] == [("alpha", "error"), ("gone", "missing")]
    assert failed[1] == {"id": "gone", "reason": "missing", "status_code": None, "error_code": None,
                         "message": "no result for this request in the --input_file files"}
    assert out.startswith("3 ok, 1 failed, 1 missing\n")
    assert "1 result id(s) are not in batchinput.jsonl" in err
    code, out, err = run(capsys, "--input_file", "results.jsonl", "--batch_input", "batchinput.jsonl",
                         "--output_file", "out.jsonl", "--fail_on", "none")
    assert code == 0 and out.startswith("3 ok, 1 failed, 1 missing\n") and "error:" not in err


def test_batch_input_given_as_its_parts(tmp_path, capsys):
    write_jsonl("batchinput.part-001.jsonl", [batch_line("b", "B")])
    write_jsonl("batchinput.part-002.jsonl", [batch_line("a", "A")])
    write_jsonl("results.jsonl", [ok_line("a", chat_body("A")), ok_line("b", chat_body("B"))])
    code, _, _ = run(capsys, "--input_file", "results.jsonl", "--batch_input", "batchinput.jsonl",
                     "--output_file", "out.jsonl")
    assert code == 0 and [r["id"] for r in read_jsonl("out.jsonl")] == ["b", "a"]


def test_prompts_file_order_and_keep_fields(tmp_path, capsys):
    write_jsonl("prompts.jsonl", [
        {"qid": "q9", "prompt": "Capital of France?", "topic": "geo", "answer": "Paris"},
        {"qid": "q10", "messages": [{"role": "user", "content": "Hi"}], "topic": "chat"},
        {"qid": "q1", "prompt": "2+2?", "topic": "math", "answer": 4},
    ])
    write_jsonl("gen.jsonl", [ft_line("q1", "4"), ft_line("q9"), ft_line("q10", "Hello!")])
    code, out, _ = run(capsys, "--input_file", "gen.jsonl", "--prompts_file", "prompts.jsonl", "--id_field", "qid",
                       "--keep_fields", "topic,answer,prompt", "--output_file", "out.jsonl")
    assert code == 0
    assert read_out("out.jsonl") == [
        {**ft_record("q9"), "topic": "geo", "answer": "Paris", "prompt": user("Capital of France?")},
        {**ft_record("q10", "Hello!"), "topic": "chat", "answer": None, "prompt": user("Hi")},
        {**ft_record("q1", "4"), "topic": "math", "answer": 4, "prompt": user("2+2?")}]
    assert out.startswith("3 ok, 0 failed, 0 missing\n")


def test_prompts_file_csv_with_default_ids_and_template(tmp_path, capsys):
    with open("prompts.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["question", "level"], ["What is 2+2?", "easy"], ["Prove it.", "hard"]])
    write_jsonl("gen.jsonl", [ft_line("request-1", "QED"), ft_line("request-0", "4")])
    code, _, _ = run(capsys, "--input_file", "gen.jsonl", "--prompts_file", "prompts.csv",
                     "--prompt_template", "Q: {question}\nA:", "--keep_fields", "level,prompt",
                     "--output_file", "out.jsonl")
    assert code == 0
    assert [(r["id"], r["level"], r["prompt"]) for r in read_jsonl("out.jsonl")] == [
        ("request-0", "easy", user("Q: What is 2+2?\nA:")), ("request-1", "hard", user("Q: Prove it.\nA:"))]


def test_n_samples_one_line_per_request(tmp_path, capsys):
    write_jsonl("results.jsonl", [ok_line("q", chat_body_n(["A", "B", "C"], ["stop", "stop", "length"]))])
    code, _, _ = run(capsys, "--input_file", "results.jsonl", "--output_file", "out.jsonl")
    assert code == 0
    assert read_out("out.jsonl") == [
        chat_record("q", "A", samples=[("A", "stop"), ("B", "stop"), ("C", "length")])]
    code, out, _ = run(capsys, "--input_file", "results.jsonl", "--output_file", "strict.jsonl",
                       "--fail_on", "missing,length")
    assert code == 1 and read_jsonl("strict.jsonl") == []
    assert read_jsonl("strict.failed.jsonl")[0]["message"] == "1 of 3 samples were cut off at the token limit"


def test_fail_on_length_and_empty(tmp_path, capsys):
    write_jsonl("gen.jsonl", [ft_line("a", "Paris is", "length"), ft_line("b", ""), ft_line("c")])
    code, out, err = run(capsys, "--input_file", "gen.jsonl", "--output_file", "keep.jsonl")
    assert code == 0 and [r["id"] for r in read_jsonl("keep.jsonl")] == ["a", "b", "c"]
    assert "1 answer(s) are empty and are kept; --fail_on empty sets them apart" in err
    code, out, err = run(capsys, "--input_file", "gen.jsonl", "--output_file", "out.jsonl",
                         "--fail_on", "missing,length,empty")
    assert [r["id"] for r in read_jsonl("out.jsonl")] == ["c"]
    assert [(r["id"], r["reason"]) for r in read_jsonl("out.failed.jsonl")] == [("a", "length"), ("b", "empty")]
    assert out.startswith("1 ok, 2 failed, 0 missing\n")
    assert code == 1 and err.strip().splitlines()[-1] == (
        "reformat_results.py: error: requests that fail the run (--fail_on missing,length,empty): 1 length, "
        "1 empty; they are listed in out.failed.jsonl")


def test_fail_on_errors_exits_1_after_writing_both_files(tmp_path, capsys):
    write_jsonl("batchinput.jsonl", [batch_line(i, i.upper()) for i in "abc"])
    write_jsonl("results.jsonl", [ok_line("a", chat_body())])
    write_jsonl("results.jsonl.errors.jsonl", [http_error_line("b")])
    args = ["--input_file", "results.jsonl", "--batch_input", "batchinput.jsonl", "--output_file", "out.jsonl"]
    code, out, err = run(capsys, *args, "--fail_on", "missing,error")
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        "reformat_results.py: error: requests that fail the run (--fail_on missing,error): 1 missing, 1 error; "
        "they are listed in out.failed.jsonl")
    assert [r["id"] for r in read_jsonl("out.jsonl")] == ["a"]
    assert [r["id"] for r in read_jsonl("out.failed.jsonl")] == ["b", "c"]
    code, _, err = run(capsys, *args, "--fail_on", "error")  # missing requests alone would pass
    assert code == 1 and "(--fail_on error): 1 error;" in err
    code, _, err = run(capsys, *args, "--fail_on", "missing")  # errors are counted, not fatal
    assert code == 1 and err.strip().endswith("pass --fail_on none to accept a partial result")
    write_jsonl("results.jsonl", [ok_line(i, chat_body()) for i in "abc"])
    Path("results.jsonl.errors.jsonl").unlink()
    code, _, _ = run(capsys, *args, "--fail_on", "missing,error")
    assert code == 0


@pytest.mark.parametrize("value", ["", "missing,strict", "none,error", ","])
def test_fail_on_takes_known_kinds_only(tmp_path, capsys, value):
    write_jsonl("results.jsonl", [ok_line("a", chat_body())])
    with pytest.raises(SystemExit) as exit_info:
        reformat_results.main(["--input_file", "results.jsonl", "--fail_on", value])
    assert exit_info.value.code == 2
    assert "argument --fail_on: " in capsys.readouterr().err and not Path("reformatted.jsonl").exists()


def test_csv_output(tmp_path, capsys):
    write_jsonl("results.jsonl", [ok_line("q2", chat_body("say \"hi\",\nthen go")), ok_line("q1", chat_body(None, refusal="No."))])
    code, _, _ = run(capsys, "--input_file", "results.jsonl", "--output_file", "out.csv")
    assert code == 0
    with open("out.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    samples = lambda text: json.dumps([{"text": text, "finish_reason": "stop"}], separators=(",", ":"))  # noqa: E731
    assert rows == [
        list(COLUMNS),
        ["q1", "No.", "openai", GPT, GPT, "", "stop", "true", "14", "7", "0", samples("No."), '{"endpoint":"chat"}'],
        ["q2", "say \"hi\",\nthen go", "openai", GPT, GPT, "", "stop", "false", "14", "7", "0",
         samples("say \"hi\",\nthen go"), '{"endpoint":"chat"}']]
    assert read_jsonl("out.failed.jsonl") == []


def test_parquet_output_keeps_types(tmp_path, capsys):
    import pyarrow.parquet as pq  # pyarrow comes with datasets, a runtime dependency
    write_jsonl("prompts.jsonl", [{"id": "a", "prompt": "A?", "score": 1}, {"id": "b", "prompt": "B?", "score": 2.5}])
    samples = [{"text": "x", "finish_reason": "stop", "completion_tokens": 1},
               {"text": "y", "finish_reason": "stop", "completion_tokens": 1}]
    write_jsonl("gen.jsonl", [ft_line("b", "x", samples=samples), ft_line("a")])
    code, _, _ = run(capsys, "--input_file", "gen.jsonl", "--prompts_file", "prompts.jsonl", "--id_field", "id",
                     "--keep_fields", "score", "--output_file", "out.parquet")
    assert code == 0
    table = pq.read_table("out.parquet")
    assert table.column_names == [*COLUMNS, "score"]
    rows = table.to_pylist()
    assert [(r["id"], [s["text"] for s in r["samples"]], r["score"], r["prompt_tokens"]) for r in rows] == [
        ("a", ["Paris."], 1.0, 14), ("b", ["x", "y"], 2.5, 14)]
    assert json.loads(rows[0]["details"])["generation"] == GENERATION


def test_embeddings_to_parquet(tmp_path, capsys):
    import pyarrow.parquet as pq
    write_jsonl("emb.jsonl", [ok_line("e", EMBEDDINGS_BODY)])
    assert run(capsys, "--input_file", "emb.jsonl", "--output_file", "emb.parquet")[0] == 0
    [row] = pq.read_table("emb.parquet").to_pylist()
    assert parsed(row) == record("e", "", "", source="openai", model="text-embedding-3-small",
                                 usage={"prompt_tokens": 8},
                                 details={"endpoint": "embeddings",
                                          "embeddings": [[0.0023064255, -0.009327292, -0.0028842222]]})


def test_many_shuffled_results_with_resubmissions(tmp_path, capsys):
    """A few thousand lines: order, dedupe and accounting hold at more than toy size."""
    rng = random.Random(7)
    n = 3000
    write_jsonl("batchinput.jsonl", [batch_line(f"request-{i}", f"Q{i}") for i in range(n)])
    first = [ok_line(f"request-{i}", chat_body(f"A{i}")) if i % 10 else expired_line(f"request-{i}")
             for i in range(n)]
    retry = [ok_line(f"request-{i}", chat_body(f"R{i}")) for i in range(0, n, 20)]  # half the failures retried
    rng.shuffle(first)
    write_jsonl("results-1.jsonl", first)
    write_jsonl("results-2.jsonl", retry)
    code, out, _ = run(capsys, "--input_file", "results-1.jsonl", "results-2.jsonl", "--batch_input",
                       "batchinput.jsonl", "--output_file", "out.jsonl")
    assert code == 0
    expected = [(f"request-{i}", f"A{i}" if i % 10 else f"R{i}") for i in range(n) if i % 10 or i % 20 == 0]
    assert [(r["id"], r["generated_text"]) for r in read_jsonl("out.jsonl")] == expected
    assert [r["id"] for r in read_jsonl("out.failed.jsonl")] == [f"request-{i}" for i in range(10, n, 20)]
    assert out.startswith(f"{len(expected)} ok, {n // 20} failed, 0 missing\n")


# --- bad input: one line naming file:line, and no output left behind ---------------------


def _bad(tmp_path, capsys, args):
    before = files_in(tmp_path)
    code, out, err = run(capsys, *args)
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("reformat_results.py: error: ")
    assert files_in(tmp_path) == before  # no output, no temporary file
    return lines[-1]


def test_bad_malformed_json(tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text(json.dumps(ok_line("a", chat_body())) + "\n{\"custom_id\": \"b\", \n")
    message = _bad(tmp_path, capsys, ["--input_file", "results.jsonl", "--output_file", "out.jsonl"])
    assert "results.jsonl:2: not valid JSON" in message


def test_bad_line_of_neither_kind(tmp_path, capsys):
    write_jsonl("results.jsonl", [ok_line("a", chat_body()), {"custom_id": "b", "text": "?"}])
    message = _bad(tmp_path, capsys, ["--input_file", "results.jsonl", "--output_file", "out.jsonl"])
    assert message.endswith("results.jsonl:2: neither an OpenAI batch result line (custom_id, response, error) nor "
                            "a fine-tuned generations line (custom_id, generated_text); the line has keys: "
                            "custom_id, text; check --input_file")


def test_bad_mixed_kinds_with_source_type(tmp_path, capsys):
    write_jsonl("gen.jsonl", [ft_line("a"), ok_line("b", chat_body())])
    message = _bad(tmp_path, capsys, ["--input_file", "gen.jsonl", "--source_type", "finetuned",
                                      "--output_file", "out.jsonl"])
    assert "gen.jsonl:2: an OpenAI batch result line (custom_id, response, error), but --source_type is finetuned" \
        in message


def test_bad_mixed_kinds_with_auto(tmp_path, capsys):
    write_jsonl("gen.jsonl", [ft_line("a")])
    write_jsonl("results.jsonl", [ok_line("b", chat_body())])
    message = _bad(tmp_path, capsys, ["--input_file", "gen.jsonl", "results.jsonl", "--output_file", "out.jsonl"])
    assert "results.jsonl:1: an OpenAI batch result line" in message and "but gen.jsonl:1 is a fine-tuned" in message


def test_bad_batch_input_does_not_parse(tmp_path, capsys):
    write_jsonl("results.jsonl", [ok_line("a", chat_body())])
    (tmp_path / "batchinput.jsonl").write_text(json.dumps(batch_line("a", "A")) + "\nnot json\n")
    message = _bad(tmp_path, capsys, ["--input_file", "results.jsonl", "--batch_input", "batchinput.jsonl",
                                      "--output_file", "out.jsonl"])
    assert "batchinput.jsonl:2: not valid JSON" in message


def test_bad_batch_input_duplicate_id(tmp_path, capsys):
    write_jsonl("results.jsonl", [ok_line("a", chat_body())])
    write_jsonl("batchinput.jsonl", [batch_line("a", "A"), batch_line("b", "B"), batch_line("a", "C")])
    message = _bad(tmp_path, capsys, ["--input_file", "results.jsonl", "--batch_input", "batchinput.jsonl",
                                      "--output_file", "out.jsonl"])
    assert "batchinput.jsonl:3: duplicate custom_id 'a' in --batch_input (first at batchinput.jsonl:1)" in message


@pytest.mark.parametrize("output", ["results.jsonl", "./results.jsonl", "results.failed.jsonl"])
def test_bad_output_path_equal_to_an_input(tmp_path, capsys, output):
    write_jsonl("results.jsonl", [ok_line("a", chat_body())])
    write_jsonl("results.failed.jsonl", [ok_line("b", chat_body())])
    args = ["--input_file", "results.jsonl", "results.failed.jsonl", "--output_file", output]
    if output == "results.failed.jsonl":  # the failed file would land on an input
        args[-1] = "results.jsonl.out.jsonl"
        args += ["--failed_file", output]
    message = _bad(tmp_path, capsys, args)
    assert "is the same file as the input" in message


def test_bad_keep_field_in_no_row(tmp_path, capsys):
    write_jsonl("prompts.jsonl", [{"prompt": "A?"}])
    write_jsonl("gen.jsonl", [ft_line("request-0")])
    message = _bad(tmp_path, capsys, ["--input_file", "gen.jsonl", "--prompts_file", "prompts.jsonl",
                                      "--keep_fields", "topc", "--output_file", "out.jsonl"])
    assert "--keep_fields topc: no request in --prompts_file has this field" in message


def test_bad_unreadable_body_and_empty_input(tmp_path, capsys):
    write_jsonl("results.jsonl", [ok_line("a", {"object": "list", "results": [{"flagged": False}]})])
    assert "results.jsonl:1: the response body is not a chat" in _bad(
        tmp_path, capsys, ["--input_file", "results.jsonl", "--output_file", "out.jsonl"])
    (tmp_path / "empty.jsonl").write_text("")
    assert "no result lines in empty.jsonl" in _bad(
        tmp_path, capsys, ["--input_file", "empty.jsonl", "--output_file", "out.jsonl"])


def test_bad_output_extension_and_glob(tmp_path, capsys):
    write_jsonl("results.jsonl", [ok_line("a", chat_body())])
    assert "end the name in .jsonl, .csv, .tsv or .parquet" in _bad(
        tmp_path, capsys, ["--input_file", "results.jsonl", "--output_file", "out.txt"])
    assert "--input_file nothing-*.jsonl matches no file" in _bad(
        tmp_path, capsys, ["--input_file", "nothing-*.jsonl", "--output_file", "out.jsonl"])


def test_runs_as_a_script(tmp_path):
    write_jsonl("results.jsonl", [ok_line("a", chat_body())])
    done = run_script("reformat_results.py", "--input_file", "results.jsonl", "--output_file", "out.jsonl",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "1 ok, 0 failed, 0 missing"
    assert read_out(tmp_path / "out.jsonl") == [chat_record("a")]
    usage = run_script("reformat_results.py", cwd=tmp_path)
    assert usage.returncode == 2 and "--input_file" in usage.stderr


def test_user_error_for_bad_line_shape_in_parser():
    with pytest.raises(UserError, match=r"g.jsonl:4: generated_text must be text"):
        lines.finetuned_result({"custom_id": "a", "generated_text": None}, "g.jsonl:4")


def test_stdlib_json_fallback_writes_the_same_bytes(tmp_path):
    """orjson is optional: without it the standard library writes identical files."""
    write_jsonl("results.jsonl", [ok_line("a", chat_body("naïve 東京 \"q\"\n\t\u007f end")),
                                  ok_line("b", chat_body_n(["x", "y"])), expired_line("c")])
    args = ["--input_file", "results.jsonl", "--output_file"]
    fast = run_script("reformat_results.py", *args, "fast.jsonl", cwd=tmp_path)
    blocked = ("import runpy, sys; sys.modules['orjson'] = None; sys.argv = sys.argv[1:]; "
               "sys.path.insert(0, sys.argv[0].rpartition('/')[0]); runpy.run_path(sys.argv[0], run_name='__main__')")
    import subprocess
    import sys

    from tests.util import ROOT
    slow = subprocess.run([sys.executable, "-c", blocked, str(ROOT / "reformat_results.py"), *args, "slow.jsonl"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert fast.returncode == 0 and slow.returncode == 0, slow.stderr
    assert (tmp_path / "fast.jsonl").read_bytes() == (tmp_path / "slow.jsonl").read_bytes()
    assert (tmp_path / "fast.failed.jsonl").read_bytes() == (tmp_path / "slow.failed.jsonl").read_bytes()


@pytest.mark.parametrize("line", [
    ok_line("a", chat_body()), ok_line("b", chat_body("  ")), ok_line("c", chat_body("cut", "length")),
    ok_line("d", chat_body(None, refusal="No.")), ok_line("e", chat_body_n(["x", "y"])), ok_line("f", VLLM_BODY),
    dict(ok_line("g", chat_body()), error={"code": "x", "message": "y"}), http_error_line("h"),
], ids=list("abcdefgh"))
def test_fast_path_agrees_with_the_general_path(line):
    fast = lines.fast_chat_record(line)
    general = lines.openai_result(line, "f:1")
    if fast is not None:
        assert general.ok and fast == general.record
    assert (fast is not None) == (line["custom_id"] in ("a", "f"))


# --- one schema for every route, endpoint and n ----------------------------------------------

QUESTIONS = [["qid", "question", "gold_answer", "category"], ["q0", "Capital of France?", "Paris", "geo"],
             ["q1", "2+2?", "4", "math"], ["q2", "Say 1.", "1", "misc"]]
SYSTEM = "Answer briefly."
PROMPT_FLAGS = ["--id_field", "qid", "--prompt_field", "question", "--system_prompt", SYSTEM]
KEEP = "question,gold_answer,category,prompt"


def write_questions():
    with open("questions.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(QUESTIONS)
    done = run_script("create_batchinput.py", "--input_file", "questions.csv", "--model_name", "gpt-4o-mini",
                      "--output_file", "batchinput.jsonl", *PROMPT_FLAGS, cwd=".")
    assert done.returncode == 0, done.stderr
    return [row[0] for row in QUESTIONS[1:]]


def raw_runs(ids):
    """One raw file per route, endpoint and n, answering ``ids`` (the last one fails)."""
    *good, bad = ids
    three = [{"text": t, "finish_reason": f, "completion_tokens": c}
             for t, f, c in (("A", "stop", 1), ("B is", "length", 8), ("C", "stop", 1))]
    ft_base = lambda i: {**ft_line(i), "adapter": None, "adapter_sha256": None}  # noqa: E731
    ft_failed = {"custom_id": bad, "error": {"code": "context_length_exceeded", "message": "too long"},
                 "source": "finetuned", "model": FT_MODEL, "adapter": "out/lora-v1"}
    return {
        "chat": [ok_line(i, chat_body(f"text {i}")) for i in good] + [expired_line(bad)],
        "chat_n3": [ok_line(i, chat_body_n(["x", "y", "z"], ["stop", "length", "stop"])) for i in ids],
        "responses": [ok_line(i, RESPONSES_BODY) for i in ids],
        "completions": [ok_line(i, COMPLETIONS_BODY) for i in ids],
        "embeddings": [ok_line(i, EMBEDDINGS_BODY) for i in ids],
        "vllm": [vllm_ok_line(i) for i in good] + [vllm_error_line(bad)],
        "ft": [ft_line(i, f"ft {i}") for i in good] + [ft_failed],
        "ft_n3": [ft_line(i, "A", samples=three, completion_tokens=10) for i in ids],
        "ft_base": [ft_base(i) for i in ids],
    }


def test_every_route_endpoint_and_n_loads_as_one_table(tmp_path, capsys):
    import datasets
    import pandas as pd
    import pyarrow.parquet as pq

    ids = write_questions()
    plain, kept, parquet = [], [], []
    for name, raw in raw_runs(ids).items():
        write_jsonl(f"{name}.raw.jsonl", raw)
        # no --batch_input: its gpt-4o-mini chat requests did not make the responses, completions, embeddings
        # and vLLM answers (other models), and results without a sidecar must name its model
        for out, more in ((f"{name}.jsonl", []), (f"{name}.parquet", []),
                          (f"{name}.kept.jsonl", ["--prompts_file", "questions.csv", *PROMPT_FLAGS,
                                                  "--keep_fields", KEEP])):
            code, _, err = run(capsys, "--input_file", f"{name}.raw.jsonl", "--output_file", out, *more)
            assert code == 0, err
        plain.append(f"{name}.jsonl")
        kept.append(f"{name}.kept.jsonl")
        parquet.append(f"{name}.parquet")
    # datasets takes its types from the first file: each file in turn comes first.
    for files in (plain, kept):
        features = set()
        for first in range(len(files)):
            order = files[first:] + files[:first]
            table = datasets.load_dataset("json", data_files=order, split="train", cache_dir=str(tmp_path / "c"))
            features.add(repr(table.features))
            assert len(table) == sum(len(read_jsonl(f)) for f in files)
        assert len(features) == 1, features
    frames = [pd.read_json(f, lines=True) for f in kept]
    assert {tuple(f.columns) for f in frames} == {(*COLUMNS, "question", "gold_answer", "category", "prompt")}
    assert len({tuple(map(str, f.dtypes)) for f in frames}) == 1
    assert len({str(pq.read_schema(f)) for f in parquet}) == 1
    assert len({tuple(map(str, pd.read_parquet(f).dtypes)) for f in parquet}) == 1
    # Kept fields are faithful (the CSV's "4" stays text) and the prompt is what the model saw.
    rows = {r["id"]: r for r in read_jsonl("ft_n3.kept.jsonl")}
    assert (rows["q1"]["gold_answer"], rows["q1"]["category"]) == ("4", "math")
    assert rows["q1"]["prompt"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "2+2?"}]
    assert rows["q1"]["samples"] == [{"text": "A", "finish_reason": "stop"}, {"text": "B is", "finish_reason": "length"},
                                     {"text": "C", "finish_reason": "stop"}]
    assert json.loads(rows["q1"]["details"])["sample_completion_tokens"] == [1, 8, 1]
    assert [r["adapter"] for r in read_jsonl("ft_base.jsonl")] == ["", "", ""]
    assert [r["id"] for r in read_jsonl("ft.failed.jsonl")] == ["q2"]


def test_prompts_file_alone_gives_the_same_prompt_as_the_batch_input(tmp_path, capsys):
    ids = write_questions()
    write_jsonl("gen.jsonl", [ft_line(i) for i in ids])
    code, _, err = run(capsys, "--input_file", "gen.jsonl", "--prompts_file", "questions.csv", *PROMPT_FLAGS,
                       "--keep_fields", "prompt", "--output_file", "alone.jsonl")
    assert code == 0, err
    code, _, err = run(capsys, "--input_file", "gen.jsonl", "--batch_input", "batchinput.jsonl",
                       "--keep_fields", "prompt", "--output_file", "batch.jsonl")
    assert code == 0, err
    bodies = [line["body"]["messages"] for line in read_jsonl("batchinput.jsonl")]
    assert [r["prompt"] for r in read_jsonl("alone.jsonl")] == [r["prompt"] for r in read_jsonl("batch.jsonl")] \
        == bodies


def test_batch_input_and_prompts_file_that_do_not_match(tmp_path, capsys):
    write_questions()
    write_jsonl("gen.jsonl", [ft_line("q0")])
    message = _bad(tmp_path, capsys, ["--input_file", "gen.jsonl", "--batch_input", "batchinput.jsonl",
                                      "--prompts_file", "questions.csv", "--prompt_field", "question",
                                      "--keep_fields", "category",  # no --id_field: ids request-N
                                      "--output_file", "out.jsonl", "--fail_on", "none"])
    assert message.endswith("no custom_id of --batch_input is in --prompts_file; read it with the same "
                            "--id_field (and prompt flags) that made the batch input")


def test_missing_requests_against_a_prompts_file_exit_1_unless_allowed(tmp_path, capsys):
    write_jsonl("prompts.jsonl", [{"prompt": "A?"}, {"prompt": "B?"}, {"prompt": "C?"}])
    write_jsonl("gen.jsonl", [ft_line("request-1")])
    code, out, err = run(capsys, "--input_file", "gen.jsonl", "--prompts_file", "prompts.jsonl",
                         "--output_file", "out.jsonl")
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        "reformat_results.py: error: 2 of the 3 requests have no result; they are listed in out.failed.jsonl "
        "(reason missing); pass --fail_on none to accept a partial result")
    assert [(r["id"], r["reason"]) for r in read_jsonl("out.failed.jsonl")] == [("request-0", "missing"),
                                                                                ("request-2", "missing")]
    code, out, _ = run(capsys, "--input_file", "gen.jsonl", "--prompts_file", "prompts.jsonl",
                       "--output_file", "out.jsonl", "--fail_on", "none")
    assert code == 0 and out.startswith("1 ok, 0 failed, 2 missing\n")


def test_a_generations_file_of_several_adapters_is_named_per_adapter(tmp_path, capsys):
    write_jsonl("gen.lora-a.jsonl", [ft_line("x")])
    write_jsonl("gen.base.jsonl", [ft_line("x")])
    message = _bad(tmp_path, capsys, ["--input_file", "gen.jsonl", "--output_file", "out.jsonl"])
    assert message.endswith("--input_file gen.jsonl: no such file (one file per adapter: gen.base.jsonl, "
                            "gen.lora-a.jsonl: reformat each one, or give gen.jsonl to --compare); check the path")
    code, _, err = run(capsys, "--input_file", "gen.lora-a.jsonl", "--output_file", "out.jsonl")
    assert code == 0, err
