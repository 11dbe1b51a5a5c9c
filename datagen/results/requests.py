"""The original requests of a reformat run (a batch input or a prompts file) and the fields kept from them.

``batch_input_requests`` and ``prompts_file_requests`` give ``(custom_id, where, fields)``
in file order (``prompts_file_rows`` too, without a prompt: no prompt flag needed), with
``prompt`` (``PROMPT_FIELD``) the input the model saw as ``{role, content}`` messages
(``prompt_messages``); ``Requests`` says which of them a run joins to; ``keep_values`` and
``merge_keep`` make the ``--keep_fields`` values JSON bytes for the store and the output.
``asked_of`` reads what a fine-tuned record says it asked (``request_sha256``,
``prompts.request_digest``), checked against the ``prompt`` of its id
(``ResultStore.asked_elsewhere``; ``asked_refusal`` when it differs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from datagen.batchapi.batchfile import resolve_batch_files
from datagen.common import prompts
from datagen.common.errors import UserError
from datagen.common.jsonl import dumps, dumps_bytes, iter_jsonl_objects, loads
from datagen.results.answers import _content_text
from datagen.results.runs import record_details

PROMPT_FIELD = "prompt"  # the --keep_fields name for the input the model saw


def prompt_messages(value: Any, system: Any = None) -> list[dict]:
    """An input as the list of ``{"role", "content"}`` text messages the model saw, the
    system message first: a conversation as it is (content parts joined into text), a
    plain text as one user message, ``system`` (``--system_prompt``, responses'
    ``instructions``) before them."""
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    items = value if isinstance(value, list) and all(isinstance(v, (dict, str)) for v in value) else [value]
    for item in items:
        if isinstance(item, dict):
            role = item.get("role") if isinstance(item.get("role"), str) else "user"
            messages.append({"role": role, "content": _content_text(item.get("content")) or ""})
        elif item is not None:
            messages.append({"role": "user", "content": item if isinstance(item, str) else dumps(item)})
    return messages


def body_prompt(body: dict) -> list[dict]:
    """The input of a batch request body (chat messages, responses input and
    instructions, completions prompt, embeddings input) as ``prompt_messages``."""
    for key in ("messages", "input", "prompt"):
        if key in body:
            return prompt_messages(body[key], body.get("instructions") if key == "input" else None)
    return []


def batch_input_requests(path: str | os.PathLike) -> Iterator[tuple[str, str, dict]]:
    """``(custom_id, where, fields)`` of a batch input file (or its numbered parts).

    ``fields`` are the request body's fields plus ``prompt`` (``body_prompt``). Only what
    the join needs is checked (an object with a custom_id and a body), so that reading a
    million requests stays fast; create_batchinput.py checked the rest when it wrote them.
    """
    for part in resolve_batch_files(path):
        for line_number, obj in iter_jsonl_objects(part):
            custom_id, body = obj.get("custom_id"), obj.get("body")
            if not isinstance(custom_id, str) or not custom_id or not isinstance(body, dict):
                raise UserError(f"{part}:{line_number}: not a batch request line; a batch line is "
                                '{"custom_id", "method": "POST", "url", "body"} (make it with create_batchinput.py)')
            yield custom_id, f"{part}:{line_number}", {**body, PROMPT_FIELD: body_prompt(body)}


def prompts_file_requests(prompts: Iterable) -> Iterator[tuple[str, str, dict]]:
    """``(custom_id, where, fields)`` of a prompts file's ``Prompt``s: the row's fields,
    with ``prompt`` the input as sent (template filled, system prompt first)."""
    for prompt in prompts:
        text = prompt.text if prompt.text is not None else prompt.messages
        yield prompt.custom_id, prompt.where, {**prompt.row, PROMPT_FIELD: prompt_messages(text, prompt.system)}


def prompts_file_rows(path: str | os.PathLike, id_field: str | None, fmt: str = "auto",
                      split: str | None = None) -> Iterator[tuple[str, str, dict]]:
    """``(custom_id, where, fields)`` of a prompts file's rows, without building prompts:
    for runs that keep no ``prompt``, so that no prompt flag is asked for."""
    count = 0
    for row in prompts.iter_rows(path, fmt, split):
        count += 1
        yield prompts.row_id(row, id_field), row.where, row.data
    if count == 0:
        raise UserError(f"{path}: no rows; the prompts file needs at least one row")


@dataclass
class Requests:
    """The original requests: ``rows`` give the order and the expected ids (a batch
    input or a prompts file); ``metadata`` (a prompts file, beside a batch input) adds
    its fields, joined by custom_id. ``flag`` names them in messages."""

    rows: Iterable[tuple[str, str, dict]]
    flag: str
    metadata: Iterable[tuple[str, str, dict]] | None = None
    metadata_flag: str = "--prompts_file"
    # The file whose rows' ``prompt`` is the input as sent (a batch input; a prompts file read
    # with the prompt flags): fine-tuned records that say what they asked must match it.
    asked_in: str | None = None


def asked_of(obj: dict) -> str | None:
    """What a fine-tuned record (raw, or reformatted: in its details) says it asked, if it does."""
    asked, details = obj.get("request_sha256"), obj.get("details")
    # Most details hold no request_sha256: parsed only when their text names it.
    if asked is None and (isinstance(details, dict) or isinstance(details, str) and '"request_sha256"' in details):
        asked = record_details(obj).get("request_sha256")
    return asked if isinstance(asked, str) and asked else None


def asked_refusal(found: tuple, files: list, requests: Requests) -> UserError:
    """``ResultStore.asked_elsewhere``'s find as the one-line refusal."""
    file, custom_id, where, mismatched, checked = found
    name = files[file] if 0 <= file < len(files) else "the results"
    hint = ", read with the prompt flags they were made with" if requests.flag == "--prompts_file" else ""
    return UserError(f"{name}: {mismatched} of {checked} answers were made for other prompts than {requests.flag} "
                     f"{requests.asked_in} has (first: {custom_id}, {where}): reformat them against the input "
                     f"they were made from{hint}")


def keep_values(fields: dict, names: Iterable[str], types: dict[str, set[str]], found: set[str]) -> bytes:
    """The JSON object of the ``names`` that ``fields`` has (absent ones left out)."""
    values = {}
    for name in names:
        if name in fields:
            found.add(name)
            values[name] = fields[name]
            types[name].add(type(fields[name]).__name__)
    return dumps_bytes(values)


def merge_keep(keep_fields: list[str], request_keep: bytes | None, meta_keep: bytes | None) -> bytes | None:
    """The kept fields of one line in ``keep_fields`` order (null where neither side has
    one); the prompts file's fields win over the batch body's."""
    if not keep_fields:
        return None
    values = loads(request_keep) if request_keep else {}
    if meta_keep:
        values.update(loads(meta_keep))
    return dumps_bytes({name: values.get(name) for name in keep_fields})
