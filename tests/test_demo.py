"""The README's first command: both routes end to end, offline, on the bundled example."""

import json
import subprocess
import sys

from tests.util import ROOT, read_jsonl


def test_demo_runs_both_routes_end_to_end(tmp_path):
    work = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "datagen.demo", "--workdir", str(work)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    prompts = [json.loads(line) for line in (ROOT / "examples/prompts.jsonl").read_text().splitlines()]
    ids = [p["id"] for p in prompts]
    openai_rows = read_jsonl(work / "reformatted_openai.jsonl")
    finetuned_rows = read_jsonl(work / "reformatted_finetuned.jsonl")
    # Both routes answered every prompt, in the prompts' order, under the same ids.
    assert [r["id"] for r in openai_rows] == ids
    assert [r["id"] for r in finetuned_rows] == ids
    assert {r["source"] for r in openai_rows} == {"openai"}
    assert {r["source"] for r in finetuned_rows} == {"finetuned"}
    # The stand-in echoes the last user message, so the OpenAI route's text is known.
    for prompt, row in zip(prompts, openai_rows):
        last = prompt["prompt"] if "prompt" in prompt else prompt["messages"][-1]["content"]
        assert row["generated_text"] == f"echo: {last}"
    assert all(r["adapter"] for r in finetuned_rows)
    out = result.stdout
    assert "LOCAL STAND-IN" in out
    assert "$ python create_batchinput.py" in out and "$ python generate_data_finetuned.py" in out
    assert "summary" in out and f"-> {work}/batchinput.jsonl: {len(ids)} requests" in out
    # The side-by-side table has a row per id.
    table = out[out.index("both routes side by side"):out.index("summary")]
    assert all(i[:16] in table for i in ids)
