"""Prompts files of every kind read as the same stream of rows."""

import json

import pytest

from datagen.errors import UserError
from datagen.prompts import PromptOptions, iter_prompts, iter_rows

ROWS = [
    {"qid": "q1", "prompt": "What is 2+2?", "topic": "math"},
    {"qid": "q2", "prompt": "Name a colour, with a comma, and \"quotes\".", "topic": "misc"},
    {"qid": "q3", "prompt": "Zürich, naïve, 東京 — unicode survives.", "topic": "text"},
]


def write_kind(tmp_path, kind):
    if kind == "jsonl":
        path = tmp_path / "p.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    elif kind == "json":
        path = tmp_path / "p.json"
        path.write_text(json.dumps(ROWS, ensure_ascii=False, indent=2), encoding="utf-8")
    elif kind == "json-lines-named-json":
        path = tmp_path / "p.json"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    elif kind in ("csv", "tsv"):
        import csv

        path = tmp_path / f"p.{kind}"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(ROWS[0]), delimiter="," if kind == "csv" else "\t")
            writer.writeheader()
            writer.writerows(ROWS)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "p.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif kind == "hf":
        import datasets

        path = tmp_path / "ds"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    elif kind == "hf-dict":
        import datasets

        path = tmp_path / "dsd"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                              "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(path))
    return path


KINDS = ["jsonl", "json", "json-lines-named-json", "csv", "tsv", "parquet", "hf", "hf-dict"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_reads_the_same_rows(tmp_path, kind):
    path = write_kind(tmp_path, kind)
    rows = list(iter_rows(path))
    assert [r.data for r in rows] == ROWS
    assert [r.index for r in rows] == [0, 1, 2]


def test_line_based_kinds_say_where_each_row_is(tmp_path):
    rows = list(iter_rows(write_kind(tmp_path, "json")))
    assert rows[1].where.endswith("p.json:7 (row 1)")
    rows = list(iter_rows(write_kind(tmp_path, "csv")))
    assert rows[2].where.endswith("p.csv:4 (row 2)")


def test_datasetdict_split_choice(tmp_path):
    path = write_kind(tmp_path, "hf-dict")
    assert [r.data["qid"] for r in iter_rows(path, split="test")] == ["q1"]
    with pytest.raises(UserError, match="no split 'dev'; it has train, test"):
        list(iter_rows(path, split="dev"))


def test_json_array_is_parsed_incrementally_across_chunk_boundaries(tmp_path):
    from datagen.prompts import Row, _iter_json_array_rows

    many = [{"prompt": "x" * (i % 17), "i": i} for i in range(200)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(many, indent=1), encoding="utf-8")
    rows = list(_iter_json_array_rows(path, chunk_size=7))  # objects straddle every chunk
    assert [r.data for r in rows] == many
    assert all(isinstance(r, Row) for r in rows)


def test_json_array_error_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"prompt": "a"},\n{"prompt": "b",,}\n]', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.json:3: not valid JSON"):
        list(iter_rows(path))


def test_csv_keeps_values_as_written(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,prompt\n007,hello\n", encoding="utf-8")
    prompt = next(iter_prompts(path, PromptOptions(id_field="id")))
    assert prompt.custom_id == "007"


def test_csv_row_with_too_many_values(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,prompt\n1,hello,world\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"p\.csv:2 \(row 0\): 3 values but the header has 2 columns"):
        list(iter_rows(path))


def test_unknown_extension_asks_for_input_format(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("hello\n")
    with pytest.raises(UserError, match="pass --input_format"):
        list(iter_rows(path))


def test_template_and_messages_and_system_prompt(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"q": "2+2?", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    templated = next(iter_prompts(path, PromptOptions(template="Q: {q}\nA:", system="Be brief.")))
    assert templated.text == "Q: 2+2?\nA:"
    assert templated.chat_messages() == [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Q: 2+2?\nA:"}]
    conversation = next(iter_prompts(path, PromptOptions(system="Be brief.")))
    assert conversation.text is None
    assert conversation.chat_messages() == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "hi"}]
