"""Activation checkpointing (model.vision.grad_checkpointing, model.text.grad_checkpointing): the
gradients of the full pre-training loss (ITC + ITM with hard negatives + MLM) equal those without
checkpointing, the blocks really are recomputed in backward, and fairscale's checkpoint_wrapper
(what BLIP uses; measured against torch's in docs/performance.md) agrees as well."""
from __future__ import annotations

import copy

import pytest
import torch

from models.text import TextConfig
from models.vision import VisionConfig
from models.vlp import VLPConfig, VLPModel
from objectives.pretrain import PretrainLossConfig, PretrainObjective


def _cfg(ckpt_vision: bool, ckpt_text: bool, dropout: float = 0.0) -> VLPConfig:
    return VLPConfig(
        vision=VisionConfig(img_size=16, patch_size=8, width=32, depth=2, num_heads=2, grad_checkpointing=ckpt_vision),
        text=TextConfig(vocab_size=60, hidden_size=32, num_text_layers=2, num_fusion_layers=2, num_heads=2,
                        intermediate_size=64, max_position_embeddings=16, hidden_dropout=dropout,
                        attention_dropout=dropout, grad_checkpointing=ckpt_text),
        embed_dim=16)


def _objective(cfg: VLPConfig) -> PretrainObjective:
    return PretrainObjective(VLPModel(cfg), PretrainLossConfig(queue_size=8))


def _batch(b: int = 6, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 60, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, -3:] = 0
    labels = torch.where(torch.rand(b, length, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    labels[:, 1] = ids[:, 1]
    return {"image": torch.randn(b, 3, 16, 16, generator=g), "input_ids": ids, "attention_mask": mask,
            "mlm_input_ids": torch.where(labels >= 0, 4, ids), "mlm_labels": labels,
            "image_idx": torch.tensor([0, 1, 2, 2, 3, 4])}


def _grads(model: PretrainObjective, seed: int = 0) -> tuple[dict, dict, float]:
    """One pre-training forward/backward; returns grads, per-block forward call counts and the loss."""
    calls: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if name.endswith(("blocks.0", "blocks.1", "encoder.layer.0", "encoder.layer.3")) and name.startswith("model."):
            # a pre-hook: torch's checkpoint stops a recomputation early, before forward hooks would run
            hooks.append(mod.register_forward_pre_hook(lambda m, i, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)))
    torch.manual_seed(seed)
    out = model(_batch(), generator=torch.Generator().manual_seed(seed))
    out["loss"].backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, calls, float(out["loss"].detach())


def _pair(ckpt_vision: bool, ckpt_text: bool, dropout: float = 0.0) -> tuple[PretrainObjective, PretrainObjective]:
    torch.manual_seed(0)
    plain = _objective(_cfg(False, False, dropout))
    ckpt = _objective(_cfg(ckpt_vision, ckpt_text, dropout))
    ckpt.load_state_dict(plain.state_dict())
    return plain.train(), ckpt.train()


@pytest.mark.parametrize("vision,text", [(True, True), (True, False), (False, True)])
def test_checkpointed_gradients_equal_plain(vision, text):
    plain, ckpt = _pair(vision, text)
    g0, calls0, loss0 = _grads(plain)
    g1, calls1, loss1 = _grads(ckpt)
    assert loss1 == loss0
    assert sorted(g1) == sorted(g0) and len(g0) > 50
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)
    # the checkpointed blocks ran again in backward (once per forward use), the others did not
    for name, n in calls0.items():
        recomputed = (vision and name.startswith("model.visual.")) or (text and name.startswith("model.text."))
        assert calls1[name] == (2 * n if recomputed else n), (name, calls0, calls1)


def test_checkpointing_with_dropout_keeps_the_random_stream():
    """torch.utils.checkpoint restores the RNG state for the recomputation: same dropout masks."""
    plain, ckpt = _pair(True, True, dropout=0.2)
    g0, _, loss0 = _grads(plain, seed=3)
    g1, _, loss1 = _grads(ckpt, seed=3)
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_checkpointed_gradients_equal_plain_under_bf16_autocast():
    """The recomputation runs under the forward's CPU autocast (fairscale's checkpoint_wrapper
    restores only CUDA autocast, so on CPU bf16 its gradients differ: see docs/performance.md)."""
    plain, ckpt = _pair(True, True)
    grads = []
    for model in (plain, ckpt):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(_batch(), generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


def test_momentum_encoders_are_not_checkpointed():
    """The momentum forward runs under no_grad: our text layers skip checkpointing there (timm's
    ViT still calls checkpoint under no_grad, which saves nothing and recomputes nothing)."""
    _, ckpt = _pair(True, True)
    calls = {"n": 0}
    real = torch.utils.checkpoint.checkpoint

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    torch.utils.checkpoint.checkpoint = counting
    try:
        with torch.no_grad():
            ckpt.text_m.forward_text(_batch()["input_ids"], _batch()["attention_mask"])
            ckpt.model.text.forward_text(_batch()["input_ids"], _batch()["attention_mask"])
    finally:
        torch.utils.checkpoint.checkpoint = real
    assert calls["n"] == 0


def test_fairscale_checkpoint_wrapper_gives_the_same_gradients():
    from fairscale.nn.checkpoint import checkpoint_wrapper

    plain, _ = _pair(False, False)
    wrapped = copy.deepcopy(plain)
    for enc in (wrapped.model.visual.blocks, wrapped.model.text.encoder.layer):
        for i in range(len(enc)):
            enc[i] = checkpoint_wrapper(enc[i])
    assert sorted(wrapped.state_dict()) == sorted(plain.state_dict())  # names unchanged
    g0, _, loss0 = _grads(plain)
    g1, _, loss1 = _grads(wrapped)
    assert loss1 == loss0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)
