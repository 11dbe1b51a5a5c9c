"""The OpenAI client for the Batch API route: the key, reading the API's batch objects, and
one-line explanations of every API error and of answers that are not the Batch API's.

- Key: ``openai.tok`` in the working directory, or ``--key_file FILE``, else
  ``OPENAI_API_KEY`` (``load_key``). The key is never printed or logged: messages pass
  through ``Session.redact`` and a logging filter blanks it. A UTF-8 BOM is stripped; a
  key with non-ASCII characters is refused by position, never shown.
- Reading the API's objects: the statuses (``FINAL``, ``BLOCKING``, ``wait_exit_status``),
  ``request_counts``, ``validation_errors``, ``from_where``, and per result line
  ``is_success`` / ``error_code`` (both shapes of the error file). The ids file and the
  manifest are in ``datagen.batchapi.batch_state``.
- ``Session``: the SDK client made on first use; ``call`` turns an SDK error into a
  ``UserError``; ``expect`` refuses an answer that is not shaped like the Batch API's
  (a wrong ``--base_url`` that answers an HTML page or ``{}``); ``stream_file`` streams
  one API file into an open file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from datagen.common.errors import UserError
from datagen.batchapi.batch_state import IDS_FILE
from datagen.cache.keys import service_of

log = logging.getLogger("datagen")

KEY_FILE = "openai.tok"  # the API key, one line, in the working directory
STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled")
FINAL = ("completed", "failed", "expired", "cancelled")
BLOCKING = ("validating", "in_progress", "finalizing", "completed")  # an earlier batch that --run must not repeat
EXIT_STATUS = {"completed": 0, "failed": 3, "expired": 4, "cancelled": 5}
KEY_FILE_MAX = 4096  # bytes; a key is about 200, so anything longer is the wrong file
DOWNLOAD_CHUNK = 1 << 20  # bytes read from the HTTP stream at a time


# --- key ------------------------------------------------------------------------------


def load_key(key_file: str | None) -> tuple[str, str]:
    """The API key and where it came from (a description safe to print)."""
    if key_file is not None:
        return _read_key_file(Path(key_file), f"--key_file {key_file}"), f"--key_file {key_file}"
    path = Path(KEY_FILE)
    if os.path.lexists(path):  # lexists: a broken link is reported, not skipped
        return _read_key_file(path, str(path)), str(path)
    key = os.environ.get("OPENAI_API_KEY", "").strip().lstrip("\ufeff")
    if key:
        _check_ascii(key, "OPENAI_API_KEY")
        return key, "OPENAI_API_KEY"
    raise UserError(f"no API key: put it in {KEY_FILE} in this folder (then chmod 600 {KEY_FILE}), "
                    "pass --key_file FILE, or set OPENAI_API_KEY")


def _read_key_file(path: Path, label: str) -> str:
    """The one word in a regular key file; folders, devices and unreadable files refused."""
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise UserError(f"{label} is a folder; put the API key in a file (chmod 600) and point at it")
        if not stat.S_ISREG(mode):
            raise UserError(f"{label} is not a regular file (a device, pipe or socket); put the API key in a "
                            "plain file")
        with open(path, "rb") as handle:
            data = handle.read(KEY_FILE_MAX + 1)
    except FileNotFoundError:
        raise UserError(f"{label}: no such file (or a broken link); put the API key in it, or use "
                        "OPENAI_API_KEY") from None
    except OSError as exc:
        raise UserError(f"{label}: cannot read the API key ({exc.strerror}); check the file and its "
                        "permissions") from None
    if len(data) > KEY_FILE_MAX:
        raise UserError(f"{label} is over {KEY_FILE_MAX} bytes; it must hold only the API key, on one line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{label} is not UTF-8 text; it must hold only the API key, on one line") from None
    key = text.lstrip("\ufeff").strip()  # editors on Windows start files with a BOM
    if not key:
        raise UserError(f"{label} is empty; put your API key on its one line (or remove the file to use "
                        "OPENAI_API_KEY)")
    if any(ch.isspace() for ch in key):
        raise UserError(f"{label} holds more than one word; it must hold only the API key, on one line")
    _check_ascii(key, label)
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s is readable by other users (mode %o); protect the key with: chmod 600 %s",
                    path, stat.S_IMODE(mode), path)
    return key


def _check_ascii(key: str, where: str) -> None:
    """An HTTP header takes printable ASCII only; say where the odd character is, never the key."""
    for position, char in enumerate(key, start=1):
        if not char.isascii() or not char.isprintable():
            raise UserError(f"{where}: the key has a non-ASCII character at position {position} (of {len(key)}); "
                            "an API key is plain ASCII: copy it again from the provider's page")


# --- reading the API's objects -------------------------------------------------------


def when(stamp: int | None) -> str:
    if not stamp:
        return "-"
    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def wait_exit_status(batches: list) -> int:
    """0 every batch completed; else 3 failed, 4 expired, 5 cancelled (the first that applies)."""
    statuses = {b.status for b in batches}
    for status in ("failed", "expired", "cancelled"):
        if status in statuses:
            return EXIT_STATUS[status]
    return 0


def from_where(batch) -> str:
    """``batch_x (from judge.jsonl)``: a batch and the input file it was made from."""
    metadata = batch.metadata if isinstance(batch.metadata, dict) else {}
    return f"{batch.id} (from {metadata['source_file']})" if metadata.get("source_file") else batch.id


def request_counts(batch) -> tuple[int, int, int]:
    counts = batch.request_counts
    if counts is None:
        return 0, 0, 0
    return counts.total or 0, counts.completed or 0, counts.failed or 0


def file_id_or_none(value: str | None) -> str | None:
    """File ids can come back as empty strings: treat those as absent."""
    return value or None


def validation_errors(batch, limit: int = 3) -> str:
    errors = (batch.errors.data if batch.errors and batch.errors.data else [])
    shown = "; ".join((f"line {e.line}: " if e.line else "") + f"{e.code}: {e.message}" for e in errors[:limit])
    more = f" (and {len(errors) - limit} more: see --check)" if len(errors) > limit else ""
    return (shown + more) or "no reason given"


def error_code(line: dict) -> str:
    error = line.get("error")
    if isinstance(error, dict) and error.get("code"):
        return str(error["code"])
    response = line.get("response") or {}
    body = response.get("body") if isinstance(response, dict) else None
    inner = body.get("error") if isinstance(body, dict) else None
    if isinstance(inner, dict) and inner.get("code"):
        return str(inner["code"])
    return f"http_{response.get('status_code', 'unknown')}" if response else "unknown"


def is_success(line: dict) -> bool:
    """A line is a success only with a response, status 200 and no error (the Batch API reports failures in both files)."""
    response = line.get("response")
    return isinstance(response, dict) and response.get("status_code") == 200 and line.get("error") is None


# --- the client and its errors ---------------------------------------------------------


class _Redact(logging.Filter):
    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.secret in message:
            record.msg, record.args = message.replace(self.secret, "[redacted]"), None
        return True


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP library's errors a body read can raise (the SDK does not wrap those)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            module = __import__(name)
            errors.append(module.HTTPError)
            errors.append(module.StreamError)
    import openai

    errors.append(openai.APIConnectionError)
    return tuple(errors)


@dataclass
class Session:
    """The client, made on first use, and how to explain its errors."""

    key_file: str | None = None
    base_url: str | None = None
    max_retries: int = 5
    ids_file: str = IDS_FILE
    _client: Any = None
    key_source: str = ""
    _secret: str = ""
    _filters: list = field(default_factory=list)

    @property
    def client(self):
        if self._client is None:
            import openai

            key, self.key_source = load_key(self.key_file)
            self._secret = key
            redact = _Redact(key)
            # the suite's handler (on "datagen") and the SDK's (OPENAI_LOG sets up the root's)
            for name in ("", "datagen", "openai", "httpx"):
                for handler in logging.getLogger(name).handlers:
                    handler.addFilter(redact)
                    self._filters.append((handler, redact))
            self._client = openai.OpenAI(api_key=key, base_url=self.base_url or None, max_retries=self.max_retries)
            log.debug("Batch API at %s (key from %s)", self._client.base_url, self.key_source)
        return self._client

    @property
    def url(self) -> str:
        return str(self.client.base_url).rstrip("/")

    @property
    def service(self) -> str:
        """The host[:port] the requests go to, as the answer cache keys it (no key needed)."""
        return service_of(self.base_url or os.environ.get("OPENAI_BASE_URL") or None)

    def redact(self, text: str) -> str:
        return text.replace(self._secret, "[redacted]") if self._secret else text

    def call(self, what: str, function: Callable, *args, **kwargs):
        """Call the SDK; an API error becomes one line that says what to do."""
        import openai

        try:
            return function(*args, **kwargs)
        except openai.APIError as exc:
            raise UserError(self.redact(self.explain(what, exc))) from None

    def explain(self, what: str, exc) -> str:
        import openai

        status = getattr(exc, "status_code", None)
        body = getattr(exc, "body", None)  # the "error" object of the answer, when it had one
        code = body.get("code") if isinstance(body, dict) else None
        message = body.get("message") if isinstance(body, dict) and body.get("message") else \
            getattr(exc, "message", str(exc))
        message = " ".join(str(message).split())
        retries = f"after {self.max_retries} retries" if self.max_retries else "(retries are off: --max_retries 0)"
        if isinstance(exc, openai.AuthenticationError):
            return (f"{what}: the API refused the key from {self.key_source} (401 {code or 'Unauthorized'}); "
                    f"check the key, and that {self.url} is the service it belongs to")
        if isinstance(exc, openai.PermissionDeniedError):
            return f"{what}: the key from {self.key_source} may not do this (403): {message}"
        if isinstance(exc, openai.NotFoundError):
            return f"{what}: not found at {self.url} (404: {message}); check --id or {self.ids_file}, and --base_url"
        if isinstance(exc, openai.RateLimitError):
            return (f"{what}: rate limited (429) {retries}: {message}; wait a few minutes and rerun, or raise "
                    "--max_retries")
        if isinstance(exc, openai.InternalServerError):
            return f"{what}: the server failed ({status}) {retries}: {message}; rerun later"
        if isinstance(exc, openai.APIStatusError):
            return f"{what}: the API answered {status}: {message}"
        if isinstance(exc, openai.APITimeoutError):
            return f"{what}: {self.url} did not answer in time {retries}; check the network and rerun"
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            return (f"{what}: cannot reach {self.url} ({type(cause).__name__}: {cause}) {retries}; check --base_url "
                    "/ OPENAI_BASE_URL and the network")
        return f"{what}: {message}"

    def not_batch_api(self, what: str, shown: str) -> UserError:
        return UserError(self.redact(f"--base_url {self.url} does not answer like the OpenAI Batch API ({what}: "
                                     f"got {shown}); check --base_url / OPENAI_BASE_URL"))

    def expect(self, what: str, answer, kind: str):
        """``answer`` if it is a Batch API object of ``kind`` ("batch" or "file"), else a UserError."""
        good = isinstance(getattr(answer, "id", None), str) and answer.id
        if kind == "batch":
            good = good and getattr(answer, "status", None) in STATUSES and (
                answer.request_counts is None or isinstance(getattr(answer.request_counts, "total", None), int))
        if not good:
            raise self.not_batch_api(what, answer_summary(answer))
        return answer

    def retrieve(self, batch_id: str, missing_ok: bool = False):
        """The batch (None when ``missing_ok`` and the API does not know it)."""
        import openai

        what = f"batch {batch_id}"
        try:
            batch = self.client.batches.retrieve(batch_id)
        except openai.NotFoundError as exc:
            if missing_ok:
                return None
            raise UserError(self.redact(self.explain(what, exc))) from None
        except openai.APIError as exc:
            raise UserError(self.redact(self.explain(what, exc))) from None
        return self.expect(what, batch, "batch")

    def list_batches(self, limit: int, what: str = "listing batches", missing_ok: bool = False) -> list | None:
        """Up to ``limit`` most recent batches, newest first (the SDK follows the cursor);
        None when ``missing_ok`` and the service has no list (404 or 405)."""
        import openai

        rows: list = []
        try:
            raw = self.client.batches.with_raw_response.list(limit=min(limit, 100))
        except openai.APIError as exc:
            if missing_ok and getattr(exc, "status_code", None) in (404, 405):
                return None
            raise UserError(self.redact(self.explain(what, exc))) from None
        try:
            page = raw.parse()
            readable = isinstance(page.data, list)
        except (AttributeError, TypeError, ValueError):  # the SDK choking on a page that is not the API's
            readable = False
        if not readable:
            raise self.not_batch_api(what, answer_summary(raw.text[:200]))
        try:
            for batch in page:  # the SDK follows the cursor (after=...) page by page
                rows.append(self.expect(what, batch, "batch"))
                if len(rows) >= limit:
                    break
        except (AttributeError, TypeError, ValueError) as exc:
            raise self.not_batch_api(what, f"a page the SDK cannot read ({type(exc).__name__})") from None
        return rows

    def stream_file(self, file_id: str, handle, label: str) -> tuple[int, int]:
        """Append one API file to ``handle`` in chunks; returns (lines, bytes).

        A connection dropped mid-body restarts the file (up to --max_retries times) after
        cutting what it wrote. Errors before the body starts (404, 429 or 5xx after the
        SDK's own retries) and a body that is not JSONL are one-line errors.
        """
        import openai

        what = f"downloading {label} {file_id}"
        start = handle.tell()
        transport_errors = _transport_errors()
        for attempt in range(self.max_retries + 1):
            written = lines = 0
            last, looked = b"\n", False
            body_started = False
            try:
                with self.client.files.with_streaming_response.content(file_id) as response:
                    body_started = True
                    for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                        if not looked and chunk.strip():  # a JSONL file starts with "{"; an HTML page does not
                            looked = True
                            if not chunk.lstrip().startswith(b"{"):
                                raise self.not_batch_api(what, answer_summary(chunk[:200]))
                        if not chunk:
                            continue
                        handle.write(chunk)
                        written += len(chunk)
                        lines += chunk.count(b"\n")
                        last = chunk[-1:]
                if last != b"\n":  # a last line without newline: end it, so merged files stay JSONL
                    handle.write(b"\n")
                    lines += 1
                return lines, written
            except transport_errors as exc:
                if not body_started and isinstance(exc, openai.APIError):
                    raise UserError(self.redact(self.explain(what, exc))) from None  # the SDK retried already
                handle.seek(start)
                handle.truncate()
                reason = self.redact(f"{type(exc).__name__}: {exc}")
                if attempt >= self.max_retries:
                    raise UserError(f"{what}: the connection dropped after {written:,} bytes ({reason}); nothing "
                                    "was saved; rerun the same command to download it again") from None
                delay = min(0.5 * 2 ** attempt, 8.0)
                log.warning("%s: connection dropped after %s bytes (%s); starting it again in %.1f s (retry %d of "
                            "%d)", what, f"{written:,}", reason, delay, attempt + 1, self.max_retries)
                time.sleep(delay)
            except openai.APIError as exc:
                raise UserError(self.redact(self.explain(what, exc))) from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        for handler, redact in self._filters:
            handler.removeFilter(redact)
        self._filters.clear()
        if self._client is not None:
            self._client.close()


def answer_summary(answer) -> str:
    """A short, safe description of an unexpected answer: "an HTML page", or its JSON."""
    if isinstance(answer, bytes):
        answer = answer.decode("utf-8", "replace")
    if isinstance(answer, str):
        text = " ".join(answer.split())
        if text.startswith("<"):
            return "an HTML page"
        try:
            answer = json.loads(text)
        except ValueError:
            return repr(_first_60_chars(text)) if text else "an empty answer"
    to_dict = getattr(answer, "to_dict", None)
    if callable(to_dict):  # an SDK object built from whatever came back
        with contextlib.suppress(Exception):
            answer = to_dict(mode="json", warnings=False)
    try:
        return _first_60_chars(json.dumps(answer, separators=(",", ":"), ensure_ascii=False))
    except (TypeError, ValueError):
        return type(answer).__name__


def _first_60_chars(text: str) -> str:
    return text[:60] + ("..." if len(text) > 60 else "")
