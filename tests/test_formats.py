"""Annotation readers, robust image loading, PretrainDataset and PretrainCollator (datasets/formats.py)."""
import hashlib
import json
import logging
import pickle

import pytest
import torch
from PIL import Image

from datasets.formats import (ImageLoadError, PretrainCollator, PretrainDataset, load_image, read_annotations,
                              sample_seed)
from datasets.text import train_wordpiece_tokenizer
from datasets.transforms import TransformConfig, apply_seeded, build_transform

REQ = {"image": str, "caption": (str, list)}


def _json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _png(path, seed, size=32):
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def world(tmp_path):
    """Images: ok0..ok3, a truncated PNG, a missing file."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(4):
        _png(root / f"ok{i}.png", i)
    data = _png(root / "bad.png", 9).read_bytes()
    (root / "bad.png").write_bytes(data[: len(data) // 2])
    return root


TRAIN = build_transform(16, train=True, cfg=TransformConfig())


def test_sample_seed_stable():
    assert sample_seed(0, 0, 0) == sample_seed(0, 0, 0)
    seeds = {sample_seed(b, e, i) for b in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450 and all(0 <= s < 2**63 for s in seeds)
    # pinned: must never change between versions (it decides every augmentation, caption and mask)
    assert sample_seed(0, 1, 2) == 603432347784401458
    assert sample_seed(0, 1, 2) == int.from_bytes(hashlib.blake2b(b"0/1/2", digest_size=8).digest(), "big") >> 1


def test_read_annotations_concatenates(tmp_path):
    a = _json(tmp_path / "a.json", [{"image": "x.png", "caption": "one"}, {"image": "y.png", "caption": ["two", "2"]}])
    b = _json(tmp_path / "b.json", [{"image": "z.png", "caption": "three", "extra": 1}])
    recs = read_annotations([a, b], REQ, kind="pre-training")
    assert [r["image"] for r in recs] == ["x.png", "y.png", "z.png"]
    assert [r["_source"] for r in recs] == [str(a), str(a), str(b)] and recs[2]["extra"] == 1
    assert len(read_annotations(str(a), REQ, kind="pre-training")) == 2


def test_read_annotations_errors(tmp_path):
    good = _json(tmp_path / "good.json", [{"image": "x.png", "caption": "c"}])
    with pytest.raises(FileNotFoundError, match=r"nope\.json.*run the shapes generator"):
        read_annotations([good, tmp_path / "nope.json"], REQ, "pre-training", hint="run the shapes generator")
    missing = _json(tmp_path / "missing.json", [{"image": "x.png", "caption": "c"}, {"image": "y.png"}])
    with pytest.raises(ValueError, match=r"missing\.json.*record 1.*'caption'"):
        read_annotations(missing, REQ, "pre-training")
    wrong = _json(tmp_path / "wrong.json", [{"image": 3, "caption": "c"}])
    with pytest.raises(ValueError, match=r"wrong\.json.*record 0.*'image'.*str"):
        read_annotations(wrong, REQ, "pre-training")
    boolean = _json(tmp_path / "bool.json", [{"image": "x", "image_id": True}])
    with pytest.raises(ValueError, match=r"bool\.json.*record 0.*'image_id'"):
        read_annotations(boolean, {"image_id": (str, int)}, "retrieval")
    notlist = _json(tmp_path / "notlist.json", {"image": "x.png", "caption": "c"})
    with pytest.raises(ValueError, match=r"notlist\.json.*list"):
        read_annotations(notlist, REQ, "pre-training")
    notobj = _json(tmp_path / "notobj.json", [{"image": "x.png", "caption": "c"}, "oops"])
    with pytest.raises(ValueError, match=r"notobj\.json.*record 1"):
        read_annotations(notobj, REQ, "pre-training")
    (tmp_path / "broken.json").write_text("[{", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json"):
        read_annotations(tmp_path / "broken.json", REQ, "pre-training")


def test_load_image(world):
    img = load_image(world / "ok0.png")
    assert img.mode == "RGB" and img.size == (32, 32)
    for name, reason in [("bad.png", "truncated|Error"), ("gone.png", "not found")]:
        with pytest.raises(ImageLoadError, match=reason) as info:
            load_image(world / name)
        assert isinstance(info.value, OSError) and info.value.path == str(world / name)
        again = pickle.loads(pickle.dumps(info.value))
        assert again.path == info.value.path and str(again) == str(info.value)


def test_dataset_drops_empty_captions_with_warning(tmp_path, world, caplog):
    ann = _json(tmp_path / "cc.json", [
        {"image": "ok0.png", "caption": "A red circle."},
        {"image": "ok1.png", "caption": "?!..."},
        {"image": "ok2.png", "caption": ["", "(...)"]},
        {"image": "ok3.png", "caption": ["", "Blue square"]},
    ])
    with caplog.at_level(logging.WARNING, logger="datasets"):
        ds = PretrainDataset(ann, world, TRAIN)
    assert len(ds) == 2 and [it[1] for it in ds.items] == [["a red circle"], ["blue square"]]
    warnings = [r.getMessage() for r in caplog.records if r.name == "datasets"]
    assert len(warnings) == 1 and "cc.json" in warnings[0] and "dropped 2 record" in warnings[0]


def test_dataset_skips_bad_images(tmp_path, world, caplog):
    ann = _json(tmp_path / "ann.json", [{"image": n, "caption": f"caption {i}"}
                                        for i, n in enumerate(["ok0.png", "gone.png", "bad.png", "ok1.png"])])
    ds = PretrainDataset(ann, world, TRAIN)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        s = ds[1]
    # a substitute record (drawn from the sample seed) replaces the missing image; the failed tries are
    # listed for the training loop's check, which warns once per image: the dataset itself logs nothing
    assert s["index"] in (0, 3) and s["caption"] == f"caption {s['index']}" and s["image"].shape == (3, 16, 16)
    assert s["bad_images"][0][0] == str(world / "gone.png") and s["n_bad"] == len(s["bad_images"]) >= 1
    assert not s["failed"] and not caplog.records
    again = ds[1]
    assert again["index"] == s["index"] and torch.equal(again["image"], s["image"])  # deterministic
    assert ds[2]["bad_images"][0][0] == str(world / "bad.png")
    assert ds[0]["n_bad"] == 0 and ds[0]["bad_images"] == [] and ds[0]["index"] == 0


def test_dataset_all_bad_gives_a_failed_placeholder(tmp_path, world):
    ann = _json(tmp_path / "ann.json", [{"image": "gone.png", "caption": "a"}, {"image": "bad.png", "caption": "b"}])
    ds = PretrainDataset(ann, world, TRAIN)
    s = ds[0]
    assert s["failed"] and s["image"].shape == (3, 16, 16)
    assert [p for p, _ in s["bad_images"]] == [str(world / "gone.png"), str(world / "bad.png")]


def test_image_idx_per_path(tmp_path, world):
    a = _json(tmp_path / "a.json", [{"image": "ok0.png", "caption": "x"}, {"image": "ok1.png", "caption": "y"}])
    b = _json(tmp_path / "b.json", [{"image": "./ok0.png", "caption": "z"}, {"image": "ok2.png", "caption": "w"}])
    ds = PretrainDataset([a, b], world, TRAIN)
    assert [ds[i]["image_idx"] for i in range(4)] == [0, 1, 0, 2]
    assert ds.image_path(2) == ds.image_path(0) == str(world / "ok0.png")
    assert ds.all_captions() == ["x", "y", "z", "w"]
    bad = _json(tmp_path / "c.json", [{"image": "ok3.png", "caption": ["fine", 7]}])
    with pytest.raises(ValueError, match=r"c\.json.*ok3\.png.*'caption'"):
        PretrainDataset([a, bad], world, TRAIN)


def test_sample_reproducible_and_epoch_dependent(tmp_path, world):
    caps = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    ann = _json(tmp_path / "a.json", [{"image": f"ok{i}.png", "caption": caps} for i in range(4)])
    ds = PretrainDataset(ann, world, TRAIN, seed=5)
    first = ds[2]
    _ = [ds[i] for i in (3, 0, 1)]  # access order and global RNG use must not matter
    torch.rand(10)
    other = PretrainDataset(ann, world, TRAIN, seed=5)[2]
    for s in (ds[2], other):
        assert torch.equal(s["image"], first["image"]) and s["caption"] == first["caption"] and s["seed"] == first["seed"]
    ds.set_epoch(1)
    later = ds[2]
    assert not torch.equal(later["image"], first["image"]) and later["seed"] != first["seed"]
    # the caption choice follows the seed: across epochs several captions of the list are used
    picked = set()
    for e in range(8):
        ds.set_epoch(e)
        picked.add(ds[2]["caption"])
    assert len(picked) > 2


def test_persistent_training_workers_give_every_epoch_its_own_samples(tmp_path, world):
    """The same workers serve every epoch (their dataset copy keeps the epoch they started with), yet
    each epoch's samples are those of a loader without workers."""
    from engine import distributed as D
    from engine.loader import live_worker_pids
    from engine.trainer import TrainConfig
    from tasks.train_data import SampledTrainData

    ann = _json(tmp_path / "a.json", [{"image": f"ok{i}.png", "caption": ["one", "two", "three", "four"]} for i in range(4)])
    ds = PretrainDataset(ann, world, TRAIN, seed=3)
    collate = lambda items: {"image": torch.stack([s["image"] for s in items]), "seed": [s["seed"] for s in items]}  # noqa: E731

    def epochs(num_workers: int, persistent: bool) -> tuple[list, list]:
        data = SampledTrainData(ds, collate, TrainConfig(batch_size=2, seed=0, persistent_workers=persistent),
                                D.DistInfo(), num_workers=num_workers)
        out, pids = [], []
        for epoch in range(3):
            out.append([b for (b,) in data.batches(epoch, 0)])
            pids.append(live_worker_pids())
        return out, pids

    plain, _ = epochs(0, False)
    kept, pids = epochs(2, True)
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]  # started once, used for all 3 epochs
    assert plain[0][0]["seed"] != plain[1][0]["seed"]  # the epochs differ
    for a, b in zip(plain, kept):
        assert [x["seed"] for x in a] == [x["seed"] for x in b]
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


def test_apply_seeded_restores_rng():
    import random
    img = Image.new("RGB", (32, 32), (10, 200, 30))
    random.seed(1)
    torch.manual_seed(1)
    expect_py, expect_t = random.random(), torch.rand(1)
    random.seed(1)
    torch.manual_seed(1)
    a = apply_seeded(TRAIN, img, 123)
    assert random.random() == expect_py and torch.equal(torch.rand(1), expect_t)
    assert torch.equal(apply_seeded(TRAIN, img, 123), a)
    assert build_transform(16, train=False)(img).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="bicubic"):
        build_transform(16, True, TransformConfig(interpolation="lanczos9"))


@pytest.fixture(scope="module")
def tokenizer():
    words = "a red green blue circle square triangle star left right of above below big small the two".split()
    return train_wordpiece_tokenizer([" ".join(words)] * 3, vocab_size=200)


def _sample(caption, seed, index=0):
    return {"image": torch.zeros(3, 4, 4), "caption": caption, "image_idx": index, "index": index,
            "seed": seed, "n_bad": index % 2}


def test_collator_masks_independent_of_batch(tokenizer):
    col = PretrainCollator(tokenizer, max_length=30, mlm_prob=0.5)
    target = _sample("a big red circle left of two small blue squares", seed=11)
    others = [_sample("a star", 1, 1), _sample("two green triangles above the big blue star below a circle and " * 2, 2, 2)]
    alone = col([target])
    for batch in ([others[0], target, others[1]], [target] + others, others + [target]):
        out = col(batch)
        row = [s["caption"] for s in batch].index(target["caption"])
        n = int(alone["attention_mask"][0].sum())
        assert torch.equal(out["mlm_input_ids"][row, :n], alone["mlm_input_ids"][0])
        assert torch.equal(out["mlm_labels"][row, :n], alone["mlm_labels"][0])
        assert (out["mlm_labels"][row, n:] == -100).all() and (out["mlm_input_ids"][row, n:] == 0).all()
    assert (alone["mlm_labels"] != -100).any()
    sel = alone["mlm_labels"] != -100
    assert torch.equal(alone["mlm_labels"][sel], alone["input_ids"][sel])
    ids = alone["input_ids"][0]
    assert alone["mlm_labels"][0, 0] == -100 and alone["mlm_labels"][0, -1] == -100 and ids[0] == 2 and ids[-1] == 3
    out = col([target] + others)
    assert out["image"].shape == (3, 3, 4, 4) and out["image_idx"].tolist() == [0, 1, 2]
    assert out["index"].dtype == torch.long and out["n_bad"] == 1 and out["captions"][0] == target["caption"]
    assert not torch.equal(col([_sample(target["caption"], 12)])["mlm_labels"], alone["mlm_labels"])


def test_collator_truncates(tokenizer):
    col = PretrainCollator(tokenizer, max_length=8)
    out = col([_sample(" ".join(["red circle"] * 40), 0), _sample("a star", 1)])
    assert out["input_ids"].shape == (2, 8) and out["mlm_labels"].shape == (2, 8)
    assert out["input_ids"][0, -1] == tokenizer.sep_token_id and out["attention_mask"][1].sum() == 4


def test_same_batches_with_any_worker_count(tmp_path, world, tokenizer):
    ann = _json(tmp_path / "a.json", [{"image": f"ok{i % 4}.png", "caption": ["a red circle", "two blue stars left"]}
                                      for i in range(6)])
    ds = PretrainDataset(ann, world, TRAIN, seed=3)
    ds.set_epoch(2)
    col = PretrainCollator(tokenizer, mlm_prob=0.5)
    runs = [list(torch.utils.data.DataLoader(ds, batch_size=bs, num_workers=w, collate_fn=col))
            for w, bs in ((0, 3), (2, 3), (0, 1))]
    def per_sample(batches):
        out = []
        for b in batches:
            for r in range(len(b["index"])):
                keep = b["attention_mask"][r].bool()
                out.append((b["image"][r], b["mlm_input_ids"][r, keep], b["mlm_labels"][r, keep], int(b["image_idx"][r])))
        return out

    ref = per_sample(runs[0])
    assert len({s[1].numel() for s in ref}) > 1  # captions of different lengths were drawn
    for other in runs[1:]:
        for a, b in zip(ref, per_sample(other), strict=True):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and a[3] == b[3]
