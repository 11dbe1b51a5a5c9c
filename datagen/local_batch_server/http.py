"""The HTTP front of the local Batch API stand-in (``server.py`` beside it): routes,
bearer-token auth, injected faults, JSON answers and streamed file bodies, over the
server's state. ``ApiError`` is an answer in the OpenAI error shape.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import secrets
import tempfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("datagen.local_batch_server")

CHUNK = 1 << 16  # bytes per read and write of a file body


class ApiError(Exception):
    """An error answer: HTTP status plus the OpenAI error body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}



class Handler(BaseHTTPRequestHandler):
    """HTTP front of ``LocalBatchServer``: routes, auth, faults, JSON and file bodies."""

    server_state: object  # the LocalBatchServer (server.py) whose state this front serves
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
