"""The answers of the local Batch API stand-in: deterministic fake model output in the
shapes the real endpoints return. Chat, responses and completions answer
``echo: <last user message>``; embeddings a vector made from the text. A token is a
whitespace-separated word (``_tokens``); an answer longer than the request's output cap
(``max_completion_tokens`` / ``max_tokens`` / ``max_output_tokens``) is cut to the cap,
with ``finish_reason: "length"`` (responses: ``status: "incomplete"``, reason
``max_output_tokens``), as the real endpoints do. A prompt holding ``[fail]`` gets a 400
line, one holding ``[timeout]`` an ``error`` line with no response, the two shapes of
per-request failure the real output and error files use.
"""

from __future__ import annotations

import hashlib
import secrets

EMBEDDING_DIM = 8


def _last_user_text(url: str, body: dict) -> str:
    """The text a request asks about: its last user message, or its prompt/input text."""
    def content_text(content) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
        return ""

    if url == "/v1/chat/completions":
        users = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
        return content_text(users[-1].get("content")) if users else ""
    if url == "/v1/responses":
        value = body.get("input")
        if isinstance(value, str):
            return value
        users = [m for m in value or [] if isinstance(m, dict) and m.get("role", "user") == "user"]
        return content_text(users[-1].get("content")) if users else ""
    if url == "/v1/completions":
        value = body.get("prompt")
        return value if isinstance(value, str) else " ".join(map(str, value or []))
    value = body.get("input")
    return value if isinstance(value, str) else " ".join(map(str, value or []))


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


def _output_cap(url: str, body: dict) -> int | None:
    """The request's output-token cap, under the endpoint's own field name."""
    names = {"/v1/chat/completions": ("max_completion_tokens", "max_tokens"), "/v1/responses": ("max_output_tokens",),
             "/v1/completions": ("max_tokens",)}.get(url, ())
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _cut(reply: str, cap: int | None) -> tuple[str, bool]:
    """The reply cut to ``cap`` tokens (words), and whether it was cut."""
    words = reply.split()
    if cap is None or len(words) <= cap:
        return reply, False
    return " ".join(words[:cap]), True


def embedding_for(text: str) -> list[float]:
    """A deterministic unit-free vector from the text (same text, same vector)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [round(byte / 255.0 - 0.5, 6) for byte in digest[:EMBEDDING_DIM]]


def answer_body(url: str, body: dict, created: int, rid: str) -> dict:
    """The response body the real endpoint would send, with a deterministic answer."""
    model = body.get("model", "")
    text = _last_user_text(url, body)
    reply, cut = _cut(f"echo: {text}", _output_cap(url, body))
    prompt_tokens, completion_tokens = _tokens(text), _tokens(reply)
    finish = "length" if cut else "stop"
    if url == "/v1/chat/completions":
        n = int(body.get("n") or 1)
        return {
            "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": reply, "refusal": None,
                                                 "annotations": []},
                         "logprobs": None, "finish_reason": finish} for i in range(n)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens * n,
                      "total_tokens": prompt_tokens + completion_tokens * n},
            "service_tier": "default", "system_fingerprint": "fp_local",
        }
    if url == "/v1/responses":
        return {
            "id": f"resp_{rid}", "object": "response", "created_at": created,
            "status": "incomplete" if cut else "completed", "model": model, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "metadata": {}, "parallel_tool_calls": True, "temperature": body.get("temperature", 1.0),
            "top_p": body.get("top_p", 1.0), "tool_choice": "auto", "tools": [],
            "output": [
                {"type": "reasoning", "id": f"rs_{rid}", "summary": []},
                {"type": "message", "id": f"msg_{rid}", "status": "incomplete" if cut else "completed",
                 "role": "assistant",
                 "content": [{"type": "output_text", "text": reply, "annotations": [], "logprobs": []}]},
            ],
            "usage": {"input_tokens": prompt_tokens,
                      "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": prompt_tokens + completion_tokens},
        }
    if url == "/v1/completions":
        return {
            "id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": reply, "index": 0, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "system_fingerprint": "fp_local",
        }
    inputs = body.get("input")
    inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
    return {
        "object": "list", "model": model,
        "data": [{"object": "embedding", "index": i, "embedding": embedding_for(str(item))}
                 for i, item in enumerate(inputs)],
        "usage": {"prompt_tokens": sum(_tokens(str(i)) for i in inputs),
                  "total_tokens": sum(_tokens(str(i)) for i in inputs)},
    }


def answer_line(request: dict, created: int) -> dict:
    """One output or error-file line for one input request."""
    rid = secrets.token_hex(12)
    url, body = request["url"], request["body"]
    text = _last_user_text(url, body)
    line = {"id": f"batch_req_{rid}", "custom_id": request["custom_id"], "response": None, "error": None}
    if "[timeout]" in text:
        line["error"] = {"code": "request_timeout", "message": "The request timed out (local stand-in)."}
    elif "[fail]" in text:
        line["response"] = {"status_code": 400, "request_id": f"req_{rid}", "body": {"error": {
            "message": "Invalid prompt: it asked to fail (local stand-in).", "type": "invalid_request_error",
            "param": "messages", "code": "invalid_prompt"}}}
    else:
        line["response"] = {"status_code": 200, "request_id": f"req_{rid}",
                            "body": answer_body(url, body, created, rid)}
    return line
