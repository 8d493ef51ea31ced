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
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"demo": "configs/demo/pretrain.yaml", "vitb_bertbase": "configs/pretrain.yaml", "tiny": "configs/demo/pretrain.yaml"}
# "tiny": the demo config made smaller still, for checking the benchmark's plumbing in seconds
MODEL_OVERRIDES = {"tiny": ["model.vision.img_size=32", "model.vision.width=32", "model.vision.depth=1",
                            "model.vision.num_heads=2", "model.text.hidden_size=32", "model.text.num_text_layers=1",
                            "model.text.num_fusion_layers=2", "model.text.num_heads=2",
                            "model.text.intermediate_size=64", "model.embed_dim=16", "tokenizer.vocab_size=120"]}
TINY_QUEUE = 32
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
    and the optimiser left out). ``cfg`` is a ``PretrainConfig``. Components (what
    ``PretrainObjective.forward`` computes):

    ``vit_fwd_bwd`` the online ViT; ``vit_momentum_fwd`` (its last block computes the class token
    only); ``text_fwd_bwd`` (unimodal text pass for ITC); ``text_momentum_fwd`` (last layer: class
    token only); ``fusion_itm_fwd_bwd`` (3 rows per pair: positive, hard negative image, hard
    negative text; the first fusion layer's self-attention once per text, the last layer at the
    class token only); ``mlm_text_fusion_fwd_bwd`` (masked text through the text and fusion layers,
    the last fusion layer at the masked positions only); ``fusion_image_kv_fwd_bwd`` (the
    cross-attention keys/values, once per image and layer, shared by all rows);
    ``mlm_head_fwd_bwd`` (masked positions only); ``itc`` (similarities with the batch and the
    queue, for logits and SRCL weights).

    ``saved_*`` (not in ``total``) are what the step computed before these were shared or
    restricted: the MLM pass's own image keys/values, the repeated first-layer self-attention of
    the ITM rows, the unneeded tokens of the last fusion layer (ITM and MLM rows), and of the
    momentum encoders' last blocks; ``total_unshared`` = ``total`` + all of them.
    ``recompute_ckpt`` is the extra forward of the checkpointed encoders when checkpointing is on;
    ``sdpa_attention`` the attention scores + weighted sums alone (inside the totals), because
    ``torch.utils.flop_counter`` does not count the CPU ``scaled_dot_product_attention`` kernels.
    """
    v, t = cfg.model.vision, cfg.model.text
    n = 1 + (v.img_size // v.patch_size) ** 2
    w, wm = v.width, int(v.width * v.mlp_ratio)
    h, inter, L = t.hidden_size, t.intermediate_size, text_len
    nf, nt = t.num_fusion_layers, t.num_text_layers
    itm_on, mlm_on = cfg.loss.itm > 0, cfg.loss.mlm > 0
    masked = cfg.loss.mlm_prob * L

    # ViT block with q query tokens (all n tokens give keys/values): (linear, attention) FLOPs
    def vit_block(q):
        return 2 * n * w * 2 * w + 2 * q * w * w + 2 * q * w * w + 2 * 2 * q * w * wm, 2 * 2 * q * n * w
    patch = 2 * (n - 1) * 3 * v.patch_size ** 2 * w

    # text / fusion layer row with q query tokens out of L; cross-attention without the image K/V
    def text_row(q, cross):
        lin = 2 * L * h * 2 * h + 2 * q * h * h * 2 + 2 * 2 * q * h * inter
        att = 2 * 2 * q * L * h
        if cross:
            lin += 2 * 2 * q * h * h
            att += 2 * 2 * q * n * h
        return lin, att
    self_lin, self_att = 2 * L * h * 4 * h, 2 * 2 * L * L * h  # self-attention sub-block of one text
    kv = nf * 2 * 2 * n * w * h  # keys + values of one image, all fusion layers

    def add(a, b, k=1.0):
        return a[0] + k * b[0], a[1] + k * b[1]

    zero = (0.0, 0.0)
    vit_full = (v.depth * vit_block(n)[0] + patch, v.depth * vit_block(n)[1])
    vit_mom = add(add(vit_full, vit_block(n), -1), vit_block(1))
    text_full = (nt * text_row(L, False)[0], nt * text_row(L, False)[1])
    text_mom = add(add(text_full, text_row(L, False), -1), text_row(1, False)) if nt else zero
    fus_full = text_row(L, True)

    def fusion_rows(rows, q_last, distinct):
        """``rows`` rows through the fusion layers, ``distinct`` texts among them, the last layer
        at ``q_last`` query tokens per row (image keys/values not included)."""
        if nf == 0:
            return zero
        out = (rows * text_row(q_last, True)[0], rows * text_row(q_last, True)[1])  # last layer
        if nf > 1:
            out = add(out, fus_full, rows * (nf - 1))  # first + middle layers, all rows
            out = add(out, (self_lin, self_att), -(rows - distinct))  # first layer: self-attention per text
        return out

    itm = fusion_rows(3, 1, 1) if itm_on else zero
    mlm = add(text_full, fusion_rows(1, masked, 1)) if mlm_on else zero
    itm_unshared = fusion_rows(3, L, 3) if itm_on else zero
    mlm_unshared = add(text_full, fusion_rows(1, L, 1)) if mlm_on else zero
    mlm_head_fwd = 2 * masked * h * h + 2 * masked * h * t.vocab_size
    queue = _queue_size(cfg) if cfg.loss.contrastive.use_queue else 0
    itc = 2 * 2 * cfg.model.embed_dim * (batch + queue) * 2  # logits (online) + weights (momentum), 2 directions
    kv_rows = itm_on or mlm_on
    parts = {
        "vit_fwd_bwd": 3 * sum(vit_full),
        "vit_momentum_fwd": sum(vit_mom),
        "text_fwd_bwd": 3 * sum(text_full),
        "text_momentum_fwd": sum(text_mom),
        "fusion_itm_fwd_bwd": 3 * sum(itm),
        "mlm_text_fusion_fwd_bwd": 3 * sum(mlm),
        "fusion_image_kv_fwd_bwd": 3 * kv if kv_rows else 0.0,
        "mlm_head_fwd_bwd": 3 * mlm_head_fwd if mlm_on else 0.0,
        "itc": itc,
    }
    parts["total"] = sum(parts.values())
    saved = {
        "saved_mlm_image_kv": 3 * kv if itm_on and mlm_on else 0.0,
        "saved_itm_first_layer_self_attention": 3 * 2 * (self_lin + self_att) if itm_on and nf > 1 else 0.0,
        "saved_itm_last_layer_tokens": 3 * 3 * (sum(text_row(L, True)) - sum(text_row(1, True))) if itm_on and nf else 0.0,
        "saved_mlm_last_layer_tokens": 3 * (sum(text_row(L, True)) - sum(text_row(masked, True))) if mlm_on and nf else 0.0,
        "saved_momentum_last_blocks": sum(vit_full) - sum(vit_mom) + sum(text_full) - sum(text_mom),
    }
    # (fusion_rows(3, 1, 1) vs fusion_rows(3, L, 3): the ITM savings above, as a check)
    assert abs(3 * (sum(itm_unshared) - sum(itm)) - saved["saved_itm_first_layer_self_attention"]
               - saved["saved_itm_last_layer_tokens"]) < 1e-3 * max(1.0, parts["total"])
    assert abs(3 * (sum(mlm_unshared) - sum(mlm)) - saved["saved_mlm_last_layer_tokens"]) < 1e-3 * max(1.0, parts["total"])
    parts.update(saved)
    parts["total_unshared"] = parts["total"] + sum(saved.values())
    recompute = (0.0, 0.0)
    if v.grad_checkpointing:
        recompute = add(recompute, vit_full)
    if t.grad_checkpointing:
        recompute = add(add(add(recompute, text_full), itm), mlm)
        if kv_rows:
            recompute = add(recompute, (kv, 0.0))
    parts["recompute_ckpt"] = sum(recompute)
    parts["sdpa_attention"] = (3 * vit_full[1] + vit_mom[1] + 3 * text_full[1] + text_mom[1] + 3 * itm[1]
                               + 3 * mlm[1] + recompute[1])
    return {k: float(x) for k, x in parts.items()}


def _step_peak_mib(fwd_bwd, opt, dev) -> float:
    """Peak tensor memory (MiB) allocated during one forward + backward (``fwd_bwd()``) above what
    was allocated before it. CPU: from the profiler's allocation records (``profile_memory``), at
    operator granularity; CUDA: ``max_memory_allocated``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fwd_bwd()
        cur = top = 0
        for e in sorted(prof.events(), key=lambda e: e.time_range.start):
            cur += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
            top = max(top, cur)
        peak = top / 2**20
    opt.step()
    opt.zero_grad(set_to_none=True)
    return peak


def _time_steps(step, batch_fn, steps: int, warmup: int, dev, max_seconds: float = 0.0) -> tuple[list, float]:
    """Run ``warmup + steps`` steps (stopping early after ``max_seconds`` once one step is timed);
    returns the timed steps' seconds and the first step's."""
    import torch

    times, first, start = [], None, time.perf_counter()
    for i in range(warmup + steps):
        b = batch_fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(b)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        first = dt if first is None else first
        if i >= warmup:
            times.append(dt)
        if max_seconds and times and time.perf_counter() - start > max_seconds:
            break
    return times, first


def _measure(step, fwd_bwd, batch_fn, opt, dev, steps: int, warmup: int, max_seconds: float, instrument: bool,
             counted_step=None) -> tuple:
    """Time ``step`` (after, with ``instrument``, the FLOPs of one ``counted_step`` (default ``step``)
    and the peak tensor memory of one ``fwd_bwd``); returns the FLOPs counted per batch, that peak
    (both None without ``instrument``), the timed steps' seconds, the first step's and the peak memory
    (MiB: allocated on CUDA, the process's maximum resident set on CPU)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counted = step_peak = None
    if instrument:
        with FlopCounterMode(display=False) as fc:
            (counted_step or step)(batch_fn())
        counted = fc.get_total_flops()
        b = batch_fn()
        step_peak = _step_peak_mib(lambda: fwd_bwd(b), opt, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, first = _time_steps(step, batch_fn, steps, warmup, dev, max_seconds)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return counted, step_peak, times, first, peak


def _timing_row(times: list, first: float, batch: int) -> dict:
    med = sorted(times)[len(times) // 2]
    return {"step_s_median": med, "step_s_min": min(times), "first_step_s": first, "steps_timed": len(times),
            "pairs_per_s": batch / med, "pairs_per_s_best": batch / min(times)}


def _queue_size(cfg) -> int:
    """``loss.queue_size`` (``model.queue_size`` in a baseline checkout from before the objective had
    its own config)."""
    return cfg.loss.queue_size if hasattr(cfg.loss, "queue_size") else cfg.model.queue_size


def _step_module(model, cfg):
    """The module whose forward is the pre-training step and how to call it: this checkout's objective
    (``objectives/pretrain.py``), or the model itself in a baseline checkout from before it."""
    try:
        from objectives.pretrain import PretrainObjective
    except ImportError:
        return model, lambda module, b: module(b, cfg.loss)
    return PretrainObjective(model, cfg.loss), lambda module, b: module(b)


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
        compile_: bool = False, threads: int = 0, instrument: bool = True, max_seconds: float = 0.0,
        variant: str = "srcl", compile_backend: str = "inductor") -> dict:
    """Measure one setting of this project's step in this process; returns the result row.
    ``variant`` ``baseline`` (or ``srcl_unshared``) is the same measurement of another checkout's
    code (the caller puts it first on ``sys.path``); ``srcl_unshared``'s analytic FLOPs are
    ``total_unshared`` (a checkout from before ITM and MLM shared one fusion pass)."""
    import torch

    from engine.config import load_config
    from models.vlp import VLPModel
    from tasks.pretrain import PretrainConfig

    if threads > 0:
        torch.set_num_threads(threads)
    elif threads < 0:  # the trainer's default (train.num_threads=0)
        from engine.threads import apply_num_threads
        apply_num_threads(0, torch.device("cpu"))
    flag = str(ckpt == "torch").lower()
    overrides = ["model.vision_weights=null", "model.text_weights=null", "tokenizer.path=null",
                 f"model.vision.grad_checkpointing={flag}", f"model.text.grad_checkpointing={flag}",
                 *MODEL_OVERRIDES.get(model_name, [])]
    if model_name == "tiny":
        queue_key = "loss" if hasattr(PretrainConfig().loss, "queue_size") else "model"
        overrides.append(f"{queue_key}.queue_size={TINY_QUEUE}")
    cfg = load_config(PretrainConfig, ROOT / CONFIGS[model_name], overrides)
    # the vocabulary as in the run: bert-base's (tokenizer.path set) or one trained on the captions
    if load_config(PretrainConfig, ROOT / CONFIGS[model_name]).tokenizer.path is None:
        cfg = load_config(PretrainConfig, ROOT / CONFIGS[model_name],
                          overrides + [f"model.text.vocab_size={cfg.tokenizer.vocab_size}"])
    torch.manual_seed(0)
    dev = torch.device(device)
    model = VLPModel(cfg.model).to(dev)
    objective, call = _step_module(model, cfg)  # (the momentum copy is taken before any wrapping)
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

    fwd = torch.compile(objective, backend=compile_backend) if compile_ else objective
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def fwd_bwd(b, module=fwd):
        with amp:
            out = call(module, b)
        out["loss"].backward()

    def step(b, module=fwd):
        fwd_bwd(b, module)
        opt.step()
        opt.zero_grad(set_to_none=True)

    rss0 = _rss_mib()
    # two instrumented steps: the FLOPs actually executed (by the eager model: the same operators),
    # and the peak tensor memory of forward + backward (activations, gradients, temporaries;
    # parameters and optimiser state excluded)
    counted, step_peak, times, first, peak = _measure(step, fwd_bwd, batch_fn, opt, dev, steps, warmup, max_seconds,
                                                      instrument, counted_step=lambda b: step(b, objective))
    counted = None if counted is None else counted / batch
    acfg = cfg
    if ckpt == "fairscale":  # the wrapper recomputes the same blocks the config switches would
        import dataclasses
        m = cfg.model
        acfg = dataclasses.replace(cfg, model=dataclasses.replace(
            m, vision=dataclasses.replace(m.vision, grad_checkpointing=True),
            text=dataclasses.replace(m.text, grad_checkpointing=True)))
    flops = analytic_flops(acfg, length, batch)
    analytic = flops["total_unshared" if variant == "srcl_unshared" else "total"] + flops["recompute_ckpt"]
    timing = _timing_row(times, first, batch)
    row = {"variant": variant, "model": model_name, "precision": precision, "checkpointing": ckpt, "compile": compile_,
           "compile_backend": compile_backend if compile_ else None,
           "batch": batch, "device": device, "threads": torch.get_num_threads(), **timing,
           "peak_mem_mib": peak, "rss_before_steps_mib": rss0 if dev.type == "cpu" else None,
           "step_peak_tensor_mib": step_peak,
           "flops_per_pair_counted": counted, "flops_per_pair_analytic": analytic,
           "flops_analytic_parts": flops,
           "params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6}
    if counted is not None:
        # the counter does not see CPU SDPA kernels: add their analytic FLOPs to compare
        row["flops_per_pair_counted_plus_sdpa"] = counted + (flops["sdpa_attention"] if dev.type == "cpu" else 0.0)
        row["achieved_gflops"] = counted * batch / timing["step_s_median"] / 1e9
    row["achieved_gflops_analytic"] = analytic * batch / timing["step_s_median"] / 1e9
    if dev.type == "cuda":
        row["gpu_name"] = torch.cuda.get_device_name(dev)
    return row


def albef_one(albef_dir: str, precision: str, batch: int, steps: int, warmup: int, device: str,
              threads: int = 0, instrument: bool = True, max_seconds: float = 0.0) -> dict:
    """Measure ALBEF's own pre-training step (``models/model_pretrain.py: ALBEF.forward`` of a
    local checkout of salesforce/ALBEF, its ``configs/Pretrain.yaml`` and ``config_bert.json``:
    ViT-B/16 at 256 px, BERT-base 6 + 6, queue 65,536, alpha 0.4) on the same random inputs and
    with the same fused AdamW as :func:`one`. Runs in an interpreter whose ``transformers`` the
    checkout's ``models/xbert.py`` imports; random initialisation (no DeiT / BERT download); one
    process, so its all-gather is the identity."""
    import types

    sys.path[:] = [p for p in sys.path if Path(p).resolve() != ROOT]
    sys.path.insert(0, albef_dir)
    import torch
    import yaml

    import models.model_pretrain as mp  # ALBEF's package, not this project's

    if threads:
        torch.set_num_threads(threads)
    mp.concat_all_gather = lambda t: t
    mp.BertForMaskedLM.from_pretrained = classmethod(lambda cls, name, config=None: cls(config=config))
    config = yaml.safe_load(open(os.path.join(albef_dir, "configs/Pretrain.yaml")))
    config["bert_config"] = os.path.join(albef_dir, config["bert_config"])
    tokenizer = types.SimpleNamespace(pad_token_id=0, cls_token_id=101, mask_token_id=103)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = mp.ALBEF(text_encoder="bert-base-uncased", tokenizer=tokenizer, config=config, init_deit=False).to(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.02,
                            fused=dev.type in ("cpu", "cuda") or None)
    v, length, size = model.text_encoder.config.vocab_size, 30, config["image_res"]
    g = torch.Generator().manual_seed(0)

    def batch_fn():
        ids = torch.randint(1000, v, (batch, length), generator=g)
        ids[:, 0] = tokenizer.cls_token_id
        return (torch.randn(batch, 3, size, size, generator=g).to(dev),
                types.SimpleNamespace(input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev)))

    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def fwd_bwd(b):
        with amp:
            loss_mlm, loss_ita, loss_itm = model(*b, alpha=config["alpha"])
        (loss_mlm + loss_ita + loss_itm).backward()

    def step(b):
        fwd_bwd(b)
        opt.step()
        opt.zero_grad(set_to_none=True)

    counted, step_peak, times, first, peak = _measure(step, fwd_bwd, batch_fn, opt, dev, steps, warmup, max_seconds,
                                                      instrument)
    counted = None if counted is None else counted / batch  # ALBEF's attention is plain matmuls: all counted
    timing = _timing_row(times, first, batch)
    row = {"variant": "albef", "model": "vitb_bertbase", "precision": precision, "checkpointing": "off",
           "compile": False, "batch": batch, "device": device, "threads": torch.get_num_threads(), **timing,
           "peak_mem_mib": peak, "step_peak_tensor_mib": step_peak, "flops_per_pair_counted": counted,
           "flops_per_pair_counted_plus_sdpa": counted, "flops_per_pair_analytic": None,
           "params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
           "albef_alpha": config["alpha"]}
    if counted is not None:
        row["achieved_gflops"] = counted * batch / timing["step_s_median"] / 1e9
    return row


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    """Markdown table of result rows."""
    head = ("| variant | model | precision | checkpointing | batch | pairs/s (median) | pairs/s (best) | step s | "
            "peak MiB | step peak tensor MiB | GFLOP/pair (counted + SDPA) | GFLOP/pair (analytic) | GFLOP/s |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['variant']} | {r['model']} | {r['precision']} | {r['checkpointing']} | {r['batch']} | "
                       f"failed: {r['error'][:60]} |")
            continue
        name = r["model"] + (" (compiled)" if r.get("compile") else "")
        counted = r.get("flops_per_pair_counted_plus_sdpa")
        gflops = r.get("achieved_gflops_analytic") or r.get("achieved_gflops")
        out.append(f"| {r['variant']} | {name} | {r['precision']} | {r['checkpointing']} | {r['batch']} | "
                   f"{r['pairs_per_s']:.3f} | {r['pairs_per_s_best']:.3f} | {r['step_s_median']:.3f} | "
                   f"{r['peak_mem_mib']:.0f} | {_fmt(r.get('step_peak_tensor_mib'), '.0f')} | "
                   f"{_fmt(counted and counted / 1e9, '.2f')} | "
                   f"{_fmt(r.get('flops_per_pair_analytic') and r['flops_per_pair_analytic'] / 1e9, '.2f')} | "
                   f"{_fmt(gflops, '.1f')} |")
    return "\n".join(out)


def ratios(runs: list[dict], rows: list[dict]) -> list[dict]:
    """pairs/s of ``srcl`` over each other variant, per (model, precision, checkpointing): from the
    best rounds, and per round (the two measured next to each other)."""
    out = []
    keyf = lambda r: (r["model"], r["precision"], r["checkpointing"], r.get("compile", False))  # noqa: E731
    best = {(r["variant"], *keyf(r)): r for r in rows if "error" not in r}
    for (variant, *key), r in best.items():
        ours = best.get(("srcl", *key))
        if variant == "srcl" or ours is None:
            continue
        per_round = []
        for rnd in sorted({x["round"] for x in runs}):
            a = [x for x in runs if x["round"] == rnd and x["variant"] == "srcl" and keyf(x) == tuple(key) and "error" not in x]
            b = [x for x in runs if x["round"] == rnd and x["variant"] == variant and keyf(x) == tuple(key) and "error" not in x]
            if a and b:
                per_round.append(a[0]["pairs_per_s"] / b[0]["pairs_per_s"])
        out.append({"model": key[0], "precision": key[1], "checkpointing": key[2], "compile": key[3],
                    "versus": variant, "srcl_pairs_per_s": ours["pairs_per_s"], "other_pairs_per_s": r["pairs_per_s"],
                    "ratio_best_rounds": ours["pairs_per_s"] / r["pairs_per_s"], "ratio_per_round": per_round})
    return out


def _error_line(stderr: str, returncode: int) -> str:
    """The exception line of a failed setting's stderr (the last ``...Error: ...`` line), else its last line."""
    lines = [x.strip() for x in stderr.strip().splitlines() if x.strip()]
    errors = [x for x in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", x)]
    return (errors or lines or [f"exit {returncode}"])[-1][:500]


BASELINE_VARIANTS = ("baseline", "srcl_unshared")  # the step of the checkout at --baseline-root


def _child_cmd(args, variant: str, m: str, p: str, c: str, instrument: bool) -> list[str]:
    common = ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--device", args.device, "--threads", str(args.threads), "--max-seconds", str(args.max_seconds),
              "--compile", *args.compile, "--compile-backend", args.compile_backend,
              *([] if instrument else ["--instrument", "none"])]
    if variant == "albef":
        return [args.albef_python or sys.executable, __file__, *common, "--albef", args.albef, "--_albef_child", p]
    code = ["--code-root", args.baseline_root] if variant in BASELINE_VARIANTS else []
    return [sys.executable, __file__, *common, *code, "--_child", m, p, c, variant]


THREAD_POLICIES = {  # name: (threads argument of one(), extra environment)
    "default": (0, {}),                                  # torch's default: one thread per core
    "passive": (0, {"OMP_WAIT_POLICY": "PASSIVE"}),      # the same, waiting threads sleep instead of spinning
    "1": (1, {}),
    "auto": (-1, {}),                                    # train.num_threads=0 (engine.threads.auto_num_threads)
}


def _busy_cpus(sample_s: float = 0.5) -> float:
    """How many of this process's CPUs other programs kept busy over ``sample_s`` seconds."""
    from engine.threads import _cpu_times

    cpus = os.sched_getaffinity(0)
    t0 = _cpu_times(cpus)
    time.sleep(sample_s)
    t1 = _cpu_times(cpus)
    return sum((t1[c][0] - t0[c][0]) / max(1, t1[c][1] - t0[c][1]) for c in t1 if c in t0)


def contention(args) -> None:
    """Thread policies on a CPU that other programs use: each policy in its own process, with 0 and
    with N busy-loop processes competing (``--competitors``), all interleaved per round."""
    runs = []
    load_before = os.getloadavg()
    for rnd in range(args.rounds):
        for n_comp in args.competitors:
            for policy in args.policies:
                threads, env = THREAD_POLICIES[policy]
                hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n_comp)]
                try:
                    time.sleep(1.0)
                    busy = _busy_cpus()
                    cmd = [sys.executable, __file__, "--batch", str(args.batch), "--steps", str(args.steps),
                           "--warmup", str(args.warmup), "--threads", str(threads), "--instrument", "none",
                           "--compile", "off", "--_child", args.models[0], args.precisions[0], "off", "srcl"]
                    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                         env={**os.environ, **env}, timeout=args.child_timeout or None)
                finally:
                    for h in hogs:
                        h.kill()
                        h.wait()
                if res.returncode != 0:
                    print(res.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"contention run {policy} with {n_comp} competitor(s) failed")
                row = json.loads(res.stdout.strip().splitlines()[-1])
                row.update(policy=policy, env=env, competitors=n_comp, cpus_busy_before=busy, round=rnd,
                           loadavg=os.getloadavg())
                runs.append(row)
                print(f"round {rnd} competitors={n_comp} policy={policy:8s} threads={row['threads']}  "
                      f"{row['pairs_per_s']:7.2f} pairs/s (best {row['pairs_per_s_best']:.2f})  "
                      f"CPUs busy before {busy:.2f}  load {row['loadavg'][0]:.1f}", flush=True)
    best = {}
    for r in runs:
        k = (r["competitors"], r["policy"])
        if k not in best or r["pairs_per_s"] > best[k]["pairs_per_s"]:
            best[k] = r
    ref = best.get((0, "default"))
    summary = []
    print("\n| competitors | policy | threads | pairs/s | vs default without competitor |\n|---|---|---|---|---|")
    for (n_comp, policy), r in sorted(best.items()):
        rel = r["pairs_per_s"] / ref["pairs_per_s"] if ref else None
        summary.append({"competitors": n_comp, "policy": policy, "threads": r["threads"],
                        "pairs_per_s": r["pairs_per_s"], "relative_to_default_idle": rel})
        print(f"| {n_comp} | {policy} | {r['threads']} | {r['pairs_per_s']:.2f} | {_fmt(rel, '.2f')} |")
    import torch
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "summary": summary, "all_rounds": runs}, indent=2))
    print(f"wrote {args.out}")


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
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per setting (0 = torch's default, -1 = the trainer's automatic choice)")
    ap.add_argument("--compile", nargs="*", choices=["off", "on"], default=None,
                    help="torch.compile the model (first step compiles); '--compile' alone = on, "
                         "'--compile off on' measures both")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend (inductor; eager only traces: a quick check that compiling works)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat all settings this many times, interleaved, and keep each setting's fastest round "
                         "(robust against other load on a shared machine); every round is kept in the JSON")
    ap.add_argument("--variants", nargs="+", default=["srcl"], choices=["srcl", *BASELINE_VARIANTS, "albef"],
                    help="srcl: this checkout's step; baseline: the step of the checkout at --baseline-root "
                         "(e.g. before a change); srcl_unshared: the same, FLOPs counted as before ITM and MLM "
                         "shared one fusion pass; albef: ALBEF's own step from the checkout at --albef "
                         "(vitb_bertbase, checkpointing off only)")
    ap.add_argument("--albef", default=None, help="a local checkout of salesforce/ALBEF (for --variants albef)")
    ap.add_argument("--albef-python", default=None,
                    help="the interpreter for ALBEF (one whose transformers its models/xbert.py imports)")
    ap.add_argument("--baseline-root", default=None, help="another checkout of this project (for baseline, srcl_unshared)")
    ap.add_argument("--instrument", choices=["all", "first", "none"], default="all",
                    help="the FLOP-counting and memory-profiling steps: in every round, the first round only "
                         "(later rounds reuse its counts), or never")
    ap.add_argument("--max-seconds", type=float, default=0.0,
                    help="stop a setting's timed steps after this many seconds once one step is timed (0 = no limit)")
    ap.add_argument("--child-timeout", type=float, default=0.0,
                    help="kill a setting's process after this many seconds and record it as failed (0 = no limit)")
    ap.add_argument("--keep-going", action="store_true", help="record a failed setting and continue")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="the device's peak (e.g. 790 for H200 dense bf16): adds the fraction of it achieved "
                         "(analytic model FLOPs, without checkpointing's recomputation, x pairs/s; ALBEF: "
                         "counted FLOPs)")
    ap.add_argument("--contention", action="store_true",
                    help="compare thread policies (--policies) with and without busy-loop processes "
                         "(--competitors) competing for the CPUs; first of --models / --precisions")
    ap.add_argument("--policies", nargs="+", default=list(THREAD_POLICIES), choices=list(THREAD_POLICIES))
    ap.add_argument("--competitors", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/pretrain_throughput.json"))
    ap.add_argument("--code-root", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--_albef_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    compiles = [False] if args.compile is None else ([True] if not args.compile else
                                                     [c == "on" for c in dict.fromkeys(args.compile)])
    instrument = args.instrument != "none"
    if args._albef_child:
        print(json.dumps(albef_one(args.albef, args._albef_child, args.batch, args.steps, args.warmup, args.device,
                                   args.threads, instrument, args.max_seconds)))
        return
    if args._child:
        if args.code_root:
            sys.path[:] = [p for p in sys.path if Path(p).resolve() != ROOT]
            sys.path.insert(0, str(Path(args.code_root).resolve()))
        m, p, c, variant = args._child
        print(json.dumps(one(m, p, args.batch, args.steps, args.warmup, args.device, c, compiles[0], args.threads,
                             instrument, args.max_seconds, variant, args.compile_backend)))
        return
    if args.contention:
        contention(args)
        return
    if "albef" in args.variants and not args.albef:
        ap.error("--variants albef needs --albef DIR")
    if set(BASELINE_VARIANTS) & set(args.variants) and not args.baseline_root:
        ap.error("--variants baseline / srcl_unshared need --baseline-root DIR")
    rows, runs = [], []
    load_before = os.getloadavg()
    settings = [(v, m, c, p, k) for m in args.models
                for c in dict.fromkeys("torch" if c == "on" else c for c in args.checkpointing)
                for k in compiles for p in args.precisions for v in args.variants
                if v != "albef" or (m == "vitb_bertbase" and c == "off" and not k)]
    counted = {}
    for rnd in range(args.rounds):
        for v, m, c, p, k in settings:
            args.compile = [("on" if k else "off")]
            first_of_setting = (v, m, c, p, k) not in counted
            cmd = _child_cmd(args, v, m, p, c, args.instrument == "all" or (args.instrument == "first" and first_of_setting))
            t0 = time.perf_counter()
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                     timeout=args.child_timeout or None)
                err = None if res.returncode == 0 else _error_line(res.stderr, res.returncode)
                if err:
                    print(res.stderr[-3000:], file=sys.stderr)
            except subprocess.TimeoutExpired:
                err = f"timed out after {args.child_timeout:.0f} s"
            if err:
                if not args.keep_going:
                    raise SystemExit(f"benchmark {v} {m} {p} {c} failed: {err}")
                row = {"variant": v, "model": m, "precision": p, "checkpointing": c, "compile": k,
                       "batch": args.batch, "error": err}
            else:
                row = json.loads(res.stdout.strip().splitlines()[-1])
                if row.get("flops_per_pair_counted") is None and (v, m, c, p, k) in counted:
                    row.update(counted[(v, m, c, p, k)], flops_counted_in_round=0)
                elif row.get("flops_per_pair_counted") is not None:
                    counted[(v, m, c, p, k)] = {x: row.get(x) for x in (
                        "flops_per_pair_counted", "flops_per_pair_counted_plus_sdpa", "step_peak_tensor_mib")}
                if args.peak_tflops:  # model FLOPs (recomputation not counted) per second over the peak
                    f = (row.get("flops_analytic_parts") or {}).get("total") or row.get("flops_per_pair_counted_plus_sdpa")
                    row["peak_tflops"] = args.peak_tflops
                    row["fraction_of_peak"] = f * row["pairs_per_s"] / (args.peak_tflops * 1e12) if f else None
            counted.setdefault((v, m, c, p, k), {})
            row["round"], row["loadavg"], row["wall_s"] = rnd, os.getloadavg(), time.perf_counter() - t0
            runs.append(row)
            if "error" in row:
                print(f"round {rnd} {v:13s} {m:14s} {p:5s} ckpt={c:9s} compile={k!s:5s} FAILED: {err}", flush=True)
                continue
            f = row.get("flops_per_pair_counted_plus_sdpa")
            print(f"round {rnd} {v:13s} {m:14s} {p:5s} ckpt={c:9s} compile={k!s:5s} batch={row['batch']:3d}  "
                  f"{row['pairs_per_s']:8.3f} pairs/s (best {row['pairs_per_s_best']:.3f})  "
                  f"step {row['step_s_median']:7.3f} s  peak {row['peak_mem_mib']:6.0f} MiB  "
                  f"{_fmt(f and f / 1e9, '7.2f')} GFLOP/pair counted+SDPA (analytic "
                  f"{_fmt(row.get('flops_per_pair_analytic') and row['flops_per_pair_analytic'] / 1e9, '.2f')})"
                  + (f"  {row['fraction_of_peak']:.3f} of peak" if row.get("fraction_of_peak") else ""),
                  flush=True)
    for setting in settings:  # each setting's fastest round
        mine = [r for r in runs if (r["variant"], r["model"], r["checkpointing"], r["precision"], r["compile"]) == setting]
        ok = [r for r in mine if "error" not in r]
        rows.append(min(ok, key=lambda r: r["step_s_median"]) if ok else mine[-1])
    print()
    print(table(rows))
    rat = ratios(runs, rows)
    for r in rat:
        print(f"srcl / {r['versus']} ({r['model']} {r['precision']} ckpt={r['checkpointing']}): "
              f"{r['ratio_best_rounds']:.3f} (best rounds), per round {[round(x, 3) for x in r['ratio_per_round']]}")
    from importlib.metadata import version
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch": version("torch"), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "ratios": rat, "all_rounds": runs}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
