"""Prompts files of every supported kind, read as a stream of rows (``iter_rows``).

Kinds (``--input_format auto`` picks by extension, or by content for ``.json``):

- ``jsonl``    one JSON object per line (``.jsonl``, ``.ndjson``, or ``.json`` starting with ``{``)
- ``json``     a JSON array of objects (``.json`` starting with ``[``), parsed incrementally
- ``csv``      a header row then one row per record (``.csv``; ``.tsv`` is tab-separated);
               read with the stdlib so every value stays text exactly as written (NUL and
               carriage returns included), and strictly: an unclosed quote or a short or long row is an error
- ``parquet``  a Parquet file (``.parquet``, ``.pq``), streamed through ``datasets``
- ``hf``       a Hugging Face dataset saved with ``save_to_disk`` (a folder), memory-mapped

Rows count from 0, as in the default ``custom_id`` ``request-<row>``. A row's
``where`` names the file and line (or row) for error messages. ``datagen.common.prompts``
turns rows into prompts.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from datagen.common.errors import UserError
from datagen.common.jsonl import iter_jsonl

FORMATS = ("auto", "jsonl", "json", "csv", "parquet", "hf")


@dataclass
class Row:
    index: int  # 0-based row number
    where: str  # "file:line (row N)" or "file row N", for messages
    data: dict


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".json":
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            while True:
                char = handle.read(1)
                if not char or not char.isspace():
                    break
        return "json" if char == "[" else "jsonl"
    raise UserError(
        f"{path}: cannot tell the file kind from its extension {suffix or '(none)'}; "
        f"pass --input_format ({', '.join(FORMATS[1:])})"
    )


def iter_rows(path: str | os.PathLike, fmt: str = "auto", split: str | None = None) -> Iterator[Row]:
    """Yield every row of a prompts file as a ``Row``, streaming."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder; check --input_file")
    if path.is_file() and path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty; it needs at least one prompt row")
    if fmt == "auto":
        fmt = detect_format(path)
    readers = {"jsonl": _iter_jsonl_rows, "json": _iter_json_array_rows, "csv": _iter_csv_rows,
               "parquet": _iter_parquet_rows, "hf": _iter_hf_rows}
    if fmt not in readers:
        raise UserError(f"unknown input format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "hf":
        yield from _iter_hf_rows(path, split)
    else:
        yield from readers[fmt](path)


def _require_object(obj: Any, where: str) -> dict:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object per row, got {type(obj).__name__}")
    return obj


def _iter_jsonl_rows(path: Path) -> Iterator[Row]:
    index = 0
    for line_number, obj in iter_jsonl(path):
        where = f"{path}:{line_number} (row {index})"
        yield Row(index, where, _require_object(obj, where))
        index += 1


def _iter_json_array_rows(path: Path, chunk_size: int = 1 << 20,
                          max_record_bytes: int = 64 << 20) -> Iterator[Row]:
    """Parse a JSON array one element at a time, holding about one chunk in memory."""
    decoder = json.JSONDecoder()
    with open(path, "r", encoding="utf-8") as handle:
        buf, pos, eof, lines_before = "", 0, False, 1

        def more() -> bool:
            nonlocal buf, pos, eof, lines_before
            if eof:
                return False
            lines_before += buf.count("\n", 0, pos)
            buf, pos = buf[pos:], 0
            chunk = handle.read(chunk_size)
            if not chunk:
                eof = True
                return False
            buf += chunk
            return True

        def skip_ws() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos].isspace():
                    pos += 1
                if pos < len(buf) or not more():
                    return buf[pos] if pos < len(buf) else ""

        def where_at(offset: int) -> str:
            return f"{path}:{lines_before + buf.count(chr(10), 0, offset)}"

        if skip_ws() != "[":
            raise UserError(f"{where_at(pos)}: a .json prompts file must be a JSON array of objects "
                            "(or use .jsonl with one object per line)")
        pos += 1
        index = 0
        if skip_ws() == "]":
            return
        while True:
            skip_ws()
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as exc:
                    # Maybe the object runs past the buffer: read on (more() keeps pos at its start).
                    error_where = where_at(exc.pos)
                    if len(buf) - pos < max_record_bytes and more():
                        continue
                    raise UserError(f"{error_where}: not valid JSON ({exc.msg}); "
                                    "fix the file or convert it to JSONL") from None
                except RecursionError:
                    raise UserError(f"{where_at(pos)} (row {index}): JSON nested too deeply to read; "
                                    "flatten the record") from None
            where = f"{where_at(pos)} (row {index})"
            surrogate = _lone_surrogate(buf, pos, end, obj)
            if surrogate is not None:
                raise UserError(f"{where_at(surrogate)} (row {index}): a lone surrogate escape "
                                f"{buf[surrogate:surrogate + 6]} (half of a UTF-16 pair) is no character and cannot be "
                                "written as UTF-8; fix or remove it")
            pos = end
            yield Row(index, where, _require_object(obj, where))
            index += 1
            sep = skip_ws()
            if sep == ",":
                pos += 1
                continue
            if sep == "]":
                return
            raise UserError(f"{where_at(pos)}: expected ',' or ']' after row {index - 1} "
                            "in the JSON array; fix the file")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LOW_SURROGATE_ESCAPE = re.compile(r"\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def _lone_surrogate(text: str, start: int, end: int, obj: Any) -> int | None:
    """The offset of the first lone ``\\uD800``-``\\uDFFF`` escape in ``text[start:end]``
    (JSON allows it, UTF-8 cannot write it), or None. Pairs, which decode to one
    character, are fine; the decoded ``obj`` is only walked when an escape is there."""
    first = _SURROGATE_ESCAPE.search(text, start, end)
    if first is None or not _has_surrogate(obj):
        return None
    match = first
    while match is not None:
        is_high = match.group()[3].lower() in "89ab"
        paired = is_high and _LOW_SURROGATE_ESCAPE.match(text, match.end(), end)
        if not paired:
            return match.start()
        match = _SURROGATE_ESCAPE.search(text, paired.end(), end)
    return first.start()


def _iter_csv_rows(path: Path) -> Iterator[Row]:
    """Rows of a CSV/TSV file, read strictly: a quote never closed, a column named twice,
    a row longer or shorter than the header or any other malformed line is a
    ``UserError`` naming file:line, never rows silently merged, cut or renamed."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # prompts can be long
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, "r", encoding="utf-8-sig", newline="") as handle:

        def lines() -> Iterator[str]:
            for number, line in enumerate(handle, 1):
                if "\0" in line and sys.version_info < (3, 11):  # the csv module reads NUL since 3.11
                    raise UserError(f"{path}:{number}: a NUL byte, which Python's csv module reads only from "
                                    "Python 3.11 on; use Python 3.11+ or the JSONL/Parquet table")
                yield line

        reader = csv.reader(lines(), delimiter=delimiter, strict=True)
        start = 1  # the line the record being read starts on
        try:
            header = next(reader, None)
            if not header:
                raise UserError(f"{path}: no header row; the first line must name the columns")
            seen = set()
            for name in header:
                if name in seen:
                    raise UserError(f"{path}:1: column {name!r} appears twice in the header; "
                                    "rename one (each column becomes one field)")
                seen.add(name)
            index = 0
            start = reader.line_num + 1
            for values in reader:
                where = f"{path}:{start} (row {index})"
                start = reader.line_num + 1
                if not values:
                    continue
                if len(values) != len(header):
                    raise UserError(f"{where}: {len(values)} values but the header has {len(header)} "
                                    "columns; quote values that contain the delimiter")
                yield Row(index, where, dict(zip(header, values)))
                index += 1
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                line = _unclosed_quote_line(path, start, delimiter)
                raise UserError(f"{path}:{line}: a quoted field starts here and is never closed; close it "
                                '(a quote inside a quoted field is written "")') from None
            raise UserError(f"{path}:{reader.line_num}: bad CSV ({exc}); quote fields that hold "
                            'quotes, and write a quote inside them as ""') from None
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None


def _unclosed_quote_line(path: Path, start: int, delimiter: str) -> int:
    """The line of the last quote that opens a field, scanning a record from line ``start``
    to the end of the file (only called when that record's quote never closes)."""
    opened_at, state = start, "start"  # start of a field, "field", "quoted", "quote?" (closing or doubled)
    with open(path, "r", encoding="utf-8-sig", newline="") as handle:
        for number, line in enumerate(handle, 1):
            if number < start:
                continue
            for char in line:
                if state == "quote?":
                    if char == '"':
                        state = "quoted"
                        continue
                    state = "field"  # the quote closed the field; this character follows it
                if state == "quoted":
                    if char == '"':
                        state = "quote?"
                elif char == '"' and state == "start":
                    state, opened_at = "quoted", number
                elif char in (delimiter, "\n", "\r"):
                    state = "start"
                else:
                    state = "field"
    return opened_at


def _iter_parquet_rows(path: Path) -> Iterator[Row]:
    import datasets

    with open(path, "rb") as handle:  # datasets logs a traceback for a file that is not Parquet
        head = handle.read(4)
        handle.seek(max(0, path.stat().st_size - 4))
        if head != b"PAR1" or handle.read(4) != b"PAR1":
            raise UserError(f"{path}: not a Parquet file (no PAR1 marks at its start and end); "
                            "check the file, or name its format with --input_format")
    try:
        stream = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
        for index, data in enumerate(stream):
            yield Row(index, f"{path} row {index}", data)
    except (OSError, ValueError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"{path}: cannot read as Parquet ({exc}); check the file") from None


def _iter_hf_rows(path: Path, split: str | None) -> Iterator[Row]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"{path}: not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None:
            if len(splits) == 1 or "train" not in splits:
                if len(splits) != 1:
                    raise UserError(f"{path}: the dataset has splits {', '.join(splits)}; choose one with --split")
                split = splits[0]
            else:
                split = "train"
        if split not in loaded:
            raise UserError(f"{path}: no split {split!r}; it has {', '.join(splits)}")
        loaded = loaded[split]
    elif split is not None:
        raise UserError(f"{path}: the dataset has no splits; drop --split")
    index = 0
    for batch in loaded.iter(batch_size=1000):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield Row(index, f"{path} row {index}", dict(zip(columns, values)))
            index += 1
