"""Prompts files of every kind read as the same stream of rows."""

import json

import pytest

from datagen.common.errors import UserError
from datagen.common.prompts import PromptOptions, iter_prompts, iter_rows, unescape

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
    from datagen.common.prompt_files import Row, _iter_json_array_rows

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


# --- escapes in --prompt_template and --system_prompt ------------------------------------

@pytest.mark.parametrize("written,meant", [
    (r"Question: {q}\nAnswer:", "Question: {q}\nAnswer:"),
    (r"a\tb", "a\tb"),
    (r"one\\two", "one\\two"),
    (r"\\n stays a backslash and an n", "\\n stays a backslash and an n"),
    (r"\\\n", "\\\n"),
    (r"C:\data\x \u00e9 \r", r"C:\data\x \u00e9 \r"),
    ("already\nreal", "already\nreal"),
    ("trailing\\", "trailing\\"),
    ("", ""),
])
def test_unescape_reads_n_t_and_backslash_only(written, meant):
    assert unescape(written) == meant


@pytest.mark.parametrize("template,message", [
    ("{q:d}", "--prompt_template field {q:d} has a format spec; write plain {name} fields (and {{ }} for literal braces)"),
    ("Q: {q:>10}", "--prompt_template field {q:>10} has a format spec"),
    ("{q!r}", "--prompt_template field {q!r} has a conversion; write plain {name} fields"),
    ("{q!s:10}", "--prompt_template field {q!s:10} has a format spec"),
    ("{}", "--prompt_template field {} is positional; write plain {name} fields"),
    ("Q: {lora_a.status!r}", "--prompt_template field {lora_a.status!r} has a conversion"),
    ("no placeholder {{here}}", "--prompt_template has no {field} placeholder; name at least one row field"),
])
def test_template_fields_other_than_plain_names_are_refused(template, message):
    with pytest.raises(UserError) as caught:
        PromptOptions(template=template).template_fields()
    assert str(caught.value).startswith(message)


def test_plain_template_fields_pass():
    assert PromptOptions(template="{a} {b_c} {{literal}} {a}").template_fields() == ["a", "b_c", "a"]


def test_template_placeholders_are_column_names_as_written(tmp_path):
    """A --compare table's columns: dots, dashes, spaces and digits are part of the name."""
    row = {"id": "q1", "question": "2+2?", "gpt-4o-mini": "4", "lora_a.status": "ok", "my run": None,
           "0": "zero", "q[0]": "bracket", "n": 3, "ok": True, "prompt": [{"role": "user", "content": "2+2?"}]}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    template = "{question}|{gpt-4o-mini}|{lora_a.status}|{my run}|{0}|{q[0]}|{n}|{ok}|{prompt}|{{x}}"
    prompt = next(iter_prompts(path, PromptOptions(id_field="id", template=template)))
    assert prompt.text == '2+2?|4|ok||zero|bracket|3|true|[{"role":"user","content":"2+2?"}]|{x}'
    assert prompt.messages is None  # with a template the prompt field is not read
    with pytest.raises(UserError) as caught:
        next(iter_prompts(path, PromptOptions(template="{lora_a.sttus}")))
    assert str(caught.value) == (f"{path}:1 (row 0): --prompt_template placeholder {{lora_a.sttus}} is not a field "
                                 "of this row; the row has fields: id, question, gpt-4o-mini, lora_a.status, my run, "
                                 "0, q[0], n, ok, prompt")


def test_a_conversation_in_the_prompt_field_is_read_as_messages(tmp_path):
    """A --compare table's prompt column: a list (JSONL, Parquet) or its JSON text (CSV)."""
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    path = tmp_path / "t.csv"
    path.write_text('id,prompt\nq1,"' + json.dumps(conversation).replace('"', '""') + '"\n'
                    'q2,[{not json}]\nq3,plain\n', encoding="utf-8")
    q1, q2, q3 = iter_prompts(path, PromptOptions(id_field="id"))
    assert (q1.text, q1.messages) == (None, conversation)
    assert (q2.text, q2.messages) == ("[{not json}]", None)
    assert (q3.text, q3.messages) == ("plain", None)
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(json.dumps({"id": "q1", "prompt": conversation}) + "\n", encoding="utf-8")
    assert next(iter_prompts(jsonl, PromptOptions(id_field="id"))).messages == conversation
    with pytest.raises(UserError) as caught:
        next(iter_prompts(jsonl, PromptOptions(system="Be terse.")))
    assert str(caught.value) == (f"{jsonl}:1 (row 0): the conversation already starts with a system message; "
                                 "drop --system_prompt or that message")
    jsonl.write_text(json.dumps({"prompt": [{"role": "narrator", "content": "x"}]}) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        next(iter_prompts(jsonl, PromptOptions()))
    assert str(caught.value) == (f"{jsonl}:1 (row 0): prompt[0] has role 'narrator'; use one of system, developer, "
                                 "user, assistant, tool")


def test_csv_values_keep_nul_and_carriage_returns(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b'id,prompt\n1,"a\x00b\rc\r\nd"\n2,e\x00f\n')
    assert [r.data for r in iter_rows(path)] == [{"id": "1", "prompt": "a\x00b\rc\r\nd"},
                                                 {"id": "2", "prompt": "e\x00f"}]


# --- CSV: nothing merged, cut or renamed silently ------------------------------------------

CSV_BAD = {
    "unclosed quote": ('id,prompt\n1,ok\n2,"two\nlines"\n3,"never closed\n4,swallowed\n5,too\n',
                       'p.csv:5: a quoted field starts here and is never closed; close it (a quote inside a '
                       'quoted field is written "")'),
    "unclosed quote on the first row": ('id,prompt\n1,"open\n2,b\n', "p.csv:2: a quoted field starts here"),
    "unclosed quote after a doubled quote": ('id,prompt\n1,"say ""hi"" and\n2,b\n', "p.csv:2: a quoted field starts here"),
    "unclosed quote in the header": ('id,"prompt\n1,a\n', "p.csv:1: a quoted field starts here"),
    "duplicated column": ("id,prompt,id\n1,a,2\n", "p.csv:1: column 'id' appears twice in the header; rename one"),
    "more fields than the header": ("id,prompt\n1,a\n2,b,c\n",
                                    "p.csv:3 (row 1): 3 values but the header has 2 columns; quote values"),
    "fewer fields than the header": ("id,prompt\n1\n", "p.csv:2 (row 0): 1 values but the header has 2 columns"),
    "long row after a multi-line row": ('id,prompt\n1,"a\nb"\n2,c,d\n', "p.csv:4 (row 1): 3 values"),
    "text after a closing quote": ('id,prompt\n1,a\n2,"b"c\n', "p.csv:3: bad CSV (',' expected after '\"')"),
    "no header": ("\n", "p.csv: no header row"),
}


@pytest.mark.parametrize("name", list(CSV_BAD))
def test_csv_errors_name_the_line(tmp_path, name):
    content, message = CSV_BAD[name]
    path = tmp_path / "p.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as caught:
        list(iter_rows(path))
    assert str(caught.value).startswith(f"{path}:" if message.startswith("p.csv:") else str(path))
    assert message.split("p.csv", 1)[1] in str(caught.value)


def test_csv_multiline_quoted_fields_and_inner_quotes_are_kept(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,prompt\n1,"two\nlines, one ""quote"""\n2,plain "inner" quotes\n\n3,c\n', encoding="utf-8")
    rows = list(iter_rows(path))
    assert [r.data for r in rows] == [{"id": "1", "prompt": 'two\nlines, one "quote"'},
                                      {"id": "2", "prompt": 'plain "inner" quotes'}, {"id": "3", "prompt": "c"}]
    assert [r.where.rsplit(":", 1)[1] for r in rows] == ["2 (row 0)", "4 (row 1)", "6 (row 2)"]


# --- JSON arrays: too deep, lone surrogates ---------------------------------------------------


@pytest.mark.parametrize("content,message", [
    ("[" * 100_000, ":1 (row 0): JSON nested too deeply to read; flatten the record"),
    ('[{"prompt": "a"},\n' + "[" * 100_000 + "]" * 100_000 + "]", ":2 (row 1): JSON nested too deeply"),
    ('[{"prompt": "fine \\ud83d\\ude00"},\n {"prompt": "bad \\ud800 here"}]',
     ":2 (row 1): a lone surrogate escape \\ud800 (half of a UTF-16 pair) is no character and cannot be written "
     "as UTF-8; fix or remove it"),
    ('[\n\n{"prompt": "a", "note": "\\udc00"}]', ":3 (row 0): a lone surrogate escape \\udc00"),
])
def test_json_array_refuses_deep_nesting_and_lone_surrogates(tmp_path, content, message):
    path = tmp_path / "p.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as caught:
        list(iter_rows(path))
    assert str(caught.value).startswith(f"{path}{message}")


def test_json_array_keeps_surrogate_pairs_and_escaped_backslashes(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[{"prompt": "\\ud83d\\ude00", "raw": "\\\\ud800"}]', encoding="utf-8")
    assert [r.data for r in iter_rows(path)] == [{"prompt": "\U0001F600", "raw": "\\ud800"}]
