"""The local Batch API stand-in, driven by the real openai SDK over HTTP.

Its answers are checked against the official OpenAPI schemas (tests/data/, a copy of the
Files and Batches part of openai/openai-openapi 2.3.0), so the batch tool's tests run
against the shapes the real service sends.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import openai
import pytest

from datagen.local_batch_server.answers import embedding_for
from datagen.local_batch_server import BANNER, LocalBatchServer
from tests.util import ROOT, write_jsonl

KEY = "sk-local-server-test-key-0001"
SPEC = json.loads((Path(__file__).parent / "data" / "openai-openapi-files-batches.json").read_text())


def strip_nulls(obj):
    """The spec declares fields the real API sends as null non-nullable: drop them."""
    if isinstance(obj, dict):
        return {key: strip_nulls(value) for key, value in obj.items() if value is not None}
    if isinstance(obj, list):
        return [strip_nulls(value) for value in obj]
    return obj


def validate(obj: dict, schema_name: str, nulls_allowed: bool = False) -> None:
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": SPEC["components"]}
    jsonschema.Draft202012Validator(schema).validate(obj if nulls_allowed else strip_nulls(obj))


@pytest.fixture
def server():
    with LocalBatchServer(api_key=KEY) as running:
        yield running


@pytest.fixture
def client(server):
    with openai.OpenAI(api_key=KEY, base_url=server.base_url, max_retries=0) as sdk:
        yield sdk


def chat_line(custom_id: str, text: str, model: str = "gpt-4o-mini") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "system", "content": "be brief"},
                                                  {"role": "user", "content": text}]}}


def upload(client, rows, name="input.jsonl"):
    path = write_jsonl(name, rows)
    with open(path, "rb") as handle:
        return client.files.create(file=(name, handle), purpose="batch")


def run_to_end(client, batch_id: str, limit: int = 20):
    statuses = []
    for _ in range(limit):
        batch = client.batches.retrieve(batch_id)
        statuses.append(batch.status)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch, statuses
    raise AssertionError(f"batch never finished: {statuses}")


def content(client, file_id: str) -> list[dict]:
    with client.files.with_streaming_response.content(file_id) as response:
        data = b"".join(response.iter_bytes())
    return [json.loads(line) for line in data.decode().splitlines()]


def test_lifecycle_statuses_answers_and_shuffled_order(client, server):
    rows = [chat_line(f"q{i}", f"question {i}") for i in range(20)]
    uploaded = upload(client, rows)
    assert (uploaded.purpose, uploaded.filename, uploaded.bytes) == ("batch", "input.jsonl",
                                                                     Path("input.jsonl").stat().st_size)
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"description": "t"})
    assert batch.status == "validating" and batch.metadata == {"description": "t"}
    batch, statuses = run_to_end(client, batch.id)
    assert statuses == ["in_progress", "in_progress", "finalizing", "completed"]
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (20, 20, 0)
    assert batch.error_file_id is None and batch.model == "gpt-4o-mini"
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    lines = content(client, batch.output_file_id)
    ids = [line["custom_id"] for line in lines]
    assert sorted(ids) == sorted(row["custom_id"] for row in rows)
    assert ids != [row["custom_id"] for row in rows]  # not the input order
    for line in lines:
        assert line["error"] is None and line["response"]["status_code"] == 200
        number = line["custom_id"][1:]
        assert line["response"]["body"]["choices"][0]["message"]["content"] == f"echo: question {number}"


def test_progress_counts_grow_step_by_step(client):
    uploaded = upload(client, [chat_line(f"q{i}", "x") for i in range(5)])
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    seen = [client.batches.retrieve(batch.id).request_counts.completed for _ in range(3)]
    assert seen == [0, 3, 5]


def test_time_based_steps(tmp_path):
    with LocalBatchServer(api_key=KEY, step_seconds=0.01) as server, \
            openai.OpenAI(api_key=KEY, base_url=server.base_url, max_retries=0) as client:
        uploaded = upload(client, [chat_line("a", "x")])
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        for _ in range(2000):
            batch = client.batches.retrieve(batch.id)
            if batch.status == "completed":
                break
        assert batch.status == "completed" and batch.request_counts.completed == 1


@pytest.mark.parametrize("endpoint, body, schema, text_of", [
    ("/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}], "n": 2},
     "CreateChatCompletionResponse", lambda b: [c["message"]["content"] for c in b["choices"]]),
    ("/v1/responses", {"input": "hi there", "instructions": "be brief"}, "Response",
     lambda b: [c["text"] for item in b["output"] if item["type"] == "message"
                for c in item["content"] if c["type"] == "output_text"]),
    ("/v1/responses", {"input": [{"role": "user", "content": "hi there"}]}, "Response",
     lambda b: [c["text"] for item in b["output"] if item["type"] == "message"
                for c in item["content"] if c["type"] == "output_text"]),
    ("/v1/completions", {"prompt": "hi there"}, "CreateCompletionResponse",
     lambda b: [c["text"] for c in b["choices"]]),
])
def test_answers_per_endpoint_match_the_openapi_schemas(client, endpoint, body, schema, text_of):
    uploaded = upload(client, [{"custom_id": "a", "method": "POST", "url": endpoint, "body": {"model": "m", **body}}])
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h")
    batch, _ = run_to_end(client, batch.id)
    [line] = content(client, batch.output_file_id)
    validate(line["response"]["body"], schema, nulls_allowed=True)
    assert set(text_of(line["response"]["body"])) == {"echo: hi there"}


LONG = "one two three four five six seven eight nine ten"  # the answer "echo: one ... ten" is 11 tokens


@pytest.mark.parametrize("endpoint, body, schema", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}], "max_completion_tokens": 4, "n": 2},
     "CreateChatCompletionResponse"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}], "max_tokens": 4},
     "CreateChatCompletionResponse"),
    ("/v1/responses", {"input": LONG, "max_output_tokens": 4}, "Response"),
    ("/v1/completions", {"prompt": LONG, "max_tokens": 4}, "CreateCompletionResponse"),
])
def test_answers_are_cut_at_the_output_cap(client, endpoint, body, schema):
    rows = [{"custom_id": "long", "method": "POST", "url": endpoint, "body": {"model": "m", **body}},
            {"custom_id": "short", "method": "POST", "url": endpoint,
             "body": {"model": "m", **body, **({"input": "hi"} if "input" in body else {"prompt": "hi"}
                                               if "prompt" in body else {"messages": [{"role": "user",
                                                                                        "content": "hi"}]})}}]
    uploaded = upload(client, rows)
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h")
    batch, _ = run_to_end(client, batch.id)
    lines = {line["custom_id"]: line["response"]["body"] for line in content(client, batch.output_file_id)}
    long, short = lines["long"], lines["short"]
    validate(long, schema, nulls_allowed=True)
    if endpoint == "/v1/responses":
        [message] = [item for item in long["output"] if item["type"] == "message"]
        assert message["content"][0]["text"] == "echo: one two three"
        assert (long["status"], long["incomplete_details"], message["status"]) == \
            ("incomplete", {"reason": "max_output_tokens"}, "incomplete")
        assert long["usage"]["output_tokens"] == 4 and long["usage"]["total_tokens"] == 10 + 4
        assert (short["status"], short["incomplete_details"]) == ("completed", None)
    else:
        texts = [c["message"]["content"] if "message" in c else c["text"] for c in long["choices"]]
        assert set(texts) == {"echo: one two three"} and {c["finish_reason"] for c in long["choices"]} == {"length"}
        n = len(long["choices"])
        assert long["usage"] == {"prompt_tokens": 10, "completion_tokens": 4 * n, "total_tokens": 10 + 4 * n}
        assert {c["finish_reason"] for c in short["choices"]} == {"stop"}
    assert batch.usage.output_tokens == sum(
        b["usage"].get("completion_tokens", b["usage"].get("output_tokens")) for b in lines.values())


def test_embeddings_are_deterministic_vectors(client):
    uploaded = upload(client, [{"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                                "body": {"model": "text-embedding-3-small", "input": ["one", "two"]}}])
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    batch, _ = run_to_end(client, batch.id)
    [line] = content(client, batch.output_file_id)
    body = line["response"]["body"]
    validate(body, "CreateEmbeddingResponse", nulls_allowed=True)
    assert [item["embedding"] for item in body["data"]] == [embedding_for("one"), embedding_for("two")]
    assert embedding_for("one") != embedding_for("two")


def test_file_batch_and_list_objects_match_the_schemas(client):
    uploaded = client.files.with_raw_response.create(file=("in.jsonl", b'{"custom_id":"a","method":"POST",'
                                                     b'"url":"/v1/completions","body":{"model":"m","prompt":"p"}}\n'),
                                                     purpose="batch")
    file_obj = json.loads(uploaded.text)
    validate(file_obj, "OpenAIFile")
    raw = client.batches.with_raw_response.create(input_file_id=file_obj["id"], endpoint="/v1/completions",
                                                  completion_window="24h")
    validate(json.loads(raw.text), "Batch")
    for _ in range(4):
        raw = client.batches.with_raw_response.retrieve(json.loads(raw.text)["id"])
    assert json.loads(raw.text)["status"] == "completed"
    validate(json.loads(raw.text), "Batch")
    validate(json.loads(client.batches.with_raw_response.list(limit=5).text), "ListBatchesResponse")


def test_per_request_failures_in_both_error_shapes(client):
    rows = [chat_line("ok", "fine"), chat_line("bad", "please [fail]"), chat_line("slow", "wait [timeout]")]
    uploaded = upload(client, rows)
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch, _ = run_to_end(client, batch.id)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 2)
    errors = {line["custom_id"]: line for line in content(client, batch.error_file_id)}
    assert errors["bad"]["error"] is None and errors["bad"]["response"]["status_code"] == 400
    assert "asked to fail" in errors["bad"]["response"]["body"]["error"]["message"]
    assert errors["slow"]["response"] is None and errors["slow"]["error"]["code"] == "request_timeout"
    assert [line["custom_id"] for line in content(client, batch.output_file_id)] == ["ok"]


def test_all_failed_means_no_output_file(client):
    uploaded = upload(client, [chat_line("a", "[fail]"), chat_line("b", "[timeout]")])
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch, _ = run_to_end(client, batch.id)
    assert batch.status == "completed" and batch.output_file_id is None and batch.error_file_id


def test_invalid_input_fails_with_line_numbers(client):
    path = Path("bad.jsonl")
    lines = [json.dumps(chat_line("a", "x")), "{not json", json.dumps(chat_line("a", "dup")),
             json.dumps({**chat_line("c", "x"), "url": "/v1/completions"}),
             json.dumps(chat_line("d", "x", model="other-model")), json.dumps({"custom_id": "e"})]
    path.write_text("\n".join(lines) + "\n")
    with open(path, "rb") as handle:
        uploaded = client.files.create(file=handle, purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch, statuses = run_to_end(client, batch.id)
    assert statuses == ["failed"] and batch.failed_at
    found = [(error.line, error.code) for error in batch.errors.data]
    assert found == [(2, "invalid_json_line"), (3, "duplicate_custom_id"), (4, "mismatched_endpoint"),
                     (5, "mismatched_model"), (6, "missing_required_parameter")]
    assert batch.output_file_id is None and batch.error_file_id is None


def test_token_limit_fails_the_batch():
    with LocalBatchServer(api_key=KEY, token_limit=3) as server, \
            openai.OpenAI(api_key=KEY, base_url=server.base_url, max_retries=0) as client:
        uploaded = upload(client, [chat_line("a", "one two three four five")])
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        batch, _ = run_to_end(client, batch.id)
        assert batch.status == "failed" and batch.errors.data[0].code == "token_limit_exceeded"


def test_enqueued_token_limit_per_model_is_freed_when_a_batch_ends():
    from datagen.batchapi.estimates import estimate_tokens

    line = chat_line("a", "one two three four five")
    line["body"]["max_completion_tokens"] = 7
    tokens = estimate_tokens(line["url"], line["body"])
    chars = len("be brief") + len("one two three four five") + 2 * 16  # two messages, 4 tokens of overhead each
    assert tokens == -(-chars // 4) + 7  # characters / 4 rounded up, plus the output cap
    with LocalBatchServer(api_key=KEY, token_limit=2 * tokens) as server, \
            openai.OpenAI(api_key=KEY, base_url=server.base_url, max_retries=0) as client:
        def create(model="gpt-4o-mini"):
            other = {**line, "body": {**line["body"], "model": model}}
            uploaded = upload(client, [other], name=f"{model}.jsonl")
            batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
            return client.batches.retrieve(batch.id)  # one step: validated against the limit

        first, second, third = create(), create(), create()
        assert [b.status for b in (first, second)] == ["in_progress", "in_progress"]
        assert third.status == "failed" and third.errors.data[0].code == "token_limit_exceeded"
        assert third.errors.data[0].message.startswith("Enqueued token limit reached for gpt-4o-mini in organization")
        assert f"Limit: {2 * tokens:,} enqueued tokens" in third.errors.data[0].message
        assert create("gpt-4o").status == "in_progress"  # another model has its own limit
        run_to_end(client, first.id)
        assert create().status == "in_progress"  # the first batch's tokens were freed when it ended


def test_upload_and_create_refusals(client):
    with pytest.raises(openai.BadRequestError, match="Must be .jsonl"):
        client.files.create(file=("input.csv", b"a,b\n"), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    uploaded = upload(client, [chat_line("a", "x")])
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="48h")
    with pytest.raises(openai.NotFoundError, match="No batch found"):
        client.batches.retrieve("batch_nope")


def test_authentication(server):
    with openai.OpenAI(api_key="sk-wrong-key-000000", base_url=server.base_url, max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            client.batches.list()
    assert caught.value.status_code == 401 and "sk-wrong-key-000000" not in str(caught.value)
    with pytest.raises(urllib.error.HTTPError) as caught:  # no Authorization header at all
        urllib.request.urlopen(f"{server.base_url}/batches")
    assert caught.value.code == 401
    with LocalBatchServer(api_key=None) as open_server, \
            openai.OpenAI(api_key="anything", base_url=open_server.base_url, max_retries=0) as client:
        assert list(client.batches.list()) == []


def test_cursor_paged_list_newest_first(client, server):
    uploaded = upload(client, [chat_line("a", "x")])
    made = [client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h").id for _ in range(5)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more is True
    assert [b.id for b in client.batches.list(limit=2, after=made[3]).data] == [made[2], made[1]]
    server.hits.clear()
    assert [b.id for b in client.batches.list(limit=2)] == made[::-1]  # the SDK follows the cursor
    assert [hit for hit in server.hits if hit[1] == "/batches"] == [("GET", "/batches", 200)] * 3


def test_cancel_keeps_finished_requests(client, server):
    uploaded = upload(client, [chat_line(f"q{i}", f"t{i}") for i in range(4)])
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    server.step(batch.id, 2)  # validated, half answered
    assert client.batches.cancel(batch.id).status == "cancelling"
    batch, _ = run_to_end(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    assert len(content(client, batch.output_file_id)) == 2
    assert {line["error"]["code"] for line in content(client, batch.error_file_id)} == {"batch_cancelled"}
    done = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    run_to_end(client, done.id)
    with pytest.raises(openai.ConflictError, match="status 'completed'"):
        client.batches.cancel(done.id)


def test_expire_keeps_finished_requests_over_http_control(client, server):
    uploaded = upload(client, [chat_line(f"q{i}", f"t{i}") for i in range(4)])
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    server.step(batch.id, 2)
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/_control/expire", method="POST",
                                     data=json.dumps({"batch_id": batch.id}).encode())
    with urllib.request.urlopen(request) as answer:
        assert json.loads(answer.read())["status"] == "expired"
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "expired" and batch.expired_at
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 2)
    expired = content(client, batch.error_file_id)
    assert [line["error"]["code"] for line in expired] == ["batch_expired"] * 2
    answered = {line["custom_id"] for line in content(client, batch.output_file_id)}
    assert answered | {line["custom_id"] for line in expired} == {"q0", "q1", "q2", "q3"}


def test_injected_429_and_500_are_retried_by_the_sdk(server):
    server.inject(429, count=2, method="POST", path="^/files$")
    server.inject(500, count=1, method="GET", path="^/batches/")
    with openai.OpenAI(api_key=KEY, base_url=server.base_url, max_retries=3) as client:
        uploaded = upload(client, [chat_line("a", "x")])
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        assert client.batches.retrieve(batch.id).status == "in_progress"
    assert [status for _, path, status in server.hits if path == "/files"] == [429, 429, 200]
    assert [status for _, path, status in server.hits if path.startswith("/batches/")] == [500, 200]
    server.inject(500, count=5)
    with openai.OpenAI(api_key=KEY, base_url=server.base_url, max_retries=1) as client:
        with pytest.raises(openai.InternalServerError):
            client.batches.list()


def test_dropped_download_then_full_download(client, server):
    uploaded = upload(client, [chat_line(f"q{i}", "x" * 200) for i in range(10)])
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch, _ = run_to_end(client, batch.id)
    server.drop_downloads(count=1, after_bytes=500)
    with pytest.raises(Exception, match="peer closed connection|incomplete|closed"):
        with client.files.with_streaming_response.content(batch.output_file_id) as response:
            b"".join(response.iter_bytes())
    assert len(content(client, batch.output_file_id)) == 10


def test_azure_style_path_prefix(server):
    with openai.OpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{server.port}/openai/v1/", max_retries=0) as client:
        assert list(client.batches.list()) == []


def test_module_command_says_it_is_a_local_stand_in():
    process = subprocess.Popen([sys.executable, "-m", "datagen.local_batch_server", "--port", "0"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first, second = process.stdout.readline(), process.stdout.readline()
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert first.strip() == BANNER and "not OpenAI" in first
    assert "listening on http://127.0.0.1:" in second
