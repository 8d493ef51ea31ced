"""Fusion with an image index (``image_index``): row b cross-attends to ``image_embeds[image_index[b]]``
with the keys/values projected once per image. Same outputs and gradients as gathering the image
tokens per pair, and exactly the analytic number of FLOPs fewer (the ITM step of pre-training fuses
3 pairs per image; retrieval re-ranking fuses k_test captions per image)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.text import TextConfig, TextTransformer, TransformerLayer


def _inputs(m: int = 3, b: int = 7, n: int = 5, length: int = 4, hidden: int = 16, width: int = 24):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(m, n, width, generator=g, requires_grad=True)
    text = torch.randn(b, length, hidden, generator=g, requires_grad=True)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, -1] = 0
    image_mask = torch.ones(m, n, dtype=torch.long)
    image_mask[2, -2:] = 0
    index = torch.tensor([0, 1, 2, 2, 0, 1, 1])
    return image, text, mask, image_mask, index


def _grads(*tensors_and_modules):
    out = []
    for x in tensors_and_modules:
        if isinstance(x, torch.nn.Module):
            out += [p.grad.clone() for p in x.parameters() if p.grad is not None]
        else:
            out.append(x.grad.clone())
    return out


def test_layer_with_index_equals_gathered_inputs():
    torch.manual_seed(0)
    layer = TransformerLayer(16, 2, 32, cross_attention=True, encoder_width=24, hidden_dropout=0.0,
                             attention_dropout=0.0)
    image, text, mask, image_mask, index = _inputs()
    ref = layer(text, mask, image[index], image_mask[index])
    ref.square().sum().backward()
    g_ref = _grads(image, text, layer)
    for t in (image, text, *layer.parameters()):
        t.grad = None
    out = layer(text, mask, image, image_mask, encoder_index=index)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    for a, b in zip(_grads(image, text, layer), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fusion_with_index_saves_exactly_the_repeated_projections(checkpointing):
    cfg = TextConfig(vocab_size=40, hidden_size=16, num_text_layers=1, num_fusion_layers=2, num_heads=2,
                     intermediate_size=32, max_position_embeddings=8, hidden_dropout=0.0, attention_dropout=0.0,
                     encoder_width=24, grad_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = TextTransformer(cfg).train()
    image, text, mask, _, index = _inputs()
    with FlopCounterMode(display=False) as fc_ref:
        ref = model.forward_fusion(text, mask, image[index])
        ref.sum().backward()
    g_ref = _grads(image, text, model)
    for t in (image, text, *model.parameters()):
        t.grad = None
    with FlopCounterMode(display=False) as fc:
        out = model.forward_fusion(text, mask, image, image_index=index)
        out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(image, text, model), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # keys + values: 2 projections of n x width -> hidden per image and layer; forward + backward
    # (weight and input gradients) = 3x; with checkpointing the forward runs once more
    m, b, n, width, hidden = 3, 7, 5, 24, 16
    per_image = 2 * 2 * n * width * hidden * cfg.num_fusion_layers
    saved = (b - m) * per_image * (4 if checkpointing else 3)
    assert fc_ref.get_total_flops() - fc.get_total_flops() == saved


def _attention_case(index: list[int], items: int, heads: int = 2, q_len: int = 3, n: int = 5, hidden: int = 8):
    g = torch.Generator().manual_seed(len(index) * 31 + items)
    kv = torch.randn(items, n, hidden + 4, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(len(index), q_len, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    item_mask = torch.ones(items, n, dtype=torch.long)
    item_mask[0, -2:] = 0
    return kv, x, item_mask, torch.tensor(index, dtype=torch.long)


@pytest.mark.parametrize("index,items,width,overflow", [
    ([0, 1, 2, 0, 1, 2], 3, 2, 0),          # every item read equally often: all packed
    ([0, 1, 2, 2, 0, 1, 1], 3, 2, 1),       # one extra row of item 1 gathers its keys/values
    ([3, 1, 3, 1, 3], 4, 2, 1),             # items 0 and 2 are not read
    ([2], 3, 1, 0),
    ([], 3, 0, 0),                          # no rows at all
])
def test_grouped_attention_equals_gathered_keys_values_in_float64(index, items, width, overflow):
    from models.text import Attention, KVGroups, attention_mask_4d

    torch.manual_seed(0)
    att = Attention(8, 2, 12, attention_dropout=0.0, hidden_dropout=0.0, layer_norm_eps=1e-12).double()
    kv, x, item_mask, idx = _attention_case(index, items)
    groups = KVGroups.from_index(idx, items)
    assert (groups.width, groups.overflow.numel()) == (width, overflow)
    mask = attention_mask_4d(item_mask[idx], x.shape[1], False)
    ref = att(x, kv[idx], mask)
    ref.square().sum().backward()
    g_ref = _grads(kv, x, att)
    for t in (kv, x, *att.parameters()):
        t.grad = None
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((tuple(q.shape), tuple(k.shape)))
        return sdpa(q, k, v, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        out = att(x, kv, mask, kv_index=idx)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    if not index:  # no rows: no attention call, nothing to differentiate
        assert out.shape == (0, x.shape[1], x.shape[2]) and not calls
        return
    out.square().sum().backward()
    for a, b in zip(_grads(kv, x, att), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    read = len(set(index))
    # one packed call over the items read (their queries side by side), one for the overflow rows
    assert calls[0] == ((read, 2, width * x.shape[1], 4), (read, 2, kv.shape[1], 4))
    assert [c[0][0] for c in calls[1:]] == ([overflow] if overflow else [])


def test_grouped_attention_rejects_an_index_out_of_range():
    from models.text import KVGroups

    for bad in ([0, 1, 3], [-1, 0, 1]):  # three distinct items of three: only the range tells
        with pytest.raises(IndexError, match="out of range"):
            KVGroups.from_index(torch.tensor(bad), 3)


def test_grouped_attention_rejects_a_mask_that_varies_over_queries():
    from models.text import KVGroups

    groups = KVGroups.from_index(torch.tensor([0, 0, 1]), 2)
    q, k = torch.randn(3, 4, 8), torch.randn(2, 2, 5, 4)
    with pytest.raises(ValueError, match="one key mask per row"):
        groups.attend(q, k, k, torch.ones(3, 1, 4, 5, dtype=torch.bool), 0.0)


@pytest.mark.parametrize("with_select", [False, True])
def test_fusion_groups_the_rows_once_per_pass(with_select):
    """The grouping by image (a host sync on a GPU) is made once for the pass, not once per layer;
    the last layer with ``select`` groups its fewer rows itself. Same result as the gathered path."""
    from models.text import KVGroups

    cfg = TextConfig(vocab_size=40, hidden_size=16, num_text_layers=1, num_fusion_layers=3, num_heads=2,
                     intermediate_size=32, max_position_embeddings=8, hidden_dropout=0.0, attention_dropout=0.0,
                     encoder_width=24)
    torch.manual_seed(0)
    model = TextTransformer(cfg).eval()
    image, text, mask, _, index = _inputs()
    select = torch.zeros(text.shape[:2], dtype=torch.bool)
    select[:, 0] = True
    select[3, 2] = True
    calls = []
    original = KVGroups.from_index.__func__

    def counting(cls, kv_index, num_items):
        calls.append(kv_index.numel())
        return original(cls, kv_index, num_items)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KVGroups, "from_index", classmethod(counting))
        out = model.forward_fusion(text, mask, image, image_index=index, select=select if with_select else None)
    assert len(calls) == (2 if with_select else 1)
    ref = model.forward_fusion(text, mask, image[index])
    torch.testing.assert_close(out, ref[select] if with_select else ref, rtol=1e-5, atol=1e-6)


def test_grouped_attention_applies_attention_dropout_to_packed_and_overflow_rows():
    """Training with attention dropout: every row, packed or overflow, gets its own dropout (its
    output differs from the eval output and between two calls); eval is deterministic."""
    from models.text import Attention, KVGroups

    torch.manual_seed(0)
    att = Attention(8, 2, 12, attention_dropout=0.5, hidden_dropout=0.0, layer_norm_eps=1e-12)
    kv, x, _, idx = _attention_case([0, 1, 2, 2, 0, 1, 1], 3)
    kv, x = kv.float().detach(), x.float().detach()
    groups = KVGroups.from_index(idx, 3)
    assert groups.overflow.numel() == 1
    att.eval()
    ref = att(x, kv, kv_index=idx)
    torch.testing.assert_close(att(x, kv, kv_index=idx), ref)
    att.train()
    a, b = att(x, kv, kv_index=idx), att(x, kv, kv_index=idx)
    for rows in (groups.packed, groups.overflow):
        assert ((a[rows] - ref[rows]).abs().amax(dim=(1, 2)) > 1e-4).all()
        assert ((a[rows] - b[rows]).abs().amax(dim=(1, 2)) > 1e-4).all()
