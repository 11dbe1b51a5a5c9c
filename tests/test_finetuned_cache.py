"""The answer cache on the fine-tuned route (``datagen.finetuned.run_cache``), with tiny models
and LoRA adapters built on the spot: a rerun on a grown input generates only the new prompts;
another model, adapter, engine, parameter or rendering never hits; failed records never
enter; --no_cache and --refresh_cache; sampled answers; reformatted results say ``cached``.
Each test has a cache of its own (tests/conftest.py sets DATAGEN_CACHE_DIR)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from datagen.cache import AnswerCache, utc_date
from datagen.cache.maintenance import namespaces
from datagen.common.params import GenParams
from datagen.finetuned import generation
from datagen.results import reformat_results
from tests.test_adapters import second  # noqa: F401
from tests.test_engine_vllm import hf_engine, models, vllm_engine  # noqa: F401
from tests.test_engine_vllm import requests_for as vllm_requests
from tests.test_generate_data_finetuned import prompt_text, run_main, tiny, write_prompts  # noqa: F401
from tests.util import read_jsonl, write_jsonl


def args_for(tiny, output, *extra, adapter=True):  # noqa: F811
    return ["--model_name_or_path", tiny["base"], *(["--adapter_path", tiny["adapter"]] if adapter else []),
            "--input_file", "prompts.jsonl", "--id_field", "id", "--output_file", output, "--max_new_tokens", "5",
            "--batch_size", "4", "--temperature", "0", *extra]


def cache_root() -> Path:
    return Path(os.environ["DATAGEN_CACHE_DIR"])


def entries() -> int:
    """Entries in this test's cache, every model together."""
    return sum(info.entries for info in namespaces(cache_root())) if cache_root().exists() else 0


def by_id(path) -> dict:
    return {r["custom_id"]: r for r in read_jsonl(path)}


def test_a_grown_input_generates_only_the_new_prompts(tiny, capsys):  # noqa: F811
    write_prompts(count=6)
    code, out, err = run_main(capsys, *args_for(tiny, "a.jsonl"))
    assert code == 0, err
    assert "wrote a.jsonl: 6 generated, 0 already there, 6 of 6 done (run adapter)" in out
    first = by_id("a.jsonl")
    assert entries() == 6
    write_prompts(count=9)  # the same six, and three more
    code, out, err = run_main(capsys, *args_for(tiny, "b.jsonl"))
    assert code == 0, err
    assert "wrote b.jsonl: 3 generated, 0 already there, 6 from the answer cache, 9 of 9 done (run adapter)" in out
    assert "answer cache: 6 of the 9 requests run adapter has to answer were answered before" in err
    second_run = read_jsonl("b.jsonl")
    assert [r["custom_id"] for r in second_run] == [f"p{i}" for i in range(9)]  # each id once, input order
    for record in second_run:
        old = first.get(record["custom_id"])
        if old is None:
            assert "cached" not in record
            continue
        assert record["cached"] == {"created": utc_date(old["created"]), "run": "adapter", "custom_id": old["custom_id"]}
        for field in ("generated_text", "finish_reason", "prompt_tokens", "completion_tokens", "fingerprint",
                      "generation", "request_sha256", "run", "model", "adapter", "adapter_sha256"):
            assert record[field] == old[field], field
    assert entries() == 9  # the three new answers were kept; the cached ones not again
    # Resuming the cached output: nothing to do (its records carry this run's fingerprints).
    assert run_main(capsys, *args_for(tiny, "b.jsonl"))[1].startswith("nothing to do: all 9 requests")
    # Every prompt cached: written from the cache without loading the model at all.
    code, out, err = run_main(capsys, *args_for(tiny, "c.jsonl"))
    assert code == 0, err
    assert "0 generated, 0 already there, 9 from the answer cache, 9 of 9 done" in out
    assert "loading the base model" not in err
    assert [r["generated_text"] for r in read_jsonl("c.jsonl")] == [r["generated_text"] for r in second_run]


def test_the_reformatted_results_say_cached(tiny, capsys):  # noqa: F811
    write_prompts(count=3)
    assert run_main(capsys, *args_for(tiny, "a.jsonl"))[0] == 0
    assert run_main(capsys, *args_for(tiny, "b.jsonl"))[0] == 0
    code = reformat_results.main(["--input_file", "b.jsonl", "--source_type", "finetuned",
                                  "--output_file", "reformatted.jsonl"])
    capsys.readouterr()
    assert code == 0
    first = by_id("a.jsonl")
    for record in read_jsonl("reformatted.jsonl"):
        details = json.loads(record["details"])
        assert details["cached"]["created"] == utc_date(first[record["id"]]["created"])
        assert record["generated_text"] == first[record["id"]]["generated_text"]


@pytest.mark.parametrize("change", [
    "the second adapter", "the base model", ["--max_new_tokens", "4"], ["--temperature", "0.7"],
    ["--system_prompt", "Be brief."], ["--use_chat_template", "never"], ["--prompt_template", "Q: {prompt}"],
    ["--no_merge_lora"]])
def test_another_model_adapter_parameter_or_rendering_never_hits(tiny, second, capsys, change):  # noqa: F811
    write_prompts(count=4)
    assert run_main(capsys, *args_for(tiny, "a.jsonl"))[0] == 0
    if change == "the second adapter":
        args = args_for(tiny, "b.jsonl", adapter=False) + ["--adapter_path", second]
    elif change == "the base model":
        args = args_for(tiny, "b.jsonl", adapter=False)
    else:
        args = args_for(tiny, "b.jsonl", *change)
    code, out, err = run_main(capsys, *args)
    assert code == 0, err
    assert "from the answer cache" not in out and "4 generated" in out
    assert not any("cached" in record for record in read_jsonl("b.jsonl"))
    # ...and its own rerun hits its own answers, never the first run's.
    args[args.index("b.jsonl")] = "c.jsonl"
    code, out, err = run_main(capsys, *args)
    assert code == 0 and "0 generated, 0 already there, 4 from the answer cache" in out, out + err
    assert [r["generated_text"] for r in read_jsonl("c.jsonl")] == [r["generated_text"] for r in read_jsonl("b.jsonl")]


def test_failed_records_never_enter_the_cache(tiny, capsys):  # noqa: F811
    long = " ".join(["paris"] * 1100)  # over the tiny model's 1,024 positions
    write_jsonl("prompts.jsonl", [{"id": "p0", "prompt": prompt_text(0)}, {"id": "long", "prompt": long}])
    code, out, err = run_main(capsys, *args_for(tiny, "a.jsonl"))
    assert code == 0 and "context_length_exceeded 1" in out, err
    assert entries() == 1
    code, out, err = run_main(capsys, *args_for(tiny, "b.jsonl"))
    assert code == 0 and "1 generated (1 of them failed" in out and "1 from the answer cache" in out, out
    records = by_id("b.jsonl")
    assert "cached" in records["p0"] and "cached" not in records["long"]
    assert records["long"]["error"]["code"] == "context_length_exceeded"
    assert entries() == 1


def test_no_cache_and_refresh_cache(tiny, capsys):  # noqa: F811
    write_prompts(count=3)
    code, out, err = run_main(capsys, *args_for(tiny, "a.jsonl", "--no_cache"))
    assert code == 0 and "3 generated" in out, err
    assert entries() == 0 and not cache_root().exists()  # --no_cache writes nothing, creates nothing
    assert run_main(capsys, *args_for(tiny, "b.jsonl"))[0] == 0
    assert entries() == 3
    code, out, err = run_main(capsys, *args_for(tiny, "c.jsonl", "--no_cache"))  # reads nothing either
    assert code == 0 and "3 generated" in out and "from the answer cache" not in out
    assert entries() == 3
    code, out, err = run_main(capsys, *args_for(tiny, "d.jsonl", "--refresh_cache"))  # answers anew, keeps them
    assert code == 0 and "3 generated" in out and "from the answer cache" not in out
    assert not any("cached" in record for record in read_jsonl("d.jsonl"))
    assert entries() == 6
    code, out, err = run_main(capsys, *args_for(tiny, "e.jsonl"))
    assert "0 generated, 0 already there, 3 from the answer cache" in out


def test_a_sampled_rerun_with_the_same_seed_returns_the_cached_sample(tiny, capsys):  # noqa: F811
    write_prompts(count=4)
    sampled = ["--temperature", "1", "--max_new_tokens", "8"]
    assert run_main(capsys, *args_for(tiny, "a.jsonl", *sampled, "--seed", "3"))[0] == 0
    code, out, err = run_main(capsys, *args_for(tiny, "b.jsonl", *sampled, "--seed", "3"))
    assert code == 0 and "4 from the answer cache" in out, err
    assert [r["generated_text"] for r in read_jsonl("b.jsonl")] == [r["generated_text"] for r in read_jsonl("a.jsonl")]
    code, out, err = run_main(capsys, *args_for(tiny, "c.jsonl", *sampled, "--seed", "4"))  # another seed: new samples
    assert code == 0 and "4 generated" in out and "from the answer cache" not in out
    # Greedy answers do not depend on the seed: another seed still hits.
    assert run_main(capsys, *args_for(tiny, "d.jsonl", "--seed", "3"))[0] == 0
    code, out, err = run_main(capsys, *args_for(tiny, "e.jsonl", "--seed", "4"))
    assert code == 0 and "4 from the answer cache" in out


# --- the vLLM engine: the engine is in the key -------------------------------------------

def test_an_answer_of_one_engine_never_answers_for_the_other(vllm_engine, hf_engine, tmp_path):  # noqa: F811
    """vLLM's CPU build against Hugging Face (slow: vLLM starts in about 35 s)."""
    cache = AnswerCache(tmp_path / "cache")
    requests = vllm_requests(vllm_engine.tokenizer, 6)

    def run(engine, name):
        stats = generation.run_generation(engine, requests, {"a": tmp_path / name}, GenParams(temperature=0, max_tokens=8),
                                          show_progress=False, cache=cache)
        return stats, read_jsonl(tmp_path / name)

    hf_stats, hf_first = run(hf_engine, "hf1.jsonl")
    assert hf_stats.cached == 0 and hf_stats.done == 6
    vllm_stats, vllm_first = run(vllm_engine, "vllm1.jsonl")  # HF's answers are not vLLM's
    assert vllm_stats.cached == 0 and not any("cached" in record for record in vllm_first)
    vllm_stats, vllm_second = run(vllm_engine, "vllm2.jsonl")  # vLLM's own rerun hits
    assert vllm_stats.cached == 6 and all(r["cached"]["run"] == "a" and r["engine"]["name"] == "vllm" for r in vllm_second)
    assert [r["generated_text"] for r in vllm_second] == [r["generated_text"] for r in vllm_first]
    hf_stats, hf_second = run(hf_engine, "hf2.jsonl")  # and HF's rerun gets HF's answers back
    assert hf_stats.cached == 6 and [r["generated_text"] for r in hf_second] == [r["generated_text"] for r in hf_first]
    cache.close()
