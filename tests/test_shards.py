"""Tar shards: writer + index, pattern expansion, the streaming reader (same samples as the JSON
reader, rank/worker split, exact resume, bad samples) and pre-training end to end from shards."""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from datasets.formats import PretrainCollator, PretrainDataset
from datasets.shards import (INDEX_NAME, ShardPretrainDataset, expand_shard_patterns, iter_tar_samples, main,
                             plan_epoch, read_shard_infos, write_shards)
from datasets.text import pre_caption, train_wordpiece_tokenizer
from datasets.transforms import TransformConfig, build_transform
from tests.pretrain_helpers import DEMO, step_losses, tiny_overrides
from tests.pretrain_helpers import world  # noqa: F401 (module fixture: the tiny shapes world)

PER_SHARD = 10  # 48 pairs -> shards of 10, 10, 10, 10, 8


@pytest.fixture(scope="module")
def shards(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    assert main(["--ann", str(world / "pretrain.json"), "--image-root", str(world), "--out", str(out),
                 "--samples-per-shard", str(PER_SHARD)]) == 0
    return out


def transform():
    """Random crops, so equal images mean equal augmentation seeds."""
    return build_transform(32, True, TransformConfig(scale_min=0.3, randaugment=False))


def stream(path, **kw) -> ShardPretrainDataset:
    return ShardPretrainDataset([str(path)], transform(), seed=kw.pop("seed", 5), **kw)


def test_writer_index_and_members(world, shards):
    records = json.loads((world / "pretrain.json").read_text())
    index = json.loads((shards / INDEX_NAME).read_text())
    assert index["num_samples"] == len(records) == 48
    assert [s["num_samples"] for s in index["shards"]] == [10, 10, 10, 10, 8]
    assert sorted(os.listdir(shards)) == [INDEX_NAME] + [f"shard-{i:06d}.tar" for i in range(5)]
    key, parts = next(iter_tar_samples(str(shards / "shard-000001.tar")))
    assert key == "000000010" and set(parts) == {"png", "json"}
    meta = json.loads(parts["json"])
    assert meta["caption"] == records[10]["caption"] and meta["image"] == records[10]["image"]
    assert parts["png"] == (world / records[10]["image"]).read_bytes()
    # image_idx as the JSON reader assigns it (first appearance of each image path)
    ref = PretrainDataset([world / "pretrain.json"], world, transform())
    assert meta["image_idx"] == ref.items[10][2]


def test_writer_missing_image_is_clear(world, tmp_path):
    records = [{"image": "images/nope.png", "caption": "a red square"}]
    with pytest.raises(FileNotFoundError, match="record 0.*nope.png"):
        write_shards(records, world, tmp_path / "o")
    index = write_shards(records + json.loads((world / "pretrain.json").read_text())[:3], world, tmp_path / "o",
                         skip_missing=True)
    assert index["num_samples"] == 3 and index["skipped_missing"] == 1


def test_pattern_expansion(shards, tmp_path):
    names = [str(shards / f"shard-{i:06d}.tar") for i in range(5)]
    assert expand_shard_patterns(str(shards / "shard-{000000..000004}.tar")) == names
    assert expand_shard_patterns([str(shards / "shard-{000003,000001}.tar")]) == [names[3], names[1]]
    assert expand_shard_patterns(str(shards / "*.tar")) == names
    assert expand_shard_patterns(str(shards / INDEX_NAME)) == names
    assert expand_shard_patterns(str(shards)) == names
    with pytest.raises(FileNotFoundError, match="shard-000005.tar"):
        expand_shard_patterns(str(shards / "shard-{000003..000005}.tar"))
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        expand_shard_patterns(str(tmp_path / "*.tar"))


@pytest.mark.parametrize("epoch", [0, 3])
def test_same_samples_as_json_reader(world, shards, epoch):
    """As a set per epoch: same record, caption choice, augmented image tensor and image_idx."""
    ds = stream(shards, shuffle_buffer=4)
    ds.configure(8, 1, 0, 1)
    ds.set_position(epoch, 0)
    got = {s["index"]: s for s in ds}
    ref = PretrainDataset([world / "pretrain.json"], world, transform(), seed=5)
    ref.set_epoch(epoch)
    assert sorted(got) == list(range(len(ref)))
    for i in range(len(ref)):
        r = ref[i]
        for key in ("caption", "image_idx", "seed", "n_bad"):
            assert got[i][key] == r[key], (i, key)
        assert torch.equal(got[i]["image"], r["image"]), i
    # a different epoch gives different augmentation
    ds.set_position(epoch + 1, 0)
    other = {s["index"]: s for s in ds}
    assert not all(torch.equal(other[i]["image"], got[i]["image"]) for i in got)


def test_tokenizer_captions_match_json_reader(world, shards):
    ref = PretrainDataset([world / "pretrain.json"], world, transform())
    assert stream(shards).all_captions() == ref.all_captions()


@pytest.mark.parametrize("world_size,accum,workers,batch,num_samples", [
    (1, 1, 1, 8, None), (2, 1, 3, 8, None), (2, 2, 2, 8, 40), (4, 1, 2, 12, None), (3, 2, 4, 6, 47)])
def test_rank_worker_split_is_disjoint_and_complete(shards, world_size, accum, workers, batch, num_samples):
    infos = read_shard_infos(expand_shard_patterns(str(shards)))
    n = num_samples or 48
    steps = n // batch
    micro = batch // (world_size * accum)
    for epoch in (0, 1):
        plans = {(r, w): plan_epoch(infos, epoch, 5, n, batch, accum, r, world_size, w, workers, 3)
                 for r in range(world_size) for w in range(workers)}
        every = [i for p in plans.values() for i in p]
        assert len(every) == len(set(every)) == steps * batch  # disjoint, epoch cut to whole steps
        for r in range(world_size):  # each process gets the same number of micro-batches
            assert sum(len(plans[r, w]) for w in range(workers)) == steps * accum * micro
        # complete: the covered samples are the first steps*batch of the permuted shard sequence
        perm = torch.randperm(len(infos), generator=torch.Generator().manual_seed(5 * 1_000_003 + epoch)).tolist()
        sequence = [infos[s].first + j for s in perm for j in range(infos[s].num_samples)]
        assert set(every) == set(sequence[:steps * batch])


def _loader_batches(ds: ShardPretrainDataset, workers: int, tokenizer) -> list[list[int]]:
    loader = DataLoader(ds, batch_size=ds.micro_batch(), num_workers=workers,
                        collate_fn=PretrainCollator(tokenizer, 16, 0.15))
    return [b["index"].tolist() for b in loader]


@pytest.fixture(scope="module")
def tokenizer(world):
    ref = PretrainDataset([world / "pretrain.json"], world, transform())
    return train_wordpiece_tokenizer(ref.all_captions(), 120)


def test_dataloader_workers_follow_plan_and_resume_exactly(shards, tokenizer):
    """Two processes x 2 workers x accumulation 2 through real DataLoaders: every process yields
    the same number of micro-batches, together each sample once, and a resume at step k yields
    exactly the remaining batches of the uninterrupted epoch."""
    runs = {}
    for rank in (0, 1):
        ds = stream(shards, shuffle_buffer=3)
        ds.configure(8, 2, rank, 2)  # micro-batch 2
        ds.set_position(2, 0)
        runs[rank] = _loader_batches(ds, 2, tokenizer)
        assert len(runs[rank]) == ds.steps_per_epoch() * 2 == 12
        for k in (1, 3):
            ds.set_position(2, k)
            assert _loader_batches(ds, 2, tokenizer) == runs[rank][k * 2:], (rank, k)
    flat = [i for r in runs.values() for b in r for i in b]
    assert sorted(flat) == list(range(48))


def _corrupt_copy(shards: Path, out: Path, bad_keys: set[str], truncate: bool = False) -> None:
    """Copy the shards; in shard 1 replace the images of ``bad_keys`` with garbage (or cut the tar)."""
    out.mkdir()
    for name in os.listdir(shards):
        data = (shards / name).read_bytes()
        if name == "shard-000001.tar":
            if truncate:
                data = data[: len(data) // 2]
            else:
                src = tarfile.open(fileobj=io.BytesIO(data))
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as dst:
                    for m in src.getmembers():
                        payload = src.extractfile(m).read()
                        if m.name.split(".")[0] in bad_keys and m.name.endswith(".png"):
                            payload = b"\x89PNG not really"
                        m.size = len(payload)
                        dst.addfile(m, io.BytesIO(payload))
                data = buf.getvalue()
        (out / name).write_bytes(data)


def test_corrupt_image_is_skipped_and_counted(shards, tmp_path, caplog):
    bad = tmp_path / "bad"
    _corrupt_copy(shards, bad, {"000000013"})
    ds = stream(bad, shuffle_buffer=1)
    ds.configure(8, 1, 0, 1)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        samples = list(ds)
    assert len(samples) == 48  # the count per epoch is kept: the bad one is replaced
    assert sum(s["n_bad"] for s in samples) == 1
    assert 13 not in {s["index"] for s in samples}
    replacement = next(s for s in samples if s["n_bad"])
    assert replacement["index"] != 13
    # named for the training loop's bad-image check, which warns once per sample (the reader logs nothing)
    assert "000000013" in replacement["bad_images"][0][0] and not caplog.records


def test_damaged_tar_counts_unreadable_rest(shards, tmp_path):
    bad = tmp_path / "cut"
    _corrupt_copy(shards, bad, set(), truncate=True)
    ds = stream(bad, shuffle_buffer=1)
    ds.configure(8, 1, 0, 1)
    samples = list(ds)
    n_bad = sum(s["n_bad"] for s in samples)
    assert len(samples) == 48 and 1 <= n_bad < 10  # the readable head of the cut shard is used
    assert {s["index"] for s in samples} == set(range(48)) - set(range(20 - n_bad, 20))


def test_foreign_shards_with_txt_captions_and_no_index(world, tmp_path):
    """WebDataset shards from other tools: <key>.jpg + <key>.txt, no index.json (counted by scanning)."""
    records = json.loads((world / "pretrain.json").read_text())[:6]
    path = tmp_path / "web-0.tar"
    with tarfile.open(path, "w") as tar:
        for i, r in enumerate(records):
            for name, data in ((f"s{i}.png", (world / r["image"]).read_bytes()), (f"s{i}.txt", r["caption"][0].encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    ds = ShardPretrainDataset([str(tmp_path / "web-*.tar")], transform(), seed=1)
    assert len(ds) == 6
    ds.configure(3, 1, 0, 1)
    samples = sorted(ds, key=lambda s: s["index"])
    assert [s["image_idx"] for s in samples] == list(range(6))  # each sample its own image
    assert [s["caption"] for s in samples] == [pre_caption(r["caption"][0], 30) for r in records]


def test_pretraining_from_shards_runs_and_resumes_exactly(world, shards, tmp_path, monkeypatch):
    from engine.config import load_config
    from engine.trainer import Trainer
    from tasks.pretrain import PretrainConfig, run

    extra = {"data.format": "shards", "data.shards": f"['{shards / 'shard-{000000..000004}.tar'}']",
             "data.shards_shuffle_buffer": 4, "data.num_workers": 2, "train.epochs": 2, "train.max_steps": 7}
    cfg = lambda out: load_config(PretrainConfig, DEMO, tiny_overrides(world, out, **extra))  # noqa: E731
    full = tmp_path / "full"
    state = run(cfg(full))
    assert state.global_step == 7  # 48 / 8 = 6 steps per epoch: the run crosses an epoch boundary
    a = step_losses(full)
    assert sorted(a) == list(range(1, 8)) and all(v == v for v in a.values())
    part = tmp_path / "part"
    original = Trainer._stop_requested
    monkeypatch.setattr(Trainer, "_stop_requested", lambda self, stop: self.state.global_step == 3 or original(self, stop))
    assert run(cfg(part)).global_step == 3
    monkeypatch.setattr(Trainer, "_stop_requested", original)
    run(cfg(part), resume=str(part))
    b = step_losses(part)
    assert sorted(b) == list(range(1, 8))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step


def _jpeg_shard(tmp_path, size: int) -> Path:
    import numpy as np
    from PIL import Image
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"{i}.jpg", quality=90)
        records.append({"image": f"{i}.jpg", "caption": f"a photo number {i}"})
    write_shards(records, root, tmp_path / "shards", samples_per_shard=4)
    return tmp_path / "shards"


def test_large_jpeg_decodes_reduced_and_is_bounded(tmp_path):
    """The shard reader decodes as the JSON reader does: a JPEG four times the crop decodes at 1/4
    (``decode_min_side``), and ``max_image_pixels`` refuses (skips and counts) what is still too big."""
    path = _jpeg_shard(tmp_path, 512)
    seen = []

    def size_of(img):
        seen.append(img.size)
        return torch.zeros(3, 8, 8)

    ds = ShardPretrainDataset([str(path / "*.tar")], size_of, seed=0, decode_min_side=128)
    ds.configure(4, 1, 0, 1)
    assert len(list(ds)) == 4 and set(seen) == {(128, 128)}
    seen.clear()
    full = ShardPretrainDataset([str(path / "*.tar")], size_of, seed=0)
    full.configure(4, 1, 0, 1)
    assert len(list(full)) == 4 and set(seen) == {(512, 512)}
    bounded = ShardPretrainDataset([str(path / "*.tar")], size_of, seed=0, decode_min_side=128,
                                   max_image_pixels=100 * 100)
    bounded.configure(4, 1, 0, 1)
    samples = list(bounded)
    assert all(s["failed"] for s in samples) and "max_image_pixels" in samples[0]["bad_images"][0][1]
