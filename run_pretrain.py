"""Pre-train the vision-language model (SRCL or InfoNCE + ITM + MLM).

    python run_pretrain.py --config configs/demo/pretrain.yaml             # synthetic demo, CPU
    python run_pretrain.py --config configs/pretrain.yaml --set train.batch_size=256
    torchrun --nproc_per_node=8 run_pretrain.py --config configs/pretrain.yaml
    python run_pretrain.py --config configs/demo/pretrain.yaml --resume output/demo_pretrain
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set optim.lr=1e-4 train.batch_size=8")
    p.add_argument("--resume", default=None, metavar="CKPT_OR_DIR",
                   help="continue a run from a checkpoint file or an output directory (its checkpoint_last.pth)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a train.output_dir that holds another run's checkpoints and log: "
                        "they are removed first (without it such a folder is refused)")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start a new run from the model weights and tokenizer of a pre-training checkpoint "
                        "(fresh optimiser, schedule, step count and queues; ignored with --resume)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from engine.config import ConfigError, load_config
    from tasks.pretrain import PretrainConfig, run

    try:
        cfg = load_config(PretrainConfig, args.config, args.set)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from engine.cli import run_reporting_errors
    from shapesworld.preset import prepare

    def pretrain() -> None:
        prepare(args.config, args.set)  # the synthetic world the config's x-synthetic section asks for
        run(cfg, resume=args.resume, init_from=args.init_from, overwrite=args.overwrite)

    return run_reporting_errors(pretrain, cfg.train.output_dir)


if __name__ == "__main__":
    sys.exit(main())
