#!/usr/bin/env bash
# The prepared GPU check (issue "The GPU path, proven"): the `gpu` tests, the MoE block benchmark at a
# Qwen3-30B-A3B-like shape, a SmolLM2-135M-shaped training step, and the upcycling study at GPU scale, in one run
# of at most 8 minutes on an H200. Every result goes into OUTDIR (7 files: the device tool returns at most 8).
#
#   scripts/gpu_check.sh OUTDIR                 # on the GPU machine
#   scripts/gpu_check.sh OUTDIR --cpu           # CPU dry run: tiny sizes, no wheel install (tests/test_gpu_check_dryrun.py)
#   scripts/gpu_check.sh --prepare              # here, where PyPI is reachable: the two commands below
#
# Options: --only STEP[,STEP] (of tests, block, train_step, study: a second visit reruns what failed),
# --no-install (use the interpreter's own packages), --wheels DIR (default .whl), --assets DIR (default
# .gpu_assets; with --cpu a tiny synthetic stand-in unless given), --python PY (default python3; .venv/bin/python with --cpu when present). GPU_CHECK_SECONDS (default
# 470) is the whole run's budget: the study gets what the earlier steps leave.
#
# ---- before a GPU visit (network needed; both folders are git-ignored and never committed) -----------------------
# 1. Wheels that the GPU machine (Python 3.12, torch 2.11+cu130, transformers 5.17, peft, accelerate 1.15,
#    huggingface_hub 1.33, tokenizers 0.23.2, safetensors 0.8.0) lacks: transformers and peft as CI pins them, and
#    regex (transformers 5.23 needs >= 2025.10.22; the machine's version is unknown). 15.0 MB in all:
#    transformers-5.23.0 13.3 MB, peft-0.21.2 0.8 MB, regex-2026.1.15 0.8 MB (measured with pip download, 2026-12-01).
#
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#        --platform any -d .whl transformers==5.24.0 peft==0.21.2 regex==2026.1.15
#
# 2. Real text for the study: the Shakespeare split tokenised with the SmolLM2 tokenizer (uint16, 3.1 MB) and the
#    SmolLM2-135M config. The real weights cannot travel (540 MB fp32; the Q4_1 GGUF wheel is 93 MB; the device
#    tool carries at most 64 MiB), so the study's base is that shape, randomly initialised and trained densely first.
#
#      .venv/bin/python benchmarks/gpu_suite.py assets --assets .gpu_assets
#
# ---- the run (the device tool; 540 s leaves the script's 470 s and the start) --------------------------------------
#      run(command="bash scripts/gpu_check.sh $OUT", carry=[".whl", ".gpu_assets"], timeout_s=540)
# Then copy SUMMARY.md's tables into BENCHMARKS.md / RESULTS.md (GPU sections) and study.png next to them.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

OUT="" CPU=0 INSTALL=1 PREPARE=0 WHEELS="$ROOT/.whl" ASSETS="" PY="" SYNTHETIC="" ONLY=""
STEPS="tests block train_step study"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1; INSTALL=0 ;;
    --no-install) INSTALL=0 ;;
    --prepare) PREPARE=1 ;;
    --wheels) WHEELS="$2"; shift ;;
    --assets) ASSETS="$(cd "$2" 2>/dev/null && pwd || echo "$2")"; shift ;;
    --python) PY="$2"; shift ;;
    --only) ONLY="${2//,/ }"; shift
      for name in $ONLY; do
        case " $STEPS " in *" $name "*) ;; *) echo "gpu_check.sh: unknown step '$name' in --only (steps: $STEPS)" >&2; exit 2 ;; esac
      done ;;
    -h|--help) awk 'NR > 1 && /^set -uo/ {exit} NR > 1' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "gpu_check.sh: one OUTDIR only (got $OUT and $1)" >&2; exit 2; }; OUT="$1" ;;
  esac
  shift
done
if [ -z "$PY" ]; then
  if [ "$CPU" = 1 ] && [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi

if [ "$PREPARE" = 1 ]; then
  set -e
  ASSETS="${ASSETS:-$ROOT/.gpu_assets}"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$WHEELS" transformers==5.24.0 peft==0.21.2 regex==2026.1.15
  "$PY" benchmarks/gpu_suite.py assets --assets "$ASSETS"
  du -sh "$WHEELS" "$ASSETS"
  exit 0
fi
[ -n "$OUT" ] || { echo "usage: scripts/gpu_check.sh OUTDIR [--cpu] [--no-install] (or --prepare); see --help" >&2; exit 2; }

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
STATUS="$(mktemp)"
BUDGET="${GPU_CHECK_SECONDS:-470}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
: > "$LOG"
log() { echo "[gpu_check $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

# step NAME TIMEOUT_S CMD...: runs CMD with a time limit, output into the log, status recorded; never aborts the run.
# Steps left out by --only are skipped.
step() {
  local name="$1" limit="$2" started=$SECONDS code
  shift 2
  if [ -n "$ONLY" ] && [[ " $STEPS " == *" $name "* ]] && [[ " $ONLY " != *" $name "* ]]; then
    log "step $name: skipped (--only $ONLY)"
    return 0
  fi
  log "step $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  code=$?
  echo "$name $code $((SECONDS - started))" >>"$STATUS"
  log "step $name: exit $code after $((SECONDS - started))s"
}

# ---- packages: wheels into a target folder; the project itself runs from this source tree ----------------------
SITE=""
if [ "$INSTALL" = 1 ]; then
  SITE="$(mktemp -d /tmp/gpu_check_site.XXXXXX)"
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    log "no wheels in $WHEELS: run 'scripts/gpu_check.sh --prepare' where PyPI is reachable, or pass --no-install"
    exit 2
  fi
  step install 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --find-links "$WHEELS" --target "$SITE" "$WHEELS"/*.whl
fi
export PYTHONPATH="$ROOT${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"

log "environment"
{
  nvidia-smi 2>/dev/null || echo "(no nvidia-smi)"
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
from packaging.requirements import Requirement
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for dist in ("transformers", "peft", "accelerate", "huggingface_hub", "tokenizers", "safetensors", "regex"):
    try:
        print(dist, md.version(dist), md.distribution(dist).locate_file(""))
    except md.PackageNotFoundError:
        print(dist, "MISSING")
# What the wheels need that this interpreter lacks or has in the wrong version (--no-deps installs skip the check).
for dist in ("transformers", "peft"):
    for line in md.requires(dist) or []:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            print(f"UNMET {dist} needs {req}: not installed")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            print(f"UNMET {dist} needs {req}: have {have}")
EOF
} >>"$LOG" 2>&1

# ---- sizes: the GPU's, or tiny ones for the CPU dry run ---------------------------------------------------------
if [ "$CPU" = 1 ]; then
  DEVICE=cpu
  TEST_LIMIT=300
  BLOCK_ARGS=(--hidden 64 --intermediate 32 --experts 8 --top-k 2 --tokens 64 256 --warmup 1 --reps 2)
  TRAIN_ARGS=(--shape tiny --batch-size 2 --seq-len 64 --warmup 1 --steps 2)
  # fp32: bf16 autocast is exercised by the gpu tests; here only the script's plumbing is under test.
  STUDY_ARGS=(--no-bf16 --pretrain-steps 4 --steps 4 --batch-size 4 --seq-len 64 --eval-every 2 --eval-windows 8
              --warmup 2 --seeds 0 1)
  if [ -z "$ASSETS" ]; then  # tiny synthetic text unless --assets names real ones
    ASSETS="$(mktemp -d /tmp/gpu_check_assets.XXXXXX)"
    SYNTHETIC="$ASSETS"
    step assets 120 "$PY" benchmarks/gpu_suite.py assets --synthetic --synthetic-tokens 16384 --assets "$ASSETS"
  fi
else
  DEVICE=cuda
  TEST_LIMIT=150
  BLOCK_ARGS=(--hidden 2048 --intermediate 768 --experts 128 --top-k 8 --tokens 4096 16384 --warmup 3 --reps 10)
  TRAIN_ARGS=(--shape smollm2-135m --batch-size 8 --seq-len 1024 --warmup 3 --steps 10)
  # 1.36M training tokens in 2664 windows of 512: 64 dense steps (0.52M tokens) build the base, each arm then
  # trains 100 steps (0.82M tokens) on the rest, reshuffled per seed.
  STUDY_ARGS=(--pretrain-steps 64 --steps 100 --batch-size 16 --seq-len 512 --eval-every 20 --eval-windows 64
              --warmup 10 --seeds 0 1 2)
  ASSETS="${ASSETS:-$ROOT/.gpu_assets}"
  [ -f "$ASSETS/shakespeare_ids.npz" ] || { log "no $ASSETS/shakespeare_ids.npz: run --prepare first"; exit 2; }
fi

# ---- the checks -----------------------------------------------------------------------------------------------------
HF_MOE_TEST_DEVICE=$DEVICE step tests "$TEST_LIMIT" \
  bash -c "set -o pipefail; '$PY' -m pytest -q -rfEs -p no:cacheprovider -m gpu tests/gpu 2>&1 | tee '$OUT/tests.txt'"
step block 150 "$PY" benchmarks/gpu_suite.py block --device "$DEVICE" "${BLOCK_ARGS[@]}" --json "$OUT/block.json"
step train_step 180 "$PY" benchmarks/gpu_suite.py train-step --device "$DEVICE" "${TRAIN_ARGS[@]}" \
  --json "$OUT/train_step.json"
# The study gets the rest of the budget (at least 60 s); it writes its JSON after every seed and starts a seed only
# when the previous one's time still fits.
LEFT=$((BUDGET - SECONDS - 20))
[ "$LEFT" -ge 60 ] || LEFT=60
step study "$LEFT" "$PY" benchmarks/gpu_suite.py study --device "$DEVICE" --assets "$ASSETS" "${STUDY_ARGS[@]}" \
  --budget-s $((LEFT - 30)) --png "$OUT/study.png" --json "$OUT/study.json"

"$PY" benchmarks/gpu_suite.py report "$OUT" --status "$STATUS" >>"$LOG" 2>&1 || log "report failed"
[ -z "$SITE" ] || rm -rf "$SITE"
[ -z "$SYNTHETIC" ] || rm -rf "$SYNTHETIC"
FAILED=$(awk '$2 != 0 {print $1}' "$STATUS" | tr '\n' ' ')
rm -f "$STATUS"
log "done in ${SECONDS}s; results in $OUT${FAILED:+; FAILED: $FAILED}"
[ -z "$FAILED" ]
