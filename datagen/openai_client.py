"""The OpenAI client for the Batch API route: the key, the state file of batch ids, and
one-line explanations of every API error and of answers that are not the Batch API's.

- Key: ``openai.tok`` in the working directory, or ``--key_file FILE``, else
  ``OPENAI_API_KEY`` (``load_key``). The key is never printed or logged: messages pass
  through ``Session.redact`` and a logging filter blanks it. A UTF-8 BOM is stripped; a
  key with non-ASCII characters is refused by position, never shown.
- ``last_batch_id.tok``: the ids of the batches of the last ``--run``, one per line
  (``load_batch_ids`` / ``save_batch_ids``, written atomically). ``--retry_failed`` adds
  a comment line ``# retry: FILE sha256=HEX`` so that the ``--run`` of FILE adds its ids
  beside the originals instead of replacing them. The queue of ``--run --wait`` keeps
  its manifest beside it (``datagen.batch_queue``).
- Reading the API's objects: ``request_counts``, ``validation_errors``, and per result
  line ``is_success`` / ``error_code`` (both shapes of the error file).
- ``Session``: the SDK client made on first use; ``call`` turns an SDK error into a
  ``UserError``; ``expect`` refuses an answer that is not shaped like the Batch API's
  (a wrong ``--base_url`` that answers an HTML page or ``{}``); ``stream_file`` streams
  one API file into an open file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from datagen.errors import UserError
from datagen.jsonl import atomic_writer

log = logging.getLogger("datagen")

KEY_FILE = "openai.tok"  # the API key, one line, in the working directory
IDS_FILE = "last_batch_id.tok"  # the ids of the last --run, one per line
BATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{2,199}$")
PENDING_RETRY = re.compile(r"^# retry: (?P<name>.+) sha256=(?P<digest>[0-9a-f]{64})$")
STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled")
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


# --- the batch ids file ---------------------------------------------------------------


@dataclass
class SavedIds:
    ids: list[str] = field(default_factory=list)
    pending: dict[str, str] = field(default_factory=dict)  # sha256 of a --retry_failed file -> its name


def read_ids_file(path: str | os.PathLike) -> SavedIds:
    """What the ids file holds; a missing or empty file holds nothing, a bad one is an error."""
    path = Path(path)
    if not os.path.lexists(path):
        return SavedIds()
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise UserError(f"{path} is not a regular file (a folder or a device); remove it, or pass "
                            "--ids_file FILE or --id BATCH_ID")
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is corrupt (not text); delete it and pass --id BATCH_ID") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror}); fix or remove it, or pass --id "
                        "BATCH_ID") from None
    saved = SavedIds()
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if line.startswith("#"):
            if match := PENDING_RETRY.match(line):
                saved.pending[match["digest"]] = match["name"]
            continue
        if not line:
            continue
        if not BATCH_ID.match(line):
            shown = line if len(line) <= 40 else line[:40] + "..."
            raise UserError(f"{path}:{number}: {shown!r} is not a batch id; the file is corrupt: fix or delete "
                            "it, or pass --id BATCH_ID")
        saved.ids.append(line)
    return saved


def load_batch_ids(path: str | os.PathLike) -> list[str]:
    """The batch ids saved by the last --run (at least one); anything else is an error."""
    if not os.path.lexists(path):
        raise UserError(f"no batch id: {path} does not exist here; pass --id BATCH_ID, or submit a batch "
                        "with --run first")
    ids = read_ids_file(path).ids
    if not ids:
        raise UserError(f"{path} is empty; pass --id BATCH_ID, or submit a batch with --run")
    return ids


def check_state_path(path: str | os.PathLike, flag: str = "--ids_file") -> Path:
    """A state file must be a regular file or absent: never rename over a folder or device."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_file():
        raise UserError(f"{flag} {path} exists and is not a regular file (a folder or a device); remove it or "
                        f"choose another {flag}")
    if not path.parent.exists():
        raise UserError(f"{flag} {path}: folder {path.parent} does not exist; create it first")
    return path


def save_batch_ids(path: str | os.PathLike, ids: list[str], pending: dict[str, str] | None = None) -> None:
    """Replace the ids file atomically: a crash leaves the old one or the new one, whole."""
    check_state_path(path)
    lines = [f"{batch_id}\n" for batch_id in ids]
    lines += [f"# retry: {name} sha256={digest}\n" for digest, name in (pending or {}).items()]
    try:
        with atomic_writer(path) as handle:
            handle.write("".join(lines))
    except (OSError, UserError) as exc:  # disk full or read-only: the new ids must not be lost with the file
        reason = f"{path}: {exc.strerror}" if isinstance(exc, OSError) else str(exc)
        raise UserError(f"{reason}; the batch ids were not saved, note them: {', '.join(ids)} (pass them with "
                        "--id)") from None


def parse_ids(values: Iterable[str]) -> list[str]:
    ids = []
    for value in values:
        for batch_id in value.split(","):
            batch_id = batch_id.strip()
            if not BATCH_ID.match(batch_id):
                raise UserError(f"--id {batch_id!r} is not a batch id (like batch_abc123)")
            ids.append(batch_id)
    return ids


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(DOWNLOAD_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- reading the API's objects -------------------------------------------------------


def when(stamp: int | None) -> str:
    if not stamp:
        return "-"
    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


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
            raise self.not_batch_api(what, _shown(answer))
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
            raise self.not_batch_api(what, _shown(raw.text[:200]))
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
                                raise self.not_batch_api(what, _shown(chunk[:200]))
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


def _shown(answer) -> str:
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
            return repr(_short(text)) if text else "an empty answer"
    to_dict = getattr(answer, "to_dict", None)
    if callable(to_dict):  # an SDK object built from whatever came back
        with contextlib.suppress(Exception):
            answer = to_dict(mode="json", warnings=False)
    try:
        return _short(json.dumps(answer, separators=(",", ":"), ensure_ascii=False))
    except (TypeError, ValueError):
        return type(answer).__name__


def _short(text: str) -> str:
    return text[:60] + ("..." if len(text) > 60 else "")
