"""The Hugging Face + LoRA generation engine behind generate_data_finetuned.py.

What it does, in the order a run does it:

1. ``check_requests`` reads the whole input once, streaming, before any model loads:
   a prompts file (any kind ``datagen.prompts`` reads) or an OpenAI batch input file
   (or its numbered parts), detected from the first line. It checks every line,
   the ids (unique across all shards) and each request's parameters, and keeps only
   this shard's ids: shard K of N takes rows K, K+N, K+2N, ... so every shard gets a
   similar mix of lengths. ``iter_shard`` streams the same requests again to generate.
2. ``load_model`` loads the tokenizer and the base model (``dtype``, ``device_map``,
   ``trust_remote_code`` only when asked), then the LoRA adapter with checks that
   turn peft's warnings into errors: the adapter's keys must match the base model's
   modules exactly; an adapter recorded for another base is reported (and refused
   when that base is a local folder of another architecture). The adapter is merged
   into the weights (``merge_and_unload``) unless asked not to.
3. ``run_generation`` skips the ``custom_id``s already in the output file (resume),
   reads the rest in windows of ``SORT_WINDOW`` requests, groups them by their
   generation parameters, sorts each group by prompt length
   into batches (few pad tokens; by default ``batch_size`` rows of the longest prompts
   and as many shorter ones as fit the same token budget), generates with left padding
   and an attention mask (greedy batches in the engine's own decoding loop, which drops
   finished rows; ``model.generate`` otherwise), cuts stop strings, and appends one
   record per request as each batch finishes
   (flushed and fsynced). A CUDA out-of-memory error halves the batch size and
   retries. When every request is done, the file is rewritten in input order.

Record (one JSON line per request): ``custom_id``, ``generated_text``,
``finish_reason`` ("stop" | "length"), ``prompt_tokens``, ``completion_tokens``,
``samples`` (only when n > 1), ``source`` ("finetuned"), ``model``, ``adapter``,
``adapter_sha256``, ``generation`` (the effective parameters) and ``created``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from datagen import batchfile, prompts
from datagen.engine import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_SEED, DEFAULT_TEMPERATURE, DEFAULT_TOP_P,  # noqa: F401
                            GenParams, Sample)
from datagen.errors import UserError
from datagen.jsonl import AppendJsonl, atomic_writer, iter_jsonl, repair_torn_tail

log = logging.getLogger("datagen")

SORT_WINDOW = 8192  # requests read, sorted by length and generated together (bounds memory)
BUDGET_ROWS_FACTOR = 8  # with a token budget, a batch holds at most this many times --batch_size prompts
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


# --- sharding ------------------------------------------------------------------------


def shard_path(output: str | os.PathLike, shard_index: int, num_shards: int) -> Path:
    """The file shard K of N writes: ``gen.jsonl`` -> ``gen.shard-000-of-003.jsonl``.

    With one shard the output is the path itself.
    """
    output = Path(output)
    if num_shards <= 1:
        return output
    return output.with_name(f"{output.stem}.shard-{shard_index:03d}-of-{num_shards:03d}{output.suffix}")


def shard_from_env(environ=os.environ) -> tuple[int | None, int | None]:
    """(shard index, shard count) of a SLURM array task, or (None, None) outside one.

    Task ids need not start at 0 (``--array=1-4``) or step by 1 (``--array=0-9:3``):
    the index is the task's position in the array.
    """
    task_id, count = environ.get("SLURM_ARRAY_TASK_ID"), environ.get("SLURM_ARRAY_TASK_COUNT")
    if task_id is None or count is None:
        return None, None
    try:
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0") or 0)
        step = int(environ.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
        return (int(task_id) - first) // max(step, 1), int(count)
    except ValueError:
        raise UserError(f"SLURM_ARRAY_TASK_ID={task_id!r} / SLURM_ARRAY_TASK_COUNT={count!r} are not "
                        "integers; pass --shard_index and --num_shards") from None


def check_shard(shard_index: int, num_shards: int) -> None:
    if num_shards < 1:
        raise UserError(f"--num_shards must be at least 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise UserError(f"--shard_index {shard_index} is out of range for --num_shards {num_shards}; "
                        f"use 0 to {num_shards - 1}")


# --- requests --------------------------------------------------------------------------


@dataclass
class Request:
    """One prompt to answer, with what its source says about generation."""

    custom_id: str
    index: int  # row number in the whole input (all shards), for the output order
    where: str  # file:line, for messages
    text: str | None = None  # raw text, used as is (completions-style)
    messages: list[dict] | None = None  # a conversation, rendered by the chat template
    params: dict = field(default_factory=dict)  # from a batch line: max_tokens, temperature, ...
    raw: bool = False  # a /v1/completions line: the text is never put in the chat template
    # Filled in by the generator:
    input_ids: list[int] | None = None


def is_batch_input(path: str | os.PathLike) -> bool:
    """True when the file's first line has the OpenAI batch line shape."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() not in (".jsonl", ".ndjson", ".json"):
        return False
    try:
        with open(path, "r", encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    obj = json.loads(line)
                    # custom_id plus any other batch key: a batch line (a broken one is
                    # then reported as such, not as a prompts row without a prompt).
                    return isinstance(obj, dict) and "custom_id" in obj and bool({"method", "url", "body"} & set(obj))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # the prompts reader reports the bad line with file:line
    return False


def _flatten_content(content: Any, where: str) -> str:
    """Message content as text: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "input_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise UserError(f"{where}: message content part of type {kind!r} is not text; "
                                "a text model takes text parts only")
        return "".join(texts)
    raise UserError(f"{where}: message content must be text, got {type(content).__name__}")


def _chat_messages(prompt: prompts.Prompt) -> list[dict]:
    """The conversation as chat templates take it: role and text content only.

    OpenAI's "developer" role is the system prompt of newer models; chat templates
    know it as "system".
    """
    messages = []
    for i, message in enumerate(prompt.chat_messages()):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise UserError(f"{prompt.where}: message {i} must be an object with a \"role\" and \"content\"")
        role = "system" if message["role"] == "developer" else message["role"]
        messages.append({"role": role, "content": _flatten_content(message.get("content"), prompt.where)})
    return messages


def iter_all_requests(input_file: str | os.PathLike, prompt_options: prompts.PromptOptions | None = None,
                      input_format: str = "auto", split: str | None = None) -> Iterator[Request]:
    """Every request of the input, batch file (or its parts) or prompts file, in order."""
    path = Path(input_file)
    batch_files = None
    if path.exists():
        if is_batch_input(path):
            batch_files = [path]
    else:
        parts = batchfile.existing_parts(path)
        if parts:
            batch_files = batchfile.resolve_batch_files(path)
    index = 0
    if batch_files is not None:
        for part in batch_files:
            for line in batchfile.iter_batch_requests(part):
                prompt, params = batchfile.request_to_prompt(line)
                request = Request(prompt.custom_id, index, prompt.where, params=params)
                if line.url == batchfile.COMPLETIONS:
                    request.text, request.raw = prompt.text, True
                else:
                    request.messages = _chat_messages(prompt)
                yield request
                index += 1
        if index == 0:
            raise UserError(f"{path}: no requests; the batch input file is empty")
        return
    options = prompt_options or prompts.PromptOptions()
    for prompt in prompts.iter_prompts(path, options, input_format, split):
        request = Request(prompt.custom_id, index, prompt.where)
        if prompt.messages is not None or prompt.system:
            request.messages = _chat_messages(prompt)
        else:
            request.text = prompt.text
        yield request
        index += 1


def iter_shard(input_file, prompt_options=None, input_format="auto", split=None,
               shard_index: int = 0, num_shards: int = 1) -> Iterator[Request]:
    """This shard's requests, streaming: rows K, K+N, K+2N, ... of the whole input."""
    for request in iter_all_requests(input_file, prompt_options, input_format, split):
        if request.index % num_shards == shard_index:
            yield request


def check_requests(input_file, prompt_options=None, input_format="auto", split=None,
                   shard_index: int = 0, num_shards: int = 1, overrides: "Overrides | None" = None
                   ) -> tuple[list[str], int]:
    """Read the whole input once, before any model loads: every line's shape, unique ids
    (across all shards, so every shard catches a duplicate) and each request's parameters.

    Returns this shard's ``custom_id``s in input order and the number of requests in all.
    Holds ids only, never the prompts.
    """
    overrides = overrides or Overrides()
    seen: set[str] = set()
    mine: list[str] = []
    total = 0
    for request in iter_all_requests(input_file, prompt_options, input_format, split):
        if request.custom_id in seen:
            first = next(r.where for r in iter_all_requests(input_file, prompt_options, input_format, split)
                         if r.custom_id == request.custom_id)
            raise UserError(f"{request.where}: duplicate custom_id {request.custom_id!r} (first at {first}); "
                            "ids must be unique (check --id_field)")
        seen.add(request.custom_id)
        total += 1
        effective_params(request, overrides)
        if request.index % num_shards == shard_index:
            mine.append(request.custom_id)
    return mine, total


# --- generation parameters -----------------------------------------------------------


@dataclass
class Overrides:
    """Parameters given on the command line; ``None`` means take the batch line's, or the default."""

    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    num_return_sequences: int | None = None
    stop: list[str] | None = None

    def check(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UserError("--max_new_tokens must be at least 1")
        if self.num_return_sequences is not None and self.num_return_sequences < 1:
            raise UserError("--num_return_sequences must be at least 1")
        if self.temperature is not None and self.temperature < 0:
            raise UserError("--temperature must be 0 or more (0 means greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError("--top_p must be in (0, 1]")
        if self.stop is not None and any(s == "" for s in self.stop):
            raise UserError("--stop must not be empty text")


def effective_params(request: Request, overrides: Overrides) -> GenParams:
    """Command line over the batch line over the defaults.

    Sampling is on with ``--do_sample``, or when a temperature above 0 is set (in the
    flags or the batch line) and ``--no_do_sample`` is not given; otherwise greedy.
    """
    body = request.params

    def pick(flag_value, body_key):
        return flag_value if flag_value is not None else body.get(body_key)

    temperature = pick(overrides.temperature, "temperature")
    top_p = pick(overrides.top_p, "top_p")
    max_new = pick(overrides.max_new_tokens, "max_tokens") or DEFAULT_MAX_NEW_TOKENS
    seed = pick(overrides.seed, "seed")
    n = pick(overrides.num_return_sequences, "n") or 1
    stop = overrides.stop if overrides.stop is not None else body.get("stop") or []
    if overrides.do_sample is not None:
        do_sample = overrides.do_sample
    else:
        do_sample = temperature is not None and temperature > 0
    if do_sample and temperature == 0:
        raise UserError(f"{request.where}: sampling with temperature 0 is not possible; "
                        "drop --do_sample for greedy decoding or set --temperature above 0")
    for name, value in (("max_tokens", max_new), ("n", n)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{request.where}: {name} must be a positive integer, got {value!r}")
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise UserError(f"{request.where}: stop must be non-empty text or a list of them")
    return GenParams(
        max_new_tokens=int(max_new), do_sample=bool(do_sample),
        temperature=float(temperature if temperature is not None else DEFAULT_TEMPERATURE) if do_sample else None,
        top_p=float(top_p if top_p is not None else DEFAULT_TOP_P) if do_sample else None,
        seed=int(seed) if seed is not None else DEFAULT_SEED,
        num_return_sequences=int(n), stop=tuple(stop))


# --- loading the model -------------------------------------------------------------


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    model_name: str  # as given
    adapter: str | None
    adapter_sha256: str | None
    dtype: str  # "float32", "bfloat16", "float16"
    merged: bool
    device: Any  # where inputs go


def resolve_dtype(name: str, cuda: bool) -> str:
    if name == "auto":
        if not cuda:
            return "float32"
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype {name!r}: use auto, float32, bfloat16 or float16")
    return name


def _hub_hint() -> str:
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return " (HF_HUB_OFFLINE is set: only local folders and models already in the cache load)"
    return ""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def adapter_weights_file(adapter: Path) -> Path:
    for name in ADAPTER_WEIGHTS:
        if (adapter / name).is_file():
            return adapter / name
    raise UserError(f"--adapter_path {adapter}: no {' or '.join(ADAPTER_WEIGHTS)} in it; "
                    "point it at the folder that peft's save_pretrained wrote")


def check_adapter_folder(adapter: Path, model_name: str, base_config) -> dict:
    """Read the adapter's config and refuse one made for another kind of model."""
    if not adapter.is_dir():
        raise UserError(f"--adapter_path {adapter}: no such folder; give the folder with adapter_config.json")
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"--adapter_path {adapter}: no adapter_config.json; is this a peft adapter folder?")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_file}: not valid JSON ({exc}); the adapter folder is damaged") from None
    adapter_weights_file(adapter)
    recorded = config.get("base_model_name_or_path")
    if recorded and not _same_model(recorded, model_name):
        recorded_config = Path(recorded) / "config.json"
        recorded_type = None
        if recorded_config.is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError, UnicodeDecodeError):
                recorded_type = json.loads(recorded_config.read_text(encoding="utf-8")).get("model_type")
        if recorded_type and recorded_type != base_config.model_type:
            raise UserError(f"--adapter_path {adapter} was trained on {recorded} (a {recorded_type} model) but "
                            f"--model_name_or_path {model_name} is a {base_config.model_type} model; "
                            "load the base model the adapter was trained on")
        log.warning("the adapter records base model %s but --model_name_or_path is %s; "
                    "make sure this is the base it was trained on", recorded, model_name)
    return config


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def load_model(model_name: str, adapter_path: str | None = None, *, dtype: str = "auto",
               device_map: str | None = None, merge: bool = True, trust_remote_code: bool = False
               ) -> LoadedModel:
    """Tokenizer, base model and (optionally) LoRA adapter, checked and ready to generate."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if not model_name or not model_name.strip():
        raise UserError("--model_name_or_path is empty; give a model folder or a hub id")
    if (model_name.startswith((".", "/", "~")) or model_name.count("/") > 1) and not Path(model_name).expanduser().exists():
        raise UserError(f"--model_name_or_path {model_name}: no such folder; check the path")
    cuda = torch.cuda.is_available()
    dtype = resolve_dtype(dtype, cuda)
    if device_map is None and cuda:
        device_map = "auto"
    try:
        config = transformers.AutoConfig.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model_name_or_path {model_name}: cannot load its config "
                        f"({_first_line(exc)}){_hub_hint()}; give a folder with config.json or a hub id") from None
    adapter_config = None
    if adapter_path is not None:
        adapter_config = check_adapter_folder(Path(adapter_path), model_name, config)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"--model_name_or_path {model_name}: cannot load its tokenizer ({_first_line(exc)}); "
                        "the folder needs tokenizer files") from None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_name, dtype=getattr(torch, dtype), device_map=device_map, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model_name_or_path {model_name}: cannot load the model ({_first_line(exc)})"
                        f"{_hub_hint()}") from None
    model.eval()
    sha = None
    merged = False
    if adapter_path is not None:
        model, sha = _load_adapter(model, Path(adapter_path), model_name, adapter_config)
        if merge:
            model = model.merge_and_unload()
            merged = True
    device = _first_device(model)
    setup_padding(tokenizer, model)
    return LoadedModel(model, tokenizer, model_name, str(adapter_path) if adapter_path is not None else None,
                       sha, dtype, merged, device)


def _first_device(model):
    import torch

    device_map = getattr(model, "hf_device_map", None) or {}
    for place in device_map.values():
        if isinstance(place, int) or (isinstance(place, str) and place not in ("cpu", "disk")):
            return torch.device(place if not isinstance(place, int) else f"cuda:{place}")
    return next(model.parameters()).device


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _load_adapter(model, adapter: Path, model_name: str, adapter_config: dict):
    """PeftModel.from_pretrained, with peft's warnings about keys turned into errors."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from peft.utils.save_and_load import load_peft_weights

    weights_file = adapter_weights_file(adapter)
    if adapter_config.get("peft_type") not in (None, "LORA"):
        log.warning("the adapter is a %s adapter, not LoRA; it cannot be merged faster than it runs",
                    adapter_config.get("peft_type"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        except (ValueError, KeyError, RuntimeError) as exc:
            message = _first_line(exc)
            if "not found in the base model" in message or "size mismatch" in str(exc):
                raise UserError(f"--adapter_path {adapter} does not fit {model_name} ({message}); "
                                "it was made for another model: load the base it was trained on") from None
            raise UserError(f"--adapter_path {adapter}: cannot load it ({message})") from None
    for warning in caught:
        text = str(warning.message)
        if "missing adapter keys" in text or "unexpected" in text.lower() and "key" in text.lower():
            raise UserError(f"--adapter_path {adapter}: its weights do not match the base model's modules "
                            f"({text[:300]}); load the base it was trained on")
    # peft warns about missing keys only; unexpected ones it drops silently. Compare both.
    expected = set(get_peft_model_state_dict(peft_model).keys())
    found = set(load_peft_weights(str(adapter), device="cpu").keys())
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} expected keys missing, e.g. {missing[0]}")
        if unexpected:
            detail.append(f"{len(unexpected)} keys the base model has no place for, e.g. {unexpected[0]}")
        raise UserError(f"--adapter_path {adapter}: its weights do not match {model_name} ({'; '.join(detail)}); "
                        "it was made for another model: load the base it was trained on")
    return peft_model, sha256_file(weights_file)


def setup_padding(tokenizer, model) -> None:
    """Left padding and a pad token for batched generation (fallback: unk, then eos)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.unk_token_id is not None:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise UserError("the tokenizer has no pad, unk or eos token to pad batches with; add a pad token")


# --- generating --------------------------------------------------------------------


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


# Generation-config settings under which greedy ``generate`` only takes the argmax:
# anything else (a repetition penalty, banned words, forced tokens, ...) adds a logits
# processor, and then the engine calls ``generate`` itself.
_NEUTRAL_GENERATION = {"repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
                       "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
                       "bad_words_ids": (None,), "sequence_bias": (None,), "suppress_tokens": (None,),
                       "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
                       "forced_eos_token_id": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
                       "exponential_decay_length_penalty": (None,), "renormalize_logits": (None, False),
                       "watermarking_config": (None,), "forced_decoder_ids": (None,), "num_beams": (None, 1),
                       "guidance_scale": (None, 1.0), "low_memory": (None, False), "penalty_alpha": (None,),
                       "dola_layers": (None,), "assistant_model": (None,), "prompt_lookup_num_tokens": (None,)}


class FastGreedy(NamedTuple):
    """How the engine's own greedy loop calls a model (see ``_fast_greedy_inputs``)."""

    cache_key: str  # name of the KV-cache argument
    keep_key: str | None  # name of the logits_to_keep argument, if any
    decode_mask: str | None  # "bool" (sdpa) | "float" (eager): the loop builds decode masks itself


def _decode_mask_kind(base) -> str | None:
    """The 4D mask kind a decode step of ``base`` uses, when the loop can build it itself.

    For one new token of a causal model with full attention in every layer, the mask
    transformers builds is the padding mask (the query sees every earlier key): a boolean
    ``(rows, 1, 1, keys)`` tensor for sdpa, the same as 0 / dtype-minimum floats for eager.
    A prepared 4D mask is passed through as-is, which spares the per-step mask
    construction (about a fifth of a decode step on a small model). Sliding-window,
    chunked or bidirectional attention, and other attention kernels, keep transformers' masks.
    """
    config = base.config
    if not getattr(config, "is_causal", True) or getattr(config, "attention_chunk_size", None):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if any(kind != "full_attention" for kind in layer_types):
            return None
    elif getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return None
    return {"sdpa": "bool", "eager": "float"}.get(getattr(config, "_attn_implementation", None))


def _fast_greedy_inputs(model) -> FastGreedy | None:
    """How to call ``model`` in the engine's own greedy loop, when that loop computes
    exactly what ``model.generate`` would; else None.

    Only a decoder-only model whose inputs for generation are the standard ones (it
    does not override ``prepare_inputs_for_generation``) and whose generation config
    adds no logits processor qualifies (a PeftModel is judged by its base model).
    """
    import inspect

    from transformers import GenerationMixin

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or not isinstance(base, GenerationMixin):
        return None
    if type(base).prepare_inputs_for_generation is not GenerationMixin.prepare_inputs_for_generation:
        return None
    generation_config = getattr(base, "generation_config", None)
    for name, neutral in _NEUTRAL_GENERATION.items():
        if getattr(generation_config, name, None) not in neutral:
            return None
    try:
        parameters = set(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):
        return None
    if "position_ids" not in parameters or "attention_mask" not in parameters:
        return None
    cache_key = "cache" if "cache" in parameters else "past_key_values" if "past_key_values" in parameters else None
    if cache_key is None:
        return None
    # An unmerged PeftModel runs the LoRA pass through peft's forward: masks are the base's.
    return FastGreedy(cache_key, "logits_to_keep" if "logits_to_keep" in parameters else None,
                      _decode_mask_kind(base))


def cut_at_stop(text: str, stops: Iterable[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string (not included), and whether one was found."""
    best = None
    for stop in stops:
        pos = text.find(stop)
        if pos >= 0 and (best is None or pos < best):
            best = pos
    return (text, False) if best is None else (text[:best], True)


class Generator:
    """Generates batches of requests on a loaded model."""

    def __init__(self, loaded: LoadedModel, use_chat_template: str = "auto", fast_greedy: bool = True,
                 compile: bool = False):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.use_chat_template = use_chat_template
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        self.has_template = bool(getattr(self.tokenizer, "chat_template", None))
        # None: always use model.generate (asked for, or the model is not one the loop knows).
        self.fast_greedy = _fast_greedy_inputs(self.model) if fast_greedy else None
        if compile and self.fast_greedy is None:
            raise UserError("--compile compiles the engine's greedy decoding loop, which "
                            + ("--use_generate turns off: drop one of the two" if not fast_greedy else
                               f"{loaded.model_name} cannot use (its generation config adds a logits processor "
                               "or its inputs are not the standard ones): drop --compile"))
        self.compile = compile
        self._compiled = None  # the torch.compile'd model, built on first use
        self._compile_timed = [False, False]  # prefill, decode step: compile time logged once
        self._mask_dtype = self.model.get_input_embeddings().weight.dtype  # eager masks: the activations' dtype
        if use_chat_template == "always" and not self.has_template:
            raise UserError(f"--use_chat_template always: {loaded.model_name} has no chat template; "
                            "use --use_chat_template never or a tokenizer that has one")

    # -- prompts to token ids

    def wants_chat(self, request: Request) -> bool:
        """Conversations always use the chat template; plain text does when the tokenizer has
        one (auto), except /v1/completions batch lines, which are raw text by definition."""
        if request.messages is not None:
            if self.use_chat_template == "never":
                raise UserError(f"{request.where}: a conversation needs the chat template; "
                                "drop --use_chat_template never")
            return True
        if self.use_chat_template == "always":
            return True
        if self.use_chat_template == "never" or request.raw:
            return False
        return self.has_template

    def encode(self, request: Request) -> list[int]:
        """Token ids of the prompt; the chat template renders conversations, without a second BOS."""
        return self.encode_many([request])[0]

    def encode_many(self, requests: list[Request]) -> list[list[int]]:
        """``encode`` for each request, in one tokenizer call per kind of prompt: a fast
        tokenizer encodes a list in parallel, in one call from Python."""
        result: list[list[int] | None] = [None] * len(requests)
        plain, chat = [], []
        for pos, request in enumerate(requests):
            (chat if self.wants_chat(request) else plain).append(pos)
        if plain:
            encoded = self.tokenizer([requests[pos].text for pos in plain], add_special_tokens=True)["input_ids"]
            for pos, ids in zip(plain, encoded):
                result[pos] = ids
        if chat:
            # The rendered text already holds the template's BOS: add no second one.
            encoded = self.tokenizer([self._render_chat(requests[pos]) for pos in chat],
                                     add_special_tokens=False)["input_ids"]
            for pos, ids in zip(chat, encoded):
                result[pos] = ids
        return result

    def _render_chat(self, request: Request) -> str:
        if not self.has_template:
            raise UserError(f"{request.where}: {self.loaded.model_name} has no chat template, so it cannot "
                            "take a conversation; give plain text prompts (--prompt_field) or a tokenizer "
                            "with a chat template")
        messages = request.messages if request.messages is not None else [{"role": "user", "content": request.text}]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja errors, e.g. a template that refuses a system turn
            raise UserError(f"{request.where}: the chat template refused this conversation "
                            f"({_first_line(exc)})") from None

    def check_lengths(self, requests: list[Request], params: GenParams) -> None:
        """Warn (once per window) about prompts longer than the model's context allows."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if not isinstance(limit, int):
            return
        over = [r for r in requests if len(r.input_ids) + params.max_new_tokens > limit]
        if over:
            log.warning("%d prompts plus --max_new_tokens %d exceed the model's %d positions (first: %s, "
                        "%d prompt tokens); their output may be poor: shorten them or lower --max_new_tokens",
                        len(over), params.max_new_tokens, limit, over[0].where, len(over[0].input_ids))

    # -- one batch

    def generate_batch(self, batch_ids: list[list[int]], params: GenParams,
                       batch_seed: int | None = None) -> list[list[Sample]]:
        """Generate for a batch of token-id lists; per prompt, ``n`` samples in order.

        Sampling seeds torch's generator with ``batch_seed`` (default: ``params.seed``).
        """
        import torch

        tokenizer = self.tokenizer
        width = max(len(ids) for ids in batch_ids)
        with torch.inference_mode():  # inference tensors, as every later one (a compiled model sees one kind)
            input_ids = torch.full((len(batch_ids), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch_ids), width), dtype=torch.long)
            for row, ids in enumerate(batch_ids):
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids):] = 1
        n = params.num_return_sequences
        sampled_n = n if params.do_sample else 1
        if self.fast_greedy is not None and not params.do_sample and not params.stop:
            try:
                new_tokens = self._greedy(input_ids, attention, params.max_new_tokens)
            except Exception as exc:
                if not self.compile or is_oom(exc):
                    raise
                # A compiler failure (no C++ compiler, an unsupported op, ...) costs speed, not the run.
                log.warning("--compile: torch.compile failed (%s); decoding without it", _first_line(exc))
                self.compile = False
                new_tokens = self._greedy(input_ids, attention, params.max_new_tokens)
            return [[self._sample(tokens, params)] * n for tokens in new_tokens]
        kwargs = dict(max_new_tokens=params.max_new_tokens, do_sample=params.do_sample,
                      num_return_sequences=sampled_n, pad_token_id=self.pad_id,
                      eos_token_id=sorted(self.eos_ids) or None)
        if params.do_sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=tokenizer)
        if params.do_sample:
            torch.manual_seed(params.seed if batch_seed is None else batch_seed)
        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids.to(self.loaded.device),
                                         attention_mask=attention.to(self.loaded.device), **kwargs)
        new_tokens = output[:, width:].tolist()
        results: list[list[Sample]] = []
        for row in range(len(batch_ids)):
            samples = [self._sample(new_tokens[row * sampled_n + j], params) for j in range(sampled_n)]
            if sampled_n < n:
                samples = samples * n  # greedy decoding gives the same answer every time
            results.append(samples)
        return results

    def _greedy(self, input_ids, attention, max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding with the KV cache, without ``model.generate``'s per-step machinery.

        The same computation as ``generate(do_sample=False)`` for a model whose generation
        config adds no logits processor (``_fast_greedy_inputs`` checks): positions from
        the attention mask, a prefill that keeps only the last position's logits, then one
        token a step, argmax over float32 logits. A decode step gets the 4D mask
        transformers would build (see ``_decode_mask_kind``), made once a batch for all its
        steps (each step's is a view), and the KV cache writes in place
        (``datagen.kvcache``); EOS checks run on the tokens in Python, which the loop reads
        anyway: few tensor operations besides the model's a step. Rows
        that produced an EOS leave the batch at once (their KV cache rows are dropped), so
        a batch costs what its unfinished rows cost. With ``compile``, the prefill and the
        decode steps run through ``torch.compile`` (two graphs, shapes dynamic). Returns
        each row's new tokens, up to and including its EOS.
        """
        import torch

        with torch.inference_mode():  # every tensor an inference tensor: a compiled model sees one kind
            cache_key, keep_key, mask_kind = self.fast_greedy
            device = self.loaded.device
            input_ids, attention = input_ids.to(device), attention.to(device)
            rows, width = input_ids.shape
            positions = attention.cumsum(-1) - 1
            positions.masked_fill_(attention == 0, 0)
            eos_ids = self.eos_ids
            outputs: list[list[int]] = [[] for _ in range(rows)]
            alive = list(range(rows))  # batch row -> output row
            ended = [False] * rows  # per batch row (rows stay when the cache cannot drop them)
            extra = {keep_key: 1} if keep_key else {}
            model = self.model
            forward = self._forward_model()  # the model, or with compile the compiled model
            from datagen.kvcache import reserved_cache

            # None: the model makes its own cache.
            cache = reserved_cache(model.config, width, max_new_tokens, reserve_all=forward is not model)
            # The decode steps' masks, all built at once: the prompt's padding mask, then every
            # new key seen. Step k's mask is a view of the first width + k keys.
            full_attention = torch.cat([attention, attention.new_ones((rows, max_new_tokens))], dim=-1)
            full_mask = full_attention if mask_kind is None else self._decode_mask(full_attention, mask_kind)
            mask = attention
            step_ids = input_ids
            for step in range(max_new_tokens):
                timing = step < 2 and forward is not model and not self._compile_timed[step]
                start = time.monotonic()
                out = forward(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                              use_cache=True, **{cache_key: cache}, **extra)
                if timing:
                    self._compile_timed[step] = True
                    log.info("--compile: the first compiled %s took %.1f s", ("prefill", "decode step")[step],
                             time.monotonic() - start)
                cache = getattr(out, cache_key)
                token = out.logits[:, -1, :].float().argmax(-1).to(device)  # last layer may sit elsewhere
                values = token.tolist()
                for row, value in zip(alive, values):
                    outputs[row].append(value)
                if step + 1 == max_new_tokens:
                    break
                if eos_ids:
                    ended = [done or value in eos_ids for done, value in zip(ended, values)]
                    if True in ended:
                        keep = [row for row, done in enumerate(ended) if not done]
                        if not keep:
                            break
                        if hasattr(cache, "batch_select_indices"):  # else the ended rows run on, cut later
                            index = torch.tensor(keep)
                            cache.batch_select_indices(index)  # on CPU: layers may sit on several devices
                            index = index.to(device)
                            token, positions, full_attention = token[index], positions[index], full_attention[index]
                            full_mask = (full_attention if mask_kind is None else
                                         self._decode_mask(full_attention, mask_kind))
                            alive = [alive[row] for row in keep]
                            ended = [False] * len(keep)
                step_ids = token[:, None]
                positions = positions[:, -1:] + 1
                mask = full_mask[..., :width + step + 1]
            return outputs

    def _decode_mask(self, attention, kind: str):
        """The mask transformers builds for a decode step over ``attention`` (rows x keys).

        With no padding it is the 2D mask itself (transformers then needs none, or
        builds an all-zero one for eager); else a ``(rows, 1, 1, keys)`` tensor: True
        where a key is seen (sdpa), 0 there and the dtype's minimum elsewhere (eager).
        """
        import torch

        if bool(attention.all()):
            return attention
        seen = attention.bool()[:, None, None, :]
        if kind == "bool":
            return seen
        dtype = self._mask_dtype
        return torch.where(seen, torch.zeros((), device=seen.device, dtype=dtype), torch.finfo(dtype).min)

    def _forward_model(self):
        """The model the loop calls: the compiled one with ``compile``."""
        if not self.compile:
            return self.model
        if self._compiled is None:
            import torch

            log.info("--compile: compiling the model with torch.compile (once per process)")
            self._compiled = torch.compile(self.model, dynamic=True)
        return self._compiled

    def _sample(self, tokens: list[int], params: GenParams) -> Sample:
        """Tokens of one row into text: cut at the first EOS, then at the first stop string."""
        end = len(tokens)
        finish = "length"
        for pos, token in enumerate(tokens):
            if token in self.eos_ids:
                end, finish = pos + 1, "stop"
                break
        decode = lambda k: self.tokenizer.decode(tokens[:k], skip_special_tokens=True)  # noqa: E731
        text = decode(end)
        if params.stop:
            text, found = cut_at_stop(text, params.stop)
            if found:
                finish = "stop"
                # Completion tokens: the shortest prefix whose text holds the stop string.
                low, high = 1, end
                while low < high:
                    mid = (low + high) // 2
                    if cut_at_stop(decode(mid), params.stop)[1]:
                        high = mid
                    else:
                        low = mid + 1
                end = low
        return Sample(text, finish, end)


# --- the run -----------------------------------------------------------------------


@dataclass
class RunStats:
    total: int = 0  # requests in this shard
    skipped: int = 0  # already in the output
    done: int = 0  # generated in this run
    completion_tokens: int = 0
    prompt_tokens: int = 0
    pad_tokens: int = 0
    seconds: float = 0.0
    batch_size: int = 0  # the batch size in the end (after any halving)
    max_batch_tokens: int | None = 0  # the token budget in the end (0: none; None: auto)
    batches: int = 0  # batches generated


def read_done_ids(output: Path) -> set[str]:
    """custom_ids already in the output file (a torn last line is repaired first)."""
    done: set[str] = set()
    if not output.exists():
        return done
    cut = repair_torn_tail(output)
    if cut:
        log.warning("%s: removed a partial last line (%d bytes) left by a killed run", output, cut)
    for line_number, obj in iter_jsonl(output):
        if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
            raise UserError(f"{output}:{line_number}: not a generations record (no custom_id); "
                            "is --output_file the right file?")
        done.add(obj["custom_id"])
    return done


@contextlib.contextmanager
def exclusive(output: Path):
    """Hold a lock so two runs never append to the same file at once.

    The lock file beside the output is removed on release while still locked; a run
    that locked a file just removed that way notices (another inode) and tries again.
    """
    lock_path = output.with_name(f".{output.name}.lock")
    while True:
        handle = open(lock_path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"{output} is being written by another run (lock {lock_path}); "
                            "wait for it, or give another --output_file") from None
        try:
            if os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()
        handle.close()


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plan_batches(requests: list[Request], batch_size: int, max_new_tokens: int = 0,
                 max_batch_tokens: int | None = 0) -> list[list[Request]]:
    """Sort by prompt length (longest first, so an OOM shows early) and cut into batches.

    ``max_batch_tokens`` 0: batches of ``batch_size`` prompts. Otherwise a token budget
    (lm-eval-harness / vLLM style): a batch takes prompts while its rows times (its
    longest prompt + ``max_new_tokens``), the KV cache it holds at the end, stay within
    the budget, so short prompts go in bigger batches (at most ``BUDGET_ROWS_FACTOR`` x
    ``batch_size`` rows). ``None`` (auto): the budget is what ``batch_size`` rows of the
    window's longest prompt take, so no batch holds a larger KV cache than a plain
    batch of ``batch_size`` prompts would at its largest.
    """
    ordered = sorted(requests, key=lambda r: (-len(r.input_ids), r.index))
    if max_batch_tokens == 0 or not ordered:
        return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    if max_batch_tokens is None:
        max_batch_tokens = batch_size * (len(ordered[0].input_ids) + max_new_tokens)
    max_rows = BUDGET_ROWS_FACTOR * batch_size
    batches: list[list[Request]] = []
    current: list[Request] = []
    for request in ordered:
        width = len(current[0].input_ids) if current else len(request.input_ids)  # longest first
        if current and (len(current) >= max_rows or (len(current) + 1) * (width + max_new_tokens) > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(request)
    batches.append(current)
    return batches


def run_generation(generator: Generator, requests: Iterable[Request], output: Path, overrides: Overrides,
                   batch_size: int, *, ids: list[str] | None = None, reorder: bool = True,
                   show_progress: bool = True, max_batch_tokens: int | None = 0) -> RunStats:
    """Generate every request not yet in ``output``, appending one record per request.

    ``requests`` may be a stream (then ``ids``, its ``custom_id``s in order, must be
    given, as ``check_requests`` returns them); it is read ``SORT_WINDOW`` requests at a
    time, and each window is sorted by length into batches: of ``batch_size`` prompts, or
    by a token budget (``max_batch_tokens``; ``None``: auto, see ``plan_batches``).
    """
    from datagen.cli import progress

    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}")
    if max_batch_tokens is not None and max_batch_tokens < 0:
        raise UserError(f"--max_batch_tokens must be 0 (off), auto or a positive number, got {max_batch_tokens}")
    if ids is None:
        requests = list(requests)
        ids = [r.custom_id for r in requests]
    stats = RunStats(total=len(ids), batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    with exclusive(output):
        done_ids = read_done_ids(output)
        todo = sum(1 for custom_id in ids if custom_id not in done_ids)
        stats.skipped = len(ids) - todo
        if stats.skipped:
            log.info("resuming: %d of %d requests already in %s; %d to go", stats.skipped, len(ids), output, todo)
        started = time.monotonic()
        bar = progress(total=todo, desc="generating", unit="req", **({} if show_progress else {"disable": True}))
        warned: set = set()  # parameters already warned about
        try:
            with AppendJsonl(output) as sink:
                window: list[Request] = []
                for request in requests:
                    if request.custom_id in done_ids:
                        continue
                    window.append(request)
                    if len(window) >= SORT_WINDOW:
                        _run_window(generator, window, overrides, stats, sink, bar, started, warned)
                        window = []
                if window:
                    _run_window(generator, window, overrides, stats, sink, bar, started, warned)
        finally:
            bar.close()
            stats.seconds = time.monotonic() - started
        if reorder and todo:
            restore_input_order(output, ids)
    return stats


def _run_window(generator, window, overrides, stats, sink, bar, started, warned) -> None:
    """Group a window's requests by parameters (all equal in the usual case), then generate."""
    groups: dict[GenParams, list[Request]] = {}
    for request in window:
        groups.setdefault(effective_params(request, overrides), []).append(request)
    for params, group in groups.items():
        if params.num_return_sequences > 1 and not params.do_sample and params not in warned:
            warned.add(params)
            log.warning("requests ask for n=%d with greedy decoding: their samples are identical; "
                        "add --do_sample or a temperature above 0 for different samples", params.num_return_sequences)
        if generator.compile and (params.do_sample or params.stop) and ("compile", params) not in warned:
            warned.add(("compile", params))
            log.warning("--compile speeds up greedy decoding only: requests %s go through model.generate, "
                        "uncompiled", "that sample" if params.do_sample else "with stop strings")
        for request, ids in zip(group, generator.encode_many(group)):
            request.input_ids = ids
        generator.check_lengths(group, params)
        stats.batch_size = _run_group(generator, group, params, stats, sink, bar, started)
        for request in group:
            request.input_ids = None


def _run_group(generator, window, params, stats, sink, bar, started) -> int:
    loaded = generator.loaded
    record_params = params.record(loaded.dtype, loaded.merged)
    batch_size = stats.batch_size
    pending = plan_batches(window, batch_size, params.max_new_tokens, stats.max_batch_tokens)
    while pending:
        batch = pending.pop(0)
        try:
            results = generator.generate_batch([r.input_ids for r in batch], params,
                                               batch_seed(params.seed, [r.custom_id for r in batch]))
        except Exception as exc:
            if not is_oom(exc):
                raise
            _free_memory()
            if len(batch) == 1:
                raise UserError(f"{batch[0].where}: out of memory even at batch size 1 "
                                f"({len(batch[0].input_ids)} prompt tokens + {params.max_new_tokens} new); "
                                "lower --max_new_tokens, use --dtype bfloat16, or spread the model over "
                                "more GPUs with --device_map auto") from None
            # A token-budget batch can hold more than batch_size short prompts: halve what
            # failed, rows and budget alike.
            batch_size = max(1, min(batch_size, len(batch)) // 2)
            if stats.max_batch_tokens:
                failed = len(batch) * (max(len(r.input_ids) for r in batch) + params.max_new_tokens)
                stats.max_batch_tokens = max(1, min(stats.max_batch_tokens, failed) // 2)
            log.warning("out of memory at batch size %d; halving to %d", len(batch), batch_size)
            stats.batch_size = batch_size
            rest = [r for b in [batch] + pending for r in b]
            pending = plan_batches(rest, batch_size, params.max_new_tokens, stats.max_batch_tokens)
            continue
        now = int(time.time())
        width = max(len(r.input_ids) for r in batch)
        records = []
        for request, samples in zip(batch, results):
            records.append(make_record(request, samples, loaded, record_params, now))
            stats.completion_tokens += sum(s.completion_tokens for s in samples)
            stats.prompt_tokens += len(request.input_ids)
            stats.pad_tokens += width - len(request.input_ids)
        sink.write_many(records)
        stats.done += len(batch)
        stats.batches += 1
        elapsed = max(time.monotonic() - started, 1e-9)
        bar.set_postfix_str(f"{stats.completion_tokens / elapsed:,.0f} tok/s", refresh=False)
        bar.update(len(batch))
    return batch_size


def batch_seed(seed: int, custom_ids: list[str]) -> int:
    """A seed for one batch, from the run's seed and the batch's ids: the same batch samples
    the same way in every run, and different batches draw different random numbers."""
    digest = hashlib.sha256(f"{seed}\n{chr(10).join(custom_ids)}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_record(request: Request, samples: list[Sample], loaded: LoadedModel, generation: dict,
                created: int) -> dict:
    first = samples[0]
    record = {"custom_id": request.custom_id, "generated_text": first.text, "finish_reason": first.finish_reason,
              "prompt_tokens": len(request.input_ids), "completion_tokens": first.completion_tokens}
    if len(samples) > 1:
        record["samples"] = [{"text": s.text, "finish_reason": s.finish_reason,
                              "completion_tokens": s.completion_tokens} for s in samples]
    record.update(source="finetuned", model=loaded.model_name, adapter=loaded.adapter,
                  adapter_sha256=loaded.adapter_sha256, generation=generation, created=created)
    return record


def restore_input_order(output: Path, ids: list[str]) -> None:
    """Rewrite a finished output file in input order (atomic; only when every id is in it).

    Batches finish in length order; once all are done the file is put back in the
    input's order, holding only each line's offset in memory. Records whose id is not
    in this input (an earlier run on another input) are kept, at the end.
    """
    offsets: dict[str, int] = {}
    others: list[int] = []
    with open(output, "rb") as handle:
        position = 0
        for line in handle:
            if line.strip():
                custom_id = json.loads(line).get("custom_id")
                if custom_id in offsets:
                    others.append(position)
                else:
                    offsets[custom_id] = position
            position += len(line)
    if any(custom_id not in offsets for custom_id in ids):
        return  # not finished: leave the file as it is
    wanted = set(ids)
    order = [offsets[c] for c in ids] + sorted([pos for c, pos in offsets.items() if c not in wanted] + others)
    if order == sorted(order):
        return  # already in order
    with open(output, "rb") as source, atomic_writer(output, "wb") as target:
        for pos in order:
            source.seek(pos)
            target.write(source.readline())
