"""The OpenAI Batch API route: key and state files, client, and every batch action.

- Key: ``openai.tok`` in the working directory, or ``--key_file FILE``, else
  ``OPENAI_API_KEY`` (``load_key``). The key is never printed or logged: messages pass
  through ``Session.redact`` and a logging filter blanks it.
- State: ``last_batch_id.tok`` holds the ids of the batches the last ``--run`` made, one
  per line (``load_batch_ids`` / ``save_batch_ids``); every action defaults to them.
- Actions: ``submit`` (check locally, upload, create; one batch per part file),
  ``check``, ``wait`` (poll to a final state with a progress bar), ``cancel``,
  ``download`` (stream output and error files of all batches into OUTPUT and
  OUTPUT.errors.jsonl, atomically), ``retry_failed`` (a new batch input holding the
  requests that failed or expired), ``list_recent``.
- ``add_batch_args(parser)`` defines the flags; ``run_command(args, parser)`` runs them
  in the order run -> cancel -> wait -> check -> download.

Exit status (``wait_exit_status``): 0 every batch completed; 3 a batch failed (its input
was refused); 4 a batch expired; 5 a batch was cancelled (the first that applies, in
that order); 1 any other error; 2 bad usage; 130 Ctrl+C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import re
import stat
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from datagen import batchfile, cli
from datagen.errors import UserError
from datagen.jsonl import atomic_writer, iter_jsonl_objects, temp_path_beside

log = logging.getLogger("datagen")

KEY_FILE = "openai.tok"  # the API key, one line, in the working directory
IDS_FILE = "last_batch_id.tok"  # the ids of the last --run, one per line
FINAL = ("completed", "failed", "expired", "cancelled")
EXIT_STATUS = {"completed": 0, "failed": 3, "expired": 4, "cancelled": 5}
BATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{2,199}$")
DOWNLOAD_CHUNK = 1 << 20  # bytes read from the HTTP stream at a time


# --- flags ----------------------------------------------------------------------------


def add_batch_args(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_argument_group("actions (none: list recent batches)")
    cli.add_flag(actions, "run", action="store_true",
                 help="check --file locally, upload it and create a batch (one per part file); "
                      f"the ids go to {IDS_FILE}")
    cli.add_flag(actions, "check", action="store_true", help="print each batch's status, counts, times and errors")
    cli.add_flag(actions, "wait", action="store_true",
                 help="poll until every batch ends; exit 0 completed, 3 failed, 4 expired, 5 cancelled")
    cli.add_flag(actions, "cancel", action="store_true", help="cancel the batches (finished requests are kept)")
    cli.add_flag(actions, "download", metavar="OUTPUT", default=None,
                 help="save the output lines of all batches in OUTPUT and their errors in OUTPUT.errors.jsonl")
    cli.add_flag(actions, "retry_failed", metavar="NEW_INPUT", default=None,
                 help="write the requests of --file that failed or expired to NEW_INPUT, ready for --run")
    which = parser.add_argument_group("which batches and files")
    cli.add_flag(which, "file", default="batchinput.jsonl",
                 help="batch input file for --run/--retry_failed (or its STEM.part-NNN.jsonl parts)")
    cli.add_flag(which, "id", action="append", default=None, metavar="BATCH_ID",
                 help=f"act on this batch (repeatable, or comma-separated) instead of the ids in {IDS_FILE}")
    cli.add_flag(which, "ids_file", default=IDS_FILE, help="where --run saves the batch ids and the others read them")
    cli.add_flag(which, "errors_file", default=None, metavar="ERRORS.jsonl",
                 help="--retry_failed: take the failures from this downloaded error file instead of the API")
    cli.add_flag(which, "description", default=None, help="--run: a note stored in the batch metadata")
    cli.add_flag(which, "limit", type=int, default=20, help="how many recent batches the list shows")
    api = parser.add_argument_group("API")
    cli.add_flag(api, "key_file", default=None,
                 help=f"file holding the API key (default: ./{KEY_FILE} if present, else $OPENAI_API_KEY)")
    cli.add_flag(api, "base_url", default=None,
                 help="any OpenAI-compatible Batch API, e.g. https://RESOURCE.openai.azure.com/openai/v1/ "
                      "(default: $OPENAI_BASE_URL, else OpenAI)")
    cli.add_flag(api, "max_retries", type=int, default=5,
                 help="retries on 429, 5xx and dropped connections (the SDK's backoff; downloads restart)")
    cli.add_flag(api, "poll_interval", type=float, default=30.0, metavar="SECONDS",
                 help="--wait: seconds between status checks")
    cli.add_flag(api, "json", action="store_true", help="--check: print each batch as raw JSON, one per line")


def check_combination(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse flag combinations that cannot mean anything (exit 2, like argparse)."""
    if args.cancel and (args.run or args.download or args.retry_failed):
        parser.error("--cancel goes alone (or with --wait/--check)")
    if args.retry_failed and (args.run or args.download or args.wait):
        parser.error("--retry_failed goes alone; then submit its output with --run --file NEW_INPUT")
    if args.run and args.id:
        parser.error("--run makes new batches; --id is for the other actions")
    if args.run and args.download and not args.wait:
        parser.error("--run --download needs --wait (a new batch has nothing to download yet)")
    if args.max_retries < 0:
        parser.error("--max_retries must be 0 or more")
    if args.poll_interval < 0:
        parser.error("--poll_interval must be 0 or more")
    if args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.json and not args.check:
        parser.error("--json goes with --check")


# --- key and state files --------------------------------------------------------------


def load_key(key_file: str | None) -> tuple[str, str]:
    """The API key and where it came from (a description safe to print)."""
    if key_file is not None:
        path = Path(key_file)
        if not path.is_file():
            raise UserError(f"--key_file {path}: no such file; put the API key in it or drop --key_file")
        return _read_key_file(path), f"--key_file {path}"
    path = Path(KEY_FILE)
    if path.exists():
        return _read_key_file(path), str(path)
    key = os.environ.get("OPENAI_API_KEY", "").strip()
    if key:
        return key, "OPENAI_API_KEY"
    raise UserError(f"no API key: put it in {KEY_FILE} in this folder (then chmod 600 {KEY_FILE}), "
                    "pass --key_file FILE, or set OPENAI_API_KEY")


def _read_key_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the API key ({getattr(exc, 'strerror', None) or 'not text'}); "
                        "check the file") from None
    key = text.strip()
    if not key:
        raise UserError(f"{path} is empty; put your API key on its one line (or remove the file to use "
                        "OPENAI_API_KEY)")
    if any(ch.isspace() for ch in key):
        raise UserError(f"{path} holds more than one word; it must hold only the API key, on one line")
    mode = path.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s is readable by other users (mode %o); protect the key with: chmod 600 %s",
                    path, stat.S_IMODE(mode), path)
    return key


def load_batch_ids(path: str | os.PathLike) -> list[str]:
    """The batch ids saved by the last --run, one per line; a corrupt file is an error."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no batch id: {path} does not exist here; pass --id BATCH_ID, or submit a batch "
                        "with --run first")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is corrupt (not text); delete it and pass --id BATCH_ID") from None
    ids = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        if not BATCH_ID.match(line):
            shown = line if len(line) <= 40 else line[:40] + "..."
            raise UserError(f"{path}:{number}: {shown!r} is not a batch id; the file is corrupt: fix or delete "
                            "it, or pass --id BATCH_ID")
        ids.append(line)
    if not ids:
        raise UserError(f"{path} is empty; pass --id BATCH_ID, or submit a batch with --run")
    return ids


def save_batch_ids(path: str | os.PathLike, ids: list[str]) -> None:
    with atomic_writer(path) as handle:
        handle.write("".join(f"{batch_id}\n" for batch_id in ids))


def parse_ids(values: Iterable[str]) -> list[str]:
    ids = []
    for value in values:
        for batch_id in value.split(","):
            batch_id = batch_id.strip()
            if not BATCH_ID.match(batch_id):
                raise UserError(f"--id {batch_id!r} is not a batch id (like batch_abc123)")
            ids.append(batch_id)
    return ids


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
            for handler in logging.getLogger().handlers:
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

    def retrieve(self, batch_id: str):
        return self.call(f"batch {batch_id}", self.client.batches.retrieve, batch_id)

    def close(self) -> None:
        for handler, redact in self._filters:
            handler.removeFilter(redact)
        self._filters.clear()
        if self._client is not None:
            self._client.close()


# --- printing -------------------------------------------------------------------------


def _when(stamp: int | None) -> str:
    if not stamp:
        return "-"
    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _counts(batch) -> tuple[int, int, int]:
    counts = batch.request_counts
    if counts is None:
        return 0, 0, 0
    return counts.total or 0, counts.completed or 0, counts.failed or 0


def _file_id(value: str | None) -> str | None:
    """File ids can come back as empty strings: treat those as absent."""
    return value or None


def describe(batch) -> str:
    """A human summary of one batch: status, counts, times, files and validation errors."""
    total, completed, failed = _counts(batch)
    metadata = batch.metadata or {}
    note = ", ".join(f"{k}: {v}" for k, v in metadata.items())
    lines = [f"{batch.id}: {batch.status}" + (f"  ({note})" if note else "")]
    lines.append(f"  endpoint {batch.endpoint}" + (f", model {batch.model}" if batch.model else "")
                 + f", window {batch.completion_window}")
    lines.append(f"  requests: {total:,} total, {completed:,} completed, {failed:,} failed")
    stamps = [(name, getattr(batch, f"{name}_at", None)) for name in
              ("created", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")]
    lines.append("  times: " + "; ".join(f"{name} {_when(value)}" for name, value in stamps if value))
    if batch.status not in FINAL and batch.expires_at:
        lines.append(f"  expires {_when(batch.expires_at)} (unfinished requests are then dropped)")
    lines.append(f"  files: input {batch.input_file_id}, output {_file_id(batch.output_file_id) or '-'}, "
                 f"errors {_file_id(batch.error_file_id) or '-'}")
    usage = batch.usage
    if usage is not None and (usage.total_tokens or 0):
        lines.append(f"  usage: {usage.input_tokens:,} input + {usage.output_tokens:,} output tokens")
    errors = (batch.errors.data if batch.errors and batch.errors.data else [])
    if errors:
        lines.append("  input refused:")
        for error in errors:
            where = f"line {error.line}: " if error.line else ""
            lines.append(f"    {where}{error.code or 'error'}: {error.message}")
    return "\n".join(lines)


def validation_errors(batch, limit: int = 3) -> str:
    errors = (batch.errors.data if batch.errors and batch.errors.data else [])
    shown = "; ".join((f"line {e.line}: " if e.line else "") + f"{e.code}: {e.message}" for e in errors[:limit])
    more = f" (and {len(errors) - limit} more: see --check)" if len(errors) > limit else ""
    return (shown + more) or "no reason given"


# --- actions --------------------------------------------------------------------------


def submit(session: Session, input_path: str, description: str | None) -> list[str]:
    """Check every part locally, then upload and create one batch per part."""
    if description is not None and len(description) > 512:
        raise UserError(f"--description is {len(description)} characters; batch metadata values hold at most 512")
    files = batchfile.resolve_batch_files(input_path)
    summaries = [batchfile.check_batch_file(path) for path in files]
    client = session.client
    ids_file = Path(session.ids_file)
    if ids_file.exists():
        with contextlib.suppress(UserError):
            log.info("replacing the ids saved in %s (%s)", ids_file, ", ".join(load_batch_ids(ids_file)))
    ids: list[str] = []
    for summary in summaries:
        path = summary.path
        try:
            with open(path, "rb") as handle:  # streamed by the SDK, rewound on a retry
                uploaded = session.call(f"uploading {path}", client.files.create,
                                        file=(path.name, handle), purpose="batch")
            metadata = {"source_file": path.name[:512]}
            if description:
                metadata["description"] = description
            batch = session.call(f"creating the batch for {path}", client.batches.create,
                                 input_file_id=uploaded.id, endpoint=summary.url, completion_window="24h",
                                 metadata=metadata)
        except UserError as exc:
            if ids:
                raise UserError(f"{exc} ({len(ids)} batch(es) made before this one are saved in {ids_file}: "
                                "check or cancel them)") from None
            raise
        ids.append(batch.id)
        save_batch_ids(ids_file, ids)
        print(f"submitted {batch.id} for {path} ({summary.requests:,} requests, {summary.url}, {summary.model})")
    print(f"saved {len(ids)} batch id(s) in {ids_file}")
    return ids


def check(session: Session, ids: list[str], as_json: bool) -> list:
    batches = [session.retrieve(batch_id) for batch_id in ids]
    for batch in batches:
        print(json.dumps(batch.to_dict(mode="json"), separators=(",", ":")) if as_json else describe(batch))
    return batches


def cancel(session: Session, ids: list[str]) -> None:
    for batch_id in ids:
        batch = session.retrieve(batch_id)
        if batch.status in FINAL or batch.status == "cancelling":
            print(f"{batch_id}: already {batch.status}; nothing to cancel")
            continue
        batch = session.call(f"cancelling batch {batch_id}", session.client.batches.cancel, batch_id)
        total, completed, failed = _counts(batch)
        print(f"{batch_id}: {batch.status} ({completed + failed:,}/{total:,} requests done; finished ones are kept "
              "in its output file)")


def wait(session: Session, ids: list[str], poll_interval: float, sleep: Callable[[float], None] = time.sleep) -> list:
    """Poll until every batch is final, with a progress bar on the request counts.

    Ctrl+C stops waiting and leaves the batches alone.
    """
    bar = None
    try:
        batches = {batch_id: session.retrieve(batch_id) for batch_id in ids}
        for batch in batches.values():
            log.info("%s: %s", batch.id, batch.status)
        bar = cli.progress(total=sum(_counts(b)[0] for b in batches.values()) or None, desc="requests", unit="req")
        while True:
            done = sum(_counts(b)[1] + _counts(b)[2] for b in batches.values())
            bar.total = sum(_counts(b)[0] for b in batches.values()) or None
            if done > bar.n:
                bar.update(done - bar.n)
            if all(b.status in FINAL for b in batches.values()):
                break
            sleep(poll_interval)
            for batch_id, old in batches.items():
                if old.status in FINAL:
                    continue
                new = session.retrieve(batch_id)
                if new.status != old.status:
                    total, completed, failed = _counts(new)
                    log.info("%s: %s -> %s (%s/%s done, %s failed)", batch_id, old.status, new.status,
                             f"{completed + failed:,}", f"{total:,}", f"{failed:,}")
                batches[batch_id] = new
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        log.warning("stopped waiting; the batch(es) go on at the API: --check shows them, --wait waits again, "
                    "--cancel cancels them")
        raise
    bar.close()
    for batch in batches.values():
        total, completed, failed = _counts(batch)
        print(f"{batch.id}: {batch.status} ({completed:,} completed, {failed:,} failed of {total:,})")
        if batch.status == "failed":
            print(f"  input refused: {validation_errors(batch)}")
    return list(batches.values())


def wait_exit_status(batches: list) -> int:
    statuses = {b.status for b in batches}
    for status in ("failed", "expired", "cancelled"):
        if status in statuses:
            return EXIT_STATUS[status]
    return 0


def errors_path_for(output: Path) -> Path:
    return output.with_name(output.name + ".errors.jsonl")


def _error_code(line: dict) -> str:
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
    """A line is a success only with a response, status 200 and no error (FACTS: read both files)."""
    response = line.get("response")
    return isinstance(response, dict) and response.get("status_code") == 200 and line.get("error") is None


def stream_file(session: Session, file_id: str, handle, label: str) -> tuple[int, int]:
    """Append one API file to ``handle`` in chunks; returns (lines, bytes).

    A connection dropped mid-body restarts the file (up to --max_retries times) after
    cutting what it wrote; then the caller's temporary file is discarded. Errors before
    the body starts (404, 429 or 5xx after the SDK's own retries) are one-line errors.
    """
    import openai

    what = f"downloading {label} {file_id}"
    start = handle.tell()
    transport_errors = _transport_errors()
    for attempt in range(session.max_retries + 1):
        written = lines = 0
        last = b"\n"
        body_started = False
        try:
            with session.client.files.with_streaming_response.content(file_id) as response:
                body_started = True
                for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
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
                raise UserError(session.redact(session.explain(what, exc))) from None  # the SDK retried already
            handle.seek(start)
            handle.truncate()
            reason = session.redact(f"{type(exc).__name__}: {exc}")
            if attempt >= session.max_retries:
                raise UserError(f"{what}: the connection dropped after {written:,} bytes ({reason}); nothing was "
                                "saved; rerun the same command to download it again") from None
            delay = min(0.5 * 2 ** attempt, 8.0)
            log.warning("%s: connection dropped after %s bytes (%s); starting it again in %.1f s (retry %d of %d)",
                        what, f"{written:,}", reason, delay, attempt + 1, session.max_retries)
            time.sleep(delay)
        except openai.APIError as exc:
            raise UserError(session.redact(session.explain(what, exc))) from None
    raise AssertionError("unreachable")


def download(session: Session, ids: list[str], output: str | os.PathLike, batches: list | None = None,
             protected: Iterable[Path] = ()) -> int:
    """Save the output lines of every batch in OUTPUT and their error lines in
    OUTPUT.errors.jsonl: streamed, both written to temporary files and renamed at the end.

    Returns 0, or 3 when a batch failed validation (it has nothing to download).
    """
    output = cli.check_output_path(output, protected, flag="--download")
    errors_path = errors_path_for(output)
    batches = batches or [session.retrieve(batch_id) for batch_id in ids]
    for batch in batches:
        if batch.status not in FINAL:
            total, completed, failed = _counts(batch)
            raise UserError(f"batch {batch.id} is {batch.status} ({completed + failed:,}/{total:,} requests done); "
                            "nothing to download yet: wait for it with --wait (or cancel it with --cancel to keep "
                            "what is finished)")
    refused = [b for b in batches if b.status == "failed"]
    for batch in refused:
        message = f"batch {batch.id} failed: its input was refused ({validation_errors(batch)}); it has no results"
        if len(refused) == len(batches):
            raise UserError(message + "; fix the input file and --run it again")
        log.warning("%s", message)
    out_tmp, err_tmp = temp_path_beside(output), temp_path_beside(errors_path)
    out_lines = err_lines = 0
    try:
        with open(out_tmp, "wb") as out, open(err_tmp, "wb") as err:
            for batch in batches:
                if _file_id(batch.output_file_id):
                    lines, size = stream_file(session, batch.output_file_id, out, f"the output of {batch.id}")
                    out_lines += lines
                    log.info("%s: %s output lines (%s bytes)", batch.id, f"{lines:,}", f"{size:,}")
                elif batch.status != "failed":
                    log.info("%s: no output file (no request finished successfully)", batch.id)
                if _file_id(batch.error_file_id):
                    lines, _ = stream_file(session, batch.error_file_id, err, f"the errors of {batch.id}")
                    err_lines += lines
            for handle in (out, err):
                handle.flush()
                os.fsync(handle.fileno())
        codes = Counter(_error_code(line) for _, line in iter_jsonl_objects(err_tmp)) if err_lines else Counter()
        if errors_path.exists():
            log.info("removing %s from an earlier download", errors_path)
            errors_path.unlink()
        if err_lines:
            os.replace(err_tmp, errors_path)
        os.replace(out_tmp, output)
    finally:
        for tmp in (out_tmp, err_tmp):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    merged = f" (from {len(batches)} batches)" if len(batches) > 1 else ""
    print(f"saved {out_lines:,} output lines to {output}{merged}")
    if err_lines:
        detail = ", ".join(f"{count:,} {code}" for code, count in codes.most_common())
        print(f"saved {err_lines:,} failed requests to {errors_path} ({detail}); rebuild them with --retry_failed")
    else:
        print("no failed requests")
    return EXIT_STATUS["failed"] if refused else 0


def failed_ids_from_api(session: Session, ids: list[str]) -> Counter:
    """custom_id -> error code of every request the batches did not finish."""
    failed: dict[str, str] = {}
    for batch_id in ids:
        batch = session.retrieve(batch_id)
        if batch.status == "failed":
            raise UserError(f"batch {batch_id} failed as a whole ({validation_errors(batch)}); fix the input and "
                            "--run it again (--retry_failed rebuilds requests that failed inside a batch)")
        if batch.status not in FINAL:
            raise UserError(f"batch {batch_id} is {batch.status}; wait for it with --wait before --retry_failed")
        if not _file_id(batch.error_file_id):
            continue
        with tempfile.TemporaryDirectory(prefix="batch-errors-") as folder:
            tmp = Path(folder) / f"{batch_id}.errors.jsonl"
            with open(tmp, "wb") as handle:
                stream_file(session, batch.error_file_id, handle, f"the errors of {batch_id}")
            failed.update(_failures(tmp))
    return failed


def _failures(path: Path) -> dict[str, str]:
    failed = {}
    for line_number, line in iter_jsonl_objects(path):
        if not is_success(line):
            custom_id = line.get("custom_id")
            if not isinstance(custom_id, str):
                raise UserError(f"{path}:{line_number}: no custom_id; is this a Batch API error file?")
            failed[custom_id] = _error_code(line)
    return failed


def retry_failed(session: Session, ids: list[str] | None, input_path: str, output: str,
                 errors_file: str | None) -> int:
    """Write the requests of the input that failed or expired to ``output`` (split at the limits)."""
    inputs = batchfile.resolve_batch_files(input_path)
    output_path = cli.check_output_path(output, inputs, flag="--retry_failed")
    if output_path.suffix != ".jsonl":
        raise UserError(f"--retry_failed {output_path}: the Batch API takes .jsonl files only; end the name in .jsonl")
    failed = _failures(Path(errors_file)) if errors_file else failed_ids_from_api(session, ids or [])
    if not failed:
        print("no failed or expired requests; nothing to retry")
        return 0
    found: set[str] = set()
    with batchfile.BatchFileWriter(output_path) as writer:
        for path in inputs:
            for request in batchfile.iter_batch_requests(path):
                if request.custom_id in failed and request.custom_id not in found:
                    writer.add(batchfile.build_line(request.custom_id, request.url, request.body), request.where)
                    found.add(request.custom_id)
        missing = [custom_id for custom_id in failed if custom_id not in found]
        if missing:
            raise UserError(f"{len(missing):,} failed custom_id(s) are not in {input_path} (e.g. {missing[0]!r}); "
                            "pass the --file the batches were made from")
        paths = writer.commit()
    codes = Counter(failed.values())
    detail = ", ".join(f"{count:,} {code}" for code, count in codes.most_common())
    print(f"wrote {writer.count:,} requests that failed or expired ({detail}) to "
          f"{', '.join(map(str, paths))}; submit them with: python batch_utils.py --run --file {output_path}")
    return 0


def list_recent(session: Session, limit: int) -> None:
    saved: set[str] = set()
    with contextlib.suppress(UserError):
        saved = set(load_batch_ids(session.ids_file))
    rows = []
    page = session.call("listing batches", session.client.batches.list, limit=min(limit, 100))
    for batch in page:  # the SDK follows the cursor (after=...) page by page
        rows.append(batch)
        if len(rows) >= limit:
            break
    if not rows:
        print(f"no batches at {session.url}; submit one with: python batch_utils.py --run --file batchinput.jsonl")
        return
    print(f"{len(rows)} most recent batch(es) at {session.url} (* = saved in {session.ids_file}):")
    for batch in rows:
        total, completed, failed = _counts(batch)
        note = (batch.metadata or {}).get("description") or (batch.metadata or {}).get("source_file") or ""
        mark = "*" if batch.id in saved else " "
        print(f"{mark} {batch.id}  {batch.status:<11} {_when(batch.created_at)}  {batch.endpoint:<20} "
              f"{completed + failed:>6,}/{total:<6,} {note}".rstrip())


# --- the command ----------------------------------------------------------------------


def _protected_paths(args: argparse.Namespace) -> list[Path]:
    """Files a --download must never overwrite: the batch input, its parts, key and ids."""
    source = Path(args.file)
    candidates = [source, *batchfile.existing_parts(source), Path(args.ids_file), Path(KEY_FILE)]
    if args.key_file:
        candidates.append(Path(args.key_file))
    return [path for path in candidates if path.exists()]


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    check_combination(parser, args)
    session = Session(args.key_file, args.base_url, args.max_retries, args.ids_file)
    try:
        return _run(session, args)
    finally:
        session.close()


def _run(session: Session, args: argparse.Namespace) -> int:
    if args.retry_failed:
        ids = None if args.errors_file else (parse_ids(args.id) if args.id else load_batch_ids(args.ids_file))
        return retry_failed(session, ids, args.file, args.retry_failed, args.errors_file)
    if not (args.run or args.check or args.wait or args.cancel or args.download):
        list_recent(session, args.limit)
        return 0
    protected = _protected_paths(args)
    if args.download:  # refuse a bad output path before any upload or wait
        cli.check_output_path(args.download, protected, flag="--download")
    if args.run:
        ids = submit(session, args.file, args.description)
    else:
        ids = parse_ids(args.id) if args.id else load_batch_ids(args.ids_file)
    status = 0
    batches = None
    if args.cancel:
        cancel(session, ids)
    if args.wait:
        batches = wait(session, ids, args.poll_interval)
        status = wait_exit_status(batches)
    if args.check:
        batches = check(session, ids, args.json)
    if args.download:
        if batches is not None and all(b.status == "failed" for b in batches):
            return status  # nothing to download; --wait printed why
        download_status = download(session, ids, args.download, batches, protected)
        status = status or download_status
    return status
