"""``reformat_results.py --compare``: runs of either route side by side, joined on the id.

Each ``--compare`` argument is ``PATH`` or ``NAME=PATH``. ``PATH`` is a raw output of either
route (an OpenAI output file with its ``.errors.jsonl``, a generations file or its shards)
or a reformatted file (with its ``.failed.jsonl`` beside it), named as a file, a quoted
glob, or a generations file that does not exist but stands for its shards
(``OUT.shard-KKK-of-NNN.jsonl``) or its adapters' files (``OUT.NAME.jsonl``,
``OUT.base.jsonl``, each maybe sharded or reformatted to ``OUT.NAME.parquet``).

**Runs and their names.** The files of an argument are split into runs by the records' run
identity (``datagen.results.runs``): a glob or stem over several adapters' files is one
column per adapter; a download and its ``--retry_failed`` download given as two PATHs are
one run (they answer one batch input), as in ``--input_file``; one id answered in one run
with two generation settings is refused (``runs.generation_conflict``). A run's column is
its **run name, read from the records**, the same however the run is given (stem, raw files,
glob, reformatted files): the record's ``run`` (``--adapter_path NAME=PATH``'s NAME,
``base``; older records: the adapter folder's name, else ``base``), the OpenAI model as
requested. ``NAME=PATH`` sets it; a ``NAME=PATH`` holding several runs is an error. Two runs
of one name (the same model from two folders) are an error that says how to name them
(``--compare answers=res1/results.jsonl judge=res2/results.jsonl``): names are never made
unique by guessing.

The table has one row per request (``--long``: per request, run and sample), in the
order of ``--batch_input`` / ``--prompts_file`` when given, else in natural order of the
ids of all runs. With requests, ids a run holds that the requests do not have
(**strays**) are left out of the table and counted per run in the summary, with the
first few named; they never make another run count as missing anything.

- wide: ``id``, ``prompt`` and the kept fields, then per run ``NAME`` (the first
  sample's text, null unless ok) and ``NAME.status`` (``ok``, ``failed`` or ``missing``);
- long: ``id``, ``prompt`` and the kept fields, ``run``, ``model``, ``adapter``,
  ``status``, ``sample`` (0-based; null unless ok), ``generated_text``,
  ``finish_reason``, ``error`` (the reason of a failed one).

Every run's results go to one temporary SQLite ``ResultStore`` on disk, so memory stays
flat whatever the size.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
from collections import Counter
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any, Iterable, Iterator

from datagen.common.cli import progress
from datagen.common.errors import UserError
from datagen.common.jsonl import dumps_bytes, iter_jsonl_objects, loads
from datagen.results.input_files import Spec
from datagen.results.lines import (FINETUNED, OPENAI, ResultOptions, compare_table_row, finetuned_result,
                                   openai_result, table_refusal)
from datagen.results.output import COLUMNS, OLD_COLUMNS, arrow_types, open_sink
from datagen.results.reformat import KindCheck, Summary, load_requests
from datagen.results.requests import PROMPT_FIELD, Requests, asked_of, merge_keep
from datagen.results.runs import (FoundRun, Origins, RunSorter, adapter_run_name, generation_conflict, generation_of,
                                  answered_inputs, names_with_files, record_details, run_key,
                                  variant)
from datagen.results.store import CompareStore, VariantConflict

log = logging.getLogger("datagen")

OK, FAILED, MISSING = 1, 0, -1  # a cell's rank: the best one of an id wins
STATUS = {OK: "ok", FAILED: "failed", MISSING: "missing"}
LONG_COLUMNS = ("run", "model", "adapter", "status", "sample", "generated_text", "finish_reason", "error")


@dataclass
class Run:
    """One run of the table: a column, named by the records' run name or the user's NAME."""

    name: str
    paths: list[Path]
    spec: Spec
    model: str | None = None
    adapter: str | None = None
    ok: int = 0
    failed: int = 0
    missing: int = 0
    failed_by: Counter = field(default_factory=Counter)  # failed requests by reason: error, length, empty
    stray: int = 0  # ids the requests do not have (left out of the table)
    stray_ids: list[str] = field(default_factory=list)  # the first few of them
    no_id: int = 0  # failures without a custom_id: nothing to join them to
    inputs: set = field(default_factory=set)  # the batch inputs its downloads answer (runs.answered_inputs)

    def where(self) -> str:
        return str(self.paths[0]) + (f" (+{len(self.paths) - 1} files)" if len(self.paths) > 1 else "")


@dataclass
class Table:
    rows: int = 0
    requests: int = 0
    runs: list[Run] = field(default_factory=list)


# --- reading a run ----------------------------------------------------------------------------


def _iter_lines(path: Path) -> Iterator[tuple[str, dict]]:
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        rows = (row for batch in pq.ParquetFile(path).iter_batches() for row in batch.to_pylist())
        for number, row in enumerate(rows, 1):
            yield f"{path}:row {number}", row
        return
    for line_number, obj in iter_jsonl_objects(path):
        yield f"{path}:{line_number}", obj


def _samples(record: dict) -> list[dict]:
    """A reformatted record's samples ({text, finish_reason}); older files listed texts."""
    samples = record.get("samples")
    if isinstance(samples, list) and samples:
        return [s if isinstance(s, dict) else {"text": s, "finish_reason": None} for s in samples]
    return [{"text": record.get("generated_text"), "finish_reason": record.get("finish_reason")}]


def _cell(rank: int, record: dict, kept: dict | None = None) -> bytes:
    if rank == OK:
        data = {"samples": _samples(record)}
    else:
        message = record.get("message")
        reason = record.get("error_code") or record.get("reason")
        data = {"error": f"{reason}: {message}" if reason and message else message or reason,
                "reason": record.get("reason")}  # error, length, empty (--fail_on)
    data.update(model=record.get("model") or None, adapter=record.get("adapter") or None)
    if kept:
        data["kept"] = kept
    return dumps_bytes(data)


def _reformatted_key(obj: dict) -> tuple[tuple, str | None]:
    """The run identity of a reformatted record (``run_key`` on its columns) and
    its generation variant."""
    source = obj.get("source") or (FINETUNED if obj.get("adapter") else OPENAI)
    if source != FINETUNED:
        return run_key(OPENAI, obj), None
    fingerprint = record_details(obj).get("fingerprint")
    named = obj if obj.get("run") else {**obj, "run": adapter_run_name(obj.get("adapter"))}
    return run_key(FINETUNED, named, fingerprint=fingerprint or {}), variant(fingerprint)


class RunReader:
    """The lines of one --compare argument into ``(node, custom_id, rank, cell_json)``:
    ``node`` is the run identity of the line in ``sorter`` (plus ``offset``). Notes each
    node's model and adapter and, from reformatted files, the kept fields (columns beyond
    COLUMNS) and their types in ``kept``."""

    def __init__(self, spec: Spec, options: ResultOptions, kept: dict[str, set[str]],
                 sorter: RunSorter, offset: int):
        self.spec, self.options, self.kept = spec, options, kept
        self.sorter, self.offset = sorter, offset
        self.kinds = KindCheck("auto")
        self.origins = Origins()
        self.models: dict[int, tuple] = {}  # node -> (model, adapter)
        self.no_id: dict[int, int] = {}  # node -> failed lines without an id

    def cells(self) -> Iterator[tuple[str, int, bytes, str | None, int]]:
        for number, path in enumerate(self.spec.paths):
            requested, roots = self.origins.of(path)
            for where, obj in _iter_lines(path):
                custom_id, rank, record, extras, key, generation = self._parse(obj, where, requested, roots)
                node = self.sorter.note(number, key)
                if custom_id == "":
                    self.no_id[node] = self.no_id.get(node, 0) + 1
                    continue
                if node not in self.models and (record.get("model") or record.get("adapter")):
                    self.models[node] = (record.get("model") or None, record.get("adapter") or None)
                yield (custom_id, rank, _cell(rank, record, extras), generation, self.offset + node,
                       asked_of(obj))

    def _parse(self, obj: dict, where: str, requested: str | None,
               roots: frozenset | None) -> tuple[str, int, dict, dict | None, tuple | None, str | None]:
        if "custom_id" in obj:  # a raw line of either route
            kind = self.kinds.check(obj, where)
            if kind == FINETUNED:
                result = finetuned_result(obj, where, self.options)
                return result.custom_id, OK if result.ok else FAILED, result.record, None, \
                    run_key(FINETUNED, obj), variant(obj.get("fingerprint"))
            result = openai_result(obj, where, self.options, requested)
            model = requested or result.record.get("model")
            key = run_key(OPENAI, {"model": model}, roots=roots) if model else None
            return result.custom_id, OK if result.ok else FAILED, result.record, None, key, None
        custom_id = obj.get("id")
        if not isinstance(custom_id, str):
            raise UserError(f"{where}: neither a raw result line (custom_id) nor a reformatted line (id); "
                            "give --compare the outputs of batch_utils.py, generate_data_finetuned.py "
                            "or reformat_results.py")
        if "source" not in obj and compare_table_row(obj):
            raise table_refusal(where)
        if "reason" in obj and "generated_text" not in obj:  # a line of a .failed.jsonl file
            return custom_id, MISSING if obj["reason"] == "missing" else FAILED, obj, None, None, None
        extras = {k: v for k, v in obj.items() if k not in COLUMNS and k not in OLD_COLUMNS}
        for name, value in extras.items():
            self.kept.setdefault(name, set()).add(type(value).__name__)
        key, generation = _reformatted_key(obj)
        return custom_id, OK, obj, extras, key, generation


def check_names(runs: list[Run], taken: Iterable[str], long: bool) -> None:
    """Column names are run names: two runs of one name (or a name that is another
    column) are an error that says how to name them (``--compare NAME=PATH``)."""
    by_name: dict[str, list[Run]] = {}
    for run in runs:
        by_name.setdefault(run.name, []).append(run)
    for name, same in by_name.items():
        if len(same) > 1:
            hint = " ".join(f"{chr(ord('A') + k) if k < 26 else f'R{k}'}={_given(run)}" for k, run in enumerate(same))
            raise UserError(f"--compare: {len(same)} runs are named {name!r} ({'; '.join(r.where() for r in same)}); "
                            f"give each its own name: --compare {hint} (NAME=PATH)")
    if long:
        return
    columns = set(taken)
    for run in runs:
        for column in (run.name, f"{run.name}.status"):
            if column in columns:
                raise UserError(f"--compare: run {run.name!r} ({run.where()}) would make a second column "
                                f"{column!r}; name it: --compare NAME={_given(run)}")
            columns.add(column)


def _given(run: Run) -> str:
    """How to give this run alone on the command line: its argument, or its files."""
    if run.spec.name is None and len(run.paths) == len(run.spec.paths):
        return shlex.quote(run.spec.text)
    return " ".join(shlex.quote(str(p)) for p in run.paths if not p.name.endswith((".errors.jsonl", ".failed.jsonl")))


# --- the table ---------------------------------------------------------------------------------


def _groups(rows: Iterable[tuple]) -> Iterator[tuple[str, bytes | None, bytes | None, dict]]:
    """Per request: (custom_id, keep, meta, {run: (rank, offset, length)}), each run's best cell.
    Two generation variants of one id in one run raise ``VariantConflict`` (nodes as files)."""
    for _, group in groupby(rows, key=itemgetter(0)):
        first = next(group)
        cells: dict[int, tuple] = {}
        variants: dict[int, tuple] = {}
        for row in (first, *group):
            run, generation = row[4], row[8]
            if run is not None and run not in cells:
                cells[run] = row[5:8]
            if generation is not None:
                seen = variants.setdefault(run, (row[9], generation))
                if seen[1] != generation:
                    raise VariantConflict(row[1], seen, (row[9], generation), run)
        yield first[1], first[2], first[3], cells


def _read_runs(store: CompareStore, specs: list[Spec], options: ResultOptions,
               kept_types: dict[str, set[str]]) -> tuple[list[Run], list[Path]]:
    """Read every argument's files into the store; split each into its runs (one per run
    identity, ``datagen.results.runs``) and number the cells by run. Returns the runs and
    the file of each node."""
    runs: list[Run] = []
    run_of: list[int] = []
    node_files: list[Path] = []
    for spec in specs:
        sorter = RunSorter(spec.paths)
        reader = RunReader(spec, options, kept_types, sorter, len(run_of))
        found = _read_spec(store, spec, reader, sorter)
        numbers = [_place_run(runs, one, spec) for one in found]  # the number of each among all runs
        for node, index in enumerate(sorter.run_of):
            run = runs[numbers[index]]
            run_of.append(numbers[index])
            node_files.append(sorter.file_of(node))
            run.no_id += reader.no_id.get(node, 0)
            if run.model is None and node in reader.models:
                run.model, run.adapter = reader.models[node]
    for run in runs:
        if run.no_id:
            log.warning("%s: %d failed line(s) without a custom_id cannot be joined and are left out",
                        run.where(), run.no_id)
    store.set_runs(run_of)
    return runs, node_files


def _read_spec(store: CompareStore, spec: Spec, reader: "RunReader", sorter: RunSorter) -> list[FoundRun]:
    """One argument's cells into the store; the runs found among its files."""
    if store.add_cells(reader.cells()) == 0 and not reader.no_id:
        raise UserError(f"--compare {spec.text}: no result lines; check the run's files")
    found = sorter.runs()
    sorter.check_unambiguous()
    if spec.name is not None and len(found) > 1:
        raise UserError(f"--compare {spec.text} holds {len(found)} runs: {names_with_files(found)}; "
                        "a NAME names one run: give each run its own NAME=PATH, or drop the name to "
                        "have a column per run")
    if len(found) > 1:
        log.info("--compare %s holds %d runs: %s", spec.text, len(found), ", ".join(r.name for r in found))
    return found


def _place_run(runs: list[Run], found: FoundRun, spec: Spec) -> int:
    """The number of ``found`` among ``runs``: a new run, or (a download and its
    ``--retry_failed`` download given as two PATHs, as in --input_file) the run it continues."""
    _place_empty_files(found, spec.paths)
    inputs = answered_inputs(found.keys)
    same = next((k for k, run in enumerate(runs) if inputs & run.inputs and spec.name is None
                 and run.spec.name is None), None)
    if same is None:
        runs.append(Run(spec.name or found.name, found.files, spec, inputs=inputs))
        return len(runs) - 1
    runs[same].paths += found.files
    runs[same].inputs |= inputs
    return same


def _place_empty_files(run: FoundRun, paths: list[Path]) -> None:
    """A results file without lines (every request failed) joins the run of the error file
    beside it, so the run is named by its results file, not by its side file alone."""
    for path in paths:
        side = {path.with_name(path.name + ".errors.jsonl"), path.with_name(path.stem + ".failed.jsonl")}
        if path not in run.files:
            at = next((k for k, f in enumerate(run.files) if f in side), None)
            if at is not None:
                run.files.insert(at, path)


def _conflict_error(conflict: VariantConflict, runs: list[Run], node_files: list[Path]) -> UserError:
    run = runs[conflict.run]
    found = []
    for node, wanted in (conflict.first, conflict.second):
        lines = (obj for _, obj in _iter_lines(node_files[node]))
        found.append((node_files[node], generation_of(lines, conflict.custom_id, wanted)))
    return generation_conflict(conflict.custom_id, run.name, found[0], found[1], f"--compare {run.spec.text}: ")


def compare(specs: list[Spec], output: Path, *, requests: Requests | None = None,
            keep_fields: list[str] | tuple = (), long: bool = False,
            options: ResultOptions = ResultOptions(), tmp_dir: str | None = None) -> Table:
    """Write the table of the runs in ``specs`` to ``output`` (complete or absent); count
    each run's ok, failed, missing and stray requests on the runs themselves."""
    keep_fields = list(keep_fields)
    if requests is not None and PROMPT_FIELD not in keep_fields:
        keep_fields.insert(0, PROMPT_FIELD)  # the prompt is known: show it
    kept_types: dict[str, set[str]] = {}
    with CompareStore(tmp_dir) as store:
        runs, node_files = _read_runs(store, specs, options, kept_types)
        if requests is not None:
            keep_types: dict[str, set[str]] = {name: set() for name in keep_fields}
            load_requests(store, requests, keep_fields, keep_types, Summary(), node_files)
            for number, (count, ids) in store.strays().items():
                runs[number].stray, runs[number].stray_ids = count, ids
        else:  # the fields the reformatted files kept
            keep_fields, keep_types = list(kept_types), kept_types
        columns, types = _columns(runs, keep_fields, keep_types, long)
        table = Table(runs=runs)
        try:
            _write_table(store, output, columns, types, table, keep_fields, requests is not None, long)
        except VariantConflict as conflict:  # one id with two generation settings in one run
            raise _conflict_error(conflict, runs, node_files) from None
    return table


def _columns(runs: list[Run], keep_fields: list[str], keep_types: dict[str, set[str]],
             long: bool) -> tuple[list[str], dict]:
    """The table's columns (checked: no name twice) and their Arrow types."""
    import pyarrow as pa

    clash = [name for name in keep_fields if long and name in LONG_COLUMNS]
    if clash:
        raise UserError(f"kept field {clash[0]!r} has the name of a --long column; keep other fields "
                        "or drop --long")
    check_names(runs, ["id", *keep_fields], long)
    columns = ["id", *keep_fields] + (list(LONG_COLUMNS) if long else
                                      [c for run in runs for c in (run.name, f"{run.name}.status")])
    types = {**{c: pa.string() for c in columns}, **arrow_types(keep_types, ["id", *keep_fields]),
             **({"sample": pa.int64()} if long else {})}
    return columns, types


def _write_table(store: CompareStore, output: Path, columns: list[str], types: dict, table: Table,
                 keep_fields: list[str], has_requests: bool, long: bool) -> None:
    """The table's rows, request by request, from the store; counts them in ``table``."""
    runs = table.runs
    with open_sink(output, columns, types) as sink, contextlib.closing(store.table_rows()) as rows:
        for custom_id, keep, meta, cells in progress(_groups(rows), desc="writing", unit="request"):
            table.requests += 1
            data = [loads(store.record(*cells[n][1:])) if n in cells else {} for n in range(len(runs))]
            if has_requests:
                fields = loads(merge_keep(keep_fields, keep, meta))
            else:  # the first run's that kept any
                kept = next((d["kept"] for d in data if d.get("kept")), {})
                fields = {name: kept.get(name) for name in keep_fields}
            for row in _table_rows(custom_id, fields, runs, cells, data, long):
                table.rows += 1
                sink.write(dumps_bytes(row))


def _table_rows(custom_id: str, fields: dict, runs: list[Run], cells: dict, cell_data: list[dict],
                long: bool) -> Iterator[dict]:
    """The table's row(s) of one request (wide: one; long: per run and sample); counts each
    run's ok, failed and missing."""
    wide: dict[str, Any] = {"id": custom_id, **fields}
    for number, (run, data) in enumerate(zip(runs, cell_data)):
        rank = cells[number][0] if number in cells else MISSING
        _count(run, rank, data)
        if long:
            yield from _long_rows({"id": custom_id, **fields}, run, rank, data)
        else:
            samples = data.get("samples")
            wide[run.name] = samples[0]["text"] if rank == OK and samples else None
            wide[f"{run.name}.status"] = STATUS[rank]
    if not long:
        yield wide


def _count(run: Run, rank: int, data: dict) -> None:
    run.ok += rank == OK
    run.failed += rank == FAILED
    run.missing += rank == MISSING
    if rank == FAILED:
        run.failed_by[data.get("reason") or "error"] += 1


def _long_rows(first: dict, run: Run, rank: int, data: dict) -> Iterator[dict]:
    """One run's rows of one request in the long table: a row per sample, or one without."""
    base = {**first, "run": run.name, "model": data.get("model") or run.model,
            "adapter": data.get("adapter") or run.adapter, "status": STATUS[rank]}
    samples = data.get("samples")
    if rank != OK or not samples:
        missing = "no result for this request in this run" if rank == MISSING else None
        yield {**base, "sample": None, "generated_text": None, "finish_reason": None,
               "error": data.get("error") or missing}
        return
    for k, sample in enumerate(samples):
        yield {**base, "sample": k, "generated_text": sample.get("text"),
               "finish_reason": sample.get("finish_reason"), "error": None}
