"""What an answer is keyed by: a sha256 of canonical JSON of everything that made it.

- ``openai_key(service, url, body)``: the service the request went to (the base URL's
  host[:port], ``service_of(base_url)``: an Azure deployment and OpenAI never share), the
  endpoint and the request body exactly as sent (the model and every parameter included).
- ``finetuned_key(fingerprint, input_ids, seed)``: the record's fingerprint (model,
  adapter, engine, effective parameters: the caller decides what goes in), the exact
  token ids the model saw and the seed.

Canonical JSON is the standard library's (sorted keys, no spaces, UTF-8 kept as is), so a
key never depends on whether orjson is installed or on the order of a body's fields. Each
key also holds its route and a format version: the two routes never share a key.

Entries are grouped by a namespace (the model name, or the fine-tuned model+adapter,
``finetuned_namespace``) so one model's answers are listed and cleared without reading
the others; ``namespace_folder`` is its folder's name: a filesystem-safe slug plus a
short hash (two names with the same slug still get two folders).
"""

from __future__ import annotations

import hashlib
import json
import re
from urllib.parse import urlsplit

FORMAT = 1  # bump when what goes into a key changes: old entries then simply never hit
KEY_PATTERN = re.compile(r"[0-9a-f]{64}")
DEFAULT_SERVICE = "api.openai.com"


def canonical_json(obj) -> bytes:
    """Sorted keys, no spaces, UTF-8 as is; NaN and infinity refused (ValueError)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def key_of(material: dict) -> str:
    """The 64-hex sha256 of ``material``'s canonical JSON."""
    return hashlib.sha256(canonical_json(material)).hexdigest()


def service_of(base_url: str | None) -> str:
    """The host[:port] a base URL points at, lower-cased (no user, no path):
    ``https://myazure.openai.azure.com/openai/v1/`` -> ``myazure.openai.azure.com``;
    None or "" (the SDK's default) -> ``api.openai.com``."""
    if not base_url:
        return DEFAULT_SERVICE
    parts = urlsplit(base_url if "//" in base_url else f"//{base_url}")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"no host in the base URL {base_url!r}")
    host = f"[{host}]" if ":" in host else host  # an IPv6 address keeps its brackets
    default_port = {"https": 443, "http": 80}.get(parts.scheme)
    return host if parts.port in (None, default_port) else f"{host}:{parts.port}"


def openai_key(service: str, url: str, body: dict) -> str:
    """The key of one Batch API request: service (``service_of``), endpoint, exact body."""
    return key_of({"route": "openai", "format": FORMAT, "service": service, "url": url, "body": body})


def finetuned_key(fingerprint: dict, input_ids: list[int], seed: int | None) -> str:
    """The key of one fine-tuned generation: what made it, the exact input ids, the seed."""
    return key_of({"route": "finetuned", "format": FORMAT, "fingerprint": fingerprint,
                   "input_ids": [int(i) for i in input_ids], "seed": seed})


def finetuned_namespace(model: str, adapter: str | None = None) -> str:
    """The namespace of a fine-tuned run: ``model`` or ``model+adapter``."""
    return f"{model}+{adapter}" if adapter else model


def namespace_folder(namespace: str) -> str:
    """The folder name of a namespace: a readable slug and 10 hex digits of its sha256."""
    if not namespace:
        raise ValueError("a namespace must not be empty")
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "_", namespace).strip("._")[:60] or "ns"
    return f"{slug}-{hashlib.sha256(namespace.encode('utf-8')).hexdigest()[:10]}"


def check_key(key: str) -> str:
    """``key`` when it is 64 lower-case hex digits (what the functions above return)."""
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise ValueError(f"not a cache key (64 lower-case hex digits): {key!r}")
    return key
