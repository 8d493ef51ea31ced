"""models/text.py: HF BERT equivalence, weight-loading report (models/loading.py), masks, gradient checkpointing."""
import json
from dataclasses import replace

import pytest
import torch
from transformers import BertConfig, BertForPreTraining

import models.text as text_mod
from models.loading import load_bert_weights
from models.text import MLMHead, TextConfig, TextTransformer, TransformerLayer

V, H, HEADS, INTER, LAYERS = 99, 32, 4, 37, 4


def tiny_cfg(**kw) -> TextConfig:
    base = dict(vocab_size=V, hidden_size=H, num_text_layers=2, num_fusion_layers=2, num_heads=HEADS,
                intermediate_size=INTER, max_position_embeddings=64, encoder_width=24)
    return TextConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def hf_bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=INTER, max_position_embeddings=64)
    model = BertForPreTraining(cfg).eval()
    with torch.no_grad():  # random non-trivial LayerNorms and biases so that every key matters
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_safetensors(model, d):
    model.save_pretrained(d)
    return d


def save_bin_legacy(model, d):
    """Old-style directory: pytorch_model.bin with LayerNorm.gamma/beta names (and tied duplicates)."""
    d.mkdir(exist_ok=True)
    model.config.save_pretrained(d)
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v.clone()
          for k, v in model.state_dict().items()}
    torch.save(sd, d / "pytorch_model.bin")
    return d


def build_ours(cfg: TextConfig):
    text, head = TextTransformer(cfg).eval(), MLMHead(cfg).eval()
    head.decoder.weight = text.embeddings.word_embeddings.weight  # tie like the caller does
    return text, head


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_matches_hf_bert(hf_bert, tmp_path, fmt):
    d = save_safetensors(hf_bert, tmp_path) if fmt == "safetensors" else save_bin_legacy(hf_bert, tmp_path / "b")
    assert (d / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")).is_file()
    text, head = build_ours(tiny_cfg())
    report = load_bert_weights(text, head, d)

    # report: cross-attention new, pooler + NSP ignored, everything else loaded
    cross = [k for k in report.missing if ".crossattention." in k]
    assert cross and set(report.missing) == set(cross)
    assert all(report.expected_missing[k] == "new cross-attention" for k in cross)
    pooler = [k for k in report.unexpected if "pooler" in k]
    assert pooler and all("pooler" in report.expected_unexpected[k] for k in pooler)
    assert any("seq_relationship" in k for k in report.unexpected)
    assert not report.mismatched
    report.raise_if_unexpected()  # everything unexpected / missing is explained
    assert "new cross-attention" in report.summary()
    # fusion layers continue BERT's numbering: fusion layer 0 = BERT layer 2
    torch.testing.assert_close(text.encoder.layer[2].intermediate.dense.weight,
                               hf_bert.bert.encoder.layer[2].intermediate.dense.weight, atol=0, rtol=0)

    ids = torch.randint(1, V, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    valid = mask.bool()
    full_text, full_head = build_ours(tiny_cfg(num_text_layers=LAYERS, num_fusion_layers=0))
    assert not load_bert_weights(full_text, full_head, d).missing
    with torch.no_grad():
        ref = hf_bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        torch.testing.assert_close(text.forward_text(ids, mask)[valid], ref.hidden_states[2][valid],
                                   atol=1e-5, rtol=0)
        out = full_text.forward_text(ids, mask)
        torch.testing.assert_close(out[valid], ref.hidden_states[LAYERS][valid], atol=1e-5, rtol=0)
        # MLM logits at the masked positions only
        rows, cols = torch.tensor([0, 1, 2]), torch.tensor([1, 4, 2])
        torch.testing.assert_close(full_head(out[rows, cols]), ref.prediction_logits[rows, cols],
                                   atol=1e-5, rtol=0)


def test_untied_head_and_partial_model(hf_bert, tmp_path):
    """An untied decoder is loaded from the word embeddings; extra BERT layers are reported as unused."""
    save_safetensors(hf_bert, tmp_path)
    text, head = TextTransformer(tiny_cfg(num_text_layers=1, num_fusion_layers=1)), MLMHead(tiny_cfg())
    report = load_bert_weights(text, head, tmp_path)
    torch.testing.assert_close(head.decoder.weight, hf_bert.bert.embeddings.word_embeddings.weight)
    extra = [k for k in report.unexpected if ".layer.3." in k]
    assert extra and all("beyond" in report.expected_unexpected[k] for k in extra)
    report.raise_if_unexpected()


def test_config_mismatch_and_missing_dir(hf_bert, tmp_path):
    d = save_safetensors(hf_bert, tmp_path / "bert")
    text, head = build_ours(tiny_cfg(intermediate_size=64))
    with pytest.raises(ValueError, match="intermediate_size"):
        load_bert_weights(text, head, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_attention_heads"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_attention_heads"):
        load_bert_weights(*build_ours(tiny_cfg()), d)
    missing = tmp_path / "no_such_bert"
    with pytest.raises(FileNotFoundError, match="no_such_bert"):
        load_bert_weights(*build_ours(tiny_cfg()), missing)


def test_report_raises_on_unexplained(hf_bert, tmp_path):
    save_safetensors(hf_bert, tmp_path)
    text, head = build_ours(tiny_cfg(max_position_embeddings=32))
    with pytest.raises(ValueError, match="position_embeddings"):
        load_bert_weights(text, head, tmp_path)
    report = load_bert_weights(text, head, tmp_path, allow_mismatch=True)
    assert any("position_embeddings" in m for m in report.mismatched)
    with pytest.raises(ValueError, match="position_embeddings"):
        report.raise_if_unexpected()
    report.raise_if_unexpected(allow=True)


def reference_attention(x, wq, bq, wk, bk, wv, bv, heads, mask):
    """Plain float64 masked softmax attention; mask (B, Q, K) bool, True = attend."""
    B, Q, Hd = x.shape
    d = Hd // heads

    def split(t):
        return t.view(B, -1, heads, d).transpose(1, 2)

    q, k, v = split(x @ wq.T + bq), split(x @ wk.T + bk), split(x @ wv.T + bv)
    s = q @ k.transpose(-1, -2) / d ** 0.5
    s = s.masked_fill(~mask[:, None], float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, Q, Hd)


def test_causal_self_attention_matches_reference():
    torch.manual_seed(1)
    layer = TransformerLayer(H, HEADS, INTER, cross_attention=False, causal=True,
                             hidden_dropout=0.0, attention_dropout=0.0).double().eval()
    x = torch.randn(2, 7, H, dtype=torch.float64)
    pad = torch.ones(2, 7, dtype=torch.long)
    pad[1, 5:] = 0
    out = layer(x, pad)

    a = layer.attention
    mask = torch.tril(torch.ones(7, 7, dtype=torch.bool))[None] & pad.bool()[:, None, :]
    ctx = reference_attention(x, a.self.query.weight, a.self.query.bias, a.self.key.weight, a.self.key.bias,
                              a.self.value.weight, a.self.value.bias, HEADS, mask)
    h = a.output.LayerNorm(x + a.output.dense(ctx))
    ffn = layer.output.dense(torch.nn.functional.gelu(layer.intermediate.dense(h)))
    ref = layer.output.LayerNorm(h + ffn)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    # really causal: a later token does not change earlier outputs; the per-call override turns it off
    x2 = x.clone()
    x2[:, 4] += 1.0
    torch.testing.assert_close(layer(x2, pad)[:, :4], out[:, :4], atol=1e-10, rtol=0)
    assert not torch.allclose(layer(x2, pad, causal=False)[:, :4], layer(x, pad, causal=False)[:, :4])


def test_cross_attention_ignores_padded_image_tokens():
    torch.manual_seed(2)
    cfg = tiny_cfg(hidden_dropout=0.0, attention_dropout=0.0)
    text = TextTransformer(cfg).eval()
    hidden = torch.randn(2, 5, H)
    img = torch.randn(2, 6, cfg.encoder_width)
    img_atts = torch.ones(2, 6, dtype=torch.long)
    img_atts[0, 4:] = 0
    out = text.forward_fusion(hidden, None, img, img_atts)
    img2 = img.clone()
    img2[0, 4:] = 100 * torch.randn(2, cfg.encoder_width)
    torch.testing.assert_close(text.forward_fusion(hidden, None, img2, img_atts), out, atol=1e-6, rtol=0)
    img2[0, 1] += 1.0  # a real image token does matter
    assert not torch.allclose(text.forward_fusion(hidden, None, img2, img_atts), out, atol=1e-4)
    with pytest.raises(ValueError, match="encoder_hidden"):
        text.forward_fusion(hidden, None, None)


def test_gradient_checkpointing_same_gradients(monkeypatch):
    cfg = tiny_cfg()  # dropout on: checkpointing must replay the same dropout masks
    ids = torch.randint(1, V, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    img = torch.randn(2, 5, cfg.encoder_width)

    def grads(checkpointing: bool):
        torch.manual_seed(3)
        text = TextTransformer(replace(cfg, grad_checkpointing=checkpointing)).train()
        torch.manual_seed(4)
        out = text.forward_fusion(text.forward_text(ids, mask), mask, img)
        (out ** 2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in text.named_parameters() if p.grad is not None}

    calls = []
    real = text_mod.checkpoint
    monkeypatch.setattr(text_mod, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    out0, g0 = grads(False)
    assert not calls
    out1, g1 = grads(True)
    assert len(calls) == cfg.num_text_layers + cfg.num_fusion_layers
    torch.testing.assert_close(out1, out0, atol=0, rtol=0)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5, msg=n)
