"""Fine-tune and evaluate on a downstream task.

    python run_finetune.py --task retrieval_flickr --config configs/retrieval_flickr.yaml \\
        --checkpoint output/pretrain/checkpoint_last.pth
    python run_finetune.py --task retrieval_shapes --checkpoint output/demo_pretrain/checkpoint_last.pth
    python run_finetune.py --task retrieval_flickr --checkpoint CKPT --zero-shot     # no fine-tuning
    python run_finetune.py --task vqa --checkpoint CKPT --evaluate                   # evaluation only
    python run_finetune.py --task caption_coco --checkpoint FINETUNED --predict img.jpg
    torchrun --nproc_per_node=8 run_finetune.py --task vqa --checkpoint CKPT

Tasks ending in ``_shapes`` run on the synthetic data (configs/demo/): a config's ``x-synthetic``
section generates the shapes world into its folder first when it is not there (shapesworld.preset).
Without --config a task uses its default config (listed by --help). Every task has --evaluate;
--zero-shot (retrieval) and --predict (captioning) exist for the tasks that have them
(``python run_finetune.py --task TASK --help``). The flow is ``tasks/finetune.py``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# task name -> (module with the task's SPEC (tasks.spec.TaskSpec) and `main(args) -> int`, default config)
TASKS: dict[str, tuple[str, str]] = {
    "retrieval_flickr": ("tasks.retrieval", "configs/retrieval_flickr.yaml"),
    "retrieval_coco": ("tasks.retrieval", "configs/retrieval_coco.yaml"),
    "retrieval_shapes": ("tasks.retrieval", "configs/demo/retrieval.yaml"),
    "vqa": ("tasks.vqa", "configs/vqa.yaml"),
    "vqa_shapes": ("tasks.vqa", "configs/demo/vqa.yaml"),
    "nlvr2": ("tasks.nlvr2", "configs/nlvr2.yaml"),
    "nlvr2_shapes": ("tasks.nlvr2", "configs/demo/nlvr2.yaml"),
    "snli_ve": ("tasks.snli_ve", "configs/snli_ve.yaml"),
    "snli_ve_shapes": ("tasks.snli_ve", "configs/demo/snli_ve.yaml"),
    "caption_coco": ("tasks.caption", "configs/caption_coco.yaml"),
    "caption_shapes": ("tasks.caption", "configs/demo/caption.yaml"),
}


class UsageError(Exception):
    """A command line argparse refuses (an unknown flag, a flag the task does not have, ...)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit status 2 (main() returns it), no usage dump
        raise UsageError(message)


def task_spec(task: str):
    """The ``tasks.spec.TaskSpec`` of a task name."""
    return importlib.import_module(TASKS[task][0]).SPEC


def build_parser(task: Optional[str] = None, full_help: bool = False) -> argparse.ArgumentParser:
    """The command line of ``task``: the flags every task has and the task's own mode flags
    (``tasks.spec.mode_flags``: --evaluate, and --zero-shot / --predict where the task has them)."""
    from tasks.spec import mode_flags

    epilog = "default configs:\n" + "\n".join(f"  {t:18s} {c}" for t, (_, c) in TASKS.items())
    if full_help:
        epilog += "\nmode flags:\n" + "\n".join(f"  {t:18s} {' '.join(mode_flags(task_spec(t)))}" for t in TASKS)
    p = _Parser(description=__doc__, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--config", default=None, help="YAML config (default: the task's, see below)")
    p.add_argument("--checkpoint", default=None,
                   help="pre-trained (or fine-tuned) checkpoint to start from; none = from scratch (warned)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config values")
    p.add_argument("--resume", default=None, metavar="CKPT_OR_DIR", help="continue an interrupted fine-tuning run")
    p.add_argument("--overwrite", action="store_true",
                   help="fine-tune in a train.output_dir that holds another run's checkpoints and log: they are "
                        "removed first (without it such a folder is refused; evaluation is never refused)")
    if task in TASKS:
        for flag, kwargs in mode_flags(task_spec(task)).items():
            p.add_argument(flag, **kwargs)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments of ``argv``; its ``--task`` decides which mode flags exist."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = _Parser(add_help=False)
    pre.add_argument("--task")
    task = pre.parse_known_args(argv)[0].task
    args = build_parser(task, full_help=bool({"-h", "--help"} & set(argv))).parse_args(argv)
    if args.config is None:
        args.config = TASKS[args.task][1]
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as err:
        print(f"error: {err} (python run_finetune.py --task TASK --help lists the task's flags)", file=sys.stderr)
        return 2
    module = importlib.import_module(TASKS[args.task][0])
    from engine.cli import run_reporting_errors
    from shapesworld.preset import prepare

    def finetune() -> int:
        if not getattr(args, "predict", None):  # the synthetic world the config's x-synthetic section asks for
            prepare(args.config, args.set, schema=module.SPEC.config_cls)
        return module.main(args)

    return run_reporting_errors(finetune)


if __name__ == "__main__":
    sys.exit(main())
