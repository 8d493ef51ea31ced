"""Kernel choices of the pre-training step, timed alone (fwd + bwd, ViT-B / BERT-base shapes, batch 8):

- ``vit_attention``: the ViT's self-attention (8 x 12 heads x 257 tokens x 64) through SDPA's flash
  kernel (what the step uses) vs its math path (plain matrix products, as ALBEF computes it);
- ``fusion_attention``: the fusion layers' cross-attention with BERT's attention dropout (0.1) in
  training, queries (8, 12, Q, 64) against an image's keys/values (8, 12, 257, 64): SDPA (which
  takes its math path when dropout is on, on CPU) vs ``softmax((q d^-0.5) k^T)``, dropout, ``@ v``;
- ``word_embedding``: the tied 30,522 x 768 word-embedding gradient with the ITC and MLM captions
  looked up in two calls (as the step does) vs one call on both.

    python benchmarks/kernel_choices.py --threads 1 --rounds 2 --out benchmarks/results/kernel_choices.json

Each variant's time is the median of ``--repeats`` calls after one warm-up; variants alternate within
a round and the faster round is kept. Writes a table to stdout and the JSON (with the command, the
date and the load average) to ``--out``."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def cases(torch, F):
    """{(part, dtype, variant): a zero-argument fwd + bwd call}."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        q, k, v = (torch.randn(8, 12, 257, 64, dtype=dtype, requires_grad=True) for _ in range(3))
        for variant, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)):
            def vit(q=q, k=k, v=v, backend=backend):
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v).sum().backward()
            out[("vit_attention", name, variant)] = vit
        for q_len in (90, 30):  # one image's 3 packed rows of 30 tokens; a single row
            qf = torch.randn(8, 12, q_len, 64, dtype=dtype, requires_grad=True)

            def sdpa(q=qf, k=k, v=v):
                F.scaled_dot_product_attention(q, k, v, dropout_p=0.1).sum().backward()

            def explicit(q=qf, k=k, v=v):
                s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
                (F.dropout(s.softmax(-1), 0.1, True) @ v).sum().backward()
            out[(f"fusion_attention_q{q_len}", name, "sdpa")] = sdpa
            out[(f"fusion_attention_q{q_len}", name, "explicit")] = explicit
    emb = torch.nn.Embedding(30522, 768)
    ids, ids_mlm = torch.randint(0, 30522, (8, 30)), torch.randint(0, 30522, (8, 30))
    dec = torch.randn(40, 768)  # the MLM head's masked positions read the tied weight too

    def two_calls():
        (emb(ids).sum() + emb(ids_mlm).sum() + (dec @ emb.weight.T).sum()).backward()
        emb.weight.grad = None

    def one_call():
        (emb(torch.cat([ids, ids_mlm])).sum() + (dec @ emb.weight.T).sum()).backward()
        emb.weight.grad = None
    out[("word_embedding", "float32", "two_calls")] = two_calls
    out[("word_embedding", "float32", "one_call")] = one_call
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/kernel_choices.json")
    args = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    fns = cases(torch, F)
    rounds = [{"|".join(key): _time(fn, args.repeats) for key, fn in fns.items()} for _ in range(args.rounds)]
    best = {key: min(r[key] for r in rounds) for key in rounds[0]}
    lines = ["| part | dtype | variant | ms (fwd + bwd) |", "|---|---|---|---|"]
    lines += [f"| {k.split('|')[0]} | {k.split('|')[1]} | {k.split('|')[2]} | {v * 1e3:.1f} |" for k, v in best.items()]
    print("\n".join(lines))
    res = {"meta": {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                    "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
                    "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
           "best_ms": {k: v * 1e3 for k, v in best.items()}, "rounds_ms": [{k: v * 1e3 for k, v in r.items()} for r in rounds],
           "table_markdown": "\n".join(lines)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
