"""datagen.common.params: every generation parameter against the OpenAI API's types and ranges,
in request bodies (check_body, check_batch_file) and on the command line (flag types)."""

import argparse
import json
import math

import pytest

from datagen.batchapi import batchfile
from datagen.common import params
from datagen.common.errors import UserError
from tests.util import files_in

CHAT, COMPLETIONS, RESPONSES, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"
MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return {"model": "gpt-4o-mini", "messages": MESSAGES, **fields}


GOOD = [
    ("temperature", [0, 0.0, 0.7, 1, 2, 2.0]),
    ("top_p", [0, 0.5, 1, 1.0]),
    ("n", [1, 2, 128]),
    ("max_tokens", [1, 4096]),
    ("max_completion_tokens", [1, 10**6]),
    ("seed", [0, -1, 2**63 - 1, -2**63]),
    ("stop", ["\n", "###", ["a"], ["a", "b", "c", "d"]]),
    ("presence_penalty", [-2, -0.5, 0, 2.0]),
    ("frequency_penalty", [-2.0, 1, 2]),
    ("logprobs", [True, False]),
    ("top_logprobs", [0, 5, 20]),
]


@pytest.mark.parametrize("name,values", GOOD, ids=[name for name, _ in GOOD])
def test_good_values_pass_and_null_means_not_set(name, values):
    for value in values:
        params.check_body(CHAT, chat(**{name: value}), "in.jsonl:1")
    params.check_body(CHAT, chat(**{name: None}), "in.jsonl:1")


BAD = [  # (field, value, the message after "in.jsonl:12: ")
    ("temperature", "0.7", 'body.temperature is the string "0.7"; give a number from 0 to 2'),
    ("temperature", "abc", 'body.temperature is the string "abc"; give a number from 0 to 2'),
    ("temperature", True, "body.temperature is true; give a number from 0 to 2"),
    ("temperature", float("nan"), "body.temperature is NaN; give a number from 0 to 2"),
    ("temperature", float("inf"), "body.temperature is Infinity; give a number from 0 to 2"),
    ("temperature", -5, "body.temperature is -5; give a number from 0 to 2"),
    ("temperature", 2.01, "body.temperature is 2.01; give a number from 0 to 2"),
    ("temperature", [1], "body.temperature is a JSON array; give a number from 0 to 2"),
    ("top_p", 7, "body.top_p is 7; give a number from 0 to 1"),
    ("top_p", -0.1, "body.top_p is -0.1; give a number from 0 to 1"),
    ("top_p", float("-inf"), "body.top_p is -Infinity; give a number from 0 to 1"),
    ("n", 100000, "body.n is 100000; give an integer from 1 to 128"),
    ("n", 0, "body.n is 0; give an integer from 1 to 128"),
    ("n", 2.0, "body.n is 2.0, not an integer; give an integer from 1 to 128"),
    ("n", "2", 'body.n is the string "2"; give an integer from 1 to 128'),
    ("n", False, "body.n is false; give an integer from 1 to 128"),
    ("max_tokens", 0, "body.max_tokens is 0; give an integer of at least 1"),
    ("max_completion_tokens", -3, "body.max_completion_tokens is -3; give an integer of at least 1"),
    ("max_completion_tokens", 1.5, "body.max_completion_tokens is 1.5, not an integer; give an integer of at least 1"),
    ("seed", 2**63, f"body.seed is {2**63}; give a 64-bit integer"),
    ("seed", 1.5, "body.seed is 1.5, not an integer; give a 64-bit integer"),
    ("stop", "", "body.stop is an empty string; give a non-empty string or a list of at most 4 non-empty strings"),
    ("stop", [], "body.stop is a list of 0 items; give a non-empty string"),
    ("stop", ["a", "b", "c", "d", "e"], "body.stop is a list of 5 items; give a non-empty string"),
    ("stop", ["a", ""], "body.stop holds an empty string; give"),
    ("stop", ["a", 1], "body.stop holds 1; give"),
    ("stop", 5, "body.stop is 5; give"),
    ("presence_penalty", 2.5, "body.presence_penalty is 2.5; give a number from -2 to 2"),
    ("frequency_penalty", -3, "body.frequency_penalty is -3; give a number from -2 to 2"),
    ("frequency_penalty", "1", 'body.frequency_penalty is the string "1"; give a number from -2 to 2'),
    ("logprobs", 1, "body.logprobs is 1; give true or false"),
    ("logprobs", "true", 'body.logprobs is the string "true"; give true or false'),
    ("top_logprobs", 21, "body.top_logprobs is 21; give an integer from 0 to 20"),
    ("top_logprobs", -1, "body.top_logprobs is -1; give an integer from 0 to 20"),
]


@pytest.mark.parametrize("name,value,message", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_each_kind_of_bad_value_is_refused_with_where_first(name, value, message):
    with pytest.raises(UserError) as caught:
        params.check_body(CHAT, chat(**{name: value}), "in.jsonl:12")
    assert str(caught.value).startswith("in.jsonl:12: " + message)


def test_endpoint_specific_ranges():
    # /v1/responses caps output at 16 tokens at least; legacy completions count logprobs 0..5.
    params.check_body(RESPONSES, {"model": "m", "input": "hi", "max_output_tokens": 16}, "x")
    with pytest.raises(UserError, match=r"^x: body\.max_output_tokens is 15; give an integer of at least 16$"):
        params.check_body(RESPONSES, {"model": "m", "input": "hi", "max_output_tokens": 15}, "x")
    params.check_body(COMPLETIONS, {"model": "m", "prompt": "hi", "logprobs": 5}, "x")
    with pytest.raises(UserError, match=r"^x: body\.logprobs is 6; give an integer from 0 to 5$"):
        params.check_body(COMPLETIONS, {"model": "m", "prompt": "hi", "logprobs": 6}, "x")
    with pytest.raises(UserError, match=r"^x: body\.logprobs is true; give an integer from 0 to 5$"):
        params.check_body(COMPLETIONS, {"model": "m", "prompt": "hi", "logprobs": True}, "x")


CONTENT_GOOD = [
    [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
                                       "tool_calls": [{"id": "c", "type": "function"}]},
     {"role": "tool", "tool_call_id": "c", "content": "42"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
]


@pytest.mark.parametrize("messages", CONTENT_GOOD)
def test_content_strings_parts_and_tool_call_null_pass(messages):
    params.check_body(CHAT, {"model": "m", "messages": messages}, "x")


CONTENT_BAD = [
    ([{"role": "user", "content": 5}], "body.messages[0].content is 5; give a string or a list of content parts"),
    ([{"role": "user", "content": None}], "body.messages[0].content is null; give a string or a list"),
    ([{"role": "assistant", "content": None}], "body.messages[0].content is null; give a string or a list"),
    ([{"role": "user"}], "body.messages[0].content is missing; give a string"),
    ([{"role": "user", "content": []}], "body.messages[0].content is an empty list; give a string"),
    ([{"role": "user", "content": {"text": "hi"}}], "body.messages[0].content is a JSON object; give a string"),
    ([{"role": "user", "content": ["hi"]}], 'body.messages[0].content[0] is the string "hi"; a content part is an object'),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "body.messages[0].content[0].text is 3; give a string"),
    ([{"role": "user", "content": "ok"}, "hi"], 'body.messages[1] is the string "hi"; give an object'),
    ([], "body.messages is a JSON array; give a non-empty list of messages"),
]


@pytest.mark.parametrize("messages,message", CONTENT_BAD, ids=[m for _, m in CONTENT_BAD])
def test_bad_content_is_refused(messages, message):
    with pytest.raises(UserError) as caught:
        params.check_body(CHAT, {"model": "m", "messages": messages}, "f.jsonl:3")
    assert str(caught.value).startswith("f.jsonl:3: " + message)


def test_other_endpoints_bodies_and_model():
    params.check_body(RESPONSES, {"model": "m", "input": [{"role": "user", "content": "hi"},
                                                         {"type": "function_call_output", "output": "1"}]}, "x")
    params.check_body(EMBEDDINGS, {"model": "m", "input": ["a", "b"]}, "x")
    cases = [
        (RESPONSES, {"model": "m", "input": [{"role": "user", "content": 1}]}, "x: body.input[0].content is 1"),
        (RESPONSES, {"model": "m", "input": 3}, "x: body.input is 3; give a string or a list of messages"),
        (COMPLETIONS, {"model": "m", "prompt": None}, "x: body.prompt is null; give a string"),
        (CHAT, {"model": "", "messages": MESSAGES}, 'x: body.model is the string ""; give the model name'),
        (CHAT, {"messages": MESSAGES}, "x: body.model is null; give the model name"),
        (CHAT, chat(logit_bias={"50256": float("nan")}), "x: body.logit_bias.50256 is NaN; JSON has no NaN"),
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": "a", "x": [float("-inf")]}]},
         "x: body.messages[0].x[0] is -Infinity; JSON has no NaN"),
    ]
    for endpoint, body, message in cases:
        with pytest.raises(UserError) as caught:
            params.check_body(endpoint, body, "x")
        assert str(caught.value).startswith(message), str(caught.value)


# --- command-line flag types -----------------------------------------------------------


def parser():
    p = argparse.ArgumentParser(prog="prog")
    for name in ("temperature", "top_p", "n", "max_tokens", "seed", "presence_penalty", "frequency_penalty",
                 "top_logprobs"):
        p.add_argument(f"--{name}", type=getattr(params, f"{name}_flag"))
    p.add_argument("--stop", type=params.stop_flag, action="append")
    return p


FLAGS_GOOD = [
    (["--temperature", "0"], "temperature", 0.0), (["--temperature", "2"], "temperature", 2.0),
    (["--temperature", "0.7"], "temperature", 0.7), (["--top_p", "1"], "top_p", 1.0),
    (["--n", "128"], "n", 128), (["--max_tokens", "1"], "max_tokens", 1),
    (["--seed", "-9223372036854775808"], "seed", -2**63), (["--presence_penalty", "-2"], "presence_penalty", -2.0),
    (["--frequency_penalty", "1.5"], "frequency_penalty", 1.5), (["--top_logprobs", "20"], "top_logprobs", 20),
    (["--stop", "\n"], "stop", ["\n"]),
]


@pytest.mark.parametrize("argv,name,value", FLAGS_GOOD)
def test_flag_types_accept_good_values(argv, name, value):
    got = getattr(parser().parse_args(argv), name)
    assert got == value and type(got) is type(value)


FLAGS_BAD = [
    (["--temperature", "nan"], "argument --temperature: nan is not a finite number; give a number from 0 to 2"),
    (["--temperature", "inf"], "argument --temperature: inf is not a finite number; give a number from 0 to 2"),
    (["--temperature", "1e400"], "argument --temperature: 1e400 is not a finite number"),
    (["--temperature", "-5"], "argument --temperature: -5 is out of range; give a number from 0 to 2"),
    (["--temperature", "abc"], "argument --temperature: 'abc' is not a number; give a number from 0 to 2"),
    (["--top_p", "7"], "argument --top_p: 7 is out of range; give a number from 0 to 1"),
    (["--n", "100000"], "argument --n: 100000 is out of range; give an integer from 1 to 128"),
    (["--n", "2.5"], "argument --n: '2.5' is not an integer; give an integer from 1 to 128"),
    (["--n", "0"], "argument --n: 0 is out of range"),
    (["--max_tokens", "0"], "argument --max_tokens: 0 is out of range; give an integer of at least 1"),
    (["--seed", "9223372036854775808"], "argument --seed: 9223372036854775808 is out of range; give a 64-bit integer"),
    (["--seed", "1.5"], "argument --seed: '1.5' is not an integer; give a 64-bit integer"),
    (["--presence_penalty", "3"], "argument --presence_penalty: 3 is out of range; give a number from -2 to 2"),
    (["--frequency_penalty", "nan"], "argument --frequency_penalty: nan is not a finite number"),
    (["--top_logprobs", "21"], "argument --top_logprobs: 21 is out of range; give an integer from 0 to 20"),
    (["--stop", ""], "argument --stop: an empty stop sequence"),
]


@pytest.mark.parametrize("argv,message", FLAGS_BAD, ids=[" ".join(a) for a, _ in FLAGS_BAD])
def test_flag_types_refuse_with_argparse_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as caught:
        parser().parse_args(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert f"prog: error: {message}" in err


def test_ranges_live_in_one_table():
    assert params.RANGES["temperature"] == ("number", 0, 2)
    assert params.RANGES["n"] == ("integer", 1, 128)
    assert all(math.isfinite(low) for _, low, _ in params.RANGES.values() if low is not None)


# --- check_batch_file runs check_body on every line, with file:line ---------------------


def line(custom_id, **body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT, "body": chat(**body)})


@pytest.mark.parametrize("bad,message", [
    ('"temperature": "0.7"', 'batch.jsonl:2: body.temperature is the string "0.7"; give a number from 0 to 2'),
    ('"temperature": NaN', "batch.jsonl:2: NaN is not a number JSON allows (JSON has no NaN or infinity); "
                           "write a number, or null where there is none"),
    ('"n": 200', "batch.jsonl:2: body.n is 200; give an integer from 1 to 128"),
    ('"top_p": true', "batch.jsonl:2: body.top_p is true; give a number from 0 to 1"),
])
def test_check_batch_file_checks_every_body(tmp_path, bad, message):
    second = line("b").replace('"messages"', bad + ', "messages"')
    (tmp_path / "batch.jsonl").write_text(line("a", temperature=0) + "\n" + second + "\n")
    with pytest.raises(UserError) as caught:
        batchfile.check_batch_file("batch.jsonl")
    assert str(caught.value) == message
    assert files_in(tmp_path) == ["batch.jsonl"]


def test_check_batch_file_passes_good_lines(tmp_path):
    (tmp_path / "batch.jsonl").write_text(line("a", temperature=0, n=2, stop=["x"]) + "\n" + line("b") + "\n")
    summary = batchfile.check_batch_file("batch.jsonl")
    assert (summary.requests, summary.url, summary.model) == (2, CHAT, "gpt-4o-mini")
