"""What can go wrong with shards and samples: the two error types every reader and writer raises.

A :class:`ShardError` is about a whole shard or manifest (the run cannot go on past it); a
:class:`SampleError` about one sample, which callers may record and skip (``skip_bad``,
``skipped=``) instead. Messages name the shard and key; :class:`SampleError` also keeps them as
attributes.
"""
from __future__ import annotations


class ShardError(RuntimeError):
    """A shard is missing, truncated, malformed or does not match its manifest."""


class SampleError(ShardError):
    """One sample cannot be used (e.g. corrupt image bytes, no label); names shard and key.

    Built as ``SampleError(message, shard=..., key=...)``; ``shard``/``key``/``path`` are kept
    as attributes so callers can record the skip without parsing the message.
    """

    def __init__(self, message: str, *, shard: str | None = None, key: str | None = None,
                 path: str | None = None):
        super().__init__(message)
        self.shard = shard
        self.key = key
        self.path = path
