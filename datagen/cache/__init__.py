"""One answer cache for both routes: a rerun pays only for requests never answered before.

The API the routes use (details in each module and in docs/cache.md):

    from datagen.cache import add_cache_args, open_cache, openai_key, service_of
    add_cache_args(parser)                              # --cache_dir, --no_cache, --refresh_cache
    cache = open_cache(args)                            # AnswerCache, or None with --no_cache
    key = openai_key(service_of(base_url), line["url"], line["body"])
    found = cache.lookup(model, keys)                   # {key: Location}, no value read
    for key, value in cache.get_many(model, keys): ...  # each hit's value, one line at a time
    cache.put(model, key, {"response": ..., "batch_id": ..., "created": ...})  # successes only
    cache.close()

- ``keys``: what an answer is keyed by (``openai_key``, ``finetuned_key``) and namespaces.
- ``segments``: the files (append-only, one writer each, safe on NFS and against a kill).
- ``store``: ``AnswerCache`` (lookup, get, get_many, put, flush, close).
- ``config``: where the cache lives and the flags.
- ``maintenance`` and ``__main__``: inspect, clear and compact (``python -m datagen.cache``).
"""

from datagen.cache.config import add_cache_args, check_cache_dir, open_cache, resolve_cache_dir
from datagen.cache.keys import finetuned_key, finetuned_namespace, openai_key, service_of
from datagen.cache.store import AnswerCache, Location, utc_date

__all__ = ["AnswerCache", "Location", "add_cache_args", "check_cache_dir", "finetuned_key", "finetuned_namespace",
           "open_cache", "openai_key", "resolve_cache_dir", "service_of", "utc_date"]
