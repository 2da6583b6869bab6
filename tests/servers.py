"""Local servers for the URL tests: S3 (moto) and plain HTTP (with range requests), on 127.0.0.1 only, stopped on exit.

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
    """Static files with single-range requests (``Range: bytes=a-b``, ``a-``, ``-n``: 206 Partial
    Content), as object stores and CDNs serve them; the standard handler ignores Range. Every
    GET is noted in ``requests`` as (path, first byte, end byte exclusive) when a list is given."""

    requests: list | None = None

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not rng or not os.path.isfile(path):
            f = super().send_head()
            if f is not None and self.command == "GET" and self.requests is not None:
                self.requests.append((self.path, 0, os.path.getsize(path)))
            return f
        size = os.path.getsize(path)
        first, _, last = rng.strip().removeprefix("bytes=").partition("-")
        if first == "":
            start, end = max(0, size - int(last)), size
        else:
            start, end = int(first), min(size, int(last) + 1 if last else size)
        if start >= end:
            self.send_error(416, "Requested Range Not Satisfiable")
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if self.command == "GET" and self.requests is not None:
            self.requests.append((self.path, start, end))
        self._remaining = end - start
        return f

    def copyfile(self, source, outputfile) -> None:
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            return super().copyfile(source, outputfile)
        self._remaining = None
        while remaining > 0:
            data = source.read(min(remaining, 1 << 16))
            if not data:
                break
            outputfile.write(data)
            remaining -= len(data)


@contextlib.contextmanager
def http_server(root: str | os.PathLike, requests: list | None = None) -> Iterator[str]:
    """A static file server for ``root`` on 127.0.0.1 (a free port), with range requests; yields
    its base URL. ``requests``, when given, collects (path, start, end) of every GET."""
    handler = type("Handler", (_QuietHandler,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
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
