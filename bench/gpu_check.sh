#!/usr/bin/env bash
# One prepared check of the Hugging Face engine on a bare GPU machine (torch, transformers,
# peft, accelerate; no vLLM, openai or datasets; no network), in well under 8 minutes:
#
#   bash bench/gpu_check.sh                  # ~0.6B-parameter random Llama-style model, bf16, on cuda
#   bash bench/gpu_check.sh --layers 32      # ~1.2B
#   bash bench/gpu_check.sh --static_cache   # also generate's static cache (transformers compiles it on CUDA)
#   bash bench/gpu_check.sh --small          # hidden 256, 2 layers: runs anywhere (CPU too), to try the script
#
# It builds the model from a config in memory (random weights, a tokenizer trained on the
# spot by datagen.tinymodel: nothing is downloaded), streams the same greedy jobs through
# the engine (datagen.engine_hf: length-sorted batches, one model.generate call each) and prints
#   - tokens/s at batch 1 and at batch 64 (bf16),
#   - how many batched greedy answers equal the unbatched ones (bf16 rounding differs
#     with the batch shape: a count, not a failure),
#   - with --static_cache, the same at batch 64 with the model's generation config asking
#     for transformers' static cache (on CUDA generate then compiles the forward pass; its
#     first, compiling run is timed apart) and how many answers equal the dynamic cache's,
#   - tokens/s against the memory-bandwidth limit: each decode step reads every weight
#     once, so at batch B no run beats B / (weight bytes / BANDWIDTH) tokens/s
#     (default 4.3 TB/s, an H200's measured copy bandwidth; --bandwidth TB/s to change).
# Everything it imports from this repository needs only the standard library, torch and
# transformers: imports of vllm, openai and datasets are blocked, so a dependency on them
# fails here too, not only on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
exec timeout 470 "$PYTHON" - "$@" <<'EOF'
import argparse
import importlib.abc
import random
import sys
import time

class Blocked(importlib.abc.MetaPathFinder):
    """What a bare GPU machine lacks: importing it fails at once, as it would there."""
    NAMES = ("vllm", "openai", "datasets")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.NAMES:
            raise ModuleNotFoundError(f"gpu_check: {name} is not on a bare GPU machine")
        return None

sys.meta_path.insert(0, Blocked())
sys.path.insert(0, ".")

parser = argparse.ArgumentParser(prog="bench/gpu_check.sh")
parser.add_argument("--hidden", type=int, default=2048)
parser.add_argument("--layers", type=int, default=16, help="16: ~0.6B parameters at hidden 2048; 32: ~1.2B")
parser.add_argument("--small", action="store_true", help="hidden 256, 2 layers, few prompts: a quick end-to-end try")
parser.add_argument("--prompts", type=int, default=64, help="prompts of the batched runs (batch = all of them)")
parser.add_argument("--single", type=int, default=16, help="of those, how many also run one at a time")
parser.add_argument("--max_new_tokens", type=int, default=128)
parser.add_argument("--bandwidth", type=float, default=4.3, help="memory bandwidth in TB/s for the limit")
parser.add_argument("--static_cache", action="store_true",
                    help="also time generate's static cache at the large batch (compiled by transformers on CUDA)")
parser.add_argument("--init", type=float, default=0.1,
                    help="initializer range: above the usual 0.02 so random logits have fewer near-ties")
args = parser.parse_args()
if args.small:
    args.hidden, args.layers, args.prompts, args.single, args.max_new_tokens = 256, 2, 16, 4, 16

started = time.monotonic()
import torch
import transformers

from datagen import engine_hf, hf_model, model_files, tinymodel
from datagen.engine import GenParams, Job
from datagen.hf_model import LoadedModel

transformers.utils.logging.set_verbosity_error()
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
name = torch.cuda.get_device_name() if cuda else "CPU (no CUDA device: figures are not the GPU's)"
print(f"device: {name}; torch {torch.__version__}, transformers {transformers.__version__}", flush=True)

tokenizer = tinymodel.build_tokenizer()
heads = max(4, args.hidden // 64)
config = transformers.LlamaConfig(
    vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
    num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
    max_position_embeddings=4096, initializer_range=args.init, bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
torch.manual_seed(0)
with device:
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.eval()
model.generation_config.pad_token_id = None
hf_model.setup_padding(tokenizer, model)
files = model_files.ModelFiles("random-llama", config, tokenizer, "", "", {})  # no files: built in memory
loaded = LoadedModel(model, files, "bfloat16", False, device)
parameters = sum(p.numel() for p in model.parameters())
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(f"model: Llama-style, hidden {args.hidden}, {args.layers} layers, {heads} heads of 64, "
      f"{parameters / 1e6:,.0f}M parameters, {weight_bytes / 1e9:.3f} GB in bf16 (built in "
      f"{time.monotonic() - started:.0f} s)", flush=True)

words = tinymodel._WORDS
rng = random.Random(0)
texts = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 120))) for _ in range(args.prompts)]
prompts = tokenizer(texts)["input_ids"]
params = GenParams(max_new_tokens=args.max_new_tokens)
sync = torch.cuda.synchronize if cuda else (lambda: None)


def run(batch, count):
    """Greedy answers of the first ``count`` prompts, streamed through the engine in plain
    batches of ``batch`` rows (no token budget), in input order, and the seconds it took."""
    engine = engine_hf.HFEngine(loaded, batch_size=batch, max_batch_tokens=0)
    jobs = [Job(i, ids, params, None, 0) for i, ids in enumerate(prompts[:count])]
    sync()
    start = time.perf_counter()
    answers = dict((job.item, samples[0]) for job, samples in engine.stream(jobs))
    sync()
    return [answers[i] for i in range(count)], time.perf_counter() - start


step_seconds = weight_bytes / (args.bandwidth * 1e12)  # the least a decode step can take
run(2, 2)  # warm-up: CUDA kernels, allocator
single, t_single = run(1, args.single)
batched, t_batched = run(len(prompts), len(prompts))
if args.static_cache:
    model.generation_config.cache_implementation = "static"
    _, t_compile = run(len(prompts), len(prompts))  # the first run compiles (on CUDA)
    static, t_static = run(len(prompts), len(prompts))
    model.generation_config.cache_implementation = None


def tokens(samples):
    return sum(s.completion_tokens for s in samples)


def line(label, samples, seconds, batch):
    rate = tokens(samples) / seconds
    limit = batch / step_seconds
    print(f"{label:<34}{tokens(samples):>8}{seconds:>9.2f}{rate:>11,.0f}{limit:>13,.0f}{rate / limit:>8.1%}")


print(f"\ngreedy, {args.max_new_tokens} new tokens, prompts of {min(map(len, prompts))}-"
      f"{max(map(len, prompts))} tokens; limit = batch / ({weight_bytes / 1e9:.3f} GB / {args.bandwidth} TB/s "
      f"= {step_seconds * 1e3:.3f} ms a step)")
print(f"{'run':<34}{'tokens':>8}{'seconds':>9}{'tok/s':>11}{'limit tok/s':>13}{'of it':>8}")
line("engine (generate), batch 1", single, t_single, 1)
line(f"engine (generate), batch {len(prompts)}", batched, t_batched, len(prompts))
if args.static_cache:
    line(f"static cache, batch {len(prompts)}", static, t_static, len(prompts))
key = lambda s: (s.text, s.completion_tokens, s.finish_reason)  # noqa: E731
same_batch = sum(key(a) == key(b) for a, b in zip(single, batched))
print(f"\nbatched ({len(prompts)}) greedy answers equal to unbatched: {same_batch}/{len(single)}")
print(f"batch {len(prompts)} vs batch 1: {tokens(batched) / t_batched / (tokens(single) / t_single):.1f}x tok/s")
if args.static_cache:
    same_static = sum(key(a) == key(b) for a, b in zip(static, batched))
    print(f"static cache vs dynamic at batch {len(prompts)}: {t_batched / t_static:.2f}x "
          f"(its first{', compiling,' if cuda else ''} run took {t_compile:.1f} s); "
          f"answers equal: {same_static}/{len(prompts)}")
if cuda:
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")
print(f"total {time.monotonic() - started:.0f} s")
EOF
