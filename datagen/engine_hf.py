"""The Hugging Face engine: batches of prompt token ids into samples, on a loaded model.

Greedy batches run in the engine's own decoding loop over the KV cache
(``datagen.kvcache``): the same argmax as ``model.generate(do_sample=False)`` for a model
whose generation config adds no logits processor (``_fast_greedy_inputs`` checks), without
its per-step machinery, dropping rows as they finish; ``--compile`` runs the loop's model
calls through ``torch.compile``. Sampling, stop strings and other models go through
``model.generate``. Stop strings are cut from the text, and completion tokens counted up to
the stop.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterable, NamedTuple

from datagen.engine import GenParams, Sample
from datagen.errors import UserError, first_line
from datagen.hf_model import LoadedModel

log = logging.getLogger("datagen")


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


class HFEngine:
    """Generates batches of prompt token ids on a loaded Hugging Face model (the engine
    protocol of ``datagen.engine``)."""

    name = "hf"

    def __init__(self, loaded: LoadedModel, fast_greedy: bool = True, compile: bool = False):
        self.loaded = loaded
        self.files = loaded.files  # config, tokenizers (the base's and each adapter's), adapters
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
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

    @property
    def context_length(self) -> int | None:
        """Positions the model takes, prompt and new tokens together (None: unknown)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        return limit if isinstance(limit, int) and limit > 0 else None

    @property
    def model_name(self) -> str:
        return self.loaded.model_name

    @property
    def adapters(self) -> list[str | None]:
        """What can answer: each adapter by name, and the base model (None) unless an adapter
        is merged into it."""
        names: list[str | None] = list(self.loaded.adapters)
        return names if self.loaded.merged else names + [None]

    def provenance(self, adapter: str | None):
        return self.loaded.provenance(adapter)

    def tokenizer_for(self, adapter: str | None):
        """The tokenizer of ``adapter``'s prompts and answers: its own, else the base's."""
        return self.loaded.files.tokenizer_for(adapter)

    def _eos_for(self, tokenizer) -> set[int]:
        return self.eos_ids if tokenizer is self.tokenizer else _eos_ids(self.model, tokenizer)

    def warning_for(self, params: GenParams) -> str | None:
        """Said once per set of parameters: --compile does not reach sampling or stop strings."""
        if self.compile and (params.do_sample or params.stop):
            return ("--compile speeds up greedy decoding only: requests "
                    f"{'that sample' if params.do_sample else 'with stop strings'} go through model.generate, "
                    "uncompiled")
        return None

    def generate(self, prompts: list[list[int]], params: GenParams, adapters: list[str | None],
                 seed: int) -> list[list[Sample]]:
        """The engine protocol (``datagen.engine.Engine``): each prompt answered by its adapter
        (None: the base model); prompts of one adapter go through the model together."""
        results: list[list[Sample] | None] = [None] * len(prompts)
        for adapter in dict.fromkeys(adapters):
            rows = [i for i, name in enumerate(adapters) if name == adapter]
            with self._using(adapter):
                answers = self.generate_batch([prompts[i] for i in rows], params, seed, adapter)
            for i, samples in zip(rows, answers):
                results[i] = samples
        return results

    @contextlib.contextmanager
    def _using(self, adapter: str | None):
        """Switch the PeftModel to ``adapter``, or turn the adapters off for the base model."""
        if adapter not in self.adapters:
            raise ValueError(f"{adapter!r} is not one of this engine's adapters {self.adapters}")
        if self.loaded.merged or not self.loaded.adapters:
            yield
        elif adapter is None:
            with self.model.disable_adapter():
                yield
        else:
            if self.model.active_adapter != adapter:
                self.model.set_adapter(adapter)
            yield

    # -- one batch

    def generate_batch(self, batch_ids: list[list[int]], params: GenParams,
                       batch_seed: int | None = None, adapter: str | None = None) -> list[list[Sample]]:
        """Generate for a batch of token-id lists; per prompt, ``n`` samples in order.

        Sampling seeds torch's generator with ``batch_seed`` (default: ``params.seed``).
        ``adapter``'s tokenizer (its own, else the base's) decodes, and its EOS ends a row.
        """
        import torch

        tokenizer = self.tokenizer_for(adapter)
        eos_ids = self._eos_for(tokenizer)
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
                new_tokens = self._greedy(input_ids, attention, params.max_new_tokens, eos_ids)
            except Exception as exc:
                if not self.compile or is_oom(exc):
                    raise
                # A compiler failure (no C++ compiler, an unsupported op, ...) costs speed, not the run.
                log.warning("--compile: torch.compile failed (%s); decoding without it", first_line(exc))
                self.compile = False
                new_tokens = self._greedy(input_ids, attention, params.max_new_tokens, eos_ids)
            return [[self._sample(tokens, params, tokenizer, eos_ids)] * n for tokens in new_tokens]
        kwargs = dict(max_new_tokens=params.max_new_tokens, do_sample=params.do_sample,
                      num_return_sequences=sampled_n, pad_token_id=self.pad_id,
                      eos_token_id=sorted(eos_ids) or None)
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
            samples = [self._sample(new_tokens[row * sampled_n + j], params, tokenizer, eos_ids)
                       for j in range(sampled_n)]
            if sampled_n < n:
                samples = samples * n  # greedy decoding gives the same answer every time
            results.append(samples)
        return results

    def _greedy(self, input_ids, attention, max_new_tokens: int, eos_ids: set[int] | None = None) -> list[list[int]]:
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
            eos_ids = self.eos_ids if eos_ids is None else eos_ids
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

    def _sample(self, tokens: list[int], params: GenParams, tokenizer=None, eos_ids=None) -> Sample:
        """Tokens of one row into text: cut at the first EOS, then at the first stop string."""
        tokenizer = tokenizer or self.tokenizer
        eos_ids = self.eos_ids if eos_ids is None else eos_ids
        end = len(tokens)
        finish = "length"
        for pos, token in enumerate(tokens):
            if token in eos_ids:
                end, finish = pos + 1, "stop"
                break
        decode = lambda k: tokenizer.decode(tokens[:k], skip_special_tokens=True)  # noqa: E731
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
        return Sample(text, finish, end, list(tokens[:end]))




def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
