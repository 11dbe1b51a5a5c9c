"""Tiny causal language models and LoRA adapters, built on the spot for tests and demos.

    python -m datagen.tinymodel OUTDIR                 # OUTDIR/base and OUTDIR/adapter (Llama-style)
    python -m datagen.tinymodel OUTDIR --arch qwen2    # a Qwen2-style base instead
    python -m datagen.tinymodel OUTDIR --adapters a,b,c   # OUTDIR/base, OUTDIR/adapter-a, -b, -c
    python -m datagen.tinymodel OUTDIR --own_chat_template   # each adapter saves a tokenizer with
                                                             # its own chat template beside it

Nothing is downloaded. ``build_tiny_model`` trains a byte-level BPE tokenizer (about
500 tokens) on a built-in corpus in well under a second, gives it a chat template
that starts with the BOS token (as Llama's does, so a doubled BOS would show), no pad
token (so the pad-token fallback runs), and saves a model of the chosen architecture
(hidden size 64, 2 layers) with random weights beside it. ``build_tiny_adapter``
loads that base from disk and saves a LoRA adapter whose A and B matrices are both
random and non-zero, so the adapter visibly changes greedy output; it can save a
tokenizer of its own beside it, as trainers do (another chat template, added tokens
with resized embeddings), or keep B at zero (an adapter saved before training). Both
are deterministic for a given seed.

The models are random: their text is gibberish, but they exercise the real loading,
tokenizing, batching and generation code exactly as a real checkpoint would.
"""

from __future__ import annotations

import argparse
import random
import sys
import warnings
from pathlib import Path

from datagen.common.cli import setup_hint

ARCHS = ("llama", "qwen2", "gpt2")
# Modules a LoRA adapter targets, per architecture (the usual choices for each).
LORA_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "gpt2": ["c_attn", "c_proj"]}

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Llama-2-like: the template writes the BOS itself, so the rendered text must be
# tokenized without adding special tokens again.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
)

# Another prompt format, for an adapter "trained" with its own template (no BOS, other markers).
ADAPTER_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] + ':\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)

_WORDS = (
    "the a an of to and in is was for on that with as by at from it this be are or not which "
    "capital france paris germany berlin italy rome spain madrid answer question write haiku "
    "autumn leaves poem number sum what who where when why how one two three four five six seven "
    "eight nine ten model data generate token batch prompt adapter language learning research "
    "evaluate result output input file line text chat user assistant system hello world yes no "
    "red green blue water fire earth air light dark day night cold warm river mountain sea sky"
).split()


def _corpus(seed: int, lines: int = 400) -> list[str]:
    rng = random.Random(seed)
    text = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        sentence = " ".join(words).capitalize()
        text.append(sentence + rng.choice([".", "?", "!", ":", ","]) + " " + str(rng.randint(0, 999)))
    return text


def build_tokenizer(vocab_size: int = 512, seed: int = 0):
    """A byte-level BPE tokenizer (any text encodes and decodes back exactly)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS, *ROLE_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama: encoding with special tokens puts a BOS first.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                        additional_special_tokens=ROLE_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _config(arch: str, tokenizer, hidden: int, layers: int):
    import transformers

    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=None, tie_word_embeddings=False)
    if arch in ("llama", "qwen2"):
        cls = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
        # A larger initializer than the usual 0.02 spreads the logits, so greedy
        # decoding never hinges on a near-tie that float rounding could flip.
        heads = max(4, hidden // 64)  # head size 64 in larger models, as in real ones
        return cls(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=1024,
                   initializer_range=0.1, **common)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=1024,
                                       initializer_range=0.1, **common)
    raise ValueError(f"unknown arch {arch!r}; use one of {', '.join(ARCHS)}")


def build_tiny_model(path, seed: int = 0, arch: str = "llama", hidden: int = 64, layers: int = 2) -> Path:
    """Save a tokenizer (with a chat template) and a random-weight causal LM into ``path``."""
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed=seed)
    config = _config(arch, tokenizer, hidden, layers)
    # AutoTokenizer may load the architecture's own tokenizer class, which can add tokens
    # (Qwen2's adds one): size the embeddings for the tokenizer users will actually load.
    tokenizer.save_pretrained(path)
    config.save_pretrained(path)
    config.vocab_size = max(config.vocab_size, len(transformers.AutoTokenizer.from_pretrained(path)))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_adapter(base_path, path, seed: int = 1, r: int = 8, targets: list[str] | None = None,
                       scale: float = 0.1, chat_template: str | None = None, added_tokens: tuple = (),
                       resize_embeddings: bool = True, untrained: bool = False) -> Path:
    """Save a LoRA adapter for the model in ``base_path`` whose weights are all non-zero.

    ``scale`` is the standard deviation of the random A and B entries; the default
    changes the tiny model's greedy output from the first tokens on. ``chat_template``
    and ``added_tokens`` save the base's tokenizer beside the adapter with that template
    and those special tokens added (as TRL, LlamaFactory and axolotl save theirs); with
    added tokens and ``resize_embeddings`` the base's embeddings are resized for them and
    saved with the adapter (peft ``modules_to_save``). ``untrained`` keeps every B at zero.
    """
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    base_path, path = Path(base_path), Path(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    arch = model.config.model_type
    tokenizer = None
    if chat_template is not None or added_tokens:
        tokenizer = transformers.AutoTokenizer.from_pretrained(base_path)
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        if added_tokens:
            tokenizer.add_special_tokens({"additional_special_tokens": list(added_tokens)})
    resized = bool(added_tokens) and resize_embeddings
    if resized:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=targets or LORA_TARGETS.get(arch, LORA_TARGETS["llama"]),
                        fan_in_fan_out=arch == "gpt2",
                        modules_to_save=["embed_tokens", "lm_head"] if resized else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft reads a deprecated transformers attribute
        peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or ("lora_B" in name and not untrained):
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@setup_hint("python -m datagen.tinymodel")  # a missing torch/transformers: one line
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datagen.tinymodel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", help="folder to write base/ and adapter/ (or adapter-NAME/) into")
    parser.add_argument("--arch", default="llama", choices=ARCHS, help="architecture of the base model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the base model (the adapter uses seed+1)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size")
    parser.add_argument("--layers", type=int, default=2, help="number of layers")
    parser.add_argument("--no_adapter", action="store_true", help="build only the base model")
    parser.add_argument("--adapters", default=None, metavar="NAME,NAME,...",
                        help="several adapters on the one base, into OUTDIR/adapter-NAME (seeds seed+1, seed+2, ...)")
    parser.add_argument("--own_chat_template", action="store_true",
                        help="save beside each adapter a tokenizer with its own chat template (another prompt "
                             "format than the base's), as trainers do")
    args = parser.parse_args(argv)
    names = [name.strip() for name in (args.adapters or "").split(",") if name.strip()]
    if args.adapters is not None and (not names or any("/" in name for name in names)):
        parser.error(f"--adapters {args.adapters!r}: give names separated by commas, e.g. a,b,c")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    outdir = Path(args.outdir)
    base = build_tiny_model(outdir / "base", seed=args.seed, arch=args.arch, hidden=args.hidden, layers=args.layers)
    print(f"base model: {base}")
    if not args.no_adapter:
        folders = [f"adapter-{name}" for name in names] or ["adapter"]
        template = ADAPTER_CHAT_TEMPLATE if args.own_chat_template else None
        for number, folder in enumerate(folders, start=1):
            adapter = build_tiny_adapter(base, outdir / folder, seed=args.seed + number, chat_template=template)
            print(f"adapter: {adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
