"""How every kdcache command ends: a user error is one line and exit 2, a bug keeps its traceback.

    if __name__ == "__main__":
        sys.exit(run_cli(main, "python -m student.train"))

A *user error* is one the person running the command can fix: a bad config value or
override, a missing input file, shards or a cache made for another run, a checkpoint that
does not fit. It prints ``<prog>: error: <message>`` (and ``  hint: ...`` when there is one)
on stderr and exits 2. Anything else is a bug and raises with its traceback. ``--debug`` on
the command line or ``KDCACHE_DEBUG=1`` in the environment shows the traceback of user errors too.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

DEBUG_ENV = "KDCACHE_DEBUG"

# module -> its user-error classes. Looked up in sys.modules when an error arrives: a class
# whose module was never imported cannot have been raised, and a command that never touches
# torch or zarr does not import them just to report its errors.
USER_ERRORS: dict[str, tuple[str, ...]] = {
    "pipeline.config": ("ConfigError",),            # bad key / value / override (names the field)
    "pipeline.errors": ("ShardError",),             # missing manifest, broken or changed shard
    "teacher.cache": ("CacheJobError",),           # work items that failed (names them)
    "storage.cache": ("CacheMismatchError", "CacheNotReady"),
    "teacher.model": ("TeacherLoadError",),
    "teacher.weights": ("WeightsError",),           # timm pretrained weights missing offline / not fitting
    "student.checkpoint": ("CheckpointError",),
}
# Builtins raised for named inputs (a path the user gave, a cache.wait timeout).
BUILTIN_USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, FileExistsError, TimeoutError)


def user_error_types(extra: Sequence[type[BaseException]] = ()) -> tuple[type[BaseException], ...]:
    """The user-error classes of every loaded kdcache module, the builtins, and ``extra``."""
    found = [getattr(sys.modules[mod], name) for mod, names in USER_ERRORS.items() if mod in sys.modules
             for name in names]
    return (*BUILTIN_USER_ERRORS, *found, *extra)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug``: read by :func:`run_cli` (listed here so ``--help`` shows it)."""
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of user errors too (or set {DEBUG_ENV}=1)")


def run_cli(main: Callable[[Sequence[str] | None], object], prog: str, argv: Sequence[str] | None = None, *,
            hints: dict[str, str] | None = None, extra: Sequence[type[BaseException]] = ()) -> int:
    """Call ``main(argv)``; report a user error in one line and return 2, else return 0.

    Args:
        main: the command's ``main(argv)`` (raises on error; its return value is ignored).
        prog: the command as users type it, for the message prefix.
        argv: arguments (default ``sys.argv[1:]``).
        hints: exception class name -> a hint line (an exception's own ``hint`` attribute wins).
        extra: more exception types this command treats as user errors.
    Returns:
        0 on success, 2 on a user error. Other exceptions propagate (traceback, exit 1).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        main(args)
    except user_error_types(extra) as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        hint = getattr(exc, "hint", None) or (hints or {}).get(type(exc).__name__)
        if hint:
            print(f"  hint: {hint}", file=sys.stderr)
        return 2
    return 0


def plural(n: int, word: str, many: str | None = None) -> str:
    """``plural(1, "shard") == "1 shard"``, ``plural(1281167, "sample") == "1,281,167 samples"``."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"
