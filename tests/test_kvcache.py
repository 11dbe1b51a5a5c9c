"""The greedy loop's reserved KV cache holds exactly what transformers' DynamicCache holds."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.cache_utils import DynamicLayer

from datagen import kvcache

SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=2, vocab_size=64)


def states(rows, length, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 2, length, 8, generator=generator),
            torch.randn(rows, 2, length, 8, generator=generator))


@pytest.mark.parametrize("capacity,limit", [(12, None), (3, None), (6, 11)])  # room; it grows; up to a limit
def test_reserved_layer_matches_dynamic_layer(capacity, limit):
    reserved, dynamic = kvcache.ReservedLayer(capacity, limit), DynamicLayer()
    steps = [states(4, 5, 0)] + [states(4, 1, seed) for seed in range(1, 5)]
    for key, value in steps:
        got, want = reserved.update(key, value), dynamic.update(key, value)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert reserved.get_seq_length() == dynamic.get_seq_length()
    keep = torch.tensor([0, 2, 3])
    reserved.batch_select_indices(keep)
    dynamic.batch_select_indices(keep)
    key, value = states(3, 1, 9)
    got, want = reserved.update(key, value), dynamic.update(key, value)
    assert all(torch.equal(g, w) for g, w in zip(got, want)) and got[0].shape == (3, 2, 10, 8)
    reserved.crop(-2)
    dynamic.crop(-2)
    key, value = states(3, 1, 10)
    got, want = reserved.update(key, value), dynamic.update(key, value)
    assert all(torch.equal(g, w) for g, w in zip(got, want)) and reserved.get_seq_length() == 9


def test_reserved_layer_writes_in_place_and_grows_up_to_its_limit():
    layer = kvcache.ReservedLayer(8, limit=30)
    layer.update(*states(2, 3, 0))
    buffer = layer._keys.data_ptr()
    for seed in range(1, 6):
        layer.update(*states(2, 1, seed))
    assert layer._keys.data_ptr() == buffer and layer.keys.data_ptr() == buffer  # no copy per token
    capacities = []
    for seed in range(6, 28):
        layer.update(*states(2, 1, seed))
        capacities.append(layer.capacity)
    assert sorted(set(capacities)) == [16, 30] and layer.get_seq_length() == 30  # doubled, then capped


def test_reserved_cache_reserves_room_for_the_first_new_tokens_only():
    config = transformers.LlamaConfig(**SMALL)
    assert [layer.capacity for layer in kvcache.reserved_cache(config, 40, 16).layers] == [56] * 3
    layers = kvcache.reserved_cache(config, 40, 4096).layers
    assert (layers[0].capacity, layers[0].limit) == (40 + kvcache.RESERVE_NEW, 40 + 4096)
    layers = kvcache.reserved_cache(config, 40, 4096, reserve_all=True).layers
    assert (layers[0].capacity, layers[0].limit) == (40 + 4096, 40 + 4096)


def test_reserved_cache_only_for_full_attention_layers():
    cache = kvcache.reserved_cache(transformers.LlamaConfig(**SMALL), 10, 6)
    assert [type(layer) for layer in cache.layers] == [kvcache.ReservedLayer] * 3
    assert kvcache.reserved_cache(transformers.Qwen2Config(**SMALL), 10, 6) is not None
    sliding = transformers.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert kvcache.reserved_cache(sliding, 10, 6) is None  # its sliding layers keep transformers' own cache


def test_a_model_reads_the_same_logits_through_a_reserved_cache():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)).eval()
    ids = torch.randint(0, 64, (3, 7))
    import inspect

    # Newer transformers call the argument cache, older ones past_key_values: take this version's.
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        outputs = []
        for cache in (None, kvcache.reserved_cache(model.config, 7, 4)):
            out = model(input_ids=ids, use_cache=True, **{key: cache})
            cache, logits = getattr(out, key), [out.logits]
            for _ in range(4):
                out = model(input_ids=logits[-1][:, -1:].argmax(-1), use_cache=True, **{key: cache})
                cache = getattr(out, key)
                logits.append(out.logits)
            outputs.append(logits)
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
