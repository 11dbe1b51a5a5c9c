"""Raw results of both routes into one record per request: parse, classify, join, write.

Two kinds of raw result line are read, recognised from their keys:

- **OpenAI envelope** ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
  "error"}``: the Batch API's output file and its ``.errors.jsonl`` error file, and the same
  envelope written by other tools (vLLM's ``run-batch``, whose failures sit inline in the
  output file). A line is a success only if ``response`` is present, ``status_code`` is
  200 and ``error`` is null (FACTS.md).
- **Fine-tuned generations** ``{"custom_id", "generated_text", "finish_reason", ...,
  "source": "finetuned"}`` written by ``generate_data_finetuned.py`` (one file, or its
  shards ``STEM.shard-KKK-of-NNN.jsonl``).

Pieces, from the edges in:

- ``chat_answer`` / ``responses_answer`` / ``completions_answer`` / ``embeddings_answer``:
  pure functions from a response body to an ``Answer`` (texts in choice order, finish
  reasons, refusal, usage); ``body_answer`` picks one by the body's shape.
- ``openai_result`` / ``finetuned_result`` / ``parse_result``: one raw line into a
  ``Result``: the output record, or a failed record with its ``reason``.
- ``ResultStore``: an on-disk SQLite database (in ``$TMPDIR``) that holds every result
  and, when given, the original requests, so that shuffled results can be put back in
  the input order, deduplicated and checked for missing ids with flat memory.
- ``open_sink``: JSONL, CSV or Parquet output chosen by the file name.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from datagen.errors import UserError
from datagen.jsonl import atomic_writer, dumps, dumps_bytes, iter_jsonl_objects, loads

log = logging.getLogger("datagen")

OPENAI, FINETUNED = "openai", "finetuned"
SOURCE_TYPES = ("auto", OPENAI, FINETUNED)
KIND_NAMES = {OPENAI: "an OpenAI batch result line (custom_id, response, error)",
              FINETUNED: "a fine-tuned generations line (custom_id, generated_text)"}
OUTPUT_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")

# Output columns, in this order, in every reformatted file of every route (see the
# module docstring); ``--keep_fields`` columns come after them.
COLUMNS = ("id", "generated_text", "source", "model", "adapter", "finish_reason", "refusal",
           "prompt_tokens", "completion_tokens", "reasoning_tokens", "samples", "details")
FAILED_COLUMNS = ("id", "reason", "status_code", "error_code", "message")


# --- response bodies into answers (pure) -------------------------------------------


@dataclass
class Answer:
    """What one response body says, endpoint-independent."""

    texts: list[str] = field(default_factory=list)  # one per choice/sample, in index order
    finish_reasons: list[str | None] = field(default_factory=list)  # normalised: stop, length, ...
    refusal: bool = False  # the model refused; its refusal message is the text
    tool_calls: list | None = None  # chat tool calls, when the answer is a call
    embeddings: list | None = None  # embeddings endpoint: the vectors in index order
    usage: dict = field(default_factory=dict)  # prompt_tokens, completion_tokens, reasoning_tokens
    model: str | None = None
    error: tuple[str | None, str] | None = None  # (code, message) of a body that says it failed


def usage_fields(usage: Any) -> dict:
    """Token usage under one set of names, only those the body reports.

    chat/completions/embeddings: ``prompt_tokens``, ``completion_tokens``,
    ``completion_tokens_details.reasoning_tokens``; responses: ``input_tokens``,
    ``output_tokens``, ``output_tokens_details.reasoning_tokens``.
    """
    if not isinstance(usage, dict):
        return {}
    out = {}
    for name, keys in (("prompt_tokens", ("prompt_tokens", "input_tokens")),
                       ("completion_tokens", ("completion_tokens", "output_tokens"))):
        for key in keys:
            if isinstance(usage.get(key), int):
                out[name] = usage[key]
                break
    for key in ("completion_tokens_details", "output_tokens_details"):
        details = usage.get(key)
        if isinstance(details, dict) and isinstance(details.get("reasoning_tokens"), int):
            out["reasoning_tokens"] = details["reasoning_tokens"]
            break
    return out


def _by_index(items: list) -> list:
    if len(items) > 1 and all(isinstance(item, dict) and isinstance(item.get("index"), int) for item in items):
        return sorted(items, key=lambda item: item["index"])
    return items


def _content_text(content: Any) -> str | None:
    """Message content: a string, or (some compatible servers) a list of text parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content
                       if isinstance(part, dict) and part.get("type") in ("text", "output_text"))
    return str(content)


def chat_answer(body: dict) -> Answer:
    """``/v1/chat/completions``: ``choices[i].message.content``.

    Content may be null: with ``refusal`` the refusal message becomes the text (and
    ``refusal`` is set); with ``tool_calls`` the text is "" and the calls are kept.
    """
    answer = Answer(model=body.get("model"), usage=usage_fields(body.get("usage")))
    for choice in _by_index(body.get("choices") or []):
        message = choice.get("message") or {}
        text = _content_text(message.get("content"))
        if text is None and isinstance(message.get("refusal"), str):
            text, answer.refusal = message["refusal"], True
        if message.get("tool_calls"):
            answer.tool_calls = (answer.tool_calls or []) + list(message["tool_calls"])
        answer.texts.append(text if text is not None else "")
        answer.finish_reasons.append(choice.get("finish_reason"))
    return answer


RESPONSES_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}


def responses_answer(body: dict) -> Answer:
    """``/v1/responses``: the ``output_text`` parts of ``message`` items, joined.

    ``reasoning`` items are skipped; the text equals the SDK's ``response.output_text``.
    ``status`` becomes a finish reason: completed -> stop; incomplete because of
    max_output_tokens -> length (content_filter -> content_filter); failed -> an error.
    """
    answer = Answer(model=body.get("model"), usage=usage_fields(body.get("usage")))
    texts, refusals = [], []
    for item in body.get("output") or []:
        if not isinstance(item, dict) or item.get("type") != "message":
            continue
        for part in item.get("content") or []:
            if isinstance(part, dict) and part.get("type") == "output_text":
                texts.append(part.get("text") or "")
            elif isinstance(part, dict) and part.get("type") == "refusal":
                refusals.append(part.get("refusal") or "")
    if not texts and refusals:
        texts, answer.refusal = refusals, True
    answer.texts = ["".join(texts)]
    status = body.get("status")
    if status in ("failed", "cancelled"):
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        answer.error = (error.get("code") or status, error.get("message") or f"the response's status is {status}")
    elif status == "incomplete":
        reason = (body.get("incomplete_details") or {}).get("reason")
        answer.finish_reasons = [RESPONSES_INCOMPLETE.get(reason, reason or "incomplete")]
    else:
        answer.finish_reasons = ["stop"]
    return answer


def completions_answer(body: dict) -> Answer:
    """``/v1/completions``: ``choices[i].text``."""
    answer = Answer(model=body.get("model"), usage=usage_fields(body.get("usage")))
    for choice in _by_index(body.get("choices") or []):
        answer.texts.append(choice.get("text") or "")
        answer.finish_reasons.append(choice.get("finish_reason"))
    return answer


def embeddings_answer(body: dict) -> Answer:
    """``/v1/embeddings``: ``data[i].embedding``, kept as vectors (no text)."""
    data = _by_index([item for item in body.get("data") or [] if isinstance(item, dict)])
    return Answer(model=body.get("model"), usage=usage_fields(body.get("usage")),
                  embeddings=[item.get("embedding") for item in data])


def body_endpoint(body: Any) -> str | None:
    """Which endpoint answered, from the body's ``object`` or else its shape."""
    if not isinstance(body, dict):
        return None
    kind = body.get("object")
    if kind == "chat.completion":
        return "chat"
    if kind == "response":
        return "responses"
    if kind == "text_completion":
        return "completions"
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return "chat" if "message" in choices[0] else "completions" if "text" in choices[0] else None
    if isinstance(body.get("output"), list):
        return "responses"
    data = body.get("data")
    if isinstance(data, list) and (not data or isinstance(data[0], dict) and "embedding" in data[0]):
        return "embeddings"
    if isinstance(choices, list):
        return "chat"
    return None


EXTRACTORS = {"chat": chat_answer, "responses": responses_answer, "completions": completions_answer,
              "embeddings": embeddings_answer}


def body_answer(body: Any, where: str) -> Answer:
    endpoint = body_endpoint(body)
    if endpoint is None:
        keys = ", ".join(list(body)[:10]) if isinstance(body, dict) else type(body).__name__
        raise UserError(f"{where}: the response body is not a chat, responses, completions or embeddings "
                        f"answer (it has {keys}); reformat_results.py reads those endpoints only")
    return EXTRACTORS[endpoint](body)


# --- raw lines into results ----------------------------------------------------------


@dataclass(frozen=True)
class ResultOptions:
    treat_length_as_failure: bool = False  # finish_reason "length": to the failed file
    treat_empty_as_failure: bool = False  # empty text: to the failed file


@dataclass
class Result:
    custom_id: str
    ok: bool
    record: dict  # the output record, or the failed record (with "reason")
    cut_off: bool = False  # some sample ended at the token limit
    empty: bool = False  # some sample is empty text
    refusal: bool = False


def line_kind(obj: dict) -> str | None:
    """``"openai"``, ``"finetuned"`` or None for a line of neither known kind."""
    if obj.get("source") == FINETUNED:  # a fine-tuned record, failed ones ("error") included
        return FINETUNED
    if "response" in obj or ("error" in obj and "custom_id" in obj and "generated_text" not in obj):
        return OPENAI
    if "generated_text" in obj:
        return FINETUNED
    return None


def failed_record(custom_id: str, reason: str, *, status_code: int | None = None,
                  error_code: Any = None, message: str | None = None, **more: Any) -> dict:
    """One line of the failed file: id, reason, status_code, error_code, message (+ more)."""
    record = {"id": custom_id, "reason": reason, "status_code": status_code,
              "error_code": error_code, "message": message}
    record.update(more)
    return record


def _error_parts(error: Any) -> tuple[Any, str | None]:
    """(code, message) from an error value: OpenAI's {code, message}, vLLM's string or
    ErrorResponse ({message, type, code} or {"error": {...}})."""
    if error is None:
        return None, None
    if isinstance(error, str):
        return None, error
    if isinstance(error, dict):
        inner = error.get("error") if isinstance(error.get("error"), dict) else error
        code = inner.get("code")
        if code is None or isinstance(code, int):
            code = inner.get("type") or code
        message = inner.get("message")
        return code, message if isinstance(message, str) or message is None else str(message)
    return None, str(error)


def output_record(custom_id: str, texts: list[str], finish_reasons: list, *, source: str, model: Any,
                  adapter: Any = None, refusal: bool = False, usage: dict | None = None,
                  details: dict | None = None) -> dict:
    """The one output record of every route: every column of COLUMNS, none null.

    JSON has no types, so a column that is null in a file's first lines has none
    (``datasets`` then refuses the next file that has a value there): absent text is "",
    absent counts 0, and ``samples`` always holds every sample (one when n = 1).
    """
    usage = usage or {}
    return {"id": custom_id, "generated_text": texts[0] if texts else "", "source": source,
            "model": model if isinstance(model, str) else "", "adapter": adapter if isinstance(adapter, str) else "",
            "finish_reason": (finish_reasons[0] if finish_reasons else None) or "", "refusal": refusal,
            "prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0),
            "reasoning_tokens": usage.get("reasoning_tokens", 0),
            "samples": [{"text": text, "finish_reason": reason or ""} for text, reason in zip(texts, finish_reasons)],
            "details": dumps(details or {})}


def _answer_record(custom_id: str, answer: Answer, endpoint: str) -> dict:
    details: dict[str, Any] = {"endpoint": endpoint}
    if answer.tool_calls:
        details["tool_calls"] = answer.tool_calls
    texts, reasons = answer.texts, answer.finish_reasons
    if answer.embeddings is not None:  # no text: the vectors go to details
        details["embeddings"] = answer.embeddings
        texts, reasons = [""], [""]
    elif len(reasons) < len(texts):
        reasons = reasons + [None] * (len(texts) - len(reasons))
    return output_record(custom_id, texts, reasons, source=OPENAI, model=answer.model, refusal=answer.refusal,
                         usage=answer.usage, details=details)


def _judge(custom_id: str, answer: Answer, record: dict, options: ResultOptions) -> Result:
    """Success, or a failure when asked for cut-off / empty answers (any sample counts)."""
    if answer.embeddings is not None:
        return Result(custom_id, True, record)
    cut_off = "length" in answer.finish_reasons
    texts = answer.texts
    empty = (not texts or any(not text.strip() for text in texts)) and not answer.refusal and not answer.tool_calls
    result = Result(custom_id, True, record, cut_off=cut_off, empty=empty, refusal=answer.refusal)
    if cut_off and options.treat_length_as_failure:
        n = len(answer.texts)
        message = "the answer was cut off at the token limit (finish_reason length)" if n == 1 else \
            f"{answer.finish_reasons.count('length')} of {n} samples were cut off at the token limit"
        result.ok = False
        result.record = failed_record(custom_id, "length", message=message,
                                      **{k: v for k, v in record.items() if k != "id"})
    elif empty and options.treat_empty_as_failure:
        result.ok = False
        result.record = failed_record(custom_id, "empty", message="the answer is empty",
                                      **{k: v for k, v in record.items() if k != "id"})
    return result


def openai_result(obj: dict, where: str, options: ResultOptions = ResultOptions()) -> Result:
    """One OpenAI-envelope line (output file, error file, vLLM run-batch) into a Result."""
    custom_id = obj.get("custom_id")
    if custom_id is None:
        custom_id = ""  # the Batch API can return failures without an id
    if not isinstance(custom_id, str):
        raise UserError(f"{where}: custom_id must be a string, got {type(custom_id).__name__}")
    response, error = obj.get("response"), obj.get("error")
    if response is not None and not isinstance(response, dict):
        raise UserError(f"{where}: \"response\" must be an object or null, got {type(response).__name__}")
    status = response.get("status_code") if response else None
    body = response.get("body") if response else None
    if response is None or status != 200 or error is not None or body is None:
        code, message = _error_parts(error)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            body_code, body_message = _error_parts(body["error"])
            code, message = code or body_code, message or body_message
        if message is None:
            message = ("no response and no error message" if response is None else
                       f"HTTP status {status}" if status != 200 else "status 200 but no response body")
        return Result(custom_id, False, failed_record(custom_id, "error", status_code=status, error_code=code,
                                                      message=message, source=OPENAI))
    answer = body_answer(body, where)  # raises for an unknown body: body_endpoint is known below
    if answer.error is not None:
        code, message = answer.error
        return Result(custom_id, False, failed_record(custom_id, "error", status_code=status, error_code=code,
                                                      message=message, source=OPENAI, model=answer.model))
    return _judge(custom_id, answer, _answer_record(custom_id, answer, body_endpoint(body)), options)


def finetuned_answer(obj: dict, where: str) -> Answer:
    """A fine-tuned generations line into an Answer (``samples`` when n > 1)."""
    text = obj.get("generated_text")
    if not isinstance(text, str):
        raise UserError(f"{where}: generated_text must be text, got {type(text).__name__}")
    answer = Answer(texts=[text], finish_reasons=[obj.get("finish_reason")], model=obj.get("model"),
                    usage={k: obj[k] for k in ("prompt_tokens", "completion_tokens") if isinstance(obj.get(k), int)})
    samples = obj.get("samples")
    if samples is not None:
        if not isinstance(samples, list) or not all(isinstance(s, dict) and isinstance(s.get("text"), str)
                                                    for s in samples):
            raise UserError(f"{where}: samples must be a list of {{text, finish_reason, completion_tokens}} objects")
        if len(samples) > 1:
            answer.texts = [sample["text"] for sample in samples]
            answer.finish_reasons = [sample.get("finish_reason") for sample in samples]
    return answer


FINETUNED_DETAILS = ("model_sha256", "adapter_sha256", "engine", "generation", "fingerprint",
                     "ignored_fields", "created")


def finetuned_result(obj: dict, where: str, options: ResultOptions = ResultOptions()) -> Result:
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise UserError(f"{where}: a fine-tuned generations line needs a non-empty custom_id string")
    if obj.get("error"):
        code, message = _error_parts(obj["error"])
        return Result(custom_id, False, failed_record(custom_id, "error", error_code=code, message=message,
                                                      source=FINETUNED, model=obj.get("model"),
                                                      adapter=obj.get("adapter")))
    answer = finetuned_answer(obj, where)
    details = {key: obj[key] for key in FINETUNED_DETAILS if key in obj}
    samples = obj.get("samples")
    if isinstance(samples, list) and len(samples) > 1:
        details["sample_completion_tokens"] = [sample.get("completion_tokens") for sample in samples]
    record = output_record(custom_id, answer.texts, answer.finish_reasons, source=FINETUNED, model=answer.model,
                           adapter=obj.get("adapter"), usage=answer.usage, details=details)
    return _judge(custom_id, answer, record, options)


PARSERS = {OPENAI: openai_result, FINETUNED: finetuned_result}


# --- input files ----------------------------------------------------------------------

_SHARD = re.compile(r"\.shard-(\d+)-of-(\d+)$")


def expand_inputs(patterns: Iterable[str]) -> list[Path]:
    """Paths and globs into files, in the order given (a glob's matches sorted).

    A missing ``generations.jsonl`` whose shards ``generations.shard-*-of-*.jsonl``
    exist stands for them; an OpenAI output file brings its ``.errors.jsonl`` along.
    The same file named twice is read once.
    """
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            raise UserError(f"--input_file {pattern} is a directory; name the results files or a glob")
        elif glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
            if not matches:
                raise UserError(f"--input_file {pattern} matches no file; check the pattern")
        else:
            matches = sorted(path.parent.glob(f"{glob.escape(path.stem)}.shard-*-of-*{path.suffix}"))
            if not matches:
                raise UserError(f"--input_file {pattern}: no such file; check the path")
            log.info("%s does not exist: reading its %d shards %s ...", path, len(matches), matches[0].name)
        for match in matches:
            found.append(match)
            errors = match.with_name(match.name + ".errors.jsonl")
            if not match.name.endswith(".errors.jsonl") and errors.is_file():
                found.append(errors)
    unique: list[Path] = []
    seen: set = set()
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    extra = [p for p in unique if p.name.endswith(".errors.jsonl") and not any(
        Path(q).resolve() == p.resolve() for q in patterns)]
    for path in extra:
        log.info("also reading %s, the error file beside the output", path)
    check_shards(unique)
    return unique


def check_shards(paths: list[Path]) -> None:
    """Warn when some shards of a SLURM array are not among the inputs."""
    groups: dict[tuple[str, int], set[int]] = {}
    for path in paths:
        match = _SHARD.search(path.stem)
        if match:
            key = (str(path.parent / (path.stem[:match.start()] + path.suffix)), int(match.group(2)))
            groups.setdefault(key, set()).add(int(match.group(1)))
    for (stem, total), got in groups.items():
        if len(got) < total:
            log.warning("only %d of %d shards of %s are given; the others' requests will be missing",
                        len(got), total, stem)


# --- the on-disk store ----------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]+")


def _pad_number(match: re.Match) -> str:
    digits = match.group().lstrip("0") or "0"
    return f"{min(len(digits), 99):02d}{digits}"


def natural_key(custom_id: str) -> str:
    """A sort key where digit runs compare as numbers: request-2 before request-10."""
    return _DIGITS.sub(_pad_number, custom_id)


@dataclass
class Counts:
    lines: int = 0
    cut_off: int = 0
    empty: int = 0
    refusals: int = 0
    keys: dict = field(default_factory=dict)  # output record keys in first-seen order


class ResultStore:
    """Results (and the original requests) on disk, for ordering, deduplication and
    missing-id checks without holding them in memory.

    Each result's output record is appended to a spool file; a temporary SQLite
    database holds one small row per result (custom_id, ok, offset, length) and one per
    original request (position, custom_id, kept fields). Both live in a folder under
    ``$TMPDIR`` (or ``tmp_dir``) that ``close()`` removes, on every way out: errors,
    SIGTERM (``cli.Terminated``) and Ctrl+C included. A full disk there (SQLite's
    "database or disk is full", or a failed spool write) is a ``UserError`` naming the folder.
    """

    BATCH = 10_000

    def __init__(self, tmp_dir: str | None = None):
        from datagen.cli import held_signals

        self.tmp_dir = Path(tmp_dir or tempfile.gettempdir())
        self.folder = self.spool = self.db = None
        self.spool_size = 0
        self.has_inputs = False
        self.indexed = False
        try:
            with self._faults():
                with held_signals():  # recorded for close() before a signal can stop us
                    self.folder = Path(tempfile.mkdtemp(prefix="reformat-results-", dir=self.tmp_dir))
                self.spool = open(self.folder / "records.bin", "w+b")
                self.db = sqlite3.connect(self.folder / "index.sqlite", isolation_level=None)
                self.db.create_function("natural_key", 1, natural_key, deterministic=True)
                for pragma in ("journal_mode = OFF", "synchronous = OFF", "locking_mode = EXCLUSIVE",
                               "cache_size = -32768", "temp_store = FILE"):
                    self.db.execute(f"PRAGMA {pragma}")
                self.db.execute("CREATE TABLE results (custom_id TEXT NOT NULL, ok INTEGER NOT NULL, "
                                "offset INTEGER NOT NULL, length INTEGER NOT NULL)")
                self.db.execute("CREATE TABLE inputs (pos INTEGER PRIMARY KEY, custom_id TEXT NOT NULL, "
                                "src TEXT NOT NULL, keep BLOB)")
        except BaseException:
            self.close()
            raise

    def _fault(self, exc: Exception) -> UserError:
        """A fault of the temporary folder (SQLite or OS) as one line naming it."""
        import errno

        from datagen.cli import describe_os_error

        if isinstance(exc, sqlite3.OperationalError):
            if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL and "full" not in str(exc):
                return UserError(f"temporary folder {self.tmp_dir}: SQLite error ({exc}); "
                                 "point TMPDIR at a local, writable folder")
            exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return UserError(f"temporary folder (TMPDIR) {describe_os_error(exc, self.tmp_dir)}")

    @contextlib.contextmanager
    def _faults(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.OperationalError, OSError) as exc:
            raise self._fault(exc) from None

    def close(self) -> None:
        """Remove the folder and all in it; safe to call twice, never fails."""
        from datagen.cli import held_signals

        with held_signals():  # a second signal must not leave the folder behind
            for thing in (self.db, self.spool):
                with contextlib.suppress(Exception):
                    thing.close()
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _insert(self, sql: str, rows: Iterable[tuple]) -> int:
        # Only SQLite's errors are the folder's: ``rows`` reads the user's files.
        count, batch = 0, []
        try:
            self.db.execute("BEGIN")
            for row in rows:
                batch.append(row)
                if len(batch) >= self.BATCH:
                    self.db.executemany(sql, batch)
                    count += len(batch)
                    batch.clear()
            if batch:
                self.db.executemany(sql, batch)
                count += len(batch)
            self.db.execute("COMMIT")  # not on failure: the store is thrown away then
        except sqlite3.OperationalError as exc:
            raise self._fault(exc) from None
        return count

    def _spooled(self, rows: Iterable[tuple[str, bool, bytes]]) -> Iterator[tuple[str, bool, int, int]]:
        write, offset = self.spool.write, self.spool_size
        for custom_id, ok, record in rows:
            try:
                write(record)
            except OSError as exc:  # disk full: a write error names no file
                raise self._fault(exc) from None
            yield custom_id, ok, offset, len(record)
            offset += len(record)
        self.spool_size = offset

    def add_results(self, rows: Iterable[tuple[str, bool, bytes]]) -> int:
        """``(custom_id, ok, record_json_bytes)`` rows, in reading order."""
        return self._insert("INSERT INTO results VALUES (?, ?, ?, ?)", self._spooled(rows))

    def add_inputs(self, rows: Iterable[tuple[str, str, bytes | None]]) -> int:
        """``(custom_id, where, keep_json_bytes)`` rows of the original requests, in order."""
        self.has_inputs = True
        return self._insert("INSERT INTO inputs (custom_id, src, keep) VALUES (?, ?, ?)", rows)

    def _index(self) -> None:
        if not self.indexed:
            with self._faults():
                self.db.execute("CREATE INDEX results_by_id ON results (custom_id, ok DESC)")
                self.db.execute("CREATE INDEX inputs_by_id ON inputs (custom_id)")
            self.indexed = True

    def check_unique_inputs(self, flag: str) -> None:
        self._index()
        with self._faults():
            row = self.db.execute("SELECT custom_id FROM inputs GROUP BY custom_id HAVING COUNT(*) > 1 "
                                  "ORDER BY MIN(pos) LIMIT 1").fetchone()
            if row:
                first, second = [r[0] for r in self.db.execute(
                    "SELECT src FROM inputs WHERE custom_id = ? ORDER BY pos LIMIT 2", row)]
        if row:
            raise UserError(f"{second}: duplicate custom_id {row[0]!r} in {flag} (first at {first}); "
                            "ids must be unique to join results to requests")

    def extra_count(self) -> int:
        self._index()
        with self._faults():
            return self.db.execute("SELECT COUNT(DISTINCT custom_id) FROM results r WHERE NOT EXISTS "
                                   "(SELECT 1 FROM inputs i WHERE i.custom_id = r.custom_id)").fetchone()[0]

    def rows(self) -> Iterator[tuple[str, bytes | None, int | None, int | None, int | None]]:
        """``(custom_id, keep_json, ok, offset, length)``: every stored result (ok None for
        an input without one), grouped by id with the success first, then the first read.

        With inputs: in input order, then results whose id is not among the inputs.
        Without: in natural order of custom_id.
        """
        self._index()
        natural = "ORDER BY natural_key(r.custom_id), r.custom_id, r.ok DESC, r.rowid"
        columns = "r.custom_id, NULL, r.ok, r.offset, r.length"
        # The consumer's exceptions never pass through here: only the store's own are caught.
        with self._faults():
            self.spool.flush()
            if not self.has_inputs:
                yield from self.db.execute(f"SELECT {columns} FROM results r {natural}")
                return
            yield from self.db.execute(
                "SELECT i.custom_id, i.keep, r.ok, r.offset, r.length FROM inputs i "
                "LEFT JOIN results r ON r.custom_id = i.custom_id ORDER BY i.pos, r.ok DESC, r.rowid")
            yield from self.db.execute(
                f"SELECT {columns} FROM results r WHERE NOT EXISTS "
                f"(SELECT 1 FROM inputs i WHERE i.custom_id = r.custom_id) {natural}")

    def record(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self.spool.fileno(), length, offset)
        except OSError as exc:
            raise self._fault(exc) from None


@dataclass
class Duplicates:
    ids: int = 0  # custom_ids read more than once
    success_won: int = 0  # ... where a success replaced a failure
    example: str | None = None


def pick(rows: Iterable[tuple], duplicates: Duplicates) -> Iterator[tuple]:
    """Keep the first row of each custom_id group (the success if any, else the first
    read). An empty custom_id is never merged: each such failure stays its own line."""
    previous, chosen_ok, counted = None, None, False
    for row in rows:
        custom_id, ok = row[0], row[2]
        if custom_id == previous and custom_id != "":
            if not counted:
                duplicates.ids += 1
                duplicates.example = duplicates.example or custom_id
                counted = True
                if chosen_ok and not ok:
                    duplicates.success_won += 1
            continue
        previous, chosen_ok, counted = custom_id, ok, False
        yield row


# --- output files -----------------------------------------------------------------------


def output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise UserError(f"--output_file {path}: cannot tell the format from {suffix or 'no extension'}; "
                    "end the name in .jsonl, .csv, .tsv or .parquet")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return dumps(value)
    return str(value)


def arrow_types(keep_types: dict[str, set[str]] | None = None, columns: Iterable[str] = COLUMNS) -> dict:
    """The Arrow type of each output column; a kept field's by the Python types seen in
    it (only ints: int64; numbers: float64; only bools: bool; else text, JSON text for
    anything not a string). ``prompt`` is always a list of {role, content}."""
    import pyarrow as pa

    fixed = {"refusal": pa.bool_(), "prompt_tokens": pa.int64(), "completion_tokens": pa.int64(),
             "reasoning_tokens": pa.int64(),
             "samples": pa.list_(pa.struct([("text", pa.string()), ("finish_reason", pa.string())])),
             PROMPT_FIELD: pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))}
    types = {name: fixed.get(name, pa.string()) for name in columns}
    for name, seen in (keep_types or {}).items():
        if name == PROMPT_FIELD:
            continue
        kinds = seen - {"NoneType"}
        types[name] = (pa.bool_() if kinds == {"bool"} else pa.int64() if kinds == {"int"} else
                       pa.float64() if kinds and kinds <= {"int", "float"} else pa.string())
    return types


class Sink:
    """Writes rows to JSONL, CSV or Parquet: ``write(row_json, keep_json)`` (bytes of JSON
    objects; ``keep_json`` is appended to the row). Parquet columns have ``types``
    (Arrow); a value that is not a string in a string column is written as JSON text."""

    def __init__(self, handle, fmt: str, columns: list[str], types: dict, delimiter: str = ","):
        self.handle, self.fmt, self.columns = handle, fmt, columns
        self.count = 0
        self.rows: list[dict] = []
        if fmt == "csv":
            self.writer = csv.writer(handle, delimiter=delimiter, lineterminator="\n")
            self.writer.writerow(columns)
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.pa = pa
            self.schema = pa.schema([(name, types.get(name, pa.string())) for name in columns])
            self.text_columns = {name for name in columns if self.schema.field(name).type == pa.string()}
            self.writer = pq.ParquetWriter(handle, self.schema)

    def write(self, record_json: bytes, keep_json: bytes | None = None) -> None:
        self.count += 1
        if self.fmt == "jsonl":
            if keep_json and keep_json != b"{}":
                self.handle.write(record_json[:-1] + b"," + keep_json[1:] + b"\n")
            else:
                self.handle.write(record_json + b"\n")
            return
        record = loads(record_json)
        if keep_json:
            record.update(loads(keep_json))
        if self.fmt == "csv":
            self.writer.writerow([_cell(record.get(name)) for name in self.columns])
            return
        self.rows.append(record)
        if len(self.rows) >= 10_000:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        data = {}
        for name in self.columns:
            values = [row.get(name) for row in self.rows]
            if name in self.text_columns:
                values = [v if v is None or isinstance(v, str) else dumps(v) for v in values]
            data[name] = values
        self.writer.write_table(self.pa.Table.from_pydict(data, schema=self.schema))
        self.rows.clear()

    def close(self) -> None:
        if self.fmt == "parquet":
            self._flush()
            self.writer.close()


@contextlib.contextmanager
def open_sink(path: Path, columns: list[str], types: dict | None = None) -> Iterator[Sink]:
    """A Sink over a temporary file beside ``path``, renamed into place on success.
    ``types``: Arrow types by column, for Parquet (``arrow_types``; default all text)."""
    fmt = output_format(path)
    if fmt == "parquet" and types is None:
        types = arrow_types(columns=columns)
    mode = "w" if fmt == "csv" else "wb"
    with atomic_writer(path, mode) as handle:
        sink = Sink(handle, fmt, columns, types or {}, "\t" if path.suffix.lower() == ".tsv" else ",")
        yield sink
        sink.close()


# --- the original requests ----------------------------------------------------------------

PROMPT_FIELD = "prompt"  # the --keep_fields name for the prompt as sent


def batch_input_requests(path: str | os.PathLike) -> Iterator[tuple[str, str, dict]]:
    """``(custom_id, where, fields)`` of a batch input file (or its numbered parts).

    ``fields`` are the request body's fields plus ``prompt``: the messages (chat), the
    input (responses, embeddings) or the prompt (completions) that was sent. Only what
    the join needs is checked (an object with a custom_id and a body), so that reading a
    million requests stays fast; create_batchinput.py checked the rest when it wrote them.
    """
    from datagen.batchfile import resolve_batch_files

    for part in resolve_batch_files(path):
        for line_number, obj in iter_jsonl_objects(part):
            custom_id, body = obj.get("custom_id"), obj.get("body")
            if not isinstance(custom_id, str) or not custom_id or not isinstance(body, dict):
                raise UserError(f"{part}:{line_number}: not a batch request line; a batch line is "
                                '{"custom_id", "method": "POST", "url", "body"} (make it with create_batchinput.py)')
            prompt = next((body[key] for key in ("messages", "input", "prompt") if key in body), None)
            yield custom_id, f"{part}:{line_number}", {**body, PROMPT_FIELD: prompt}


def prompts_file_requests(prompts: Iterable) -> Iterator[tuple[str, str, dict]]:
    """``(custom_id, where, fields)`` of a prompts file's ``Prompt``s: the row's fields,
    with ``prompt`` the prompt as sent (template filled; a conversation as its messages)."""
    for prompt in prompts:
        text = prompt.text if prompt.text is not None else prompt.messages
        yield prompt.custom_id, prompt.where, {**prompt.row, PROMPT_FIELD: text}


# --- the whole step ------------------------------------------------------------------------


@dataclass
class Summary:
    ok: int = 0
    failed: int = 0
    missing: int = 0
    extra: int = 0  # result ids not among the original requests (written after them)
    files: int = 0
    counts: Counts = field(default_factory=Counts)
    duplicates: Duplicates = field(default_factory=Duplicates)


class KindCheck:
    """All lines must be of one kind: the one --source_type names, or (auto) the first's."""

    def __init__(self, source_type: str):
        self.source_type = source_type
        self.kind = None if source_type == "auto" else source_type
        self.first_where = None

    def check(self, obj: dict, where: str) -> str:
        kind = line_kind(obj)
        if kind is None:
            keys = ", ".join(list(obj)[:10]) or "none"
            raise UserError(f"{where}: neither {KIND_NAMES[OPENAI]} nor {KIND_NAMES[FINETUNED]}; "
                            f"the line has keys: {keys}; check --input_file")
        if kind != self.kind:
            if self.kind is None:
                self.kind, self.first_where = kind, where
            elif self.first_where is None:
                raise UserError(f"{where}: {KIND_NAMES[kind]}, but --source_type is {self.source_type}; "
                                f"pass --source_type {kind} (or auto) or leave this file out")
            else:
                raise UserError(f"{where}: {KIND_NAMES[kind]}, but {self.first_where} is "
                                f"{KIND_NAMES[self.kind]}; reformat each route's results separately, "
                                "one --output_file per route")
        return kind


def fast_chat_record(obj: dict) -> dict | None:
    """The common line, built directly: a one-choice chat success with text that ended
    with "stop". None for anything else, which the general path (``openai_result``) takes;
    both give the same record (tested)."""
    response = obj.get("response")
    if obj.get("error") is not None or type(response) is not dict or response.get("status_code") != 200:
        return None
    body = response.get("body")
    if type(body) is not dict or body.get("object") != "chat.completion":
        return None
    choices = body.get("choices")
    if type(choices) is not list or len(choices) != 1 or type(choices[0]) is not dict:
        return None
    choice = choices[0]
    message, custom_id = choice.get("message"), obj.get("custom_id")
    if type(message) is not dict or type(custom_id) is not str or choice.get("finish_reason") != "stop":
        return None
    content = message.get("content")
    if type(content) is not str or not content or content.isspace() or message.get("tool_calls"):
        return None
    return output_record(custom_id, [content], ["stop"], source=OPENAI, model=body.get("model"),
                         usage=usage_fields(body.get("usage")), details={"endpoint": "chat"})


def _parse_files(paths: list[Path], kinds: KindCheck, options: ResultOptions,
                 counts: Counts) -> Iterator[tuple[str, bool, str]]:
    from datagen.cli import progress

    shapes: set = set()
    for path in paths:
        for line_number, obj in progress(iter_jsonl_objects(path), desc=f"reading {path.name}", unit="line"):
            counts.lines += 1
            if kinds.kind == OPENAI and "response" in obj:
                record = fast_chat_record(obj)
                if record is not None:
                    shape = tuple(record)
                    if shape not in shapes:
                        shapes.add(shape)
                        counts.keys.update(dict.fromkeys(shape))
                    yield record["id"], True, dumps_bytes(record)
                    continue
            where = f"{path}:{line_number}"
            result = PARSERS[kinds.check(obj, where)](obj, where, options)
            counts.cut_off += result.cut_off
            counts.empty += result.empty
            counts.refusals += result.refusal
            if result.ok:
                shape = tuple(result.record)
                if shape not in shapes:
                    shapes.add(shape)
                    counts.keys.update(dict.fromkeys(shape))
            yield result.custom_id, result.ok, dumps_bytes(result.record)


def _keep_rows(requests: Iterable[tuple[str, str, dict]], keep_fields: list[str],
               keep_types: dict[str, set[str]], found: set[str]) -> Iterator[tuple[str, str, str | None]]:
    for custom_id, where, fields in requests:
        if not keep_fields:
            yield custom_id, where, None
            continue
        values = {}
        for name in keep_fields:
            value = fields.get(name)
            if name in fields:
                found.add(name)
            keep_types[name].add(type(value).__name__)
            values[name] = value
        yield custom_id, where, dumps_bytes(values)


def reformat(inputs: list[Path], output: Path, failed_path: Path, *, source_type: str = "auto",
             options: ResultOptions = ResultOptions(),
             requests: Iterable[tuple[str, str, dict]] | None = None, requests_flag: str = "",
             keep_fields: list[str] | tuple = (), tmp_dir: str | None = None) -> Summary:
    """Read every results file, join to the requests if given, write output and failed file.

    Both outputs are complete or absent. Input errors are raised before anything is written.
    """
    from datagen.cli import progress

    keep_fields = list(keep_fields)
    summary = Summary(files=len(inputs))
    counts = summary.counts
    with ResultStore(tmp_dir) as store:
        started = time.perf_counter()
        store.add_results(_parse_files(inputs, KindCheck(source_type), options, counts))
        log.debug("read %d results in %.1f s (%.1f s CPU)", counts.lines, time.perf_counter() - started,
                  time.process_time())
        if counts.lines == 0:
            raise UserError(f"no result lines in {', '.join(map(str, inputs))}; check --input_file")
        keep_types: dict[str, set[str]] = {name: set() for name in keep_fields}
        if requests is not None:
            found: set[str] = set()
            if store.add_inputs(_keep_rows(requests, keep_fields, keep_types, found)) == 0:
                raise UserError(f"{requests_flag} has no requests; check the file")
            store.check_unique_inputs(requests_flag)
            absent = [name for name in keep_fields if name not in found]
            if absent:
                raise UserError(f"--keep_fields {', '.join(absent)}: no request in {requests_flag} has "
                                f"{'this field' if len(absent) == 1 else 'these fields'}; "
                                f"name fields of the prompts file (or '{PROMPT_FIELD}' for the prompt itself)")
            summary.extra = store.extra_count()
        null_keep = dumps_bytes(dict.fromkeys(keep_fields)) if keep_fields else None
        columns = output_columns(counts.keys, keep_fields)
        started = time.perf_counter()
        # closing(): the cursor is closed while the database is still open, whatever happens.
        with open_sink(output, columns, keep_types) as sink, atomic_writer(failed_path, "wb") as failed, \
                contextlib.closing(store.rows()) as stored:
            rows = pick(stored, summary.duplicates)
            record = store.record
            for custom_id, keep, ok, offset, length in progress(rows, desc="writing", unit="request"):
                if ok is None:
                    summary.missing += 1
                    failed.write(dumps_bytes(failed_record(
                        custom_id, "missing", message="no result for this request in the --input_file files")) + b"\n")
                elif ok:
                    summary.ok += 1
                    sink.write(record(offset, length), keep or null_keep)
                else:
                    summary.failed += 1
                    failed.write(record(offset, length) + b"\n")
        log.debug("sorted, joined and wrote in %.1f s (%.1f s CPU in all)", time.perf_counter() - started,
                  time.process_time())
    return summary
