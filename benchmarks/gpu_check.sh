#!/usr/bin/env bash
# One-GPU check of the pre-training step and the retrieval evaluator, bounded in time.
#
#   bash benchmarks/gpu_check.sh                       # on a machine with one CUDA GPU; JSON into $OUT
#   bash benchmarks/gpu_check.sh --peak-tflops 989     # another GPU's dense bf16 peak (H200 / H100 SXM: ~790-990)
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/gpu_check   # CPU, a tiny model: checks the script
#
# Parts, each under its own time limit (so one slow part cannot eat the others' time), in order:
#   env             nvidia-smi, torch / CUDA versions
#   pretrain_base   ViT-B/16 256 px + BERT-base 6+6, batch 64, bf16: checkpointing off, eager
#   pretrain_ckpt   the same with activation checkpointing on
#   pretrain_compile       checkpointing off, torch.compile on
#   pretrain_compile_ckpt  checkpointing on, torch.compile on (only when enough time is left; with torch
#                   2.14 under CPU bf16 autocast this fails in the backward's recomputation, before
#                   and after the shared fusion pass: recorded as failed, with the error)
#   retrieval       the retrieval evaluator (benchmarks/eval_throughput.py), bf16
#   loader          the input pipeline on this machine's CPUs (benchmarks/loader_throughput.py), pinned memory on/off
# Each part writes <part>.json (and <part>.log) into the output folder; summary.json lists every
# part's status (ok / failed / timed out), seconds, and the headline numbers: pairs/s, peak memory
# and the fraction of the GPU's bf16 peak (analytic FLOPs x pairs/s / --peak-tflops).
set -u

OUT_DIR="${OUT:-benchmarks/results/gpu_check}"
PEAK_TFLOPS=790        # H200 dense bf16, about
BUDGET_S=480           # the whole script
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --peak-tflops) PEAK_TFLOPS="$2"; shift 2 ;;
    --budget) BUDGET_S="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python}"
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/status.tsv"
START=$(date +%s)

if [ "$DRY_RUN" = 1 ]; then
  # CPU, a tiny model, tiny sizes; torch.compile traced with the eager backend (inductor on CPU
  # compiles for minutes): checks every part's plumbing, not speed.
  DEVICE=cpu; MODEL=tiny; BATCH=2; STEPS=1; WARMUP=0; BACKEND=eager
  L_PRE=120; L_COMPILE=120; L_RET=120; L_LOAD=120
  RET_ARGS=(--models demo --images 2 --k-test 1 --batch 2 --precision bf16 --device cpu --threads 1)
  LOAD_ARGS=(--quick --sizes 64x48 --workers 1)
else
  DEVICE=cuda; MODEL=vitb_bertbase; BATCH=64; STEPS=10; WARMUP=2; BACKEND=inductor
  L_PRE=75; L_COMPILE=150; L_RET=60; L_LOAD=60
  RET_ARGS=(--models vitb_bertbase --images 200 --k-test 16 --batch 128 --precision bf16 --device cuda)
  LOAD_ARGS=(--images 16 --rounds 1 --epochs 2 --workers 4 --parts stages readers loader)
fi

remaining() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# part NAME LIMIT_S COMMAND...: run under min(LIMIT_S, time left), record status and seconds
part() {
  local name="$1" limit="$2"; shift 2
  local left; left=$(remaining)
  if [ "$left" -lt 15 ]; then
    printf '%s\tskipped\t0\tno time left\n' "$name" >> "$OUT_DIR/status.tsv"; return
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$? status=ok
  [ $rc = 124 ] || [ $rc = 137 ] && status=timeout
  [ $rc != 0 ] && [ "$status" = ok ] && status=failed
  printf '%s\t%s\t%s\trc=%s limit=%ss\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$rc" "$limit" >> "$OUT_DIR/status.tsv"
  echo "[gpu_check] $name: $status ($(( $(date +%s) - t0 )) s)"
}

pretrain() {  # pretrain NAME LIMIT CKPT COMPILE
  local name="$1" limit="$2" ckpt="$3" comp="$4"
  # the timed loop stops early when its share of the limit is used (model building and the
  # FLOP-counting step come first), the child is killed at the limit
  part "$name" "$limit" "$PY" benchmarks/pretrain_throughput.py --models "$MODEL" --device "$DEVICE" \
    --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --precisions bf16 --checkpointing "$ckpt" \
    --compile "$comp" --compile-backend "$BACKEND" --peak-tflops "$PEAK_TFLOPS" \
    --max-seconds $(( limit / 3 )) --child-timeout $(( limit - 5 )) --keep-going --out "$OUT_DIR/$name.json"
}

part env 20 bash -c "nvidia-smi || true; $PY -c 'import torch, platform; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no cuda\", platform.processor(), __import__(\"os\").cpu_count())'"
pretrain pretrain_base "$L_PRE" off off
pretrain pretrain_ckpt "$L_PRE" torch off
pretrain pretrain_compile "$L_COMPILE" off on
part retrieval "$L_RET" "$PY" benchmarks/eval_throughput.py "${RET_ARGS[@]}" --out "$OUT_DIR/retrieval.json"
part loader "$L_LOAD" "$PY" benchmarks/loader_throughput.py "${LOAD_ARGS[@]}" --out "$OUT_DIR/loader.json"
# last, as it may not fit: both switches on
if [ "$(remaining)" -gt "$(( L_COMPILE / 2 ))" ]; then
  pretrain pretrain_compile_ckpt "$L_COMPILE" torch on
else
  printf 'pretrain_compile_ckpt\tskipped\t0\tno time left\n' >> "$OUT_DIR/status.tsv"
fi

"$PY" - "$OUT_DIR" "$PEAK_TFLOPS" "$DRY_RUN" <<'EOF'
import json, os, sys, time
out, peak, dry = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
parts = {}
for line in open(os.path.join(out, "status.tsv")):
    name, status, secs, note = line.rstrip("\n").split("\t")
    entry = {"status": status, "seconds": int(secs), "note": note}
    path = os.path.join(out, name + ".json")
    if os.path.exists(path):
        data = json.load(open(path))
        for r in data.get("rows", []) if name.startswith("pretrain") else []:
            if "error" in r:  # the benchmark recorded a failed setting (--keep-going)
                entry.update(status="failed", error=r["error"])
                continue
            entry.update({k: r.get(k) for k in ("model", "batch", "precision", "checkpointing", "compile",
                                                 "pairs_per_s", "step_s_median", "steps_timed", "peak_mem_mib",
                                                 "flops_per_pair_analytic", "fraction_of_peak", "gpu_name")},
                         flops_per_pair_model=(r.get("flops_analytic_parts") or {}).get("total"))
        entry["json"] = path
    parts[name] = entry
summary = {"dry_run": dry, "peak_tflops": peak, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "loadavg": os.getloadavg(), "parts": parts}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
for name, e in parts.items():
    extra = "" if e.get("pairs_per_s") is None else (
        f"  {e['pairs_per_s']:.1f} pairs/s, peak {e['peak_mem_mib']:.0f} MiB"
        + (f", {e['fraction_of_peak']:.3f} of the bf16 peak" if e.get("fraction_of_peak") else ""))
    print(f"{name:24s} {e['status']:8s} {e['seconds']:4d} s{extra}")
EOF
echo "[gpu_check] total $(( $(date +%s) - START )) s; results in $OUT_DIR"
