"""What a batch request costs: the token estimates the enqueued-token limit is checked
with (the client and the local stand-in share them), and dollar figures.

- ``estimate_tokens(url, body)``: estimated input tokens (``input_tokens``: text characters
  / 4, a non-ASCII character one token, schemas and tools as JSON) plus the output cap
  (``output_tokens``: the body's token cap x n).
- ``cost_usd(input_tokens, output_tokens, input_price, output_price)``: the one dollar
  computation, for the dry-run estimate, the ``--max_cost`` cap (``check_cost``) and the
  tokens the batches used (``report_usage``); ``add_price_args`` (``--input_price`` /
  ``--output_price``) and ``usd`` for the reports.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from datagen.common.cli import add_flag, number
from datagen.common.errors import UserError
from datagen.common.params import CHAT, MAX_TOKENS_FIELD

CHARS_PER_TOKEN = 4  # rough English average: the token estimates are characters / 4, rounded up
MESSAGE_OVERHEAD_CHARS = 4 * CHARS_PER_TOKEN  # a chat format spends about 4 tokens per message


def _text_chars(value: Any) -> int:
    """Characters of text in a prompt, input, instructions or messages value (message
    contents and content parts included, plus a per-message overhead). A non-ASCII
    character counts as a whole token (CJK, Cyrillic, emoji: about one token each or
    more), so the estimate does not fall to a quarter of the bill on such text."""
    if isinstance(value, str):
        return len(value) + (CHARS_PER_TOKEN - 1) * (len(value) - len(value.encode("ascii", "ignore")))
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, dict):
                inner = item.get("content") if "content" in item else item.get("text")
                total += _text_chars(inner) + (MESSAGE_OVERHEAD_CHARS if "role" in item else 0)
            else:
                total += _text_chars(item)
        return total
    return 0


SCHEMA_FIELDS = ("response_format", "text", "tools")  # sent to the model as input tokens too


def input_tokens(body: dict) -> int:
    """Estimated input tokens of one request body: its text characters / 4 (a non-ASCII
    character one token), plus its schema and tools as JSON, rounded up (at least 1)."""
    chars = sum(_text_chars(body.get(key)) for key in ("messages", "input", "prompt", "instructions"))
    chars += sum(len(json.dumps(body[key], ensure_ascii=False)) for key in SCHEMA_FIELDS if body.get(key))
    return max(1, -(-chars // CHARS_PER_TOKEN))


def output_tokens(url: str, body: dict) -> int:
    """The most output tokens one request may produce: its token cap x n (0 without a cap)."""
    cap = body.get(MAX_TOKENS_FIELD.get(url, "max_tokens"))
    if url == CHAT and cap is None:
        cap = body.get("max_tokens")  # the older spelling chat still takes
    n = body.get("n") if isinstance(body.get("n"), int) else 1
    return cap * n if isinstance(cap, int) and not isinstance(cap, bool) else 0


def estimate_tokens(url: str, body: dict) -> int:
    """Tokens one request counts against a model's enqueued-token limit: estimated input
    tokens plus the requested output cap. The client and the local stand-in share it."""
    return input_tokens(body) + output_tokens(url, body)


def add_price_args(group) -> None:
    """--input_price / --output_price (USD per 1M tokens), for cost estimates and reports."""
    add_flag(group, "input_price", type=number(0), default=None, metavar="USD",
             help="price per 1M input tokens, for the cost estimate")
    add_flag(group, "output_price", type=number(0), default=None, metavar="USD",
             help="price per 1M output tokens; the estimate assumes --max_tokens x n per request")


def usd(amount: float) -> str:
    """Dollars: cents from $1 up; below, 4 decimals or more, to show 2 significant digits
    ($0.5000, $0.00012, $0.000000001)."""
    if amount >= 1 or not amount > 0 or not math.isfinite(amount):
        return f"${amount:,.2f}" if amount >= 1 else f"${amount:.4f}"
    whole, fraction = f"{amount:.{max(4, 1 - math.floor(math.log10(amount)))}f}".split(".")
    return f"${whole}.{fraction[:4]}{fraction[4:].rstrip('0')}"


def cost_usd(input_tokens: int, output_tokens: int, input_price: float | None, output_price: float | None) -> float:
    """Dollars for tokens at prices in USD per 1M tokens (a price not given counts 0)."""
    return (input_tokens * (input_price or 0) + output_tokens * (output_price or 0)) / 1e6


def check_cost(parts: list, max_cost: float | None, input_price: float | None, output_price: float | None) -> None:
    """Refuse a run whose whole input (``parts`` with ``input_tokens`` and ``output_tokens``)
    is estimated over ``max_cost`` (USD)."""
    if max_cost is None:
        return
    if input_price is None or output_price is None:
        raise UserError("--max_cost needs --input_price and --output_price (USD per 1M tokens) to estimate the cost")
    if not all(p.output_tokens for p in parts):
        raise UserError("--max_cost: some requests set no output cap, so their cost has no bound; make the batch "
                        "input with create_batchinput.py --max_tokens N")
    inputs, outputs = sum(p.input_tokens for p in parts), sum(p.output_tokens for p in parts)
    cost = cost_usd(inputs, outputs, input_price, output_price)
    if not (math.isfinite(cost) and math.isfinite(max_cost)):  # nan > cap is False: never let it through
        raise UserError(f"--max_cost: the cost estimate is {cost} against a cap of {max_cost}; give finite prices "
                        "and cap")
    if cost > max_cost:
        raise UserError(f"the whole input is estimated at up to {usd(cost)} ({inputs:,} input + at most "
                        f"{outputs:,} output tokens), over --max_cost {usd(max_cost)}; nothing was "
                        "submitted: raise --max_cost or submit fewer requests")


def usage_of(batch) -> dict:
    """The token counts of a batch's ``usage`` (empty when the service sends none)."""
    usage = batch.usage
    if usage is None:
        return {}
    cached = getattr(getattr(usage, "input_tokens_details", None), "cached_tokens", 0) or 0
    reasoning = getattr(getattr(usage, "output_tokens_details", None), "reasoning_tokens", 0) or 0
    return {"input_tokens": usage.input_tokens or 0, "cached_tokens": cached, "output_tokens": usage.output_tokens or 0,
            "reasoning_tokens": reasoning, "total_tokens": usage.total_tokens or 0}


def report_usage(usages: list[dict], input_price: float | None, output_price: float | None) -> None:
    """Print the tokens the batches used (the sum of their ``usage``) and, given prices, the cost."""
    total = Counter()
    for usage in usages:
        total.update(usage)
    print(f"tokens used: {total['input_tokens']:,} input ({total['cached_tokens']:,} cached) + "
          f"{total['output_tokens']:,} output ({total['reasoning_tokens']:,} reasoning) = "
          f"{total['total_tokens']:,} tokens")
    if input_price is not None or output_price is not None:
        cost = cost_usd(total["input_tokens"], total["output_tokens"], input_price, output_price)
        print(f"cost: {usd(cost)} at the prices given (input {input_price or 0} and output "
              f"{output_price or 0} USD per 1M tokens; cached input counted at the input price)")
