"""A KV cache with room reserved for a whole batch's generation (used by the greedy loop).

transformers' ``DynamicCache`` grows each layer's keys and values with ``torch.cat`` at
every decode step: a copy of the whole cache per token, which on long prompts costs more
than the step's attention. ``reserved_cache`` gives a ``DynamicCache`` whose layers
reserve room (the prompt plus ``RESERVE_NEW`` tokens) and write each new token in
place; when the room is full it doubles, never beyond the batch's final length (its
widest prompt + ``max_new_tokens``, which the engine's token budget already plans
for), so short answers under a large ``max_new_tokens`` do not hold memory they never
use. The model sees the same keys and values (views of the first ``length``
positions), so the output is identical; rows dropped from the batch are dropped from
the buffers.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


RESERVE_NEW = 128  # new tokens a batch has room for before its cache first grows


class ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes into buffers of ``capacity`` positions instead of
    concatenating; a full buffer doubles, up to ``limit`` positions (None: no limit)."""

    def __init__(self, capacity: int, limit: int | None = None):
        super().__init__()
        self.capacity = capacity
        self.limit = limit
        self.length = 0
        self._keys = self._values = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._keys = key_states.new_empty((*key_states.shape[:2], self.capacity, key_states.shape[3]))
        self._values = value_states.new_empty((*value_states.shape[:2], self.capacity, value_states.shape[3]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:  # full: grow, in few copies rather than one per token
            self.capacity = max(end, 2 * self.capacity if self.limit is None else min(self.limit, 2 * self.capacity))
            keys, values = self._keys[:, :, :self.length], self._values[:, :, :self.length]
            self.lazy_initialization(key_states, value_states)
            self._keys[:, :, :self.length], self._values[:, :, :self.length] = keys, values
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            indices = indices.to(self._keys.device)
            self._keys, self._values = self._keys[indices], self._values[indices]
            self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]

    def reset(self) -> None:
        self.length = 0
        self._keys = self._values = None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized and tokens_to_remove < 0:
            self.length = max(0, self.length + tokens_to_remove)
            self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]


def reserved_cache(config, prompt_width: int, max_new_tokens: int, reserve_all: bool = False) -> DynamicCache | None:
    """A ``DynamicCache`` for ``config`` whose layers reserve room for a batch of prompts
    ``prompt_width`` tokens wide, or None when the model's cache has other kinds of layers
    (sliding windows, linear attention, ...). ``reserve_all``: room for every new token at
    once (a compiled model then sees one buffer layout per batch, not a recompile per growth)."""
    cache = DynamicCache(config=config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    final = prompt_width + max_new_tokens
    first = final if reserve_all else min(final, prompt_width + RESERVE_NEW)
    cache.layers = [ReservedLayer(first, final) for _ in cache.layers]
    return cache
