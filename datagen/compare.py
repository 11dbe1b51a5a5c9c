"""``reformat_results.py --compare``: runs of either route side by side, joined on the id.

Each ``--compare`` argument is ``PATH`` or ``NAME=PATH``. ``PATH`` is a raw output of either
route (an OpenAI output file with its ``.errors.jsonl``, a generations file or its shards)
or a reformatted file (with its ``.failed.jsonl`` beside it), named as a file, a quoted
glob, or a generations file that does not exist but stands for its shards
(``OUT.shard-KKK-of-NNN.jsonl``) or its adapters' files (``OUT.NAME.jsonl``,
``OUT.base.jsonl``, each maybe sharded or reformatted to ``OUT.NAME.parquet``).

**Runs and their names.** The files of an argument are split into runs by the records'
run identity (``datagen.result_runs``): a glob or stem over several adapters' files is one
column per adapter; a download and its ``--retry_failed`` download given as two PATHs are
one run (they answer one batch input), as in ``--input_file``; one id answered in one run
with two generation settings is refused (``result_runs.generation_conflict``). A run's column is its **run name, read from the records**, the same
however the run is given (stem, raw files, glob, reformatted files): the record's ``run``
(``--adapter_path NAME=PATH``'s NAME, ``base``; older records: the adapter folder's name,
else ``base``), the OpenAI model as requested. ``NAME=PATH`` sets it; a ``NAME=PATH``
holding several runs is an error. Two runs of one name (the same model from two folders)
are an error that says how to name them (``--compare answers=res1/results.jsonl
judge=res2/results.jsonl``): names are never made unique by guessing.

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
import glob
import logging
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from datagen import results
from datagen.errors import UserError
from datagen.jsonl import dumps_bytes, iter_jsonl_objects, loads
from datagen.result_runs import FINETUNED, OPENAI, adapter_run_name, input_tokens

log = logging.getLogger("datagen")

OK, FAILED, MISSING = 1, 0, -1  # a cell's rank: the best one of an id wins
STATUS = {OK: "ok", FAILED: "failed", MISSING: "missing"}
LONG_COLUMNS = ("run", "model", "adapter", "status", "sample", "generated_text", "finish_reason", "error")


@dataclass
class Spec:
    """One --compare argument: ``NAME=PATH`` or ``PATH`` (a file, a glob, or a generations
    file that stands for its shards or its adapters' files), and the files it names."""

    text: str
    name: str | None
    paths: list[Path]


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
    stray: int = 0  # ids the requests do not have (left out of the table)
    stray_ids: list[str] = field(default_factory=list)  # the first few of them
    no_id: int = 0  # failures without a custom_id: nothing to join them to
    inputs: set = field(default_factory=set)  # the batch inputs its downloads answer (result_runs.input_tokens)

    def where(self) -> str:
        return str(self.paths[0]) + (f" (+{len(self.paths) - 1} files)" if len(self.paths) > 1 else "")


@dataclass
class Table:
    rows: int = 0
    requests: int = 0
    runs: list[Run] = field(default_factory=list)


# --- runs from the command line ------------------------------------------------------------


def _with_failed_files(paths: list[Path]) -> list[Path]:
    """A reformatted file brings its OUT.failed.jsonl along (as an output its .errors.jsonl)."""
    out = []
    for path in paths:
        out.append(path)
        failed = path.with_name(path.stem + ".failed.jsonl")
        if not path.stem.endswith(".failed") and failed.is_file() and failed not in paths:
            out.append(failed)
    return list(dict.fromkeys(out))


def _adapter_files(path: Path) -> list[Path]:
    """The files a missing ``OUT.jsonl`` stands for: its adapters' ``OUT.NAME.jsonl`` (or
    reformatted ``OUT.NAME.parquet``), each maybe sharded; not its side files."""
    found = []
    for match in sorted(path.parent.glob(f"{glob.escape(path.stem)}.*")):
        if match.suffix not in (path.suffix, ".parquet") or match.stem.endswith((".failed", ".errors")):
            continue
        if match.name.endswith(".errors.jsonl"):
            continue
        found.append(match)
    return found


_NAME = re.compile(r"^[^=/\\*?\[\]]+$")


def _split_name(text: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a path that holds '=' itself stays a path."""
    name, sep, rest = text.partition("=")
    if sep and not name and rest and not Path(text).exists():
        raise UserError(f"--compare {text}: the NAME before '=' is empty; give NAME=PATH, or PATH alone to "
                        "name the run from its records")
    if sep and rest and _NAME.match(name) and not Path(text).exists():
        return name, rest
    return None, text


def expand_runs(patterns: Iterable[str]) -> list[Spec]:
    """Each ``--compare`` argument into its files (see the module docstring)."""
    specs: list[Spec] = []
    for text in patterns:
        name, pattern = _split_name(text)
        path = Path(pattern)
        files = [] if path.exists() or glob.has_magic(pattern) else _adapter_files(path)
        if files:  # its shards, or its adapters' files (each maybe sharded)
            log.info("%s does not exist: reading its %d files %s", path, len(files), ", ".join(f.name for f in files))
            paths = results.expand_inputs([str(f) for f in files], "--compare")
        else:
            paths = results.expand_inputs([pattern], "--compare")
        specs.append(Spec(text, name, _with_failed_files(paths)))
    seen: dict[Path, Spec] = {}
    for spec in specs:
        for file in spec.paths:
            if file.suffix.lower() in (".csv", ".tsv"):
                raise UserError(f"--compare {file}: a CSV table has lost the types and the samples; give "
                                "the run's JSONL or Parquet output, or its raw results")
            other = seen.setdefault(file.resolve(), spec)
            if other is not spec:
                given = f"{file} is given twice ({other.text} and {spec.text})" if other.text != spec.text \
                    else f"{spec.text} is given twice"
                raise UserError(f"--compare: {given}; give each run once")
    return specs


# --- reading a run ----------------------------------------------------------------------------


def _iter_lines(path: Path) -> Iterator[tuple[str, dict]]:
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                number += 1
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
        data = {"error": f"{reason}: {message}" if reason and message else message or reason}
    data.update(model=record.get("model") or None, adapter=record.get("adapter") or None)
    if kept:
        data["kept"] = kept
    return dumps_bytes(data)


def _reformatted_key(obj: dict) -> tuple[tuple, str | None]:
    """The run identity of a reformatted record (``results.run_key`` on its columns) and
    its generation variant."""
    source = obj.get("source") or (FINETUNED if obj.get("adapter") else OPENAI)
    if source != FINETUNED:
        return results.run_key(OPENAI, obj), None
    details = obj.get("details")
    if isinstance(details, str):
        with contextlib.suppress(ValueError):
            details = loads(details)
    fingerprint = details.get("fingerprint") if isinstance(details, dict) else None
    named = obj if obj.get("run") else {**obj, "run": adapter_run_name(obj.get("adapter"))}
    return results.run_key(FINETUNED, named, fingerprint=fingerprint or {}), results.variant(fingerprint)


class RunReader:
    """The lines of one --compare argument into ``(node, custom_id, rank, cell_json)``:
    ``node`` is the run identity of the line in ``sorter`` (plus ``offset``). Notes each
    node's model and adapter and, from reformatted files, the kept fields (columns beyond
    results.COLUMNS) and their types in ``kept``."""

    def __init__(self, spec: Spec, options: results.ResultOptions, kept: dict[str, set[str]],
                 sorter: results.RunSorter, offset: int):
        self.spec, self.options, self.kept = spec, options, kept
        self.sorter, self.offset = sorter, offset
        self.kinds = results.KindCheck("auto")
        self.origins = results.Origins()
        self.models: dict[int, tuple] = {}  # node -> (model, adapter)
        self.no_id: dict[int, int] = {}  # node -> failed lines without an id

    def cells(self) -> Iterator[tuple[str, int, bytes, str | None, int]]:
        for number, path in enumerate(self.spec.paths):
            requested, roots = self.origins.of(path)
            for where, obj in _iter_lines(path):
                custom_id, rank, record, extras, key, variant = self._parse(obj, where, requested, roots)
                node = self.sorter.note(number, key)
                if custom_id == "":
                    self.no_id[node] = self.no_id.get(node, 0) + 1
                    continue
                if node not in self.models and (record.get("model") or record.get("adapter")):
                    self.models[node] = (record.get("model") or None, record.get("adapter") or None)
                yield (custom_id, rank, _cell(rank, record, extras), variant, self.offset + node,
                       results.asked_of(obj))

    def _parse(self, obj: dict, where: str, requested: str | None,
               roots: frozenset | None) -> tuple[str, int, dict, dict | None, tuple | None, str | None]:
        if "custom_id" in obj:  # a raw line of either route
            kind = self.kinds.check(obj, where)
            if kind == FINETUNED:
                result = results.finetuned_result(obj, where, self.options)
                return result.custom_id, OK if result.ok else FAILED, result.record, None, \
                    results.run_key(FINETUNED, obj), results.variant(obj.get("fingerprint"))
            result = results.openai_result(obj, where, self.options, requested)
            model = requested or result.record.get("model")
            key = results.run_key(OPENAI, {"model": model}, roots=roots) if model else None
            return result.custom_id, OK if result.ok else FAILED, result.record, None, key, None
        custom_id = obj.get("id")
        if not isinstance(custom_id, str):
            raise UserError(f"{where}: neither a raw result line (custom_id) nor a reformatted line (id); "
                            "give --compare the outputs of batch_utils.py, generate_data_finetuned.py "
                            "or reformat_results.py")
        if "source" not in obj and results.compare_table_row(obj):
            raise results.table_refusal(where)
        if "reason" in obj and "generated_text" not in obj:  # a line of a .failed.jsonl file
            return custom_id, MISSING if obj["reason"] == "missing" else FAILED, obj, None, None, None
        extras = {k: v for k, v in obj.items() if k not in results.COLUMNS and k not in results.OLD_COLUMNS}
        for name, value in extras.items():
            self.kept.setdefault(name, set()).add(type(value).__name__)
        key, variant = _reformatted_key(obj)
        return custom_id, OK, obj, extras, key, variant


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


class CompareStore(results.ResultStore):
    """A ResultStore with one more table: every run's cells (its best result per id is
    picked by rank when reading)."""

    ANSWERS = ("cells", "node")  # what answers say they asked is checked here (``asked_elsewhere``)

    def __init__(self, tmp_dir: str | None = None):
        super().__init__(tmp_dir)
        try:
            with self._faults():
                self.db.execute("CREATE TABLE cells (custom_id TEXT NOT NULL, rank INTEGER NOT NULL, "
                                "offset INTEGER NOT NULL, length INTEGER NOT NULL, variant TEXT, "
                                "node INTEGER NOT NULL, run INTEGER, asked TEXT)")
        except BaseException:
            self.close()
            raise

    def add_cells(self, rows: Iterable[tuple[str, int, bytes, str | None, int, str | None]]) -> int:
        """``(custom_id, rank, cell_json, variant, node, asked)`` rows; ``node`` becomes a run in
        ``set_runs``; ``asked``: what a fine-tuned record says it asked (``results.asked_of``)."""
        return self._insert("INSERT INTO cells (custom_id, rank, offset, length, variant, node, asked) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)", self._spooled(rows))

    def set_runs(self, run_of: list[int]) -> None:
        """Every cell's node (a run identity) into the number of its run."""
        with self._faults():
            self.db.execute("CREATE TABLE runmap (node INTEGER PRIMARY KEY, run INTEGER NOT NULL)")
            self.db.executemany("INSERT INTO runmap VALUES (?, ?)", enumerate(run_of))
            self.db.execute("UPDATE cells SET run = (SELECT m.run FROM runmap m WHERE m.node = cells.node)")

    def strays(self, limit: int = 3) -> dict[int, tuple[int, list[str]]]:
        """Per run: how many of its ids the requests do not have, and the first few."""
        self._index()
        found: dict[int, tuple[int, list[str]]] = {}
        with self._faults():
            rows = self.db.execute(
                "SELECT run, custom_id FROM cells c WHERE NOT EXISTS (SELECT 1 FROM inputs i WHERE "
                "i.custom_id = c.custom_id) GROUP BY run, custom_id ORDER BY run, MIN(rowid)").fetchall()
        for run, custom_id in rows:
            count, ids = found.get(run, (0, []))
            found[run] = (count + 1, ids + [custom_id] if len(ids) < limit else ids)
        return found

    def table_rows(self) -> Iterator[tuple]:
        """``(key, custom_id, keep, meta, run, rank, offset, length, variant, node)`` grouped by request
        (key), each run's best cell first (ok, then failed, then missing; then first read).
        With requests, only their ids; without, every id of every run."""
        with self._faults():
            self.db.execute("CREATE INDEX cells_by_id ON cells (custom_id, run, rank DESC)")
        self._index()
        lookups = "(SELECT m.keep FROM meta m WHERE m.custom_id = {0} ORDER BY m.pos LIMIT 1)"
        cells = "c.run, c.rank, c.offset, c.length, c.variant, c.node"
        natural = "ORDER BY natural_key(c.custom_id), c.custom_id, c.run, c.rank DESC, c.rowid"
        with self._faults():
            self.spool.flush()
            if self.has_inputs:  # ids the requests do not have stay out (counted as strays)
                yield from self.db.execute(
                    f"SELECT i.pos, i.custom_id, i.keep, {lookups.format('i.custom_id')}, {cells} FROM inputs i "
                    "LEFT JOIN cells c ON c.custom_id = i.custom_id ORDER BY i.pos, c.run, c.rank DESC, c.rowid")
                return
            yield from self.db.execute(
                f"SELECT c.custom_id, c.custom_id, NULL, {lookups.format('c.custom_id')}, {cells} FROM cells c "
                "WHERE NOT EXISTS (SELECT 1 FROM inputs i WHERE i.custom_id = c.custom_id) " + natural)


def _groups(rows: Iterable[tuple]) -> Iterator[tuple[str, bytes | None, bytes | None, dict]]:
    """Per request: (custom_id, keep, meta, {run: (rank, offset, length)}), each run's best cell.
    Two generation variants of one id in one run raise ``VariantConflict`` (nodes as files)."""
    key, current, variants = object(), None, {}
    for row in rows:
        if row[0] != key:
            if current is not None:
                yield current
            key, variants = row[0], {}
            current = (row[1], row[2], row[3], {})
        run, variant = row[4], row[8]
        if run is not None and run not in current[3]:
            current[3][run] = row[5:8]
        if variant is not None:
            seen = variants.setdefault(run, (row[9], variant))
            if seen[1] != variant:
                raise results.VariantConflict(row[1], seen, (row[9], variant), run)
    if current is not None:
        yield current


def _read_runs(store: CompareStore, specs: list[Spec], options: results.ResultOptions,
               kept_types: dict[str, set[str]]) -> tuple[list[Run], list[Path]]:
    """Read every argument's files into the store; split each into its runs (one per run
    identity, ``datagen.result_runs``) and number the cells by run. Returns the runs and
    the file of each node."""
    runs: list[Run] = []
    run_of: list[int] = []
    node_files: list[Path] = []
    for spec in specs:
        sorter = results.RunSorter(spec.paths)
        reader = RunReader(spec, options, kept_types, sorter, len(run_of))
        if store.add_cells(reader.cells()) == 0 and not reader.no_id:
            raise UserError(f"--compare {spec.text}: no result lines; check the run's files")
        found = sorter.runs()
        sorter.check_unambiguous()
        if spec.name is not None and len(found) > 1:
            raise UserError(f"--compare {spec.text} holds {len(found)} runs: {results.describe_runs(found)}; "
                            "a NAME names one run: give each run its own NAME=PATH, or drop the name to "
                            "have a column per run")
        numbers = []  # the number of each found run among all runs
        for one in found:
            _place_empty_files(one, spec.paths)
            inputs = input_tokens(one.keys)
            # A download and its --retry_failed download given as two PATHs: one run, as in --input_file.
            same = next((k for k, run in enumerate(runs) if inputs & run.inputs and spec.name is None
                         and run.spec.name is None), None)
            if same is None:
                numbers.append(len(runs))
                runs.append(Run(spec.name or one.name, one.files, spec, inputs=inputs))
            else:
                numbers.append(same)
                runs[same].paths += one.files
                runs[same].inputs |= inputs
        for node, index in enumerate(sorter.run_of):
            run = runs[numbers[index]]
            run_of.append(numbers[index])
            node_files.append(sorter.file_of(node))
            run.no_id += reader.no_id.get(node, 0)
            if run.model is None and node in reader.models:
                run.model, run.adapter = reader.models[node]
        if len(found) > 1:
            log.info("--compare %s holds %d runs: %s", spec.text, len(found), ", ".join(r.name for r in found))
    for run in runs:
        if run.no_id:
            log.warning("%s: %d failed line(s) without a custom_id cannot be joined and are left out",
                        run.where(), run.no_id)
    store.set_runs(run_of)
    return runs, node_files


def _place_empty_files(run: "results.FoundRun", paths: list[Path]) -> None:
    """A results file without lines (every request failed) joins the run of the error file
    beside it, so the run is named by its results file, not by its side file alone."""
    for path in paths:
        side = {path.with_name(path.name + ".errors.jsonl"), path.with_name(path.stem + ".failed.jsonl")}
        if path not in run.files:
            at = next((k for k, f in enumerate(run.files) if f in side), None)
            if at is not None:
                run.files.insert(at, path)


def _conflict_error(conflict: results.VariantConflict, runs: list[Run], node_files: list[Path]) -> UserError:
    run = runs[conflict.run]
    found = []
    for node, wanted in (conflict.first, conflict.second):
        lines = (obj for _, obj in _iter_lines(node_files[node]))
        found.append((node_files[node], results.generation_of(lines, conflict.custom_id, wanted)))
    return results.generation_conflict(conflict.custom_id, run.name, found[0], found[1],
                                       f"--compare {run.spec.text}: ")


def compare(specs: list[Spec], output: Path, *, requests: results.Requests | None = None,
            keep_fields: list[str] | tuple = (), long: bool = False,
            options: results.ResultOptions = results.ResultOptions(), tmp_dir: str | None = None) -> Table:
    """Write the table of the runs in ``specs`` to ``output`` (complete or absent); count
    each run's ok, failed, missing and stray requests on the runs themselves."""
    from datagen.cli import progress

    keep_fields = list(keep_fields)
    if requests is not None and results.PROMPT_FIELD not in keep_fields:
        keep_fields.insert(0, results.PROMPT_FIELD)  # the prompt is known: show it
    table = Table()
    kept_types: dict[str, set[str]] = {}
    with CompareStore(tmp_dir) as store:
        runs, node_files = _read_runs(store, specs, options, kept_types)
        table.runs = runs
        keep_types: dict[str, set[str]] = {name: set() for name in keep_fields}
        if requests is not None:
            results.load_requests(store, requests, keep_fields, keep_types, results.Summary(), node_files)
            for number, (count, ids) in store.strays().items():
                runs[number].stray, runs[number].stray_ids = count, ids
        else:  # the fields the reformatted files kept
            keep_fields = list(kept_types)
            keep_types = kept_types
        clash = [name for name in keep_fields if long and name in LONG_COLUMNS]
        if clash:
            raise UserError(f"kept field {clash[0]!r} has the name of a --long column; keep other fields "
                            "or drop --long")
        check_names(runs, ["id", *keep_fields], long)
        columns = ["id", *keep_fields] + (list(LONG_COLUMNS) if long else
                                          [c for run in runs for c in (run.name, f"{run.name}.status")])
        import pyarrow as pa

        types = {**{c: pa.string() for c in columns}, **results.arrow_types(keep_types, ["id", *keep_fields]),
                 **({"sample": pa.int64()} if long else {})}
        try:
            with results.open_sink(output, columns, types) as sink, \
                    contextlib.closing(store.table_rows()) as rows:
                for custom_id, keep, meta, cells in progress(_groups(rows), desc="writing", unit="request"):
                    table.requests += 1
                    data = [loads(store.record(*cells[n][1:])) if n in cells else {} for n in range(len(runs))]
                    if requests is not None:
                        fields = loads(results.merge_keep(keep_fields, keep, meta))
                    else:  # the first run's that kept any
                        kept = next((d["kept"] for d in data if d.get("kept")), {})
                        fields = {name: kept.get(name) for name in keep_fields}
                    for row in _table_rows(custom_id, fields, runs, cells, data, long):
                        table.rows += 1
                        sink.write(dumps_bytes(row))
        except results.VariantConflict as conflict:  # one id with two generation settings in one run
            raise _conflict_error(conflict, runs, node_files) from None
    return table


def _table_rows(custom_id: str, fields: dict, runs: list[Run], cells: dict, cell_data: list[dict],
                long: bool) -> Iterator[dict]:
    """The table's row(s) of one request; counts each run's ok, failed and missing."""
    wide: dict[str, Any] = {"id": custom_id, **fields}
    for number, (run, data) in enumerate(zip(runs, cell_data)):
        rank = cells[number][0] if number in cells else MISSING
        status = STATUS[rank]
        run.ok += rank == OK
        run.failed += rank == FAILED
        run.missing += rank == MISSING
        samples = data.get("samples") or []
        if not long:
            wide[run.name] = samples[0]["text"] if rank == OK and samples else None
            wide[f"{run.name}.status"] = status
            continue
        base = {"id": custom_id, **fields, "run": run.name, "model": data.get("model") or run.model,
                "adapter": data.get("adapter") or run.adapter, "status": status}
        if rank != OK or not samples:
            yield {**base, "sample": None, "generated_text": None, "finish_reason": None,
                   "error": data.get("error") or ("no result for this request in this run" if rank == MISSING
                                                  else None)}
            continue
        for k, sample in enumerate(samples):
            yield {**base, "sample": k, "generated_text": sample.get("text"),
                   "finish_reason": sample.get("finish_reason"), "error": None}
    if not long:
        yield wide
