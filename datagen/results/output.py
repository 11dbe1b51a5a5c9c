"""The reformatted output files: one column schema for every route, as JSONL, CSV or Parquet.

**The output columns** are the same, in the same order and with the same types, in
every reformatted file, whichever route, endpoint, engine or n made it, so that any set
of them loads as one table (``datasets.load_dataset("json", data_files=[...])``,
``pandas``, Parquet readers). JSON text carries no types, and ``datasets`` takes them
from the first lines it reads, so no column is ever null: absent text is "", absent
counts are 0.

============== ========================= ===================================================
column         type                      meaning
============== ========================= ===================================================
id             string                    the request's ``custom_id``
generated_text string                    the answer (n > 1: the first sample's); "" for
                                         embeddings and tool calls
source         string                    ``openai`` or ``finetuned`` (the route)
run            string                    the run's name (``datagen.results.runs``): the
                                         fine-tuned record's ``run`` (``--adapter_path``
                                         NAME, ``base``; older records: the adapter
                                         folder's name, else ``base``); OpenAI: the model
                                         as requested (the download's sidecar, else the
                                         answer's model)
model          string                    the model that answered (OpenAI: as the response
                                         names it; fine-tuned: the base model as given)
adapter        string                    the LoRA adapter as given; "" for OpenAI and for a
                                         fine-tuned base model alone
finish_reason  string                    of the first sample: ``stop``, ``length``,
                                         ``tool_calls``, ``content_filter``; "" if none
refusal        bool                      the model refused (the refusal message is the text)
prompt_tokens  int                       input tokens; 0 when not reported
completion_    int                       output tokens, summed over all samples (as OpenAI
tokens                                   counts them); 0 when not reported
reasoning_     int                       hidden reasoning tokens (o-series, responses); 0
tokens                                   when the route reports none (fine-tuned, vLLM)
samples        list of {text: string,    every sample in order; one when n = 1, so the type
               finish_reason: string}    is the same in every file
details        string (JSON text)        what only one route has, as a JSON object: OpenAI
                                         ``endpoint``, ``tool_calls``, ``embeddings``;
                                         fine-tuned ``model_sha256``, ``adapter_sha256``,
                                         ``engine``, ``generation``, ``fingerprint``,
                                         ``ignored_fields``, ``created``,
                                         ``sample_completion_tokens`` (n > 1)
============== ========================= ===================================================

``--keep_fields`` columns follow, with the values of the prompts file (or of the batch
request body) as they are: a CSV's ``1`` stays the string "1", a JSON number a number;
null where a request has none. ``prompt`` is the input the model saw, system message
first, as a list of ``{role: string, content: string}`` (a plain prompt is one user
message): from the batch input when given, else built from the prompts file with the
same prompt flags. In CSV (every field quoted, so any text reads back as it was), lists
and objects are JSON text; in Parquet, the types above
(kept fields: int64, float64, bool or string by the values seen; anything else JSON text).

``open_sink`` writes through a temporary file renamed into place, with the ``Sink`` for
the format the file name says (``output_format``); ``arrow_types`` gives the Parquet types.
"""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import Iterable, Iterator

from datagen.common.errors import UserError
from datagen.common.jsonl import atomic_writer, cell_text, dumps, loads
from datagen.results.requests import PROMPT_FIELD

OUTPUT_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")

# Output columns, in this order, in every reformatted file of every route (see the
# module docstring); ``--keep_fields`` columns come after them.
COLUMNS = ("id", "generated_text", "source", "run", "model", "adapter", "finish_reason", "refusal",
           "prompt_tokens", "completion_tokens", "reasoning_tokens", "samples", "details")
# Columns of reformatted files written before one schema (read by --compare, never kept).
OLD_COLUMNS = ("sample_finish_reasons", "embedding", "embeddings", "tool_calls", "adapter_sha256", "generation")
FAILED_COLUMNS = ("id", "reason", "status_code", "error_code", "message")


def output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise UserError(f"--output_file {path}: cannot tell the format from {suffix or 'no extension'}; "
                    "end the name in .jsonl, .csv, .tsv or .parquet")


def arrow_types(keep_types: dict[str, set[str]] | None = None, columns: Iterable[str] = COLUMNS) -> dict:
    """The Arrow type of each output column; a kept field's by the Python types seen in
    it (only ints: int64; numbers: float64; only bools: bool; else text, JSON text for
    anything not a string). ``prompt`` is always a list of {role, content}."""
    import pyarrow as pa

    fixed = {"refusal": pa.bool_(), "prompt_tokens": pa.int64(), "completion_tokens": pa.int64(),
             "reasoning_tokens": pa.int64(),
             "samples": pa.list_(pa.struct([("text", pa.string()), ("finish_reason", pa.string())])),
             PROMPT_FIELD: pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))}
    types = {name: fixed.get(name, pa.string()) for name in columns}
    for name, seen in (keep_types or {}).items():
        if name == PROMPT_FIELD:
            continue
        kinds = seen - {"NoneType"}
        types[name] = (pa.bool_() if kinds == {"bool"} else pa.int64() if kinds == {"int"} else
                       pa.float64() if kinds and kinds <= {"int", "float"} else pa.string())
    return types


class Sink:
    """Writes rows to JSONL, CSV or Parquet: ``write(row_json, keep_json)`` (bytes of JSON
    objects; ``keep_json`` is appended to the row). Parquet columns have ``types``
    (Arrow); a value that is not a string in a string column is written as JSON text."""

    def __init__(self, handle, fmt: str, columns: list[str], types: dict, delimiter: str = ","):
        self.handle, self.fmt, self.columns = handle, fmt, columns
        self.count = 0
        self.rows: list[dict] = []
        if fmt == "csv":
            # Every field quoted: a carriage return, newline, NUL, quote or delimiter in an
            # answer stays inside its field for every reader (pandas, datasets, csv, prompts).
            self.writer = csv.writer(handle, delimiter=delimiter, lineterminator="\n", quoting=csv.QUOTE_ALL)
            self.writer.writerow(columns)
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.pa = pa
            self.schema = pa.schema([(name, types.get(name, pa.string())) for name in columns])
            self.text_columns = {name for name in columns if self.schema.field(name).type == pa.string()}
            self.writer = pq.ParquetWriter(handle, self.schema)

    def write(self, record_json: bytes, keep_json: bytes | None = None) -> None:
        self.count += 1
        if self.fmt == "jsonl":
            if keep_json and keep_json != b"{}":
                self.handle.write(record_json[:-1] + b"," + keep_json[1:] + b"\n")
            else:
                self.handle.write(record_json + b"\n")
            return
        record = loads(record_json)
        if keep_json:
            record.update(loads(keep_json))
        if self.fmt == "csv":
            self.writer.writerow([cell_text(record.get(name)) for name in self.columns])
            return
        self.rows.append(record)
        if len(self.rows) >= 10_000:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        data = {}
        for name in self.columns:
            values = [row.get(name) for row in self.rows]
            if name in self.text_columns:
                values = [v if v is None or isinstance(v, str) else dumps(v) for v in values]
            data[name] = values
        self.writer.write_table(self.pa.Table.from_pydict(data, schema=self.schema))
        self.rows.clear()

    def close(self) -> None:
        if self.fmt == "parquet":
            self._flush()
            self.writer.close()


@contextlib.contextmanager
def open_sink(path: Path, columns: list[str], types: dict | None = None) -> Iterator[Sink]:
    """A Sink over a temporary file beside ``path``, renamed into place on success.
    ``types``: Arrow types by column, for Parquet (``arrow_types``; default all text)."""
    fmt = output_format(path)
    if fmt == "parquet" and types is None:
        types = arrow_types(columns=columns)
    mode = "w" if fmt == "csv" else "wb"
    with atomic_writer(path, mode) as handle:
        sink = Sink(handle, fmt, columns, types or {}, "\t" if path.suffix.lower() == ".tsv" else ",")
        yield sink
        sink.close()
