"""Local servers for the URL tests: S3 (moto) and plain HTTP, on 127.0.0.1 only, stopped on exit.

Both run as threads of the test process, so nothing outlives the session. The S3 server is
found the way a user's real one is, through the environment: ``FSSPEC_S3_ENDPOINT_URL`` and
``AWS_*`` credentials, set while the server runs (subprocesses and Ray workers inherit them)
and restored afterwards. fsspec reads ``FSSPEC_*`` variables once, when it is imported, so the
running process gets the endpoint through ``fsspec.config.conf`` as well.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import logging
import os
import threading
from typing import Iterator

S3_ENV = {"AWS_ACCESS_KEY_ID": "kdcache-test", "AWS_SECRET_ACCESS_KEY": "kdcache-test",
          "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a free port); yields its endpoint URL."""
    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**S3_ENV, "FSSPEC_S3_ENDPOINT_URL": endpoint}
    saved_env = {k: os.environ.get(k) for k in env}
    saved_conf = fsspec.config.conf.get("s3")
    os.environ.update(env)
    fsspec.config.conf["s3"] = {**(saved_conf or {}), "endpoint_url": endpoint}
    try:
        yield endpoint
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf
        server.stop()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def http_server(root: str | os.PathLike) -> Iterator[str]:
    """A static file server for ``root`` on 127.0.0.1 (a free port); yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def new_bucket(name: str) -> str:
    """Create an S3 bucket on the running server; returns ``s3://name``."""
    import s3fs

    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"
