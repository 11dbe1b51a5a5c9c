"""generate_data_finetuned.py and datagen.generation, on tiny models built on the spot.

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

import create_batchinput
import generate_data_finetuned
from datagen import engine, engine_hf, generation, hf_model, inputs, records, tinymodel
from datagen.errors import UserError
from tests.util import ROOT, read_jsonl, write_jsonl

RECORD_KEYS = {"custom_id", "generated_text", "finish_reason", "prompt_tokens", "completion_tokens", "source", "run",
               "model", "model_sha256", "adapter", "adapter_sha256", "engine", "generation", "fingerprint", "created"}
WORDS = ("the capital of france is paris and what is seven plus five write a haiku about autumn "
         "leaves river mountain blue sky question answer model data").split()


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
    generator = engine_hf.HFEngine(merged)
    overrides = inputs.Overrides(temperature=0, max_new_tokens=12)
    batched = generation.run_generation(generator, requests_for(), tmp_path / "b.jsonl", overrides, 5,
                                        show_progress=False)
    single = generation.run_generation(generator, requests_for(), tmp_path / "s.jsonl", overrides, 1,
                                       show_progress=False)
    assert batched.pad_tokens > 0  # batches really were padded (left, with the pad fallback)
    assert merged.tokenizer.pad_token == "<unk>" and merged.tokenizer.padding_side == "left"
    assert texts(tmp_path / "b.jsonl") == texts(tmp_path / "s.jsonl")
    assert len(set(texts(tmp_path / "b.jsonl").values())) > 1  # not one fixed output for all
    assert single.pad_tokens == 0


def test_sorted_batches_restore_input_order_and_record_shape(merged, tmp_path):
    out = tmp_path / "o.jsonl"
    generation.run_generation(engine_hf.HFEngine(merged), requests_for(), out,
                              inputs.Overrides(temperature=0, max_new_tokens=6), 4, show_progress=False)
    records = read_jsonl(out)
    assert [r["custom_id"] for r in records] == [f"p{i}" for i in range(12)]
    for r in records:
        assert set(r) == RECORD_KEYS
        assert r["source"] == "finetuned" and r["finish_reason"] in ("stop", "length")
        assert r["generation"] == {"max_new_tokens": 6, "do_sample": False, "temperature": None, "top_p": None,
                                   "seed": 0, "num_return_sequences": 1, "stop": []}
        assert r["engine"]["name"] == "hf" and r["engine"]["dtype"] == "float32" and r["engine"]["merged"] is True
        assert 1 <= r["completion_tokens"] <= 6
    # Plain text (raw) prompts get exactly one BOS from the tokenizer.
    assert records[0]["prompt_tokens"] == len(merged.tokenizer(prompt_text(0))["input_ids"])


def test_adapter_changes_output_and_merged_equals_unmerged(tiny, merged, tmp_path):
    base = hf_model.load_model(str(tiny["base"]))
    unmerged = hf_model.load_model(str(tiny["base"]), str(tiny["adapter"]), merge=False)
    overrides = inputs.Overrides(temperature=0, max_new_tokens=10)
    outs = {}
    for name, loaded in (("base", base), ("merged", merged), ("unmerged", unmerged)):
        outs[name] = tmp_path / f"{name}.jsonl"
        generation.run_generation(engine_hf.HFEngine(loaded), requests_for(), outs[name], overrides, 4,
                                  show_progress=False)
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
    generator = engine_hf.HFEngine(merged)
    plain = tmp_path / "plain.jsonl"
    generation.run_generation(generator, requests_for(4), plain, inputs.Overrides(temperature=0, max_new_tokens=16), 4,
                              show_progress=False)
    record = read_jsonl(plain)[0]
    text = record["generated_text"]
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text.find(text[i:i + 2]) == i)
    cut = tmp_path / "cut.jsonl"
    generation.run_generation(generator, requests_for(4), cut, inputs.Overrides(temperature=0, max_new_tokens=16, stop=[stop]),
                              4, show_progress=False)
    got = read_jsonl(cut)[0]
    assert got["generated_text"] == text[:text.find(stop)]
    assert got["finish_reason"] == "stop" and got["completion_tokens"] < record["completion_tokens"]
    assert got["generation"]["stop"] == [stop]


def test_n_samples_reproducible_with_seed(merged, tmp_path):
    generator = engine_hf.HFEngine(merged)
    overrides = inputs.Overrides(max_new_tokens=8, do_sample=True, temperature=1.5, num_return_sequences=3, seed=7)
    for name in ("a.jsonl", "b.jsonl"):
        generation.run_generation(generator, requests_for(3), tmp_path / name, overrides, 3, show_progress=False)
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

    # A GPU that fits at most 2 prompts. The forward pass fails, as a real OOM does, both
    # under model.generate and under the engine's own greedy loop.
    def forward_with_little_memory(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:  # a prefill: a new batch
            sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward_with_little_memory)
    generator = engine_hf.HFEngine(merged)
    stats = generation.run_generation(generator, requests_for(), tmp_path / "oom.jsonl",
                                      inputs.Overrides(temperature=0, max_new_tokens=6), 8, show_progress=False)
    monkeypatch.undo()
    generation.run_generation(generator, requests_for(), tmp_path / "ok.jsonl",
                              inputs.Overrides(temperature=0, max_new_tokens=6), 8, show_progress=False)
    assert stats.batch_size == 2 and sizes[:3] == [8, 4, 2]
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
    generator = engine_hf.HFEngine(merged)
    stats = generation.run_generation(generator, requests_for(), tmp_path / "oom.jsonl",
                                      inputs.Overrides(temperature=0, max_new_tokens=6), 4, show_progress=False,
                                      max_batch_tokens=None)
    monkeypatch.undo()
    generation.run_generation(generator, requests_for(), tmp_path / "ok.jsonl",
                              inputs.Overrides(temperature=0, max_new_tokens=6), 1, show_progress=False)
    assert stats.done == 12 and stats.batch_size <= 2
    assert max(sizes) > 4  # the budget really put more than --batch_size short prompts in a batch
    assert texts(tmp_path / "oom.jsonl") == texts(tmp_path / "ok.jsonl")


def test_token_budget_batches(merged):
    """Longest prompts first, batch_size rows of them; shorter ones fill the same budget."""
    requests = requests_for(40)
    for r in requests:
        r.input_ids = generation.Renderer(merged.tokenizer).encode(r)
    lengths = sorted((len(r.input_ids) for r in requests), reverse=True)
    plain = generation.plan_batches(requests, 4, 8, 0)
    assert [len(b) for b in plain] == [4] * 10
    auto = generation.plan_batches(requests, 4, 8, None)
    budget = 4 * (lengths[0] + 8)
    assert len(auto[0]) == 4 and len(auto) < len(plain) and max(map(len, auto)) > 4
    for batch in auto:
        assert len(batch) * (max(len(r.input_ids) for r in batch) + 8) <= budget
        assert len(batch) <= generation.BUDGET_ROWS_FACTOR * 4
    flat = [r for b in auto for r in b]
    assert sorted(r.index for r in flat) == list(range(40))  # every prompt exactly once
    assert [len(r.input_ids) for r in flat] == lengths  # still sorted longest first
    explicit = generation.plan_batches(requests, 4, 8, 10 ** 9)
    assert [len(b) for b in explicit] == [32, 8]  # capped at BUDGET_ROWS_FACTOR x batch_size
    tiny_budget = generation.plan_batches(requests, 4, 8, 1)
    assert [len(b) for b in tiny_budget] == [1] * 40  # a prompt over the budget still runs, alone


def test_token_budget_keeps_greedy_output_and_input_order(merged, tmp_path):
    generator = engine_hf.HFEngine(merged)
    overrides = inputs.Overrides(temperature=0, max_new_tokens=10)
    for name, budget in (("auto", None), ("explicit", 600)):
        stats = generation.run_generation(generator, requests_for(30), tmp_path / f"{name}.jsonl", overrides, 3,
                                          show_progress=False, max_batch_tokens=budget)
        assert stats.done == 30
    generation.run_generation(generator, requests_for(30), tmp_path / "one.jsonl", overrides, 1,
                              show_progress=False)
    for name in ("auto", "explicit"):
        assert [r["custom_id"] for r in read_jsonl(tmp_path / f"{name}.jsonl")] == [f"p{i}" for i in range(30)]
        assert texts(tmp_path / f"{name}.jsonl") == texts(tmp_path / "one.jsonl")


def _loop_equals_generate(loaded, mask_kind):
    """The engine's own greedy loop gives model.generate's tokens, also when rows end early
    (an EOS mid-batch: the row leaves the batch, the others go on unchanged)."""
    import torch

    generator = engine_hf.HFEngine(loaded)
    assert generator.fast_greedy is not None and generator.fast_greedy.decode_mask == mask_kind
    batch = [generation.Renderer(loaded.tokenizer).encode(r) for r in requests_for(8)]
    assert len(set(map(len, batch))) > 1  # padded rows: the decode masks matter
    params = engine.GenParams(max_new_tokens=12)
    slow = engine_hf.HFEngine(loaded)
    slow.fast_greedy = None  # model.generate
    reference = slow.generate_batch(batch, params)
    assert generator.generate_batch(batch, params) == reference
    # Make a token that some rows produce mid-way an EOS: those rows stop there.
    width = max(map(len, batch))
    input_ids = torch.tensor([[generator.pad_id] * (width - len(ids)) + ids for ids in batch])
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
    token_lists = generator._greedy(input_ids, attention, 12)
    counts = {}
    for tokens in token_lists:
        for t in set(tokens[1:-1]):
            counts[t] = counts.get(t, 0) + 1
    eos = max(counts, key=lambda t: (0 < counts[t] < len(batch), counts[t]))
    for g in (generator, slow):
        g.eos_ids = set(g.eos_ids) | {eos}
    fast_out, slow_out = generator.generate_batch(batch, params), slow.generate_batch(batch, params)
    assert fast_out == slow_out
    finish = [s[0].finish_reason for s in fast_out]
    assert "stop" in finish and "length" in finish  # some rows ended early, some ran to the end


def test_fast_greedy_loop_equals_generate_and_drops_finished_rows(merged):
    _loop_equals_generate(merged, "bool")


@pytest.mark.parametrize("arch,attention,mask_kind", [
    ("llama", "eager", "float"), ("qwen2", "sdpa", "bool"), ("qwen2", "eager", "float"),
    ("gpt2", "sdpa", "bool"), ("gpt2", "eager", "float")])
def test_fast_greedy_loop_across_models_and_attention_kernels(tiny, arch, attention, mask_kind):
    """The loop builds the decode masks itself for sdpa (boolean) and eager (float) attention;
    on every tiny architecture, unmerged adapters included, the tokens are generate's."""
    base = tiny["base"] if arch == "llama" else tinymodel.build_tiny_model(tiny["root"] / f"{arch}-{attention}", arch=arch)
    adapter = tiny["adapter"] if arch == "llama" else tinymodel.build_tiny_adapter(
        base, tiny["root"] / f"{arch}-{attention}-adapter", seed=1)
    for merge in (True, False):
        loaded = hf_model.load_model(str(base), str(adapter), merge=merge)
        loaded.model.set_attn_implementation(attention)
        _loop_equals_generate(loaded, mask_kind)


def test_decode_masks_only_where_transformers_builds_the_padding_mask():
    """Sliding-window layers, chunked attention and other kernels keep transformers' own masks."""
    import transformers

    def kind(config, attention="sdpa"):
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.config._attn_implementation = attention  # as loading with that kernel records it
        return engine_hf._decode_mask_kind(model)

    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=64)
    assert kind(transformers.LlamaConfig(**small)) == "bool"
    assert kind(transformers.LlamaConfig(**small), "eager") == "float"
    assert kind(transformers.Qwen2Config(**small)) == "bool"  # sliding window off: full attention
    assert kind(transformers.Qwen2Config(**small, use_sliding_window=True, sliding_window=8, max_window_layers=0)) is None
    assert kind(transformers.MistralConfig(**small, sliding_window=8)) is None
    assert kind(transformers.MistralConfig(**small, sliding_window=None)) == "bool"
    assert kind(transformers.LlamaConfig(**small), "flash_attention_2") is None


def test_compile_gives_the_same_greedy_text(tiny, capsys, caplog, monkeypatch, tmp_path):
    """--compile runs the prefill and decode steps through torch.compile (inductor: real C++ kernels on CPU)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    write_prompts(count=6)  # two batches of different widths
    base = ["--model_name_or_path", tiny["base"], "--adapter_path", tiny["adapter"], "--input_file", "prompts.jsonl",
            "--max_new_tokens", "10", "--batch_size", "3", "--max_batch_tokens", "0", "--temperature", "0"]
    assert run_main(capsys, *base, "--output_file", "eager.jsonl")[0] == 0
    with caplog.at_level("INFO", logger="datagen"):
        code, _, err = run_main(capsys, *base, "--output_file", "compiled.jsonl", "--compile")
    assert code == 0, err
    assert "the first compiled prefill took" in caplog.text and "the first compiled decode step took" in caplog.text
    assert "torch.compile failed" not in caplog.text
    assert texts("compiled.jsonl") == texts("eager.jsonl") and len(texts("eager.jsonl")) == 6


def test_compile_failure_falls_back_without_losing_the_run(tiny, tmp_path):
    """No working C++ compiler (as on some cluster nodes): a warning, then the same text, uncompiled."""
    write_prompts(count=3)
    args = [sys.executable, str(ROOT / "generate_data_finetuned.py"), "--model_name_or_path", str(tiny["base"]),
            "--input_file", "prompts.jsonl", "--max_new_tokens", "4", "--batch_size", "4", "--temperature", "0"]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    plain = subprocess.run(args + ["--output_file", "plain.jsonl"], capture_output=True, text=True, env=env)
    assert plain.returncode == 0, plain.stderr
    broken = subprocess.run(args + ["--output_file", "compiled.jsonl", "--compile"], capture_output=True, text=True,
                            env={**env, "CXX": "/bin/false"})
    assert broken.returncode == 0, broken.stderr
    assert "--compile: torch.compile failed" in broken.stderr
    assert texts("compiled.jsonl") == texts("plain.jsonl") and len(texts("plain.jsonl")) == 3


def test_compile_refused_where_it_cannot_apply(tiny, capsys, caplog):
    import json as _json

    write_prompts(count=2)
    common = ["--input_file", "prompts.jsonl", "--output_file", "out.jsonl", "--compile", "--max_new_tokens", "3"]
    code, _, err = run_main(capsys, "--model_name_or_path", tiny["base"], *common, "--use_generate")
    assert code == 1 and "--use_generate turns off: drop one of the two" in err and len(err.strip().splitlines()) == 1
    # A model whose generation config adds a logits processor never uses the loop.
    penalised = tinymodel.build_tiny_model(tiny["root"] / "penalised", seed=0)
    config_file = Path(penalised) / "generation_config.json"
    config_file.write_text(_json.dumps({**_json.loads(config_file.read_text()), "repetition_penalty": 1.3}))
    code, _, err = run_main(capsys, "--model_name_or_path", penalised, *common)
    assert code == 1 and "cannot use (its generation config adds a logits processor" in err
    assert not Path("out.jsonl").exists()
    # Sampling goes through model.generate: said once, and the run goes on.
    with caplog.at_level("WARNING", logger="datagen"):
        code, _, err = run_main(capsys, "--model_name_or_path", tiny["base"], *common, "--do_sample")
    assert code == 0, err
    assert caplog.text.count("--compile speeds up greedy decoding only: requests that sample") == 1
    assert len(texts("out.jsonl")) == 2


def test_fast_greedy_only_where_generate_adds_nothing(merged):
    import copy

    generator = engine_hf.HFEngine(merged)
    assert generator.fast_greedy is not None
    config = copy.deepcopy(merged.model.generation_config)
    try:
        merged.model.generation_config.repetition_penalty = 1.3  # generate would add a processor
        assert engine_hf.HFEngine(merged).fast_greedy is None
    finally:
        merged.model.generation_config = config


def test_cli_max_batch_tokens(tiny, capsys):
    write_prompts(count=10)
    base = ["--model_name_or_path", tiny["base"], "--adapter_path", tiny["adapter"], "--input_file", "prompts.jsonl",
            "--id_field", "id", "--max_new_tokens", "4", "--batch_size", "2", "--temperature", "0"]
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
    # A flag overrides the body; chat lines go through the chat template (one BOS).
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
    monkeypatch.setattr(generation, "SORT_WINDOW", 5)
    ids = [f"p{i}" for i in range(12)]
    stats = generation.run_generation(engine_hf.HFEngine(merged), iter(requests_for()), tmp_path / "w.jsonl",
                                      inputs.Overrides(temperature=0, max_new_tokens=6), 4, ids=ids, show_progress=False)
    generation.run_generation(engine_hf.HFEngine(merged), requests_for(), tmp_path / "all.jsonl",
                              inputs.Overrides(temperature=0, max_new_tokens=6), 4, show_progress=False)
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


def test_use_generate_bypasses_the_loop_with_the_same_greedy_text(tiny, capsys, monkeypatch):
    write_prompts(count=6)
    base = ["--model_name_or_path", tiny["base"], "--adapter_path", tiny["adapter"],
            "--input_file", "prompts.jsonl", "--max_new_tokens", "8", "--batch_size", "4"]
    assert run_main(capsys, *base, "--output_file", "loop.jsonl")[0] == 0

    def no_loop(*args, **kwargs):
        raise AssertionError("--use_generate must not use the engine's greedy loop")

    monkeypatch.setattr(engine_hf.HFEngine, "_greedy", no_loop)
    assert run_main(capsys, *base, "--output_file", "generate.jsonl", "--use_generate")[0] == 0
    assert texts("loop.jsonl") == texts("generate.jsonl")
    assert len(texts("loop.jsonl")) == 6


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
