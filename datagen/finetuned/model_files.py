"""What a fine-tuned run knows from the model's and adapters' files, before any weights load.

``prepare`` checks and reads everything a run needs to refuse early, to resume and to
fingerprint its records, in seconds, so that a wrong path, a locked output, records made
by another adapter or a run with nothing left to do never wait for the weights:

- the base model: a name that looks like a local path and is missing, or (offline) a hub
  id not in the local cache, is one line at once; its config, tokenizer, resolved folder
  and hash (``records.model_sha256``);
- each adapter: its folder, ``adapter_config.json`` and weights file (hash), and its own
  tokenizer and chat template when the trainer saved them beside it (TRL, LlamaFactory,
  axolotl do): that adapter's prompts are rendered and its answers decoded with them.
  A tokenizer whose ids the base's input embeddings do not cover is refused, unless the
  adapter saved resized embeddings (peft ``modules_to_save`` / ``save_embedding_layers``)
  that do; an adapter whose LoRA B weights are all zero (saved before training) is
  warned about: it answers exactly like the base.

The engines (``datagen.finetuned.hf_model`` / ``engine_hf``, ``datagen.finetuned.engine_vllm``) then load the
weights from these checked files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datagen.finetuned import records
from datagen.common.errors import UserError, first_line
from datagen.common.jsonl import sha256_file
from datagen.finetuned.engine import BASE

log = logging.getLogger("datagen")

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# A tokenizer saved beside an adapter: any of these files (a chat template alone is
# applied to the base's tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# Input-embedding module names, as peft saves them (modules_to_save / save_embedding_layers).
EMBEDDING_NAMES = ("embed_tokens", "wte", "embed_in", "word_embeddings")


@dataclass
class Adapter:
    """One LoRA adapter of a run, as checked from its files."""

    name: str  # its name in the run (and in its output file's name)
    path: str  # as given
    sha256: str  # of its weights file
    config: dict  # its adapter_config.json
    tokenizer: Any = None  # its own tokenizer (None: the base's)
    tokenizer_source: str = ""  # what the log says about it
    embedding_rows: int | None = None  # rows of the resized input embeddings it saved, if any

    def digest(self) -> str:
        """The fingerprint's adapter part: config and weights together."""
        return records.digest([self.config, self.sha256])


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


def model_folder(model_name: str) -> Path:
    """The folder a model loads from: a local folder, or the hub cache's snapshot of its
    revision (whose name is the commit), resolved."""
    path = Path(model_name).expanduser()
    if path.is_dir():
        return path.resolve()
    from transformers.utils import cached_file

    return Path(cached_file(model_name, "config.json")).resolve().parent




# --- the base model's name -------------------------------------------------------------


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def looks_local(name: str) -> bool:
    """A name that can only be a local folder: ./ ../ / ~ first, more than one "org/name"
    separator, or a first part that exists here (``ckpt/final`` beside a ``ckpt`` folder)."""
    if name.startswith(("./", "../", "/", "~", ".\\")) or name in (".", ".."):
        return True
    parts = [part for part in name.replace(os.sep, "/").split("/") if part]
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).exists())


def hub_cache_dir() -> Path:
    """Where the Hugging Face hub cache is, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def check_model_name(model_name: str) -> None:
    """One line at once for a missing local folder, or (offline) a hub id not in the cache,
    instead of the hub's retries and a message that never says the folder is missing."""
    if not model_name or not model_name.strip():
        raise UserError("--model_name_or_path is empty; give a model folder or a hub id")
    if Path(model_name).expanduser().exists():
        return
    if looks_local(model_name):
        raise UserError(f"--model_name_or_path {model_name}: no such folder; check the path")
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        cache = hub_cache_dir()
        if not isinstance(try_to_load_from_cache(model_name, "config.json", cache_dir=cache), str):
            raise UserError(f"--model_name_or_path {model_name}: not in the local Hugging Face cache ({cache}) "
                            f"and the hub is offline (HF_HUB_OFFLINE=1); download it on a node with network "
                            f"(hf download {model_name}), or set HF_HOME to the cache that holds it")


def load_config(model_name: str, trust_remote_code: bool = False):
    import transformers

    check_model_name(model_name)
    try:
        return transformers.AutoConfig.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model_name_or_path {model_name}: cannot load its config "
                        f"({first_line(exc)}){_hub_hint()}; give a folder with config.json or a hub id") from None


def load_tokenizer(source: str, flag: str, trust_remote_code: bool = False):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{flag} {source}: cannot load its tokenizer ({first_line(exc)}); "
                        "the folder needs tokenizer files") from None


# --- the adapter's own tokenizer, embeddings and weights ----------------------------------


def _adapter_tensors(weights: Path):
    """(name -> shape, a function reading one tensor) of an adapter's weights file, without
    loading the whole file where it is safetensors."""
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        handle = safe_open(str(weights), framework="pt")
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}, handle.get_tensor
    import torch

    state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    return {key: tuple(value.shape) for key, value in state.items()}, state.__getitem__


def saved_embedding_rows(shapes: dict) -> int | None:
    """Rows of the input embeddings an adapter saved in full (resized), else None."""
    rows = [shape[0] for key, shape in shapes.items()
            if len(shape) == 2 and "lora_" not in key
            and any(key.endswith(f"{name}.weight") for name in EMBEDDING_NAMES)]
    return max(rows) if rows else None


def untrained(shapes: dict, read) -> bool:
    """Whether every LoRA B weight is zero (peft initialises B to zero: saved before training)."""
    keys = [key for key in shapes if "lora_B" in key]
    return bool(keys) and all(not bool(read(key).count_nonzero()) for key in keys)


def adapter_tokenizer(folder: Path, base_tokenizer, trust_remote_code: bool = False):
    """(tokenizer, what it is) for an adapter folder: its own tokenizer when saved beside it,
    the base's with the folder's chat template when only that is there, else (None, ...)."""
    own = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    template = [name for name in TEMPLATE_FILES if (folder / name).is_file()]
    if own:
        tokenizer = load_tokenizer(str(folder), "--adapter_path", trust_remote_code)
        said = "tokenizer and chat template" if tokenizer.chat_template else "tokenizer (no chat template)"
        return tokenizer, f"{said} from {folder} (adapter)"
    if template:
        tokenizer = load_tokenizer(base_tokenizer.name_or_path, "--model_name_or_path", trust_remote_code)
        text = (folder / template[0]).read_text(encoding="utf-8")
        if template[0].endswith(".json"):
            with contextlib.suppress(json.JSONDecodeError):
                text = json.loads(text).get("chat_template", text)
        tokenizer.chat_template = text
        return tokenizer, f"chat template from {folder / template[0]} (adapter), the base's tokenizer"
    return None, ""


def vocabulary_end(tokenizer) -> int:
    """One past the largest token id the tokenizer can produce (added tokens included)."""
    return max(max(tokenizer.get_vocab().values(), default=-1) + 1, len(tokenizer))


def check_vocabulary(adapter: Adapter, model_name: str, rows: int) -> None:
    """Refuse an adapter tokenizer whose ids the base's input embeddings (or the resized
    ones the adapter saved) do not cover."""
    if adapter.tokenizer is None:
        return
    end = vocabulary_end(adapter.tokenizer)
    covered = max(rows, adapter.embedding_rows or 0)
    if end > covered:
        raise UserError(f"--adapter_path {adapter.path}: its tokenizer has token ids up to {end - 1} (added tokens "
                        f"included) but {model_name}'s input embeddings have {rows} rows and the adapter saved no "
                        "resized embeddings that cover them; save the adapter with its resized embed_tokens and "
                        "lm_head (peft modules_to_save or save_embedding_layers=True), or remove the tokenizer "
                        "files from the adapter folder to use the base's")


def check_adapter(name: str, path: str, model_name: str, config, base_tokenizer,
                  trust_remote_code: bool = False) -> Adapter:
    """An adapter's files checked: config, weights, tokenizer and vocabulary, untrained B."""
    folder = Path(path)
    adapter_config = check_adapter_folder(folder, model_name, config)
    weights = adapter_weights_file(folder)
    try:
        shapes, read = _adapter_tensors(weights)
    except Exception as exc:  # a truncated or damaged weights file
        raise UserError(f"--adapter_path {path}: cannot read {weights.name} ({first_line(exc)}); "
                        "the adapter folder is damaged") from None
    tokenizer, source = adapter_tokenizer(folder, base_tokenizer, trust_remote_code)
    adapter = Adapter(name, str(path), sha256_file(weights), adapter_config, tokenizer, source,
                      saved_embedding_rows(shapes))
    rows = getattr(config.get_text_config(), "vocab_size", None) if hasattr(config, "get_text_config") else None
    if isinstance(rows, int):
        check_vocabulary(adapter, model_name, rows)
    if untrained(shapes, read):
        log.warning("adapter %s (%s): every LoRA B weight is zero (saved before training?): it answers exactly "
                    "like the base model", name, path)
    return adapter


# --- the whole run's files -----------------------------------------------------------------


@dataclass
class ModelFiles:
    """The checked files of a run: base config and tokenizer, folder and hash, adapters."""

    model_name: str
    config: Any
    tokenizer: Any  # the base model's
    model_path: str
    model_sha256: str
    adapters: dict  # name -> Adapter

    def tokenizer_for(self, adapter: str | None):
        """The tokenizer that renders, tokenizes and decodes for ``adapter`` (None: the base)."""
        own = self.adapters[adapter].tokenizer if adapter is not None else None
        return own if own is not None else self.tokenizer

    def provenance(self, adapter: str | None, engine: dict) -> records.Provenance:
        info = self.adapters[adapter] if adapter is not None else None
        return records.Provenance(self.model_name, self.model_path, self.model_sha256,
                                  info.path if info else None, info.sha256 if info else None,
                                  info.digest() if info else None, engine, run=adapter if info else BASE)

    def tokenizer_origin(self, adapter: str | None) -> str:
        """Where ``adapter``'s tokenizer and chat template come from, in words, for the log."""
        info = self.adapters[adapter] if adapter is not None else None
        if info is not None and info.tokenizer is not None:
            return info.tokenizer_source
        has = "tokenizer and chat template" if self.tokenizer.chat_template else "tokenizer (no chat template)"
        return f"{has} from {self.model_name} (base)"


def prepare(model_name: str, adapters: dict[str, str] | None = None, *,
            trust_remote_code: bool = False) -> ModelFiles:
    """Check and read every file of the run except the model's weights (see the module doc)."""
    adapters = adapters or {}
    check_model_name(model_name)
    for path in adapters.values():  # a typo in a path: one line before anything loads
        if not Path(path).expanduser().is_dir():
            raise UserError(f"--adapter_path {path}: no such folder; give the folder with adapter_config.json")
    config = load_config(model_name, trust_remote_code)
    tokenizer = load_tokenizer(model_name, "--model_name_or_path", trust_remote_code)
    checked = {name: check_adapter(name, path, model_name, config, tokenizer, trust_remote_code)
               for name, path in adapters.items()}
    folder = model_folder(model_name)
    return ModelFiles(model_name, config, tokenizer, str(folder), records.model_sha256(folder), checked)
