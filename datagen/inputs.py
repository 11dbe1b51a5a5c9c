"""The requests of a fine-tuned run and their parameters, before any model loads.

- ``iter_all_requests`` reads a prompts file (any kind ``datagen.prompts`` reads) or an
  OpenAI batch input file (or its numbered parts), detected from the first line; each
  batch line's body is checked against the API's types and ranges (``datagen.params``).
- ``check_requests`` reads the whole input once, streaming: every line's shape, unique
  ids across all shards, each request's parameters, and body fields this route cannot
  honour (refused unless ignored, then listed in each record). It keeps only this
  shard's ids: shard K of N takes rows K, K+N, K+2N, ... so every shard gets a similar
  mix of lengths. ``iter_shard`` streams the same requests again to generate.
- ``effective_params``: the command line over the batch line over the OpenAI API's
  defaults (a request without a temperature is sampled at 1), so one batch input means
  the same decoding on both routes.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from datagen import batchfile, prompts
from datagen.engine import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SEED, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, GenParams
from datagen.errors import UserError
from datagen.params import check_body

log = logging.getLogger("datagen")

# Batch-line body fields: those the fine-tuned route honours, those that change nothing
# about the answer, and the API defaults of the rest (a field set to its default is no
# request for anything). Any other field is refused unless --ignore_unsupported_fields.
HONOURED_FIELDS = {"model", "messages", "prompt", "input", "instructions", "max_tokens", "max_completion_tokens",
                   "max_output_tokens", "temperature", "top_p", "n", "seed", "stop"}
NO_EFFECT_FIELDS = {"user", "metadata", "store", "service_tier", "stream", "stream_options", "prompt_cache_key",
                    "safety_identifier", "parallel_tool_calls"}
FIELD_DEFAULTS = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "top_logprobs": 0,
                  "logit_bias": {}, "tools": [], "functions": [], "tool_choice": "none", "modalities": ["text"],
                  "response_format": {"type": "text"}, "echo": False, "best_of": 1, "suffix": ""}



# --- sharding ------------------------------------------------------------------------


def shard_path(output: str | os.PathLike, shard_index: int, num_shards: int) -> Path:
    """The file shard K of N writes: ``gen.jsonl`` -> ``gen.shard-000-of-003.jsonl``.

    With one shard the output is the path itself.
    """
    output = Path(output)
    if num_shards <= 1:
        return output
    return output.with_name(f"{output.stem}.shard-{shard_index:03d}-of-{num_shards:03d}{output.suffix}")


ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")
BASE = "base"  # the name of the base model's own output, with --with_base


def parse_adapters(values: list[str] | None) -> dict[str, str]:
    """``--adapter_path NAME=PATH`` (repeatable; a bare ``PATH`` is named after its folder)
    into ``{name: path}``, the names unique and fit for a file name."""
    adapters: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or "/" in name:  # a bare path (which may itself hold "=" further on)
            name, path = Path(value.rstrip("/")).name, value
        if not ADAPTER_NAME.match(name) or name == BASE:
            raise UserError(f"--adapter_path {value}: the name {name!r} cannot name an output file; "
                            f"write NAME=PATH with a NAME of letters, digits, '.', '_' or '-' (not {BASE!r})")
        if name in adapters:
            raise UserError(f"--adapter_path {value}: a second adapter named {name!r}; give each a name with NAME=PATH")
        adapters[name] = path
    return adapters


def adapter_outputs(output: str | os.PathLike, adapters: list[str], with_base: bool) -> dict[str | None, Path]:
    """The file each adapter answers into: one adapter alone keeps ``output``; otherwise
    ``OUT_STEM.NAME.jsonl`` per adapter and ``OUT_STEM.base.jsonl`` for the base model."""
    output = Path(output)
    if not adapters or (len(adapters) == 1 and not with_base):
        return {adapters[0] if adapters else None: output}
    named: dict[str | None, Path] = {name: output.with_name(f"{output.stem}.{name}{output.suffix}") for name in adapters}
    if with_base:
        named[None] = output.with_name(f"{output.stem}.{BASE}{output.suffix}")
    return named


def shard_from_env(environ=os.environ) -> tuple[int | None, int | None]:
    """(shard index, shard count) of a SLURM array task, or (None, None) outside one.

    Task ids need not start at 0 (``--array=1-4``) or step by 1 (``--array=0-9:3``):
    the index is the task's position in the array.
    """
    task_id, count = environ.get("SLURM_ARRAY_TASK_ID"), environ.get("SLURM_ARRAY_TASK_COUNT")
    if task_id is None or count is None:
        return None, None
    try:
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0") or 0)
        step = int(environ.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
        return (int(task_id) - first) // max(step, 1), int(count)
    except ValueError:
        raise UserError(f"SLURM_ARRAY_TASK_ID={task_id!r} / SLURM_ARRAY_TASK_COUNT={count!r} are not "
                        "integers; pass --shard_index and --num_shards") from None


def check_shard(shard_index: int, num_shards: int) -> None:
    if num_shards < 1:
        raise UserError(f"--num_shards must be at least 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise UserError(f"--shard_index {shard_index} is out of range for --num_shards {num_shards}; "
                        f"use 0 to {num_shards - 1}")


# --- requests --------------------------------------------------------------------------


@dataclass
class Request:
    """One prompt to answer, with what its source says about generation."""

    custom_id: str
    index: int  # row number in the whole input (all shards), for the output order
    where: str  # file:line, for messages
    text: str | None = None  # raw text, used as is (completions-style)
    messages: list[dict] | None = None  # a conversation, rendered by the chat template
    params: dict = field(default_factory=dict)  # from a batch line: max_tokens, temperature, ...
    raw: bool = False  # a /v1/completions line: the text is never put in the chat template
    ignored: tuple[str, ...] = ()  # body fields set that the route cannot honour (run with them ignored)
    # Filled in by the generator:
    input_ids: list[int] | None = None

    @property
    def request_sha256(self) -> str:
        """What the request asked (``prompts.request_digest``): its messages, a --system_prompt
        or template already in them, or its text as one user message. Each record carries it."""
        return prompts.request_digest(self.messages if self.messages is not None
                                      else [{"role": "user", "content": self.text}])


def is_batch_input(path: str | os.PathLike) -> bool:
    """True when the file's first line has the OpenAI batch line shape."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() not in (".jsonl", ".ndjson", ".json"):
        return False
    try:
        with open(path, "r", encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    obj = json.loads(line)
                    # custom_id plus any other batch key: a batch line (a broken one is
                    # then reported as such, not as a prompts row without a prompt).
                    return isinstance(obj, dict) and "custom_id" in obj and bool({"method", "url", "body"} & set(obj))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # the prompts reader reports the bad line with file:line
    return False


def answers_kind(path: Path, options: prompts.PromptOptions) -> str | None:
    """What an answers file given as --input_file is (an OpenAI results file, a generations
    file, a reformatted file), from its first line; None for anything else, and for rows
    that hold a prompt (a template or the prompt or messages field)."""
    if path.is_dir() or path.suffix.lower() not in (".jsonl", ".ndjson", ".json"):
        return None
    try:
        with open(path, "r", encoding="utf-8") as handle:
            line = next((line for line in handle if line.strip()), "")
        obj = json.loads(line) if line else None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    if not isinstance(obj, dict) or options.template or {options.prompt_field, options.messages_field} & set(obj):
        return None
    if "custom_id" in obj and ("response" in obj or str(obj.get("id", "")).startswith("batch_req")):
        return ("an OpenAI Batch API results file (answers, not prompts): "
                f"reformat_results.py --source_type openai --input_file {path} takes it")
    if "custom_id" in obj and obj.get("source") == "finetuned":
        return ("a fine-tuned generations file (answers, not prompts): "
                f"reformat_results.py --source_type finetuned --input_file {path} takes it")
    if "id" in obj and "generated_text" in obj and "source" in obj:
        return f"a reformatted results file (answers, not prompts): reformat_results.py --compare {path} takes it"
    return None


ENGINE_FIELDS = {"vllm": frozenset({"logprobs", "top_logprobs", "response_format"})}  # honoured by that engine too


def unsupported_fields(body: dict, honoured: frozenset = frozenset()) -> tuple[str, ...]:
    """The body's fields that would change the answer and that this route (with an engine
    that also honours ``honoured``) cannot honour."""
    return tuple(sorted(name for name, value in body.items()
                        if name not in HONOURED_FIELDS and name not in honoured and name not in NO_EFFECT_FIELDS
                        and value is not None and not (name in FIELD_DEFAULTS and value == FIELD_DEFAULTS[name])))


def _engine_params(body: dict, honoured: frozenset, where: str) -> dict:
    """The parameters only some engines honour: log-probabilities and structured output."""
    params: dict[str, Any] = {}
    if "logprobs" in honoured and body.get("logprobs"):
        params["logprobs"], params["top_logprobs"] = True, body.get("top_logprobs") or 0
    response_format = body.get("response_format") if "response_format" in honoured else None
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        schema = {}
        if response_format["type"] == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise UserError(f"{where}: response_format json_schema needs a \"schema\" object")
        params["json_schema"] = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    return params


def _flatten_content(content: Any, where: str) -> str:
    """Message content as text: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "input_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise UserError(f"{where}: message content part of type {kind!r} is not text; "
                                "a text model takes text parts only")
        return "".join(texts)
    raise UserError(f"{where}: message content must be text, got {type(content).__name__}")


def _chat_messages(prompt: prompts.Prompt) -> list[dict]:
    """The conversation as chat templates take it: role and text content only.

    OpenAI's "developer" role is the system prompt of newer models; chat templates
    know it as "system".
    """
    messages = []
    for i, message in enumerate(prompt.chat_messages()):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise UserError(f"{prompt.where}: message {i} must be an object with a \"role\" and \"content\"")
        role = "system" if message["role"] == "developer" else message["role"]
        messages.append({"role": role, "content": _flatten_content(message.get("content"), prompt.where)})
    return messages


def iter_all_requests(input_file: str | os.PathLike, prompt_options: prompts.PromptOptions | None = None,
                      input_format: str = "auto", split: str | None = None, *,
                      honoured: frozenset = frozenset()) -> Iterator[Request]:
    """Every request of the input, batch file (or its parts) or prompts file, in order
    (``honoured``: the body fields the engine honours beyond the common ones)."""
    path = Path(input_file)
    batch_files = None
    if path.exists():
        if is_batch_input(path):
            batch_files = [path]
    else:
        parts = batchfile.existing_parts(path)
        if parts:
            batch_files = batchfile.resolve_batch_files(path)
    index = 0
    if batch_files is not None:
        for part in batch_files:
            for line in batchfile.iter_batch_requests(part):
                check_body(line.url, line.body, line.where)
                prompt, params = batchfile.request_to_prompt(line)
                params.update(_engine_params(line.body, honoured, line.where))
                request = Request(prompt.custom_id, index, prompt.where, params=params,
                                  ignored=unsupported_fields(line.body, honoured))
                if line.url == batchfile.COMPLETIONS:
                    request.text, request.raw = prompt.text, True
                else:
                    request.messages = _chat_messages(prompt)
                yield request
                index += 1
        if index == 0:
            raise UserError(f"{path}: no requests; the batch input file is empty")
        return
    options = prompt_options or prompts.PromptOptions()
    kind = answers_kind(path, options) if path.is_file() else None
    if kind:
        raise UserError(f"{path}: {kind}; give --input_file the prompts file or the batch input "
                        "(batchinput.jsonl) the answers were made from")
    for prompt in prompts.iter_prompts(path, options, input_format, split):
        request = Request(prompt.custom_id, index, prompt.where)
        if prompt.messages is not None or prompt.system:
            request.messages = _chat_messages(prompt)
        else:
            request.text = prompt.text
        yield request
        index += 1


def iter_shard(input_file, prompt_options=None, input_format="auto", split=None,
               shard_index: int = 0, num_shards: int = 1, *, honoured: frozenset = frozenset()) -> Iterator[Request]:
    """This shard's requests, streaming: rows K, K+N, K+2N, ... of the whole input."""
    for request in iter_all_requests(input_file, prompt_options, input_format, split, honoured=honoured):
        if request.index % num_shards == shard_index:
            yield request


def check_requests(input_file, prompt_options=None, input_format="auto", split=None,
                   shard_index: int = 0, num_shards: int = 1, overrides: "Overrides | None" = None,
                   ignore_unsupported: bool = False, honoured: frozenset = frozenset()) -> tuple[list[str], int]:
    """Read the whole input once, before any model loads: every line's shape, unique ids
    (across all shards, so every shard catches a duplicate), each request's parameters,
    and body fields this route cannot honour (refused, or with ``ignore_unsupported``
    counted and reported).

    Returns this shard's ``custom_id``s in input order and the number of requests in all.
    Holds ids only, never the prompts.
    """
    overrides = overrides or Overrides()
    seen: set[str] = set()
    mine: list[str] = []
    total = 0
    unsupported: dict[str, list[str]] = {}  # field -> where (the first few lines), and a count
    counts: Counter = Counter()
    for request in iter_all_requests(input_file, prompt_options, input_format, split, honoured=honoured):
        for name in request.ignored:
            counts[name] += 1
            if counts[name] <= 3:
                unsupported.setdefault(name, []).append(request.where.rsplit(":", 1)[-1])
        if request.custom_id in seen:
            first = next(r.where for r in iter_all_requests(input_file, prompt_options, input_format, split)
                         if r.custom_id == request.custom_id)
            raise UserError(f"{request.where}: duplicate custom_id {request.custom_id!r} (first at {first}); "
                            "ids must be unique (check --id_field)")
        seen.add(request.custom_id)
        total += 1
        effective_params(request, overrides)
        if request.index % num_shards == shard_index:
            mine.append(request.custom_id)
    if counts:
        said = "; ".join(f"{name} ({counts[name]} requests, line {', '.join(unsupported[name])}"
                         f"{', ...' if counts[name] > 3 else ''})" for name in sorted(counts))
        if not ignore_unsupported:
            raise UserError(f"{input_file}: body fields the fine-tuned route cannot honour: {said}; remove them "
                            "from the batch input, or pass --ignore_unsupported_fields to generate without them "
                            "(each record then lists what it ignored)")
        log.warning("ignoring body fields the fine-tuned route cannot honour: %s; each record lists them "
                    "in ignored_fields", said)
    return mine, total


# --- generation parameters -----------------------------------------------------------


@dataclass
class Overrides:
    """Parameters given on the command line; ``None`` means take the batch line's, or the default."""

    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    num_return_sequences: int | None = None
    stop: list[str] | None = None


def effective_params(request: Request, overrides: Overrides) -> GenParams:
    """Command line over the batch line over the OpenAI API's defaults, so that one batch
    input means the same decoding on both routes.

    Like the API, a request that sets no temperature is sampled at temperature 1 (top_p 1);
    temperature 0 (or top_p 0) decodes greedily. ``--do_sample`` / ``--no_do_sample`` force one or the other.
    """
    body = request.params

    def pick(flag_value, body_key):
        return flag_value if flag_value is not None else body.get(body_key)

    temperature = pick(overrides.temperature, "temperature")
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    top_p = pick(overrides.top_p, "top_p")
    max_new = pick(overrides.max_new_tokens, "max_tokens") or DEFAULT_MAX_NEW_TOKENS
    seed = pick(overrides.seed, "seed")
    n = pick(overrides.num_return_sequences, "n") or 1
    stop = overrides.stop if overrides.stop is not None else body.get("stop") or []
    # top_p 0 keeps only the likeliest token: greedy, as the API treats it.
    do_sample = overrides.do_sample if overrides.do_sample is not None else temperature > 0 and top_p != 0
    if do_sample and (temperature == 0 or top_p == 0):
        which = "temperature" if temperature == 0 else "top_p"
        raise UserError(f"{request.where}: sampling with {which} 0 is not possible; "
                        f"drop --do_sample for greedy decoding or set --{which} above 0")
    for name, value in (("max_tokens", max_new), ("n", n)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{request.where}: {name} must be a positive integer, got {value!r}")
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise UserError(f"{request.where}: stop must be non-empty text or a list of them")
    return GenParams(
        max_new_tokens=int(max_new), do_sample=bool(do_sample),
        temperature=float(temperature) if do_sample else None,
        top_p=float(top_p if top_p is not None else DEFAULT_TOP_P) if do_sample else None,
        seed=int(seed) if seed is not None else DEFAULT_SEED,
        num_return_sequences=int(n), stop=tuple(stop), logprobs=bool(body.get("logprobs")),
        top_logprobs=int(body.get("top_logprobs") or 0), json_schema=body.get("json_schema"))


def describe(params: GenParams) -> str:
    """The decoding in words, as every run prints it."""
    how = (f"sampling at temperature {params.temperature:g}, top_p {params.top_p:g}, seed {params.seed}"
           if params.do_sample else "greedy")
    stops = f", stop {list(params.stop)}" if params.stop else ""
    return f"{how}, up to {params.max_new_tokens} new tokens, n {params.num_return_sequences}{stops}"
