#!/usr/bin/env bash
# Install the CPU build of torch into a virtual environment, the same way on every Linux machine.
#
#   bash scripts/install_torch.sh VENV_PYTHON [TORCH_VERSION]     # default version: 2.13.0
#
# Why: PyPI's `torch==2.13.0` for Linux x86_64 is the CUDA build (a 555 MB wheel for 2.14.1, plus about 2.2 GB
# of NVIDIA wheels and triton); hf-moe's demo and tests run on the CPU, and the CPU build is a 192 MB wheel
# (754 MB installed). The CPU build is `torch==X+cpu` on PyTorch's CPU index.
#
# Order:
#   1. a local CPU wheel that pip already knows about (find-links, e.g. /opt/wheels on the CI machines, or
#      PIP_FIND_LINKS): installed with --no-index, so no index is contacted at all;
#   2. otherwise PyTorch's CPU index (TORCH_INDEX_URL, default https://download.pytorch.org/whl/cpu) as an
#      extra index: only it has the `+cpu` version asked for, and torch's own dependencies come from the
#      usual index.
# Either way torch's dependencies are then installed by a normal `pip install` (torch itself is satisfied).
# TORCH_SPEC overrides the whole requirement (e.g. TORCH_SPEC=torch==2.13.0 for the CUDA build from PyPI);
# TORCH_INDEX_URL another CPU index (a mirror).
set -euo pipefail

PY=${1:?usage: install_torch.sh VENV_PYTHON [TORCH_VERSION]}
VERSION=${2:-2.13.0}
SPEC=${TORCH_SPEC:-torch==${VERSION}+cpu}
INDEX=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
# pip, minus the harmless warning it prints per package about this machine's missing local index folders.
pip_() { "$PY" -m pip --disable-pip-version-check --no-input -q "$@" 2> >(grep -v 'is neither a file nor a directory' >&2); }
log() { printf '[install_torch] %s\n' "$*" >&2; }

if "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch') != '${SPEC#torch==}')" 2>/dev/null; then
  log "${SPEC} is already installed"
elif [[ -n "${TORCH_SPEC:-}" ]]; then
  log "installing ${SPEC} (TORCH_SPEC) from the configured index"
  pip_ install "$SPEC"
elif pip_ install --no-index --no-deps "$SPEC" 2>/dev/null; then
  log "installed ${SPEC} from a local wheel (find-links)"
else
  log "no local ${SPEC} wheel; installing it from ${INDEX}"
  pip_ install --no-deps --extra-index-url "$INDEX" "$SPEC" || {
    log "could not install ${SPEC} from ${INDEX}. Either put the wheel in a folder pip's find-links names"
    log "(PIP_FIND_LINKS=DIR), point TORCH_INDEX_URL at a mirror of the CPU index, or take PyPI's CUDA build"
    log "with TORCH_SPEC=torch==${VERSION}."
    exit 1
  }
fi
# torch's own dependencies (filelock, sympy, networkx, jinja2, fsspec, ...) from the usual index, unless the
# caller pins them itself (TORCH_DEPS=0: scripts/vllm_env.sh installs a complete lock next).
if [[ "${TORCH_DEPS:-1}" != 0 ]]; then
  pip_ install "$SPEC"
fi
