"""OpenAI Batch API input lines: endpoints, request bodies, limits and part files.

One input line is exactly ``{"custom_id", "method": "POST", "url", "body"}``. A file
holds one model and one url, unique ``custom_id``s, and at most 50,000 lines and
200 MB (``MAX_REQUESTS``, ``MAX_BYTES``); beyond that the suite writes numbered part
files ``STEM.part-001.jsonl``, ``STEM.part-002.jsonl``, ... (``part_path``).

- ``build_body(endpoint, model, prompt, params)``: the right body shape per endpoint
- ``BatchFileWriter``: streams lines into temporary files, split at the limits, and
  renames them into place only on ``commit()``
- ``iter_batch_requests(path)`` / ``check_batch_file(path)``: read and validate a batch
  input file (line shape, one url, one model, unique ids, limits), with file:line errors
- ``request_to_prompt(request)``: a batch line back into a Prompt plus its sampling
  parameters, so the fine-tuned route answers the very same requests
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from datagen.cli import add_flag
from datagen.errors import UserError
from datagen.jsonl import dumps_bytes, iter_jsonl, temp_path_beside
from datagen.prompts import Prompt

log = logging.getLogger("datagen")

CHAT, RESPONSES, COMPLETIONS, EMBEDDINGS = (
    "/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/embeddings")
ENDPOINTS = (CHAT, RESPONSES, COMPLETIONS, EMBEDDINGS)
MAX_REQUESTS = 50_000  # requests per input file (OpenAI's limit)
MAX_BYTES = 200_000_000  # bytes per input file (OpenAI: 200 MB)

# The body field that caps output length, per endpoint.
MAX_TOKENS_FIELD = {CHAT: "max_completion_tokens", RESPONSES: "max_output_tokens", COMPLETIONS: "max_tokens"}
# Which generation parameters each endpoint accepts.
SUPPORTED = {
    CHAT: {"temperature", "top_p", "max_tokens", "seed", "n", "stop", "response_format"},
    RESPONSES: {"temperature", "top_p", "max_tokens", "response_format"},
    COMPLETIONS: {"temperature", "top_p", "max_tokens", "seed", "n", "stop"},
    EMBEDDINGS: set(),
}


@dataclass
class GenParams:
    """Generation parameters; ``None`` means not given, and then not sent."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    n: int | None = None
    stop: list[str] | None = None
    response_format: dict | None = None  # {"name", "schema", "strict"}
    extra_body: dict = field(default_factory=dict)

    def given(self) -> list[str]:
        return [name for name in ("temperature", "top_p", "max_tokens", "seed", "n", "stop", "response_format")
                if getattr(self, name) is not None]


def check_endpoint(endpoint: str) -> str:
    if endpoint not in ENDPOINTS:
        raise UserError(f"unsupported endpoint {endpoint!r}; use one of {', '.join(ENDPOINTS)}")
    return endpoint


def check_params(endpoint: str, params: GenParams) -> None:
    """Refuse parameters the endpoint does not take, before any row is read."""
    unsupported = [name for name in params.given() if name not in SUPPORTED[endpoint]]
    if unsupported:
        flags = ", ".join(f"--{name}" if name != "response_format" else "--response_format_file" for name in unsupported)
        raise UserError(f"{flags} not supported by {endpoint}; drop it or choose another --endpoint")


def load_response_format(path: str) -> dict:
    """A JSON schema file into ``{"name", "schema", "strict"}``.

    The file is either a bare JSON schema or the wrapper ``{"name", "schema", "strict"?}``.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"--response_format_file {path}: cannot read it ({exc.strerror}); check the path") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--response_format_file {path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(schema, dict):
        raise UserError(f"--response_format_file {path}: must hold a JSON schema object")
    if "schema" in schema and "name" in schema:
        return {"name": schema["name"], "schema": schema["schema"], "strict": schema.get("strict", True)}
    name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem)[:64] or "response"
    return {"name": name, "schema": schema, "strict": True}


def build_body(endpoint: str, model: str, prompt: Prompt, params: GenParams) -> dict:
    """The request body for one prompt, in the shape ``endpoint`` expects."""
    body: dict[str, Any] = {"model": model}
    if endpoint == CHAT:
        body["messages"] = prompt.chat_messages()
    elif endpoint == RESPONSES:
        if prompt.system:
            body["instructions"] = prompt.system
        body["input"] = prompt.messages if prompt.messages is not None else prompt.text
    else:
        if prompt.messages is not None:
            raise UserError(f"{prompt.where}: a messages conversation needs {CHAT} or {RESPONSES}, "
                            f"not {endpoint}; use --prompt_field or another --endpoint")
        if prompt.system:
            raise UserError(f"--system_prompt is not supported by {endpoint}; put it in --prompt_template instead")
        body["prompt" if endpoint == COMPLETIONS else "input"] = prompt.text
    for name in ("temperature", "top_p", "seed", "n", "stop"):
        value = getattr(params, name)
        if value is not None:
            body[name] = value
    if params.max_tokens is not None:
        body[MAX_TOKENS_FIELD[endpoint]] = params.max_tokens
    if params.response_format is not None:
        if endpoint == CHAT:
            body["response_format"] = {"type": "json_schema", "json_schema": params.response_format}
        else:
            body["text"] = {"format": {"type": "json_schema", **params.response_format}}
    body.update(params.extra_body)
    return body


def build_line(custom_id: str, endpoint: str, body: dict) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body}


def add_request_args(parser: argparse.ArgumentParser) -> None:
    """Endpoint and generation flags of a batch request (only given ones are sent)."""
    group = parser.add_argument_group("request (each parameter is sent only when given)")
    add_flag(group, "endpoint", default=CHAT, help=f"Batch API endpoint: {', '.join(ENDPOINTS)}")
    add_flag(group, "temperature", type=float, default=None, help="sampling temperature")
    add_flag(group, "top_p", type=float, default=None, help="nucleus sampling mass")
    add_flag(group, "max_tokens", type=int, default=None,
             help="output token cap, sent as max_completion_tokens (chat), max_output_tokens (responses) "
                  "or max_tokens (completions)")
    add_flag(group, "seed", type=int, default=None, help="sampling seed (chat, completions)")
    add_flag(group, "n", type=int, default=None, help="samples per prompt (chat, completions)")
    add_flag(group, "stop", action="append", default=None, metavar="TEXT",
             help="stop sequence; repeat for several (chat, completions)")
    add_flag(group, "response_format_file", default=None, metavar="SCHEMA.json",
             help="JSON schema for structured output (bare schema or {name, schema, strict})")
    add_flag(group, "extra_body", default=None, metavar="JSON",
             help='more body fields as a JSON object, e.g. \'{"logprobs": true}\'')


def params_from_args(args: argparse.Namespace) -> GenParams:
    extra: dict = {}
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except json.JSONDecodeError as exc:
            raise UserError(f"--extra_body is not valid JSON ({exc.msg}); pass an object like '{{\"logprobs\": true}}'") from None
        if not isinstance(extra, dict):
            raise UserError("--extra_body must be a JSON object")
    params = GenParams(args.temperature, args.top_p, args.max_tokens, args.seed, args.n, args.stop,
                       load_response_format(args.response_format_file) if args.response_format_file else None,
                       extra)
    if params.max_tokens is not None and params.max_tokens < 1:
        raise UserError("--max_tokens must be at least 1")
    if params.n is not None and params.n < 1:
        raise UserError("--n must be at least 1")
    return params


# --- writing files, split at the limits ------------------------------------------


def part_path(output: Path, number: int) -> Path:
    """``batchinput.jsonl`` -> ``batchinput.part-001.jsonl``."""
    return output.with_name(f"{output.stem}.part-{number:03d}{output.suffix}")


def existing_parts(output: Path) -> list[Path]:
    pattern = re.compile(re.escape(output.stem) + r"\.part-(\d{3,})" + re.escape(output.suffix) + "$")
    found = [p for p in output.parent.glob(f"{output.stem}.part-*{output.suffix}") if pattern.match(p.name)]
    return sorted(found, key=lambda p: int(pattern.match(p.name).group(1)))


def resolve_batch_files(path: str | os.PathLike) -> list[Path]:
    """A batch input path, or the numbered parts written in its place when it was split."""
    path = Path(path)
    if path.exists():
        return [path]
    parts = existing_parts(path)
    if parts:
        return parts
    raise UserError(f"{path}: no such file (and no {part_path(path, 1).name} parts); "
                    "create it with create_batchinput.py or check the path")


class BatchFileWriter:
    """Write batch lines into ``output``, starting a new part at each limit.

    Lines go to temporary files beside ``output``. ``commit()`` renames them into place:
    one part becomes ``output``; several become ``STEM.part-NNN.jsonl`` (and then no
    ``output`` is left, so a stale one cannot be submitted by mistake). ``abort()`` (or
    an exception inside ``with``) removes them. ``dry_run=True`` only counts.
    """

    def __init__(self, output: str | os.PathLike, max_requests: int = MAX_REQUESTS,
                 max_bytes: int = MAX_BYTES, dry_run: bool = False):
        if max_requests < 1 or max_bytes < 1:
            raise UserError("split limits must be at least 1")
        self.output = Path(output)
        self.max_requests, self.max_bytes, self.dry_run = max_requests, max_bytes, dry_run
        self.temps: list[Path] = []
        self.part_counts: list[int] = []
        self.part_bytes: list[int] = []
        self.total_bytes = 0
        self._handle = None

    @property
    def count(self) -> int:
        return sum(self.part_counts)

    def _start_part(self) -> None:
        if self._handle:
            self._handle.close()
            self._handle = None
        if not self.dry_run:
            tmp = temp_path_beside(self.output)
            self.temps.append(tmp)
            self._handle = open(tmp, "wb")
        self.part_counts.append(0)
        self.part_bytes.append(0)

    def add(self, line: dict, where: str = "") -> None:
        data = dumps_bytes(line) + b"\n"
        size = len(data)
        if size > self.max_bytes:
            raise UserError(f"{where}: this request alone is {size:,} bytes, over the {self.max_bytes:,}-byte "
                            "file limit; shorten the prompt")
        if not self.part_counts or self.part_counts[-1] >= self.max_requests \
                or self.part_bytes[-1] + size > self.max_bytes:
            self._start_part()
        if self._handle:
            self._handle.write(data)
        self.part_counts[-1] += 1
        self.part_bytes[-1] += size
        self.total_bytes += size

    def planned_paths(self) -> list[Path]:
        if len(self.part_counts) <= 1:
            return [self.output]
        return [part_path(self.output, i) for i in range(1, len(self.part_counts) + 1)]

    def commit(self) -> list[Path]:
        """Move the finished parts into place and remove stale outputs of earlier runs."""
        if self._handle:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None
        if self.dry_run:
            return self.planned_paths()
        finals = self.planned_paths()
        stale = [p for p in existing_parts(self.output) if p not in finals]
        if len(finals) > 1 and self.output.exists():
            stale.append(self.output)
        for tmp, final in zip(self.temps, finals):
            os.replace(tmp, final)
        self.temps = []
        for path in stale:
            log.info("removing %s left by an earlier run", path)
            path.unlink()
        return finals

    def abort(self) -> None:
        if self._handle:
            self._handle.close()
            self._handle = None
        for tmp in self.temps:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        self.temps = []

    def __enter__(self) -> "BatchFileWriter":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None:
            self.abort()


class DuplicateFinder:
    """Finds repeated ids among millions with 8 bytes of memory per id.

    ``add`` stores a 64-bit hash per id; ``first_duplicate`` sorts the hashes once and
    returns the positions of the first colliding pair, which the caller confirms.
    """

    def __init__(self) -> None:
        self.hashes = array("q")

    def add(self, key: str) -> None:
        self.hashes.append(hash(key))

    def candidates(self) -> Iterator[tuple[int, int]]:
        """Pairs of positions whose hashes are equal, earliest second position first."""
        import numpy as np

        if len(self.hashes) < 2:
            return
        values = np.frombuffer(self.hashes, dtype=np.int64)
        order = np.argsort(values, kind="stable")
        ordered = values[order]
        same = np.nonzero(ordered[1:] == ordered[:-1])[0]
        yield from sorted(((int(order[i]), int(order[i + 1])) for i in same), key=lambda pair: pair[1])


# --- reading batch input files -----------------------------------------------------


@dataclass
class BatchRequest:
    custom_id: str
    url: str
    body: dict
    where: str  # file:line


def iter_batch_requests(path: str | os.PathLike) -> Iterator[BatchRequest]:
    """Stream the lines of a batch input file, each checked for the OpenAI line shape."""
    for line_number, obj in iter_jsonl(path):
        where = f"{path}:{line_number}"
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object with custom_id, method, url and body")
        missing = [key for key in ("custom_id", "method", "url", "body") if key not in obj]
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)}; a batch line is "
                            '{"custom_id", "method": "POST", "url", "body"} (make it with create_batchinput.py)')
        custom_id, url, body = obj["custom_id"], obj["url"], obj["body"]
        if not isinstance(custom_id, str) or not custom_id:
            raise UserError(f"{where}: custom_id must be a non-empty string")
        if obj["method"] != "POST":
            raise UserError(f"{where}: method must be \"POST\", got {obj['method']!r}")
        if url not in ENDPOINTS:
            raise UserError(f"{where}: unsupported url {url!r}; use one of {', '.join(ENDPOINTS)}")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
            raise UserError(f"{where}: body must be an object with a \"model\" string")
        yield BatchRequest(custom_id, url, body, where)


@dataclass
class BatchFileSummary:
    path: Path
    requests: int
    bytes: int
    url: str
    model: str


def check_batch_file(path: str | os.PathLike, max_requests: int = MAX_REQUESTS,
                     max_bytes: int = MAX_BYTES) -> BatchFileSummary:
    """Validate a whole batch input file as the Batch API would, before any upload."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; create it with create_batchinput.py or check --file")
    if path.suffix != ".jsonl":
        raise UserError(f"{path}: the Batch API takes .jsonl files only; rename it to end in .jsonl")
    size = path.stat().st_size
    if size > max_bytes:
        raise UserError(f"{path}: {size:,} bytes, over the {max_bytes:,}-byte limit per batch file; "
                        "split it with create_batchinput.py --max_requests_per_file/--max_bytes_per_file")
    seen: dict[str, str] = {}
    url = model = None
    count = 0
    for request in iter_batch_requests(path):
        count += 1
        if count > max_requests:
            raise UserError(f"{request.where}: more than {max_requests:,} requests in one batch file; "
                            "split it with create_batchinput.py")
        if url is None:
            url, model = request.url, request.body["model"]
        elif request.url != url:
            raise UserError(f"{request.where}: url {request.url} differs from {url} on the first line; "
                            "one batch holds one endpoint")
        elif request.body["model"] != model:
            raise UserError(f"{request.where}: model {request.body['model']!r} differs from {model!r} on the "
                            "first line; one batch holds one model")
        if request.custom_id in seen:
            raise UserError(f"{request.where}: duplicate custom_id {request.custom_id!r} "
                            f"(first at {seen[request.custom_id]}); ids must be unique")
        seen[request.custom_id] = request.where
    if count == 0:
        raise UserError(f"{path}: no requests; the batch file is empty")
    return BatchFileSummary(path, count, size, url, model)


def request_to_prompt(request: BatchRequest) -> tuple[Prompt, dict]:
    """A batch line back into a Prompt and the generation parameters its body sets.

    The parameters use the body's own names normalised: ``max_tokens`` (from
    max_completion_tokens / max_output_tokens / max_tokens), ``temperature``,
    ``top_p``, ``seed``, ``n``, ``stop`` (always a list).
    """
    body, url = request.body, request.url
    prompt = Prompt(request.custom_id, where=request.where, row={})
    if url == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{request.where}: a chat body needs a non-empty \"messages\" list")
        prompt.messages = messages
    elif url == RESPONSES:
        prompt.system = body.get("instructions")
        value = body.get("input")
        if isinstance(value, str):
            prompt.text = value
        elif isinstance(value, list) and value:
            prompt.messages = value
        else:
            raise UserError(f"{request.where}: a responses body needs \"input\" text or messages")
    elif url == COMPLETIONS:
        value = body.get("prompt")
        if not isinstance(value, str):
            raise UserError(f"{request.where}: a completions body needs a \"prompt\" string")
        prompt.text = value
    else:
        raise UserError(f"{request.where}: {url} requests are not text generation; use a chat, "
                        "responses or completions batch file")
    params: dict[str, Any] = {}
    for name in ("temperature", "top_p", "seed", "n"):
        if body.get(name) is not None:
            params[name] = body[name]
    for name in ("max_completion_tokens", "max_output_tokens", "max_tokens"):
        if body.get(name) is not None:
            params["max_tokens"] = body[name]
            break
    stop = body.get("stop")
    if stop is not None:
        params["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return prompt, params
