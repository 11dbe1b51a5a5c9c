"""The README's judge recipe end to end on both routes: answers from the OpenAI route (the
local Batch API stand-in) and a tiny fine-tuned adapter, the --compare table (an answer
holding a NUL and a carriage return), then the table as a prompts file with a template that
names `{run}` and `{run.status}` columns: create_batchinput.py (and the judge batch through
the stand-in) and generate_data_finetuned.py get exactly the expected prompts, from a CSV,
Parquet or JSONL table alike."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from datagen.batchapi import batch_utils
from datagen.batchapi import create_batchinput
from datagen.finetuned import generate_data_finetuned
from datagen.results import reformat_results
from datagen.finetuned import records
from datagen import tinymodel
from datagen.local_batch_server import LocalBatchServer
from tests.util import read_jsonl, write_jsonl

KEY = "sk-test-judge-0123456789abcdef"
PROMPTS = [{"id": "capital", "question": "What is the capital of France?", "topic": "geography"},
           {"id": "sum", "question": "What is 17 + 25?", "topic": "arithmetic"},
           {"id": "haiku", "question": "Write a haiku about autumn.", "topic": "poetry"}]
ODD = "odd\x00answer\rwith a NUL and a CR, \"quoted\""  # written into the adapter's answer to "sum"
TEMPLATE = (r"Question: {question}\nA ({gpt-4o-mini.status}): {gpt-4o-mini}\nB ({lora_a.status}): {lora_a}\n"
            r"Which answer is better? Reply A or B.")


def main(module, *args) -> int:
    code = module.main([str(a) for a in args])
    assert code == 0, f"{module.__name__} {args} exited {code}"
    return code


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge-models")
    base = tinymodel.build_tiny_model(root / "base", seed=0)
    return base, tinymodel.build_tiny_adapter(base, root / "lora_a", seed=1)


@pytest.fixture
def answered(models, monkeypatch):
    """Both routes have answered PROMPTS; returns the expected answers by run and id."""
    base, adapter = models
    write_jsonl("prompts.jsonl", PROMPTS)
    main(create_batchinput, "--input_file", "prompts.jsonl", "--id_field", "id", "--prompt_field", "question",
         "--model_name", "gpt-4o-mini", "--max_tokens", "8", "--temperature", "0", "--output_file", "batchinput.jsonl")
    key_file = Path("openai.tok")
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    with LocalBatchServer(api_key=KEY) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        main(batch_utils, "--run", "--wait", "--download", "results.jsonl", "--file", "batchinput.jsonl",
             "--poll_interval", "0")
    main(generate_data_finetuned, "--model_name_or_path", base, "--adapter_path", adapter, "--input_file",
         "batchinput.jsonl", "--output_file", "generations.jsonl", "--max_new_tokens", "4")
    generations = read_jsonl("generations.jsonl")
    for record in generations:  # a base model once emitted such bytes; the table must carry them
        if record["custom_id"] == "sum":
            record["generated_text"] = ODD
    write_jsonl("generations.jsonl", generations)
    openai = {line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"]
              for line in read_jsonl("results.jsonl")}
    return {"gpt-4o-mini": openai, "lora_a": {r["custom_id"]: r["generated_text"] for r in generations}}


def judge_prompt(answers: dict, row: dict) -> str:
    gpt, lora = answers["gpt-4o-mini"][row["id"]], answers["lora_a"][row["id"]]
    return (f"Question: {row['question']}\nA (ok): {gpt}\nB (ok): {lora}\n"
            "Which answer is better? Reply A or B.")


@pytest.mark.slow
def test_the_table_feeds_a_judge_on_both_routes(answered, models, monkeypatch):
    assert "\x00" in ODD and ODD in answered["lora_a"].values()
    for kind in ("csv", "parquet", "jsonl"):
        main(reformat_results, "--compare", "results.jsonl", "generations.jsonl", "--batch_input", "batchinput.jsonl",
             "--prompts_file", "prompts.jsonl", "--id_field", "id", "--prompt_field", "question",
             "--keep_fields", "question,topic",
             "--output_file", f"table.{kind}")
    with open("table.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [row["id"] for row in table] == [p["id"] for p in PROMPTS]  # one row per request, NUL and CR inside
    assert list(table[0]) == ["id", "prompt", "question", "topic", "gpt-4o-mini", "gpt-4o-mini.status", "lora_a",
                              "lora_a.status"]
    assert table[1]["lora_a"] == ODD
    expected = {p["id"]: judge_prompt(answered, p) for p in PROMPTS}

    # OpenAI route: the same judge batch input from each kind of table, byte for byte.
    for kind in ("csv", "parquet", "jsonl"):
        main(create_batchinput, "--input_file", f"table.{kind}", "--id_field", "id", "--model_name", "gpt-4o-mini",
             "--prompt_template", TEMPLATE, "--temperature", "0", "--output_file", f"judge.{kind}.jsonl")
        judge = read_jsonl(f"judge.{kind}.jsonl")
        assert {line["custom_id"]: line["body"]["messages"] for line in judge} == {
            i: [{"role": "user", "content": text}] for i, text in expected.items()}
    assert open("judge.csv.jsonl", "rb").read() == open("judge.parquet.jsonl", "rb").read() \
        == open("judge.jsonl.jsonl", "rb").read()
    with LocalBatchServer(api_key=KEY) as server:  # the judge batch, in the same folder, with its own ids file
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        main(batch_utils, "--run", "--wait", "--download", "judge_results.jsonl", "--file", "judge.csv.jsonl",
             "--ids_file", "judge_batch_id.tok", "--poll_interval", "0")
    main(reformat_results, "--input_file", "judge_results.jsonl", "--batch_input", "judge.csv.jsonl",
         "--output_file", "judgements.jsonl")
    assert {r["id"]: r["generated_text"] for r in read_jsonl("judgements.jsonl")} == {
        i: f"echo: {text}" for i, text in expected.items()}

    # Fine-tuned route: the table itself as --input_file sees the same prompts as the judge batch input.
    base, _ = models
    common = ["--model_name_or_path", base, "--max_new_tokens", "2", "--temperature", "0"]
    main(generate_data_finetuned, *common, "--input_file", "table.csv", "--id_field", "id",
         "--prompt_template", TEMPLATE, "--output_file", "judged_from_table.jsonl")
    main(generate_data_finetuned, *common, "--input_file", "judge.csv.jsonl",
         "--output_file", "judged_from_batch.jsonl")
    from_table = {r["custom_id"]: r for r in read_jsonl("judged_from_table.jsonl")}
    from_batch = {r["custom_id"]: r for r in read_jsonl("judged_from_batch.jsonl")}
    assert sorted(from_table) == sorted(expected)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    for custom_id, text in expected.items():
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert from_table[custom_id]["fingerprint"]["input"] == records.input_digest(ids)
        assert from_table[custom_id]["fingerprint"]["input"] == from_batch[custom_id]["fingerprint"]["input"]
        assert from_table[custom_id]["prompt_tokens"] == len(ids)


def test_without_a_template_the_tables_prompt_column_is_the_conversation(answered):
    main(reformat_results, "--compare", "results.jsonl", "generations.jsonl", "--batch_input", "batchinput.jsonl",
         "--output_file", "table.csv")
    main(create_batchinput, "--input_file", "table.csv", "--id_field", "id", "--model_name", "gpt-4o",
         "--temperature", "0", "--output_file", "again.jsonl")
    # The same questions again, for another model: the conversations as the first batch sent them.
    first = {line["custom_id"]: line["body"]["messages"] for line in read_jsonl("batchinput.jsonl")}
    assert {line["custom_id"]: line["body"]["messages"] for line in read_jsonl("again.jsonl")} == first
    assert first["capital"] == [{"role": "user", "content": "What is the capital of France?"}]
