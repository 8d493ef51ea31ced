"""NLVR2: data format and labels, the twin cross-attention model (both images really used, the
pre-trained cross-attention copied into both twins), and end-to-end fine-tuning / evaluation on a
tiny shapes world from a tiny pre-training checkpoint."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import run_finetune
from datasets.nlvr2_data import LABELS, NLVR2Dataset, int_to_label, label_to_int, read_nlvr2
from datasets.transforms import build_transform
from engine.checkpoint import load_checkpoint
from engine.config import ConfigError, load_config
from models.nlvr2 import NLVR2HeadConfig, NLVR2Model
from models.vlp import VLPConfig
from tasks.nlvr2 import NLVR2Config, load_nlvr2_weights
from tests.pretrain_helpers import ROOT, tiny_overrides
from tests.pretrain_helpers import pretrained, world  # noqa: F401 (module fixtures)

NLVR2_DEMO = ROOT / "configs/demo/nlvr2.yaml"


# ------------------------------------------------------------------ fixtures
def model_overrides() -> list[str]:
    return [o for o in tiny_overrides(Path("."), Path(".")) if o.startswith(("model.", "tokenizer."))]


def nlvr2_overrides(world: Path, out: Path, **extra) -> list[str]:
    o = {
        "data.train_files": f"[{world / 'nlvr2_train.json'}]", "data.dev_files": f"[{world / 'nlvr2_dev.json'}]",
        "data.test_files": f"[{world / 'nlvr2_test.json'}]", "data.image_root": str(world),
        "x-synthetic": "null", "data.num_workers": 0, "data.eval_batch_size": 3,
        "train.output_dir": str(out), "train.batch_size": 4, "train.epochs": 2, "train.log_every": 1,
        "train.progress": "false", "schedule.warmup_steps": 1,
    }
    o.update(extra)
    return model_overrides() + [f"{k}={v}" for k, v in o.items()]


def tiny_model(merge: str = "mean", vocab: int = 50) -> NLVR2Model:
    cfg = load_config(NLVR2Config, NLVR2_DEMO, model_overrides())
    mcfg = dataclasses.replace(cfg.model, text=dataclasses.replace(cfg.model.text, vocab_size=vocab))
    torch.manual_seed(0)
    return NLVR2Model(mcfg, NLVR2HeadConfig(merge=merge)).eval()


def inputs(b: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    left, right = torch.randn(b, 3, 32, 32, generator=g), torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(5, 50, (b, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return left, right, ids, mask


# ------------------------------------------------------------------ labels and data format
def test_label_mapping_round_trips():
    assert LABELS == {"False": 0, "True": 1}
    for name in ("True", "False"):
        assert int_to_label(label_to_int(name)) == name
    for value in (0, 1):
        assert label_to_int(int_to_label(value)) == value
    assert label_to_int(True) == 1 and label_to_int(False) == 0
    for bad in ("true", "yes", 1, None):
        with pytest.raises(ValueError, match="True"):
            label_to_int(bad)
    with pytest.raises(ValueError):
        int_to_label(2)


def test_reader_errors_name_file_and_record(tmp_path):
    good = {"images": ["a.png", "b.png"], "sentence": "The left image has a circle.", "label": "True"}
    cases = [
        ({**good, "images": ["a.png"]}, "record 1: 'images' must be a list of two"),
        ({**good, "label": "maybe"}, "record 1: NLVR2 label must be"),
        ({k: v for k, v in good.items() if k != "sentence"}, "record 1: missing key 'sentence'"),
        ({**good, "label": 1}, "record 1: key 'label' must be"),
    ]
    for bad, message in cases:
        path = tmp_path / "ann.json"
        path.write_text(json.dumps([good, bad]))
        with pytest.raises(ValueError, match=message) as err:
            read_nlvr2(path)
        assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_nlvr2(tmp_path / "missing.json", hint="get it somewhere")
    path.write_text(json.dumps([good]))
    assert read_nlvr2(path)[0]["_label"] == 1


def test_dataset_reads_both_images_and_cleans_the_sentence(world):
    ds = NLVR2Dataset(world / "nlvr2_dev.json", world, build_transform(32, False), seed=0)
    rec = json.loads((world / "nlvr2_dev.json").read_text())[0]
    item = ds[0]
    assert item["label"] == label_to_int(rec["label"])
    assert item["sentence"] == rec["sentence"].lower().rstrip(".")
    left, right = ds.image_paths(0)
    assert left.endswith(rec["images"][0]) and right.endswith(rec["images"][1])
    assert item["image_left"].shape == item["image_right"].shape == (3, 32, 32)
    assert not torch.equal(item["image_left"], item["image_right"])


# ------------------------------------------------------------------ the model
def test_fused_cls_depends_on_each_image_and_the_head_receives_it():
    model = tiny_model()
    left, right, ids, mask = inputs()
    with torch.no_grad():
        base = model.fused_cls(left, right, ids, mask)
        only_right = model.fused_cls(left, right + 1.0, ids, mask)
        only_left = model.fused_cls(left + 1.0, right, ids, mask)
    assert (base - only_right).abs().max() > 1e-3
    assert (base - only_left).abs().max() > 1e-3
    seen = {}
    model.cls_head.register_forward_pre_hook(lambda m, a: seen.setdefault("head_in", a[0].detach().clone()))
    with torch.no_grad():
        logits = model(left, right, ids, mask)
    assert torch.equal(seen["head_in"], base)
    assert torch.allclose(logits, model.cls_head(base))


def test_each_cross_attention_reads_its_own_image():
    model = tiny_model()
    left, right, ids, mask = inputs()
    seen: dict[str, torch.Tensor] = {}
    layer = model.fusion_layers()[0]
    layer.crossattention.register_forward_hook(lambda m, a, o: seen.setdefault("left", a[1].detach().clone()))
    model.cross_right[0].register_forward_hook(lambda m, a, o: seen.setdefault("right", a[1].detach().clone()))
    with torch.no_grad():
        model(left, right, ids, mask)
        emb_left, emb_right = model.base.encode_image(left), model.base.encode_image(right)
    assert torch.allclose(seen["left"], emb_left, atol=1e-5)
    assert torch.allclose(seen["right"], emb_right, atol=1e-5)


def test_swapping_images_matters_once_the_twins_differ():
    model = tiny_model()
    left, right, ids, mask = inputs()
    with torch.no_grad():
        # identical twins + mean merge: symmetric at initialisation (documented)
        assert torch.allclose(model(left, right, ids, mask), model(right, left, ids, mask), atol=1e-5)
        for p in model.cross_right.parameters():  # what fine-tuning does: the twins diverge
            p.add_(0.05 * torch.randn_like(p))
        a, b = model.fused_cls(left, right, ids, mask), model.fused_cls(right, left, ids, mask)
    assert (a - b).abs().max() > 1e-3


def test_training_breaks_the_left_right_symmetry():
    """A toy task that only the images decide, and only if left and right are told apart: label 1
    when the left image is the bright one, 0 when the right one is. From the symmetric
    initialisation (identical twins, mean merge) a few steps learn it."""
    import torch.nn.functional as F
    model = tiny_model().train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        y = torch.randint(0, 2, (n,), generator=g)
        left = torch.randn(n, 3, 32, 32, generator=g) + 1.5 * (y == 1).float()[:, None, None, None]
        right = torch.randn(n, 3, 32, 32, generator=g) + 1.5 * (y == 0).float()[:, None, None, None]
        ids = torch.full((n, 5), 7)
        return left, right, ids, torch.ones_like(ids), y

    test = batch(64)
    acc = 0.0
    for step in range(40):
        left, right, ids, mask, y = batch(16)
        loss = F.cross_entropy(model(left, right, ids, mask), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 4:
            model.eval()
            with torch.no_grad():
                acc = (model(*test[:4]).argmax(1) == test[4]).float().mean().item()
            model.train()
            if acc >= 0.95:
                break
    assert acc >= 0.95, acc


@pytest.mark.parametrize("merge", ["mean", "linear"])
def test_equal_images_give_the_pretrained_fusion(merge):
    """With the same image on both sides, the twin layer computes exactly the base model's fusion."""
    model = tiny_model(merge)
    left, _, ids, mask = inputs()
    with torch.no_grad():
        text = model.base.encode_text(ids, mask)
        image = model.base.encode_image(left)
        expected = model.base.fuse(text, mask, image)
        got = model.fuse_pair(text, mask, image, image)
    assert torch.allclose(got, expected, atol=1e-5)


def test_every_trainable_parameter_gets_a_gradient():
    """Unused base parts are frozen, so DDP needs no find_unused_parameters."""
    model = tiny_model("linear").train()
    left, right, ids, mask = inputs()
    model(left, right, ids, mask).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "base.itm_head.weight" in frozen and "base.vision_proj.weight" in frozen
    groups = model.param_groups(1e-4, 1e-5, 0.05)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}


def test_pretraining_checkpoint_initialises_both_cross_attention_copies(pretrained):
    ckpt = load_checkpoint(pretrained)
    state = ckpt["model"]
    model = tiny_model(vocab=len(ckpt["tokenizer"]["vocab"]))
    report = load_nlvr2_weights(model, ckpt, str(pretrained))
    report.raise_if_unexpected()
    n_text = model.cfg.text.num_text_layers
    for i, (layer, right) in enumerate(zip(model.fusion_layers(), model.cross_right)):
        for name, tensor in right.state_dict().items():
            source = state[f"text.encoder.layer.{n_text + i}.crossattention.{name}"]
            assert torch.equal(tensor, source), name
            assert torch.equal(layer.crossattention.state_dict()[name], source), name
            assert tensor.data_ptr() != layer.crossattention.state_dict()[name].data_ptr()  # a copy, not shared
    for key in ("visual.pos_embed", f"text.encoder.layer.{n_text}.attention.self.query.weight"):
        assert torch.equal(model.state_dict()["base." + key], state[key])
    # the momentum copy is the training objective's (ckpt["objective"]): nothing of it reaches the model
    assert any(k.startswith("visual_m.") for k in ckpt["objective"])
    assert not any("_m." in k or "queue" in k for k in report.loaded + report.unexpected + report.missing)
    assert all(k.startswith(("cross_right.", "cls_head.")) for k in report.missing)


# ------------------------------------------------------------------ end to end
def test_finetune_interrupt_resume_evaluate_and_outputs(world, pretrained, tmp_path, capsys, monkeypatch):
    """Fine-tune from the tiny pre-training checkpoint, stopped after step 3 (as by a signal) and
    resumed; then the outputs are checked against a re-computation and --evaluate reproduces them."""
    from engine.trainer import Trainer
    out = tmp_path / "ft"
    args = ["--task", "nlvr2_shapes", "--checkpoint", str(pretrained), "--set", *nlvr2_overrides(world, out)]
    original = Trainer._stop_requested
    monkeypatch.setattr(Trainer, "_stop_requested", lambda self, stop: self.state.global_step == 3 or original(self, stop))
    assert run_finetune.main(args) == 0
    assert not (out / "results.json").exists()  # stopped: no final evaluation
    monkeypatch.setattr(Trainer, "_stop_requested", original)
    assert run_finetune.main(args[:4] + ["--resume", str(out)] + args[4:]) == 0

    results = json.loads((out / "results.json").read_text())
    assert (out / "checkpoint_best.pth").is_file() and results["checkpoint"].endswith("checkpoint_best.pth")
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]  # 8 pairs / batch 4 x 2 epochs
    dev_accs = [r["eval/dev_acc"] for r in log if "eval/dev_acc" in r]
    assert len(dev_accs) == 2 and results["dev"]["accuracy"] == pytest.approx(max(dev_accs))
    for split in ("dev", "test"):
        gold = json.loads((world / f"nlvr2_{split}.json").read_text())
        preds = json.loads((out / f"predictions_{split}.json").read_text())
        assert len(preds) == len(gold) == results[split]["n"]
        for p, g in zip(preds, gold):
            assert p["label"] == g["label"] and p["images"] == g["images"] and p["prediction"] in ("True", "False")
            assert p["correct"] == (p["prediction"] == p["label"])
            assert (p["prediction"] == "True") == (p["prob_true"] > 0.5)
        acc = 100.0 * sum(p["prediction"] == g["label"] for p, g in zip(preds, gold)) / len(gold)
        assert results[split]["accuracy"] == pytest.approx(acc)
    printed = capsys.readouterr().out
    assert "dev   accuracy" in printed and "test  accuracy" in printed

    # --evaluate on the fine-tuned checkpoint reproduces the numbers
    ev = tmp_path / "ev"
    rc = run_finetune.main(["--task", "nlvr2_shapes", "--checkpoint", str(out / "checkpoint_best.pth"), "--evaluate",
                            "--set", *nlvr2_overrides(world, ev)])
    assert rc == 0
    again = json.loads((ev / "results.json").read_text())
    for split in ("dev", "test"):
        assert again[split]["accuracy"] == pytest.approx(results[split]["accuracy"])


def test_clear_errors(world, pretrained, tmp_path, capsys):
    base = ["--task", "nlvr2_shapes"]
    # --evaluate with a pre-training checkpoint: no classifier to evaluate
    assert run_finetune.main(base + ["--checkpoint", str(pretrained), "--evaluate",
                                     "--set", *nlvr2_overrides(world, tmp_path / "a")]) == 2
    assert "no NLVR2 classifier" in capsys.readouterr().err
    # a config whose model does not match the checkpoint
    assert run_finetune.main(base + ["--checkpoint", str(pretrained), "--set",
                                     *nlvr2_overrides(world, tmp_path / "b", **{"model.text.intermediate_size": 48})]) == 2
    err = capsys.readouterr().err  # named by config key before any weight is loaded
    assert "model.text.intermediate_size: checkpoint 64, config 48" in err
    # a missing annotation file names the file
    assert run_finetune.main(base + ["--set", *nlvr2_overrides(world, tmp_path / "c", **{
        "data.dev_files": f"[{world / 'nope.json'}]"})]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert run_finetune.main(base + ["--zero-shot", "--checkpoint", str(pretrained)]) == 2
    assert "zero-shot" in capsys.readouterr().err
