"""tools.check_dataset on a synthetic set with planted missing, corrupt, truncated and duplicate images,
empty and over-long captions, repeated and invalid records."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.check_dataset import check_image, main


def _image(path: Path, seed: int, fmt: str = "PNG") -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path, fmt)


@pytest.fixture()
def planted(tmp_path: Path) -> dict:
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    for i in range(4):
        _image(root / "a" / f"ok{i}.png", i)
    _image(root / "a" / "photo.jpg", 9, "JPEG")
    data = (root / "a" / "photo.jpg").read_bytes()
    (root / "a" / "truncated.jpg").write_bytes(data[: len(data) // 2])       # partly downloaded
    (root / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    (root / "a" / "empty.jpg").write_bytes(b"")
    shutil.copy(root / "a" / "ok0.png", root / "a" / "copy_of_ok0.png")      # identical content, other path
    long_caption = " ".join(f"word{i}" for i in range(40))
    records = [
        {"image": "a/ok0.png", "caption": "A dog, on the beach!"},             # 0 kept
        {"image": "a/ok1.png", "caption": ["a cat", "???", "a cat on a mat"]},  # 1 kept, one caption removed
        {"image": "a/missing.png", "caption": "gone"},                          # 2 missing
        {"image": "a/truncated.jpg", "caption": "half a file"},                 # 3 unreadable
        {"image": "a/corrupt.png", "caption": "noise"},                         # 4 unreadable
        {"image": "a/empty.jpg", "caption": "nothing"},                         # 5 unreadable
        {"image": "a/ok2.png", "caption": "!!! ..."},                           # 6 empty after cleaning
        {"image": "a/ok3.png", "caption": long_caption},                        # 7 long (kept)
        {"image": "a/ok0.png", "caption": "a dog on the beach"},                # 8 duplicate of 0 after cleaning
        {"image": "a/copy_of_ok0.png", "caption": "the same picture"},          # 9 duplicate image file (kept)
        {"caption": "no image key"},                                            # 10 invalid
        {"image": "a/photo.jpg", "caption": 7},                                 # 11 invalid type
    ]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(records))
    ann2 = tmp_path / "ann2.json"
    ann2.write_text(json.dumps([{"image": "a/photo.jpg", "caption": "a photo"}]))
    return {"root": root, "ann": ann, "ann2": ann2, "records": records, "tmp": tmp_path}


def test_check_image_statuses(planted):
    a = planted["root"] / "a"
    assert check_image(str(a / "ok0.png")).status == "ok"
    assert check_image(str(a / "missing.png")).status == "missing"
    for name in ("truncated.jpg", "corrupt.png", "empty.jpg"):
        assert check_image(str(a / name)).status == "unreadable", name
    assert check_image(str(a / "ok0.png")).digest == check_image(str(a / "copy_of_ok0.png")).digest


def test_planted_problems_found_and_cleaned(planted, capsys):
    out, report = planted["tmp"] / "clean.json", planted["tmp"] / "report.json"
    rc = main(["--ann", str(planted["ann"]), str(planted["ann2"]), "--image-root", str(planted["root"]),
               "--format", "pretrain", "--out", str(out), "--report", str(report), "--no-progress", "--workers", "3"])
    assert rc == 0
    recs = planted["records"]
    expected = [recs[0], {"image": "a/ok1.png", "caption": ["a cat", "a cat on a mat"]}, recs[7], recs[9],
                {"image": "a/photo.jpg", "caption": "a photo"}]
    assert json.loads(out.read_text()) == expected
    rep = json.loads(report.read_text())
    stats = rep["files"][str(planted["ann"])]
    assert (stats["records"], stats["kept"], stats["missing_image"], stats["unreadable_image"], stats["empty_text"],
            stats["long_text"], stats["duplicate_record"], stats["invalid"], stats["empty_captions_removed"]) \
        == (12, 4, 1, 3, 1, 1, 1, 2, 1)
    root = planted["root"]
    assert rep["missing_images"] == [str(root / "a" / "missing.png")]
    assert set(rep["unreadable_images"]) == {str(root / "a" / n) for n in ("truncated.jpg", "corrupt.png", "empty.jpg")}
    assert rep["duplicate_image_groups"] == [[str(root / "a" / "ok0.png"), str(root / "a" / "copy_of_ok0.png")]]
    assert {d["index"] for d in rep["dropped_records"] if d["file"] == str(planted["ann"])} == {2, 3, 4, 5, 6, 8, 10, 11}
    assert rep["long_texts"] == [{"file": str(planted["ann"]), "index": 7, "words": 40}]
    text = capsys.readouterr().out
    assert "TOTAL" in text and "missing img" in text and "identical:" in text
    assert planted["ann"].read_text() == json.dumps(recs)  # the input is untouched


def test_drop_options_and_strict(planted):
    out = planted["tmp"] / "clean_strict.json"
    rc = main(["--ann", str(planted["ann"]), "--image-root", str(planted["root"]), "--format", "retrieval",
               "--out", str(out), "--no-progress", "--drop-long", "--drop-duplicate-images", "--max-words", "30",
               "--strict"])
    assert rc == 1
    kept = json.loads(out.read_text())
    assert [r["image"] for r in kept] == ["a/ok0.png", "a/ok1.png"]


def test_refuses_to_overwrite_an_input(planted, capsys):
    same = planted["tmp"] / "images" / ".." / "ann.json"  # the input under another spelling
    rc = main(["--ann", str(planted["ann"]), "--image-root", str(planted["root"]), "--format", "pretrain",
               "--out", str(same), "--no-progress"])
    assert rc == 2 and "refusing to overwrite" in capsys.readouterr().err
    assert json.loads(planted["ann"].read_text()) == planted["records"]


def test_vqa_and_nlvr2_formats(planted):
    root, tmp = planted["root"], planted["tmp"]
    vqa = tmp / "vqa.json"
    vqa.write_text(json.dumps([
        {"question_id": 1, "question": "What color is it?", "answer": ["red"], "image": "a/ok0.png", "dataset": "vqa"},
        {"question_id": 2, "question": "???", "answer": ["x"], "image": "a/ok1.png", "dataset": "vqa"},
        {"question_id": 3, "question": "Is it broken?", "image": "a/corrupt.png", "dataset": "vqa"}]))
    out = tmp / "vqa_clean.json"
    assert main(["--ann", str(vqa), "--image-root", str(root), "--format", "vqa", "--out", str(out),
                 "--no-progress"]) == 0
    assert [r["question_id"] for r in json.loads(out.read_text())] == [1]
    nlvr = tmp / "nlvr.json"
    nlvr.write_text(json.dumps([
        {"images": ["a/ok0.png", "a/ok1.png"], "sentence": "Both show noise.", "label": "True"},
        {"images": ["a/ok2.png", "a/missing.png"], "sentence": "One is gone.", "label": "False"},
        {"images": ["a/ok2.png"], "sentence": "Only one image.", "label": "False"},
        {"images": ["a/ok2.png", "a/ok3.png"], "sentence": "A label the loader refuses.", "label": "yes"}]))
    out, report = tmp / "nlvr_clean.json", tmp / "nlvr_report.json"
    assert main(["--ann", str(nlvr), "--image-root", str(root), "--format", "nlvr2", "--out", str(out),
                 "--report", str(report), "--no-progress"]) == 0
    assert [r["sentence"] for r in json.loads(out.read_text())] == ["Both show noise."]
    assert "key 'label'" in json.dumps(json.loads(report.read_text()))


def test_snli_ve_format_reads_flickr_ids_and_checks_labels(planted):
    root, tmp = planted["root"], planted["tmp"]
    _image(root / "2248275918.jpg", 5, "JPEG")  # SNLI-VE names Flickr30K images by id, without ".jpg"
    ve = tmp / "ve.json"
    ve.write_text(json.dumps([
        {"image": "2248275918", "sentence": "Two dogs are running.", "label": "entailment", "pair_id": 1},
        {"image": "a/ok1.png", "sentence": "A cat sleeps.", "label": "contradiction", "pair_id": 2},
        {"image": "12345", "sentence": "No such image.", "label": "neutral", "pair_id": 3},
        {"image": "a/ok2.png", "sentence": "A bad label.", "label": "maybe", "pair_id": 4},
        {"image": "a/corrupt.png", "sentence": "Unreadable.", "label": "neutral", "pair_id": 5}]))
    out, report = tmp / "ve_clean.json", tmp / "ve_report.json"
    assert main(["--ann", str(ve), "--image-root", str(root), "--format", "snli_ve", "--out", str(out),
                 "--report", str(report), "--no-progress"]) == 0
    assert [r["pair_id"] for r in json.loads(out.read_text())] == [1, 2]
    assert json.loads(out.read_text())[0]["image"] == "2248275918"  # kept as written: the loader adds .jpg
    reasons = [d["reason"] for d in json.loads(report.read_text())["dropped_records"]]
    assert any("12345.jpg" in r and r.startswith("missing") for r in reasons)
    assert any("key 'label'" in r and "maybe" in r for r in reasons)
    assert any(r.startswith("unreadable") for r in reasons)
    # the cleaned file is one the SNLI-VE reader accepts
    from datasets.snli_ve_data import read_snli_ve
    assert [r["_image"] for r in read_snli_ve(str(out))] == ["2248275918.jpg", "a/ok1.png"]


def test_bad_inputs_are_clear_errors(planted, capsys):
    bad = planted["tmp"] / "bad.json"
    bad.write_text('{"image": "a/ok0.png"}')
    rc = main(["--ann", str(bad), "--image-root", str(planted["root"]), "--format", "pretrain",
               "--out", str(planted["tmp"] / "x.json"), "--no-progress"])
    assert rc == 2 and "must hold a JSON list" in capsys.readouterr().err
    rc = main(["--ann", str(planted["ann"]), "--image-root", str(planted["tmp"] / "nope"), "--format", "pretrain",
               "--out", str(planted["tmp"] / "x.json"), "--no-progress"])
    assert rc == 2 and "image root not found" in capsys.readouterr().err


def test_replace_prefix_rewrites_albef_absolute_paths(planted):
    tmp, root = planted["tmp"], planted["root"]
    ann = tmp / "albef_style.json"
    ann.write_text(json.dumps([{"image": "/export/share/datasets/coco/a/ok0.png", "caption": "x y"},
                               {"image": "/export/share/datasets/coco/a/ok1.png", "caption": "z"}]))
    out = tmp / "rewritten.json"
    assert main(["--ann", str(ann), "--image-root", str(root), "--format", "pretrain", "--out", str(out),
                 "--replace-prefix", "/export/share/datasets/coco/", "", "--no-progress"]) == 0
    assert [r["image"] for r in json.loads(out.read_text())] == ["a/ok0.png", "a/ok1.png"]
