"""A local stand-in for the OpenAI Files + Batches API. It is NOT OpenAI.

    python -m datagen.local_batch_server --port 8765 --api_key sk-local --step_seconds 1
    OPENAI_BASE_URL=http://127.0.0.1:8765/v1 OPENAI_API_KEY=sk-local \
        python batch_utils.py --run --wait --poll_interval 1 --download results.jsonl

The tests start it on 127.0.0.1 and a free port, and the real ``openai`` SDK talks to it
over HTTP; the demo starts it the same way. It behaves like the real service as far as a
batch tool can see:

- ``POST /v1/files`` (multipart, ``purpose=batch``, ``.jsonl`` only), ``GET /v1/files[/ID]``,
  ``GET /v1/files/ID/content`` (streamed from disk), ``DELETE /v1/files/ID``
- ``POST /v1/batches``, ``GET /v1/batches/ID``, ``POST /v1/batches/ID/cancel``,
  ``GET /v1/batches?after=&limit=`` (cursor pages with ``has_more``, newest first); a
  batch's ``metadata`` (up to 16 string pairs) is stored and returned as sent, else null
- a batch goes ``validating -> in_progress -> finalizing -> completed``; an invalid input
  ends ``failed`` with ``errors.data[]`` naming the line; cancel goes through ``cancelling``;
  expired and cancelled batches keep the finished requests in their output file and list
  the rest as ``batch_expired`` / ``batch_cancelled`` lines in the error file
- output lines come in a shuffled order; answers are deterministic: chat, responses and
  completions answer ``echo: <last user message>``, embeddings a vector made from the text
- per-request failures, in both shapes the real error file uses: a prompt containing
  ``[fail]`` gets ``status_code`` 400 with the message in ``response.body.error``; one
  containing ``[timeout]`` gets ``response: null`` and ``error.code == "request_timeout"``
- ``Authorization: Bearer KEY`` checked when a key is set (401 otherwise)
- an enqueued-token limit per model (``token_limit``, ``--token_limit``): a batch that
  does not fit beside the model's unfinished batches is created, then ``failed`` with
  ``errors.data[0].code == "token_limit_exceeded"`` and the API's message

Progress is controllable so tests are fast: with ``step_seconds=None`` (the default) every
``GET /v1/batches/ID`` moves that batch one step; with a number, a step every that many
seconds. Faults for the retry paths are injected from Python (``inject``,
``drop_downloads``, ``expire``, ``hold``) or over HTTP at ``POST /_control/ACTION``
with the same arguments as a JSON object.

Map: ``LocalBatchServer`` (state, steps, answers, faults) and ``_Handler`` (HTTP).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import mmap
import os
import random
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from datagen.batchfile import estimate_tokens

log = logging.getLogger("datagen.local_batch_server")

ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/embeddings")
FINAL = ("failed", "completed", "expired", "cancelled")
MAX_REQUESTS = 50_000
EMBEDDING_DIM = 8
CHUNK = 1 << 16
BANNER = "LOCAL STAND-IN for the OpenAI Batch API (not OpenAI; answers are fake echoes)"


class ApiError(Exception):
    """An error answer: HTTP status plus the OpenAI error body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class _StoredFile:
    obj: dict
    path: Path


@dataclass
class _Batch:
    obj: dict
    input_path: Path
    tokens: int = 0  # estimated tokens, counted against the model's limit until the batch ends
    total: int = 0
    done: int = 0  # requests answered so far, in input order
    retrieves: int = 0
    last_step: float = field(default_factory=time.time)
    results: Path | None = None  # one answered line per request, in input order
    ok_offsets: list = field(default_factory=list)  # (offset, length) of successes in results
    err_offsets: list = field(default_factory=list)  # (offset, length) of failures in results
    ids_path: Path | None = None  # custom_id per line (to write batch_expired/cancelled lines)


def _now() -> int:
    return int(time.time())


def _last_user_text(url: str, body: dict) -> str:
    """The text a request asks about: its last user message, or its prompt/input text."""
    def content_text(content) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
        return ""

    if url == "/v1/chat/completions":
        users = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
        return content_text(users[-1].get("content")) if users else ""
    if url == "/v1/responses":
        value = body.get("input")
        if isinstance(value, str):
            return value
        users = [m for m in value or [] if isinstance(m, dict) and m.get("role", "user") == "user"]
        return content_text(users[-1].get("content")) if users else ""
    if url == "/v1/completions":
        value = body.get("prompt")
        return value if isinstance(value, str) else " ".join(map(str, value or []))
    value = body.get("input")
    return value if isinstance(value, str) else " ".join(map(str, value or []))


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


def embedding_for(text: str) -> list[float]:
    """A deterministic unit-free vector from the text (same text, same vector)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [round(byte / 255.0 - 0.5, 6) for byte in digest[:EMBEDDING_DIM]]


def answer_body(url: str, body: dict, created: int, rid: str) -> dict:
    """The response body the real endpoint would send, with a deterministic answer."""
    model = body.get("model", "")
    text = _last_user_text(url, body)
    reply = f"echo: {text}"
    prompt_tokens, completion_tokens = _tokens(text), _tokens(reply)
    if url == "/v1/chat/completions":
        n = int(body.get("n") or 1)
        return {
            "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": reply, "refusal": None,
                                                 "annotations": []},
                         "logprobs": None, "finish_reason": "stop"} for i in range(n)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens * n,
                      "total_tokens": prompt_tokens + completion_tokens * n},
            "service_tier": "default", "system_fingerprint": "fp_local",
        }
    if url == "/v1/responses":
        return {
            "id": f"resp_{rid}", "object": "response", "created_at": created, "status": "completed",
            "model": model, "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
            "metadata": {}, "parallel_tool_calls": True, "temperature": body.get("temperature", 1.0),
            "top_p": body.get("top_p", 1.0), "tool_choice": "auto", "tools": [],
            "output": [
                {"type": "reasoning", "id": f"rs_{rid}", "summary": []},
                {"type": "message", "id": f"msg_{rid}", "status": "completed", "role": "assistant",
                 "content": [{"type": "output_text", "text": reply, "annotations": [], "logprobs": []}]},
            ],
            "usage": {"input_tokens": prompt_tokens,
                      "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": prompt_tokens + completion_tokens},
        }
    if url == "/v1/completions":
        return {
            "id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": reply, "index": 0, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "system_fingerprint": "fp_local",
        }
    inputs = body.get("input")
    inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
    return {
        "object": "list", "model": model,
        "data": [{"object": "embedding", "index": i, "embedding": embedding_for(str(item))}
                 for i, item in enumerate(inputs)],
        "usage": {"prompt_tokens": sum(_tokens(str(i)) for i in inputs),
                  "total_tokens": sum(_tokens(str(i)) for i in inputs)},
    }


def answer_line(request: dict, created: int) -> dict:
    """One output or error-file line for one input request."""
    rid = secrets.token_hex(12)
    url, body = request["url"], request["body"]
    text = _last_user_text(url, body)
    line = {"id": f"batch_req_{rid}", "custom_id": request["custom_id"], "response": None, "error": None}
    if "[timeout]" in text:
        line["error"] = {"code": "request_timeout", "message": "The request timed out (local stand-in)."}
    elif "[fail]" in text:
        line["response"] = {"status_code": 400, "request_id": f"req_{rid}", "body": {"error": {
            "message": "Invalid prompt: it asked to fail (local stand-in).", "type": "invalid_request_error",
            "param": "messages", "code": "invalid_prompt"}}}
    else:
        line["response"] = {"status_code": 200, "request_id": f"req_{rid}",
                            "body": answer_body(url, body, created, rid)}
    return line


def is_success(line: dict) -> bool:
    response = line.get("response")
    return bool(response) and response.get("status_code") == 200 and line.get("error") is None


class LocalBatchServer:
    """A stateful Files + Batches server on 127.0.0.1; use as a context manager.

    ``api_key``: the bearer token required (None accepts any non-empty one).
    ``step_seconds``: None moves a batch one step per retrieve; a number, one step per that
    many seconds. ``work_steps``: in_progress steps a batch takes to answer its requests.
    ``seed``: the output shuffle. ``token_limit``: the enqueued-token limit per model, as
    the API enforces it: when a batch validates, its tokens (``batchfile.estimate_tokens``
    per request: input characters / 4 rounded up, plus the output cap) plus those of the
    model's unfinished batches (in_progress, finalizing, cancelling) must fit, else it
    fails with ``token_limit_exceeded``; a batch's tokens are freed when it ends (None:
    no limit). ``state_limit=False`` leaves "Limit: N enqueued tokens" out of that message,
    as some OpenAI-compatible services do. ``empty_file_ids``: send
    an absent output/error file id as ``""`` instead of null, as the real API sometimes does.
    """

    def __init__(self, port: int = 0, api_key: str | None = "sk-local-test", step_seconds: float | None = None,
                 work_steps: int = 2, seed: int = 0, token_limit: int | None = None,
                 storage: str | os.PathLike | None = None, empty_file_ids: bool = False, state_limit: bool = True):
        self.port, self.api_key, self.step_seconds = port, api_key, step_seconds
        self.work_steps, self.token_limit = max(1, work_steps), token_limit
        self.empty_file_ids, self.state_limit = empty_file_ids, state_limit
        self.random = random.Random(seed)
        self._own_storage = storage is None
        self.storage = Path(tempfile.mkdtemp(prefix="local-batch-server-")) if storage is None else Path(storage)
        self.files: dict[str, _StoredFile] = {}
        self.batches: dict[str, _Batch] = {}
        self.lock = threading.RLock()
        self.hits: list[tuple[str, str, int]] = []  # (method, path, status) of every request answered
        self._faults: list[dict] = []
        self._drops: list[dict] = []
        self.held = False
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._clock = 0

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> "LocalBatchServer":
        handler = type("Handler", (_Handler,), {"server_state": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="local-batch-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._own_storage:
            shutil.rmtree(self.storage, ignore_errors=True)

    def __enter__(self) -> "LocalBatchServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # --- faults and control ----------------------------------------------------------

    def inject(self, status: int = 429, count: int = 1, method: str | None = None, path: str | None = None,
               retry_after_ms: int | None = 5, skip: int = 0) -> None:
        """Answer ``count`` requests matching ``method``/``path`` (a regex on the path after
        /v1), after letting the first ``skip`` of them through, with ``status`` and an OpenAI
        error body (and ``retry-after-ms``, so the SDK's retries are quick)."""
        with self.lock:
            self._faults.append({"status": int(status), "count": int(count), "method": method,
                                 "path": path, "retry_after_ms": retry_after_ms, "skip": int(skip)})

    def drop_downloads(self, count: int = 1, after_bytes: int = 1000) -> None:
        """Close the connection after ``after_bytes`` of the next ``count`` file downloads."""
        with self.lock:
            self._drops.append({"count": int(count), "after_bytes": int(after_bytes)})

    def hold(self, held: bool = True) -> None:
        """Stop (or restart) every batch's progression."""
        self.held = bool(held)

    def expire(self, batch_id: str) -> dict:
        """Expire a batch now: finished requests stay in its output, the rest become
        ``batch_expired`` lines in its error file."""
        with self.lock:
            batch = self._batch(batch_id)
            if batch.obj["status"] in FINAL:
                raise ApiError(400, f"Batch {batch_id} is already {batch.obj['status']}.")
            self._finish(batch, "expired", "batch_expired", "This request could not be executed before the "
                                                            "completion window expired.")
            return batch.obj

    def step(self, batch_id: str, times: int = 1) -> dict:
        with self.lock:
            batch = self._batch(batch_id)
            for _ in range(times):
                self._step(batch)
            return batch.obj

    def control(self, action: str, args: dict) -> dict:
        actions = {"inject": self.inject, "drop_downloads": self.drop_downloads, "hold": self.hold,
                   "expire": self.expire, "step": self.step}
        if action not in actions:
            raise ApiError(404, f"unknown control action {action!r}; one of {', '.join(actions)}")
        try:
            result = actions[action](**args)
        except TypeError as exc:
            raise ApiError(400, f"bad arguments for {action}: {exc}") from None
        return result if isinstance(result, dict) else {"ok": True}

    def _take_fault(self, method: str, path: str) -> dict | None:
        with self.lock:
            for fault in self._faults:
                if fault["method"] and fault["method"].upper() != method:
                    continue
                if fault["path"] and not re.search(fault["path"], path):
                    continue
                if fault["skip"] > 0:
                    fault["skip"] -= 1
                    return None
                fault["count"] -= 1
                if fault["count"] <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _take_drop(self) -> dict | None:
        with self.lock:
            if not self._drops:
                return None
            drop = self._drops[0]
            drop["count"] -= 1
            if drop["count"] <= 0:
                self._drops.pop(0)
            return drop

    # --- files ----------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        self._clock += 1
        return f"{prefix}{self._clock:06d}{secrets.token_hex(8)}"

    def add_file(self, source: Path, filename: str, purpose: str, move: bool = False) -> dict:
        with self.lock:
            file_id = self._new_id("file-")
            path = self.storage / file_id
        if move:
            os.replace(source, path)
        else:
            shutil.copyfile(source, path)
        obj = {"id": file_id, "object": "file", "bytes": path.stat().st_size, "created_at": _now(),
               "filename": filename, "purpose": purpose, "status": "processed", "expires_at": _now() + 30 * 86400,
               "status_details": None}
        with self.lock:
            self.files[file_id] = _StoredFile(obj, path)
        return obj

    def _file(self, file_id: str) -> _StoredFile:
        stored = self.files.get(file_id)
        if stored is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return stored

    # --- batches --------------------------------------------------------------------

    def _batch(self, batch_id: str) -> _Batch:
        batch = self.batches.get(batch_id)
        if batch is None:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return batch

    def create_batch(self, params: dict) -> dict:
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not params.get(name):
                raise ApiError(400, f"Missing required parameter: '{name}'.", "missing_required_parameter", name)
        if params["endpoint"] not in ENDPOINTS:
            raise ApiError(400, f"Invalid value for 'endpoint': {params['endpoint']!r} is not supported here; "
                                f"use one of {', '.join(ENDPOINTS)}.", "invalid_value", "endpoint")
        if params["completion_window"] != "24h":
            raise ApiError(400, "Invalid value for 'completion_window': only '24h' is supported.",
                           "invalid_value", "completion_window")
        metadata = params.get("metadata")
        if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or any(
                not isinstance(v, str) or len(k) > 64 or len(v) > 512 for k, v in metadata.items())):
            raise ApiError(400, "Invalid 'metadata': at most 16 string pairs, keys up to 64 and values up to "
                                "512 characters.", "invalid_value", "metadata")
        with self.lock:
            stored = self._file(params["input_file_id"])
            if stored.obj["purpose"] != "batch":
                raise ApiError(400, f"File {stored.obj['id']} has purpose {stored.obj['purpose']!r}; upload it "
                                    "with purpose 'batch'.", "invalid_value", "input_file_id")
            batch_id = self._new_id("batch_")
            created = _now()
            obj = {"id": batch_id, "object": "batch", "endpoint": params["endpoint"], "model": None, "errors": None,
                   "input_file_id": stored.obj["id"], "completion_window": "24h", "status": "validating",
                   "output_file_id": "" if self.empty_file_ids else None,
                   "error_file_id": "" if self.empty_file_ids else None, "created_at": created, "in_progress_at": None,
                   "expires_at": created + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
                   "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                   "request_counts": {"total": 0, "completed": 0, "failed": 0},
                   "usage": {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0,
                             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0},
                   "metadata": dict(metadata) if metadata is not None else None}  # stored, returned as sent
            self.batches[batch_id] = _Batch(obj, stored.path)
            return obj

    def retrieve_batch(self, batch_id: str, advance: bool = True) -> dict:
        with self.lock:
            batch = self._batch(batch_id)
            self._tick(batch, advance)
            return batch.obj

    def cancel_batch(self, batch_id: str) -> dict:
        with self.lock:
            batch = self._batch(batch_id)
            self._tick(batch, False)
            status = batch.obj["status"]
            if status in ("cancelling", "cancelled"):
                return batch.obj
            if status in FINAL:
                raise ApiError(409, f"Cannot cancel a batch with status '{status}'.", "batch_not_cancellable")
            batch.obj.update(status="cancelling", cancelling_at=_now())
            batch.last_step = time.time()
            return batch.obj

    def list_batches(self, after: str | None, limit: int) -> dict:
        with self.lock:
            for batch in self.batches.values():
                self._tick(batch, False)
            ordered = list(reversed(list(self.batches)))  # newest first
            start = 0
            if after:
                if after not in self.batches:
                    raise ApiError(400, f"Invalid 'after': no batch {after!r}.", "invalid_value", "after")
                start = ordered.index(after) + 1
            page = [self.batches[i].obj for i in ordered[start:start + limit]]
            return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                    "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(ordered)}

    def _tick(self, batch: _Batch, advance: bool) -> None:
        """Move a batch on: one step per retrieve, or one per ``step_seconds``."""
        if self.held or batch.obj["status"] in FINAL:
            return
        if self.step_seconds is None:
            if advance:
                self._step(batch)
            return
        while batch.obj["status"] not in FINAL and time.time() - batch.last_step >= self.step_seconds:
            batch.last_step += self.step_seconds
            self._step(batch)

    def _step(self, batch: _Batch) -> None:
        status = batch.obj["status"]
        if status == "validating":
            errors, total, model, tokens = self._validate(batch)
            batch.obj["model"] = model
            over = self.token_limit is not None and tokens + self.enqueued_tokens(model) > self.token_limit
            if not errors and over:
                errors = [{"code": "token_limit_exceeded", "line": None, "param": None,
                           "message": f"Enqueued token limit reached for {model} in organization org-local. "
                                      + (f"Limit: {self.token_limit:,} enqueued tokens. " if self.state_limit else "")
                                      + "Please try again once some "
                                      "in_progress batches have been completed."}]
            if errors:
                batch.obj.update(status="failed", failed_at=_now(), errors={"object": "list", "data": errors})
                return
            batch.total, batch.tokens = total, tokens
            batch.obj["request_counts"]["total"] = total
            batch.obj.update(status="in_progress", in_progress_at=_now())
        elif status == "in_progress":
            per_step = math.ceil(batch.total / self.work_steps)
            self._answer(batch, min(batch.total, batch.done + per_step))
            if batch.done >= batch.total:
                batch.obj.update(status="finalizing", finalizing_at=_now())
        elif status == "finalizing":
            self._finish(batch, "completed", None, None)
        elif status == "cancelling":
            self._finish(batch, "cancelled", "batch_cancelled", "This request was not executed because the batch "
                                                                "was cancelled.")

    def enqueued_tokens(self, model: str | None) -> int:
        """Tokens of the model's batches that passed validation and have not ended."""
        with self.lock:
            return sum(b.tokens for b in self.batches.values()
                       if b.obj["model"] == model and b.obj["status"] in ("in_progress", "finalizing", "cancelling"))

    def _validate(self, batch: _Batch) -> tuple[list[dict], int, str | None, int]:
        """Check every input line as the Batch API does; errors name their line."""
        errors: list[dict] = []
        seen: set[str] = set()
        model = None
        count = tokens = 0
        endpoint = batch.obj["endpoint"]
        batch.ids_path = self.storage / f"{batch.obj['id']}.ids"

        def error(code: str, line: int, message: str, param: str | None = None) -> None:
            if len(errors) < 100:
                errors.append({"code": code, "line": line, "message": message, "param": param})

        with open(batch.input_path, "rb") as handle, open(batch.ids_path, "w", encoding="utf-8") as ids:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    request = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    error("invalid_json_line", number, "This line is not parseable as valid JSON.")
                    continue
                if not isinstance(request, dict):
                    error("invalid_json_line", number, "This line is not a JSON object.")
                    continue
                missing = [k for k in ("custom_id", "method", "url", "body") if k not in request]
                if missing:
                    error("missing_required_parameter", number, f"Missing required parameter: '{missing[0]}'.",
                          missing[0])
                    continue
                count += 1
                custom_id = request["custom_id"]
                if not isinstance(custom_id, str) or not custom_id:
                    error("invalid_value", number, "'custom_id' must be a non-empty string.", "custom_id")
                elif custom_id in seen:
                    error("duplicate_custom_id", number, f"The custom_id '{custom_id}' is used more than once "
                                                         "in this batch; custom_ids must be unique.", "custom_id")
                seen.add(custom_id if isinstance(custom_id, str) else "")
                ids.write(json.dumps(custom_id) + "\n")
                if request["method"] != "POST":
                    error("invalid_value", number, "Only the POST method is supported.", "method")
                if request["url"] != endpoint:
                    error("mismatched_endpoint", number, f"The url '{request['url']}' does not match the batch "
                                                         f"endpoint '{endpoint}'.", "url")
                body = request["body"]
                line_model = body.get("model") if isinstance(body, dict) else None
                if not isinstance(line_model, str) or not line_model:
                    error("missing_required_parameter", number, "Missing required parameter: 'body.model'.",
                          "body.model")
                elif model is None:
                    model = line_model
                elif line_model != model:
                    error("mismatched_model", number, f"The model '{line_model}' differs from '{model}' on earlier "
                                                      "lines; a batch takes one model.", "body.model")
                if isinstance(body, dict):
                    tokens += estimate_tokens(request["url"], body)
        if count == 0 and not errors:
            error("empty_file", None, "The input file has no requests.")
        if count > MAX_REQUESTS:
            error("too_many_requests", None, f"The input file has {count:,} requests; the limit is "
                                             f"{MAX_REQUESTS:,} per batch.")
        return errors, count, model, tokens

    def _answer(self, batch: _Batch, upto: int) -> None:
        """Answer requests ``batch.done .. upto-1`` (in input order) into the results file."""
        if batch.results is None:
            batch.results = self.storage / f"{batch.obj['id']}.results"
            batch.results.touch()
        created = _now()
        counts, usage = batch.obj["request_counts"], batch.obj["usage"]
        with open(batch.input_path, "rb") as handle, open(batch.results, "ab") as out:
            index = 0
            for raw in handle:
                if not raw.strip():
                    continue
                if index >= upto:
                    break
                if index >= batch.done:
                    line = answer_line(json.loads(raw), created)
                    data = (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
                    where = (out.tell(), len(data))
                    out.write(data)
                    if is_success(line):
                        batch.ok_offsets.append(where)
                        counts["completed"] += 1
                        body_usage = line["response"]["body"].get("usage") or {}
                        inp = body_usage.get("prompt_tokens", body_usage.get("input_tokens", 0))
                        outp = body_usage.get("completion_tokens", body_usage.get("output_tokens", 0))
                        usage["input_tokens"] += inp
                        usage["output_tokens"] += outp
                        usage["total_tokens"] += inp + outp
                    else:
                        batch.err_offsets.append(where)
                        counts["failed"] += 1
                index += 1
        batch.done = upto

    def _finish(self, batch: _Batch, status: str, leftover_code: str | None, leftover_message: str | None) -> None:
        """Write the output and error files (shuffled) and end the batch in ``status``."""
        if batch.obj["status"] == "validating":  # expired before validation: nothing was answered
            _errors, batch.total, batch.obj["model"], _tokens_ = self._validate(batch)
            batch.obj["request_counts"]["total"] = batch.total
        out_lines, err_lines = list(batch.ok_offsets), list(batch.err_offsets)
        self.random.shuffle(out_lines)
        self.random.shuffle(err_lines)
        batch_id = batch.obj["id"]
        leftovers = 0
        if batch.results is None:
            batch.results = self.storage / f"{batch_id}.results"
            batch.results.touch()
        with open(batch.results, "rb") as results:
            out_path, err_path = self.storage / f"{batch_id}.out", self.storage / f"{batch_id}.err"
            with open(out_path, "wb") as out:
                for offset, length in out_lines:
                    results.seek(offset)
                    out.write(results.read(length))
            with open(err_path, "wb") as err:
                for offset, length in err_lines:
                    results.seek(offset)
                    err.write(results.read(length))
                if leftover_code and batch.ids_path and batch.ids_path.exists():
                    with open(batch.ids_path, encoding="utf-8") as ids:
                        for index, raw in enumerate(ids):
                            if index < batch.done:
                                continue
                            leftovers += 1
                            line = {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": json.loads(raw),
                                    "response": None, "error": {"code": leftover_code, "message": leftover_message}}
                            err.write((json.dumps(line, separators=(",", ":")) + "\n").encode("utf-8"))
        batch.obj["request_counts"]["failed"] += leftovers
        if out_lines:
            batch.obj["output_file_id"] = self.add_file(out_path, f"{batch_id}_output.jsonl", "batch_output",
                                                        move=True)["id"]
        if err_lines or leftovers:
            batch.obj["error_file_id"] = self.add_file(err_path, f"{batch_id}_error.jsonl", "batch_output",
                                                       move=True)["id"]
        for path in (out_path, err_path):
            path.unlink(missing_ok=True)
        batch.obj["status"] = status
        batch.obj[f"{status}_at"] = _now()


class _Handler(BaseHTTPRequestHandler):
    """HTTP front of ``LocalBatchServer``: routes, auth, faults, JSON and file bodies."""

    server_state: LocalBatchServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms delayed-ACK stall

    def log_message(self, fmt, *args) -> None:  # quiet: tests read stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # --- plumbing ---------------------------------------------------------------------

    def _send_json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.server_state.hits.append((self.command, self._path, status))  # before the client can see it
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", f"req_{secrets.token_hex(8)}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _read_body_to(self, handle) -> int:
        """Copy the request body into ``handle`` (Content-Length or chunked); returns bytes."""
        self._body_done = True
        total = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return total
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(CHUNK, remaining))
                    handle.write(chunk)
                    remaining -= len(chunk)
                    total += len(chunk)
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(CHUNK, remaining))
            if not chunk:
                break
            handle.write(chunk)
            remaining -= len(chunk)
            total += len(chunk)
        return total

    def _json_body(self) -> dict:
        with tempfile.SpooledTemporaryFile(max_size=1 << 20) as spool:
            self._read_body_to(spool)
            spool.seek(0)
            data = spool.read()
        try:
            obj = json.loads(data or b"{}")
        except json.JSONDecodeError:
            raise ApiError(400, "We could not parse the JSON body of your request.") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return obj

    def _dispatch(self, method: str) -> None:
        state = self.server_state
        split = urlsplit(self.path)
        path = re.sub(r"^(/openai)?/v1(?=/)", "", split.path)
        self._path = path
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self._body_done = False
        try:
            if path.startswith("/_control/"):
                self._send_json(200, state.control(path[len("/_control/"):], self._json_body()))
                return
            fault = state._take_fault(method, path)
            if fault:
                headers = {"retry-after-ms": str(fault["retry_after_ms"])} if fault["retry_after_ms"] else {}
                kind = "rate_limit_exceeded" if fault["status"] == 429 else "server_error"
                raise _Fault(fault["status"], headers, kind)
            self._check_auth()
            self._route(method, path, query)
        except _Fault as fault:
            self._drain()
            message = ("Rate limit reached (local stand-in fault)." if fault.status == 429
                       else "The server had an error while processing your request (local stand-in fault).")
            self._send_json(fault.status, {"error": {"message": message, "type": fault.kind, "param": None,
                                                     "code": fault.kind}}, fault.headers)
        except ApiError as exc:
            self._drain()
            self._send_json(exc.status, exc.body())

    def _drain(self) -> None:
        """Read an unread request body so the connection stays usable."""
        if not self._body_done:
            with open(os.devnull, "wb") as sink:
                self._read_body_to(sink)

    def _check_auth(self) -> None:
        header = self.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else ""
        key = self.server_state.api_key
        if not token or (key is not None and token != key):
            shown = f"{token[:3]}{'*' * 8}{token[-4:]}" if len(token) > 8 else "****"
            raise ApiError(401, f"Incorrect API key provided: {shown}. You can find your API key at "
                                "https://platform.openai.com/account/api-keys.", "invalid_api_key")

    def _route(self, method: str, path: str, query: dict) -> None:
        state = self.server_state
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/files":
            self._upload()
        elif method == "GET" and path == "/files":
            with state.lock:
                data = [f.obj for f in state.files.values()]
            self._send_json(200, {"object": "list", "data": data, "first_id": None, "last_id": None,
                                  "has_more": False})
        elif len(parts) == 2 and parts[0] == "files" and method in ("GET", "DELETE"):
            with state.lock:
                stored = state._file(parts[1])
                if method == "DELETE":
                    del state.files[parts[1]]
                    stored.path.unlink(missing_ok=True)
                    self._send_json(200, {"id": parts[1], "object": "file", "deleted": True})
                else:
                    self._send_json(200, stored.obj)
        elif method == "GET" and len(parts) == 3 and parts[0] == "files" and parts[2] == "content":
            self._download(parts[1])
        elif method == "POST" and path == "/batches":
            obj = state.create_batch(self._json_body())
            self._send_json(200, obj)
        elif method == "GET" and path == "/batches":
            try:
                limit = int(query.get("limit", 20))
            except ValueError:
                raise ApiError(400, "Invalid 'limit': expected an integer.", "invalid_value", "limit") from None
            if not 1 <= limit <= 100:
                raise ApiError(400, "Invalid 'limit': must be between 1 and 100.", "invalid_value", "limit")
            self._send_json(200, state.list_batches(query.get("after"), limit))
        elif method == "GET" and len(parts) == 2 and parts[0] == "batches":
            self._send_json(200, state.retrieve_batch(parts[1]))
        elif method == "POST" and len(parts) == 3 and parts[0] == "batches" and parts[2] == "cancel":
            self._json_body()
            self._send_json(200, state.cancel_batch(parts[1]))
        else:
            raise ApiError(404, f"Invalid URL ({method} /v1{path})", "unknown_url")

    def _upload(self) -> None:
        state = self.server_state
        content_type = self.headers.get("Content-Type", "")
        match = re.search(r'boundary="?([^";]+)"?', content_type)
        if "multipart/form-data" not in content_type or not match:
            raise ApiError(400, "Expected a multipart/form-data body with 'file' and 'purpose'.")
        boundary = b"--" + match.group(1).encode("latin-1")
        with tempfile.TemporaryFile(dir=state.storage) as spool:
            self._read_body_to(spool)
            spool.flush()
            if spool.tell() == 0:
                raise ApiError(400, "Empty request body.")
            fields, file_part = {}, None
            with mmap.mmap(spool.fileno(), 0, access=mmap.ACCESS_READ) as body:
                position = body.find(boundary)
                while position >= 0:
                    start = position + len(boundary)
                    if body[start:start + 2] == b"--":
                        break
                    header_end = body.find(b"\r\n\r\n", start)
                    following = body.find(b"\r\n" + boundary, header_end)
                    if header_end < 0 or following < 0:
                        raise ApiError(400, "Malformed multipart body.")
                    headers = body[start:header_end].decode("utf-8", "replace")
                    name = re.search(r'name="([^"]*)"', headers)
                    filename = re.search(r'filename="([^"]*)"', headers)
                    content = (header_end + 4, following)
                    if name and name.group(1) == "file":
                        file_part = (filename.group(1) if filename else "upload", content)
                    elif name:
                        fields[name.group(1)] = body[content[0]:content[1]].decode("utf-8", "replace")
                    position = following + 2
                if file_part is None:
                    raise ApiError(400, "Missing required parameter: 'file'.", "missing_required_parameter", "file")
                purpose = fields.get("purpose")
                if not purpose:
                    raise ApiError(400, "Missing required parameter: 'purpose'.", "missing_required_parameter",
                                   "purpose")
                filename, (begin, end) = file_part
                if purpose == "batch" and not filename.endswith(".jsonl"):
                    raise ApiError(400, f"Invalid file format for Batch API ({filename}). Must be .jsonl",
                                   "invalid_file_format", "file")
                with tempfile.NamedTemporaryFile(dir=state.storage, delete=False) as target:
                    for offset in range(begin, end, CHUNK):
                        target.write(body[offset:min(end, offset + CHUNK)])
        obj = state.add_file(Path(target.name), filename, purpose, move=True)
        self._send_json(200, obj)

    def _download(self, file_id: str) -> None:
        state = self.server_state
        with state.lock:
            stored = state._file(file_id)
        size = stored.path.stat().st_size
        drop = state._take_drop()
        state.hits.append(("GET", self._path, -1 if drop else 200))
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        sent = 0
        with open(stored.path, "rb") as handle:
            while True:
                chunk = handle.read(CHUNK)
                if not chunk:
                    break
                if drop and sent + len(chunk) > drop["after_bytes"]:
                    self.wfile.write(chunk[:max(0, drop["after_bytes"] - sent)])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # mid-body: the client sees a dropped connection
                    return
                self.wfile.write(chunk)
                sent += len(chunk)


class _Fault(Exception):
    def __init__(self, status: int, headers: dict, kind: str):
        super().__init__(status)
        self.status, self.headers, self.kind = status, headers, kind


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datagen.local_batch_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--api_key", "--api-key", default="sk-local",
                        help="bearer token clients must send ('' accepts any)")
    parser.add_argument("--step_seconds", "--step-seconds", type=float, default=1.0,
                        help="seconds between a batch's status steps")
    parser.add_argument("--work_steps", "--work-steps", type=int, default=2,
                        help="in_progress steps a batch takes to answer its requests")
    parser.add_argument("--token_limit", "--token-limit", type=int, default=None, metavar="N",
                        help="enqueued-token limit per model (default: none)")
    args = parser.parse_args(argv)
    server = LocalBatchServer(port=args.port, api_key=args.api_key or None, step_seconds=args.step_seconds,
                              work_steps=args.work_steps, token_limit=args.token_limit).start()
    print(f"{BANNER}\nlistening on {server.base_url}  (set OPENAI_BASE_URL={server.base_url}; "
          f"key: {'any' if not args.api_key else 'the --api_key given'}); Ctrl+C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
