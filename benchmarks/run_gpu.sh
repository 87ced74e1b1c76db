#!/usr/bin/env bash
# The GPU check of lightning-fpq (benchmarks/gpu_check.py), for a lent GPU machine: it runs from
# this checkout with the Python found there (no install, no package registry; torchao and
# omegaconf may be missing), stops within 7 minutes, and leaves gpu_check.json, gpu_check.txt and
# this run's log in the folder $1 (default: gpu-report). docs/gpu.md says what it measures.
#
#     bash benchmarks/run_gpu.sh gpu-report            # PYTHON=python3 unless set
set -u
cd "$(dirname "$0")/.."
out=${1:-gpu-report}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the script caps each section (360 s in all); this cap only guards against a hang
timeout --kill-after=10 410 "$py" benchmarks/gpu_check.py "$out" 2>&1 | tee "$out/run.log"
exit "${PIPESTATUS[0]}"
