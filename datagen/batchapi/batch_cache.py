"""The answer cache on the OpenAI route (``datagen.cache``, docs/cache.md): a rerun pays
only for the requests never answered before.

- ``--run``: every line of a part is looked up under ``openai_key(service, url, body)``
  in the namespace of its model (``plan``); only the lines never answered are
  uploaded (``upload_of``: the part itself when none was answered, else a temporary file
  of the others in the state folder, removed on the way out, on an error or Ctrl+C too).
  The manifest keeps the part (file and sha256, which the batch metadata and the
  provenance name), ``cached`` (lines not uploaded) and what was uploaded (``requests``,
  tokens, ``uploaded_sha256``); a part answered whole is ``done`` (outcome ``cached``).
- ``--download``: ``RunAnswers.complete`` puts every successful line of the run's batches
  in the cache under its request's key (``{"id", "response", "batch_id", "created"}``;
  errors, expired and cancelled requests never), then appends the cached answers of the
  lines that were not uploaded, in the Batch API's output shape with their own
  ``custom_id`` and ``"cached": {"batch_id", "created"}`` (``cached_line``). An answer
  the cache lost since ``--run`` is one error and nothing is written.

Memory and time: the keys are 32-byte digests, looked up many at a time: one scan of a
model's cache per group of its parts, at ``--run`` (``plan``: groups of at most
``KEYS_PER_SCAN`` lines, ``scan_groups``; the upload of a part then uses what the plan
found, ``Planned``) and at ``--download`` (``CachedWriter``: about ``ANSWERS_PER_SCAN``
lines, their answers read in the same pass). What is held is bounded by those two
numbers (plus one part), whatever the size of the input or of the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

from datagen.batchapi.batch_state import Manifest, Part
from datagen.batchapi.estimates import input_tokens, output_tokens
from datagen.batchapi.openai_client import is_success
from datagen.cache import AnswerCache, resolve_cache_dir, utc_date
from datagen.cache.keys import openai_digest
from datagen.common import cli
from datagen.common.errors import UserError
from datagen.common.jsonl import dumps_bytes, loads, sha256_file, temp_path_beside

log = logging.getLogger("datagen")

KEYS_PER_SCAN = 250_000  # keys one scan of a model's cache looks for at --run: about 30 MB
ANSWERS_PER_SCAN = 125_000  # the same at --download, where each key also holds its custom_id: about 30 MB


def _raw_requests(path: str | os.PathLike) -> Iterator[bytes]:
    """Each request line of a batch input already checked by ``batchfile.check_batch_file``."""
    with open(path, "rb") as handle:
        for raw in handle:
            if raw.strip():
                yield raw


def _keyed_lines(part: Part, service: str) -> Iterator[tuple[str, bytes]]:
    """(custom_id, cache key as 32 bytes) of every line of the part, in order."""
    for raw in _raw_requests(part.file):
        obj = loads(raw)
        yield obj["custom_id"], openai_digest(service, obj["url"], obj["body"], obj["custom_id"])


def line_digests(part: Part, service: str) -> list[bytes]:
    """The cache key of every line of the part, in order."""
    return [key for _, key in _keyed_lines(part, service)]


def part_keys(part: Part, service: str) -> dict[str, bytes]:
    """custom_id -> cache key of every line of the part."""
    return dict(_keyed_lines(part, service))


def scan_groups(parts: list[Part]) -> Iterator[list[Part]]:
    """The parts in groups of one model of at most ``KEYS_PER_SCAN`` lines (a bigger part alone)."""
    by_model = defaultdict(list)
    for part in parts:
        by_model[part.model].append(part)
    for group in by_model.values():
        chunk, lines = [], 0
        for part in group:
            if chunk and lines + part.requests + part.cached > KEYS_PER_SCAN:
                yield chunk
                chunk, lines = [], 0
            chunk.append(part)
            lines += part.requests + part.cached
        yield chunk


class Planned(NamedTuple):
    """What ``plan`` found for a part: the numbers of its lines to upload, and the cache's
    segments that hold the answers of the others (if one is gone, the upload looks up again)."""
    lines: list[int]
    segments: frozenset[str]


def split_part(part: Part, lines: list[int] | None = None, out=None) -> None:
    """Count the part's lines to pay, those numbered ``lines`` (its request lines from 0,
    ascending; None: all), in ``requests`` and tokens, and the others in ``part.cached``
    (the cache answers them); write the lines to pay to ``out`` when given. A part answered
    whole becomes ``done`` with outcome ``cached``."""
    chosen = None if lines is None else set(lines)
    hasher = hashlib.sha256()
    total = requests = in_tokens = out_tokens = 0
    for number, raw in enumerate(_raw_requests(part.file)):
        total += 1
        if chosen is not None and number not in chosen:
            continue
        obj = loads(raw)
        requests += 1
        in_tokens += input_tokens(obj["body"])
        out_tokens += output_tokens(obj["url"], obj["body"])
        if out is not None:
            line = raw if raw.endswith(b"\n") else raw + b"\n"
            out.write(line)
            hasher.update(line)
    part.cached = total - requests
    part.requests, part.input_tokens, part.output_tokens = requests, in_tokens, out_tokens
    part.uploaded_sha256 = hasher.hexdigest() if out is not None and part.cached else None
    if not requests:
        part.state, part.outcome = "done", "cached"


def plan(cache: AnswerCache | None, service: str, parts: list[Part]) -> None:
    """Split every part before anything is sent (the cost and the fit count what is paid),
    with one scan of a model's cache per group of parts (``scan_groups``)."""
    for group in scan_groups(parts):
        model = group[0].model
        if cache is None or not cache.holds(model):  # nothing of this model cached
            for part in group:
                if part.cached:  # planned with answers that are gone (or now without the cache)
                    split_part(part)
            continue
        keys = [line_digests(part, service) for part in group]
        wanted = dict.fromkeys(key for part_keys in keys for key in part_keys)
        segments = frozenset(location.segment for _, _, location in cache.take(model, wanted))
        for part, part_keys in zip(group, keys):  # what is left in ``wanted``: the keys the cache lacks
            lines = [number for number, key in enumerate(part_keys) if key in wanted]
            split_part(part, lines)
            part.planned = Planned(lines, segments) if part.cached else None


def lines_to_upload(cache: AnswerCache, service: str, part: Part) -> list[int]:
    """What ``plan`` found in this process, while the segments it found answers in are all
    there; else the part is looked up again (a cleared cache: everything goes)."""
    planned = part.planned
    if isinstance(planned, Planned) and all(os.path.exists(segment) for segment in planned.segments):
        return planned.lines
    keys = line_digests(part, service)
    wanted = dict.fromkeys(keys)
    for _ in cache.take(part.model, wanted):  # taken out of ``wanted``: it keeps the keys the cache lacks
        pass
    return [number for number, key in enumerate(keys) if key in wanted]


@contextlib.contextmanager
def upload_of(cache: AnswerCache | None, service: str, part: Part, folder: Path):
    """The file to upload for ``part`` (see the module docstring; ``plan`` split it
    before); None when the cache now answers all of it."""
    if cache is None or not cache.read:
        if part.cached:  # planned with the cache, submitted without: everything goes
            split_part(part)
        yield Path(part.file)
        return
    if not part.cached:  # planned with nothing to leave out: the part as it is
        yield Path(part.file)
        return
    lines = lines_to_upload(cache, service, part)
    with cli.held_signals():  # recorded for removal before a signal can leave it behind
        tmp = temp_path_beside(folder / f"{Path(part.file).name}.upload")
    try:
        with open(tmp, "wb") as out:
            split_part(part, lines, out)
        yield tmp if part.requests else None
    finally:
        tmp.unlink(missing_ok=True)


# --- --download ------------------------------------------------------------------------


def cached_line(custom_id: str, value: dict) -> dict:
    """A cached answer as a Batch API output line of this run's ``custom_id``."""
    return {"id": value.get("id"), "custom_id": custom_id, "response": value["response"], "error": None,
            "cached": {"batch_id": value.get("batch_id"), "created": value.get("created")}}


def _lines_in(path: Path, start: int, end: int) -> Iterator[dict]:
    with open(path, "rb") as handle:
        handle.seek(start)
        while handle.tell() < end:
            raw = handle.readline()
            if not raw:
                break
            try:
                line = loads(raw) if raw.strip() else None
            except ValueError:  # not JSON: it stays in the output as it came, and is never cached
                continue
            if isinstance(line, dict):
                yield line


@dataclass
class CachedLines:
    """What a download took from the cache (for the report and the sidecar)."""
    lines: int = 0
    batches: set = field(default_factory=set)  # the batches those answers came from
    parts: list = field(default_factory=list)  # {"source_file", "source_sha256", "lines"} per part

    def sidecar(self) -> dict:
        return {"lines": self.lines, "from_batches": sorted(b for b in self.batches if b), "parts": self.parts}


class CachedWriter:
    """Writes the cached answers of a download's lines not uploaded, in the cache's order:
    it gathers, per model, key -> (part number, custom_id, part number, custom_id...) (a
    request may be in the input twice), and takes them from the cache in one scan once
    ``ANSWERS_PER_SCAN`` are waiting, and at ``finish``."""

    def __init__(self, reader: AnswerCache, out):
        self.reader, self.out = reader, out
        self.waiting: dict[str, dict[bytes, tuple]] = defaultdict(dict)
        self.parts: list[int] = []  # the numbers of the parts added, in order
        self.written: Counter = Counter()  # part number -> cached lines written
        self.batches: set = set()  # the batches those answers came from

    def add(self, model: str, number: int, keys: dict[str, bytes], present: set) -> None:
        """The lines of part ``number`` (custom_id -> key) that its batches did not answer."""
        self.parts.append(number)
        waiting = self.waiting[model]
        for custom_id, key in keys.items():
            if custom_id not in present:
                waiting[key] = waiting.get(key, ()) + (number, custom_id)
        if len(waiting) >= ANSWERS_PER_SCAN:
            self.write(model)

    def write(self, model: str) -> None:
        for _, owners, value in self.reader.take_values(model, self.waiting.pop(model)):
            if not isinstance(value.get("response"), dict):
                continue
            for number, custom_id in zip(owners[::2], owners[1::2]):
                self.out.write(dumps_bytes(cached_line(custom_id, value)) + b"\n")
                self.written[number] += 1
            self.batches.add(value.get("batch_id"))

    def finish(self) -> None:
        for model in list(self.waiting):
            self.write(model)


class RunAnswers:
    """A run's manifest at ``--download``, with the cache (None with ``--no_cache``: it
    neither reads nor writes)."""

    def __init__(self, manifest: Manifest, cache: AnswerCache | None):
        self.manifest = manifest
        self.writer = cache
        self.reader = AnswerCache(cache.root) if cache is not None else None  # reads even with --refresh_cache

    def complete(self, out, out_path: Path, err_path: Path, spans: dict[str, tuple], batches: list,
                 output: Path) -> CachedLines:
        """Put the downloaded successes in the cache; append the cached answers of the
        lines not uploaded to ``out``. ``spans``: batch id -> byte ranges of its lines in
        ``out_path`` and ``err_path``."""
        by_id = {batch.id: batch for batch in batches}
        cached = CachedWriter(self.reader, out) if self.reader is not None else None
        for number, part in enumerate(self.manifest.parts):
            downloaded = [by_id[batch_id] for batch_id in part.batches if batch_id in spans]
            if not downloaded and not part.cached:
                continue
            if not same_content(part):
                if part.cached:
                    raise UserError(f"{part.file} is gone or changed since --run, and {part.cached:,} of its answers "
                                    "come from the answer cache; put the file back as it was, or download with --id")
                log.warning("%s is gone or changed since --run: its answers are not put in the answer cache",
                            part.file)
                continue
            keys = part_keys(part, self.manifest.service)
            present = self.keep(part, keys, downloaded, [spans[batch.id] for batch in downloaded], out_path,
                                err_path)
            if not part.cached:
                continue
            if cached is None:
                raise UserError(f"{part.cached:,} requests of {part.file} were answered from the answer cache at "
                                "--run, and --no_cache does not read it; download without --no_cache")
            cached.add(part.model, number, keys, present)
        return self.taken(cached, output)

    def keep(self, part: Part, keys: dict[str, bytes], downloaded: list, spans: list[tuple], out_path: Path,
             err_path: Path) -> set:
        """Put the successes of the part's downloaded batches in the cache; returns the
        custom_ids those batches answered or failed."""
        present = set()
        for batch, (out_start, out_end, err_start, err_end) in zip(downloaded, spans):
            for line in _lines_in(out_path, out_start, out_end):
                custom_id = line.get("custom_id")
                present.add(custom_id)
                if self.writer is not None and is_success(line) and custom_id in keys:
                    self.writer.put(part.model, keys[custom_id].hex(), {
                        "id": line.get("id"), "response": line["response"], "batch_id": batch.id,
                        "created": utc_date(batch.created_at)})
            present.update(line.get("custom_id") for line in _lines_in(err_path, err_start, err_end))
        return present

    def taken(self, cached: CachedWriter | None, output: Path) -> CachedLines:
        """Write what ``cached`` still gathers; what the cache gave, or one error when some
        answers are gone from it."""
        found = CachedLines()
        if cached is None:
            return found
        cached.finish()
        lost = wanted = 0
        for number in cached.parts:
            part, written = self.manifest.parts[number], cached.written[number]
            lost += max(0, part.cached - written)
            wanted += part.cached
            found.lines += written
            found.parts.append({"source_file": Path(part.file).name, "source_sha256": part.sha256, "lines": written})
        found.batches = cached.batches
        if lost:
            raise UserError(f"{lost:,} of the {wanted:,} answers {output} takes from the answer cache are gone "
                            f"from it (cleared since --run?); nothing was written: submit them again with python "
                            f"batch_utils.py --run --file {self.manifest.input}, then --wait --download {output}")
        return found


def same_content(part: Part) -> bool:
    """The part file is still what --run submitted (its keys are those of the requests sent)."""
    try:
        return sha256_file(part.file) == part.sha256
    except (OSError, UserError):
        return False


def answered_in_cache(model: str, keys: list[str]) -> set[str]:
    """The ``keys`` the answer cache holds, read only (nothing when it does not exist): what
    a dry run leaves out of what will be paid."""
    root = resolve_cache_dir()
    return set(AnswerCache(root, write=False).lookup(model, set(keys))) if root.is_dir() else set()


def answers_for(manifest: Manifest | None, ids: list[str], cache: AnswerCache | None) -> RunAnswers | None:
    """The run to complete when ``ids`` are the batches of the manifest's run (made with
    the cache: it knows the service), else None (batches downloaded by --id alone)."""
    if manifest is None or manifest.service is None or sorted(ids) != sorted(manifest.saved_ids()):
        return None
    return RunAnswers(manifest, cache)
