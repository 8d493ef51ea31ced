"""Pre-training throughput (pairs/s) and peak memory on this machine.

Runs full pre-training steps (contrastive + ITM with hard negatives + MLM, momentum forward,
AdamW step) on random batches, so data loading is excluded, for the demo model and the paper's
ViT-B/16 + BERT-base model, in fp32 and bf16 autocast. Each setting runs in its own process so
that peak memory (max RSS, or CUDA max allocated) is measured per setting.

    python benchmarks/pretrain_throughput.py                      # CPU, batch 8
    python benchmarks/pretrain_throughput.py --models demo --batch 32 --steps 10
    python benchmarks/pretrain_throughput.py --device cuda --batch 64

Writes a table to stdout and JSON to benchmarks/results/pretrain_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"demo": "configs/demo/pretrain.yaml", "vitb_bertbase": "configs/pretrain.yaml"}


def one(model_name: str, precision: str, batch: int, steps: int, warmup: int, device: str, ckpt: bool) -> dict:
    import torch

    from engine.config import load_config
    from tasks.pretrain import PretrainConfig
    from models.vlp import VLPModel

    overrides = ["model.vision_weights=null", "model.text_weights=null", "tokenizer.path=null",
                 f"model.vision.grad_checkpointing={str(ckpt).lower()}",
                 f"model.text.grad_checkpointing={str(ckpt).lower()}"]
    cfg = load_config(PretrainConfig, ROOT / CONFIGS[model_name], overrides)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = VLPModel(cfg.model).to(dev)
    opt = torch.optim.AdamW(model.param_groups(1e-4, 1e-5, 0.02), fused=dev.type == "cuda" or None)
    v, length, size = cfg.model.text.vocab_size, cfg.tokenizer.max_length, cfg.model.vision.img_size
    g = torch.Generator().manual_seed(0)

    def batch_fn():
        ids = torch.randint(5, v, (batch, length), generator=g)
        labels = torch.where(torch.rand(batch, length, generator=g) < 0.15, ids, torch.full_like(ids, -100))
        b = {"image": torch.randn(batch, 3, size, size, generator=g), "input_ids": ids,
             "attention_mask": torch.ones_like(ids), "mlm_input_ids": torch.where(labels >= 0, 4, ids),
             "mlm_labels": labels, "image_idx": torch.arange(batch)}
        return {k: t.to(dev) for k, t in b.items()}

    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    times = []
    for i in range(warmup + steps):
        b = batch_fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with amp:
            out = model(b, cfg.loss)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"model": model_name, "precision": precision, "grad_checkpointing": ckpt, "batch": batch,
            "device": device, "threads": torch.get_num_threads(), "step_s_median": step,
            "pairs_per_s": batch / step, "peak_mem_mib": peak,
            "params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--checkpointing", nargs="+", default=["off"], choices=["off", "on"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/pretrain_throughput.json"))
    ap.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        m, p, c, _ = args._child
        print(json.dumps(one(m, p, args.batch, args.steps, args.warmup, args.device, c == "on")))
        return
    rows = []
    for m in args.models:
        for c in args.checkpointing:
            for p in args.precisions:
                cmd = [sys.executable, __file__, "--batch", str(args.batch), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--device", args.device, "--_child", m, p, c, "x"]
                res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if res.returncode != 0:
                    print(res.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"benchmark {m} {p} failed")
                row = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{m:14s} {p:5s} ckpt={c:3s} batch={row['batch']:3d}  {row['pairs_per_s']:8.2f} pairs/s  "
                      f"step {row['step_s_median']:7.3f} s  peak {row['peak_mem_mib']:8.0f} MiB", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
