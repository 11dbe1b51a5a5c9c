"""The answer cache as a fine-tuned run uses it (``datagen.cache``, docs/cache.md), the same
for every engine.

A job's key (``finetuned_key``) is everything that makes its answer: the fingerprint's
model, adapter and engine parts and the effective parameters (greedy: without the seed,
which changes nothing), the exact token ids the model sees (so the chat template, the
system prompt and the tokenizer are in it), and the request's own seed when it samples
(``engine.request_seed``). Entries are grouped per model and adapter
(``finetuned_namespace``), so ``python -m datagen.cache --clear --model M`` forgets one.

1. ``look_up``, once per run and before the engine loads: the keys of every pending job,
   one lookup per output. It holds the keys (with their counts) and the hits' locations,
   never the answers, and says how many jobs the cache answers.
2. ``answer``: as the run makes its jobs, a found key's answer is read (one line) and its
   record written from it (``records.cached_record``); only misses go to the engine.
3. ``keep``: each answered record is put as it is written; a failed record never is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from collections import Counter
from collections.abc import Iterable

from datagen.cache import AnswerCache, Location, finetuned_key, finetuned_namespace
from datagen.common.params import GenParams
from datagen.finetuned import records

log = logging.getLogger("datagen")


class RunCache:
    """One run's view of the answer cache: its lookups, its reads and its puts."""

    def __init__(self, cache: AnswerCache):
        self.cache = cache
        self.found: dict[int, dict[str, Location]] = {}  # per target (its id()): the keys the cache holds

    @staticmethod
    def namespace(target) -> str:
        """A run's namespace: the base model and the adapter, a local folder by its absolute
        path (any spelling of it, any NAME given to the adapter, finds the same answers), a
        hub id as given."""
        provenance = target.provenance
        model = provenance.model
        model = str(Path(model).resolve()) if Path(model).exists() else model
        adapter = str(Path(provenance.adapter).resolve()) if provenance.adapter else None
        return finetuned_namespace(model, adapter)

    @staticmethod
    def key(provenance: records.Provenance, params: GenParams, input_ids: list[int], seed: int) -> str:
        """The key of one job: what made it (the fingerprint's parts but the input), its input
        ids, and its seed when it samples (greedy answers do not depend on any seed)."""
        generation = params.record()
        if not params.do_sample:
            generation.pop("seed", None)
        made_by = {**provenance.static_parts(), "generation": records.digest(generation)}
        return finetuned_key(made_by, input_ids, seed if params.do_sample else None)

    def readable(self, targets: list) -> list:
        """The targets whose namespace holds entries this run may read (a lookup is worth it)."""
        self.cache.flush()  # this process's own puts (an earlier run in it) count too
        if not self.cache.read:
            return []
        readable = [target for target in targets if self.cache.holds(self.namespace(target))]
        for target in targets:
            if target not in readable:
                log.info("answer cache: nothing kept yet for run %s (%s in %s)", target.run,
                         self.namespace(target), self.cache.root)
        return readable

    def look_up(self, targets: list, keyed: Iterable[tuple]) -> dict[int, int]:
        """Look up the keys of ``keyed`` ((target, key) pairs, one per pending job), once per
        target; returns, per target's id(), how many of its jobs the cache answers."""
        wanted: dict[int, Counter] = {id(target): Counter() for target in targets}
        for target, key in keyed:
            wanted[id(target)][key] += 1
        hits = {}
        for target in targets:
            counts = wanted.pop(id(target))
            found = self.cache.lookup(self.namespace(target), counts) if counts else {}
            self.found[id(target)] = found
            hits[id(target)] = sum(counts[key] for key in found)
            log.info("answer cache: %d of the %d requests run %s has to answer were answered before (%s)",
                     hits[id(target)], sum(counts.values()), target.run, self.cache.root)
        return hits

    def answer(self, target, key: str) -> dict | None:
        """The cached value of a key ``look_up`` found for ``target`` (None: not found, or gone)."""
        location = self.found.get(id(target), {}).get(key)
        if location is None:
            return None
        value = self.cache.get(location)
        return value if isinstance(value, dict) and isinstance(value.get("answer"), dict) else None

    def keep(self, target, key: str, record: dict) -> None:
        """Put an answered record (never a failed one) under its key."""
        self.cache.put(self.namespace(target), key, records.cache_value(record))
