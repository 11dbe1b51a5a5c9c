#!/usr/bin/env bash
# One prepared check of the Hugging Face engine on a bare GPU machine (torch, transformers,
# peft, accelerate; no vLLM, openai or datasets; no network), in well under 8 minutes:
#
#   bash bench/gpu_check.sh                  # ~0.6B-parameter random Llama-style model, bf16, on cuda
#   bash bench/gpu_check.sh --layers 32      # ~1.2B
#   bash bench/gpu_check.sh --small          # hidden 256, 2 layers: runs anywhere (CPU too), to try the script
#
# It builds the model from a config in memory (random weights, a tokenizer trained on the
# spot by datagen.tinymodel: nothing is downloaded), then prints
#   - tokens/s of the engine's greedy decoding at batch 1 and at batch 64 (bf16),
#   - how many batched greedy answers equal the unbatched ones (bf16 rounding differs
#     with the batch shape: a count, not a failure),
#   - how many answers of the engine's own greedy loop equal model.generate's,
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
parser.add_argument("--init", type=float, default=0.1,
                    help="initializer range: above the usual 0.02 so random logits have fewer near-ties")
args = parser.parse_args()
if args.small:
    args.hidden, args.layers, args.prompts, args.single, args.max_new_tokens = 256, 2, 16, 4, 16

started = time.monotonic()
import torch
import transformers

from datagen import engine_hf, hf_model, model_files, tinymodel
from datagen.engine import GenParams
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
fast = engine_hf.HFEngine(loaded)  # the engine's own greedy loop
plain = engine_hf.HFEngine(loaded, fast_greedy=False)  # model.generate
assert fast.fast_greedy is not None, "the engine's greedy loop does not take this model"
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


def run(engine, batch):
    """Greedy answers of every prompt in batches of ``batch``, and the seconds it took."""
    sync()
    start = time.perf_counter()
    out = []
    for i in range(0, len(batch_prompts), batch):
        out += [s[0] for s in engine.generate_batch(batch_prompts[i:i + batch], params)]
    sync()
    return out, time.perf_counter() - start


step_seconds = weight_bytes / (args.bandwidth * 1e12)  # the least a decode step can take
batch_prompts = prompts[:2]
run(fast, 2)  # warm-up: CUDA kernels, allocator
run(plain, 2)

batch_prompts = prompts[:args.single]
single, t_single = run(fast, 1)
batch_prompts = prompts
batched, t_batched = run(fast, len(prompts))
generated, t_generate = run(plain, len(prompts))


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
line("engine loop, batch 1", single, t_single, 1)
line(f"engine loop, batch {len(prompts)}", batched, t_batched, len(prompts))
line(f"model.generate, batch {len(prompts)}", generated, t_generate, len(prompts))
key = lambda s: (s.text, s.completion_tokens, s.finish_reason)  # noqa: E731
same_batch = sum(key(a) == key(b) for a, b in zip(single, batched))
same_loop = sum(key(a) == key(b) for a, b in zip(batched, generated))
print(f"\nbatched ({len(prompts)}) greedy answers equal to unbatched: {same_batch}/{len(single)}")
print(f"engine loop's greedy answers equal to model.generate's (batch {len(prompts)}): {same_loop}/{len(prompts)}")
print(f"engine loop vs model.generate at batch {len(prompts)}: {t_generate / t_batched:.2f}x; "
      f"batch {len(prompts)} vs batch 1: {tokens(batched) / t_batched / (tokens(single) / t_single):.1f}x tok/s")
if cuda:
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")
print(f"total {time.monotonic() - started:.0f} s")
EOF
