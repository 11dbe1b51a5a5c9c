"""The answer cache on the OpenAI route (``datagen.cache``, docs/cache.md): a rerun pays
only for the requests never answered before.

- ``--run``: every line of a part is looked up under ``openai_key(service, url, body)``
  in the namespace of its model (``split_part``); only the lines never answered are
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

Memory: one part at a time, a custom_id -> key dict per part; answers are streamed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from datagen.batchapi.batch_state import Manifest, Part
from datagen.batchapi.estimates import input_tokens, output_tokens
from datagen.batchapi.openai_client import is_success
from datagen.cache import AnswerCache, openai_key, resolve_cache_dir
from datagen.cache.segments import list_segments
from datagen.common import cli
from datagen.common.errors import UserError
from datagen.common.jsonl import dumps_bytes, loads, sha256_file, temp_path_beside

log = logging.getLogger("datagen")


def _requests(path: str | os.PathLike) -> Iterator[tuple[bytes, dict]]:
    """(raw line, parsed) for each request line of a batch input already checked by
    ``batchfile.check_batch_file``."""
    with open(path, "rb") as handle:
        for raw in handle:
            if raw.strip():
                yield raw, loads(raw)


def part_keys(part: Part, service: str) -> dict[str, str]:
    """custom_id -> cache key of every line of the part."""
    return {obj["custom_id"]: openai_key(service, obj["url"], obj["body"]) for _, obj in _requests(part.file)}


def line_keys(part: Part, service: str) -> list[str]:
    """The cache key of every line of the part, in order."""
    return [openai_key(service, obj["url"], obj["body"]) for _, obj in _requests(part.file)]


def split_part(cache: AnswerCache | None, service: str, part: Part, out=None, keys: list[str] | None = None,
               found=None) -> None:
    """Count the part's lines the cache answers (``part.cached``) and what is left to pay
    (``requests``, tokens); write those lines to ``out`` when given. A part answered
    whole becomes ``done`` with outcome ``cached``. ``keys``/``found``: the part's keys
    and the keys the cache holds, when looked up already."""
    keys = line_keys(part, service) if keys is None else keys
    if found is None:
        found = cache.lookup(part.model, set(keys)) if cache is not None else {}
    hasher = hashlib.sha256()
    requests = in_tokens = out_tokens = 0
    for key, (raw, obj) in zip(keys, _requests(part.file)):
        if key in found:
            continue
        requests += 1
        in_tokens += input_tokens(obj["body"])
        out_tokens += output_tokens(obj["url"], obj["body"])
        if out is not None:
            line = raw if raw.endswith(b"\n") else raw + b"\n"
            out.write(line)
            hasher.update(line)
    part.cached = len(keys) - requests
    part.requests, part.input_tokens, part.output_tokens = requests, in_tokens, out_tokens
    part.uploaded_sha256 = hasher.hexdigest() if out is not None and part.cached else None
    if not requests:
        part.state, part.outcome = "done", "cached"


def plan(cache: AnswerCache | None, service: str, parts: list[Part]) -> None:
    """Split every part before anything is sent (the cost and the fit count what is paid),
    with one lookup per model (each lookup reads the model's whole cache once; the keys of
    all its parts are held meanwhile, about 150 bytes a request)."""
    by_model = defaultdict(list)
    for part in parts:
        by_model[part.model].append(part)
    for model, group in by_model.items():
        if cache is None or not list_segments(cache.folder(model)):  # nothing of this model cached
            for part in group:
                if part.cached:  # planned with answers that are gone (or now without the cache)
                    split_part(None, service, part)
            continue
        keys = {id(part): line_keys(part, service) for part in group}
        found = cache.lookup(model, {key for part_keys in keys.values() for key in part_keys})
        for part in group:
            split_part(cache, service, part, keys=keys.pop(id(part)), found=found)


@contextlib.contextmanager
def upload_of(cache: AnswerCache | None, service: str, part: Part, folder: Path):
    """The file to upload for ``part`` (see the module docstring; ``plan`` split it
    before); None when the cache now answers all of it."""
    if cache is None or not cache.read:
        if part.cached:  # planned with the cache, submitted without: everything goes
            split_part(None, service, part)
        yield Path(part.file)
        return
    if not part.cached:  # planned with nothing to leave out: the part as it is
        yield Path(part.file)
        return
    with cli.held_signals():  # recorded for removal before a signal can leave it behind
        tmp = temp_path_beside(folder / f"{Path(part.file).name}.upload")
    try:
        with open(tmp, "wb") as out:
            split_part(cache, service, part, out)
        yield tmp if part.requests else None
    finally:
        tmp.unlink(missing_ok=True)


# --- --download ------------------------------------------------------------------------


def iso(stamp: int | None) -> str | None:
    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if stamp else None


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
        service, found, lost, wanted_total = self.manifest.service, CachedLines(), 0, 0
        by_id = {batch.id: batch for batch in batches}
        for part in self.manifest.parts:
            downloaded = [batch_id for batch_id in part.batches if batch_id in spans]
            if not downloaded and not part.cached:
                continue
            if not same_content(part):
                if part.cached:
                    raise UserError(f"{part.file} is gone or changed since --run, and {part.cached:,} of its answers "
                                    "come from the answer cache; put the file back as it was, or download with --id")
                log.warning("%s is gone or changed since --run: its answers are not put in the answer cache",
                            part.file)
                continue
            keys = part_keys(part, service)
            present = set()
            for batch_id in downloaded:
                batch, (out_start, out_end, err_start, err_end) = by_id[batch_id], spans[batch_id]
                for line in _lines_in(out_path, out_start, out_end):
                    custom_id = line.get("custom_id")
                    present.add(custom_id)
                    if self.writer is not None and is_success(line) and custom_id in keys:
                        self.writer.put(part.model, keys[custom_id], {
                            "id": line.get("id"), "response": line["response"], "batch_id": batch.id,
                            "created": iso(batch.created_at)})
                present.update(line.get("custom_id") for line in _lines_in(err_path, err_start, err_end))
            if not part.cached:
                continue
            if self.reader is None:
                raise UserError(f"{part.cached:,} requests of {part.file} were answered from the answer cache at "
                                "--run, and --no_cache does not read it; download without --no_cache")
            wanted = defaultdict(list)
            for custom_id, key in keys.items():
                if custom_id not in present:
                    wanted[key].append(custom_id)
            written = 0
            for key, value in self.reader.get_many(part.model, wanted):
                if not isinstance(value.get("response"), dict):
                    continue
                for custom_id in wanted[key]:
                    out.write(dumps_bytes(cached_line(custom_id, value)) + b"\n")
                    written += 1
                found.batches.add(value.get("batch_id"))
            lost += max(0, part.cached - written)
            wanted_total += part.cached
            found.lines += written
            found.parts.append({"source_file": Path(part.file).name, "source_sha256": part.sha256, "lines": written})
        if lost:
            raise UserError(f"{lost:,} of the {wanted_total:,} answers {output} takes from the answer cache are gone "
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
