"""Pre-training throughput (pairs/s), peak memory and FLOPs on this machine.

Runs full pre-training steps (contrastive + ITM with hard negatives + MLM, momentum forward,
AdamW step) on random batches, so data loading is excluded, for the demo model and the paper's
ViT-B/16 + BERT-base model, in fp32 and bf16 autocast, with and without activation checkpointing
(torch's ``torch.utils.checkpoint`` as the config switches use it, or fairscale's
``checkpoint_wrapper`` around every block, for comparison). Each setting runs in its own process so
that peak memory is measured per setting.

Measured per setting: median and fastest step time, pairs/s, peak memory (CPU: the process's
max RSS, with the RSS before the first step, so the growth is visible; CUDA: max allocated),
the peak tensor memory of one forward + backward (activations, gradients and temporaries, from
the profiler's allocation records on CPU),
and FLOPs per pair: counted by ``torch.utils.flop_counter.FlopCounterMode`` over one real step,
next to the analytic count of :func:`analytic_flops` (per component; see docs/performance.md),
and the achieved FLOP/s.

    python benchmarks/pretrain_throughput.py                      # CPU, batch 8, all settings
    python benchmarks/pretrain_throughput.py --models demo --batch 32 --steps 10
    python benchmarks/pretrain_throughput.py --checkpointing off torch fairscale
    python benchmarks/pretrain_throughput.py --models demo --compile   # torch.compile (slow to start)
    python benchmarks/pretrain_throughput.py --device cuda --batch 64

Writes a table to stdout and JSON to benchmarks/results/pretrain_throughput.json (``--out``).
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
CHECKPOINTING = ("off", "torch", "fairscale")


def _rss_mib() -> float:
    """Current resident set size of this process (MiB), from /proc (Linux)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def analytic_flops(cfg, text_len: int, batch: int) -> dict[str, float]:
    """FLOPs per image-text pair of one pre-training step, per component (1 multiply-add = 2 FLOPs;
    backward = 2x forward; attention scores and weighted sums included; layer norms, softmax, GELU
    and the optimiser left out). ``cfg`` is a ``PretrainConfig``. Components:

    ``vit_fwd_bwd`` the online ViT, ``vit_momentum_fwd``, ``text_fwd_bwd`` (unimodal text pass for
    ITC), ``text_momentum_fwd``, ``fusion_itm_fwd_bwd`` (3 fusion passes per pair: positive, hard
    negative image, hard negative text; the cross-attention keys/values of each image projected once,
    ``VLPModel.fuse(image_index=...)``), ``mlm_text_fusion_fwd_bwd`` (masked text through the text
    and fusion layers), ``mlm_head_fwd_bwd`` (masked positions only), ``itc`` (similarities with the
    batch and the queue, for logits and SRCL weights). Not in ``total``:
    ``fusion_image_kv_repeat_fwd_bwd``, the key/value projections the MLM pass repeats (the ITM pass
    already made them; avoidable by fusing ITM and MLM in one call); ``kv_saved_by_image_index``,
    what projecting keys/values per pair (3 times per image in ITM, as before) would add; and
    ``recompute_ckpt``, the extra forward of the checkpointed encoders when checkpointing is on.
    """
    v, t = cfg.model.vision, cfg.model.text
    n = 1 + (v.img_size // v.patch_size) ** 2
    w, wm = v.width, int(v.width * v.mlp_ratio)
    h, inter, L = t.hidden_size, t.intermediate_size, text_len
    vit_block = 2 * n * w * 3 * w + 2 * n * w * w + 2 * 2 * n * w * wm + 2 * 2 * n * n * w
    patch = 2 * (n - 1) * 3 * v.patch_size ** 2 * w
    vit_fwd = v.depth * vit_block + patch
    text_layer = 2 * L * h * 3 * h + 2 * L * h * h + 2 * 2 * L * h * inter + 2 * 2 * L * L * h
    kv = t.num_fusion_layers * 2 * 2 * n * w * h  # keys + values of one image, all fusion layers
    fusion_nokv = t.num_fusion_layers * (text_layer + 2 * L * h * h * 2 + 2 * 2 * L * n * h)  # per pair
    text_fwd = t.num_text_layers * text_layer
    masked = cfg.loss.mlm_prob * L
    mlm_head_fwd = 2 * masked * h * h + 2 * masked * h * t.vocab_size
    queue = cfg.model.queue_size if cfg.loss.contrastive.use_queue else 0
    itc = 2 * 2 * cfg.model.embed_dim * (batch + queue) * 2  # logits (online) + weights (momentum), 2 directions
    itm_fwd = 3 * fusion_nokv + kv if cfg.loss.itm > 0 else 0.0
    mlm_fwd = text_fwd + fusion_nokv + kv if cfg.loss.mlm > 0 else 0.0
    parts = {
        "vit_fwd_bwd": 3 * vit_fwd,
        "vit_momentum_fwd": vit_fwd,
        "text_fwd_bwd": 3 * text_fwd,
        "text_momentum_fwd": text_fwd,
        "fusion_itm_fwd_bwd": 3 * itm_fwd,
        "mlm_text_fusion_fwd_bwd": 3 * mlm_fwd,
        "mlm_head_fwd_bwd": 3 * mlm_head_fwd if cfg.loss.mlm > 0 else 0.0,
        "itc": itc,
    }
    parts["total"] = sum(parts.values())
    parts["fusion_image_kv_repeat_fwd_bwd"] = 3 * kv if cfg.loss.itm > 0 and cfg.loss.mlm > 0 else 0.0
    parts["kv_saved_by_image_index"] = 3 * 2 * kv if cfg.loss.itm > 0 else 0.0
    recompute = 0.0
    if v.grad_checkpointing:
        recompute += vit_fwd
    if t.grad_checkpointing:
        recompute += text_fwd + itm_fwd + mlm_fwd
    parts["recompute_ckpt"] = recompute
    # attention scores + weighted sums alone (inside the totals above), because
    # torch.utils.flop_counter does not count the CPU scaled_dot_product_attention kernels
    vit_att, text_att = v.depth * 4 * n * n * w, t.num_text_layers * 4 * L * L * h
    fus_att = t.num_fusion_layers * (4 * L * L * h + 4 * L * n * h)
    sdpa = 4 * vit_att + 4 * text_att + (9 * fus_att if cfg.loss.itm > 0 else 0) + (3 * (text_att + fus_att) if cfg.loss.mlm > 0 else 0)
    if v.grad_checkpointing:
        sdpa += vit_att
    if t.grad_checkpointing:
        sdpa += text_att + (3 * fus_att if cfg.loss.itm > 0 else 0) + (text_att + fus_att if cfg.loss.mlm > 0 else 0)
    parts["sdpa_attention"] = sdpa
    return {k: float(x) for k, x in parts.items()}


def _step_peak_mib(model, batch: dict, loss_cfg, amp, opt, dev) -> float:
    """Peak tensor memory (MiB) allocated during one forward + backward above what was allocated
    before it. CPU: from the profiler's allocation records (``profile_memory``), at operator
    granularity; CUDA: ``max_memory_allocated``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with amp:
            out = model(batch, loss_cfg)
        out["loss"].backward()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with amp:
                out = model(batch, loss_cfg)
            out["loss"].backward()
        cur = top = 0
        for e in sorted(prof.events(), key=lambda e: e.time_range.start):
            cur += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
            top = max(top, cur)
        peak = top / 2**20
    opt.step()
    opt.zero_grad(set_to_none=True)
    return peak


def _wrap_fairscale(model) -> int:
    """Wrap every ViT block and text layer with fairscale's checkpoint_wrapper (as BLIP does)."""
    from fairscale.nn.checkpoint import checkpoint_wrapper

    n = 0
    for enc in (model.visual.blocks, model.text.encoder.layer):
        for i in range(len(enc)):
            enc[i] = checkpoint_wrapper(enc[i])
            n += 1
    return n


def one(model_name: str, precision: str, batch: int, steps: int, warmup: int, device: str, ckpt: str,
        compile_: bool = False, threads: int = 0) -> dict:
    """Measure one setting in this process; returns the result row."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from engine.config import load_config
    from models.vlp import VLPModel
    from tasks.pretrain import PretrainConfig

    if threads:
        torch.set_num_threads(threads)
    flag = str(ckpt == "torch").lower()
    overrides = ["model.vision_weights=null", "model.text_weights=null", "tokenizer.path=null",
                 f"model.vision.grad_checkpointing={flag}", f"model.text.grad_checkpointing={flag}"]
    cfg = load_config(PretrainConfig, ROOT / CONFIGS[model_name], overrides)
    # the vocabulary as in the run: bert-base's (tokenizer.path set) or one trained on the captions
    if load_config(PretrainConfig, ROOT / CONFIGS[model_name]).tokenizer.path is None:
        cfg = load_config(PretrainConfig, ROOT / CONFIGS[model_name],
                          overrides + [f"model.text.vocab_size={cfg.tokenizer.vocab_size}"])
    torch.manual_seed(0)
    dev = torch.device(device)
    model = VLPModel(cfg.model).to(dev)
    if ckpt == "fairscale":
        _wrap_fairscale(model)
    # fused AdamW where torch has the kernel, as the trainer does (optim.fused=auto)
    opt = torch.optim.AdamW(model.param_groups(1e-4, 1e-5, 0.02), fused=dev.type in ("cpu", "cuda") or None)
    v, length, size = cfg.model.text.vocab_size, cfg.tokenizer.max_length, cfg.model.vision.img_size
    g = torch.Generator().manual_seed(0)

    def batch_fn():
        ids = torch.randint(5, v, (batch, length), generator=g)
        labels = torch.where(torch.rand(batch, length, generator=g) < cfg.loss.mlm_prob, ids, torch.full_like(ids, -100))
        b = {"image": torch.randn(batch, 3, size, size, generator=g), "input_ids": ids,
             "attention_mask": torch.ones_like(ids), "mlm_input_ids": torch.where(labels >= 0, 4, ids),
             "mlm_labels": labels, "image_idx": torch.arange(batch)}
        return {k: t.to(dev) for k, t in b.items()}

    fwd = torch.compile(model) if compile_ else model
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(b):
        with amp:
            out = fwd(b, cfg.loss)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    rss0 = _rss_mib()
    # two instrumented steps: the FLOPs actually executed, and the peak tensor memory of forward +
    # backward (activations, gradients, temporaries; parameters and optimiser state excluded)
    with FlopCounterMode(display=False) as fc:
        step(batch_fn())
    counted = fc.get_total_flops() / batch
    step_peak = _step_peak_mib(fwd, batch_fn(), cfg.loss, amp, opt, dev)
    times, first = [], None
    for i in range(warmup + steps):
        b = batch_fn()
        sync()
        t0 = time.perf_counter()
        step(b)
        sync()
        dt = time.perf_counter() - t0
        first = dt if first is None else first
        if i >= warmup:
            times.append(dt)
    med = sorted(times)[len(times) // 2]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    acfg = cfg
    if ckpt == "fairscale":  # the wrapper recomputes the same blocks the config switches would
        import dataclasses
        m = cfg.model
        acfg = dataclasses.replace(cfg, model=dataclasses.replace(
            m, vision=dataclasses.replace(m.vision, grad_checkpointing=True),
            text=dataclasses.replace(m.text, grad_checkpointing=True)))
    flops = analytic_flops(acfg, length, batch)
    return {"model": model_name, "precision": precision, "checkpointing": ckpt, "compile": compile_,
            "batch": batch, "device": device, "threads": torch.get_num_threads(),
            "step_s_median": med, "step_s_min": min(times), "first_step_s": first,
            "pairs_per_s": batch / med, "pairs_per_s_best": batch / min(times),
            "peak_mem_mib": peak, "rss_before_steps_mib": rss0 if dev.type == "cpu" else None,
            "step_peak_tensor_mib": step_peak,
            "flops_per_pair_counted": counted, "flops_per_pair_analytic": flops["total"] + flops["recompute_ckpt"],
            "flops_analytic_parts": flops,
            # the counter does not see CPU SDPA kernels: add their analytic FLOPs to compare
            "flops_per_pair_counted_plus_sdpa": counted + (flops["sdpa_attention"] if dev.type == "cpu" else 0.0),
            "achieved_gflops": counted * batch / med / 1e9,
            "params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6}


def table(rows: list[dict]) -> str:
    """Markdown table of result rows."""
    head = ("| model | precision | checkpointing | batch | pairs/s (median) | pairs/s (best) | step s | "
            "peak RSS MiB | step peak tensor MiB | GFLOP/pair | GFLOP/s |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        name = r["model"] + (" (compiled)" if r.get("compile") else "")
        out.append(f"| {name} | {r['precision']} | {r['checkpointing']} | {r['batch']} | {r['pairs_per_s']:.2f} | "
                   f"{r['pairs_per_s_best']:.2f} | {r['step_s_median']:.3f} | {r['peak_mem_mib']:.0f} | "
                   f"{r['step_peak_tensor_mib']:.0f} | {r['flops_per_pair_counted'] / 1e9:.2f} | "
                   f"{r['achieved_gflops']:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--checkpointing", nargs="+", default=["off", "torch"], choices=list(CHECKPOINTING) + ["on"],
                    help="off, torch (the config switches; 'on' is an alias) or fairscale (checkpoint_wrapper)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per setting (0 = torch's default)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (first step compiles)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat all settings this many times, interleaved, and keep each setting's fastest round "
                         "(robust against other load on a shared machine); every round is kept in the JSON")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/pretrain_throughput.json"))
    ap.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        m, p, c, _ = args._child
        print(json.dumps(one(m, p, args.batch, args.steps, args.warmup, args.device, c, args.compile, args.threads)))
        return
    rows, runs = [], []
    load_before = os.getloadavg()
    settings = [(m, c, p) for m in args.models
                for c in dict.fromkeys("torch" if c == "on" else c for c in args.checkpointing)
                for p in args.precisions]
    for rnd in range(args.rounds):
        for m, c, p in settings:
            cmd = [sys.executable, __file__, "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--device", args.device, "--threads", str(args.threads),
                   *(["--compile"] if args.compile else []), "--_child", m, p, c, "x"]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"benchmark {m} {p} {c} failed")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["round"], row["loadavg"] = rnd, os.getloadavg()
            runs.append(row)
            print(f"round {rnd} {m:14s} {p:5s} ckpt={c:9s} batch={row['batch']:3d}  {row['pairs_per_s']:8.2f} pairs/s "
                  f"(best {row['pairs_per_s_best']:.2f})  step {row['step_s_median']:7.3f} s  "
                  f"peak RSS {row['peak_mem_mib']:6.0f} MiB  step peak {row['step_peak_tensor_mib']:7.0f} MiB  "
                  f"{row['flops_per_pair_counted'] / 1e9:7.2f} GFLOP/pair (analytic "
                  f"{row['flops_per_pair_analytic'] / 1e9:.2f})  {row['achieved_gflops']:6.1f} GFLOP/s", flush=True)
    for m, c, p in settings:  # each setting's fastest round
        mine = [r for r in runs if (r["model"], r["checkpointing"], r["precision"]) == (m, c, p)]
        rows.append(min(mine, key=lambda r: r["step_s_median"]))
    print()
    print(table(rows))
    import torch
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "all_rounds": runs}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
