"""The durable state of ``batch_utils.py --run``: the manifest, and the ids file that
shows it.

- ``last_batch_id.tok``: the ids of the batches of the last ``--run``, one per line
  (``load_batch_ids`` / ``read_ids_file``). ``--retry_failed`` adds a comment line
  ``# retry: FILE sha256=HEX`` so that the ``--run`` of FILE adds its ids beside the
  originals instead of replacing them.
- ``last_batch_id.manifest.json`` beside it (``manifest_path``): per part its file,
  sha256, uploaded file id, every batch id (refused ones included), state, counts and
  usage, and the lines the answer cache answered (``cached``: not uploaded; a part the
  cache answers whole is ``done`` with outcome ``cached`` and no batch). Every ``--run``
  writes it; ``save_state`` replaces the manifest and then the ids file (the current
  batch of every submitted part), both atomically. A rerun of
  ``--run --wait`` continues from it (``datagen.batchapi.batch_queue``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable

from datagen.common.errors import UserError
from datagen.common.jsonl import atomic_writer

log = logging.getLogger("datagen")

IDS_FILE = "last_batch_id.tok"  # the ids of the last --run, one per line
BATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{2,199}$")
PENDING_RETRY = re.compile(r"^# retry: (?P<name>.+) sha256=(?P<digest>[0-9a-f]{64})$")
MANIFEST_VERSION = 1
ENDED = ("done", "failed")  # part states that are final


# --- the batch ids file ---------------------------------------------------------------


@dataclass
class SavedIds:
    ids: list[str] = field(default_factory=list)
    pending: dict[str, str] = field(default_factory=dict)  # sha256 of a --retry_failed file -> its name


def read_ids_file(path: str | os.PathLike) -> SavedIds:
    """What the ids file holds; a missing or empty file holds nothing, a bad one is an error."""
    path = Path(path)
    if not os.path.lexists(path):
        return SavedIds()
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise UserError(f"{path} is not a regular file (a folder or a device); remove it, or pass "
                            "--ids_file FILE or --id BATCH_ID")
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is corrupt (not text); delete it and pass --id BATCH_ID") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror}); fix or remove it, or pass --id "
                        "BATCH_ID") from None
    saved = SavedIds()
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if line.startswith("#"):
            if match := PENDING_RETRY.match(line):
                saved.pending[match["digest"]] = match["name"]
            continue
        if not line:
            continue
        if not BATCH_ID.match(line):
            shown = line if len(line) <= 40 else line[:40] + "..."
            raise UserError(f"{path}:{number}: {shown!r} is not a batch id; the file is corrupt: fix or delete "
                            "it, or pass --id BATCH_ID")
        saved.ids.append(line)
    return saved


def load_batch_ids(path: str | os.PathLike) -> list[str]:
    """The batch ids saved by the last --run (at least one); anything else is an error."""
    if not os.path.lexists(path):
        raise UserError(f"no batch id: {path} does not exist here; pass --id BATCH_ID, or submit a batch "
                        "with --run first")
    ids = read_ids_file(path).ids
    if not ids:
        manifest, _ = load_manifest(manifest_path(path))
        if manifest is not None and manifest.parts and all(p.outcome == "cached" for p in manifest.parts):
            raise UserError(f"{path} holds no batch: the last --run ({manifest.input}) was answered whole from "
                            "the answer cache and submitted nothing; --download OUTPUT writes its answers")
        raise UserError(f"{path} is empty; pass --id BATCH_ID, or submit a batch with --run")
    return ids


def check_state_path(path: str | os.PathLike, flag: str = "--ids_file") -> Path:
    """A state file must be a regular file or absent: never rename over a folder or device."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_file():
        raise UserError(f"{flag} {path} exists and is not a regular file (a folder or a device); remove it or "
                        f"choose another {flag}")
    if not path.parent.exists():
        raise UserError(f"{flag} {path}: folder {path.parent} does not exist; create it first")
    return path


def _ids_file_text(ids: list[str], pending: dict[str, str] | None) -> str:
    lines = [f"{batch_id}\n" for batch_id in ids]
    lines += [f"# retry: {name} sha256={digest}\n" for digest, name in (pending or {}).items()]
    return "".join(lines)


def _not_saved(exc: OSError | UserError, path: str | os.PathLike, ids: list[str]) -> UserError:
    """Disk full or read-only: the new ids must not be lost with the file."""
    reason = f"{path}: {exc.strerror}" if isinstance(exc, OSError) else str(exc)
    return UserError(f"{reason}; the batch ids were not saved, note them: {', '.join(ids)} (pass them with --id)")


def save_batch_ids(path: str | os.PathLike, ids: list[str], pending: dict[str, str] | None = None) -> None:
    """Replace the ids file atomically: a crash leaves the old one or the new one, whole."""
    check_state_path(path)
    try:
        with atomic_writer(path) as handle:
            handle.write(_ids_file_text(ids, pending))
    except (OSError, UserError) as exc:
        raise _not_saved(exc, path, ids) from None


def parse_ids(values: Iterable[str]) -> list[str]:
    ids = []
    for value in values:
        for batch_id in value.split(","):
            batch_id = batch_id.strip()
            if not BATCH_ID.match(batch_id):
                raise UserError(f"--id {batch_id!r} is not a batch id (like batch_abc123)")
            ids.append(batch_id)
    return ids


# --- the manifest ----------------------------------------------------------------------


def manifest_path(ids_file: str | os.PathLike) -> Path:
    """``last_batch_id.tok`` -> ``last_batch_id.manifest.json`` (beside it)."""
    ids_file = Path(ids_file)
    return ids_file.with_name(ids_file.stem + ".manifest.json")


@dataclass
class Part:
    """One part file of a run. ``state``: waiting (never submitted), refused (back in the
    queue after ``token_limit_exceeded``), running, done (completed, expired or
    cancelled: see ``outcome``), failed (its input was refused)."""

    file: str
    sha256: str
    requests: int
    input_tokens: int
    output_tokens: int
    model: str
    url: str
    file_id: str | None = None
    batches: list[str] = field(default_factory=list)  # every batch made for it, oldest first
    refused: list[str] = field(default_factory=list)  # those that failed with token_limit_exceeded
    state: str = "waiting"
    outcome: str | None = None  # the final status of its last batch
    alone: bool = False  # no other part of its model ran when its last batch was created
    counts: dict = field(default_factory=dict)  # total, completed, failed of its last batch
    usage: dict = field(default_factory=dict)  # input, cached, output, reasoning, total tokens
    cached: int = 0  # lines the answer cache answered: not uploaded (requests and tokens count the uploaded ones)
    uploaded_sha256: str | None = None  # sha256 of what was uploaded when it was a subset of the file
    # not saved: what this process's look-up found (``batch_cache.Planned``), so its upload needs no second one
    planned: object = field(default=None, repr=False, compare=False, metadata={"saved": False})

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def batch_id(self) -> str | None:
        return self.batches[-1] if self.batches else None

    def done_requests(self) -> int:
        if self.state in ENDED:
            return self.requests
        return (self.counts.get("completed") or 0) + (self.counts.get("failed") or 0)


def saved_fields(part: Part) -> dict:
    """What the manifest keeps of a part: every field but those marked not saved."""
    return {f.name: getattr(part, f.name) for f in fields(part) if f.metadata.get("saved", True)}


@dataclass
class Manifest:
    path: Path
    input: str
    parts: list[Part]
    retry_of: list[str] = field(default_factory=list)  # the batches a --retry_failed file retries
    downloaded: str | None = None  # where the merged results were saved
    limits: dict[str, int] = field(default_factory=dict)  # model -> the enqueued-token limit a refusal stated
    wait: bool = True  # made by --run --wait (a queue its rerun continues), not by a plain --run
    service: str | None = None  # where the requests went (the answer cache's key), None before the cache

    def text(self) -> str:
        data = {"version": MANIFEST_VERSION, "input": self.input, "retry_of": self.retry_of,
                "downloaded": self.downloaded, "limits": self.limits, "wait": self.wait, "service": self.service,
                "parts": [saved_fields(part) for part in self.parts]}
        return json.dumps(data, indent=1) + "\n"

    def save(self) -> None:
        """Replace the manifest atomically: a crash leaves the old one or the new one, whole."""
        with atomic_writer(self.path) as handle:
            handle.write(self.text())

    def saved_ids(self) -> list[str]:
        """What the ids file shows: the batches retried, then the current batch of every submitted part."""
        return self.retry_of + [p.batch_id for p in self.parts if p.batch_id and p.batch_id not in p.refused]


def save_state(manifest: Manifest, ids_file: str | os.PathLike, pending: dict[str, str]) -> None:
    """The manifest, then the ids file; a fault names the ids so that they are not lost."""
    ids = manifest.saved_ids()
    check_state_path(ids_file)
    try:
        manifest.save()
        with atomic_writer(ids_file) as handle:
            handle.write(_ids_file_text(ids, pending))
    except (OSError, UserError) as exc:
        raise _not_saved(exc, ids_file, ids) from None


def load_manifest(path: Path) -> tuple[Manifest | None, bool]:
    """The manifest at ``path`` (None when absent) and whether it was torn or unreadable."""
    if not os.path.lexists(path):
        return None, False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        parts = [Part(**part) for part in data["parts"]]
        manifest = Manifest(path, data["input"], parts, list(data.get("retry_of") or []), data.get("downloaded"),
                            {str(k): int(v) for k, v in (data.get("limits") or {}).items()},
                            bool(data.get("wait", True)), data.get("service"))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s is torn or unreadable (%s); rebuilding it from the batches at the API", path,
                    type(exc).__name__)
        return None, True
    return manifest, False


def read_queue(ids_file: str | os.PathLike) -> Manifest | None:
    manifest, _ = load_manifest(manifest_path(ids_file))
    return manifest
