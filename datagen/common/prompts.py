"""Rows of a prompts file (``datagen.common.prompt_files``: JSONL, JSON, CSV/TSV, Parquet, a
saved Hugging Face dataset) into prompts, the same way for both routes.

``Prompt`` is what both routes need from a row: the ``custom_id``, a plain ``text``
or a chat ``messages`` conversation, an optional ``system`` prompt, and the row's own
fields (the user's metadata). ``PromptOptions`` says how a row becomes a ``Prompt``
(a text field, a conversation, or a template over the row's columns);
``add_prompt_args`` defines its flags once for every script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from datagen.common.cli import add_flag
from datagen.common.errors import UserError
from datagen.common.jsonl import cell_text
from datagen.common.prompt_files import FORMATS, Row, iter_rows  # noqa: F401  (Row, iter_rows: used through here too)

ROLES = ("system", "developer", "user", "assistant", "tool")


# --- rows into prompts -----------------------------------------------------------


@dataclass
class Prompt:
    custom_id: str
    text: str | None = None  # a plain prompt (completions, embeddings, or one user turn)
    messages: list[dict] | None = None  # a whole conversation, as given
    system: str | None = None  # the --system_prompt, kept apart so each endpoint places it
    row: dict = field(default_factory=dict)  # the user's fields, for joins downstream
    where: str = ""

    def chat_messages(self) -> list[dict]:
        """The conversation for a chat endpoint: the system prompt first, then the turns."""
        turns = self.messages if self.messages is not None else [{"role": "user", "content": self.text}]
        return ([{"role": "system", "content": self.system}] if self.system else []) + list(turns)


def request_digest(messages: list[dict]) -> str:
    """The sha256 (hex) of what a request asked, the same on both routes: its messages as
    (role, text) pairs, OpenAI's "developer" role as "system", content parts joined into
    text (a plain prompt is one user message). A fine-tuned record's ``request_sha256``;
    reformat_results.py checks it against the batch input or prompts file it is given."""
    pairs = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text") or "" for part in content
                              if isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"))
        role = message.get("role")
        pairs.append(["system" if role == "developer" else role, content if isinstance(content, str) else ""])
    text = json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class PromptOptions:
    prompt_field: str = "prompt"
    messages_field: str = "messages"
    id_field: str | None = None
    template: str | None = None
    system: str | None = None

    def template_fields(self) -> list[str]:
        """The column names the template's ``{...}`` placeholders name; a malformed template is a UserError."""
        return [name for _, name in self.template_parts() if name is not None]

    def template_parts(self) -> list[tuple[str, str | None]]:
        """The template as (literal text, column name or None) pairs. A placeholder is a
        column name as written (``{lora_a.status}``, ``{gpt-4o-mini}``, ``{my field}``: no
        attribute or index access); ``{{``/``}}`` are literal braces."""
        if self.template is None:
            return []
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as exc:
            raise UserError(f"--prompt_template is malformed ({exc}); write literal braces as {{{{ and }}}}") from None
        parts = []
        for literal, name, spec, conversion in parsed:
            if name is not None and (spec or conversion or name == ""):
                kind = "has a format spec" if spec else "has a conversion" if conversion else "is positional"
                field_text = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
                raise UserError(f"--prompt_template field {{{field_text}}} {kind}; write plain {{name}} fields "
                                "(and {{ }} for literal braces)")
            parts.append((literal, name))
        if all(name is None for _, name in parts):
            raise UserError("--prompt_template has no {field} placeholder; name at least one row field")
        return parts


def add_prompt_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The flags that say how a prompts file's rows become prompts (shared by both routes)."""
    group = parser.add_argument_group("prompts file")
    add_flag(group, "input_format", default="auto", choices=FORMATS,
             help="kind of --input_file; auto: by extension")
    add_flag(group, "split", default=None, help="split of a saved DatasetDict (default: train)")
    add_flag(group, "prompt_field", default="prompt", help="row field holding the prompt text")
    add_flag(group, "messages_field", default="messages",
             help="row field holding a conversation [{role, content}, ...]")
    add_flag(group, "id_field", default=None, help="row field to use as custom_id (default: request-<row>)")
    add_flag(group, "prompt_template", default=None,
             help="prompt from row fields, e.g. 'Q: {question}\\nA:' ({{ }}: literal braces); "
                  "\\n, \\t and \\\\ mean newline, tab and backslash")
    system = group.add_mutually_exclusive_group()
    add_flag(system, "system_prompt", default=None,
             help="system prompt before every conversation; \\n, \\t and \\\\ mean newline, tab and backslash")
    add_flag(system, "system_prompt_file", default=None, help="file holding the system prompt, taken as written")
    return group


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` as newline, tab and one backslash, as a shell user
    means them in ``'Question: {q}\\nAnswer:'``; any other backslash stays as written."""
    return re.sub(r"\\([nt\\])", lambda match: _ESCAPES[match.group(1)], text)


def options_from_args(args: argparse.Namespace) -> PromptOptions:
    """``PromptOptions`` from the flags: escapes in --prompt_template and --system_prompt
    interpreted (not in --system_prompt_file), the template checked before any row is read."""
    system = unescape(args.system_prompt) if args.system_prompt is not None else None
    if args.system_prompt_file:
        try:
            system = Path(args.system_prompt_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UserError(f"--system_prompt_file {args.system_prompt_file}: cannot read it ({exc.strerror})") from None
        if not system:
            raise UserError(f"--system_prompt_file {args.system_prompt_file} is empty; put the system prompt in it")
    template = unescape(args.prompt_template) if args.prompt_template is not None else None
    options = PromptOptions(args.prompt_field, args.messages_field, args.id_field, template, system)
    options.template_fields()  # fail on a malformed template before reading any row
    return options


def _fields(data: dict) -> str:
    names = list(data)
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return shown or "none"


def _conversation(value: Any) -> Any:
    """A conversation written as JSON text (a CSV cell: how a --compare table writes its
    prompt column) as its list of messages; any other value as it is."""
    if isinstance(value, str) and value.startswith("[{") and value.endswith("}]"):
        try:
            messages = json.loads(value)
        except ValueError:
            return value
        if all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            return messages
    return value


def _validate_messages(messages: Any, where: str, name: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: field {name!r} must be a non-empty list of {{role, content}} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"{where}: {name}[{i}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise UserError(f"{where}: {name}[{i}] has role {message['role']!r}; use one of {', '.join(ROLES)}")
    return messages


def row_id(row: Row, id_field: str | None) -> str:
    """The row's custom_id: its ``id_field`` value as text, else ``request-<row index>``."""
    data = row.data
    if not id_field:
        return f"request-{row.index}"
    if data.get(id_field) in (None, ""):
        raise UserError(f"{row.where}: no id in field {id_field!r} (--id_field); "
                        f"the row has fields: {_fields(data)}")
    value = data[id_field]
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise UserError(f"{row.where}: id field {id_field!r} must be text or an integer, "
                        f"got {type(value).__name__}")
    return str(value)


def row_to_prompt(row: Row, options: PromptOptions) -> Prompt:
    """Turn one row into a Prompt, or raise a UserError that names the row and its fields."""
    data = row.data
    prompt = Prompt(row_id(row, options.id_field), system=options.system, row=data, where=row.where)
    if options.template is not None:  # then the prompt and messages fields are not read at all
        pieces = []
        for literal, name in options.template_parts():
            pieces.append(literal)
            if name is None:
                continue
            if name not in data:
                raise UserError(f"{row.where}: --prompt_template placeholder {{{name}}} is not a field of this row; "
                                f"the row has fields: {_fields(data)}")
            pieces.append(cell_text(data[name]))
        prompt.text = "".join(pieces)
    elif options.prompt_field in data and data[options.prompt_field] is not None:
        text = _conversation(data[options.prompt_field])
        if isinstance(text, list):  # a conversation in the prompt field, as --compare tables hold it
            prompt.messages = _validate_messages(text, row.where, options.prompt_field)
        elif not isinstance(text, str):
            raise UserError(f"{row.where}: field {options.prompt_field!r} must be text or a list of "
                            f"{{role, content}} messages, got {type(text).__name__}")
        else:
            prompt.text = text
    elif options.messages_field in data and data[options.messages_field] is not None:
        prompt.messages = _validate_messages(_conversation(data[options.messages_field]), row.where,
                                             options.messages_field)
    else:
        raise UserError(f"{row.where}: no {options.prompt_field!r} field (--prompt_field) and no "
                        f"{options.messages_field!r} field (--messages_field); the row has fields: {_fields(data)}")
    if prompt.text is not None and not prompt.text.strip():
        raise UserError(f"{row.where}: empty prompt; every row needs some text to send")
    if prompt.messages and options.system and prompt.messages[0]["role"] in ("system", "developer"):
        raise UserError(f"{row.where}: the conversation already starts with a {prompt.messages[0]['role']} "
                        "message; drop --system_prompt or that message")
    return prompt


def iter_prompts(path: str | os.PathLike, options: PromptOptions, fmt: str = "auto",
                 split: str | None = None) -> Iterator[Prompt]:
    """Stream ``Prompt``s from a prompts file; an empty file is a UserError."""
    count = 0
    for row in iter_rows(path, fmt, split):
        count += 1
        yield row_to_prompt(row, options)
    if count == 0:
        raise UserError(f"{path}: no rows; the prompts file needs at least one prompt")
