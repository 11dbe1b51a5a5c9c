"""Raw results of both routes into one record per request: parse, classify, join, write.

``reformat`` is the run behind ``reformat_results.py``: it reads every results file
(``datagen.results.input_files.expand_inputs``: paths and globs, a generations file's
shards, an output file's ``.errors.jsonl``), holds all lines to one kind (``KindCheck``), parses each into a
result, joins the results to the original requests when given (``load_requests``), and
writes the output and the failed file, with what it counted in a ``Summary``.

Two kinds of raw result line are read, recognised from their keys:

- **OpenAI envelope** ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
  "error"}``: the Batch API's output file and its ``.errors.jsonl`` error file, and the same
  envelope written by other tools (vLLM's ``run-batch``, whose failures sit inline in the
  output file). A line is a success only if ``response`` is present, ``status_code`` is
  200 and ``error`` is null (the Batch API reports some failures in both places).
- **Fine-tuned generations** ``{"custom_id", "generated_text", "finish_reason", ...,
  "source": "finetuned"}`` written by ``generate_data_finetuned.py`` (one file, or its
  shards ``STEM.shard-KKK-of-NNN.jsonl``).

Failed and missing requests never reach the output: they go to ``OUT.failed.jsonl``
(``id``, ``reason`` error/length/empty/missing, ``status_code``, ``error_code``,
``message``, ``source``, ...).

The pieces, one module each, from the edges in:

- ``datagen.results.answers``: ``chat_answer`` / ``responses_answer`` /
  ``completions_answer`` / ``embeddings_answer``: pure functions from a response body
  to an ``Answer`` (texts in choice order, finish reasons, refusal, usage);
  ``body_answer`` picks one by the body's shape.
- ``datagen.results.lines``: ``openai_result`` / ``finetuned_result`` (``PARSERS``): one
  raw line into a ``Result``: the output record (``output_record``), or a failed record
  with its ``reason``.
- ``datagen.results.runs``: ``run_key``, the one identity of a run (model, adapter, run
  name, fingerprint parts; OpenAI: the requested model and the sidecar's inputs), and
  ``RunSorter``, which groups the identities seen into runs: records of different runs
  are never merged (``one_run`` refuses them), and ``--compare`` gives each its column.
- ``datagen.results.requests``: the original requests (a batch input, a prompts file) and
  the ``--keep_fields`` values taken from them.
- ``datagen.results.store``: ``ResultStore``, an on-disk SQLite database (in ``$TMPDIR``)
  that holds every result and, when given, the original requests and the prompts file's
  fields, so that shuffled results can be put back in the input order, deduplicated,
  joined to their metadata and checked for missing ids with flat memory
  (``CompareStore``, beside it, adds the cells of ``--compare``).
- ``datagen.results.output``: the output columns, the same in every file, and
  ``open_sink``: JSONL, CSV or Parquet output chosen by the file name.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from datagen.common.cli import progress
from datagen.common.errors import UserError
from datagen.common.jsonl import atomic_writer, dumps_bytes, iter_jsonl_objects, loads
from datagen.common.prompts import request_digest
from datagen.results.lines import (FINETUNED, KIND_NAMES, OPENAI, PARSERS, ResultOptions, check_raw, failed_line,
                                   fast_chat_record, line_kind)
from datagen.results.output import COLUMNS, arrow_types, open_sink
from datagen.results.requests import PROMPT_FIELD, Requests, asked_of, asked_refusal, keep_values, merge_keep
from datagen.results.runs import (FoundRun, Origins, RunSorter, generation_conflict, generation_of, names_with_files,
                                  run_key, variant)
from datagen.results.store import Duplicates, ResultStore, VariantConflict, pick

log = logging.getLogger("datagen")


# --- the whole step ------------------------------------------------------------------------


@dataclass
class Counts:
    lines: int = 0
    cut_off: int = 0
    empty: int = 0
    refusals: int = 0


@dataclass
class Summary:
    ok: int = 0
    failed: int = 0
    missing: int = 0
    extra: int = 0  # result ids not among the original requests (written after them)
    expected: int = 0  # the original requests, when given
    files: int = 0
    counts: Counts = field(default_factory=Counts)
    duplicates: Duplicates = field(default_factory=Duplicates)
    failed_by: Counter = field(default_factory=Counter)  # failed requests by reason: error, length, empty


class KindCheck:
    """All lines must be of one kind: the one --source_type names, or (auto) the first's."""

    def __init__(self, source_type: str):
        self.source_type = source_type
        self.kind = None if source_type == "auto" else source_type
        self.first_where = None

    def check(self, obj: dict, where: str) -> str:
        check_raw(obj, where)
        kind = line_kind(obj)
        if kind is None:
            keys = ", ".join(list(obj)[:10]) or "none"
            raise UserError(f"{where}: neither {KIND_NAMES[OPENAI]} nor {KIND_NAMES[FINETUNED]}; "
                            f"the line has keys: {keys}; check --input_file")
        if kind != self.kind:
            if self.kind is None:
                self.kind, self.first_where = kind, where
            elif self.first_where is None:
                raise UserError(f"{where}: {KIND_NAMES[kind]}, but --source_type is {self.source_type}; "
                                f"pass --source_type {kind} (or auto) or leave this file out")
            else:
                raise UserError(f"{where}: {KIND_NAMES[kind]}, but {self.first_where} is "
                                f"{KIND_NAMES[self.kind]}; reformat each route's results separately, "
                                "one --output_file per route")
        return kind


def _parse_files(paths: list[Path], kinds: KindCheck, options: ResultOptions,
                 counts: Counts, sorter: RunSorter) -> Iterator[tuple[str, bool, bytes, int, str | None, str | None]]:
    """Every line of ``paths`` as ``(custom_id, ok, record, file number, variant, asked)``
    (``asked``: a fine-tuned record's ``request_sha256``); ``sorter`` notes the run
    identity of each (``datagen.results.runs``)."""
    origins = Origins()
    for number, path in enumerate(paths):
        requested, roots = origins.of(path)  # the sidecar of a download: (None, None) without one
        file_key = run_key(OPENAI, {}, requested=requested, roots=roots) if requested else None
        note = sorter.note
        for line_number, obj in progress(iter_jsonl_objects(path), desc=f"reading {path.name}", unit="line"):
            counts.lines += 1
            if kinds.kind == OPENAI and "response" in obj:
                record = fast_chat_record(obj, requested)
                if record is not None:
                    note(number, file_key or run_key(OPENAI, record, roots=roots))
                    yield record["id"], True, dumps_bytes(record), number, None, None
                    continue
            where = f"{path}:{line_number}"
            kind = kinds.check(obj, where)
            result = PARSERS[kind](obj, where, options, requested)
            generation = asked = None
            if kind == FINETUNED:
                note(number, run_key(FINETUNED, obj))
                generation, asked = variant(obj.get("fingerprint")), asked_of(obj)
            else:
                note(number, file_key or (run_key(OPENAI, result.record, roots=roots)
                                          if result.record.get("model") else None))
            counts.cut_off += result.cut_off
            counts.empty += result.empty
            counts.refusals += result.refusal
            yield result.custom_id, result.ok, dumps_bytes(result.record), number, generation, asked


def _keep_rows(requests: Iterable[tuple[str, str, dict]], keep_fields: list[str], keep_types: dict[str, set[str]],
               found: set[str], asked: bool = False) -> Iterator[tuple[str, str, bytes | None, str | None]]:
    """``(custom_id, where, kept fields, what it asked)``: the last only with ``asked``."""
    for custom_id, where, fields in requests:
        yield (custom_id, where, keep_values(fields, keep_fields, keep_types, found) if keep_fields else None,
               request_digest(fields[PROMPT_FIELD]) if asked else None)


def load_requests(store: ResultStore, requests: Requests, keep_fields: list[str],
                  keep_types: dict[str, set[str]], summary: "Summary", files: list[Path] = ()) -> None:
    """Put the requests (and their metadata) in the store; check ids and kept fields, and
    that answers which say what they asked were made for these requests (``files``: the
    file of each answer's file number in the store)."""
    found: set[str] = set()
    asked = requests.asked_in is not None and store.has_asked()  # else nothing to check
    summary.expected = store.add_inputs(_keep_rows(requests.rows, keep_fields, keep_types, found, asked))
    if summary.expected == 0:
        raise UserError(f"{requests.flag} has no requests; check the file")
    store.check_unique_inputs(requests.flag)
    elsewhere = store.asked_elsewhere() if asked else None
    if elsewhere:  # answers made from another input than this one: their prompts would be wrong
        raise asked_refusal(elsewhere, files, requests)
    flags = requests.flag
    if requests.metadata is not None:
        flags += f" or {requests.metadata_flag}"
        _load_metadata(store, requests, keep_fields, keep_types, found, summary.expected)
    absent = [name for name in keep_fields if name not in found]
    if absent:
        raise UserError(f"--keep_fields {', '.join(absent)}: no request in {flags} has "
                        f"{'this field' if len(absent) == 1 else 'these fields'}; "
                        f"name fields of the prompts file (or '{PROMPT_FIELD}' for the input the model saw)")
    summary.extra = store.extra_count()


def _load_metadata(store: ResultStore, requests: Requests, keep_fields: list[str], keep_types: dict[str, set[str]],
                   found: set[str], expected: int) -> None:
    """The prompts file's fields beside a batch input, joined by custom_id: the batch
    input's prompt is the exact one, the prompts file gives the other fields."""
    names = [name for name in keep_fields if name != PROMPT_FIELD]
    store.add_metadata(row[:3] for row in _keep_rows(requests.metadata, names, keep_types, found))
    store.check_unique_inputs(requests.metadata_flag, "meta")
    unmatched = store.unmatched_inputs()
    if unmatched == expected:
        raise UserError(f"no custom_id of {requests.flag} is in {requests.metadata_flag}; read it with the "
                        "same --id_field (and prompt flags) that made the batch input")
    if unmatched:
        log.warning("%d request(s) of %s are not in %s: their kept fields are null", unmatched,
                    requests.flag, requests.metadata_flag)


def one_run(runs: list[FoundRun], compare_hint: str) -> None:
    """Refuse files that hold several runs: their records are never merged."""
    if len(runs) > 1:
        raise UserError(f"the --input_file files hold {len(runs)} runs: {names_with_files(runs)}; records of "
                        "different runs are never merged: reformat each run on its own, or put them side by "
                        f"side with {compare_hint}")


def reformat(inputs: list[Path], output: Path, failed_path: Path, *, source_type: str = "auto",
             options: ResultOptions = ResultOptions(), requests: Requests | None = None,
             keep_fields: list[str] | tuple = (), tmp_dir: str | None = None,
             compare_hint: str = "reformat_results.py --compare") -> Summary:
    """Read every results file, join to the requests if given, write output and failed file.

    Both outputs are complete or absent. Input errors (files of several runs included) are
    raised before anything is written.
    """
    keep_fields = list(keep_fields)
    summary = Summary(files=len(inputs))
    with ResultStore(tmp_dir) as store:
        runs = _read_results(store, inputs, source_type, options, summary.counts)
        one_run(runs, compare_hint)
        keep_types: dict[str, set[str]] = {name: set() for name in keep_fields}
        if requests is not None:
            load_requests(store, requests, keep_fields, keep_types, summary, inputs)
        started = time.perf_counter()
        try:
            _write(store, output, failed_path, keep_types, keep_fields, summary)
        except VariantConflict as conflict:  # one id answered with two generation settings: two runs
            raise _conflict_error(conflict, inputs, runs[0].name) from None
        log.debug("sorted, joined and wrote in %.1f s (%.1f s CPU in all)", time.perf_counter() - started,
                  time.process_time())
    return summary


def _read_results(store: ResultStore, inputs: list[Path], source_type: str, options: ResultOptions,
                  counts: Counts) -> list[FoundRun]:
    """Every line of ``inputs`` into ``store``; returns the runs found among them."""
    started = time.perf_counter()
    sorter = RunSorter(inputs)
    store.add_results(_parse_files(inputs, KindCheck(source_type), options, counts, sorter))
    log.debug("read %d results in %.1f s (%.1f s CPU)", counts.lines, time.perf_counter() - started,
              time.process_time())
    if counts.lines == 0:
        raise UserError(f"no result lines in {', '.join(map(str, inputs))}; check --input_file")
    return sorter.runs()


def _conflict_error(conflict: VariantConflict, inputs: list[Path], name: str) -> UserError:
    found = []
    for number, wanted in (conflict.first, conflict.second):
        lines = (obj for _, obj in iter_jsonl_objects(inputs[number]))
        found.append((inputs[number], generation_of(lines, conflict.custom_id, wanted)))
    return generation_conflict(conflict.custom_id, name, found[0], found[1], "")


def _write(store: ResultStore, output: Path, failed_path: Path, keep_types: dict[str, set[str]],
           keep_fields: list[str], summary: Summary) -> None:
    """The output and failed files from the store: one result per id (``pick``)."""
    columns = [*COLUMNS, *keep_fields]
    null_keep = dumps_bytes(dict.fromkeys(keep_fields)) if keep_fields else None
    # closing(): the cursor is closed while the database is still open, whatever happens.
    with open_sink(output, columns, arrow_types(keep_types, columns)) as sink, \
            atomic_writer(failed_path, "wb") as failed, contextlib.closing(store.rows()) as stored:
        rows = pick(stored, summary.duplicates)
        record = store.record
        for custom_id, keep, ok, offset, length, meta, *_ in progress(rows, desc="writing", unit="request"):
            if ok is None:
                summary.missing += 1
                failed.write(dumps_bytes(failed_line(
                    custom_id, "missing", message="no result for this request in the --input_file files")) + b"\n")
            elif ok:
                summary.ok += 1
                sink.write(record(offset, length), merge_keep(keep_fields, keep, meta) if keep or meta
                           else null_keep)
            else:
                line = record(offset, length)
                summary.failed += 1
                summary.failed_by[loads(line)["reason"]] += 1
                failed.write(line + b"\n")
