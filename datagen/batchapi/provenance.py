"""Where downloaded OpenAI results came from, and the check that they answer the batch
input they are reformatted or compared against.

- History: ``last_batch_id.history.jsonl`` beside the ids file, one line per batch that
  ``--run`` created (id, input file name and sha256, model, the batches it retries),
  appended and never rewritten: the ids file holds the LAST run only, the history
  finds the batches of every earlier ``--run`` in the folder (``record_batch``,
  ``read_history``).
- Sidecar: ``batch_utils.py --download OUT`` writes ``OUT.source.json`` with OUT
  (``write_sidecar`` into a temporary file the download renames with the results; it
  covers ``OUT.errors.jsonl`` too): ``{"format": "datagen.batch_results/1", "batches":
  [{"id", "status", "input_file_id", "source_file", "source_sha256", "retry_of",
  "retry_of_sha256", "endpoint", "model"}], "service", "downloaded"}``, and with lines
  from the answer cache ``"cached": {"lines", "from_batches", "parts": [{"source_file",
  "source_sha256", "lines"}]}`` (the parts of the run those lines answer).
  ``retry_of_sha256`` holds the input hashes of the batches a ``--retry_failed`` batch
  retries, so its results are known to answer the original input (``read_sidecar``,
  ``input_digests``: the inputs a download answers, retries mapped to their originals).
- ``check_belongs(results_paths, batch_input_path)``: refuse, in one line, results
  whose batches were made from another input than ``--batch_input`` (or its parts, or
  a retry of them), naming the exact ``--id`` to download the right ones when the
  history knows it. Results without a sidecar (downloaded elsewhere) are checked by the
  model their answers name (``_check_models``), then pass with a warning.
- ``refuse_batch_sources`` / ``refuse_other_results``: a download never replaces the
  batch input it answers, nor the results of other batches (their sidecar names them).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from datagen.batchapi.batch_state import BATCH_ID
from datagen.common.errors import UserError
from datagen.common.jsonl import iter_jsonl, sha256_file

log = logging.getLogger("datagen")

FORMAT = "datagen.batch_results/1"
SIDECAR_SUFFIX = ".source.json"
ERRORS_SUFFIX = ".errors.jsonl"
HISTORY_NAME = "last_batch_id.history.jsonl"  # beside the default ids file


# --- history of the batches --run created ---------------------------------------------------


def history_path(ids_file: str | os.PathLike) -> Path:
    """``last_batch_id.tok`` -> ``last_batch_id.history.jsonl`` (beside it)."""
    ids_file = Path(ids_file)
    return ids_file.with_name(ids_file.stem + ".history.jsonl")


def record_batch(ids_file: str | os.PathLike, batch_id: str, source_file: str, source_sha256: str,
                 model: str | None, retry_of: list[str]) -> None:
    """Append one created batch to the history (a failure only warns: the batch exists,
    and its id is saved in the ids file already)."""
    line = {"id": batch_id, "source_file": source_file, "source_sha256": source_sha256, "model": model,
            "retry_of": list(retry_of), "created": _now()}
    path = history_path(ids_file)
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    except OSError as exc:
        log.warning("%s: cannot record batch %s (%s); --download still works with --id", path, batch_id,
                    exc.strerror)


def read_history(path: str | os.PathLike) -> list[dict]:
    """The history's entries, oldest first; a torn or odd line is skipped (it is only a hint)."""
    entries = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                    entries.append(entry)
    except (OSError, UnicodeDecodeError):
        return []
    return entries


# --- the sidecar of a download -----------------------------------------------------------------


def sidecar_path(results_path: str | os.PathLike) -> Path:
    """``OUT`` and ``OUT.errors.jsonl`` -> ``OUT.source.json``."""
    path = Path(results_path)
    name = path.name[:-len(ERRORS_SUFFIX)] if path.name.endswith(ERRORS_SUFFIX) else path.name
    return path.with_name(name + SIDECAR_SUFFIX)


def _metadata(batch) -> dict:
    return batch.metadata if isinstance(batch.metadata, dict) else {}


def _retry_of(batch) -> list[str]:
    return [i for i in (_metadata(batch).get("retry_of") or "").split(",") if i]


def write_sidecar(path: str | os.PathLike, session, batches: list, cached: dict | None = None) -> None:
    """Write the sidecar of a download of ``batches`` (SDK objects) to ``path`` (the
    caller renames it into place with the results): the model each batch was made for
    comes from the history, the original input hashes of retried batches from the API
    (a retry of a retry leads back to the original input)."""
    known: dict = {b.id: b for b in batches}

    def original_digests(batch_id: str, depth: int = 0) -> set[str]:
        if batch_id not in known:
            known[batch_id] = session.retrieve(batch_id, missing_ok=True) if BATCH_ID.match(batch_id) else None
        batch = known[batch_id]
        if batch is None:
            return set()
        if _retry_of(batch) and depth < 16:
            return set().union(*(original_digests(i, depth + 1) for i in _retry_of(batch)))
        digest = _metadata(batch).get("source_sha256")
        return {digest} if digest else set()

    retried = {b.id: sorted(set().union(*(original_digests(i) for i in _retry_of(b)))) for b in batches}
    history = {entry["id"]: entry for entry in read_history(history_path(session.ids_file))}
    data = sidecar_data(batches, session.url, history, retried)
    if cached:
        data["cached"] = cached
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def sidecar_data(batches: list, base_url: str, history: dict[str, dict], retried: dict[str, list[str]]) -> dict:
    """The sidecar of a download of ``batches`` (SDK objects). ``history``: batch id ->
    history entry (for the model); ``retried``: batch id -> the sha256 of the original
    inputs its retry_of batches were made from."""
    entries = []
    for batch in batches:
        metadata, retry_of = _metadata(batch), _retry_of(batch)
        known = history.get(batch.id) or {}
        entries.append({
            "id": batch.id, "status": batch.status, "input_file_id": batch.input_file_id,
            "source_file": metadata.get("source_file"), "source_sha256": metadata.get("source_sha256"),
            "retry_of": retry_of, "retry_of_sha256": retried.get(batch.id, []),
            "endpoint": batch.endpoint, "model": known.get("model") or getattr(batch, "model", None) or None})
    return {"format": FORMAT, "batches": entries, "service": urlsplit(base_url).netloc or base_url,
            "downloaded": _now()}


def read_sidecar(results_path: str | os.PathLike) -> dict | None:
    """The sidecar of a results file (or of its errors file); None when there is none."""
    path = sidecar_path(results_path)
    if not os.path.lexists(path):
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: cannot read where {results_path} came from ({type(exc).__name__}); download the "
                        "results again with batch_utils.py --download, or delete it") from None
    batches = data.get("batches") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(batches, list) \
            or not all(isinstance(b, dict) and isinstance(b.get("id"), str) for b in batches):
        raise UserError(f"{path}: not a {FORMAT} file; download the results again with batch_utils.py --download, "
                        "or delete it")
    return data


def input_digests(sidecar: dict) -> frozenset[str]:
    """The sha256 of the batch inputs a download answers: each batch's own input, or, for
    a retry batch, the inputs of the batches it retries. Two downloads with different
    sets answer different inputs (different runs)."""
    digests = set()
    for batch in sidecar["batches"]:
        retried = batch.get("retry_of_sha256") or []
        digests.update(retried if batch.get("retry_of") and retried else [batch.get("source_sha256")])
    digests.update(part.get("source_sha256") for part in cached_parts(sidecar))
    return frozenset(d for d in digests if d)


def cached_parts(sidecar: dict) -> list[dict]:
    """The parts whose lines a download took from the answer cache."""
    cached = sidecar.get("cached")
    parts = cached.get("parts") if isinstance(cached, dict) else None
    return [part for part in parts if isinstance(part, dict)] if isinstance(parts, list) else []


# --- what a download must not replace -----------------------------------------------------------


def results_name(path: Path) -> str:
    """``A.jsonl`` -> ``A.results.jsonl``: the name a refusal suggests."""
    return f"{path.name.split('.')[0] or 'batch'}.results.jsonl"


def refuse_batch_sources(output: Path, batches: list, ids_file: str | os.PathLike) -> None:
    """Refuse a --download onto the input file of one of ``batches`` (its name in the
    batch metadata or the history, in the history's folder: where --run ran)."""
    from datagen.common.cli import same_file

    history = {entry["id"]: entry for entry in read_history(history_path(ids_file))}
    for batch in batches:
        names = {_metadata(batch).get("source_file"), history.get(batch.id, {}).get("source_file")}
        for name in names:
            if isinstance(name, str) and name and same_file(output, Path(ids_file).parent / name):
                raise UserError(f"--download {output} is the batch input {batch.id} (from {name}) was made from and "
                                f"would be overwritten; choose another name, e.g. --download {results_name(output)}")


def refuse_other_results(output: Path, ids, downloading: str) -> None:
    """Refuse a --download onto the results of other batches: OUTPUT (or its errors file)
    exists and its sidecar names a batch that this download (``ids``, described as
    ``downloading``) does not hold. The same batches again (a rerun), or more, replace
    it; so does an OUTPUT without a (readable) sidecar: nothing says what it holds."""
    errors = output.with_name(output.name + ERRORS_SUFFIX)
    if not (output.exists() or errors.exists()):
        return
    try:
        sidecar = read_sidecar(output)
    except UserError:
        return
    held = sidecar["batches"] if sidecar else []
    if all(batch["id"] in set(ids) for batch in held):
        return
    shown = ", ".join(batch["id"] + (f" (from {batch['source_file']})" if batch.get("source_file") else "")
                      for batch in held)
    raise UserError(f"--download {output} holds the results of {shown}, not of {downloading}; choose another name, "
                    f"or delete {output} and {sidecar_path(output).name} to replace them")


# --- the check ---------------------------------------------------------------------------------


def check_belongs(results_paths, batch_input_path: str | os.PathLike | None) -> None:
    """Refuse results that another batch input made; see the module docstring. Without a
    ``batch_input_path`` there is nothing to check against."""
    from datagen.batchapi.batchfile import resolve_batch_files

    if batch_input_path is None:
        return
    parts = resolve_batch_files(batch_input_path)
    allowed = {sha256_file(part): part for part in parts}
    checked: set[Path] = set()
    for results in map(Path, results_paths):
        sidecar_file = sidecar_path(results)
        if sidecar_file in checked:
            continue
        checked.add(sidecar_file)
        sidecar = read_sidecar(results)
        if sidecar is None:
            checked.discard(sidecar_file)  # the output and its errors file: each is checked by its models
            if _looks_like_batch_output(results):
                _check_models(results, parts, batch_input_path, list(allowed))
            continue
        for batch in sidecar["batches"]:
            digest, retried = batch.get("source_sha256"), batch.get("retry_of_sha256") or []
            if digest in allowed or (batch.get("retry_of") and retried and set(retried) <= set(allowed)):
                continue
            if not digest or (batch.get("retry_of") and not retried):
                log.warning("%s: batch %s records no input hash; cannot check that it answers --batch_input %s",
                            results, batch["id"], batch_input_path)
                continue
            raise UserError(f"{results}: its results come from batch {batch['id']} (input "
                            f"{batch.get('source_file') or '?'}, sha256 {digest[:12]}), not from --batch_input "
                            f"{batch_input_path} (sha256 {', '.join(d[:12] for d in allowed)}); "
                            + _hint(batch_input_path, list(allowed), [results]))
        for part in cached_parts(sidecar):
            if part.get("source_sha256") not in allowed:
                raise UserError(f"{results}: {part.get('lines')} of its lines come from the answer cache for input "
                                f"{part.get('source_file') or '?'} (sha256 {str(part.get('source_sha256'))[:12]}), "
                                f"not for --batch_input {batch_input_path}; "
                                + _hint(batch_input_path, list(allowed), [results]))


def _check_models(results: Path, parts: list[Path], batch_input_path, digests: list[str]) -> None:
    """Results without a sidecar: the model each answer names must be the model the batch
    input asks for, or it with a date suffix (OpenAI answers gpt-4o-mini with
    gpt-4o-mini-2024-07-18). A mismatch is refused, or only warned about when the
    answers may come from another service (OPENAI_BASE_URL not at OpenAI, or Azure's
    content-filter fields in the answers: Azure names deployments, not models)."""
    from datagen.batchapi.batchfile import iter_batch_requests

    requested = set()
    for part in parts:  # one model per batch file (the batch input's own check)
        request = next(iter_batch_requests(part), None)
        if request is not None:
            requested.add(request.body["model"])
    answered, azure = set(), False
    try:
        for _, line in iter_jsonl(results):
            response = line.get("response") if isinstance(line, dict) else None
            body = response.get("body") if isinstance(response, dict) else None
            if isinstance(body, dict) and isinstance(body.get("model"), str):
                answered.add(body["model"])
                azure = azure or "prompt_filter_results" in body
                break  # the first answer's model is the file's: a file of several models is refused as several runs
    except UserError:  # a malformed line: reading the results reports it with file:line
        return
    if not answered and results.name.endswith(ERRORS_SUFFIX):
        return  # failed requests name no model; the output file beside it is checked
    sidecar = sidecar_path(results).name
    wrong = sorted(m for m in answered if not any(re.fullmatch(re.escape(r) + r"(-\d{4}-\d{2}-\d{2})?", m)
                                                    for r in requested))
    if not (wrong and requested):
        checked = (f"only its model ({', '.join(sorted(answered))}) was checked against" if answered
                   else "cannot check that it answers")
        log.warning("%s has no %s beside it (downloaded elsewhere?): %s --batch_input %s", results, sidecar, checked,
                    batch_input_path)
        return
    mismatch = (f"{results}: its answers come from {', '.join(wrong)}, not from the {', '.join(sorted(requested))} "
                f"that --batch_input {batch_input_path} asks for")
    host = urlsplit(os.environ.get("OPENAI_BASE_URL", "").strip()).hostname
    if azure or host not in (None, "api.openai.com"):
        service = "Azure (its answers carry prompt_filter_results)" if azure else \
            f"the service at OPENAI_BASE_URL ({host})"
        log.warning("%s; only a warning, as %s may name models otherwise than OpenAI: check that they answer it",
                    mismatch, service)
        return
    raise UserError(f"{mismatch} (it has no {sidecar} to say which batch it is); "
                    + _hint(batch_input_path, digests, [results]))


def _hint(batch_input_path, digests: list[str], results: list[Path]) -> str:
    """The exact command that downloads the results of ``batch_input_path``, when the
    history in this folder (or beside the files) knows its batches."""
    folders = {Path("."), Path(batch_input_path).parent, *(p.parent for p in results)}
    newest: dict[str, str] = {}
    for folder in folders:
        for entry in read_history(folder / HISTORY_NAME):  # oldest first: the last one wins
            if entry.get("source_sha256") in digests:
                newest[entry["source_sha256"]] = entry["id"]
    if set(newest) != set(digests):
        return (f"pass the --batch_input these results answer, or download the results of {batch_input_path} "
                "with: python batch_utils.py --download OUTPUT --id BATCH_ID (python batch_utils.py lists the "
                "recent batches)")
    stem = Path(batch_input_path).name.split(".")[0] or "batch"
    ids = ",".join(newest[d] for d in digests)
    return f"download its results with: python batch_utils.py --download {stem}.results.jsonl --id {ids}"


def _looks_like_batch_output(path: Path) -> bool:
    """True when the first line of ``path`` is a Batch API output or error line."""
    try:
        with open(path, encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "")
        line = json.loads(first) if first else None
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(line, dict) and "custom_id" in line and ("response" in line or "error" in line) \
        and "body" not in line


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
