"""Response bodies into answers: one pure function per OpenAI endpoint.

``chat_answer`` / ``responses_answer`` / ``completions_answer`` / ``embeddings_answer``
read one response body (the Batch API's, vLLM's or any OpenAI-compatible server's) into
an ``Answer``: texts in choice order, normalised finish reasons, refusal, tool calls or
embeddings, and token usage under one set of names (``usage_fields``). ``body_endpoint``
tells the endpoint from the body; ``body_answer`` picks the function by it. Nothing here
reads files or knows the output columns: ``datagen.results.lines`` builds records from
answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from datagen.common.errors import UserError


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


class BadNumber(ValueError):
    """A token count that is not a whole number of 0 or more (``body_answer`` adds file:line)."""


def token_count(value: Any, name: str) -> int | None:
    """A token count as reported: None when absent (null), else a whole number >= 0;
    anything else (text, a fraction, a negative number, true/false) is a ``BadNumber``,
    never read as 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadNumber(f"{name} must be a whole number of tokens (0 or more), got {value!r}; "
                        "fix the file or write null where the count is unknown")
    return value


def usage_fields(usage: Any) -> dict:
    """Token usage under one set of names, only those the body reports.

    chat/completions/embeddings: ``prompt_tokens``, ``completion_tokens``,
    ``completion_tokens_details.reasoning_tokens``; responses: ``input_tokens``,
    ``output_tokens``, ``output_tokens_details.reasoning_tokens``. A count that is not a
    whole number >= 0 raises ``BadNumber``.
    """
    if not isinstance(usage, dict):
        return {}
    out = {}
    for name, keys in (("prompt_tokens", ("prompt_tokens", "input_tokens")),
                       ("completion_tokens", ("completion_tokens", "output_tokens"))):
        for key in keys:
            value = token_count(usage.get(key), f"usage.{key}")
            if value is not None:
                out[name] = value
                break
    for key in ("completion_tokens_details", "output_tokens_details"):
        details = usage.get(key)
        if isinstance(details, dict):
            value = token_count(details.get("reasoning_tokens"), f"usage.{key}.reasoning_tokens")
            if value is not None:
                out["reasoning_tokens"] = value
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
                       if isinstance(part, dict) and part.get("type") in ("text", "output_text", "input_text"))
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
    try:
        return EXTRACTORS[endpoint](body)
    except BadNumber as exc:
        raise UserError(f"{where}: {exc}") from None
