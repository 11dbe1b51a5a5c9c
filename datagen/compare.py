"""``reformat_results.py --compare``: runs of either route side by side, joined on the id.

A **run** is one model's (or one adapter's) answers: a raw output of either route (an
OpenAI output file with its ``.errors.jsonl``, a generations file or its shards) or a
reformatted file (with its ``.failed.jsonl`` beside it), named as a file, a quoted glob
(all its files are one run), or a generations file that does not exist but stands for
its shards (``OUT.shard-KKK-of-NNN.jsonl``) or its adapters' files (``OUT.NAME.jsonl``,
``OUT.base.jsonl``, each maybe sharded or reformatted to ``OUT.NAME.parquet``: one run
per NAME).

The table has one row per request (``--long``: per request, run and sample), in the
order of ``--batch_input`` / ``--prompts_file`` when given (then ids only some runs have,
in natural order), else in natural order of the ids:

- wide: ``id``, ``prompt`` and the kept fields, then per run ``NAME`` (the first
  sample's text, null unless ok) and ``NAME.status`` (``ok``, ``failed`` or ``missing``);
- long: ``id``, ``prompt`` and the kept fields, ``run``, ``model``, ``adapter``,
  ``status``, ``sample`` (0-based; null unless ok), ``generated_text``,
  ``finish_reason``, ``error`` (the reason of a failed one).

Run names are the adapter's name (from the file name, else its folder), else the model,
made unique with the file's stem. Every run's results go to one temporary SQLite
``ResultStore`` on disk, so memory stays flat whatever the size.
"""

from __future__ import annotations

import contextlib
import glob
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from datagen import results
from datagen.errors import UserError
from datagen.jsonl import dumps_bytes, iter_jsonl_objects, loads

log = logging.getLogger("datagen")

OK, FAILED, MISSING = 1, 0, -1  # a cell's rank: the best one of an id wins
STATUS = {OK: "ok", FAILED: "failed", MISSING: "missing"}
LONG_COLUMNS = ("run", "model", "adapter", "status", "sample", "generated_text", "finish_reason", "error")


@dataclass
class Run:
    paths: list[Path]
    label: str | None = None  # the adapter's name in the file name (OUT_STEM.NAME.jsonl)
    name: str = ""  # the run's unique column name
    model: str | None = None
    adapter: str | None = None
    ok: int = 0
    failed: int = 0
    missing: int = 0
    no_id: int = 0  # failures without a custom_id: nothing to join them to

    def where(self) -> str:
        return str(self.paths[0]) + (f" (+{len(self.paths) - 1} files)" if len(self.paths) > 1 else "")


@dataclass
class Table:
    rows: int = 0
    requests: int = 0


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


def _adapter_groups(path: Path) -> dict[str | None, list[Path]]:
    """The files a missing ``OUT.jsonl`` stands for, by adapter name (None: its own shards)."""
    groups: dict[str | None, list[Path]] = {}
    prefix = path.stem + "."
    for match in sorted(path.parent.glob(f"{glob.escape(path.stem)}.*")):
        if match.suffix not in (path.suffix, ".parquet"):
            continue
        name = results._SHARD.sub("", "." + match.stem[len(prefix):])[1:]  # NAME.shard-K-of-N: NAME
        if name.endswith(("failed", "errors")):
            continue  # OUT.failed.jsonl, OUT.NAME.failed.jsonl, OUT.jsonl.errors.jsonl: side files
        groups.setdefault(name or None, []).append(match)
    return groups


def expand_runs(patterns: Iterable[str]) -> list[Run]:
    """Each ``--compare`` argument into its runs (see the module docstring)."""
    runs: list[Run] = []
    for pattern in patterns:
        path = Path(pattern)
        groups = {} if path.exists() or glob.has_magic(pattern) else _adapter_groups(path)
        if len(groups) > 1 or (groups and None not in groups):
            for name, files in groups.items():
                runs.append(Run(_with_failed_files(results.expand_inputs([str(f) for f in files], "--compare")), label=name))
            log.info("%s does not exist: comparing its %d runs %s", path, len(groups),
                     ", ".join(str(name or "(no adapter)") for name in groups))
        else:
            runs.append(Run(_with_failed_files(results.expand_inputs([pattern], "--compare"))))
    seen: dict[Path, Run] = {}
    for run in runs:
        for file in run.paths:
            if file.suffix.lower() in (".csv", ".tsv"):
                raise UserError(f"--compare {file}: a CSV table has lost the types and the samples; give "
                                "the run's JSONL or Parquet output, or its raw results")
            other = seen.setdefault(file.resolve(), run)
            if other is not run:
                raise UserError(f"--compare: {file} is in two runs ({other.where()} and {run.where()}); "
                                "name each run once")
    return runs


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


class RunReader:
    """One run's lines into ``(custom_id, rank, cell_json)``; notes its model and adapter
    and, from reformatted files, the kept fields (columns beyond results.COLUMNS) and
    their types in ``kept``."""

    def __init__(self, run: Run, options: results.ResultOptions, kept: dict[str, set[str]]):
        self.run, self.options, self.kept = run, options, kept
        self.kinds = results.KindCheck("auto")

    def _note(self, record: dict) -> None:
        if self.run.model is None and record.get("model"):
            self.run.model = record["model"]
        if self.run.adapter is None and record.get("adapter"):
            self.run.adapter = record["adapter"]

    def cells(self) -> Iterator[tuple[str, int, bytes]]:
        for path in self.run.paths:
            for where, obj in _iter_lines(path):
                custom_id, rank, record, extras = self._parse(obj, where)
                if custom_id == "":
                    self.run.no_id += 1
                    continue
                self._note(record)
                yield custom_id, rank, _cell(rank, record, extras)

    def _parse(self, obj: dict, where: str) -> tuple[str, int, dict, dict | None]:
        if "custom_id" in obj:  # a raw line of either route
            fast = results.fast_chat_record(obj) if self.kinds.kind == results.OPENAI else None
            if fast is not None:
                return fast["id"], OK, fast, None
            result = results.PARSERS[self.kinds.check(obj, where)](obj, where, self.options)
            return result.custom_id, OK if result.ok else FAILED, result.record, None
        custom_id = obj.get("id")
        if not isinstance(custom_id, str):
            raise UserError(f"{where}: neither a raw result line (custom_id) nor a reformatted line (id); "
                            "give --compare the outputs of batch_utils.py, generate_data_finetuned.py "
                            "or reformat_results.py")
        if "reason" in obj and "generated_text" not in obj:  # a line of a .failed.jsonl file
            return custom_id, MISSING if obj["reason"] == "missing" else FAILED, obj, None
        extras = {k: v for k, v in obj.items() if k not in results.COLUMNS and k not in results.OLD_COLUMNS}
        for name, value in extras.items():
            self.kept.setdefault(name, set()).add(type(value).__name__)
        return custom_id, OK, obj, extras


def name_runs(runs: list[Run], taken: Iterable[str]) -> None:
    """Unique column names: the adapter's name, else the model, else the file's stem."""
    used = set(taken)
    for run in runs:
        stem = run.paths[0].stem
        name = run.label or (Path(run.adapter.rstrip("/")).name if run.adapter else None) or run.model or stem
        candidates = [name, f"{name} ({stem})"] + [f"{name} ({stem}) {k}" for k in range(2, len(runs) + 2)]
        run.name = next(c for c in candidates if c not in used and f"{c}.status" not in used)
        used.update((run.name, f"{run.name}.status"))


# --- the table ---------------------------------------------------------------------------------


class CompareStore(results.ResultStore):
    """A ResultStore with one more table: every run's cells (its best result per id is
    picked by rank when reading)."""

    def __init__(self, tmp_dir: str | None = None):
        super().__init__(tmp_dir)
        try:
            with self._faults():
                self.db.execute("CREATE TABLE cells (run INTEGER NOT NULL, custom_id TEXT NOT NULL, "
                                "rank INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL)")
        except BaseException:
            self.close()
            raise

    def add_cells(self, run: int, rows: Iterable[tuple[str, int, bytes]]) -> int:
        spooled = ((run, *row) for row in self._spooled((cid, rank, cell) for cid, rank, cell in rows))
        return self._insert("INSERT INTO cells VALUES (?, ?, ?, ?, ?)", spooled)

    def table_rows(self) -> Iterator[tuple]:
        """``(key, custom_id, keep, meta, run, rank, offset, length)`` grouped by request
        (key), each run's best cell first (ok, then failed, then missing; then first read)."""
        with self._faults():
            self.db.execute("CREATE INDEX cells_by_id ON cells (custom_id, run, rank DESC)")
        self._index()
        lookups = "(SELECT m.keep FROM meta m WHERE m.custom_id = {0} ORDER BY m.pos LIMIT 1)"
        cells = "c.run, c.rank, c.offset, c.length"
        natural = "ORDER BY natural_key(c.custom_id), c.custom_id, c.run, c.rank DESC, c.rowid"
        with self._faults():
            self.spool.flush()
            if self.has_inputs:
                yield from self.db.execute(
                    f"SELECT i.pos, i.custom_id, i.keep, {lookups.format('i.custom_id')}, {cells} FROM inputs i "
                    "LEFT JOIN cells c ON c.custom_id = i.custom_id ORDER BY i.pos, c.run, c.rank DESC, c.rowid")
            yield from self.db.execute(
                f"SELECT c.custom_id, c.custom_id, NULL, {lookups.format('c.custom_id')}, {cells} FROM cells c "
                "WHERE NOT EXISTS (SELECT 1 FROM inputs i WHERE i.custom_id = c.custom_id) " + natural)


def _groups(rows: Iterable[tuple]) -> Iterator[tuple[str, bytes | None, bytes | None, dict]]:
    """Per request: (custom_id, keep, meta, {run: (rank, offset, length)}), each run's best cell."""
    key, current = object(), None
    for row in rows:
        if row[0] != key:
            if current is not None:
                yield current
            key = row[0]
            current = (row[1], row[2], row[3], {})
        run = row[4]
        if run is not None and run not in current[3]:
            current[3][run] = row[5:]
    if current is not None:
        yield current


def compare(runs: list[Run], output: Path, *, requests: results.Requests | None = None,
            keep_fields: list[str] | tuple = (), long: bool = False,
            options: results.ResultOptions = results.ResultOptions(), tmp_dir: str | None = None) -> Table:
    """Write the table of ``runs`` to ``output`` (complete or absent); count each run's
    ok, failed and missing requests on the runs themselves."""
    from datagen.cli import progress

    keep_fields = list(keep_fields)
    if requests is not None and results.PROMPT_FIELD not in keep_fields:
        keep_fields.insert(0, results.PROMPT_FIELD)  # the prompt is known: show it
    table = Table()
    kept_types: dict[str, set[str]] = {}
    with CompareStore(tmp_dir) as store:
        for number, run in enumerate(runs):
            reader = RunReader(run, options, kept_types)
            if store.add_cells(number, reader.cells()) == 0 and not run.no_id:
                raise UserError(f"--compare {run.where()}: no result lines; check the run's files")
            if run.no_id:
                log.warning("%s: %d failed line(s) without a custom_id cannot be joined and are left out",
                            run.where(), run.no_id)
        keep_types: dict[str, set[str]] = {name: set() for name in keep_fields}
        if requests is not None:
            results.load_requests(store, requests, keep_fields, keep_types, results.Summary())
        else:  # the fields the reformatted files kept
            keep_fields = list(kept_types)
            keep_types = kept_types
        clash = [name for name in keep_fields if long and name in LONG_COLUMNS]
        if clash:
            raise UserError(f"kept field {clash[0]!r} has the name of a --long column; keep other fields "
                            "or drop --long")
        name_runs(runs, [] if long else ["id", *keep_fields])  # long: names are values, not columns
        columns = ["id", *keep_fields] + (list(LONG_COLUMNS) if long else
                                          [c for run in runs for c in (run.name, f"{run.name}.status")])
        import pyarrow as pa

        types = {**{c: pa.string() for c in columns}, **results.arrow_types(keep_types, ["id", *keep_fields]),
                 **({"sample": pa.int64()} if long else {})}
        with results.open_sink(output, columns, types) as sink, contextlib.closing(store.table_rows()) as rows:
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
