"""Weight-file reading and the load report shared by every weight loader.

Loaders never call ``load_state_dict(strict=False)`` silently: they map keys explicitly and
return a :class:`LoadReport` that lists what was loaded, what is missing (with a reason when the
absence is expected, e.g. new cross-attention), what was ignored (with a reason, e.g. the BERT
pooler) and what had the wrong shape.
"""
from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from engine.checkpoint import read_torch_file

__all__ = ["LoadReport", "read_state_dict", "copy_into"]


@dataclass
class LoadReport:
    """What a weight loader did.

    Attributes:
        loaded: target keys that received a tensor.
        missing: target keys that received nothing (see ``expected_missing`` for reasons).
        unexpected: source keys that were not used (see ``expected_unexpected`` for reasons).
        mismatched: ``"key: source shape -> target shape"`` entries that were not loaded.
        interpolated: target keys loaded after resizing (position embeddings).
        expected_missing: target key -> reason why its absence is fine.
        expected_unexpected: source key -> reason why it is deliberately not used.
    """

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)
    interpolated: List[str] = field(default_factory=list)
    expected_missing: Dict[str, str] = field(default_factory=dict)
    expected_unexpected: Dict[str, str] = field(default_factory=dict)

    def unexplained_missing(self) -> List[str]:
        """Missing keys without an expected reason."""
        return [k for k in self.missing if k not in self.expected_missing]

    def unexplained_unexpected(self) -> List[str]:
        """Unused source keys without an expected reason."""
        return [k for k in self.unexpected if k not in self.expected_unexpected]

    @staticmethod
    def _group(keys: Dict[str, str]) -> Dict[str, int]:
        """Count keys per reason, so that the summary stays short."""
        out: Dict[str, int] = {}
        for reason in keys.values():
            out[reason] = out.get(reason, 0) + 1
        return out

    def summary(self, max_keys: int = 10) -> str:
        """A short multi-line human-readable report."""

        def head(keys: List[str]) -> str:
            more = f", ... (+{len(keys) - max_keys})" if len(keys) > max_keys else ""
            return ", ".join(keys[:max_keys]) + more

        lines = [f"loaded {len(self.loaded)} tensors"
                 + (f" ({len(self.interpolated)} interpolated: {head(self.interpolated)})"
                    if self.interpolated else "")]
        exp_m = {k: r for k, r in self.expected_missing.items() if k in self.missing}
        exp_u = {k: r for k, r in self.expected_unexpected.items() if k in self.unexpected}
        for reason, n in self._group(exp_m).items():
            lines.append(f"missing (expected, {reason}): {n}")
        for reason, n in self._group(exp_u).items():
            lines.append(f"ignored (expected, {reason}): {n}")
        if self.unexplained_missing():
            lines.append(f"MISSING: {head(self.unexplained_missing())}")
        if self.unexplained_unexpected():
            lines.append(f"UNEXPECTED: {head(self.unexplained_unexpected())}")
        if self.mismatched:
            lines.append(f"SHAPE MISMATCH: {head(self.mismatched)}")
        return "\n".join(lines)

    def raise_if_unexpected(self, allow: bool = False) -> None:
        """Raise ``ValueError`` on unexplained unexpected/missing keys or shape mismatches.

        Args:
            allow: when True, do nothing (the caller accepts a partial load knowingly).
        """
        if allow:
            return
        problems = []
        if self.unexplained_unexpected():
            problems.append(f"unexpected keys: {self.unexplained_unexpected()}")
        if self.mismatched:
            problems.append(f"shape mismatches: {self.mismatched}")
        if self.unexplained_missing():
            problems.append(f"missing keys: {self.unexplained_missing()}")
        if problems:
            raise ValueError("weight loading problems:\n  " + "\n  ".join(problems))


def read_state_dict(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from ``.safetensors`` or a torch file, on the CPU.

    Torch files (``.bin``/``.pth``/``.pt``/other) are read with
    :func:`engine.checkpoint.read_torch_file` (``weights_only=True``: no pickled code runs). A
    ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper and a DDP ``module.`` prefix are removed. An OpenAI CLIP TorchScript archive is read through ``torch.jit.load``.

    Raises:
        FileNotFoundError: the path does not exist (the message names it).
        ValueError: the file could not be read safely (``CheckpointError``) or holds no tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    if zipfile.is_zipfile(path) and any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        with warnings.catch_warnings():  # TorchScript (how OpenAI ships CLIP): deprecated but readable
            warnings.simplefilter("ignore", FutureWarning)
            return dict(torch.jit.load(path, map_location="cpu").state_dict())
    obj = read_torch_file(path)
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not contain a state dict of tensors")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


@torch.no_grad()
def copy_into(target: Dict[str, torch.Tensor], source: Dict[str, torch.Tensor], report: LoadReport) -> None:
    """Copy ``source[k]`` into ``target[k]`` (in place) where both exist with the same shape.

    Records loaded / mismatched / missing keys in ``report``; source keys absent from ``target``
    are added to ``report.unexpected``.
    """
    for k, t in target.items():
        if k not in source:
            report.missing.append(k)
        elif source[k].shape != t.shape:
            report.mismatched.append(f"{k}: {tuple(source[k].shape)} -> {tuple(t.shape)}")
        else:
            t.copy_(source[k].to(t.dtype))
            report.loaded.append(k)
    report.unexpected.extend(k for k in source if k not in target)
