"""The fine-tuned route's generations file: records, their fingerprints, resume and order.

- A **record** is one JSON line per request: ``custom_id``, ``generated_text``,
  ``finish_reason``, ``prompt_tokens``, ``completion_tokens`` (the sum over the samples,
  as OpenAI counts it), ``samples`` (n > 1: each sample's text, finish reason and
  tokens), provenance (``source``, ``run`` (the adapter's NAME, or ``base``), ``model``, ``model_sha256``, ``adapter``,
  ``adapter_sha256``, ``engine``, ``generation``, ``created``), ``request_sha256`` (what it
  asked: ``prompts.request_digest``) and a ``fingerprint``. A request that cannot be
  answered is a record too: ``error: {code, message}`` in place of the text, like an
  OpenAI error line (``failed_record``).
- The **fingerprint** says what made a record, one short hash per part: ``model`` (the
  base model's resolved folder, its config and a sample of its weight files),
  ``adapter`` (its config and weights), ``engine`` (engine, dtype, merged or not),
  ``generation`` (the effective parameters) and ``input`` (the exact token ids the model
  saw, so the prompt as rendered by the chat template). ``ResumeCheck`` reuses a record
  only when every part matches, and otherwise says which part differs.
- ``exclusive`` locks the output file itself (its real path, through any symlink), so
  two runs never append to one file; ``restore_input_order`` puts a finished file back
  in input order.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datagen.cache import utc_date
from datagen.finetuned.engine import BASE, Sample
from datagen.common.errors import UserError
from datagen.common.jsonl import AppendJsonl, atomic_writer, iter_jsonl, repair_torn_tail, sha256_file  # noqa: F401

log = logging.getLogger("datagen")

PARTS = ("model", "adapter", "engine", "generation", "input")  # the fingerprint's parts, in order
WHAT_DIFFERS = {"model": "the base model differs", "adapter": "the adapter (config or weights) differs",
                "engine": "the engine (its dtype, merge setting, or how it decodes and seeds) differs",
                "generation": "the generation parameters differ",
                "input": "the prompt as the model saw it (rendered, tokenized) differs",
                "run": "the run name differs (--adapter_path NAME=PATH)"}
SAMPLE_BYTES = 1 << 20  # of each weight file, hashed at both ends: a retrained model shows there
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def digest(obj: Any) -> str:
    """A short, stable hash of JSON-serialisable data (16 hex digits of sha256)."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def input_digest(token_ids: list[int] | None, fallback: Any = None) -> str:
    """The hash of the exact input: the token ids, or (when the prompt never became
    tokens, e.g. a chat template refused it) the request's text."""
    if token_ids is None:
        return digest(fallback)
    return hashlib.sha256(array("q", token_ids).tobytes()).hexdigest()[:16]


def model_sha256(folder: Path) -> str:
    """A hash of a model folder that changes when the model does, without reading every byte
    of a 100 GB checkpoint: config files in full, and each weight file's name, size and
    first and last megabyte (its header, and weights a retraining changes)."""
    hasher = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".json":
            hasher.update(f"{path.name}\n".encode() + path.read_bytes())
        elif path.suffix in WEIGHT_SUFFIXES:
            size = path.stat().st_size
            hasher.update(f"{path.name}:{size}\n".encode())
            with open(path, "rb") as handle:
                hasher.update(handle.read(SAMPLE_BYTES))
                handle.seek(max(0, size - SAMPLE_BYTES))
                hasher.update(handle.read(SAMPLE_BYTES))
    return hasher.hexdigest()


@dataclass(frozen=True)
class Provenance:
    """What made the records of one run, apart from each request's parameters and input."""

    model: str  # as given
    model_path: str  # the folder it loaded from, resolved (for a hub id: the snapshot of its revision)
    model_sha256: str
    adapter: str | None
    adapter_sha256: str | None  # of the weights file
    adapter_digest: str | None  # of config and weights together
    engine: dict  # {"name", "dtype", "merged", "decoding", versions, device...}
    # The parts of ``engine`` a fingerprint holds: "decoding" says how the engine decodes and
    # seeds (records made before it was recorded are refused on resume).
    engine_key: tuple = ("name", "dtype", "merged", "decoding")
    run: str = BASE  # the run's name: the adapter's NAME (--adapter_path NAME=PATH), or "base"

    def static_parts(self) -> dict:
        return {"model": digest([self.model_path, self.model_sha256]), "adapter": self.adapter_digest,
                "engine": digest({k: self.engine.get(k) for k in self.engine_key})}

    def fields(self) -> dict:
        return {"source": "finetuned", "run": self.run, "model": self.model, "model_sha256": self.model_sha256,
                "adapter": self.adapter, "adapter_sha256": self.adapter_sha256, "engine": self.engine}


def fingerprint(provenance: Provenance, generation: dict, input_hash: str) -> dict:
    return {**provenance.static_parts(), "generation": digest(generation), "input": input_hash}


def make_record(custom_id: str, samples: list[Sample], prompt_tokens: int, provenance: Provenance,
                generation: dict, input_hash: str, created: int, ignored: tuple = (),
                request_sha256: str | None = None) -> dict:
    """One answered request; ``completion_tokens`` sums the samples, as OpenAI's usage does;
    ``request_sha256``: what it asked (``prompts.request_digest``), checked by reformat_results.py."""
    first = samples[0]
    record = {"custom_id": custom_id, "generated_text": first.text, "finish_reason": first.finish_reason,
              "prompt_tokens": prompt_tokens, "completion_tokens": sum(s.completion_tokens for s in samples)}
    if first.logprobs is not None:
        record["logprobs"] = {"content": first.logprobs}  # per token, as an OpenAI choice's logprobs
    if len(samples) > 1:
        record["samples"] = [{"text": s.text, "finish_reason": s.finish_reason, "completion_tokens": s.completion_tokens,
                              **({"logprobs": {"content": s.logprobs}} if s.logprobs is not None else {})}
                             for s in samples]
    return _made_by(record, provenance, generation, input_hash, created, ignored, request_sha256)


def _made_by(record: dict, provenance: Provenance, generation: dict, input_hash: str, created: int,
             ignored: tuple, request_sha256: str | None) -> dict:
    """A record's fields after its answer: provenance, what it ignored and asked, parameters, fingerprint."""
    record.update(provenance.fields())
    if ignored:
        record["ignored_fields"] = list(ignored)
    if request_sha256:
        record["request_sha256"] = request_sha256
    record.update(generation=generation, fingerprint=fingerprint(provenance, generation, input_hash),
                  created=created)
    return record


ANSWER_FIELDS = ("generated_text", "finish_reason", "prompt_tokens", "completion_tokens", "logprobs", "samples")


def cache_value(record: dict) -> dict:
    """What the answer cache keeps of an answered record: its answer, and where it came from."""
    return {"answer": {k: record[k] for k in ANSWER_FIELDS if k in record},
            "created": record["created"], "run": record["run"], "custom_id": record["custom_id"]}


def cached_record(value: dict, custom_id: str, provenance: Provenance, generation: dict, input_hash: str,
                  created: int, ignored: tuple = (), request_sha256: str | None = None) -> dict:
    """The record of a request answered from the cache: the cached answer with this run's id,
    provenance, parameters and fingerprint, and ``cached``: where the answer came from."""
    record = {"custom_id": custom_id, **{k: value["answer"][k] for k in ANSWER_FIELDS if k in value["answer"]}}
    _made_by(record, provenance, generation, input_hash, created, ignored, request_sha256)
    record["cached"] = {"created": utc_date(value.get("created")),  # when, as the OpenAI route says it
                        **{k: value[k] for k in ("run", "custom_id") if k in value}}
    return record


def failed_record(custom_id: str, code: str, message: str, prompt_tokens: int | None, provenance: Provenance,
                  generation: dict, input_hash: str, created: int, request_sha256: str | None = None) -> dict:
    """A request the engine could not answer, with its reason (like an OpenAI error line)."""
    record = {"custom_id": custom_id, "error": {"code": code, "message": message}}
    if prompt_tokens is not None:
        record["prompt_tokens"] = prompt_tokens
    record.update(provenance.fields())
    if request_sha256:
        record["request_sha256"] = request_sha256
    record.update(generation=generation, fingerprint=fingerprint(provenance, generation, input_hash),
                  created=created)
    return record


# --- resume ----------------------------------------------------------------------------


class ResumeCheck:
    """The records already in an output file, checked against what this run would make.

    Holds, per ``custom_id``, the index of its static parts (few distinct values) and its
    input hash; a file of a million records costs some hundred megabytes at most.
    """

    def __init__(self, output: Path, shown: Path | None = None, run: str | None = None):
        self.output = output
        self.run = run  # this run's name: a record of another name is not this run's
        self.shown = shown or output  # the name the user gave, for messages
        self._statics: dict[tuple, int] = {}
        self._static_list: list[tuple] = []
        self.records: dict[str, tuple[int, str | None]] = {}
        self.mismatched: dict[str, str] = {}  # custom_id -> the first part that differs
        if not output.exists():
            return
        from datagen.common.cli import refuse_non_regular

        refuse_non_regular(output, "--output_file")  # reading a device or FIFO never ends
        cut = repair_torn_tail(output)
        if cut:
            log.warning("%s: removed a partial last line (%d bytes) left by a killed run", self.shown, cut)
        for line_number, obj in iter_jsonl(output):
            if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
                raise UserError(f"{output}:{line_number}: not a generations record (no custom_id); "
                                "is --output_file the right file?")
            print_ = obj.get("fingerprint")
            if not isinstance(print_, dict):
                static, input_hash = ("missing",), None
            else:
                static = (*(print_.get(p) for p in PARTS[:-1]), obj.get("run"))
                input_hash = print_.get("input")
            index = self._statics.setdefault(static, len(self._statics))
            if index == len(self._static_list):
                self._static_list.append(static)
            self.records.setdefault(obj["custom_id"], (index, input_hash))

    def __contains__(self, custom_id: str) -> bool:
        return custom_id in self.records

    def compare(self, custom_id: str, expected: dict) -> bool:
        """True when the record of ``custom_id`` was made as ``expected`` says (a fingerprint)."""
        index, input_hash = self.records[custom_id]
        static = self._static_list[index]
        if static == ("missing",):
            self.mismatched[custom_id] = "missing"
            return False
        for part, value in zip(PARTS, (*static[:-1], input_hash)):
            if value != expected[part]:
                self.mismatched[custom_id] = part
                return False
        if static[-1] is not None and self.run is not None and static[-1] != self.run:  # older records: no name
            self.mismatched[custom_id] = "run"
            return False
        return True

    def refusal(self, checked: int) -> str:
        """The one-line reason to refuse resuming, naming what differs and what to do."""
        reasons = Counter(self.mismatched.values())
        first = next(iter(self.mismatched))
        said = ", ".join(("made by a version of this suite that wrote no fingerprint" if part == "missing"
                          else WHAT_DIFFERS[part]) + f" ({count})" for part, count in reasons.most_common())
        return (f"{self.shown}: {len(self.mismatched)} of the {checked} records already there for this input "
                f"were made differently: {said} (first: {first}); write to a new --output_file, or pass "
                f"--regenerate_mismatched to regenerate exactly those {len(self.mismatched)} "
                f"(the old ones are moved to {replaced_path(self.output).name})")


def replaced_path(output: Path) -> Path:
    """Where regenerated records' old versions go (no .jsonl suffix: globs of results skip it)."""
    return output.with_name(output.name + ".replaced")


def move_out(output: Path, custom_ids: set[str]) -> Path:
    """Move the records of ``custom_ids`` from ``output`` to its ``.replaced`` file (kept,
    appended), rewriting ``output`` atomically without them."""
    target = replaced_path(output)
    with open(output, "rb") as source, atomic_writer(output, "wb") as kept, AppendJsonl(target) as moved:
        for line in source:
            if not line.strip():
                continue
            if json.loads(line).get("custom_id") in custom_ids:
                moved.write(json.loads(line))
            else:
                kept.write(line)
    return target


# --- the lock and the order ----------------------------------------------------------------


@contextlib.contextmanager
def exclusive(output: Path):
    """Hold a lock so two runs never append to the same file at once, whatever path each
    names it by (a symlink, ``./g.jsonl`` or an absolute path, a hard link).

    The lock file sits beside the output's real path; the output itself, when it exists,
    is locked too (a hard link is the same inode). The lock file is removed on release
    while still locked; a run that locked a file just removed that way notices (another
    inode) and tries again.
    """
    real = Path(os.path.realpath(output))
    lock_path = real.with_name(f".{real.name}.lock")
    while True:
        handle = open(lock_path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"{output} is being written by another run (lock {lock_path}); "
                            "wait for it, or give another --output_file") from None
        try:
            if os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    data = None
    try:
        if real.is_file():
            data = open(real, "rb")
            try:
                fcntl.flock(data, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"{output} is being written by another run (through another name for the "
                                "same file); wait for it, or give another --output_file") from None
        yield real
    finally:
        if data is not None:
            data.close()
        with contextlib.suppress(OSError):
            lock_path.unlink()
        handle.close()


def restore_input_order(output: Path, ids: list[str]) -> None:
    """Rewrite a finished output file in input order (atomic; only when every id is in it).

    Batches finish in length order; once all are done the file is put back in the
    input's order, holding only each line's offset in memory. Records whose id is not
    in this input (an earlier run on another input) are kept, at the end.
    """
    offsets: dict[str, int] = {}
    others: list[int] = []
    with open(output, "rb") as handle:
        position = 0
        for line in handle:
            if line.strip():
                custom_id = json.loads(line).get("custom_id")
                if custom_id in offsets:
                    others.append(position)
                else:
                    offsets[custom_id] = position
            position += len(line)
    if any(custom_id not in offsets for custom_id in ids):
        return  # not finished: leave the file as it is
    wanted = set(ids)
    order = [offsets[c] for c in ids] + sorted([pos for c, pos in offsets.items() if c not in wanted] + others)
    if order == sorted(order):
        return  # already in order
    with open(output, "rb") as source, atomic_writer(output, "wb") as target:
        for pos in order:
            source.seek(pos)
            target.write(source.readline())


def count_records(path: Path) -> int:
    """Lines in a generations file (0 when it does not exist)."""
    if not path.exists():
        return 0
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())

