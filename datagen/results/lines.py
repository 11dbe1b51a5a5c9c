"""One raw result line of either route into a ``Result``: its output record, or a failed one.

Two kinds of raw line are read, recognised from their keys (``line_kind``):

- **OpenAI envelope** ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
  "error"}``: ``openai_result``. A line is a success only if ``response`` is present,
  ``status_code`` is 200 and ``error`` is null (the Batch API reports some failures in both
  places). ``fast_chat_record`` builds the common line (a one-choice chat success)
  directly, with the same record.
- **Fine-tuned generations** ``{"custom_id", "generated_text", "finish_reason", ...,
  "source": "finetuned"}``: ``finetuned_result``.

``PARSERS`` maps each kind to its function. ``output_record`` is the one output record
of every route (the columns of ``datagen.results.output.COLUMNS``), ``failed_line`` one
line of the failed file; ``ResultOptions`` can turn cut-off or empty answers into failures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from datagen.common.errors import UserError
from datagen.common.jsonl import dumps
from datagen.results.answers import Answer, BadNumber, body_answer, body_endpoint, token_count, usage_fields
from datagen.results.runs import finetuned_name

OPENAI, FINETUNED = "openai", "finetuned"
SOURCE_TYPES = ("auto", OPENAI, FINETUNED)
KIND_NAMES = {OPENAI: "an OpenAI batch result line (custom_id, response, error)",
              FINETUNED: "a fine-tuned generations line (custom_id, generated_text)"}


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


def compare_table_row(obj: dict) -> bool:
    """A row of a ``--compare`` table (wide: ``NAME.status`` columns; long: ``status``), which
    has no ``source`` column: a table of runs, not a run's results."""
    return "source" not in obj and ("status" in obj or any(key.endswith(".status") for key in obj))


def table_refusal(where: str) -> UserError:
    return UserError(f"{where}: a row of a --compare table (NAME.status columns, no source), not a run's "
                     "results; give each run's own files (its raw results or its reformatted output)")


def check_raw(obj: dict, where: str) -> None:
    """Refuse a line that is already reformatted, or a --compare table row, where raw results
    are read (``reformat_results.py --input_file``)."""
    if "custom_id" not in obj and "id" in obj:
        if compare_table_row(obj):
            raise table_refusal(where)
        if "generated_text" in obj:
            raise UserError(f"{where}: already reformatted (reformat_results.py's output, keyed by id); it needs "
                            "no --input_file run: use it as it is, or give it to --compare beside other runs")


def failed_line(custom_id: str, reason: str, *, status_code: int | None = None,
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
                  run: Any = None, adapter: Any = None, refusal: bool = False, usage: dict | None = None,
                  details: dict | str | None = None) -> dict:
    """The one output record of every route: every column of COLUMNS (datagen.results.output), none null.

    JSON has no types, so a column that is null in a file's first lines has none
    (``datasets`` then refuses the next file that has a value there): absent text is "",
    absent counts 0, and ``samples`` always holds every sample (one when n = 1).
    """
    usage = usage or {}
    return {"id": custom_id, "generated_text": texts[0] if texts else "", "source": source,
            "run": run if isinstance(run, str) else model if isinstance(model, str) else "",
            "model": model if isinstance(model, str) else "", "adapter": adapter if isinstance(adapter, str) else "",
            "finish_reason": (finish_reasons[0] if finish_reasons else None) or "", "refusal": refusal,
            "prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0),
            "reasoning_tokens": usage.get("reasoning_tokens", 0),
            "samples": [{"text": text, "finish_reason": reason or ""} for text, reason in zip(texts, finish_reasons)],
            "details": details if isinstance(details, str) else dumps(details or {})}


def _answer_record(custom_id: str, answer: Answer, endpoint: str, run: str | None, cached: Any = None) -> dict:
    details: dict[str, Any] = {"endpoint": endpoint}
    if isinstance(cached, dict):  # answered from the answer cache: the batch and date it came from
        details["cached"] = cached
    if answer.tool_calls:
        details["tool_calls"] = answer.tool_calls
    texts, reasons = answer.texts, answer.finish_reasons
    if answer.embeddings is not None:  # no text: the vectors go to details
        details["embeddings"] = answer.embeddings
        texts, reasons = [""], [""]
    elif len(reasons) < len(texts):
        reasons = reasons + [None] * (len(texts) - len(reasons))
    return output_record(custom_id, texts, reasons, source=OPENAI, model=answer.model, run=run,
                         refusal=answer.refusal, usage=answer.usage, details=details)


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
        result.record = failed_line(custom_id, "length", message=message,
                                      **{k: v for k, v in record.items() if k != "id"})
    elif empty and options.treat_empty_as_failure:
        result.ok = False
        result.record = failed_line(custom_id, "empty", message="the answer is empty",
                                      **{k: v for k, v in record.items() if k != "id"})
    return result


def openai_result(obj: dict, where: str, options: ResultOptions = ResultOptions(), run: str | None = None) -> Result:
    """One OpenAI-envelope line (output file, error file, vLLM run-batch) into a Result;
    ``run``: the model as requested (the download's sidecar), else the answer's model."""
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
        return Result(custom_id, False, failed_line(custom_id, "error", status_code=status, error_code=code,
                                                      message=message, source=OPENAI,
                                                      **({"run": run} if run else {})))
    answer = body_answer(body, where)  # raises for an unknown body: body_endpoint is known below
    if answer.error is not None:
        code, message = answer.error
        return Result(custom_id, False, failed_line(custom_id, "error", status_code=status, error_code=code,
                                                      message=message, source=OPENAI, model=answer.model,
                                                      run=run or answer.model))
    record = _answer_record(custom_id, answer, body_endpoint(body), run, obj.get("cached"))
    return _judge(custom_id, answer, record, options)


def finetuned_answer(obj: dict, where: str) -> Answer:
    """A fine-tuned generations line into an Answer (``samples`` when n > 1)."""
    text = obj.get("generated_text")
    if not isinstance(text, str):
        raise UserError(f"{where}: generated_text must be text, got {type(text).__name__}")
    try:
        usage = {k: token_count(obj.get(k), k) for k in ("prompt_tokens", "completion_tokens")}
        samples = obj.get("samples")
        if isinstance(samples, list):
            for k, sample in enumerate(samples):
                if isinstance(sample, dict):
                    token_count(sample.get("completion_tokens"), f"samples[{k}].completion_tokens")
    except BadNumber as exc:
        raise UserError(f"{where}: {exc}") from None
    answer = Answer(texts=[text], finish_reasons=[obj.get("finish_reason")], model=obj.get("model"),
                    usage={k: v for k, v in usage.items() if v is not None})
    if samples is not None:
        if not isinstance(samples, list) or not all(isinstance(s, dict) and isinstance(s.get("text"), str)
                                                    for s in samples):
            raise UserError(f"{where}: samples must be a list of {{text, finish_reason, completion_tokens}} objects")
        if len(samples) > 1:
            answer.texts = [sample["text"] for sample in samples]
            answer.finish_reasons = [sample.get("finish_reason") for sample in samples]
    return answer


FINETUNED_DETAILS = ("model_sha256", "adapter_sha256", "engine", "generation", "fingerprint",
                     "ignored_fields", "created", "request_sha256", "cached")


def finetuned_result(obj: dict, where: str, options: ResultOptions = ResultOptions(), run: str | None = None) -> Result:
    """A generations record into a Result; its run name is the record's own (``run`` is unused)."""
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise UserError(f"{where}: a fine-tuned generations line needs a non-empty custom_id string")
    if obj.get("error"):
        code, message = _error_parts(obj["error"])
        return Result(custom_id, False, failed_line(custom_id, "error", error_code=code, message=message,
                                                      source=FINETUNED, run=finetuned_name(obj),
                                                      model=obj.get("model"), adapter=obj.get("adapter")))
    answer = finetuned_answer(obj, where)
    details = {key: obj[key] for key in FINETUNED_DETAILS if key in obj}
    samples = obj.get("samples")
    if isinstance(samples, list) and len(samples) > 1:
        details["sample_completion_tokens"] = [sample.get("completion_tokens") for sample in samples]
    record = output_record(custom_id, answer.texts, answer.finish_reasons, source=FINETUNED, model=answer.model,
                           run=finetuned_name(obj), adapter=obj.get("adapter"), usage=answer.usage, details=details)
    return _judge(custom_id, answer, record, options)


PARSERS = {OPENAI: openai_result, FINETUNED: finetuned_result}


CHAT_DETAILS = dumps({"endpoint": "chat"})


def fast_chat_record(obj: dict, run: str | None = None) -> dict | None:
    """The common line, built directly: a one-choice chat success with text that ended
    with "stop". None for anything else, which the general path (``openai_result``) takes;
    both give the same record (tested)."""
    response = obj.get("response")
    if obj.get("error") is not None or type(response) is not dict or response.get("status_code") != 200 \
            or "cached" in obj:  # an answer from the answer cache: the general path keeps where it came from
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
    try:
        usage = usage_fields(body.get("usage"))
    except BadNumber:
        return None  # the general path says where
    return output_record(custom_id, [content], ["stop"], source=OPENAI, model=body.get("model"), run=run,
                         usage=usage, details=CHAT_DETAILS)
