#!/usr/bin/env bash
# Create .venv and install lightning-fpq (editable) into it with the extras named by the first
# argument (default: dev):
#   bash scripts/setup.sh dev    everything a CPU machine can install: tests, linters, plots, fit,
#                                Ray, triton, torchao (`make test`, `make lint`)
#   bash scripts/setup.sh plot   the package and matplotlib: what the demo needs (`make demo`)
# Without an NVIDIA GPU, torch's CPU build is installed first ("+cpu" pins the CPU wheel, so
# pip can never fall back to the multi-GB CUDA build); the project's own torch range is then
# already satisfied. Set PIP_EXTRA_INDEX_URL to a CPU wheel index where none is configured.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${1:-dev}
case "$EXTRAS" in
  *[!a-z,]*|"") echo "setup.sh: extras '$EXTRAS' is not valid: expected names like dev or plot (see pyproject.toml)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv

# pip install, quiet; on failure print everything and stop (set -e).
pip_install() {
  local out
  if ! out=$(.venv/bin/pip install -q "$@" 2>&1); then
    echo "$out" >&2
    return 1
  fi
  # a local mirror's harmless "Location ... is ignored" notes are dropped
  echo "$out" | grep -v "is ignored: it is neither a file nor a directory" || true
}

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install "torch>=2.13.0"
  else
    pip_install "torch==2.13.0+cpu"
  fi
fi
pip_install -e ".[$EXTRAS]"
.venv/bin/python -c "import lightning_fpq, torch, lightning; print('lightning-fpq', lightning_fpq.__version__, '[$EXTRAS] | torch', torch.__version__, '| lightning', lightning.__version__)"
touch ".venv/.installed-$EXTRAS"
