"""AdamW parameter groups of every model (pre-training, retrieval, VQA, NLVR2, captioning), by one rule.

A trainable parameter goes to one of up to six groups, in this order (empty groups are left out):

* ``vision_decay`` / ``vision_no_decay``: the ViT (names under ``<base>visual.``), at ``lr_vision``;
* ``text_decay`` / ``text_no_decay``: the rest of the base model (text and fusion layers,
  projections, temperature, ITM and MLM heads; a caption model's decoder), at ``lr``;
* ``<head>_decay`` / ``<head>_no_decay``: with ``head`` named, every parameter outside ``base``
  (a task model's own parts: VQA's answer decoder, NLVR2's twin cross-attention, merge and
  classifier), at ``lr``.

No weight decay on 1-d tensors (biases, LayerNorms, the temperature), position embeddings and the
class token. Frozen parameters (``requires_grad=False``) are in no group. Within a group the
parameters keep the order of ``model.named_parameters()``.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

__all__ = ["param_groups"]

NO_DECAY_SUFFIXES = ("pos_embed", "cls_token")


def param_groups(model: nn.Module, lr: float, lr_vision: float, weight_decay: float, *, base: str = "",
                 head: Optional[str] = None) -> list[dict]:
    """The AdamW groups of ``model`` (see the module docstring): ``base`` is the prefix of the base
    model's parameter names (``"base."`` in a task model that holds one, ``""`` when the model is
    the base model); ``head`` names the group of the parameters outside it."""
    order = ["vision", "text"] + ([head] if head is not None else [])
    groups: dict[tuple[str, bool], list] = {(part, decay): [] for part in order for decay in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if head is not None and not name.startswith(base):
            part = head
        else:
            part = "vision" if name.startswith(base + "visual.") else "text"
        no_decay = p.ndim < 2 or name.endswith(NO_DECAY_SUFFIXES)
        groups[(part, not no_decay)].append(p)
    return [{"params": params, "lr": lr_vision if part == "vision" else lr,
             "weight_decay": weight_decay if decay else 0.0, "name": f"{part}_{'decay' if decay else 'no_decay'}"}
            for (part, decay), params in groups.items() if params]
