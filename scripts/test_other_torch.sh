#!/usr/bin/env bash
# Run the test suite under another torch (and triton) release, in a throwaway virtual
# environment holding a fresh clone of this checkout's HEAD:
#
#   bash scripts/test_other_torch.sh 2.11.0 3.6.0              # the lent GPU image's torch and triton
#   bash scripts/test_other_torch.sh 2.6.0 "" plot,fit,test,ray,torchao   # the torch floor (its own triton 3.2)
#
# Arguments: torch version, triton version ("" = whatever that torch pins), extras (default dev;
# the dev extra asks for triton >= 3.6, which torch < 2.10 cannot have). With
# INTERPRETER_TRITON=3.9.0 it also runs the kernel tests under that triton's CPU interpreter,
# put first on PYTHONPATH (triton 3.6-3.8's interpreter cannot run the kernels).
#
# PYTHON picks the interpreter (default python3; the GPU image runs Python 3.12).
# PyPI's torch wheels are CUDA builds (a venv of about 4.6 GB); they run on a CPU. This is a
# compatibility check for developers, never part of set-up or CI. Work folder: $WORK
# (default /tmp/fpq-torch-<version>-<python>), replaced on each run.
set -euo pipefail
TORCH=${1:?usage: test_other_torch.sh TORCH_VERSION [TRITON_VERSION] [EXTRAS]}
TRITON=${2:-}
EXTRAS=${3:-dev}
case "$EXTRAS" in *[!a-z,]*|"") echo "test_other_torch.sh: extras '$EXTRAS' is not valid: expected names like dev or plot,fit,test" >&2; exit 2 ;; esac
SRC=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
WORK=${WORK:-/tmp/fpq-torch-$TORCH-$(basename "${PYTHON:-python3}")}
rm -rf "$WORK" && mkdir -p "$WORK"
git clone -q "$SRC" "$WORK/src"
"${PYTHON:-python3}" -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/pip" install -q -c "$WORK/pins.txt")
printf 'torch==%s\n' "$TORCH" > "$WORK/pins.txt"
[ -z "$TRITON" ] || printf 'triton==%s\n' "$TRITON" >> "$WORK/pins.txt"
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }
"${PIP[@]}" "torch==$TORCH" ${TRITON:+"triton==$TRITON"} 2>&1 | quiet
(cd "$WORK/src" && "${PIP[@]}" -e ".[$EXTRAS]" 2>&1 | quiet)
cd "$WORK/src"
"$WORK/venv/bin/python" - <<'PY'
import importlib.metadata as md
import sys
names = ("torch", "triton", "lightning", "torchao", "ray", "numpy")
installed = {d.metadata["Name"] for d in md.distributions()}
print(" | ".join([f"Python {sys.version.split()[0]}"] + [f"{n} {md.version(n)}" for n in names if n in installed]))
PY
echo "== the whole suite (commit $(git rev-parse --short HEAD))"
status=0
"$WORK/venv/bin/python" -m pytest -n 2 -q -p no:cacheprovider || status=$?
if [ -n "${INTERPRETER_TRITON:-}" ]; then
  echo "== tests/test_kernels.py under triton $INTERPRETER_TRITON's interpreter"
  "$WORK/venv/bin/pip" install -q --no-deps --target "$WORK/triton-interp" "triton==$INTERPRETER_TRITON" 2>&1 | quiet
  PYTHONPATH="$WORK/triton-interp" TRITON_INTERPRET=1 LIGHTNING_FPQ_KERNEL_TESTS_CHILD=1 \
    "$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_kernels.py | tail -n 1 || status=$?
fi
exit "$status"
