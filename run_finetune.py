"""Fine-tune and evaluate on a downstream task.

    python run_finetune.py --task retrieval_flickr --config configs/retrieval_flickr.yaml \\
        --checkpoint output/pretrain/checkpoint_last.pth
    python run_finetune.py --task retrieval_shapes --checkpoint output/demo_pretrain/checkpoint_last.pth
    python run_finetune.py --task retrieval_flickr --checkpoint CKPT --zero-shot     # no fine-tuning
    python run_finetune.py --task vqa --checkpoint CKPT --evaluate                   # evaluation only
    torchrun --nproc_per_node=8 run_finetune.py --task vqa --checkpoint CKPT

Tasks ending in ``_shapes`` run on the synthetic data (configs/demo/): a config's ``x-synthetic``
section generates the shapes world into its folder first when it is not there (shapesworld.preset).
Without --config a task uses its default config (listed by --help).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# task name -> (module implementing `main(args) -> int`, default config)
TASKS: dict[str, tuple[str, str]] = {
    "retrieval_flickr": ("tasks.retrieval", "configs/retrieval_flickr.yaml"),
    "retrieval_coco": ("tasks.retrieval", "configs/retrieval_coco.yaml"),
    "retrieval_shapes": ("tasks.retrieval", "configs/demo/retrieval.yaml"),
    "vqa": ("tasks.vqa", "configs/vqa.yaml"),
    "vqa_shapes": ("tasks.vqa", "configs/demo/vqa.yaml"),
    "nlvr2": ("tasks.nlvr2", "configs/nlvr2.yaml"),
    "nlvr2_shapes": ("tasks.nlvr2", "configs/demo/nlvr2.yaml"),
    "caption_coco": ("tasks.caption", "configs/caption_coco.yaml"),
    "caption_shapes": ("tasks.caption", "configs/demo/caption.yaml"),
}


def parse_args(argv=None) -> argparse.Namespace:
    epilog = "default configs:\n" + "\n".join(f"  {t:18s} {c}" for t, (_, c) in TASKS.items())
    p = argparse.ArgumentParser(description=__doc__, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--config", default=None, help="YAML config (default: the task's, see below)")
    p.add_argument("--checkpoint", default=None,
                   help="pre-trained (or fine-tuned) checkpoint to start from; none = from scratch (warned)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config values")
    p.add_argument("--evaluate", action="store_true", help="evaluate --checkpoint on the test split only")
    p.add_argument("--zero-shot", action="store_true", help="evaluate a pre-trained checkpoint without fine-tuning")
    p.add_argument("--resume", default=None, metavar="CKPT_OR_DIR", help="continue an interrupted fine-tuning run")
    p.add_argument("--overwrite", action="store_true",
                   help="fine-tune in a train.output_dir that holds another run's checkpoints and log: they are "
                        "removed first (without it such a folder is refused; --evaluate and --zero-shot never are)")
    p.add_argument("--predict", nargs="+", default=None, metavar="IMAGE",
                   help="caption tasks: print a caption for each image file with --checkpoint")
    args = p.parse_args(argv)
    if args.config is None:
        args.config = TASKS[args.task][1]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    module = importlib.import_module(TASKS[args.task][0])
    from datasets.formats import DataError
    from engine.checkpoint import CheckpointError, CheckpointWriteError, disk_full_message
    from engine.config import ConfigError
    from engine.distributed import cleanup
    from engine.trainer import NonFiniteLossError
    from engine.loader import DataLoaderWorkerError, report_worker_error, shutdown_all
    from shapesworld.preset import prepare
    from tools.config_docs import find_config_class
    try:
        if not args.predict:  # the synthetic world the config's x-synthetic section asks for
            prepare(args.config, args.set, schema=find_config_class(module)[0])
        return int(module.main(args) or 0)
    except DataLoaderWorkerError as err:  # e.g. an image that cannot be read: one line naming it
        return report_worker_error(err)
    except (CheckpointError, ConfigError, DataError, FileNotFoundError) as err:  # bad input: the message names it
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:  # the run diverged: the message names the step
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk: one line naming the file and the free space
        message = str(err) if isinstance(err, CheckpointWriteError) else disk_full_message(err, None)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        shutdown_all()  # no loader worker outlives the run, whatever ended it
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
