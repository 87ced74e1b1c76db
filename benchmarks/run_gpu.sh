#!/usr/bin/env bash
# Every GPU measurement of the project, one log per step, into the folder $1
# (default: gpu-results). Run from the repository root with a Python that has torch (CUDA
# build), triton, torchao, lightning and the test extras; TE is used where installed.
#
#     PYTHON=.venv/bin/python bash benchmarks/run_gpu.sh gpu-results
#
# Record the figures in the docs by hand, with the device and versions printed here.
set -u
out=${1:-gpu-results}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() {  # step NAME COMMAND...: run, keep the log, remember a failure, go on
    local name=$1; shift
    echo "== $name: $*"
    "$@" >"$out/$name.txt" 2>&1 || { echo "!! $name failed (exit $?), see $out/$name.txt"; status=1; }
    tail -n 25 "$out/$name.txt"
}
step backends "$py" -c "from lightning_fpq import backends; print(backends.describe_backends())"
step gpu_tests "$py" -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_backends.py tests/test_precision.py -k "gpu or kernel or torchao or backend"
step bench_kernels "$py" benchmarks/bench_kernels.py
step bench_step_100m "$py" benchmarks/bench_step_gpu.py --size 100m --stages bf16 fp8 fp4
step bench_step_1b "$py" benchmarks/bench_step_gpu.py --size 1b --stages bf16 fp8 fp4
step bench_step_1b_compiled "$py" benchmarks/bench_step_gpu.py --size 1b --stages bf16 fp8 fp4 --compile
exit $status
