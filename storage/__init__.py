"""The teacher-target cache (Zarr v3), and its packed form for publishing (storage/pack.py). Nothing outside
this package knows the on-disk format."""
from storage.cache import (FORMAT_VERSION, CacheCorruptError, CachedRows, CacheMismatchError, CacheNotReady,
                           CacheReader, CacheWriter, EpochNotInCache, create_cache, open_cache, wait_for_cache)

__all__ = ["FORMAT_VERSION", "CacheCorruptError", "CachedRows", "CacheMismatchError", "CacheNotReady", "CacheReader",
           "CacheWriter", "EpochNotInCache", "create_cache", "open_cache", "wait_for_cache"]
