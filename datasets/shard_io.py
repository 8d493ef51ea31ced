"""Byte streams of shards wherever they live: local paths, ``http(s)://`` (the standard library, with
ranged re-requests when a connection drops) and every other fsspec protocol (``s3://``, ``gs://``,
``memory://``, ...; fsspec opens them, its backend package must be installed).

The shard reader (``datasets/shards.py``) needs nothing more than a forward byte stream per shard and
the small JSON files beside the shards (``index.json``, img2dataset's ``*_stats.json``).
"""
from __future__ import annotations

import http.client
import io
import json
import logging
import os
import posixpath
import socket
import time
import urllib.error
import urllib.request
from typing import IO, Any, Callable, Optional

logger = logging.getLogger("datasets")

# fsspec protocol -> the package that implements it (for the one-line error when it is missing)
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "hf": "huggingface_hub", "sftp": "paramiko"}
_DROPPED = (ConnectionError, socket.timeout, TimeoutError, http.client.IncompleteRead, http.client.RemoteDisconnected,
            urllib.error.URLError)


def is_url(path: str) -> bool:
    """``scheme://...`` (anything but a local path)."""
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and scheme.isidentifier() and len(scheme) > 1


def join(base: str, name: str) -> str:
    return posixpath.join(base, name) if is_url(base) else os.path.join(base, name)


def dirname(path: str) -> str:
    return posixpath.dirname(path) if is_url(path) else os.path.dirname(path)


def basename(path: str) -> str:
    return posixpath.basename(path) if is_url(path) else os.path.basename(path)


def normalize(path: str) -> str:
    """``os.path.normpath`` for local paths; URLs unchanged (normpath would fold ``//``)."""
    return path if is_url(path) else os.path.normpath(path)


def _fsspec(path: str):
    scheme = path.partition("://")[0]
    try:
        import fsspec
        return fsspec.core.url_to_fs(path)
    except ImportError as err:
        package = BACKENDS.get(scheme, "fsspec") if "fsspec" not in str(err) else "fsspec"
        raise ImportError(f"reading {scheme}:// shards needs the {package} package (pip install {package}); "
                          f"{path}") from None


class RetryingStream(io.RawIOBase):
    """A forward stream over ``opener(offset)`` (a file object positioned at ``offset``) that, when a read
    fails as a dropped connection does, opens again at the current offset, up to ``retries`` times per
    failure with exponential back-off from ``backoff_s``."""

    def __init__(self, opener: Callable[[int], IO[bytes]], name: str, retries: int = 5, backoff_s: float = 0.5) -> None:
        self.opener, self.name, self.retries, self.backoff_s = opener, name, retries, backoff_s
        self.pos, self.reconnects = 0, 0
        self._f = opener(0)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        for attempt in range(self.retries + 1):
            try:
                n = self._f.readinto(b) if hasattr(self._f, "readinto") else self._copy(b)
                if not n and len(b) and getattr(self._f, "length", None):  # an HTTP body ended early
                    raise http.client.IncompleteRead(b"", self._f.length)
                self.pos += n or 0
                return n or 0
            except _DROPPED as err:
                if attempt == self.retries:
                    raise OSError(f"{self.name}: connection lost at byte {self.pos} after {self.retries} retries: {err}") from None
                logger.warning("%s: connection lost at byte %d (%s); retrying", self.name, self.pos, err)
                time.sleep(self.backoff_s * 2 ** attempt)
                self._close_inner()
                self._f = self.opener(self.pos)
                self.reconnects += 1
        return 0

    def _copy(self, b) -> int:
        data = self._f.read(len(b))
        b[:len(data)] = data
        return len(data)

    def _close_inner(self) -> None:
        try:
            self._f.close()
        except Exception:  # a broken connection may fail to close; it is replaced either way
            pass

    def close(self) -> None:
        self._close_inner()
        super().close()


def _http_open(url: str, timeout_s: float) -> Callable[[int], IO[bytes]]:
    def opener(offset: int) -> IO[bytes]:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
        except urllib.error.HTTPError as err:
            if err.code in (403, 404, 410):
                raise FileNotFoundError(f"shard not found: {url} (HTTP {err.code})") from None
            raise OSError(f"{url}: HTTP {err.code} {err.reason}") from None
        if offset and response.status != 206:
            response.close()
            raise OSError(f"{url}: the server ignores byte ranges, so a dropped connection cannot resume")
        return response
    return opener


def open_stream(path: str, retries: int = 5, timeout_s: float = 60.0) -> IO[bytes]:
    """A buffered forward byte stream of the shard ``path``; ``FileNotFoundError`` naming it when it
    does not exist."""
    if not is_url(path):
        return open(path, "rb")
    if path.startswith(("http://", "https://")):
        raw = RetryingStream(_http_open(path, timeout_s), path, retries)
    else:
        fs, inner = _fsspec(path)
        if not fs.exists(inner):
            raise FileNotFoundError(f"shard not found: {path}")

        def opener(offset: int) -> IO[bytes]:
            f = fs.open(inner, "rb")
            if offset:
                f.seek(offset)
            return f
        raw = RetryingStream(opener, path, retries)
    return io.BufferedReader(raw, buffer_size=1 << 20)


def read_json(path: str) -> Optional[Any]:
    """The JSON file ``path`` (local or remote), or None when it does not exist; ``ValueError``
    naming it when it is not JSON."""
    try:
        with open_stream(path) as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path!r} is not valid JSON: {e}") from e
