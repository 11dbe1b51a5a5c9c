"""Loading a Hugging Face base model with its LoRA adapters, checked, for the Hugging Face engine.

``load_model`` takes the run's files as ``datagen.finetuned.model_files.prepare`` checked them
(config, tokenizers, adapters; it prepares them itself when not given), loads the base
model (``dtype``, ``device_map``, ``trust_remote_code`` only when asked), then each LoRA
adapter with checks that turn peft's warnings into errors: the adapter's keys must match
the base model's modules exactly. An adapter that saved resized embeddings (its own
tokenizer adds tokens) gets the base's embeddings resized to them first, as peft
requires. One adapter is merged into the weights (``merge_and_unload``) unless asked not
to. ``engine_identity`` is the engine part of the records' provenance, known before
loading, so a run checks its resume fingerprints without the weights.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datagen.finetuned import records
from datagen.common.errors import UserError, first_line
from datagen.finetuned.model_files import ModelFiles, _hub_hint, adapter_weights_file, prepare, resolve_dtype
from datagen.common.jsonl import sha256_file

log = logging.getLogger("datagen")


# --- loading the model -------------------------------------------------------------


# How the Hugging Face engine decodes and seeds: model.generate, one random stream per batch
# seeded from its requests' seeds (so a sampled answer depends on the batch it ran in).
DECODING = "hf-generate/batch-seed"


def engine_identity(dtype: str, merged: bool) -> dict:
    """The Hugging Face engine's part of a record's provenance (name, dtype, merged, how it
    decodes and seeds, versions)."""
    import torch
    import transformers

    return {"name": "hf", "dtype": dtype, "merged": merged, "decoding": DECODING,
            "transformers": transformers.__version__, "torch": torch.__version__}


def will_merge(adapters, merge: bool, with_base: bool) -> bool:
    """One adapter is merged into the weights unless the base model answers too."""
    return len(adapters) == 1 and merge and not with_base


@dataclass
class LoadedModel:
    model: Any  # the base model, a PeftModel holding the adapters, or the base with one adapter merged
    files: ModelFiles  # config, tokenizers, adapters, folder and hash
    dtype: str  # "float32", "bfloat16", "float16"
    merged: bool
    device: Any  # where inputs go

    @property
    def tokenizer(self):
        return self.files.tokenizer

    @property
    def model_name(self) -> str:
        return self.files.model_name

    @property
    def adapters(self) -> dict:
        return self.files.adapters

    def provenance(self, adapter: str | None) -> records.Provenance:
        """What makes the records answered with ``adapter`` (None: the base model alone)."""
        return self.files.provenance(adapter, engine_identity(self.dtype, self.merged))


def load_model(model_name: str, adapters: dict[str, str] | str | None = None, *, dtype: str = "auto",
               device_map: str | None = None, merge: bool = True, trust_remote_code: bool = False,
               with_base: bool = False, files: ModelFiles | None = None) -> LoadedModel:
    """Base model and LoRA adapters (``{name: path}``, or one path), checked and ready to
    generate. One adapter is merged into the weights (``merge``) unless the base model must
    answer too (``with_base``); several are loaded side by side into one PeftModel over
    one copy of the base, and switched per batch."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if isinstance(adapters, (str, os.PathLike)):
        adapters = {Path(adapters).name: str(adapters)}
    if files is None:
        files = prepare(model_name, adapters or {}, trust_remote_code=trust_remote_code)
    cuda = torch.cuda.is_available()
    dtype = resolve_dtype(dtype, cuda)
    if device_map is None and cuda:
        device_map = "auto"
    rows = resized_rows(files, with_base)
    model = _load_base(model_name, dtype, device_map, trust_remote_code)
    if rows:
        model.resize_token_embeddings(rows, mean_resizing=False)  # the adapter's saved rows replace them
    for name, info in files.adapters.items():
        started = time.monotonic()
        model, sha = _load_adapter(model, Path(info.path), model_name, info.config, peft_name(name))
        if sha != info.sha256:
            raise UserError(f"--adapter_path {info.path}: its weights changed while the run started; run again")
        log.info("adapter %s (%s) loaded and checked in %.1f s", name, info.path, time.monotonic() - started)
    merged = will_merge(files.adapters, merge, with_base)
    if merged:
        started = time.monotonic()
        model = model.merge_and_unload()
        log.info("adapter merged into the weights in %.1f s", time.monotonic() - started)
    elif len(files.adapters) > 1 and merge:
        log.info("%d adapters: kept as separate LoRA passes over one base (merging holds one at a time)",
                 len(files.adapters))
    device = _first_device(model)
    setup_padding(files.tokenizer, model)
    return LoadedModel(model, files, dtype, merged, device)


def _load_base(model_name: str, dtype: str, device_map: str | None, trust_remote_code: bool):
    """The base model's weights, in eval mode; a folder that cannot load is one line."""
    import torch
    import transformers

    started = time.monotonic()
    log.info("loading the base model %s (%s) ...", model_name, dtype)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_name, dtype=getattr(torch, dtype), device_map=device_map, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, _SafetensorError) as exc:
        raise UserError(f"--model_name_or_path {model_name}: cannot load the model ({first_line(exc)})"
                        f"{_hub_hint()}") from None
    model.eval()
    log.info("base model loaded in %.1f s (%.0fM parameters)", time.monotonic() - started,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def resized_rows(files: ModelFiles, with_base: bool) -> int | None:
    """The embedding rows to resize the base to before loading an adapter that saved resized
    embeddings (None: no resizing). Such an adapter runs alone: the resized base would no
    longer be the base model for the other runs."""
    resized = {name: info.embedding_rows for name, info in files.adapters.items()
               if info.embedding_rows and info.embedding_rows != files.config.get_text_config().vocab_size}
    if not resized:
        return None
    if with_base or len(files.adapters) > 1:
        name = next(iter(resized))
        raise UserError(f"--adapter_path {files.adapters[name].path}: it saved resized embeddings "
                        f"({resized[name]} rows), which change the base model for every run that shares it; "
                        "run this adapter on its own (without --with_base or other adapters)")
    return next(iter(resized.values()))


try:  # a truncated or damaged .safetensors file
    from safetensors import SafetensorError as _SafetensorError
except ImportError:  # pragma: no cover
    _SafetensorError = ValueError


def _first_device(model):
    import torch

    device_map = getattr(model, "hf_device_map", None) or {}
    for place in device_map.values():
        if isinstance(place, int) or (isinstance(place, str) and place not in ("cpu", "disk")):
            return torch.device(place if not isinstance(place, int) else f"cuda:{place}")
    return next(model.parameters()).device


def peft_name(name: str) -> str:
    """The name peft keeps an adapter under: a run's NAME may hold dots (``v1.2``), which
    torch module names cannot."""
    return name.replace(".", "_dot_")


def _load_adapter(model, adapter: Path, model_name: str, adapter_config: dict, name: str = "default"):
    """PeftModel.from_pretrained (or, on a PeftModel, ``load_adapter``) under ``name``; weights
    that do not fit the base (missing or extra keys) are one error naming them."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from peft.utils.save_and_load import load_peft_weights

    weights_file = adapter_weights_file(adapter)
    if adapter_config.get("peft_type") not in (None, "LORA"):
        log.warning("the adapter is a %s adapter, not LoRA; it cannot be merged faster than it runs",
                    adapter_config.get("peft_type"))
    with warnings.catch_warnings():
        # peft's key warnings differ between releases (0.22 lists every loaded adapter's keys):
        # the check below says what does not fit, in one line.
        warnings.simplefilter("ignore")
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(str(adapter), adapter_name=name, is_trainable=False)
                peft_model = model
            else:
                peft_model = PeftModel.from_pretrained(model, str(adapter), adapter_name=name, is_trainable=False)
        except (ValueError, KeyError, RuntimeError, OSError, _SafetensorError) as exc:
            message = first_line(exc)
            if "not found in the base model" in message or "size mismatch" in str(exc):
                raise UserError(f"--adapter_path {adapter} does not fit {model_name} ({message}); "
                                "it was made for another model: load the base it was trained on") from None
            raise UserError(f"--adapter_path {adapter}: cannot load it ({message})") from None
    # This adapter's keys in the model against the keys in its file, both ways.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True ...": resized embeddings, expected
        expected = set(get_peft_model_state_dict(peft_model, adapter_name=name).keys())
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
