"""Use a checkpoint on your own images: one call gives the model, its image transform and its tokenizer.

    from inference import load_model_and_preprocess
    m = load_model_and_preprocess("output/demo_caption/checkpoint_best.pth", device="cpu")
    m.caption([Image.open("cat.jpg")])                       # ["a cat ..."]
    m.answer([img], ["what color is the cat?"])             # VQA checkpoints
    m.nlvr2([left], [right], ["both images show a cat"])    # NLVR2: [("True", 0.93)]
    m.entail([img], ["a cat is sleeping"])                  # SNLI-VE: [("neutral", {"entailment": 0.2, ...})]
    m.rank(img, ["a cat", "a dog"])                         # pre-training / retrieval: ITC + ITM scores
    m.retrieve(["a cat"], gallery_images, k=5)              # the top-k images of a gallery per text
    m.encode_image([img]), m.encode_text(["a cat"])         # L2-normalised embeddings for your own search
    m.gradcam(img, "a cat on a mat").word_maps             # pre-training / retrieval: Grad-CAM per word

Images are PIL images or paths. The checkpoint decides what the model can do: a pre-training or retrieval
checkpoint ranks and retrieves (zero-shot is a pre-training checkpoint used as it is), a VQA checkpoint
answers (ranked over the answer list saved with it; ``open_ended=True`` generates), an NLVR2 checkpoint
judges statements about image pairs, an SNLI-VE checkpoint tells whether an image entails a statement, a
caption checkpoint captions. Asking for what the checkpoint cannot
do raises :class:`InferenceError` (one line). ``run_finetune.py --predict`` prints the same as JSON lines.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

import torch

from engine.checkpoint import load_checkpoint
from tasks.pipeline import ABILITIES, InferenceError, Pipeline, from_run

TASK_MODULES = {"retrieval": "tasks.retrieval", "vqa": "tasks.vqa", "nlvr2": "tasks.nlvr2", "snli_ve": "tasks.snli_ve",
                "caption": "tasks.caption"}


def checkpoint_task(ckpt: dict) -> str:
    """The task a checkpoint was trained for: its ``task`` entry, else read from its weights; a
    pre-training checkpoint serves as a retrieval model (zero-shot)."""
    task = ckpt.get("task")
    if task in TASK_MODULES:
        return task
    from tasks.caption import is_caption_state
    from tasks.nlvr2 import is_nlvr2_state
    from tasks.snli_ve import is_snli_ve_state
    from tasks.vqa import is_vqa_state
    state = ckpt["model"]
    for name, test in (("vqa", is_vqa_state), ("snli_ve", is_snli_ve_state), ("nlvr2", is_nlvr2_state),
                       ("caption", is_caption_state)):
        if test(state):
            return name
    return "retrieval"


def _spec(task: str):
    import importlib
    return importlib.import_module(TASK_MODULES[task]).SPEC


def load_model_and_preprocess(checkpoint: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                              task: Optional[str] = None) -> Pipeline:
    """Load ``checkpoint`` once for inference: the model (on ``device``, eval mode), its image transform and
    its tokenizer, with the checkpoint's own settings (image size, cleaning, generation, answer list)."""
    from engine.config import from_dict
    from tasks.common import saved_run_config
    from tasks.finetune import load_for_inference

    path = os.fspath(checkpoint)
    ckpt = load_checkpoint(path)
    task = task or checkpoint_task(ckpt)
    if task not in TASK_MODULES:
        raise InferenceError(f"unknown task {task!r}; one of {sorted(TASK_MODULES)}")
    spec = _spec(task)
    if ckpt.get("task") == task and isinstance(ckpt.get("config"), dict):
        cfg = saved_run_config(spec.config_cls, ckpt["config"])  # a fine-tuned checkpoint's own settings
    else:
        cfg = from_dict(spec.config_cls, {})  # a pre-training checkpoint: the task's defaults, its model
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=str(device), progress=False))
    run, model = load_for_inference(spec, cfg, path, ckpt, {})
    return from_run(task, run, model, path, ckpt.get("answer_list"))


__all__ = ["Pipeline", "InferenceError", "ABILITIES", "load_model_and_preprocess", "checkpoint_task"]
