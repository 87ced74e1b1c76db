#!/usr/bin/env bash
# The GPU check of lightning-fpq (benchmarks/gpu_check.py), for a lent GPU machine: it runs from
# this checkout with the Python found there (no install, no package registry; torchao and
# omegaconf may be missing), stops within 7 minutes, and leaves gpu_check.json, gpu_check.txt and
# this run's log in the folder $1 (default: gpu-report). docs/gpu.md says what it measures.
#
#     bash benchmarks/run_gpu.sh gpu-report            # PYTHON=python3 unless set
#     WHEELS=.gpu-wheels bash benchmarks/run_gpu.sh gpu-report
#
# WHEELS names a folder of wheels (torchao, omegaconf, antlr4 ...) for a machine that lacks them
# and reaches no registry: they are installed offline into a fresh folder put first on
# PYTHONPATH, so that the torchao backend's real FP8 GEMMs are measured too. Arguments after the
# folder go to gpu_check.py (--smoke, --only ...).
set -u
cd "$(dirname "$0")/.."
out=${1:-gpu-report}
shift || true
py=${PYTHON:-python3}
mkdir -p "$out" && : > "$out/run.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ]; then
  site=$(mktemp -d "${TMPDIR:-/tmp}/fpq-site.XXXXXX")
  if ! "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl; then
    echo "run_gpu.sh: installing the wheels in $WHEELS failed" >&2
    exit 3
  fi
  echo "run_gpu.sh: installed into $site: $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')" | tee "$out/run.log"
  PYTHONPATH="$site:$PYTHONPATH"
  # torchao's compiled extensions are built for another torch; float8 training needs none of them
  export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=${TORCHAO_FORCE_SKIP_LOADING_SO_FILES:-1}
fi
# the script caps each section (360 s in all); this cap only guards against a hang
timeout --kill-after=10 410 "$py" benchmarks/gpu_check.py "$out" "$@" 2>&1 | tee -a "$out/run.log"
exit "${PIPESTATUS[0]}"
