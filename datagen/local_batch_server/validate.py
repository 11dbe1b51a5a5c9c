"""The stand-in's check of a batch input file, line by line, as the Batch API does it."""

from __future__ import annotations

import json
from pathlib import Path

from datagen.batchapi.estimates import estimate_tokens

MAX_REQUESTS = 50_000


def validate_input(input_path: Path, endpoint: str, ids_path: Path) -> tuple[list[dict], int, str | None, int]:
    """Check every input line as the Batch API does; errors name their line. Writes each
    line's custom_id to ``ids_path`` (the error file of a cancelled or expired batch lists them);
    returns the errors, the request count, the batch's model and its estimated tokens."""
    errors: list[dict] = []
    seen: set[str] = set()
    model = None
    count = tokens = 0

    def error(code: str, line: int, message: str, param: str | None = None) -> None:
        if len(errors) < 100:
            errors.append({"code": code, "line": line, "message": message, "param": param})

    with open(input_path, "rb") as handle, open(ids_path, "w", encoding="utf-8") as ids:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                request = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                error("invalid_json_line", number, "This line is not parseable as valid JSON.")
                continue
            if not isinstance(request, dict):
                error("invalid_json_line", number, "This line is not a JSON object.")
                continue
            missing = [k for k in ("custom_id", "method", "url", "body") if k not in request]
            if missing:
                error("missing_required_parameter", number, f"Missing required parameter: '{missing[0]}'.",
                      missing[0])
                continue
            count += 1
            custom_id = request["custom_id"]
            if not isinstance(custom_id, str) or not custom_id:
                error("invalid_value", number, "'custom_id' must be a non-empty string.", "custom_id")
            elif custom_id in seen:
                error("duplicate_custom_id", number, f"The custom_id '{custom_id}' is used more than once "
                                                     "in this batch; custom_ids must be unique.", "custom_id")
            seen.add(custom_id if isinstance(custom_id, str) else "")
            ids.write(json.dumps(custom_id) + "\n")
            if request["method"] != "POST":
                error("invalid_value", number, "Only the POST method is supported.", "method")
            if request["url"] != endpoint:
                error("mismatched_endpoint", number, f"The url '{request['url']}' does not match the batch "
                                                     f"endpoint '{endpoint}'.", "url")
            body = request["body"]
            line_model = body.get("model") if isinstance(body, dict) else None
            if not isinstance(line_model, str) or not line_model:
                error("missing_required_parameter", number, "Missing required parameter: 'body.model'.",
                      "body.model")
            elif model is None:
                model = line_model
            elif line_model != model:
                error("mismatched_model", number, f"The model '{line_model}' differs from '{model}' on earlier "
                                                  "lines; a batch takes one model.", "body.model")
            if isinstance(body, dict):
                tokens += estimate_tokens(request["url"], body)
    if count == 0 and not errors:
        error("empty_file", None, "The input file has no requests.")
    if count > MAX_REQUESTS:
        error("too_many_requests", None, f"The input file has {count:,} requests; the limit is "
                                         f"{MAX_REQUESTS:,} per batch.")
    return errors, count, model, tokens
