"""create_batchinput.py: exact OpenAI batch lines, every endpoint, the split, the dry run,
and one clear error with no output left behind for each kind of bad input."""

import json

import pytest

from datagen.batchapi import create_batchinput
from datagen.batchapi.estimates import input_tokens
from tests.test_prompts import KINDS, ROWS, write_kind
from tests.util import files_in, read_jsonl, run_script, write_jsonl

MODEL = "gpt-4o-mini"


def run(capsys, *args):
    code = create_batchinput.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", ROWS)


@pytest.mark.parametrize("kind", KINDS)
def test_every_input_kind_gives_the_same_exact_lines(tmp_path, capsys, kind):
    path = write_kind(tmp_path, kind)
    code, out, _ = run(capsys, "--input_file", path, "--model_name", MODEL, "--id_field", "qid")
    assert code == 0
    assert read_jsonl("batchinput.jsonl") == [
        {"custom_id": r["qid"], "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": MODEL, "messages": [{"role": "user", "content": r["prompt"]}]}}
        for r in ROWS
    ]
    assert "wrote batchinput.jsonl: 3 requests" in out


def test_default_ids_are_request_row(prompts_file, capsys):
    run(capsys, "--input_file", prompts_file, "--model_name", MODEL)
    assert [line["custom_id"] for line in read_jsonl("batchinput.jsonl")] == ["request-0", "request-1", "request-2"]


def test_output_is_compact_utf8_one_object_per_line(prompts_file, capsys):
    run(capsys, "--input_file", prompts_file, "--model_name", MODEL, "--output_file", "out.jsonl")
    text = open("out.jsonl", encoding="utf-8").read()
    assert "東京" in text and "\\u" not in text
    assert text.count("\n") == 3 and text.endswith("\n")


ENDPOINT_CASES = [
    (["--endpoint", "/v1/chat/completions", "--system_prompt", "Be brief.", "--temperature", "0.5", "--top_p", "0.9",
      "--max_tokens", "64", "--seed", "7", "--n", "2", "--stop", "###", "--stop", "END"],
     "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
      "temperature": 0.5, "top_p": 0.9, "seed": 7, "n": 2, "stop": ["###", "END"], "max_completion_tokens": 64}),
    (["--endpoint", "/v1/responses", "--system_prompt", "Be brief.", "--temperature", "0", "--max_tokens", "64"],
     "/v1/responses",
     {"model": MODEL, "instructions": "Be brief.", "input": "What is 2+2?", "temperature": 0.0, "max_output_tokens": 64}),
    (["--endpoint", "/v1/completions", "--max_tokens", "16", "--seed", "1", "--stop", "\n"],
     "/v1/completions",
     {"model": MODEL, "prompt": "What is 2+2?", "seed": 1, "stop": ["\n"], "max_tokens": 16}),
    (["--endpoint", "/v1/embeddings"], "/v1/embeddings", {"model": MODEL, "input": "What is 2+2?"}),
]


@pytest.mark.parametrize("flags,url,body", ENDPOINT_CASES, ids=lambda c: c if isinstance(c, str) else None)
def test_each_endpoint_gets_its_own_body_shape(prompts_file, capsys, flags, url, body):
    code, _, err = run(capsys, "--input_file", prompts_file, "--model_name", MODEL, *flags)
    assert code == 0, err
    first = read_jsonl("batchinput.jsonl")[0]
    assert first == {"custom_id": "request-0", "method": "POST", "url": url, "body": body}


def test_messages_rows_and_template(tmp_path, capsys):
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "bye"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": conversation}, {"question": "why?"}])
    code, _, err = run(capsys, "--input_file", path, "--model_name", MODEL, "--endpoint", "/v1/responses")
    assert code == 1 and "no 'prompt' field (--prompt_field) and no 'messages' field" in err
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": conversation}])
    run(capsys, "--input_file", path, "--model_name", MODEL, "--endpoint", "/v1/responses")
    assert read_jsonl("batchinput.jsonl")[0]["body"] == {"model": MODEL, "input": conversation}
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "why?", "ctx": "{braces}"}])
    run(capsys, "--input_file", path, "--model_name", MODEL, "--prompt_template", "{ctx} Q: {question} {{json}}")
    assert read_jsonl("batchinput.jsonl")[0]["body"]["messages"] == [
        {"role": "user", "content": "{braces} Q: why? {json}"}]


def test_response_format_file_for_chat_and_responses(prompts_file, tmp_path, capsys):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
              "additionalProperties": False}
    (tmp_path / "answer.json").write_text(json.dumps(schema))
    run(capsys, "--input_file", prompts_file, "--model_name", MODEL, "--response_format_file", "answer.json")
    assert read_jsonl("batchinput.jsonl")[0]["body"]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    run(capsys, "--input_file", prompts_file, "--model_name", MODEL, "--response_format_file", "answer.json",
        "--endpoint", "/v1/responses")
    assert read_jsonl("batchinput.jsonl")[0]["body"]["text"] == {
        "format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}}


def test_extra_body_reaches_the_body(prompts_file, capsys):
    code, _, _ = run(capsys, "--input_file", prompts_file, "--model_name", MODEL, "--extra_body", '{"logprobs": true}')
    assert code == 0
    assert read_jsonl("batchinput.jsonl")[0]["body"]["logprobs"] is True


def many_prompts(tmp_path, count):
    return write_jsonl(tmp_path / "many.jsonl", [{"prompt": f"prompt number {i}"} for i in range(count)])


def test_split_by_request_count_into_numbered_parts(tmp_path, capsys, caplog):
    path = many_prompts(tmp_path, 10)
    (tmp_path / "batchinput.jsonl").write_text("stale\n")  # an earlier single-file run
    code, out, _ = run(capsys, "--input_file", path, "--model_name", MODEL, "--max_requests_per_file", "4")
    assert code == 0
    assert files_in(tmp_path) == ["batchinput.part-001.jsonl", "batchinput.part-002.jsonl",
                                  "batchinput.part-003.jsonl", "many.jsonl"]
    parts = [read_jsonl(tmp_path / f"batchinput.part-00{i}.jsonl") for i in (1, 2, 3)]
    assert [len(p) for p in parts] == [4, 4, 2]
    assert [line["custom_id"] for p in parts for line in p] == [f"request-{i}" for i in range(10)]
    assert "split into 3 parts" in caplog.text
    assert "wrote batchinput.part-003.jsonl: 2 requests" in out
    # A later run that fits one file removes the stale parts.
    run(capsys, "--input_file", path, "--model_name", MODEL)
    assert files_in(tmp_path) == ["batchinput.jsonl", "many.jsonl"]


def test_split_by_bytes_keeps_every_part_under_the_limit(tmp_path, capsys):
    path = many_prompts(tmp_path, 20)
    limit = 500
    run(capsys, "--input_file", path, "--model_name", MODEL, "--max_bytes_per_file", str(limit))
    parts = sorted(tmp_path.glob("batchinput.part-*.jsonl"))
    assert len(parts) > 1
    assert all(p.stat().st_size <= limit for p in parts)
    assert sum(len(read_jsonl(p)) for p in parts) == 20


def test_split_by_estimated_tokens(tmp_path, capsys):
    from datagen.batchapi.estimates import estimate_tokens

    path = many_prompts(tmp_path, 20)  # "prompt number 0" .. "prompt number 19"
    code, out, _ = run(capsys, "--input_file", path, "--model_name", MODEL, "--max_tokens", "20",
                       "--max_tokens_per_file", "100")
    assert code == 0
    parts = sorted(tmp_path.glob("batchinput.part-*.jsonl"))
    per_part = [sum(estimate_tokens(line["url"], line["body"]) for line in read_jsonl(p)) for p in parts]
    assert len(parts) > 1 and all(tokens <= 100 for tokens in per_part)
    assert [line["custom_id"] for p in parts for line in read_jsonl(p)] == [f"request-{i}" for i in range(20)]
    assert f"wrote batchinput.part-001.jsonl: {len(read_jsonl(parts[0]))} requests" in out
    assert f"about {per_part[0]:,} tokens" in out


def test_dry_run_says_how_many_parts_fit_the_enqueued_limit(tmp_path, capsys):
    path = many_prompts(tmp_path, 20)
    args = ("--input_file", path, "--model_name", MODEL, "--max_tokens", "20", "--max_tokens_per_file", "100",
            "--dry_run")
    code, out, _ = run(capsys, *args, "--max_enqueued_tokens", "250")
    assert code == 0 and files_in(tmp_path) == ["many.jsonl"]
    parts = [int(line.split("about ")[1].split()[0].replace(",", "")) for line in out.splitlines()
             if line.startswith("would write")]
    fit = next(k for k in range(len(parts) + 1) if k == len(parts) or sum(parts[:k + 1]) > 250)
    assert f"enqueued-token limit 250: {fit} of {len(parts)} part(s) fit at once" in out
    code, out, _ = run(capsys, *args, "--max_enqueued_tokens", "50")
    assert code == 0 and "part 1 alone is about" in out and "would always be refused" in out


def test_a_request_over_the_token_split_alone_is_refused(tmp_path, capsys):
    path = many_prompts(tmp_path, 3)
    code, _, err = run(capsys, "--input_file", path, "--model_name", MODEL, "--max_tokens", "100",
                       "--max_tokens_per_file", "50")
    assert code == 1
    assert f"{path}:1 (row 0): this request alone is about 108 tokens (input + its output cap), over " \
           "--max_tokens_per_file 50" in err
    assert files_in(tmp_path) == ["many.jsonl"]
    code, _, err = run(capsys, "--input_file", path, "--model_name", MODEL, "--max_enqueued_tokens", "5")
    assert code == 1 and "--max_enqueued_tokens goes with --dry_run" in err


def test_dry_run_prints_counts_tokens_and_cost_and_writes_nothing(tmp_path, capsys):
    path = many_prompts(tmp_path, 10)
    code, out, _ = run(capsys, "--input_file", path, "--model_name", MODEL, "--dry_run", "--max_requests_per_file", "4",
                       "--max_tokens", "100", "--n", "2", "--input_price", "0.15", "--output_price", "0.6")
    assert code == 0
    assert files_in(tmp_path) == ["many.jsonl"]
    assert "would write batchinput.part-001.jsonl: 4 requests" in out
    tokens = input_tokens({"messages": [{"role": "user", "content": "prompt number 0"}]})
    assert tokens == -(-(len("prompt number 0") + 16) // 4)
    assert f"total: 10 requests in 3 file(s), about {10 * tokens} input tokens" in out
    assert "output: at most 2,000 output tokens (the cap: --max_tokens 100 x n 2 per request)" in out
    assert "estimated cost: $0.000012 input + at most $0.0012 output = at most $0.0012" in out


def test_runs_as_a_script_with_usage_errors_exit_2(prompts_file):
    result = run_script("create_batchinput.py", "--input_file", prompts_file)
    assert result.returncode == 2
    assert "the following arguments are required: --model_name" in result.stderr
    result = run_script("create_batchinput.py", "--input_file", prompts_file, "--model_name", MODEL)
    assert result.returncode == 0, result.stderr
    assert len(read_jsonl("batchinput.jsonl")) == 3


def test_help_opens_with_example_commands():
    result = run_script("create_batchinput.py", "--help")
    assert result.returncode == 0
    assert "python create_batchinput.py --input_file examples/prompts.jsonl --model_name gpt-4o-mini" in result.stdout


# --- bad input: one line, what and how, and nothing left behind ----------------------

BAD = {
    "missing file": ([], None, "nope.jsonl: no such file or folder; check --input_file"),
    "empty file": ([], "", "the file is empty"),
    "malformed line": ([], '{"prompt": "a"}\n{"prompt": "b"\n', "in.jsonl:2: not valid JSON"),
    "no prompt field": ([], '{"prompt": "a"}\n{"question": "b", "topic": "x"}\n',
                        "in.jsonl:2 (row 1): no 'prompt' field (--prompt_field) and no 'messages' field "
                        "(--messages_field); the row has fields: question, topic"),
    "unknown placeholder": (["--prompt_template", "Q: {question}"], '{"prompt": "a"}\n',
                            "in.jsonl:1 (row 0): --prompt_template placeholder {question} is not a field of this row; "
                            "the row has fields: prompt"),
    "malformed template": (["--prompt_template", "Q: {question"], '{"question": "a"}\n', "--prompt_template is malformed"),
    "empty prompt": ([], '{"prompt": "a"}\n{"prompt": "   "}\n', "in.jsonl:2 (row 1): empty prompt"),
    "duplicate ids": (["--id_field", "id"], '{"id": "x", "prompt": "a"}\n{"id": "y", "prompt": "b"}\n{"id": "x", "prompt": "c"}\n',
                      "duplicate custom_id 'x' at in.jsonl:1 (row 0) and in.jsonl:3 (row 2)"),
    "missing id": (["--id_field", "id"], '{"id": "x", "prompt": "a"}\n{"prompt": "b"}\n',
                   "in.jsonl:2 (row 1): no id in field 'id' (--id_field); the row has fields: prompt"),
    "unsupported endpoint": (["--endpoint", "/v1/images"], '{"prompt": "a"}\n',
                             "unsupported endpoint '/v1/images'; use one of /v1/chat/completions, /v1/responses"),
    "param the endpoint lacks": (["--endpoint", "/v1/embeddings", "--max_tokens", "5"], '{"prompt": "a"}\n',
                                 "--max_tokens not supported by /v1/embeddings"),
    "unreadable schema": (["--response_format_file", "nope.json"], '{"prompt": "a"}\n',
                          "--response_format_file nope.json: cannot read it (No such file or directory)"),
    "schema not JSON": (["--response_format_file", "in.jsonl"], "{\n", "--response_format_file in.jsonl:2: not valid JSON"),
    "output equals input": (["--output_file", "in.jsonl"], '{"prompt": "a"}\n',
                            "--output_file in.jsonl is the same file as the input in.jsonl"),
    "messages to completions": (["--endpoint", "/v1/completions"], '{"prompt": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n',
                                "in.jsonl:2 (row 1): a messages conversation needs /v1/chat/completions or /v1/responses"),
    "not an object": ([], '["a"]\n', "in.jsonl:1 (row 0): expected a JSON object per row, got list"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_one_line_error_and_no_output(tmp_path, capsys, name):
    flags, content, message = BAD[name]
    source = "nope.jsonl" if content is None else "in.jsonl"
    if content is not None:
        (tmp_path / "in.jsonl").write_text(content, encoding="utf-8")
    before = files_in(tmp_path)
    code, out, err = run(capsys, "--input_file", source, "--model_name", MODEL, *flags)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("create_batchinput.py: error: ")
    assert message in err
    assert "Traceback" not in err
    assert files_in(tmp_path) == before  # no output, no temporary file


def test_error_in_a_late_row_leaves_no_part_files(tmp_path, capsys):
    rows = [{"prompt": f"p{i}"} for i in range(9)] + [{"prompt": ""}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    code, _, err = run(capsys, "--input_file", path, "--model_name", MODEL, "--max_requests_per_file", "3")
    assert code == 1 and "in.jsonl:10 (row 9): empty prompt" in err
    assert files_in(tmp_path) == ["in.jsonl"]


# --- generation parameters: checked against the API's ranges before anything is written -----

BAD_FLAGS = [
    (["--temperature", "nan"], "argument --temperature: nan is not a finite number; give a number from 0 to 2"),
    (["--top_p", "7"], "argument --top_p: 7 is out of range; give a number from 0 to 1"),
    (["--n", "100000"], "argument --n: 100000 is out of range; give an integer from 1 to 128"),
    (["--temperature", "-5"], "argument --temperature: -5 is out of range; give a number from 0 to 2"),
    (["--temperature", "0.7x"], "argument --temperature: '0.7x' is not a number; give a number from 0 to 2"),
    (["--max_tokens", "0"], "argument --max_tokens: 0 is out of range; give an integer of at least 1"),
    (["--seed", "1.5"], "argument --seed: '1.5' is not an integer; give a 64-bit integer"),
    (["--stop", ""], "argument --stop: an empty stop sequence"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_values_are_usage_errors_and_write_nothing(prompts_file, tmp_path, flags, message):
    before = files_in(tmp_path)
    result = run_script("create_batchinput.py", "--input_file", prompts_file, "--model_name", MODEL, *flags,
                        cwd=tmp_path)
    assert result.returncode == 2
    assert f"create_batchinput.py: error: {message}" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert files_in(tmp_path) == before


def test_bad_flag_values_in_process_exit_2(prompts_file, tmp_path, capsys):
    for flags, message in BAD_FLAGS:
        with pytest.raises(SystemExit) as caught:
            create_batchinput.main(["--input_file", str(prompts_file), "--model_name", MODEL, *flags])
        assert caught.value.code == 2
        assert message in capsys.readouterr().err
    assert files_in(tmp_path) == ["prompts.jsonl"]


def test_good_flag_values_at_the_edges_are_sent(prompts_file, capsys):
    code, _, err = run(capsys, "--input_file", prompts_file, "--model_name", MODEL, "--temperature", "2",
                       "--top_p", "0", "--n", "128", "--seed", "-9223372036854775808", "--max_tokens", "1",
                       "--stop", "a", "--stop", "b", "--stop", "c", "--stop", "d",
                       "--extra_body", '{"presence_penalty": -2, "frequency_penalty": 2, "logprobs": true, "top_logprobs": 20}')
    assert code == 0, err
    body = read_jsonl("batchinput.jsonl")[0]["body"]
    assert {k: v for k, v in body.items() if k not in ("model", "messages")} == {
        "temperature": 2.0, "top_p": 0.0, "n": 128, "seed": -2**63, "stop": ["a", "b", "c", "d"],
        "max_completion_tokens": 1, "presence_penalty": -2, "frequency_penalty": 2, "logprobs": True, "top_logprobs": 20}


BAD_BODIES = {
    "string temperature in --extra_body": (["--extra_body", '{"temperature": "0.7"}'], '{"prompt": "a"}\n',
                                           'request flags: body.temperature is the string "0.7"; give a number from 0 to 2'),
    "NaN in --extra_body": (["--extra_body", '{"top_p": NaN}'], '{"prompt": "a"}\n',
                            "--extra_body holds NaN, which is not JSON; give a finite number"),
    "boolean n in --extra_body": (["--extra_body", '{"n": true}'], '{"prompt": "a"}\n',
                                  "request flags: body.n is true; give an integer from 1 to 128"),
    "penalty out of range": (["--extra_body", '{"presence_penalty": 2.5}'], '{"prompt": "a"}\n',
                             "request flags: body.presence_penalty is 2.5; give a number from -2 to 2"),
    "five stops": (["--stop", "a", "--stop", "b", "--stop", "c", "--stop", "d", "--stop", "e"], '{"prompt": "a"}\n',
                   "request flags: body.stop is a list of 5 items; give a non-empty string or a list of at most 4"),
    "responses under 16 tokens": (["--endpoint", "/v1/responses", "--max_tokens", "8"], '{"prompt": "a"}\n',
                                  "request flags: body.max_output_tokens is 8; give an integer of at least 16"),
    "number content": ([], '{"prompt": "a"}\n{"messages": [{"role": "user", "content": 5}]}\n',
                       "in.jsonl:2 (row 1): body.messages[0].content is 5; give a string or a list of content parts"),
    "null content": ([], '{"messages": [{"role": "user", "content": null}]}\n',
                     "in.jsonl:1 (row 0): body.messages[0].content is null; give a string or a list of content parts"),
    "format spec in template": (["--prompt_template", "Q: {q:d}"], '{"q": "a"}\n',
                                "--prompt_template field {q:d} has a format spec; write plain {name} fields "
                                "(and {{ }} for literal braces)"),
    "conversion in template": (["--prompt_template", "{q!r}"], '{"q": "a"}\n', "--prompt_template field {q!r} has a conversion"),
    "positional template": (["--prompt_template", "Q: {}"], '{"q": "a"}\n', "--prompt_template field {} is positional"),
    "dotted name not a column": (["--prompt_template", "{q.status}"], '{"q": "a"}\n',
                                 "in.jsonl:1 (row 0): --prompt_template placeholder {q.status} is not a field of this "
                                 "row; the row has fields: q"),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_bodies_one_line_exit_1_nothing_written(tmp_path, capsys, name):
    flags, content, message = BAD_BODIES[name]
    (tmp_path / "in.jsonl").write_text(content, encoding="utf-8")
    code, out, err = run(capsys, "--input_file", "in.jsonl", "--model_name", MODEL, *flags)
    assert (code, out) == (1, "")
    assert err.startswith(f"create_batchinput.py: error: {message}")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert files_in(tmp_path) == ["in.jsonl"]


def test_bad_body_as_a_script(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"prompt": "a"}\n{"messages": [{"role": "user", "content": 5}]}\n')
    result = run_script("create_batchinput.py", "--input_file", "in.jsonl", "--model_name", MODEL, "--temperature", "0",
                        cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == ("create_batchinput.py: error: in.jsonl:2 (row 1): body.messages[0].content is 5; "
                             "give a string or a list of content parts (null only for an assistant message with tool_calls)\n")
    result = run_script("create_batchinput.py", "--input_file", "in.jsonl", "--model_name", MODEL,
                        "--prompt_template", "{q:d}", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "--prompt_template field {q:d} has a format spec" in result.stderr
    assert files_in(tmp_path) == ["in.jsonl"]


def test_unclosed_csv_quote_through_the_script(tmp_path):
    (tmp_path / "in.csv").write_text('id,prompt\n1,a\n2,"open\n3,b\n4,c\n')
    result = run_script("create_batchinput.py", "--input_file", "in.csv", "--model_name", MODEL, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == ('create_batchinput.py: error: in.csv:3: a quoted field starts here and is never closed; '
                             'close it (a quote inside a quoted field is written "")\n')
    assert files_in(tmp_path) == ["in.csv"]


def test_escapes_in_template_and_system_prompt_end_to_end(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"question": "2+2?"}])
    result = run_script("create_batchinput.py", "--input_file", "in.jsonl", "--model_name", MODEL, "--temperature", "0",
                        "--prompt_template", r"Question: {question}\nAnswer:\t", "--system_prompt", r"Be brief.\\n",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_jsonl(tmp_path / "batchinput.jsonl")[0]["body"]["messages"] == [
        {"role": "system", "content": "Be brief.\\n"}, {"role": "user", "content": "Question: 2+2?\nAnswer:\t"}]


def test_system_prompt_file_is_taken_as_written(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    (tmp_path / "system.txt").write_text(r"keep \n as is")
    run(capsys, "--input_file", "in.jsonl", "--model_name", MODEL, "--system_prompt_file", "system.txt")
    assert read_jsonl("batchinput.jsonl")[0]["body"]["messages"][0] == {"role": "system", "content": r"keep \n as is"}


def test_help_documents_the_escapes():
    result = run_script("create_batchinput.py", "--help")
    text = " ".join(result.stdout.split())  # argparse wraps the help lines
    assert text.count(r"\n, \t and \\ mean newline, tab and backslash") == 2


WARNING = ("WARNING no --temperature: the OpenAI API samples at temperature 1 when a request sets none, and "
           "generate_data_finetuned.py does the same; pass --temperature 0 for greedy decoding on both routes")


@pytest.mark.parametrize("flags,warned", [
    ([], True), (["--dry_run"], True), (["--temperature", "0"], False), (["--extra_body", '{"temperature": 1}'], False),
    (["--endpoint", "/v1/embeddings"], False),
])
def test_warns_once_when_no_temperature_is_set(prompts_file, tmp_path, flags, warned):
    result = run_script("create_batchinput.py", "--input_file", prompts_file, "--model_name", MODEL, *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert [line.split(" ", 1)[1] for line in warnings] == ([WARNING] if warned else [])
