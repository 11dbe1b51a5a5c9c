"""OpenAI Batch API input lines: endpoints, request bodies, limits and part files.

One input line is exactly ``{"custom_id", "method": "POST", "url", "body"}``. A file
holds one model and one url, unique ``custom_id``s, and at most 50,000 lines and
200 MB (``MAX_REQUESTS``, ``MAX_BYTES``); beyond that the suite writes numbered part
files ``STEM.part-001.jsonl``, ``STEM.part-002.jsonl``, ... (``part_path``).

- ``build_body(endpoint, model, prompt, params)``: the right body shape per endpoint
- ``part_path`` / ``existing_parts`` / ``resolve_batch_files``: the numbered part files
  (``datagen.batchapi.batch_writer`` writes them, split at the limits)
- ``iter_batch_requests(path)`` / ``check_batch_file(path)``: read and validate a batch
  input file (line shape, one url, one model, unique ids, limits, and every body through
  ``datagen.common.params.check_body``), with file:line errors
- ``request_to_prompt(request)``: a batch line back into a Prompt plus its sampling
  parameters, so the fine-tuned route answers the very same requests
- token estimates and prices: ``datagen.batchapi.estimates``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from datagen.common import params as api_params
from datagen.common.cli import add_flag
from datagen.common.errors import UserError
from datagen.common.jsonl import iter_jsonl
from datagen.common.prompts import Prompt
from datagen.batchapi.estimates import input_tokens, output_tokens
from datagen.common.params import CHAT, COMPLETIONS, EMBEDDINGS, ENDPOINTS, MAX_TOKENS_FIELD, RESPONSES  # noqa: F401

log = logging.getLogger("datagen")

MAX_REQUESTS = 50_000  # requests per input file (OpenAI's limit)
MAX_BYTES = 200_000_000  # bytes per input file (OpenAI: 200 MB)

# Which generation parameters each endpoint accepts.
SUPPORTED = {
    CHAT: {"temperature", "top_p", "max_tokens", "seed", "n", "stop", "response_format"},
    RESPONSES: {"temperature", "top_p", "max_tokens", "response_format"},
    COMPLETIONS: {"temperature", "top_p", "max_tokens", "seed", "n", "stop"},
    EMBEDDINGS: set(),
}


GenParams = api_params.GenParams  # the one type of generation parameters, shared with the fine-tuned route


def check_endpoint(endpoint: str) -> str:
    if endpoint not in ENDPOINTS:
        raise UserError(f"unsupported endpoint {endpoint!r}; use one of {', '.join(ENDPOINTS)}")
    return endpoint


def check_params(endpoint: str, params: GenParams) -> None:
    """Refuse parameters the endpoint does not take, then any value the API would refuse
    (``datagen.common.params.check_params``: the one check of types and ranges), before
    any row is read."""
    unsupported = [name for name in params.given() if name not in SUPPORTED[endpoint]]
    if unsupported:
        flags = ", ".join(f"--{name}" if name != "response_format" else "--response_format_file" for name in unsupported)
        raise UserError(f"{flags} not supported by {endpoint}; drop it or choose another --endpoint")
    api_params.check_params(endpoint, param_fields(endpoint, params), "request flags")


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


def param_fields(endpoint: str, params: GenParams) -> dict:
    """The body fields the generation parameters set, under the endpoint's own names."""
    fields: dict[str, Any] = {}
    for name in ("temperature", "top_p", "seed", "n"):
        value = getattr(params, name)
        if value is not None:
            fields[name] = value
    if params.stop is not None:
        fields["stop"] = list(params.stop)
    if params.max_tokens is not None:
        fields[MAX_TOKENS_FIELD[endpoint]] = params.max_tokens
    if params.response_format is not None:  # the chat body's shape; responses nest it in text.format
        if endpoint == CHAT:
            fields["response_format"] = params.response_format
        else:
            fields["text"] = {"format": {"type": params.response_format["type"],
                                         **params.response_format.get("json_schema", {})}}
    fields.update(params.extra_body or {})
    return fields


def build_body(endpoint: str, model: str, prompt: Prompt, params: GenParams) -> dict:
    """The request body for one prompt, in the shape ``endpoint`` expects (unchecked:
    ``datagen.common.params.check_body`` checks it)."""
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
    body.update(param_fields(endpoint, params))
    return body


def build_line(custom_id: str, endpoint: str, body: dict) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body}


def add_request_args(parser: argparse.ArgumentParser) -> None:
    """Endpoint and generation flags of a batch request (only given ones are sent)."""
    group = parser.add_argument_group("request (each parameter is sent only when given)")
    add_flag(group, "endpoint", default=CHAT, help=f"Batch API endpoint: {', '.join(ENDPOINTS)}")
    add_flag(group, "temperature", type=api_params.temperature_flag, default=None,
             help="sampling temperature, 0 to 2 (0: greedy; the API samples at 1 when none is set)")
    add_flag(group, "top_p", type=api_params.top_p_flag, default=None, help="nucleus sampling mass, 0 to 1")
    add_flag(group, "max_tokens", type=api_params.max_tokens_flag, default=None,
             help="output token cap, sent as max_completion_tokens (chat), max_output_tokens (responses) "
                  "or max_tokens (completions)")
    add_flag(group, "seed", type=api_params.seed_flag, default=None,
             help="sampling seed, a 64-bit integer (chat, completions)")
    add_flag(group, "n", type=api_params.n_flag, default=None, help="samples per prompt, 1 to 128 (chat, completions)")
    add_flag(group, "stop", action="append", type=api_params.stop_flag, default=None, metavar="TEXT", dash_value=True,
             help=f"stop sequence; repeat for up to {api_params.MAX_STOP} (chat, completions)")
    add_flag(group, "response_format_file", default=None, metavar="SCHEMA.json",
             help="JSON schema for structured output (bare schema or {name, schema, strict})")
    add_flag(group, "extra_body", default=None, metavar="JSON",
             help='more body fields as a JSON object, e.g. \'{"logprobs": true}\'')


def _refuse_constant(name: str):
    # Python's json reads NaN and Infinity, but they are not JSON and the API refuses them.
    raise UserError(f"--extra_body holds {name}, which is not JSON; give a finite number")


def params_from_args(args: argparse.Namespace) -> GenParams:
    extra: dict = {}
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body, parse_constant=_refuse_constant)
        except json.JSONDecodeError as exc:
            raise UserError(f"--extra_body is not valid JSON ({exc.msg}); pass an object like '{{\"logprobs\": true}}'") from None
        if not isinstance(extra, dict):
            raise UserError("--extra_body must be a JSON object")
    response_format = None
    if args.response_format_file:
        response_format = {"type": "json_schema", "json_schema": load_response_format(args.response_format_file)}
    return GenParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed,
                     n=args.n, stop=args.stop, response_format=response_format, extra_body=extra)


# --- part files -------------------------------------------------------------------


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
    input_tokens: int = 0  # estimated (``input_tokens``)
    output_tokens: int = 0  # the requests' output caps (``output_tokens``)

    @property
    def tokens(self) -> int:
        """What the part counts against the enqueued-token limit (``estimate_tokens``)."""
        return self.input_tokens + self.output_tokens


PROMPTS_SUFFIXES = (".csv", ".tsv", ".json", ".parquet")  # prompts files that create_batchinput.py reads


def first_line(path: str | os.PathLike):
    """The first non-blank line of a file, parsed as JSON; None when it is absent, empty,
    unreadable or not JSON (the full checks report those with file:line)."""
    try:
        with open(path, "rb") as handle:
            for _ in range(100):  # a few blank lines at most, and never more than one batch file's size
                raw = handle.readline(MAX_BYTES)
                if not raw or raw.strip():
                    break
        return json.loads(raw) if raw.strip() else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def is_batch_input(path: str | os.PathLike) -> bool:
    """True when the first line of ``path`` is a Batch API request line
    ``{"custom_id", "method", "url", "body"}``."""
    line = first_line(path)
    return isinstance(line, dict) and {"custom_id", "method", "url", "body"} <= set(line)


def not_a_batch_input(path: Path) -> str | None:
    """One line saying what ``path`` is when it is plainly not a batch input (a prompts
    file or dataset folder, an OpenAI results file, fine-tuned generations or a
    reformatted file), and which command takes it; None when it may be one (the full
    check decides)."""
    make = (f"{path} is a prompts file, not a batch input (OpenAI request lines); make one with: python "
            f"create_batchinput.py --input_file {path} --model_name MODEL --output_file batchinput.jsonl")
    if path.is_dir() or (path.is_file() and path.suffix.lower() in PROMPTS_SUFFIXES):
        return make
    if not path.is_file() or path.suffix != ".jsonl":
        return None
    line = first_line(path)
    if not isinstance(line, dict) or {"body", "url", "method"} & set(line):
        return None
    reformat = f"reformat it with: python reformat_results.py --input_file {path} --batch_input BATCHINPUT.jsonl"
    if "custom_id" in line and line.get("source") == "finetuned":
        return f"{path} is a fine-tuned generations file (generate_data_finetuned.py), not a batch input; {reformat}"
    if "custom_id" in line and ("response" in line or "error" in line):
        return f"{path} is an OpenAI results file (Batch API output lines), not a batch input; {reformat}"
    if "id" in line and "generated_text" in line:
        return (f"{path} is already reformatted (reformat_results.py output), not a batch input; compare it with: "
                f"python reformat_results.py --compare {path} OTHER.jsonl --batch_input BATCHINPUT.jsonl")
    if "id" in line and any(str(key).endswith(".status") for key in line):
        return (f"{path} is a --compare table (reformat_results.py output), not a batch input; make one from the "
                "prompts file with: python create_batchinput.py --input_file PROMPTS --model_name MODEL")
    return make


def check_batch_file(path: str | os.PathLike) -> BatchFileSummary:
    """Validate a whole batch input file as the Batch API would, before any upload:
    every line's shape and body (``datagen.common.params.check_body``, with file:line)
    and the API's limits (``MAX_REQUESTS``, ``MAX_BYTES``)."""
    path = Path(path)
    max_requests, max_bytes = MAX_REQUESTS, MAX_BYTES
    wrong_kind = not_a_batch_input(path)
    if wrong_kind:
        raise UserError(wrong_kind)
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
    count = in_tokens = out_tokens = 0
    for request in iter_batch_requests(path):
        count += 1
        in_tokens += input_tokens(request.body)
        out_tokens += output_tokens(request.url, request.body)
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
        api_params.check_body(request.url, request.body, request.where)
    if count == 0:
        raise UserError(f"{path}: no requests; the batch file is empty")
    return BatchFileSummary(path, count, size, url, model, in_tokens, out_tokens)


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
