"""Several LoRA checkpoints (and the base model) against the same prompts in one run of the
Hugging Face engine: one base loaded once, the adapters switched per batch, one output
file per adapter, each answering as that adapter alone would."""

from __future__ import annotations

import pytest

from datagen.finetuned import inputs
from datagen import tinymodel
from datagen.common.errors import UserError
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
        assert run_main(capsys, *common(tiny, f"alone-{name}.jsonl"), *extra, "--no_cache")[0] == 0
        alone[name] = texts(f"alone-{name}.jsonl")
        assert texts(f"gen.{name}.jsonl") == alone[name]
    assert alone["first"] != alone["ckpt-2"] != alone["base"]
    records = {name: read_jsonl(f"gen.{name}.jsonl") for name in ("first", "ckpt-2", "base")}
    assert records["base"][0]["adapter"] is None and records["first"][0]["adapter"] == str(tiny["adapter"])
    assert len({r[0]["fingerprint"]["adapter"] for r in records.values()}) == 3
    # Every record carries its run's name: NAME of NAME=PATH, the folder's name, or "base".
    assert {name: {r["run"] for r in recs} for name, recs in records.items()} == {
        "first": {"first"}, "ckpt-2": {"ckpt-2"}, "base": {"base"}}
    assert "run first: tokenizer and chat template from" in err and "(base) -> gen.first.jsonl" in err
    assert "wrote gen.first.jsonl: 7 generated, 0 already there, 7 of 7 done (run first)" in out
    assert all(r[0]["engine"]["merged"] is False for r in records.values())  # one base, adapters switched
    # Each file resumes on its own.
    code, out, _ = run_main(capsys, *common(tiny), "--adapter_path", f"first={tiny['adapter']}",
                            "--adapter_path", second, "--with_base")
    assert code == 0 and out.splitlines() == ["nothing to do: all 7 requests are already in gen.first.jsonl, "
                                              "gen.ckpt-2.jsonl, gen.base.jsonl, made as this run would make them"]


def test_shards_of_several_adapters(tiny, second, capsys):  # noqa: F811
    write_prompts(count=5)
    for k in range(2):
        assert run_main(capsys, *common(tiny), "--adapter_path", f"a={tiny['adapter']}", "--adapter_path",
                        f"b={second}", "--shard_index", k, "--num_shards", 2)[0] == 0
    for name in ("a", "b"):
        ids = [r["custom_id"] for k in range(2) for r in read_jsonl(f"gen.{name}.shard-00{k}-of-002.jsonl")]
        assert sorted(ids) == sorted(f"p{i}" for i in range(5))


def test_adapter_names_with_dots_switch_like_any_other(tiny, second, capsys):  # noqa: F811
    """A NAME such as v1.2 (dots are allowed) cannot be a torch module name: peft keeps it
    under another name, and the records and files keep the run's own."""
    write_prompts(count=3)
    code, _, err = run_main(capsys, *common(tiny), "--adapter_path", f"v1.2={tiny['adapter']}",
                            "--adapter_path", f"v1.3={second}")
    assert code == 0, err
    assert run_main(capsys, *common(tiny, "alone.jsonl"), "--adapter_path", second)[0] == 0
    assert texts("gen.v1.3.jsonl") == texts("alone.jsonl")
    assert {r["run"] for r in read_jsonl("gen.v1.2.jsonl")} == {"v1.2"}
    assert texts("gen.v1.2.jsonl") != texts("gen.v1.3.jsonl")


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


# --- the adapter's own tokenizer and chat template ----------------------------------------


@pytest.fixture(scope="module")
def own_template(tiny):  # noqa: F811
    """The same weights as tiny["adapter"], saved with a tokenizer of another chat template."""
    return tinymodel.build_tiny_adapter(tiny["base"], tiny["root"] / "own-template", seed=1,
                                        chat_template=tinymodel.ADAPTER_CHAT_TEMPLATE)


def write_conversations(count=4):
    from tests.test_generate_data_finetuned import prompt_text
    from tests.util import write_jsonl

    write_jsonl("prompts.jsonl", [{"id": f"p{i}", "messages": [{"role": "user", "content": prompt_text(i)}]}
                                  for i in range(count)])
    return [prompt_text(i) for i in range(count)]


def test_an_adapter_with_its_own_chat_template_renders_with_it(tiny, own_template, capsys):  # noqa: F811
    import transformers

    from datagen.finetuned import records

    texts_in = write_conversations()
    code, out, err = run_main(capsys, *common(tiny), "--adapter_path", f"own={own_template}",
                              "--adapter_path", f"plain={tiny['adapter']}", "--with_base")
    assert code == 0, err
    assert f"run own: tokenizer and chat template from {own_template} (adapter) -> gen.own.jsonl" in err
    assert f"run plain: tokenizer and chat template from {tiny['base']} (base) -> gen.plain.jsonl" in err
    own, plain, base = (read_jsonl(f"gen.{name}.jsonl") for name in ("own", "plain", "base"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["base"])
    for text, o, p, b in zip(texts_in, own, plain, base):
        # The adapter's records: its template rendered by hand, tokenized by its tokenizer.
        by_hand = tokenizer(f"### user:\n{text}\n### assistant:\n", add_special_tokens=False)["input_ids"]
        assert o["prompt_tokens"] == len(by_hand) and o["fingerprint"]["input"] == records.input_digest(by_hand)
        assert p["fingerprint"]["input"] == b["fingerprint"]["input"] != o["fingerprint"]["input"]
        base_rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        assert p["fingerprint"]["input"] == records.input_digest(
            tokenizer(base_rendered, add_special_tokens=False)["input_ids"])
    # Same weights, another prompt: other answers (the template reached the model).
    assert [r["generated_text"] for r in own] != [r["generated_text"] for r in plain]


def test_an_adapter_tokenizer_beyond_the_base_vocabulary(tiny, capsys):  # noqa: F811
    write_prompts(count=2)
    bare = tinymodel.build_tiny_adapter(tiny["base"], tiny["root"] / "added-bare", added_tokens=("<|im_end|>",),
                                        resize_embeddings=False)
    code, _, err = run_main(capsys, *common(tiny), "--adapter_path", bare)
    assert code == 1 and error_line(err) == (
        f"generate_data_finetuned.py: error: --adapter_path {bare}: its tokenizer has token ids up to 512 (added "
        f"tokens included) but {tiny['base']}'s input embeddings have 512 rows and the adapter saved no resized "
        "embeddings that cover them; save the adapter with its resized embed_tokens and lm_head (peft "
        "modules_to_save or save_embedding_layers=True), or remove the tokenizer files from the adapter folder "
        "to use the base's")
    assert "loading the base model" not in err and files_in(".") == ["prompts.jsonl"]
    # The common case: the trainer saved the resized embeddings with the adapter.
    resized = tinymodel.build_tiny_adapter(tiny["base"], tiny["root"] / "added-resized", added_tokens=("<|im_end|>",))
    code, out, err = run_main(capsys, *common(tiny), "--adapter_path", resized)
    assert code == 0 and "2 generated" in out, err
    code, _, err = run_main(capsys, *common(tiny, "both.jsonl"), "--adapter_path", resized, "--with_base")
    assert code == 1 and "run this adapter on its own (without --with_base or other adapters)" in error_line(err)


def test_an_untrained_adapter_is_warned_about(tiny, capsys):  # noqa: F811
    write_prompts(count=3)
    zero = tinymodel.build_tiny_adapter(tiny["base"], tiny["root"] / "untrained", untrained=True)
    code, out, err = run_main(capsys, *common(tiny), "--adapter_path", f"zero={zero}", "--with_base")
    assert code == 0, err
    warned = [line for line in err.splitlines() if "every LoRA B weight is zero" in line]
    assert len(warned) == 1 and warned[0].endswith(
        f"adapter zero ({zero}): every LoRA B weight is zero (saved before training?): it answers exactly like "
        "the base model")
    assert texts("gen.zero.jsonl") == texts("gen.base.jsonl")
    assert "every LoRA B weight" not in run_main(capsys, *common(tiny, "other.jsonl"), "--adapter_path",
                                                 tiny["adapter"])[2]


def test_tinymodel_builds_several_adapters_on_one_base(tmp_path, capsys):
    assert tinymodel.main([str(tmp_path / "m"), "--adapters", "a,b,c", "--own_chat_template"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [f"base model: {tmp_path / 'm' / 'base'}"] + [
        f"adapter: {tmp_path / 'm' / f'adapter-{name}'}" for name in "abc"]
    weights = {name: (tmp_path / "m" / f"adapter-{name}" / "adapter_model.safetensors").read_bytes() for name in "abc"}
    assert len(set(weights.values())) == 3  # each its own seed
    assert (tmp_path / "m" / "adapter-a" / "chat_template.jinja").read_text() == tinymodel.ADAPTER_CHAT_TEMPLATE
    with pytest.raises(SystemExit) as exc:
        tinymodel.main([str(tmp_path / "n"), "--adapters", ","])
    assert exc.value.code == 2 and not (tmp_path / "n").exists()
