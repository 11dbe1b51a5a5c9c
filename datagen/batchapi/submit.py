"""Submitting batches: the one path of every ``--run``, with or without ``--wait``.

- ``open_run``: check every part file locally (``plan_parts``) and the ``--max_cost``
  cap before anything is sent; refuse a file whose content already has a live or
  completed batch among the saved ids and the recent batches (``refuse_resubmission``),
  unless ``--force``. A rerun of ``--run --wait`` on the same input instead continues its
  manifest, and batches of a part that the manifest does not know (a kill between
  creating a batch and saving, or a torn manifest) are found by the sha256 in their
  metadata and followed (``adopt``), so that no part is submitted twice.
- ``submit_part``: upload a part (once) and create its batch; the manifest and the ids
  file are saved before a signal can stop the run, and the batch joins the history.
- ``submit_all``: a plain ``--run``, every part at once; ``--run --wait`` paces them
  through the queue (``datagen.batchapi.batch_queue``), which submits with ``submit_part``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from datagen.batchapi import batch_cache, batchfile, provenance
from datagen.batchapi.batch_state import (Manifest, Part, check_state_path, load_manifest, manifest_path,
                                          read_ids_file, save_state)
from datagen.batchapi.estimates import check_cost
from datagen.batchapi.openai_client import BLOCKING, Session
from datagen.cache import AnswerCache
from datagen.common import cli
from datagen.common.errors import UserError
from datagen.common.jsonl import sha256_file

log = logging.getLogger("datagen")

RECENT = 100  # how many recent batches --run looks through for an earlier submission
METADATA_MAX = 512  # characters in one batch metadata value


@dataclass
class Run:
    manifest: Manifest
    pending: dict[str, str]  # the ids file's "# retry:" notes that stay
    continuing: bool  # a rerun of --run --wait on the same input
    cache: AnswerCache | None = None  # the answer cache (None with --no_cache)


def plan_parts(input_path: str, known: Manifest | None = None) -> list[Part]:
    """Check every part file locally and describe it; a file whose sha256 is in the
    ``known`` manifest was checked by an earlier run and is not read again."""
    checked = {p.sha256: p for p in known.parts} if known else {}
    parts = []
    for path in batchfile.resolve_batch_files(input_path):
        digest = sha256_file(path)
        if digest in checked and not checked[digest].cached:  # its counts are of the whole file
            old = checked[digest]
            parts.append(Part(str(path), digest, old.requests, old.input_tokens, old.output_tokens, old.model, old.url))
            continue
        summary = batchfile.check_batch_file(path)
        parts.append(Part(str(path), digest, summary.requests, summary.input_tokens, summary.output_tokens,
                          summary.model, summary.url))
    return parts


def check_parts_fit(parts: list[Part], max_enqueued_tokens: int | None) -> None:
    """A part over the enqueued-token limit on its own would be refused forever."""
    if max_enqueued_tokens is None:
        return
    for part in parts:
        if part.tokens > max_enqueued_tokens:
            raise UserError(f"{part.file}: about {part.tokens:,} tokens, over --max_enqueued_tokens "
                            f"{max_enqueued_tokens:,} on its own; split the input with create_batchinput.py "
                            f"--max_tokens_per_file {max_enqueued_tokens}")


def open_run(session: Session, args, cache: AnswerCache | None = None) -> Run:
    """Everything checked before the first upload; the manifest the run goes on with.
    The parts not yet submitted are looked up in the answer cache first: the cost, the
    fit and the submit lines count only the lines to pay (``batch_cache.split_part``)."""
    if args.description is not None and len(args.description) > METADATA_MAX:
        raise UserError(f"--description is {len(args.description)} characters; batch metadata values hold at most "
                        f"{METADATA_MAX}")
    ids_file = check_state_path(session.ids_file)
    path = check_state_path(manifest_path(ids_file), "--ids_file")
    old, torn = load_manifest(path)
    parts = plan_parts(args.file, old)
    saved = read_ids_file(ids_file)
    digests = {Path(p.file): p.sha256 for p in parts}
    follow = bool(args.wait)
    continuing = follow and old is not None and old.wait and \
        sorted(p.sha256 for p in old.parts) == sorted(digests.values())
    if continuing:
        manifest = old
        manifest.input = str(args.file)
        for part, new in zip(sorted(manifest.parts, key=lambda p: p.sha256), sorted(parts, key=lambda p: p.sha256)):
            part.file = new.file  # the same content may sit under a new name
    else:
        retry_of = saved.ids if any(d in saved.pending for d in digests.values()) else []
        manifest = Manifest(path, str(args.file), parts, retry_of, wait=follow)
    manifest.service = session.service
    reading = cache if cache is not None and cache.read else None
    batch_cache.plan(reading, manifest.service, [p for p in manifest.parts if p.state == "waiting" and
                                                  p.file_id is None and (reading is not None or p.cached)])
    check_cost(manifest.parts, args.max_cost, args.input_price, args.output_price)
    check_parts_fit(manifest.parts, args.max_enqueued_tokens)
    pending = {d: n for d, n in saved.pending.items() if d not in digests.values()} if manifest.retry_of else {}
    if continuing or (follow and torn):
        listed = session.list_batches(RECENT, "looking for this input's batches", True)
        adopt(session, manifest.parts, saved.ids, listed)
    elif not args.force:
        # --refresh_cache asks for new answers: only a live batch of the same content is refused.
        refreshing = cache is not None and not cache.read
        sent = {p.sha256: bool(p.cached) or refreshing for p in manifest.parts if p.requests}  # whole: nothing sent
        refuse_resubmission(session, {path: d for path, d in digests.items() if sent.get(d) is False}, saved.ids,
                            {path: d for path, d in digests.items() if sent.get(d)},
                            {p.sha256: p.requests for p in manifest.parts})
    if not continuing and saved.ids and not manifest.retry_of:
        log.info("replacing the ids saved in %s (%s)", ids_file, ", ".join(saved.ids))
    if not continuing:
        report_cached(manifest, args)
    return Run(manifest, pending, continuing, cache)


def report_cached(manifest: Manifest, args) -> None:
    """Say which parts the answer cache answers whole, or that it answers the whole input."""
    whole = [p for p in manifest.parts if p.outcome == "cached"]
    if whole and len(whole) == len(manifest.parts):
        target = args.download or "OUTPUT"
        print(f"all {sum(p.cached for p in whole):,} requests of {args.file} are in the answer cache: nothing "
              f"submitted; --download {target} writes them", flush=True)
        return
    for part in whole:
        print(f"{part.file}: all {part.cached:,} requests are in the answer cache; nothing to submit", flush=True)


def refuse_resubmission(session: Session, digests: dict[Path, str], saved_ids: list[str],
                        answered: dict[Path, str] | None = None, sizes: dict[str, int] | None = None) -> None:
    """Refuse when a file's content already has a batch that is live or completed, among
    the saved ids and the recent batches (a failed, expired or cancelled one does not count).
    For the ``answered`` files (the answer cache holds some of their lines: their batch was
    downloaded) only a live batch counts."""
    answered = answered or {}
    if not digests and not answered:
        return
    earlier = [batch for batch in (session.retrieve(i, missing_ok=True) for i in saved_ids) if batch is not None]
    recent = session.list_batches(RECENT, f"looking for earlier batches of {', '.join(map(str, digests))}", True)
    if recent is None:  # some OpenAI-compatible services cannot list batches
        log.warning("%s cannot list batches: only the ids in %s were checked for an earlier submission of the same "
                    "file", session.url, session.ids_file)
    earlier += recent or []
    by_digest = {digest: path for path, digest in digests.items()}
    live = {digest: path for path, digest in answered.items()}
    for batch in earlier:
        metadata = batch.metadata if isinstance(batch.metadata, dict) else {}
        path = by_digest.get(metadata.get("source_sha256"))
        if path is None and batch.status != "completed":
            path = live.get(metadata.get("source_sha256"))
        counts = getattr(batch, "request_counts", None)
        total, size = getattr(counts, "total", None), (sizes or {}).get(metadata.get("source_sha256"))
        if path is not None and batch.status == "completed" and total and size and total < size:
            raise UserError(f"{path} was already submitted as batch {batch.id} (completed) for {total:,} of its "
                            f"{size:,} requests, the answer cache answering the others: run without --no_cache "
                            "to take its answers from the cache, or pass --force to submit every request again "
                            "(you pay twice)")
        if path is not None and batch.status in BLOCKING:
            raise UserError(f"{path} was already submitted as batch {batch.id} ({batch.status}); download its "
                            f"results with: python batch_utils.py --wait --download {path.name.split('.')[0]}"
                            f".results.jsonl --id {batch.id} "
                            "(or --check --id), or pass --force to submit it again (you pay twice)")


def adopt(session: Session, parts: list[Part], saved_ids: list[str], listed: list | None) -> None:
    """Give every part without a live batch the newest live or completed batch of its
    content that the API has (found by ``source_sha256``): one created before a kill
    could save it, or one of a torn manifest."""
    known = {batch_id for part in parts for batch_id in part.batches}
    candidates = [b for b in (session.retrieve(i, missing_ok=True) for i in saved_ids if i not in known) if b]
    candidates += [b for b in (listed or []) if b.id not in known]
    by_digest = {p.sha256: p for p in parts if p.state in ("waiting", "refused")}
    for batch in sorted(candidates, key=lambda b: b.created_at or 0):
        metadata = batch.metadata if isinstance(batch.metadata, dict) else {}
        part = by_digest.get(metadata.get("source_sha256"))
        if part is not None and batch.status in BLOCKING and batch.id not in part.batches:
            part.batches.append(batch.id)
            part.state, part.counts = "running", {}
            log.info("%s: found its batch %s (%s) at the API; following it instead of submitting again", part.file,
                     batch.id, batch.status)


def batch_metadata(path: Path, digest: str, description: str | None, retry_of: list[str]) -> dict[str, str]:
    """What a batch records of its input: name and sha256 (the resubmission check and the
    provenance read them), the description, and the batches a retry file retries."""
    metadata = {"source_file": path.name[:METADATA_MAX], "source_sha256": digest}
    if description:
        metadata["description"] = description
    if retry_of:  # a marker (cut at 512) for --retry_failed: read this batch's successes too
        metadata["retry_of"] = ",".join(retry_of)[:METADATA_MAX]
    return metadata


def submit_part(session: Session, manifest: Manifest, part: Part, description: str | None,
                pending: dict[str, str], alone: bool = False, cache: AnswerCache | None = None):
    """Upload the part's lines the answer cache does not answer (a refused part reuses
    its upload) and create its batch; the state is saved before a signal can stop the run.
    Returns the batch, or None when the cache now answers the whole part."""
    client = session.client
    path = Path(part.file)
    if part.file_id is None:
        with batch_cache.upload_of(cache, manifest.service, part, Path(session.ids_file).parent) as upload:
            if upload is None:
                save_state(manifest, session.ids_file, pending)
                print(f"{path}: all {part.cached:,} requests are in the answer cache; nothing to submit", flush=True)
                return None
            with open(upload, "rb") as handle:  # streamed by the SDK, rewound on a retry
                uploaded = session.call(f"uploading {path}", client.files.create, file=(path.name, handle),
                                        purpose="batch")
        part.file_id = session.expect(f"uploading {path}", uploaded, "file").id
    metadata = batch_metadata(path, part.sha256, description, manifest.retry_of)
    with cli.held_signals():  # Ctrl+C waits until the new id is saved
        batch = session.call(f"creating the batch for {path}", client.batches.create, input_file_id=part.file_id,
                             endpoint=part.url, completion_window="24h", metadata=metadata)
        session.expect(f"creating the batch for {path}", batch, "batch")
        part.batches.append(batch.id)
        part.state, part.alone, part.counts = "running", alone, {}
        save_state(manifest, session.ids_file, pending)
    provenance.record_batch(session.ids_file, batch.id, path.name, part.sha256, part.model, manifest.retry_of)
    again = f", again after {len(part.refused)} refusal(s)" if part.refused else ""
    cached = f"; {part.cached:,} answered from the cache" if part.cached else ""
    print(f"submitted {batch.id} for {path} ({part.requests:,} requests, {part.url}, {part.model}, about "
          f"{part.tokens:,} tokens{again}{cached})", flush=True)
    return batch


def saved_message(manifest: Manifest, ids_file) -> str:
    after = f", after the {len(manifest.retry_of)} batch(es) they retry" if manifest.retry_of else ""
    return f"saved {sum(1 for p in manifest.parts if p.batch_id)} batch id(s) in {ids_file}{after}"


def submit_all(session: Session, run: Run, description: str | None) -> list[str]:
    """A plain ``--run``: one batch per part, all at once. A failure half-way keeps the
    batches made so far in the manifest and the ids file, and says so."""
    made = 0
    for part in run.manifest.parts:
        if part.state != "waiting":  # answered whole by the answer cache
            continue
        try:
            submit_part(session, run.manifest, part, description, run.pending, cache=run.cache)
        except UserError as exc:
            if made:
                raise UserError(f"{exc} ({made} batch(es) made before this one are saved in {session.ids_file}: "
                                "check or cancel them)") from None
            raise
        made += 1
    if not made:
        save_state(run.manifest, session.ids_file, run.pending)  # for --download: the cached answers
    print(saved_message(run.manifest, session.ids_file))
    return [part.batch_id for part in run.manifest.parts if part.batch_id]
