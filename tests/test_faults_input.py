"""Bad input and diverging runs end with one clear line: config values checked where they are declared,
annotation files with bad records, images that are rotated, 16-bit or huge, unreadable images counted
once each, and non-finite features or losses handled by train.nan_policy."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engine.checkpoint import load_checkpoint

from engine.config import ConfigError, load_config
from tasks.pretrain import PretrainConfig
from tests.pretrain_helpers import DEMO, ROOT
from tests.pretrain_helpers import tiny_overrides as _tiny_overrides


def tiny_overrides(data_root, out_dir, **extra) -> list[str]:
    """The shared tiny pre-training run, on one CPU thread."""
    return _tiny_overrides(data_root, out_dir, **{"train.num_threads": 1, **extra})


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _one_line_error(res: subprocess.CompletedProcess, rc: int, *needles: str) -> str:
    """The CLI ended with ``rc`` and one error line on stderr naming every needle, no traceback."""
    assert res.returncode == rc, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


# ----------------------------------------------------------------------------- config values
BAD_VALUES = [
    ("train.max_steps=0", "train.max_steps"),
    ("train.max_steps=-3", "train.max_steps"),
    ("train.log_every=0", "train.log_every"),
    ("train.save_every=0", "train.save_every"),
    ("loss.mlm_prob=0", "loss.mlm_prob"),
    ("loss.mlm_prob=1.5", "loss.mlm_prob"),
    ("data.max_bad_fraction=1.5", "data.max_bad_fraction"),
    ("data.max_bad_fraction=-0.1", "data.max_bad_fraction"),
    ("data.max_image_pixels=0", "data.max_image_pixels"),
    ("loss.queue_size=-1", "loss.queue_size"),                  # (checked before: kept as a guard)
    ("model.vision.patch_size=7", "model.vision.patch_size"),   # the demo's img_size is 64
    ("model.vision.num_heads=5", "model.vision.num_heads"),     # width 128
    ("model.vision.num_heads=0", "model.vision.num_heads"),
    ("model.text.num_heads=3", "model.text.num_heads"),         # hidden_size 128
    ("model.text.vocab_size=0", "model.text.vocab_size"),
    ("optim.lr=.nan", "optim.lr"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr_vision=.inf", "optim.lr_vision"),
]


@pytest.mark.parametrize("override,key", BAD_VALUES)
def test_bad_config_value_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, DEMO, [override])
    msg = str(info.value)
    assert key in msg and "\n" not in msg and "unknown config key" not in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train\.device"):
        load_config(PretrainConfig, DEMO, ["train.device=cuda"])
    # a checkpoint's saved config describes the machine that trained: it still loads here
    from tasks.common import saved_run_config
    assert saved_run_config(PretrainConfig, {"train": {"device": "cuda"}}).train.device == "auto"


@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_finetuning_data_sections_are_checked(task):
    from tasks.caption import CaptionConfig
    from tasks.vqa import VQAConfig
    cls = {"vqa": VQAConfig, "caption": CaptionConfig}[task]
    with pytest.raises(ConfigError, match=r"data\.max_bad_fraction"):
        load_config(cls, None, ["data.max_bad_fraction=2"])


def test_cli_bad_config_value_exits_2(tmp_path):
    res = _cli("run_pretrain.py", "--config", str(DEMO), "--set", "train.save_every=0",
               f"train.output_dir={tmp_path / 'out'}", "x-synthetic=null")
    _one_line_error(res, 2, "train.save_every")


# ----------------------------------------------------------------------------- annotation files
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tests.pretrain_helpers import make_world
    return make_world(tmp_path_factory.mktemp("shapes"))


def _records(world, name: str) -> list[dict]:
    import json
    return json.loads((world / name).read_text())


def _write(path, records=None, text: str | None = None, raw: bytes | None = None):
    import json
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(text if text is not None else json.dumps(records), encoding="utf-8")
    return path


def _bad_annotation(kind: str, good: list[dict], path, key: str):
    """``path`` holding ``good`` with one kind of damage at record 3 (``key`` is the record's text key)."""
    import json
    recs = [dict(r) for r in good]
    if kind == "missing_key":
        del recs[3][key]
        return _write(path, recs), "record 3", repr(key)
    if kind == "null":
        recs[3][key] = None
        return _write(path, recs), "record 3", "null"
    if kind == "wrong_type":
        recs[3][key] = 17
        return _write(path, recs), "record 3", "integer"
    if kind == "dict":
        return _write(path, {"annotations": recs}), str(path), "object"
    if kind == "truncated":
        parts = [json.dumps(r) for r in recs]
        head = "[" + ",\n".join(parts[:3]) + ",\n"
        return _write(path, text=head + parts[3][: len(parts[3]) // 2]), "record 3", "not valid JSON"  # cut in record 3
    if kind == "latin1":
        recs[3][key] = recs[3][key] + " caf\u00e9" if isinstance(recs[3][key], str) else "caf\u00e9"
        return _write(path, raw=json.dumps(recs, ensure_ascii=False).encode("latin-1")), "record 3", "UTF-8"
    raise AssertionError(kind)


DAMAGE = ["missing_key", "null", "wrong_type", "dict", "truncated", "latin1"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_pretraining_annotation_errors_name_file_and_record(world, tmp_path, kind):
    from datasets.formats import DataError, PretrainDataset
    from datasets.transforms import build_transform
    path, where, what = _bad_annotation(kind, _records(world, "pretrain.json"), tmp_path / "bad.json", "caption")
    with pytest.raises(DataError) as info:
        PretrainDataset([path], world, build_transform(16, True))
    msg = str(info.value)
    assert str(path) in msg and where in msg and what in msg and "\n" not in msg


def test_pretraining_caption_list_with_a_non_string(world, tmp_path):
    from datasets.formats import DataError, PretrainDataset
    from datasets.transforms import build_transform
    recs = _records(world, "pretrain.json")
    recs[5]["caption"] = ["a red circle", None]
    path = _write(tmp_path / "bad.json", recs)
    with pytest.raises(DataError, match=r"bad\.json.*record 5.*caption 1 is a null"):
        PretrainDataset([path], world, build_transform(16, True))


@pytest.mark.parametrize("kind", DAMAGE)
def test_vqa_annotation_errors_name_file_and_record(world, tmp_path, kind):
    from datasets.formats import DataError
    from datasets.vqa_data import read_vqa
    path, where, what = _bad_annotation(kind, _records(world, "vqa_train.json"), tmp_path / "vqa_bad.json",
                                        "question")
    with pytest.raises(DataError) as info:
        read_vqa([path], require_answers=True)
    msg = str(info.value)
    assert str(path) in msg and where in msg and what in msg and "\n" not in msg


def test_vqa_answer_list_not_utf8(world, tmp_path):
    from datasets.formats import DataError
    from datasets.vqa_data import read_answer_list
    path = _write(tmp_path / "answers.json", raw='["yes", "no", "caf\u00e9"]'.encode("latin-1"))
    with pytest.raises(DataError, match=r"answers\.json.*not UTF-8.*record 2"):
        read_answer_list(path)


def test_cli_pretraining_null_caption_exits_2(world, tmp_path):
    path, _, _ = _bad_annotation("null", _records(world, "pretrain.json"), tmp_path / "bad.json", "caption")
    res = _cli("run_pretrain.py", "--config", str(DEMO), "--set",
               *tiny_overrides(world, tmp_path / "out", **{"data.train_files": f"[{path}]"}))
    _one_line_error(res, 2, str(path), "record 3", "caption")


def test_cli_vqa_truncated_annotations_exit_2(world, tmp_path):
    path, _, _ = _bad_annotation("truncated", _records(world, "vqa_train.json"), tmp_path / "vqa_bad.json", "question")
    sets = {"data.train_files": f"[{path}]", "data.val_file": world / "vqa_val.json",
            "data.test_file": world / "vqa_test.json", "data.test_gt_file": world / "vqa_test_gt.json",
            "data.answer_list": world / "answer_list.json", "data.image_root": world, "x-synthetic": "null",
            "data.num_workers": 0, "train.output_dir": tmp_path / "out"}
    res = _cli("run_finetune.py", "--task", "vqa_shapes", "--set", *[f"{k}={v}" for k, v in sets.items()])
    _one_line_error(res, 2, str(path), "record 3", "not valid JSON")


# ----------------------------------------------------------------------------- image decoding
def test_exif_rotated_jpeg_is_decoded_upright(tmp_path):
    from PIL import Image
    from datasets.formats import load_image
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # stored: red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer rotates the stored pixels 90 degrees clockwise
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (20, 40)  # upright: portrait
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # left went to the top


def test_16bit_grayscale_png_is_scaled_not_white(tmp_path):
    import numpy as np
    from PIL import Image
    from datasets.formats import load_image
    ramp = (np.arange(64 * 64, dtype=np.float64).reshape(64, 64) / (64 * 64 - 1) * 65535).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "g16.png"))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    expected = np.round(ramp / 257.0)
    assert np.abs(out[..., 0].astype(float) - expected).max() <= 1 and (out[..., 0] == out[..., 2]).all()
    assert out.mean() == pytest.approx(127.5, abs=1.5)  # not clipped to white


def test_huge_jpeg_is_decoded_reduced_with_bounded_memory(tmp_path):
    from PIL import Image
    from datasets.formats import ImageLoadError, load_image
    from datasets.transforms import decode_min_side
    big = tmp_path / "big.jpg"
    Image.new("RGB", (12000, 12000), (200, 40, 40)).save(big, quality=50)
    need = decode_min_side(256, True)  # ViT-B/16 at 256 px, ALBEF's crop scale
    # without reduction the 144 MP image is over the default data.max_image_pixels: refused before decoding
    with pytest.raises(ImageLoadError, match="max_image_pixels"):
        load_image(big)
    # reduced on open (1/8): the decode is 1500 x 1500; measure the memory in a fresh process
    code = ("import resource, sys; sys.path.insert(0, sys.argv[3]); from datasets.formats import load_image; "
            "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; img = load_image(sys.argv[1], min_side=int(sys.argv[2])); "
            "print(img.size[0], img.size[1], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) // 1024)")
    res = subprocess.run([sys.executable, "-c", code, str(big), str(need), str(ROOT)], capture_output=True, text=True,
                         timeout=120)
    w, h, peak_mb = map(int, res.stdout.split())
    assert (w, h) == (1500, 1500) and min(w, h) >= need
    assert peak_mb < 100, peak_mb  # a full decode holds 432 MB of pixels (about 1.1 GB peak with the conversion)


def test_reduce_on_open_keeps_smaller_images_identical(tmp_path):
    import numpy as np
    from PIL import Image
    from datasets.formats import load_image
    g = np.random.default_rng(0)
    for size in (300, 837):  # below twice the needed side, and just below: not reduced
        path = tmp_path / f"j{size}.jpg"
        Image.fromarray(g.integers(0, 256, (size, size + 10, 3), dtype=np.uint8)).save(path, quality=90)
        plain, bounded = load_image(path), load_image(path, min_side=419)
        assert plain.size == bounded.size and np.array_equal(np.asarray(plain), np.asarray(bounded))
    path = tmp_path / "j838.jpg"  # twice the needed side: decoded at 1/2
    Image.fromarray(g.integers(0, 256, (838, 900, 3), dtype=np.uint8)).save(path)
    assert load_image(path, min_side=419).size == (450, 419)


def test_image_over_max_image_pixels_is_counted_bad(tmp_path):
    from PIL import Image
    from datasets.formats import PretrainDataset
    from datasets.transforms import build_transform
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "small.png")
    ann = _write(tmp_path / "ann.json", [{"image": "big.png", "caption": "big"}, {"image": "small.png", "caption": "small"}])
    ds = PretrainDataset([ann], tmp_path, build_transform(16, True), max_image_pixels=1000)
    s = ds[0]
    assert s["index"] == 1 and s["n_bad"] == 1
    path, reason = s["bad_images"][0]
    assert path.endswith("big.png") and "64 x 64 = 4096 pixels" in reason and "data.max_image_pixels=1000" in reason


# ----------------------------------------------------------------------------- unreadable images
def _many_images(root, n: int, bad: set[int]):
    """``n`` records of distinct 4x4 PNG files; the records in ``bad`` point at missing files."""
    from PIL import Image
    root.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        name = f"im{i:05d}.png"
        if i not in bad:
            Image.new("RGB", (4, 4), (i % 256, 0, 0)).save(root / name)
        recs.append({"image": name, "caption": f"picture {i % 7}"})
    return _write(root / "ann.json", recs)


def _epochs_through_check(ann, root, epochs: int, max_bad_fraction: float = 0.01, check_after: int = 500):
    """Iterate ``epochs`` shuffled epochs (batches of 8) of a PretrainDataset through the collator and
    the bad-image check, as the pre-training loop does; returns the check."""
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from datasets.formats import PretrainCollator, PretrainDataset
    from datasets.text import train_wordpiece_tokenizer
    from engine.batching import EpochBatchSampler
    from tasks.train_data import BadImageCheck
    ds = PretrainDataset([ann], root, T.ToTensor(), max_bad_fraction=max_bad_fraction)
    collate = PretrainCollator(train_wordpiece_tokenizer([f"picture {i}" for i in range(7)], 40), 8)
    sampler = EpochBatchSampler(len(ds), 8, 1, 0, 1, seed=1)
    check = BadImageCheck(max_bad_fraction, check_after, str(root), "input_ids", len(ds.image_ids))
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        sampler.set_position(epoch, 0)
        for batch in DataLoader(ds, batch_sampler=sampler, collate_fn=collate):
            check(batch)
    return check


def test_adjacent_bad_images_are_counted_once_each(tmp_path, caplog):
    import logging
    ann = _many_images(tmp_path / "img", 1506, set(range(700, 706)))  # 6 adjacent bad images: 0.4 %
    with caplog.at_level(logging.WARNING, logger="tasks"):
        check = _epochs_through_check(ann, tmp_path / "img", epochs=2)
    assert check.bad == 6  # distinct images, over two epochs and however often each was tried
    assert check.tried >= 2 * 1504
    warned = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(warned) == 6 and len({w.split()[3] for w in warned}) == 6  # once per image, not per epoch


def test_a_long_run_of_bad_images_is_judged_by_the_fraction(tmp_path):
    from datasets.formats import TooManyBadImagesError
    # 12 adjacent bad images of 1500 (0.8 %) are well within max_bad_fraction=0.02: no "N in a row" crash
    ann = _many_images(tmp_path / "ok", 1500, set(range(100, 112)))
    assert _epochs_through_check(ann, tmp_path / "ok", epochs=1, max_bad_fraction=0.02).bad == 12
    # 60 adjacent ones (4 %) are not: stopped by the fraction rule, naming the config keys
    ann = _many_images(tmp_path / "bad", 1500, set(range(100, 160)))
    with pytest.raises(TooManyBadImagesError, match=r"data\.max_bad_fraction=0\.02.*data\.image_root"):
        _epochs_through_check(ann, tmp_path / "bad", epochs=1, max_bad_fraction=0.02)


def test_all_images_bad_stops_at_once(tmp_path):
    from datasets.formats import TooManyBadImagesError
    ann = _many_images(tmp_path / "img", 600, set(range(600)))
    with pytest.raises(TooManyBadImagesError, match="distinct training images failed to load") as info:
        _epochs_through_check(ann, tmp_path / "img", epochs=1)
    assert "\n" not in str(info.value)


def test_cli_all_images_missing_exits_2(world, tmp_path):
    res = _cli("run_pretrain.py", "--config", str(DEMO), "--set",
               *tiny_overrides(world, tmp_path / "out", **{"data.image_root": tmp_path / "nowhere"}))
    _one_line_error(res, 2, "data.image_root", "no such directory")


def test_cli_all_images_undecodable_exits_2(world, tmp_path):
    """Every image exists but none decodes: the bad-image rule stops the run with one line."""
    import shutil
    root = tmp_path / "corrupt"
    shutil.copytree(world, root)
    for img in (root / "images").rglob("*.*"):
        img.write_bytes(b"not an image")
    res = _cli("run_pretrain.py", "--config", str(DEMO), "--set",
               *tiny_overrides(world, tmp_path / "out", **{"data.image_root": root}))
    _one_line_error(res, 2, "failed to load", "data.image_root")


def test_bad_images_logged_with_the_step_and_reported_at_the_end(world, tmp_path, caplog, capsys):
    import json
    import logging
    from tasks.pretrain import run
    from tests.pretrain_helpers import read_log
    recs = _records(world, "pretrain.json")
    recs[5]["image"] = "images/missing.png"
    ann = _write(tmp_path / "ann.json", recs)
    cfg = load_config(PretrainConfig, DEMO, tiny_overrides(world, tmp_path / "out", **{
        "data.train_files": f"[{ann}]", "data.max_bad_fraction": 0.2, "data.bad_check_after": 8,
        "data.num_workers": 1, "train.log_every": 3}))
    with caplog.at_level(logging.WARNING):
        state = run(cfg)
    assert state.global_step == 12
    log = [r for r in read_log(tmp_path / "out") if "loss" in r]
    assert [r["step"] for r in log] == [3, 6, 9, 12] and all("data/bad_images" in r for r in log)
    assert log[-1]["data/bad_images"] == 1 and log[-1]["data/images_tried"] >= 96
    assert "end of training: data/bad_images 1" in capsys.readouterr().out
    # warned once in the main process, though each epoch's loader worker tried it again
    warned = [r for r in caplog.records if "missing.png" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    assert json.loads((tmp_path / "out" / "log.jsonl").read_text().splitlines()[-1])


# ----------------------------------------------------------------------------- diverging runs
def test_cli_diverging_run_stops_naming_the_step(world, tmp_path):
    res = _cli("run_pretrain.py", "--config", str(DEMO), "--set",
               *tiny_overrides(world, tmp_path / "out", **{"optim.lr": 1000, "optim.lr_vision": 1000,
                                                           "schedule.warmup_steps": 0, "train.epochs": 4}))
    line = _one_line_error(res, 1, "non-finite loss at step", "train.nan_policy")
    assert "sample_hard_negatives" not in line


def _nan_images_at(monkeypatch, step: int) -> None:
    """The images of optimiser step ``step`` (0-based) become NaN, as a diverging encoder's features would."""
    from tasks.pretrain import PretrainTask
    real = PretrainTask.train_batches

    def poisoned(self, epoch, start_step):
        for group in real(self, epoch, start_step):
            self._groups = getattr(self, "_groups", 0) + 1
            if self._groups == step + 1:
                for b in group:
                    b["image"] = torch.full_like(b["image"], float("nan"))
            yield group

    monkeypatch.setattr(PretrainTask, "train_batches", poisoned)


def test_non_finite_features_stop_naming_the_step(world, tmp_path, monkeypatch):
    from engine.trainer import NonFiniteLossError
    from tasks.pretrain import run
    _nan_images_at(monkeypatch, 2)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 2 \(epoch 0\)"):
        run(load_config(PretrainConfig, DEMO, tiny_overrides(world, tmp_path / "out")))


def test_non_finite_features_skip_the_step_and_training_goes_on(world, tmp_path, monkeypatch):
    import math
    from tasks.pretrain import run
    from tests.pretrain_helpers import read_log
    _nan_images_at(monkeypatch, 2)
    state = run(load_config(PretrainConfig, DEMO, tiny_overrides(world, tmp_path / "out", **{"train.nan_policy": "skip"})))
    assert state.global_step == 12
    log = [r for r in read_log(tmp_path / "out") if "loss" in r]
    assert [r["step"] for r in log if r.get("nan_skipped")] == [3]
    # the skipped step left no NaN in the queue: every later step is finite
    assert all(math.isfinite(r["loss"]) for r in log if r["step"] != 3)
    ckpt = load_checkpoint(tmp_path / "out" / "checkpoint_last.pth")
    for part in ("model", "objective"):  # the model, its momentum copy and the queues
        assert all(bool(torch.isfinite(v).all()) for v in ckpt[part].values() if v.is_floating_point())
