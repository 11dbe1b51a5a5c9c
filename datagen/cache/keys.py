"""What an answer is keyed by: a sha256 of canonical JSON of everything that made it.

- ``openai_key(service, url, body)``: the service the request went to (the base URL's
  host[:port], ``service_of(base_url)``: an Azure deployment and OpenAI never share), the
  endpoint and the request body exactly as sent (the model and every parameter included),
  and the ``custom_id`` when the API samples the answer (``samples``), as the fine-tuned
  route keys a sampled request with its own seed.
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

import functools
import hashlib
import json
import re
from urllib.parse import urlsplit

FORMAT = 1  # bump when what goes into a key changes: old entries then simply never hit
KEY_PATTERN = re.compile(r"[0-9a-f]{64}")
DEFAULT_SERVICE = "api.openai.com"
# json.dumps builds an encoder per call when given options: one made once is about 30 % faster
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json(obj) -> bytes:
    """Sorted keys, no spaces, UTF-8 as is; NaN and infinity refused (ValueError)."""
    return _CANONICAL.encode(obj).encode("utf-8")


def digest_of(material: dict) -> bytes:
    """The sha256 of ``material``'s canonical JSON, as 32 bytes (a key in half the memory)."""
    return hashlib.sha256(canonical_json(material)).digest()


def key_of(material: dict) -> str:
    """The 64-hex sha256 of ``material``'s canonical JSON."""
    return digest_of(material).hex()


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


def samples(url: str, body: dict) -> bool:
    """Whether the API samples this request's answer: every endpoint but embeddings, unless
    temperature or top_p is 0 (no temperature means the API's default, 1)."""
    if url.endswith("/embeddings"):
        return False
    temperature, top_p = body.get("temperature"), body.get("top_p")
    return (temperature is None or temperature != 0) and (top_p is None or top_p != 0)


def openai_digest(service: str, url: str, body: dict, custom_id: str | None = None) -> bytes:
    """The key of one Batch API request (service, ``service_of``; endpoint; exact body) as 32
    bytes: the sha256 of the canonical JSON of ``{"route", "format", "service", "url", "body"}``.
    A request the API samples (``samples``) is keyed with its ``custom_id`` too: two rows
    asking the same thing are two samples, and each keeps its own answer."""
    material = b'{"body":' + canonical_json(body)
    if custom_id is not None and samples(url, body):
        material += b',"custom_id":' + canonical_json(custom_id)  # "custom_id" sorts after "body"
    return hashlib.sha256(material + _openai_tail(service, url)).digest()


@functools.lru_cache(maxsize=64)
def _openai_tail(service: str, url: str) -> bytes:
    """What follows the body in the canonical JSON of a request's key material ("body" sorts
    first): cut from that JSON itself, so the bytes are those of the whole dict (25 % faster)."""
    whole = canonical_json({"route": "openai", "format": FORMAT, "service": service, "url": url, "body": None})
    return whole[len(b'{"body":null'):]


def openai_key(service: str, url: str, body: dict, custom_id: str | None = None) -> str:
    """The key of one Batch API request, as 64 hex digits (``openai_digest(...).hex()``)."""
    return openai_digest(service, url, body, custom_id).hex()


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
