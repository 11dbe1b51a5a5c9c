"""The fine-tuned route never reuses, drops or doubles a record quietly: fingerprints on
resume, the lock on the file itself, failed records for rejected requests, one decoding
for one batch input, token counts as OpenAI counts them, and body fields it cannot honour."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datagen.batchapi import create_batchinput
from datagen.results import reformat_results
from datagen.finetuned import hf_model, records
from datagen import tinymodel
from tests.test_generate_data_finetuned import error_line, prompt_text, run_main, tiny, write_prompts  # noqa: F401
from tests.util import ROOT, files_in, read_jsonl, write_jsonl


def base_args(tiny, *more, adapter="adapter", output="gen.jsonl"):
    args = ["--model_name_or_path", tiny["base"], "--input_file", "prompts.jsonl", "--id_field", "id",
            "--output_file", output, "--max_new_tokens", "3", "--batch_size", "4", "--temperature", "0"]
    if adapter:
        args += ["--adapter_path", tiny[adapter]]
    return [*args, *more]


@pytest.fixture(scope="module")
def other_adapter(tiny):
    return tinymodel.build_tiny_adapter(tiny["base"], tiny["root"] / "adapter-2", seed=7)


def test_every_record_carries_its_fingerprint_and_provenance(tiny, capsys):
    write_prompts(count=4)
    code, _, err = run_main(capsys, *base_args(tiny))
    assert code == 0, err
    for record in read_jsonl("gen.jsonl"):
        assert set(record["fingerprint"]) == set(records.PARTS)
        assert record["engine"]["name"] == "hf" and record["engine"]["dtype"] == "float32"
        assert record["model_sha256"] == records.model_sha256(Path(tiny["base"]).resolve())
    inputs = {r["fingerprint"]["input"] for r in read_jsonl("gen.jsonl")}
    assert len(inputs) == 4  # one per distinct prompt


@pytest.mark.parametrize("change, differs", [
    ("adapter", "the adapter (config or weights) differs (6)"),
    ("no_adapter", "the adapter (config or weights) differs (6)"),
    ("max_new_tokens", "the generation parameters differ (6)"),
    ("temperature", "the generation parameters differ (6)"),
    ("template", "the prompt as the model saw it (rendered, tokenized) differs (6)"),
    ("dtype", "the engine (its dtype, merge setting, or how it decodes and seeds) differs (6)"),
    ("run_name", "the run name differs (--adapter_path NAME=PATH) (6)"),
])
def test_resume_refuses_records_made_differently(tiny, other_adapter, capsys, change, differs):
    write_prompts(count=6)
    assert run_main(capsys, *base_args(tiny))[0] == 0
    before = Path("gen.jsonl").read_bytes()
    tiny = {**tiny, "adapter-2": other_adapter}
    args = {"adapter": base_args(tiny, adapter="adapter-2"),
            "no_adapter": base_args(tiny, adapter=None),
            "max_new_tokens": base_args(tiny, "--max_new_tokens", "4"),
            "temperature": base_args(tiny, "--temperature", "0.7"),
            "template": base_args(tiny, "--prompt_template", "Q: {prompt}"),
            "dtype": base_args(tiny, "--no_merge_lora"),
            "run_name": base_args(tiny, adapter=None) + ["--adapter_path", f"renamed={tiny['adapter']}"]}[change]
    code, _, err = run_main(capsys, *args)
    line = error_line(err)
    assert code == 1
    assert f"gen.jsonl: 6 of the 6 records already there for this input were made differently: {differs}" in line
    assert "loading the base model" not in err  # decided from tokenizer and file hashes, before the weights
    assert "--regenerate_mismatched" in line and "new --output_file" in line
    assert Path("gen.jsonl").read_bytes() == before
    assert files_in(".") == ["gen.jsonl", "prompts.jsonl"]


def test_another_base_model_is_refused(tiny, capsys, tmp_path):
    write_prompts(count=3)
    assert run_main(capsys, *base_args(tiny, adapter=None))[0] == 0
    copy = shutil.copytree(tiny["base"], tmp_path / "base-copy")
    code, _, err = run_main(capsys, "--model_name_or_path", copy, *base_args(tiny, adapter=None)[2:])
    assert code == 1 and "the base model differs (3)" in error_line(err)


def test_regenerate_mismatched_makes_exactly_those_again(tiny, capsys):
    write_prompts(count=5)
    assert run_main(capsys, *base_args(tiny, "--max_new_tokens", "2"))[0] == 0
    old = read_jsonl("gen.jsonl")
    write_prompts(count=8)  # three new prompts; the five old records were made with 2 tokens
    code, out, err = run_main(capsys, *base_args(tiny, "--regenerate_mismatched"))
    assert code == 0, err
    assert "moved 5 records made differently to" in err and "8 generated, 0 already there" in out
    after = read_jsonl("gen.jsonl")
    assert [r["custom_id"] for r in after] == [f"p{i}" for i in range(8)]  # each once, in order
    assert all(r["generation"]["max_new_tokens"] == 3 for r in after)
    assert read_jsonl("gen.jsonl.replaced") == old  # nothing generated is lost
    code, out, err = run_main(capsys, *base_args(tiny))
    assert code == 0 and "nothing to do: all 8 requests are already in gen.jsonl" in out


def test_records_without_a_fingerprint_are_not_trusted(tiny, capsys):
    write_prompts(count=2)
    assert run_main(capsys, *base_args(tiny))[0] == 0
    legacy = [{k: v for k, v in r.items() if k != "fingerprint"} for r in read_jsonl("gen.jsonl")]
    write_jsonl("gen.jsonl", legacy)
    code, _, err = run_main(capsys, *base_args(tiny))
    assert code == 1 and "wrote no fingerprint (2)" in error_line(err)


@pytest.mark.parametrize("how", ["symlink", "absolute", "hardlink"])
def test_the_lock_is_on_the_file_not_the_path(tiny, capsys, tmp_path, how):
    write_prompts(count=2)
    real = tmp_path / "gen.jsonl"
    real.write_text("")
    other = {"symlink": "link.jsonl", "absolute": str(real), "hardlink": "hard.jsonl"}[how]
    if how == "symlink":
        os.symlink("gen.jsonl", other)
    elif how == "hardlink":
        os.link(real, other)
    with records.exclusive(Path("./gen.jsonl")):
        code, _, err = run_main(capsys, *base_args(tiny, output=other))
    assert code == 1 and "being written by another run" in error_line(err)
    assert real.read_text() == ""


def test_writing_through_a_symlink_keeps_the_link(tiny, capsys):
    write_prompts(count=3)
    Path("real.jsonl").write_text("")
    os.symlink("real.jsonl", "link.jsonl")
    code, _, err = run_main(capsys, *base_args(tiny, output="link.jsonl"))
    assert code == 0, err
    assert os.path.islink("link.jsonl") and len(read_jsonl("real.jsonl")) == 3


def test_prompt_over_the_context_is_a_failed_record_and_the_run_goes_on(tiny, capsys):
    long = " ".join(["paris"] * 1100)  # over the tiny model's 1,024 positions
    write_jsonl("prompts.jsonl", [{"id": "p0", "prompt": prompt_text(0)}, {"id": "long", "prompt": long},
                                  {"id": "p2", "prompt": prompt_text(2)}])
    code, out, err = run_main(capsys, *base_args(tiny))
    assert code == 0, err
    assert "(1 of them failed: context_length_exceeded 1" in out
    by_id = {r["custom_id"]: r for r in read_jsonl("gen.jsonl")}
    assert list(by_id) == ["p0", "long", "p2"]
    assert "generated_text" in by_id["p0"] and "generated_text" in by_id["p2"]
    error = by_id["long"]["error"]
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length is 1024 tokens" in error["message"]
    assert f"{by_id['long']['prompt_tokens']} prompt tokens + 3 max new tokens" in error["message"]
    # Resume keeps the failed record (same fingerprint); reformatting counts it as failed.
    assert "nothing to do: all 3 requests are already in gen.jsonl" in run_main(capsys, *base_args(tiny))[1]
    code = reformat_results.main(["--input_file", "gen.jsonl", "--source_type", "finetuned",
                                  "--output_file", "reformatted.jsonl"])
    captured = capsys.readouterr()
    assert [r["id"] for r in read_jsonl("reformatted.jsonl")] == ["p0", "p2"]
    assert "1 failed" in captured.out + captured.err
    assert code == 0  # a failure is counted, not fatal (unless --fail_on lists error)
    assert [r["id"] for r in read_jsonl("reformatted.failed.jsonl")] == ["long"]


def test_n_samples_token_counts_sum_like_openai(tiny, capsys):
    write_prompts(count=2)
    code, _, err = run_main(capsys, *base_args(tiny, "--temperature", "1", "--num_return_sequences", "3", "--max_new_tokens", "6"))
    assert code == 0, err
    for record in read_jsonl("gen.jsonl"):
        assert len(record["samples"]) == 3
        assert record["completion_tokens"] == sum(s["completion_tokens"] for s in record["samples"])


def batch_input(count: int, **body_extra) -> None:
    write_prompts(count=count)
    assert create_batchinput.main(["--input_file", "prompts.jsonl", "--id_field", "id", "--model_name", "m",
                                   "--output_file", "batchinput.jsonl", "--max_tokens", "3"]) == 0
    lines = read_jsonl("batchinput.jsonl")
    for i, line in enumerate(lines):
        line["body"].update({k: v(i) if callable(v) else v for k, v in body_extra.items()})
    write_jsonl("batchinput.jsonl", lines)


def test_a_batch_line_without_temperature_is_sampled_at_1_like_openai(tiny, capsys, caplog):
    batch_input(3, temperature=lambda i: 0 if i == 2 else None)
    code, _, err = run_main(capsys, "--model_name_or_path", tiny["base"], "--input_file", "batchinput.jsonl",
                            "--output_file", "gen.jsonl")
    assert code == 0, err
    decoding = [r["generation"] for r in read_jsonl("gen.jsonl")]
    assert [(g["do_sample"], g["temperature"], g["top_p"]) for g in decoding] == \
        [(True, 1.0, 1.0), (True, 1.0, 1.0), (False, None, None)]
    assert "decoding: sampling at temperature 1, top_p 1, seed 0" in caplog.text
    assert "2 requests set no temperature: the OpenAI API's default of 1 applies" in caplog.text
    assert "decoding: greedy" in caplog.text


def test_body_fields_the_route_cannot_honour_are_refused_or_listed(tiny, capsys):
    batch_input(5, logprobs=lambda i: i % 2 == 0, presence_penalty=0, user="me",
                response_format=lambda i: {"type": "json_object"} if i == 4 else None)
    args = ["--model_name_or_path", tiny["base"], "--input_file", "batchinput.jsonl", "--output_file", "gen.jsonl"]
    code, _, err = run_main(capsys, *args)
    line = error_line(err)
    assert code == 1
    assert "body fields the fine-tuned route cannot honour: logprobs (3 requests, line 1, 3, 5); " \
           "response_format (1 requests, line 5)" in line
    assert "--ignore_unsupported_fields" in line and not Path("gen.jsonl").exists()
    code, _, err = run_main(capsys, *args, "--ignore_unsupported_fields")
    assert code == 0, err
    assert "ignoring body fields the fine-tuned route cannot honour: logprobs (3 requests" in err
    ignored = {r["custom_id"]: r.get("ignored_fields") for r in read_jsonl("gen.jsonl")}
    assert ignored == {"p0": ["logprobs"], "p1": None, "p2": ["logprobs"], "p3": None,
                       "p4": ["logprobs", "response_format"]}


def test_damaged_model_and_adapter_files_are_one_line(tiny, capsys, tmp_path):
    write_prompts(count=1)
    listed = shutil.copytree(tiny["adapter"], tmp_path / "listed")
    (listed / "adapter_config.json").write_text("[1, 2]")
    truncated = shutil.copytree(tiny["adapter"], tmp_path / "truncated")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    base = shutil.copytree(tiny["base"], tmp_path / "base-truncated")
    model_file = base / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:300])
    cases = [(["--adapter_path", listed], "holds a JSON list, not an object"),
             (["--adapter_path", truncated], "cannot read adapter_model.safetensors (Error while deserializing header"),
             (["--model_name_or_path", base], "cannot load the model")]
    for extra, message in cases:
        args = base_args(tiny, adapter=None)
        code, _, err = run_main(capsys, *args, *extra)
        assert code == 1 and message in error_line(err), err
        assert not Path("gen.jsonl").exists()


def test_a_conversation_the_chat_template_refuses_is_a_failed_record(tiny, capsys, tmp_path):
    picky = shutil.copytree(tiny["base"], tmp_path / "picky")
    config_file = picky / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turn') }}"
                               "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    config_file.write_text(json.dumps(config))
    (picky / "chat_template.jinja").unlink(missing_ok=True)
    write_jsonl("prompts.jsonl", [{"id": "a", "messages": [{"role": "user", "content": "hi"}]},
                                  {"id": "b", "messages": [{"role": "system", "content": "x"},
                                                           {"role": "user", "content": "hi"}]}])
    code, out, err = run_main(capsys, "--model_name_or_path", picky, *base_args(tiny, adapter=None)[2:])
    assert code == 0, err
    by_id = {r["custom_id"]: r for r in read_jsonl("gen.jsonl")}
    assert "generated_text" in by_id["a"]
    assert by_id["b"]["error"]["code"] == "chat_template_error" and "no system turn" in by_id["b"]["error"]["message"]
    assert "nothing to do: all 2 requests are already in gen.jsonl" in run_main(capsys, "--model_name_or_path", picky,
                                                      *base_args(tiny, adapter=None)[2:])[1]


@pytest.mark.parametrize("signum, code, said", [(signal.SIGTERM, 143, "terminated by SIGTERM"),
                                                (signal.SIGINT, 130, "interrupted by SIGINT (Ctrl+C)")])
def test_a_signal_keeps_the_finished_records_and_says_how_to_resume(tiny, signum, code, said):
    write_prompts(count=40)
    cmd = [sys.executable, str(ROOT / "generate_data_finetuned.py"), *map(str, base_args(tiny, "--batch_size", "2",
                                                                                          "--max_new_tokens", "40"))]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None and not (
            Path("gen.jsonl").exists() and Path("gen.jsonl").stat().st_size > 0):
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signum)
    err = proc.communicate(timeout=180)[1]
    assert proc.returncode == code, err
    kept = read_jsonl("gen.jsonl")
    assert 0 < len(kept) < 40 and len({r["custom_id"] for r in kept}) == len(kept)
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"generate_data_finetuned.py: {said};")
    assert f"{len(kept)} of 40 requests done in gen.jsonl; rerun the same command to resume" in last
    assert "Traceback" not in err
    assert sorted(files_in(".")) == ["gen.jsonl", "prompts.jsonl"]


def test_template_escapes_reach_the_model_on_the_fine_tuned_route(tiny, capsys):
    """--prompt_template 'Q: {prompt}\\nA:' (as the README shows it) sends a real newline."""
    write_prompts(count=2)
    code, _, err = run_main(capsys, *base_args(tiny, "--prompt_template", "Q: {prompt}\\nA:", "--use_chat_template",
                                               "never"))
    assert code == 0, err
    tokenizer = hf_model.load_model(str(tiny["base"])).tokenizer
    for i, record in enumerate(read_jsonl("gen.jsonl")):
        sent = f"Q: {prompt_text(i)}\nA:"
        assert record["prompt_tokens"] == len(tokenizer(sent)["input_ids"])
        assert record["fingerprint"]["input"] == records.input_digest(tokenizer(sent)["input_ids"])
