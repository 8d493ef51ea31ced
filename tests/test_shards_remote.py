"""Shards from where large datasets live: over HTTP (a server on 127.0.0.1 that this test starts, with
byte ranges, a dropped connection and a missing shard), from fsspec's in-memory filesystem, and in the
layout img2dataset writes. Each read gives the same samples as the local shards."""
from __future__ import annotations

import functools
import http.server
import io
import json
import logging
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.shards import ShardPretrainDataset, expand_shard_patterns, main
from datasets.transforms import TransformConfig, build_transform
from tests.pretrain_helpers import make_world


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    world = make_world(tmp_path_factory.mktemp("shapes"))
    out = tmp_path_factory.mktemp("shards")
    assert main(["--ann", str(world / "pretrain.json"), "--image-root", str(world), "--out", str(out),
                 "--samples-per-shard", "10"]) == 0
    return out


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with ``Range: bytes=N-``; ``drop`` names files whose first GET is cut half-way."""

    drop: set = set()
    requests: list = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = self.translate_path(self.path)
        self.requests.append((self.path, self.headers.get("Range")))
        if not os.path.isfile(path):
            self.send_error(404)
            return
        data = Path(path).read_bytes()
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        name = os.path.basename(path)
        if name in self.drop and not start:
            self.drop.discard(name)
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection drops mid-file
            return
        self.wfile.write(data[start:])


@pytest.fixture()
def server(shards):
    handler = functools.partial(_RangeHandler, directory=str(shards))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _RangeHandler.requests = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _read(patterns) -> list[dict]:
    ds = ShardPretrainDataset(patterns, build_transform(32, True, TransformConfig(scale_min=0.3, randaugment=False)),
                              seed=3, shuffle_buffer=4)
    ds.configure(8, 1, 0, 1)
    return list(ds)


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) == 48
    for x, y in zip(a, b):
        assert (x["index"], x["caption"], x["n_bad"]) == (y["index"], y["caption"], y["n_bad"])
        assert torch.equal(x["image"], y["image"])


def test_http_shards_read_as_local_ones(shards, server):
    _same(_read([f"{server}/index.json"]), _read([str(shards / "index.json")]))


def test_http_dropped_connection_resumes_with_a_range(shards, server, caplog):
    _RangeHandler.drop = {"shard-000002.tar"}
    with caplog.at_level(logging.WARNING, logger="datasets"):
        remote = _read([f"{server}/shard-{{000000..000004}}.tar"])
    _same(remote, _read([str(shards / "index.json")]))
    assert any("connection lost" in r.getMessage() for r in caplog.records)
    assert ("/shard-000002.tar", None) in _RangeHandler.requests
    assert any(p == "/shard-000002.tar" and r and r.startswith("bytes=") for p, r in _RangeHandler.requests)


def test_http_missing_shard_is_one_clear_error(server):
    with pytest.raises(FileNotFoundError, match=r"shard not found: http://127\.0\.0\.1:\d+/shard-000005\.tar \(HTTP 404\)"):
        _read([f"{server}/shard-{{000003..000006}}.tar"])


def test_http_cannot_glob(server):
    with pytest.raises(ValueError, match="cannot be listed"):
        expand_shard_patterns([f"{server}/*.tar"])


def test_fsspec_memory_filesystem(shards):
    import fsspec  # a dependency of huggingface_hub, which transformers needs
    fs = fsspec.filesystem("memory")
    for f in sorted(shards.iterdir()):
        fs.pipe(f"/srcl-test/{f.name}", f.read_bytes())
    try:
        _same(_read(["memory://srcl-test/*.tar"]), _read([str(shards / "index.json")]))
        with pytest.raises(FileNotFoundError, match="no shard matches"):
            expand_shard_patterns(["memory://srcl-test/none-*.tar"])
        fs.rm("/srcl-test/shard-000001.tar")  # listed in index.json, gone: an error, not damage to skip
        with pytest.raises(FileNotFoundError, match="shard not found: memory://srcl-test/shard-000001.tar"):
            _read(["memory://srcl-test/index.json"])
    finally:
        fs.rm("/srcl-test", recursive=True)


def _img2dataset_shard(root: Path, n: int) -> Path:
    """One shard as img2dataset writes it: 00000.tar with {key}.jpg/.txt/.json, 00000_stats.json
    (its parquet file lists the same samples as a table; the reader does not need it)."""
    root.mkdir()
    rng = np.random.default_rng(0)
    with tarfile.open(root / "00000.tar", "w") as tar:
        for i in range(n):
            key = f"{i:09d}"
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
            caption = f"a photo of thing number {i}"
            meta = {"url": f"https://example.org/{i}.jpg", "key": key, "status": "success", "error_message": None,
                    "width": 48, "height": 40, "original_width": 480, "original_height": 400,
                    "caption": caption, "sha256": "0" * 64}
            for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "00000_stats.json").write_text(json.dumps({"count": n + 2, "successes": n, "failed_to_download": 2,
                                                       "failed_to_resize": 0, "status_dict": {"success": n}}))
    return root


def test_img2dataset_layout(tmp_path, caplog):
    root = _img2dataset_shard(tmp_path / "img2dataset", 8)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        ds = ShardPretrainDataset([str(root / "*.tar")], build_transform(32, True, TransformConfig(randaugment=False)), seed=0)
    assert ds.total == 8 and not any("scanning" in r.getMessage() for r in caplog.records)  # counted from the stats file
    ds.configure(4, 1, 0, 1)
    samples = list(ds)
    assert sorted(s["caption"] for s in samples) == sorted(f"a photo of thing number {i}" for i in range(8))
    assert all(s["n_bad"] == 0 for s in samples)
