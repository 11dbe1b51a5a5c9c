"""Loading a Hugging Face base model with its LoRA adapter, checked, for the Hugging Face engine.

``load_model`` loads the tokenizer and the base model (``dtype``, ``device_map``,
``trust_remote_code`` only when asked), then the LoRA adapter with checks that turn
peft's warnings into errors: the adapter's keys must match the base model's modules
exactly; an adapter recorded for another base is reported (and refused when that base
is a local folder of another architecture). The adapter is merged into the weights
(``merge_and_unload``) unless asked not to. It also works out the run's provenance
(``records.Provenance``): the model's resolved folder and hash, the adapter's hashes,
the engine settings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen import records
from datagen.errors import UserError, first_line
from datagen.records import sha256_file

log = logging.getLogger("datagen")

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


# --- loading the model -------------------------------------------------------------


@dataclass
class Adapter:
    """One LoRA adapter of a run, as checked and loaded."""

    name: str  # its name in the run (and in its output file's name)
    path: str  # as given
    sha256: str  # of its weights file
    config: dict  # its adapter_config.json

    def digest(self) -> str:
        """The fingerprint's adapter part: config and weights together."""
        return records.digest([self.config, self.sha256])


@dataclass
class LoadedModel:
    model: Any  # the base model, a PeftModel holding the adapters, or the base with one adapter merged
    tokenizer: Any
    model_name: str  # as given
    dtype: str  # "float32", "bfloat16", "float16"
    merged: bool
    device: Any  # where inputs go
    adapters: dict[str, Adapter] = field(default_factory=dict)
    model_path: str = ""  # the folder it loaded from, resolved
    model_sha256: str = ""

    @property
    def adapter_name(self) -> str | None:
        """The one adapter's name (None: none, or several)."""
        return next(iter(self.adapters)) if len(self.adapters) == 1 else None

    @property
    def adapter(self) -> str | None:
        return self.adapters[self.adapter_name].path if self.adapter_name else None

    @property
    def adapter_sha256(self) -> str | None:
        return self.adapters[self.adapter_name].sha256 if self.adapter_name else None

    def provenance(self, adapter: str | None) -> records.Provenance:
        """What makes the records answered with ``adapter`` (None: the base model alone)."""
        import torch
        import transformers

        engine = {"name": "hf", "dtype": self.dtype, "merged": self.merged,
                  "transformers": transformers.__version__, "torch": torch.__version__}
        info = self.adapters[adapter] if adapter is not None else None
        return records.Provenance(self.model_name, self.model_path, self.model_sha256,
                                  info.path if info else None, info.sha256 if info else None,
                                  info.digest() if info else None, engine)


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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"{config_file}: not valid JSON ({exc}); the adapter folder is damaged") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file}: holds a JSON {type(config).__name__}, not an object; "
                        "the adapter folder is damaged (save the adapter again with save_pretrained)")
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


def load_model(model_name: str, adapters: dict[str, str] | str | None = None, *, dtype: str = "auto",
               device_map: str | None = None, merge: bool = True, trust_remote_code: bool = False,
               with_base: bool = False) -> LoadedModel:
    """Tokenizer, base model and LoRA adapters (``{name: path}``, or one path), checked and
    ready to generate. One adapter is merged into the weights (``merge``) unless the base
    model must answer too (``with_base``); several are loaded side by side into one
    PeftModel over one copy of the base, and switched per batch."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if isinstance(adapters, (str, os.PathLike)):
        adapters = {Path(adapters).name: str(adapters)}
    adapters = adapters or {}
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
                        f"({first_line(exc)}){_hub_hint()}; give a folder with config.json or a hub id") from None
    configs = {name: check_adapter_folder(Path(path), model_name, config) for name, path in adapters.items()}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"--model_name_or_path {model_name}: cannot load its tokenizer ({first_line(exc)}); "
                        "the folder needs tokenizer files") from None
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
    loaded_adapters: dict[str, Adapter] = {}
    for name, path in adapters.items():
        started = time.monotonic()
        model, sha = _load_adapter(model, Path(path), model_name, configs[name], name)
        loaded_adapters[name] = Adapter(name, str(path), sha, configs[name])
        log.info("adapter %s (%s) loaded and checked in %.1f s", name, path, time.monotonic() - started)
    merged = False
    if len(adapters) == 1 and merge and not with_base:
        started = time.monotonic()
        model = model.merge_and_unload()
        merged = True
        log.info("adapter merged into the weights in %.1f s", time.monotonic() - started)
    elif len(adapters) > 1 and merge:
        log.info("%d adapters: kept as separate LoRA passes over one base (merging holds one at a time)",
                 len(adapters))
    device = _first_device(model)
    setup_padding(tokenizer, model)
    folder = model_folder(model_name)
    return LoadedModel(model, tokenizer, model_name, dtype, merged, device, loaded_adapters,
                       str(folder), records.model_sha256(folder))


def model_folder(model_name: str) -> Path:
    """The folder a model loads from: a local folder, or the hub cache's snapshot of its
    revision (whose name is the commit), resolved."""
    path = Path(model_name).expanduser()
    if path.is_dir():
        return path.resolve()
    from transformers.utils import cached_file

    return Path(cached_file(model_name, "config.json")).resolve().parent


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


def _load_adapter(model, adapter: Path, model_name: str, adapter_config: dict, name: str = "default"):
    """PeftModel.from_pretrained (or, on a PeftModel, ``load_adapter``) under ``name``, with
    peft's warnings about keys turned into errors."""
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
    for warning in caught:
        text = str(warning.message)
        if "missing adapter keys" in text or "unexpected" in text.lower() and "key" in text.lower():
            raise UserError(f"--adapter_path {adapter}: its weights do not match the base model's modules "
                            f"({text[:300]}); load the base it was trained on")
    # peft warns about missing keys only; unexpected ones it drops silently. Compare both.
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
