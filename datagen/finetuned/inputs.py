"""The requests of a fine-tuned run and their parameters, before any model loads.

- ``iter_all_requests`` reads a prompts file (any kind ``datagen.common.prompts`` reads) or an
  OpenAI batch input file (or its numbered parts), detected from the first line; each
  batch line's body is checked against the API's types and ranges (``datagen.common.params``).
- ``check_requests`` reads the whole input once, streaming: every line's shape, unique
  ids across all shards, each request's parameters, and body fields this route cannot
  honour (refused unless ignored, then listed in each record). It keeps only this
  shard's ids: shard K of N takes rows K, K+N, K+2N, ... so every shard gets a similar
  mix of lengths. ``iter_shard`` streams the same requests again to generate.
- ``Request.params_under(command_line)``: the command line over the batch line over the
  OpenAI API's defaults (``datagen.common.params.GenParams``; a request without a
  temperature is sampled at 1), so one batch input means the same decoding on both routes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from datagen.batchapi import batchfile
from datagen.common import prompts
from datagen.common.errors import UserError
from datagen.common.params import GenParams, check_body
from datagen.finetuned.engine import BASE

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
    asked: GenParams = GenParams()  # what its batch line sets (a prompts row sets nothing)
    raw: bool = False  # a /v1/completions line: the text is never put in the chat template
    ignored: tuple[str, ...] = ()  # body fields set that the route cannot honour (run with them ignored)

    def params_under(self, command_line: GenParams) -> GenParams:
        """The parameters this request is answered with: the command line over its batch
        line over the OpenAI API's defaults (``GenParams.effective``)."""
        return command_line.over(self.asked).effective(self.where)

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


def _asked(body: dict, honoured: frozenset) -> GenParams:
    """What a batch line's body sets, less what only some engines honour (log-probabilities,
    structured output) when this one does not."""
    asked = GenParams.from_body(body)
    if "logprobs" not in honoured:
        asked = dataclasses.replace(asked, logprobs=None, top_logprobs=None)
    if "response_format" not in honoured:
        asked = dataclasses.replace(asked, response_format=None)
    return asked


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
    (``honoured``: the body fields the engine honours beyond the common ones). The one
    place where an input row becomes a ``Request``."""
    path = Path(input_file)
    batch_files = None
    if path.exists():
        if is_batch_input(path):
            batch_files = [path]
    elif batchfile.existing_parts(path):
        batch_files = batchfile.resolve_batch_files(path)
    if batch_files is not None:
        yield from _batch_requests(path, batch_files, honoured)
    else:
        yield from _prompt_requests(path, prompt_options or prompts.PromptOptions(), input_format, split)


def _batch_requests(path: Path, batch_files: list[Path], honoured: frozenset) -> Iterator[Request]:
    """The requests of a batch input (its parts in order), each body checked as the API would."""
    index = 0
    for part in batch_files:
        for line in batchfile.iter_batch_requests(part):
            check_body(line.url, line.body, line.where)
            prompt, _ = batchfile.request_to_prompt(line)
            request = Request(prompt.custom_id, index, prompt.where, asked=_asked(line.body, honoured),
                              ignored=unsupported_fields(line.body, honoured))
            if line.url == batchfile.COMPLETIONS:
                request.text, request.raw = prompt.text, True
            else:
                request.messages = _chat_messages(prompt)
            yield request
            index += 1
    if index == 0:
        raise UserError(f"{path}: no requests; the batch input file is empty")


def _prompt_requests(path: Path, options: prompts.PromptOptions, input_format: str,
                     split: str | None) -> Iterator[Request]:
    """The requests of a prompts file (any kind ``datagen.common.prompts`` reads); an answers
    file given by mistake is refused, saying which command takes it."""
    kind = answers_kind(path, options) if path.is_file() else None
    if kind:
        raise UserError(f"{path}: {kind}; give --input_file the prompts file or the batch input "
                        "(batchinput.jsonl) the answers were made from")
    for index, prompt in enumerate(prompts.iter_prompts(path, options, input_format, split)):
        request = Request(prompt.custom_id, index, prompt.where)
        if prompt.messages is not None or prompt.system:
            request.messages = _chat_messages(prompt)
        else:
            request.text = prompt.text
        yield request


def iter_shard(input_file, prompt_options=None, input_format="auto", split=None,
               shard_index: int = 0, num_shards: int = 1, *, honoured: frozenset = frozenset()) -> Iterator[Request]:
    """This shard's requests, streaming: rows K, K+N, K+2N, ... of the whole input."""
    for request in iter_all_requests(input_file, prompt_options, input_format, split, honoured=honoured):
        if request.index % num_shards == shard_index:
            yield request


def check_requests(input_file, prompt_options=None, input_format="auto", split=None,
                   shard_index: int = 0, num_shards: int = 1, command_line: GenParams = GenParams(),
                   ignore_unsupported: bool = False, honoured: frozenset = frozenset()) -> tuple[list[str], int]:
    """Read the whole input once, before any model loads: every line's shape, unique ids
    (across all shards, so every shard catches a duplicate), each request's parameters,
    and body fields this route cannot honour (refused, or with ``ignore_unsupported``
    counted and reported).

    Returns this shard's ``custom_id``s in input order and the number of requests in all.
    Holds ids only, never the prompts.
    """
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
        request.params_under(command_line)  # refuses parameters that cannot go together
        if request.index % num_shards == shard_index:
            mine.append(request.custom_id)
    if counts:
        _refuse_or_warn_unsupported(input_file, counts, unsupported, ignore_unsupported)
    return mine, total


def _refuse_or_warn_unsupported(input_file, counts: Counter, lines: dict[str, list[str]], ignore: bool) -> None:
    """One line naming the body fields this route cannot honour (how many requests, the
    first lines): refused, or with ``ignore`` a warning."""
    said = "; ".join(f"{name} ({counts[name]} requests, line {', '.join(lines[name])}"
                     f"{', ...' if counts[name] > 3 else ''})" for name in sorted(counts))
    if not ignore:
        raise UserError(f"{input_file}: body fields the fine-tuned route cannot honour: {said}; remove them "
                        "from the batch input, or pass --ignore_unsupported_fields to generate without them "
                        "(each record then lists what it ignored)")
    log.warning("ignoring body fields the fine-tuned route cannot honour: %s; each record lists them "
                "in ignored_fields", said)
