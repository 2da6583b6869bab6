"""The teacher-target cache (Zarr v3). Nothing outside this package knows the on-disk format."""
from storage.cache import (FORMAT_VERSION, CachedRows, CacheMismatchError, CacheNotReady, CacheReader, CacheWriter,
                           create_cache, open_cache, wait_for_cache)

__all__ = ["FORMAT_VERSION", "CachedRows", "CacheMismatchError", "CacheNotReady", "CacheReader", "CacheWriter",
           "create_cache", "open_cache", "wait_for_cache"]
