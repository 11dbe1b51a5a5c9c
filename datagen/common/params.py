"""The one check of generation parameters against the OpenAI API's types and ranges.

``RANGES`` (below) is the only table of them in the suite; ``ENDPOINT_RANGES`` holds
where an endpoint differs. Both routes use it: create_batchinput.py before it writes a
line, batch_utils.py before it uploads a file, generate_data_finetuned.py before it
generates, so a value the API would refuse (or a wrong type that a model server would
quietly coerce) never becomes a record.

- ``check_body(endpoint, body, where)``: every known parameter in a request body, the
  model, and the message contents; raises ``UserError("WHERE: body.NAME ...")``.
- ``check_params(endpoint, params, where)``: the parameters alone (no messages needed).
- ``GenParams``: the one type of generation parameters, under the API's names, for both
  routes: what a source gives (command-line flags, a batch line's body; None = not
  given), and the effective parameters of one fine-tuned request (``effective``).
- ``flag_type(name)`` and the ready ones (``temperature_flag``, ``top_p_flag``,
  ``n_flag``, ``max_tokens_flag``, ``seed_flag``, ``presence_penalty_flag``,
  ``frequency_penalty_flag``, ``top_logprobs_flag``, ``stop_flag``): argparse ``type=``
  functions that refuse nan, inf, text and out-of-range values (usage error, exit 2).

Source: the OpenAPI spec (openai/openai-openapi 2.3.0): CreateChatCompletionRequest,
CreateCompletionRequest, CreateResponse, StopConfiguration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from datagen.common.errors import UserError

INT64 = (-2**63, 2**63 - 1)

# name: (kind, minimum, maximum); kind is "number" (integer or fraction), "integer" or
# "boolean"; None means unbounded. max_tokens' floor of 1 is ours: the completions API
# takes 0 (echo-only scoring), which generates nothing.
RANGES: dict[str, tuple[str, float | None, float | None]] = {
    "temperature": ("number", 0, 2),
    "top_p": ("number", 0, 1),
    "n": ("integer", 1, 128),
    "max_tokens": ("integer", 1, None),
    "max_completion_tokens": ("integer", 1, None),
    "max_output_tokens": ("integer", 16, None),
    "seed": ("integer", *INT64),
    "presence_penalty": ("number", -2, 2),
    "frequency_penalty": ("number", -2, 2),
    "logprobs": ("boolean", None, None),
    "top_logprobs": ("integer", 0, 20),
}
CHAT, RESPONSES, COMPLETIONS, EMBEDDINGS = (
    "/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/embeddings")
ENDPOINTS = (CHAT, RESPONSES, COMPLETIONS, EMBEDDINGS)
# The body field that caps output length, per endpoint.
MAX_TOKENS_FIELD = {CHAT: "max_completion_tokens", RESPONSES: "max_output_tokens", COMPLETIONS: "max_tokens"}
ENDPOINT_RANGES = {"/v1/completions": {"logprobs": ("integer", 0, 5)}}  # legacy: a count, not a flag
MAX_STOP = 4  # stop: one string or a list of 1 to 4 strings


def _spec(endpoint: str, name: str) -> tuple[str, float | None, float | None]:
    return ENDPOINT_RANGES.get(endpoint, {}).get(name) or RANGES[name]


def _wanted(spec) -> str:
    """What a good value is, in words: 'give a number from 0 to 2'."""
    kind, low, high = spec
    if kind == "boolean":
        return "give true or false"
    noun = "a number" if kind == "number" else "an integer"
    if (low, high) == INT64:
        return "give a 64-bit integer"
    if high is None:
        return f"give {noun} of at least {low:g}"
    return f"give {noun} from {low:g} to {high:g}"


def _shown(value: Any) -> str:
    """A value as JSON would write it, kept short."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:40] + "..."
        return f'the string "{text}"'
    if isinstance(value, (list, dict)):
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def value_problem(spec, value: Any) -> str | None:
    """None when ``value`` fits ``spec``; else what is wrong with it ('is NaN')."""
    kind, low, high = spec
    if kind == "boolean":
        return None if isinstance(value, bool) else f"is {_shown(value)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"is {_shown(value)}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return f"is {_shown(value)}"
        if kind == "integer":
            return f"is {_shown(value)}, not an integer"
    if (low is not None and value < low) or (high is not None and value > high):
        return f"is {_shown(value)}"
    return None


def _stop_problem(value: Any) -> str | None:
    if isinstance(value, str):
        return None if value else "is an empty string"
    if not isinstance(value, list):
        return f"is {_shown(value)}"
    if not 1 <= len(value) <= MAX_STOP:
        return f"is a list of {len(value)} items"
    for item in value:
        if not isinstance(item, str) or not item:
            return f"holds {_shown(item) if item != '' else 'an empty string'}"
    return None


STOP_WANTED = f"give a non-empty string or a list of at most {MAX_STOP} non-empty strings"


def check_params(endpoint: str, params: dict, where: str) -> None:
    """Every parameter of ``params`` that ``RANGES`` knows, plus ``stop``, fits the API.

    ``None`` means "not set" (the API's default) and passes.
    """
    for name, value in params.items():
        if value is None:
            continue
        if name == "stop":
            problem = _stop_problem(value)
            if problem:
                raise UserError(f"{where}: body.stop {problem}; {STOP_WANTED}")
        elif name in RANGES:
            spec = _spec(endpoint, name)
            problem = value_problem(spec, value)
            if problem:
                raise UserError(f"{where}: body.{name} {problem}; {_wanted(spec)}")


def _non_finite(value: Any, path: str) -> tuple[str, float] | None:
    """The path and value of the first NaN or Infinity anywhere in ``value``."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        found = _non_finite(item, f"{path}{key}" if key.startswith("[") else f"{path}.{key}")
        if found:
            return found
    return None


def _check_content(message: Any, path: str, where: str) -> None:
    """A message's content is a string or a non-empty list of typed parts; null only for
    an assistant message that calls tools."""
    if not isinstance(message, dict):
        raise UserError(f"{where}: {path} is {_shown(message)}; give an object with \"role\" and \"content\"")
    content = message.get("content")
    calls_tools = message.get("tool_calls") or message.get("function_call")
    if content is None and message.get("role") == "assistant" and calls_tools:
        return
    if isinstance(content, str):
        return
    if isinstance(content, list) and content:
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise UserError(f"{where}: {path}.content[{i}] is {_shown(part)}; "
                                'a content part is an object with a "type", e.g. {"type": "text", "text": "..."}')
            if part["type"] in ("text", "input_text", "output_text") and not isinstance(part.get("text"), str):
                raise UserError(f"{where}: {path}.content[{i}].text is {_shown(part.get('text'))}; give a string")
        return
    shown = "missing" if "content" not in message else ("an empty list" if content == [] else _shown(content))
    raise UserError(f"{where}: {path}.content is {shown}; give a string or a list of content parts "
                    "(null only for an assistant message with tool_calls)")


def check_body(endpoint: str, body: dict, where: str) -> None:
    """The body of one request, as the API would check it: the model is a non-empty
    string, every generation parameter has the API's type and range, message contents
    are strings or lists of parts, and no number is NaN or Infinity. Raises a
    ``UserError`` whose message starts with ``where``."""
    if not isinstance(body, dict):
        raise UserError(f"{where}: body is {_shown(body)}; give a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"].strip():
        raise UserError(f"{where}: body.model is {_shown(body.get('model'))}; give the model name")
    check_params(endpoint, body, where)
    if endpoint == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: body.messages is {_shown(messages)}; give a non-empty list of messages")
        for i, message in enumerate(messages):
            _check_content(message, f"body.messages[{i}]", where)
    elif endpoint == "/v1/responses":
        value = body.get("input")
        if isinstance(value, list) and value:
            for i, item in enumerate(value):
                if not isinstance(item, dict) or "role" in item:  # other items (tool output, ...) have no content
                    _check_content(item, f"body.input[{i}]", where)
        elif not isinstance(value, str):
            raise UserError(f"{where}: body.input is {_shown(value)}; give a string or a list of messages")
    elif endpoint in ("/v1/completions", "/v1/embeddings"):
        key = "prompt" if endpoint == "/v1/completions" else "input"
        if not isinstance(body.get(key), (str, list)):
            raise UserError(f"{where}: body.{key} is {_shown(body.get(key))}; give a string")
    try:
        bad = _non_finite(body, "body")
    except RecursionError:
        raise UserError(f"{where}: body is nested too deeply; flatten it") from None
    if bad:  # Python's json reads and writes them, but they are not JSON: the API refuses the line
        raise UserError(f"{where}: {bad[0]} is {_shown(bad[1])}; JSON has no NaN or Infinity, give a finite number")


# --- the parameters of a request ------------------------------------------------------

# Where neither the command line nor a batch line sets a parameter (the fine-tuned route).
DEFAULT_MAX_TOKENS = 256  # ours: the API's own cap is the model's context
DEFAULT_TEMPERATURE = 1.0  # the API's default: a request without a temperature is sampled at 1
DEFAULT_TOP_P = 1.0  # the API's default
DEFAULT_SEED = 0  # ours: the API does not seed a request without one


@dataclass(frozen=True)
class GenParams:
    """Generation parameters under the OpenAI API's names; ``None`` means not given.

    What a source gives (``from_body``: a batch line; the scripts' flags) has ``None``
    where it says nothing: the batch route then sends nothing. ``given.over(other)`` puts
    one source over another, and ``effective(where)`` fills in the API's defaults and
    decides greedy or sampling: the parameters one fine-tuned request is answered with,
    every field set (temperature and top_p ``None`` when greedy).
    """

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None  # sent as the endpoint's own field (MAX_TOKENS_FIELD)
    seed: int | None = None
    n: int | None = None
    stop: tuple[str, ...] | None = None
    do_sample: bool | None = None  # the fine-tuned route's own: force sampling (True) or greedy (False)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # The chat body's response_format: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    # or {"type": "json_object"}. Dicts do not hash: equal parameters still compare equal.
    response_format: dict | None = field(default=None, hash=False)
    extra_body: dict | None = field(default=None, hash=False)  # the batch route's own: more body fields

    def __post_init__(self):
        if isinstance(self.stop, (str, list)):  # a body's one string or list, or argparse's list
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))

    @classmethod
    def from_body(cls, body: dict) -> "GenParams":
        """The parameters a request body sets (checked by ``check_body`` first)."""
        max_tokens = next((body[name] for name in ("max_completion_tokens", "max_output_tokens", "max_tokens")
                           if body.get(name) is not None), None)
        return cls(body.get("temperature"), body.get("top_p"), max_tokens, body.get("seed"), body.get("n"),
                   body.get("stop"), None, body.get("logprobs"), body.get("top_logprobs"), body.get("response_format"))

    def given(self) -> list[str]:
        """The names of the parameters set."""
        return [f.name for f in dataclasses.fields(self) if f.name != "extra_body" and getattr(self, f.name) is not None]

    def over(self, other: "GenParams") -> "GenParams":
        """These parameters where given, ``other``'s elsewhere (the command line over a batch line)."""
        return dataclasses.replace(other, **{name: getattr(self, name) for name in self.given()})

    def effective(self, where: str = "request") -> "GenParams":
        """The parameters a request is answered with: the API's defaults where none is given
        (no temperature: sampled at 1, as the API does), greedy at temperature 0 or top_p 0;
        ``do_sample`` forces one or the other."""
        temperature = DEFAULT_TEMPERATURE if self.temperature is None else self.temperature
        do_sample = self.do_sample if self.do_sample is not None else temperature > 0 and self.top_p != 0
        if do_sample and (temperature == 0 or self.top_p == 0):
            which = "temperature" if temperature == 0 else "top_p"
            raise UserError(f"{where}: sampling with {which} 0 is not possible; "
                            f"drop --do_sample for greedy decoding or set --{which} above 0")
        top_p = DEFAULT_TOP_P if self.top_p is None else self.top_p
        self.schema_text(where)  # a json_schema without a schema: refused here, with where
        return GenParams(temperature=float(temperature) if do_sample else None,
                         top_p=float(top_p) if do_sample else None,
                         max_tokens=int(self.max_tokens or DEFAULT_MAX_TOKENS),
                         seed=int(self.seed) if self.seed is not None else DEFAULT_SEED,
                         n=int(self.n or 1), stop=tuple(self.stop or ()), do_sample=bool(do_sample),
                         logprobs=bool(self.logprobs), top_logprobs=int(self.top_logprobs or 0) if self.logprobs else 0,
                         response_format=self.response_format)

    def schema_text(self, where: str = "request") -> str | None:
        """Structured output as the engines take it: the JSON schema as canonical JSON text,
        "{}" for any JSON object (json_object), None for free text."""
        kind = (self.response_format or {}).get("type")
        if kind not in ("json_object", "json_schema"):
            return None
        schema = {}
        if kind == "json_schema":
            schema = (self.response_format.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise UserError(f"{where}: response_format json_schema needs a \"schema\" object")
        return json.dumps(schema, sort_keys=True, separators=(",", ":"))

    def record(self) -> dict:
        """Effective parameters as a fine-tuned record's ``generation`` field shows them, and
        its fingerprint hashes them: these names and this shape, whatever the fields' names,
        so records made before stay reusable on resume."""
        out = {"max_new_tokens": self.max_tokens, "do_sample": self.do_sample,
               "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
               "num_return_sequences": self.n, "stop": list(self.stop or ())}
        if self.logprobs:
            out.update(logprobs=True, top_logprobs=self.top_logprobs)
        schema = self.schema_text()
        if schema is not None:
            out["json_schema"] = schema
        return out


# --- command-line flags --------------------------------------------------------------


def flag_type(name: str) -> Callable[[str], Any]:
    """An argparse ``type=`` for the parameter ``name``: the text as a number (or an
    integer) inside ``RANGES[name]``; anything else is argparse's usage error (exit 2)."""
    spec = RANGES[name]
    kind = spec[0]

    def parse(text: str):
        try:
            value = int(text) if kind == "integer" else float(text)
        except ValueError:
            noun = "an integer" if kind == "integer" else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}; {_wanted(spec)}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number; {_wanted(spec)}")
        if value_problem(spec, value):
            raise argparse.ArgumentTypeError(f"{text} is out of range; {_wanted(spec)}")
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def stop_flag(text: str) -> str:
    """An argparse ``type=`` for one stop sequence: any non-empty text."""
    if not text:
        raise argparse.ArgumentTypeError(f"an empty stop sequence; {STOP_WANTED}")
    return text


temperature_flag = flag_type("temperature")
top_p_flag = flag_type("top_p")
n_flag = flag_type("n")
max_tokens_flag = flag_type("max_tokens")
seed_flag = flag_type("seed")
presence_penalty_flag = flag_type("presence_penalty")
frequency_penalty_flag = flag_type("frequency_penalty")
top_logprobs_flag = flag_type("top_logprobs")
