"""A private Ray for runs that must not touch the machine's: tests, the demo, the rehearsal.

Kept apart from ``teacher.cache`` so that setting it up imports nothing heavy (pytest's
conftest calls it before any test module is imported).
"""
from __future__ import annotations

import os
import secrets


def private_ray_env(folder: str | os.PathLike) -> dict[str, str]:
    """Environment variables for a run that must use its own Ray (tests, demo, rehearsal): token
    auth on with a fresh token written to ``folder/auth_token`` (``~/.ray`` untouched), and
    RAY_ADDRESS=local, so every job started with them runs on a new local instance and never
    joins a ``ray start`` cluster that happens to run on the machine."""
    token = os.path.join(folder, "auth_token")
    with open(os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(secrets.token_hex(32))  # the form `ray get-auth-token --generate` writes
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token, "RAY_ADDRESS": "local"}
