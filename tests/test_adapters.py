"""Several LoRA checkpoints (and the base model) against the same prompts in one run of the
Hugging Face engine: one base loaded once, the adapters switched per batch, one output
file per adapter, each answering as that adapter alone would."""

from __future__ import annotations

import pytest

from datagen import inputs, tinymodel
from datagen.errors import UserError
from tests.test_generate_data_finetuned import error_line, run_main, tiny, write_prompts  # noqa: F401
from tests.util import files_in, read_jsonl


@pytest.fixture(scope="module")
def second(tiny):  # noqa: F811
    return tinymodel.build_tiny_adapter(tiny["base"], tiny["root"] / "ckpt-2", seed=5)


def common(tiny, output="gen.jsonl"):  # noqa: F811
    return ["--model_name_or_path", tiny["base"], "--input_file", "prompts.jsonl", "--id_field", "id",
            "--output_file", output, "--max_new_tokens", "6", "--batch_size", "3", "--temperature", "0"]


def texts(path) -> dict:
    return {r["custom_id"]: r["generated_text"] for r in read_jsonl(path)}


def test_two_adapters_and_the_base_in_one_run_answer_as_each_alone(tiny, second, capsys):  # noqa: F811
    write_prompts(count=7)
    code, out, err = run_main(capsys, *common(tiny), "--adapter_path", f"first={tiny['adapter']}",
                              "--adapter_path", second, "--with_base")
    assert code == 0, err
    assert {"gen.first.jsonl", "gen.ckpt-2.jsonl", "gen.base.jsonl"} <= set(files_in("."))
    assert "wrote gen.first.jsonl: 7 generated" in out and "wrote gen.base.jsonl: 7 generated" in out
    alone = {}
    for name, extra in (("first", ["--adapter_path", tiny["adapter"]]), ("ckpt-2", ["--adapter_path", second]),
                        ("base", [])):
        assert run_main(capsys, *common(tiny, f"alone-{name}.jsonl"), *extra)[0] == 0
        alone[name] = texts(f"alone-{name}.jsonl")
        assert texts(f"gen.{name}.jsonl") == alone[name]
    assert alone["first"] != alone["ckpt-2"] != alone["base"]
    records = {name: read_jsonl(f"gen.{name}.jsonl") for name in ("first", "ckpt-2", "base")}
    assert records["base"][0]["adapter"] is None and records["first"][0]["adapter"] == str(tiny["adapter"])
    assert len({r[0]["fingerprint"]["adapter"] for r in records.values()}) == 3
    assert all(r[0]["engine"]["merged"] is False for r in records.values())  # one base, adapters switched
    # Each file resumes on its own.
    code, out, _ = run_main(capsys, *common(tiny), "--adapter_path", f"first={tiny['adapter']}",
                            "--adapter_path", second, "--with_base")
    assert code == 0 and out.count("0 generated, 7 already there") == 3


def test_shards_of_several_adapters(tiny, second, capsys):  # noqa: F811
    write_prompts(count=5)
    for k in range(2):
        assert run_main(capsys, *common(tiny), "--adapter_path", f"a={tiny['adapter']}", "--adapter_path",
                        f"b={second}", "--shard_index", k, "--num_shards", 2)[0] == 0
    for name in ("a", "b"):
        ids = [r["custom_id"] for k in range(2) for r in read_jsonl(f"gen.{name}.shard-00{k}-of-002.jsonl")]
        assert sorted(ids) == sorted(f"p{i}" for i in range(5))


def test_adapter_names():
    assert inputs.parse_adapters(["x=/a/b", "/c/d/ckpt-9/", "e"]) == {"x": "/a/b", "ckpt-9": "/c/d/ckpt-9/", "e": "e"}
    assert inputs.parse_adapters(["runs/lr=3e-4"]) == {"lr=3e-4": "runs/lr=3e-4"}  # a folder name with "="
    with pytest.raises(UserError, match="a second adapter named 'a'"):
        inputs.parse_adapters(["a=/x", "a=/y"])
    with pytest.raises(UserError, match="cannot name an output file"):
        inputs.parse_adapters(["base=/x"])
    outputs = inputs.adapter_outputs("out/gen.jsonl", ["a", "b"], with_base=True)
    assert {k: str(v) for k, v in outputs.items()} == {"a": "out/gen.a.jsonl", "b": "out/gen.b.jsonl",
                                                        None: "out/gen.base.jsonl"}
    assert inputs.adapter_outputs("gen.jsonl", ["a"], with_base=False) == {"a": inputs.Path("gen.jsonl")}


def test_a_duplicate_adapter_name_is_one_line(tiny, capsys):  # noqa: F811
    write_prompts(count=1)
    code, _, err = run_main(capsys, *common(tiny), "--adapter_path", tiny["adapter"], "--adapter_path",
                            tiny["adapter"])
    assert code == 1 and "a second adapter named 'adapter'" in error_line(err)
    assert files_in(".") == ["prompts.jsonl"]


def test_engine_auto_without_a_gpu_takes_hugging_face(tiny, capsys, caplog):  # noqa: F811
    write_prompts(count=1)
    code, _, err = run_main(capsys, *common(tiny), "--engine", "auto")
    assert code == 0, err
    assert "engine hf (--engine auto: " in caplog.text
    assert read_jsonl("gen.jsonl")[0]["engine"]["name"] == "hf"
