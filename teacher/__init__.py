"""The teacher: the model that scores (``teacher.model``) and the Ray job that runs it once over the
shards and writes the cache (``teacher.cache``). Target rebuild and the format live in ``storage``.

Nothing is imported here: ``teacher.ray_env`` (pytest's conftest) and the per-item work must not
pay for modules they do not use; import names from their module."""
