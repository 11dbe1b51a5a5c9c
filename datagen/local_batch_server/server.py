"""A local stand-in for the OpenAI Files + Batches API. It is NOT OpenAI.

    python -m datagen.local_batch_server --port 8765 --api_key sk-local --step_seconds 1
    OPENAI_BASE_URL=http://127.0.0.1:8765/v1 OPENAI_API_KEY=sk-local \\
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

Map: ``LocalBatchServer`` (state, steps, answers, faults) here; its HTTP front, ``Handler``,
in ``datagen.local_batch_server.http``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path

from datagen.batchapi.openai_client import is_success
from datagen.local_batch_server.answers import answer_line
from datagen.local_batch_server.http import ApiError, Handler
from datagen.local_batch_server.validate import validate_input

log = logging.getLogger("datagen.local_batch_server")

ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/embeddings")
FINAL = ("failed", "completed", "expired", "cancelled")
BANNER = "LOCAL STAND-IN for the OpenAI Batch API (not OpenAI; answers are fake echoes)"


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


class LocalBatchServer:
    """A stateful Files + Batches server on 127.0.0.1; use as a context manager.

    ``api_key``: the bearer token required (None accepts any non-empty one).
    ``step_seconds``: None moves a batch one step per retrieve; a number, one step per that
    many seconds. ``work_steps``: in_progress steps a batch takes to answer its requests.
    ``seed``: the output shuffle. ``token_limit``: the enqueued-token limit per model, as
    the API enforces it: when a batch validates, its tokens (``estimates.estimate_tokens``
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
        handler = type("Handler", (Handler,), {"server_state": self})
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
        batch.ids_path = self.storage / f"{batch.obj['id']}.ids"
        return validate_input(batch.input_path, batch.obj["endpoint"], batch.ids_path)

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
