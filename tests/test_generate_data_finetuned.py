"""generate_data_finetuned.py and datagen.finetuned.generation, on tiny models built on the spot.

The models are random (gibberish text) but real: the real loading, tokenizing,
batching, adapter and generation code runs, and nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from datagen.batchapi import create_batchinput
from datagen.finetuned import generate_data_finetuned
from datagen.finetuned import engine, engine_hf, generation, hf_model, inputs, records
from datagen import tinymodel
from datagen.common.errors import UserError
from datagen.common.params import GenParams
from tests.util import ROOT, read_jsonl, write_jsonl

RECORD_KEYS = {"custom_id", "generated_text", "finish_reason", "prompt_tokens", "completion_tokens", "source", "run",
               "model", "model_sha256", "adapter", "adapter_sha256", "engine", "generation", "fingerprint", "created",
               "request_sha256"}
WORDS = ("the capital of france is paris and what is seven plus five write a haiku about autumn "
         "leaves river mountain blue sky question answer model data").split()


def effective(**given) -> GenParams:
    """Effective parameters of one request, greedy unless told (as ``Request.params_under`` makes them)."""
    return GenParams(**{"temperature": 0, **given}).effective()


def prompt_text(i: int) -> str:
    # Lengths from 2 to ~40 words, in no particular order, so batches need padding.
    n = 2 + (i * 7) % 37
    return " ".join(WORDS[(i + 3 * k) % len(WORDS)] for k in range(n))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A Llama-style base with a LoRA adapter, and odd ones for the error cases."""
    root = tmp_path_factory.mktemp("tiny")
    base = tinymodel.build_tiny_model(root / "base", seed=0)
    adapter = tinymodel.build_tiny_adapter(base, root / "adapter", seed=1)
    gpt2 = tinymodel.build_tiny_model(root / "gpt2", seed=0, arch="gpt2")
    gpt2_adapter = tinymodel.build_tiny_adapter(gpt2, root / "gpt2-adapter", seed=1)
    wide = tinymodel.build_tiny_model(root / "wide", seed=0, hidden=32)
    wide_adapter = tinymodel.build_tiny_adapter(wide, root / "wide-adapter", seed=1)
    return {"root": root, "base": base, "adapter": adapter, "gpt2_adapter": gpt2_adapter,
            "wide_adapter": wide_adapter}


@pytest.fixture(scope="session")
def merged(tiny):
    return hf_model.load_model(str(tiny["base"]), str(tiny["adapter"]), merge=True)


def write_prompts(path="prompts.jsonl", count=12) -> Path:
    return write_jsonl(path, [{"id": f"p{i}", "prompt": prompt_text(i)} for i in range(count)])


def requests_for(count=12, raw=True):
    return [inputs.Request(f"p{i}", i, f"prompts.jsonl:{i + 1}", text=prompt_text(i), raw=raw)
            for i in range(count)]


def texts(path) -> dict:
    return {r["custom_id"]: r["generated_text"] for r in read_jsonl(path)}


def hf(loaded, batch_size=4, max_batch_tokens=0, **kwargs):
    """The Hugging Face engine; plain batches of ``batch_size`` unless a token budget is given."""
    return engine_hf.HFEngine(loaded, batch_size=batch_size, max_batch_tokens=max_batch_tokens, **kwargs)


def run_main(capsys, *args):
    code = generate_data_finetuned.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    """The one error line; nothing like a traceback around it."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("generate_data_finetuned.py: error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- correctness of batching -------------------------------------------------------


def test_batched_equals_one_at_a_time_greedy(merged, tmp_path):
    batched, single = hf(merged, 5), hf(merged, 1)
    command_line = GenParams(temperature=0, max_tokens=12)
    generation.run_generation(batched, requests_for(), tmp_path / "b.jsonl", command_line, show_progress=False)
    generation.run_generation(single, requests_for(), tmp_path / "s.jsonl", command_line, show_progress=False)
    assert batched.pad_tokens > 0 and batched.batches == 3  # batches really were padded (left, with the pad fallback)
    assert merged.tokenizer.pad_token == "<unk>" and merged.tokenizer.padding_side == "left"
    assert texts(tmp_path / "b.jsonl") == texts(tmp_path / "s.jsonl")
    assert len(set(texts(tmp_path / "b.jsonl").values())) > 1  # not one fixed output for all
    assert single.pad_tokens == 0 and single.batches == 12


def test_sorted_batches_restore_input_order_and_record_shape(merged, tmp_path):
    out = tmp_path / "o.jsonl"
    generation.run_generation(hf(merged), requests_for(), out, GenParams(temperature=0, max_tokens=6),
                              show_progress=False)
    records = read_jsonl(out)
    assert [r["custom_id"] for r in records] == [f"p{i}" for i in range(12)]
    for r in records:
        assert set(r) == RECORD_KEYS
        assert r["source"] == "finetuned" and r["finish_reason"] in ("stop", "length")
        assert r["generation"] == {"max_new_tokens": 6, "do_sample": False, "temperature": None, "top_p": None,
                                   "seed": 0, "num_return_sequences": 1, "stop": []}
        assert r["engine"]["name"] == "hf" and r["engine"]["dtype"] == "float32" and r["engine"]["merged"] is True
        assert r["engine"]["decoding"] == "hf-generate/batch-seed"  # model.generate, one random stream per batch
        assert 1 <= r["completion_tokens"] <= 6
    # Plain text (raw) prompts get exactly one BOS from the tokenizer.
    assert records[0]["prompt_tokens"] == len(merged.tokenizer(prompt_text(0))["input_ids"])


def test_adapter_changes_output_and_merged_equals_unmerged(tiny, merged, tmp_path):
    base = hf_model.load_model(str(tiny["base"]))
    unmerged = hf_model.load_model(str(tiny["base"]), str(tiny["adapter"]), merge=False)
    command_line = GenParams(temperature=0, max_tokens=10)
    outs = {}
    for name, loaded in (("base", base), ("merged", merged), ("unmerged", unmerged)):
        outs[name] = tmp_path / f"{name}.jsonl"
        generation.run_generation(hf(loaded), requests_for(), outs[name], command_line, show_progress=False)
    assert texts(outs["merged"]) == texts(outs["unmerged"])
    differ = [k for k, v in texts(outs["base"]).items() if v != texts(outs["merged"])[k]]
    assert len(differ) >= 10  # the adapter changes (nearly) every answer
    unmerged_record = read_jsonl(outs["unmerged"])[0]
    assert unmerged_record["engine"]["merged"] is False
    assert unmerged_record["adapter_sha256"] == records.sha256_file(tiny["adapter"] / "adapter_model.safetensors")
    assert read_jsonl(outs["base"])[0]["adapter"] is None and read_jsonl(outs["base"])[0]["adapter_sha256"] is None


def test_chat_template_has_one_bos(merged):
    generator = generation.Renderer(merged.tokenizer)
    tok = merged.tokenizer
    conversation = inputs.Request("c", 0, "x", messages=[{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "What is the capital?"}])
    ids = generator.encode(conversation)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids).endswith("<|assistant|>\n")
    # auto: a plain prompt from a prompts file goes through the template too; a completions line does not.
    assert generator.encode(inputs.Request("t", 0, "x", text="hello")) == \
        generator.encode(inputs.Request("m", 0, "x", messages=[{"role": "user", "content": "hello"}]))
    raw = generator.encode(inputs.Request("r", 0, "x", text="hello", raw=True))
    assert raw == tok("hello")["input_ids"] and raw.count(tok.bos_token_id) == 1
    # A run tokenizes a window in one call per kind of prompt: the same ids, in the requests' order.
    mixed = [inputs.Request("p", 0, "x", text="a longer plain prompt about rivers"), conversation,
             inputs.Request("r", 1, "x", text="hello", raw=True), inputs.Request("t", 2, "x", text="hello")]
    assert generator.encode_many(mixed) == [generator.encode(r) for r in mixed]
    assert generator.encode_many(mixed)[2] == raw and generator.encode_many(mixed)[1] == ids


def test_stop_string_is_cut(merged, tmp_path):
    generator = hf(merged)
    plain = tmp_path / "plain.jsonl"
    generation.run_generation(generator, requests_for(4), plain, GenParams(temperature=0, max_tokens=16),
                              show_progress=False)
    record = read_jsonl(plain)[0]
    text = record["generated_text"]
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text.find(text[i:i + 2]) == i)
    cut = tmp_path / "cut.jsonl"
    generation.run_generation(generator, requests_for(4), cut, GenParams(temperature=0, max_tokens=16, stop=[stop]),
                              show_progress=False)
    got = read_jsonl(cut)[0]
    assert got["generated_text"] == text[:text.find(stop)]
    assert got["finish_reason"] == "stop" and got["completion_tokens"] < record["completion_tokens"]
    assert got["generation"]["stop"] == [stop]


def test_n_samples_reproducible_with_seed(merged, tmp_path):
    generator = hf(merged, 3)
    command_line = GenParams(max_tokens=8, do_sample=True, temperature=1.5, n=3, seed=7)
    for name in ("a.jsonl", "b.jsonl"):
        generation.run_generation(generator, requests_for(3), tmp_path / name, command_line, show_progress=False)
    a, b = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
    assert [r["samples"] for r in a] == [r["samples"] for r in b]
    for record in a:
        assert len(record["samples"]) == 3 and record["generated_text"] == record["samples"][0]["text"]
        assert record["completion_tokens"] == sum(s["completion_tokens"] for s in record["samples"])  # as OpenAI
        assert record["generation"]["temperature"] == 1.5 and record["generation"]["top_p"] == 1.0
    assert len({s["text"] for r in a for s in r["samples"]}) > 3  # sampling varies


def test_out_of_memory_halves_the_batch(merged, tmp_path, monkeypatch):
    import torch

    model = merged.model
    real_forward = model.forward
    sizes = []

    # A GPU that fits at most 2 prompts: the model's forward pass fails inside model.generate,
    # as a real CUDA OOM does (a CPU cannot raise one; its allocator fails differently).
    def forward_with_little_memory(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:  # a prefill: a new batch
            sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward_with_little_memory)
    generator = hf(merged, 8)
    stats = generation.run_generation(generator, requests_for(), tmp_path / "oom.jsonl",
                                      GenParams(temperature=0, max_tokens=6), show_progress=False)
    monkeypatch.undo()
    generation.run_generation(hf(merged, 8), requests_for(), tmp_path / "ok.jsonl",
                              GenParams(temperature=0, max_tokens=6), show_progress=False)
    # Halved for the rest of the run: 8 and 4 fail, then all 12 go in batches of 2.
    assert stats.done == 12 and generator.batch_size == 2 and sizes == [8, 4] + [2] * 6
    assert texts(tmp_path / "oom.jsonl") == texts(tmp_path / "ok.jsonl")


def test_out_of_memory_halves_a_token_budget_too(merged, tmp_path, monkeypatch):
    """A token-budget batch of short prompts can hold more rows than --batch_size: an OOM
    halves what failed (rows and budget), never grows the batch."""
    import torch

    model = merged.model
    real_forward = model.forward
    sizes = []

    def forward_with_little_memory(*args, **kwargs):
        rows, width = kwargs["input_ids"].shape
        if width > 1:
            sizes.append(rows)
        if rows > 4:  # the first batch (4 of the longest prompts) fits; a bigger one does not
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward_with_little_memory)
    generator = hf(merged, 4, None)
    stats = generation.run_generation(generator, requests_for(), tmp_path / "oom.jsonl",
                                      GenParams(temperature=0, max_tokens=6), show_progress=False)
    monkeypatch.undo()
    generation.run_generation(hf(merged, 1), requests_for(), tmp_path / "ok.jsonl",
                              GenParams(temperature=0, max_tokens=6), show_progress=False)
    assert stats.done == 12 and generator.batch_size <= 2  # auto budget: batch_size rows of the longest, halved too
    assert max(sizes) > 4  # the budget really put more than --batch_size short prompts in a batch
    assert texts(tmp_path / "oom.jsonl") == texts(tmp_path / "ok.jsonl")


def test_token_budget_batches(merged):
    """Longest prompts first, batch_size rows of them; shorter ones fill the same budget."""
    requests = requests_for(40)
    for r in requests:
        r.input_ids = generation.Renderer(merged.tokenizer).encode(r)
    lengths = sorted((len(r.input_ids) for r in requests), reverse=True)
    plain = engine_hf.plan_batches(requests, 4, 8, 0)
    assert [len(b) for b in plain] == [4] * 10
    auto = engine_hf.plan_batches(requests, 4, 8, None)
    budget = 4 * (lengths[0] + 8)
    assert len(auto[0]) == 4 and len(auto) < len(plain) and max(map(len, auto)) > 4
    for batch in auto:
        assert len(batch) * (max(len(r.input_ids) for r in batch) + 8) <= budget
        assert len(batch) <= engine_hf.BUDGET_ROWS_FACTOR * 4
    flat = [r for b in auto for r in b]
    assert sorted(r.index for r in flat) == list(range(40))  # every prompt exactly once
    assert [len(r.input_ids) for r in flat] == lengths  # still sorted longest first
    explicit = engine_hf.plan_batches(requests, 4, 8, 10 ** 9)
    assert [len(b) for b in explicit] == [32, 8]  # capped at BUDGET_ROWS_FACTOR x batch_size
    tiny_budget = engine_hf.plan_batches(requests, 4, 8, 1)
    assert [len(b) for b in tiny_budget] == [1] * 40  # a prompt over the budget still runs, alone


def test_token_budget_keeps_greedy_output_and_input_order(merged, tmp_path):
    command_line = GenParams(temperature=0, max_tokens=10)
    for name, budget in (("auto", None), ("explicit", 600)):
        stats = generation.run_generation(hf(merged, 3, budget), requests_for(30), tmp_path / f"{name}.jsonl",
                                          command_line, show_progress=False)
        assert stats.done == 30
    generation.run_generation(hf(merged, 1), requests_for(30), tmp_path / "one.jsonl", command_line,
                              show_progress=False)
    for name in ("auto", "explicit"):
        assert [r["custom_id"] for r in read_jsonl(tmp_path / f"{name}.jsonl")] == [f"p{i}" for i in range(30)]
        assert texts(tmp_path / f"{name}.jsonl") == texts(tmp_path / "one.jsonl")


def _jobs(renderer, requests, params, adapter="adapter"):
    """Jobs as the run makes them (default: for the merged fixture's one adapter)."""
    return [engine.Job(r.custom_id, renderer.encode(r), params, adapter, engine.request_seed(params.seed, r.custom_id))
            for r in requests]


def _prefills(model, monkeypatch) -> list:
    """(rows, width) of every prefill the model runs: the batches model.generate really got."""
    real_forward = model.forward
    shapes = []

    def forward(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            shapes.append(tuple(kwargs["input_ids"].shape))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    return shapes


def test_stream_batches_each_group_by_the_token_budget(merged, monkeypatch):
    """stream() groups a window's jobs by parameters, sorts each group by length and cuts it
    by the token budget: exactly those batches reach model.generate; every job comes back once."""
    renderer = generation.Renderer(merged.tokenizer)
    short, longer = effective(max_tokens=4), effective(max_tokens=8)
    requests = requests_for(40)
    jobs = [job for i, r in enumerate(requests) for job in _jobs(renderer, [r], short if i % 3 else longer)]
    shapes = _prefills(merged.model, monkeypatch)
    answered = list(hf(merged, 4, None).stream(iter(jobs)))
    monkeypatch.undo()
    planned = [batch for params in (longer, short)  # groups in order of first appearance (job 0 is "longer")
               for batch in engine_hf.plan_batches([j for j in jobs if j.params == params], 4, params.max_tokens, None)]
    assert shapes == [(len(b), max(len(j.input_ids) for j in b)) for b in planned]
    assert max(rows for rows, _ in shapes) > 4  # short prompts filled bigger batches within the budget
    assert sorted(job.item for job, _ in answered) == sorted(r.custom_id for r in requests)
    assert all(len(samples[0].token_ids) <= job.params.max_tokens for job, samples in answered)


def test_rows_ending_mid_batch_are_cut_at_their_own_eos(merged):
    """model.generate pads a row that ended while its batch goes on: each answer stops at its
    own EOS, the same as unbatched."""
    generator = hf(merged)
    batch = [generation.Renderer(merged.tokenizer).encode(r) for r in requests_for(8)]
    params = effective(max_tokens=12)
    counts: dict = {}
    for samples in generator.generate_batch(batch, params):
        for token in set(samples[0].token_ids[1:-1]):
            counts[token] = counts.get(token, 0) + 1
    eos = max(counts, key=lambda t: (0 < counts[t] < len(batch), counts[t]))  # some rows produce it mid-way
    generator.eos_ids = generator.eos_ids | {eos}
    batched = generator.generate_batch(batch, params)
    assert batched == [generator.generate_batch([ids], params)[0] for ids in batch]
    finish = [samples[0].finish_reason for samples in batched]
    assert "stop" in finish and "length" in finish  # some rows ended early, some ran to the end
    for samples in batched:
        if samples[0].finish_reason == "stop":
            assert samples[0].token_ids[-1] == eos and samples[0].completion_tokens == len(samples[0].token_ids)


def test_the_models_generation_config_is_honoured(tiny, tmp_path):
    """Decoding is model.generate's: a generation config that adds a logits processor (here a
    repetition penalty) applies, as it would in the user's own generate call."""
    import torch

    penalised = tinymodel.build_tiny_model(tmp_path / "penalised", seed=0)
    config_file = Path(penalised) / "generation_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "repetition_penalty": 1.3}))
    command_line = GenParams(temperature=0, max_tokens=12)
    loaded = hf_model.load_model(str(penalised))
    generation.run_generation(hf(loaded), requests_for(4), tmp_path / "p.jsonl", command_line, show_progress=False)
    generation.run_generation(hf(hf_model.load_model(str(tiny["base"]))), requests_for(4), tmp_path / "b.jsonl",
                              command_line, show_progress=False)
    assert texts(tmp_path / "p.jsonl") != texts(tmp_path / "b.jsonl")  # the same weights, penalised
    tok = loaded.tokenizer
    for request in requests_for(4):
        ids = tok(request.text, return_tensors="pt")
        with torch.inference_mode():
            out = loaded.model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert texts(tmp_path / "p.jsonl")[request.custom_id] == expected


def test_sampled_text_depends_only_on_the_batch_composition(merged):
    """One random stream per batch, seeded from its jobs' seeds: the same batch samples the
    same way whatever ran before it and in whatever order its jobs came; another batch
    composition samples differently (the Hugging Face engine's documented limit)."""
    renderer = generation.Renderer(merged.tokenizer)
    params = effective(max_tokens=8, do_sample=True, temperature=1.5, top_p=1.0, seed=7,
                              n=2)
    requests = requests_for(3)  # prompts of different lengths: one batch order whatever the input order

    def answers(generator, jobs):
        return {job.item: [s.text for s in samples] for job, samples in generator.stream(iter(jobs))}

    first = answers(hf(merged, 3), _jobs(renderer, requests, params))
    other = effective(max_tokens=5, do_sample=True, temperature=1.0, top_p=1.0, seed=1)
    again = answers(hf(merged, 3), _jobs(renderer, requests_for(7)[5:], other) + _jobs(renderer, requests[::-1], params))
    assert {custom_id: again[custom_id] for custom_id in first} == first
    assert len({text for samples in first.values() for text in samples}) > 3  # it really samples
    alone = answers(hf(merged, 1), _jobs(renderer, requests, params))
    assert alone != first


def test_cli_max_batch_tokens(tiny, capsys):
    write_prompts(count=10)
    base = ["--model_name_or_path", tiny["base"], "--adapter_path", tiny["adapter"], "--input_file", "prompts.jsonl",
            "--id_field", "id", "--max_new_tokens", "4", "--batch_size", "2", "--temperature", "0", "--no_cache"]
    outputs = {}
    for value in ("auto", "0", "500"):
        code, out, err = run_main(capsys, *base, "--output_file", f"gen-{value}.jsonl", "--max_batch_tokens", value)
        assert code == 0, err
        outputs[value] = texts(f"gen-{value}.jsonl")
        assert list(outputs[value]) == [f"p{i}" for i in range(10)]
    assert outputs["auto"] == outputs["0"] == outputs["500"]
    with pytest.raises(SystemExit) as exc:
        generate_data_finetuned.main([*map(str, base), "--max_batch_tokens", "-5"])
    assert exc.value.code == 2
    assert "--max_batch_tokens" in capsys.readouterr().err


# --- the command line ----------------------------------------------------------------


def test_cli_prompts_file_then_rerun_skips_done(tiny, capsys):
    write_prompts()
    args = ["--model_name_or_path", tiny["base"], "--adapter_path", tiny["adapter"], "--input_file", "prompts.jsonl",
            "--id_field", "id", "--output_file", "gen.jsonl", "--max_new_tokens", "5", "--batch_size", "4"]
    code, out, err = run_main(capsys, *args)
    assert code == 0, err
    assert "12 generated, 0 already there" in out
    first = read_jsonl("gen.jsonl")
    assert [r["custom_id"] for r in first] == [f"p{i}" for i in range(12)]
    assert first[0]["model"] == str(tiny["base"]) and first[0]["adapter"] == str(tiny["adapter"])
    assert first[0]["run"] == "adapter"  # the adapter folder's name (no NAME= given)
    assert "run adapter: tokenizer and chat template from" in err and "loading the base model" in err
    code, out, err = run_main(capsys, *args)
    # Nothing left to do: one line, exit 0, decided before the model loads.
    assert code == 0 and out.splitlines() == [
        "nothing to do: all 12 requests are already in gen.jsonl, made as this run would make them"]
    assert "12 of 12 requests already in gen.jsonl" in err
    assert "loading the base model" not in err and "engine hf" not in err
    assert read_jsonl("gen.jsonl") == first


def test_openai_batch_input_as_input(tiny, capsys):
    write_prompts(count=7)
    assert create_batchinput.main(["--input_file", "prompts.jsonl", "--id_field", "id", "--model_name", "gpt-4o-mini",
                                   "--output_file", "batchinput.jsonl", "--max_tokens", "4",
                                   "--max_requests_per_file", "3"]) == 0
    assert not Path("batchinput.jsonl").exists() and Path("batchinput.part-003.jsonl").exists()
    code, _, err = run_main(capsys, "--model_name_or_path", tiny["base"], "--adapter_path", tiny["adapter"],
                            "--input_file", "batchinput.jsonl", "--output_file", "gen.jsonl")
    assert code == 0, err
    records = read_jsonl("gen.jsonl")
    assert [r["custom_id"] for r in records] == [f"p{i}" for i in range(7)]
    assert all(r["generation"]["max_new_tokens"] == 4 and r["completion_tokens"] <= 4 for r in records)
    # A flag command_line the body; chat lines go through the chat template (one BOS).
    code, _, err = run_main(capsys, "--model_name_or_path", tiny["base"], "--input_file", "batchinput.part-001.jsonl",
                            "--output_file", "gen2.jsonl", "--max_new_tokens", "2")
    assert code == 0, err
    second = read_jsonl("gen2.jsonl")
    assert len(second) == 3 and all(r["generation"]["max_new_tokens"] == 2 for r in second)
    loaded_tok = hf_model.load_model(str(tiny["base"])).tokenizer
    rendered = loaded_tok.apply_chat_template([{"role": "user", "content": prompt_text(0)}], tokenize=False,
                                              add_generation_prompt=True)
    assert second[0]["prompt_tokens"] == len(loaded_tok(rendered, add_special_tokens=False)["input_ids"])


def test_completions_batch_lines_are_raw_text(tiny, capsys):
    write_prompts(count=3)
    assert create_batchinput.main(["--input_file", "prompts.jsonl", "--model_name", "m", "--endpoint", "/v1/completions",
                                   "--output_file", "batchinput.jsonl", "--max_tokens", "3"]) == 0
    code, _, err = run_main(capsys, "--model_name_or_path", tiny["base"], "--input_file", "batchinput.jsonl",
                            "--output_file", "gen.jsonl")
    assert code == 0, err
    tok = hf_model.load_model(str(tiny["base"])).tokenizer
    assert [r["prompt_tokens"] for r in read_jsonl("gen.jsonl")] == \
        [len(tok(prompt_text(i))["input_ids"]) for i in range(3)]


def test_shards_partition_the_input(tiny, capsys, monkeypatch):
    write_prompts(count=10)
    common = ["--model_name_or_path", tiny["base"], "--input_file", "prompts.jsonl", "--id_field", "id",
              "--output_file", "gen.jsonl", "--max_new_tokens", "3"]
    for k in range(3):
        code, _, err = run_main(capsys, *common, "--shard_index", k, "--num_shards", 3)
        assert code == 0, err
        assert f"gen.shard-00{k}-of-003.jsonl" in err
    ids = {k: [r["custom_id"] for r in read_jsonl(f"gen.shard-00{k}-of-003.jsonl")] for k in range(3)}
    assert ids == {k: [f"p{i}" for i in range(k, 10, 3)] for k in range(3)}
    assert not Path("gen.jsonl").exists()
    # In a SLURM array (ids 1-3 here) the task's position picks the shard.
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    code, out, err = run_main(capsys, *common)
    assert code == 0 and "nothing to do: all 3 requests are already in gen.shard-001-of-003.jsonl" in out


def test_shard_helpers():
    assert inputs.shard_path("out/gen.jsonl", 2, 10) == Path("out/gen.shard-002-of-010.jsonl")
    assert inputs.shard_path("gen.jsonl", 0, 1) == Path("gen.jsonl")
    assert inputs.shard_from_env({}) == (None, None)
    assert inputs.shard_from_env({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "4",
                                      "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2"}) == (3, 4)
    with pytest.raises(UserError, match="out of range"):
        inputs.check_shard(3, 3)


def test_resume_after_sigkill(tiny):
    """Kill the real script mid-run, rerun the same command: every id exactly once."""
    count = 40
    write_prompts(count=count)
    cmd = [sys.executable, str(ROOT / "generate_data_finetuned.py"), "--model_name_or_path", str(tiny["base"]),
           "--adapter_path", str(tiny["adapter"]), "--input_file", "prompts.jsonl", "--id_field", "id",
           "--output_file", "gen.jsonl", "--batch_size", "2", "--max_new_tokens", "48", "--no_merge_lora"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = Path("gen.jsonl")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.stat().st_size > 0:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_jsonl(out)
    assert 0 < len(before) < count
    with open(out, "a", encoding="utf-8") as handle:  # as if killed in the middle of a write
        handle.write('{"custom_id": "p3", "generated_te')
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(before)} of {count} requests already in gen.jsonl" in rerun.stderr
    assert "removed a partial last line" in rerun.stderr
    after = read_jsonl(out)
    assert sorted(r["custom_id"] for r in after) == sorted(f"p{i}" for i in range(count))
    assert [r["custom_id"] for r in after] == [f"p{i}" for i in range(count)]  # input order once complete
    kept = {r["custom_id"]: r for r in after}
    assert all(kept[r["custom_id"]] == r for r in before)  # finished work is kept as it was


def test_second_run_on_same_output_is_refused(tiny, capsys):
    write_prompts(count=2)
    with records.exclusive(Path("gen.jsonl")):
        code, _, err = run_main(capsys, "--model_name_or_path", tiny["base"], "--input_file", "prompts.jsonl",
                                "--output_file", "gen.jsonl", "--max_new_tokens", "2")
    assert code == 1 and "being written by another run" in error_line(err)
    assert "loading the base model" not in err and not Path("gen.jsonl").exists()  # refused before loading


# --- bad input: one line, exit 1 ------------------------------------------------------


def _adapter_with_keys_dropped(tiny, root: Path) -> Path:
    import shutil

    bad = root / "dropped-adapter"
    if not bad.exists():
        shutil.copytree(tiny["adapter"], bad)
        weights = load_file(bad / "adapter_model.safetensors")
        save_file({k: v for k, v in weights.items() if "layers.1." not in k}, bad / "adapter_model.safetensors")
    return bad


def _adapter_with_extra_key(tiny, root: Path) -> Path:
    import shutil

    bad = root / "extra-adapter"
    if not bad.exists():
        shutil.copytree(tiny["adapter"], bad)
        weights = load_file(bad / "adapter_model.safetensors")
        weights["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = next(iter(weights.values())).clone()
        save_file(weights, bad / "adapter_model.safetensors")
    return bad


def _adapter_without_recorded_base(source: Path, root: Path, name: str) -> Path:
    import shutil

    bad = root / name
    if not bad.exists():
        shutil.copytree(source, bad)
        config = json.loads((bad / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = None
        (bad / "adapter_config.json").write_text(json.dumps(config))
    return bad


@pytest.mark.parametrize("case, expected", [
    ("missing_model", "--model_name_or_path ./no-such-model: no such folder"),
    ("missing_adapter", "no such folder; give the folder with adapter_config.json"),
    ("adapter_other_arch", "(a gpt2 model) but --model_name_or_path"),
    ("adapter_other_arch_unrecorded", "does not fit"),
    ("adapter_other_size", "does not fit"),
    ("adapter_keys_missing", "weights do not match"),
    ("adapter_keys_unexpected", "keys the base model has no place for"),
    ("malformed_line", "prompts.jsonl:2: not valid JSON"),
    ("empty_input", "prompts.jsonl: the file is empty"),
    ("duplicate_ids", "duplicate custom_id 'same'"),
    ("bad_batch_line", "batchinput.jsonl:1: missing url"),
    ("temperature_zero_sampling", "sampling with temperature 0 is not possible"),
])
def test_bad_input_is_one_line(tiny, capsys, case, expected):
    write_prompts(count=3)
    model, adapter, input_file = str(tiny["base"]), None, "prompts.jsonl"
    extra = []
    if case == "missing_model":
        model = "./no-such-model"
    elif case == "missing_adapter":
        adapter = "no-such-adapter"
    elif case == "adapter_other_arch":
        adapter = tiny["gpt2_adapter"]
    elif case == "adapter_other_arch_unrecorded":
        adapter = _adapter_without_recorded_base(tiny["gpt2_adapter"], tiny["root"], "gpt2-unrecorded")
    elif case == "adapter_other_size":
        adapter = _adapter_without_recorded_base(tiny["wide_adapter"], tiny["root"], "wide-unrecorded")
    elif case == "adapter_keys_missing":
        adapter = _adapter_with_keys_dropped(tiny, tiny["root"])
    elif case == "adapter_keys_unexpected":
        adapter = _adapter_with_extra_key(tiny, tiny["root"])
    elif case == "malformed_line":
        Path("prompts.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "broken\n')
    elif case == "empty_input":
        Path("prompts.jsonl").write_text("")
    elif case == "duplicate_ids":
        write_jsonl("prompts.jsonl", [{"id": "same", "prompt": "a"}, {"id": "same", "prompt": "b"}])
        extra = ["--id_field", "id"]
    elif case == "bad_batch_line":
        input_file = "batchinput.jsonl"
        write_jsonl(input_file, [{"custom_id": "a", "method": "POST", "body": {"model": "m"}}])
    elif case == "temperature_zero_sampling":
        extra = ["--do_sample", "--temperature", "0"]
    args = ["--model_name_or_path", model, "--input_file", input_file, "--output_file", "gen.jsonl",
            "--max_new_tokens", "2", *extra]
    if adapter is not None:
        args += ["--adapter_path", adapter]
    code, out, err = run_main(capsys, *args)
    assert code == 1
    assert expected in error_line(err)
    assert not Path("gen.jsonl").exists() or read_jsonl("gen.jsonl") == []


def test_adapter_recorded_for_another_base_is_reported(tiny, capsys, tmp_path):
    import shutil

    moved = tmp_path / "copied-base"
    shutil.copytree(tiny["base"], moved)
    write_prompts(count=2)
    code, _, err = run_main(capsys, "--model_name_or_path", moved, "--adapter_path", tiny["adapter"],
                            "--input_file", "prompts.jsonl", "--output_file", "gen.jsonl", "--max_new_tokens", "2")
    assert code == 0, err
    assert f"the adapter records base model {tiny['base']} but --model_name_or_path is {moved}" in err


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        generate_data_finetuned.main(["--input_file", "x.jsonl"])
    assert exc.value.code == 2


def test_streamed_input_in_windows(merged, tmp_path, monkeypatch):
    """A stream read a few requests at a time gives the same records, in input order."""
    ids = [f"p{i}" for i in range(12)]
    windowed = hf(merged, window=5)  # the engine sorts 5 jobs at a time
    stats = generation.run_generation(windowed, iter(requests_for()), tmp_path / "w.jsonl",
                                      GenParams(temperature=0, max_tokens=6), ids=ids, show_progress=False)
    generation.run_generation(hf(merged), requests_for(), tmp_path / "all.jsonl",
                              GenParams(temperature=0, max_tokens=6), show_progress=False)
    assert windowed.batches == 5  # windows of 5 + 5 + 2 jobs, in batches of up to 4
    assert stats.done == 12 and [r["custom_id"] for r in read_jsonl(tmp_path / "w.jsonl")] == ids
    assert texts(tmp_path / "w.jsonl") == texts(tmp_path / "all.jsonl")


def test_messages_and_system_prompt_use_the_chat_template(tiny, capsys):
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    write_jsonl("chats.jsonl", [{"id": "c0", "messages": conversation}])
    code, _, err = run_main(capsys, "--model_name_or_path", tiny["base"], "--input_file", "chats.jsonl",
                            "--id_field", "id", "--system_prompt", "Be brief.", "--output_file", "gen.jsonl",
                            "--max_new_tokens", "2")
    assert code == 0, err
    tok = hf_model.load_model(str(tiny["base"])).tokenizer
    rendered = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *conversation],
                                       tokenize=False, add_generation_prompt=True)
    assert read_jsonl("gen.jsonl")[0]["prompt_tokens"] == len(tok(rendered, add_special_tokens=False)["input_ids"])
    code, _, err = run_main(capsys, "--model_name_or_path", tiny["base"], "--input_file", "chats.jsonl",
                            "--output_file", "gen2.jsonl", "--use_chat_template", "never")
    assert code == 1 and "a conversation needs the chat template" in error_line(err)


def test_output_that_is_not_a_generations_file_is_refused(tiny, capsys):
    write_prompts(count=2)
    write_jsonl("other.jsonl", [{"id": "x", "prompt": "not a record"}])
    code, _, err = run_main(capsys, "--model_name_or_path", tiny["base"], "--input_file", "prompts.jsonl",
                            "--output_file", "other.jsonl", "--max_new_tokens", "2")
    assert code == 1 and "other.jsonl:1: not a generations record" in error_line(err)
    assert read_jsonl("other.jsonl") == [{"id": "x", "prompt": "not a record"}]


def test_progress_in_a_log_file_shows_tokens_per_second(tiny, capsys, monkeypatch):
    monkeypatch.setenv("DATAGEN_PROGRESS_INTERVAL", "0")
    write_prompts(count=4)
    code, _, err = run_main(capsys, "--model_name_or_path", tiny["base"], "--input_file", "prompts.jsonl",
                            "--output_file", "gen.jsonl", "--max_new_tokens", "3", "--batch_size", "2")
    assert code == 0, err
    bar_lines = [line for line in err.splitlines() if line.startswith("generating:")]
    assert bar_lines and "\r" not in err and "tok/s" in bar_lines[-1] and "4/4" in bar_lines[-1]


def test_refused_run_leaves_the_lock_of_the_running_one():
    out = Path("gen.jsonl")
    with records.exclusive(out):
        with pytest.raises(UserError, match="being written by another run"):
            with records.exclusive(out):
                pass
        with pytest.raises(UserError, match="being written by another run"):  # still locked
            with records.exclusive(out):
                pass
    with records.exclusive(out):  # free again once released
        pass
    assert not Path(".gen.jsonl.lock").exists()


def test_qwen2_tiny_model_generates(tmp_path, capsys):
    """The tokenizer AutoTokenizer loads for a Qwen2 config has one more token than
    the one trained; the tiny model's embeddings must cover it."""
    base = tinymodel.build_tiny_model(tmp_path / "qwen2", arch="qwen2")
    write_prompts(count=3)
    code, _, err = run_main(capsys, "--model_name_or_path", base, "--input_file", "prompts.jsonl",
                            "--output_file", "out.jsonl", "--max_new_tokens", "4")
    assert code == 0, err
    assert len(texts("out.jsonl")) == 3


# --- names that look like paths, hub ids offline, answers files as input ------------------------


@pytest.mark.parametrize("name", ["./ckpt/final", "../ckpt", "/no/such/ckpt", "~/no-such-ckpt-xyz", "ckpt/final/x",
                                  "runs/final"])
def test_a_missing_local_path_is_one_line_at_once(tiny, capsys, name):
    write_prompts(count=2)
    Path("runs").mkdir()  # "runs/final": its first part exists here, so it is a path, not a hub id
    code, out, err = run_main(capsys, "--model_name_or_path", name, "--input_file", "prompts.jsonl",
                              "--output_file", "gen.jsonl")
    assert code == 1 and error_line(err) == (f"generate_data_finetuned.py: error: --model_name_or_path {name}: "
                                             "no such folder; check the path")
    code, out, err = run_main(capsys, "--model_name_or_path", tiny["base"], "--adapter_path", f"a={name}",
                              "--input_file", "prompts.jsonl", "--output_file", "gen.jsonl")
    assert code == 1 and f"--adapter_path {name}: no such folder" in error_line(err)
    assert "loading" not in err and not Path("gen.jsonl").exists()


def test_a_hub_id_not_in_the_cache_offline_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    write_prompts(count=2)
    code, out, err = run_main(capsys, "--model_name_or_path", "some-org/some-model", "--input_file", "prompts.jsonl",
                              "--output_file", "gen.jsonl")
    assert code == 1 and error_line(err) == (
        "generate_data_finetuned.py: error: --model_name_or_path some-org/some-model: not in the local Hugging Face "
        f"cache ({tmp_path / 'hf-home' / 'hub'}) and the hub is offline (HF_HUB_OFFLINE=1); download it on a node "
        "with network (hf download some-org/some-model), or set HF_HOME to the cache that holds it")
    assert not Path("gen.jsonl").exists()


@pytest.mark.parametrize("kind, line, said", [
    ("openai", {"id": "batch_req_1", "custom_id": "p0", "response": {"status_code": 200, "body": {}}, "error": None},
     "an OpenAI Batch API results file (answers, not prompts): reformat_results.py --source_type openai "
     "--input_file results.jsonl takes it"),
    ("finetuned", {"custom_id": "p0", "generated_text": "x", "source": "finetuned", "fingerprint": {}},
     "a fine-tuned generations file (answers, not prompts): reformat_results.py --source_type finetuned "
     "--input_file results.jsonl takes it"),
    ("reformatted", {"id": "p0", "generated_text": "x", "source": "openai", "run": "gpt-4o-mini"},
     "a reformatted results file (answers, not prompts): reformat_results.py --compare results.jsonl takes it"),
])
def test_an_answers_file_as_input_says_what_it_is(tiny, capsys, kind, line, said):
    write_jsonl("results.jsonl", [line])
    code, out, err = run_main(capsys, "--model_name_or_path", tiny["base"], "--input_file", "results.jsonl",
                              "--output_file", "gen.jsonl")
    assert code == 1 and error_line(err) == (f"generate_data_finetuned.py: error: results.jsonl: {said}; give "
                                             "--input_file the prompts file or the batch input (batchinput.jsonl) "
                                             "the answers were made from")
    assert not Path("gen.jsonl").exists()
