#!/usr/bin/env bash
# The one GPU check: at most about 9 minutes on one H100/H200 (each step has a time limit),
# no network. Writes into OUT:
#   log.txt          every step's output and exit status
#   kernels/         the Triton kernels against their references on CUDA, and their timings
#                    against Liger at V=151,936, T=8k-16k, bf16 (benchmarks/gpu_kernels.py)
#   system.{md,json} the CUDA vote kernel against the C++ one, the HF and Megatron backends' TEMPO steps on a
#                    Qwen3-0.6B-shaped model, vLLM parity where vLLM is installed
#                    (benchmarks/gpu_check.py)
#   nsys.txt         an Nsight Systems capture of one step (NVTX ranges), where nsys is on the PATH
#
#   benchmarks/gpu_check.sh OUT [WHEELS]
#
# WHEELS (default .whl): a folder of wheels to install first without an index, for a machine
# that cannot download (megatron-core, liger-kernel, math-verify and its two dependencies).
# CPU: `benchmarks/gpu_check.sh OUT --smoke` runs the same steps at tiny shapes (no build, no nsys).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT [WHEELS | --smoke]}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/log.txt"
: >"$log"
smoke=""
wheels=${2:-.whl}
if [ "$wheels" = "--smoke" ]; then smoke="--smoke"; wheels=""; export TRITON_INTERPRET=1; fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
py=${PYTHON:-python3}
failed=0

step() {  # step NAME SECONDS CMD...: run with a time limit, log its output and status
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s): $*" >>"$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    rc=$?
    echo "=== $name: rc=$rc after $((SECONDS - start))s" | tee -a "$log"
    [ $rc -eq 0 ] || failed=1
}

if [ -n "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    step wheels 120 $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/tempo-wheels "$wheels"/*.whl
    export PYTHONPATH=/tmp/tempo-wheels${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -z "$smoke" ]; then
    # The package in place, with the vote extension (C++ and, where nvcc is, CUDA).
    MAX_JOBS=${MAX_JOBS:-16} step build 150 $py -m pip install -q --no-build-isolation --no-deps -e .
    step kernels 170 $py benchmarks/gpu_kernels.py "$out/kernels" --budget-s 160
else
    step kernels 300 $py benchmarks/gpu_kernels.py "$out/kernels" --smoke --budget-s 280
fi
step system 170 $py benchmarks/gpu_check.py "$out" --budget-s 160 $smoke
if [ -z "$smoke" ] && command -v nsys >/dev/null; then
    step nsys 60 nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop -t cuda,nvtx \
        -o /tmp/tempo-nsys --force-overwrite true \
        $py benchmarks/gpu_check.py /tmp/tempo-nsys-out --parts hf --profile --budget-s 55
    nsys stats --report nvtx_sum --format csv /tmp/tempo-nsys.nsys-rep >"$out/nsys.txt" 2>&1
else
    echo "nsys: not on the PATH on this machine (or --smoke): no capture" | tee "$out/nsys.txt" >>"$log"
fi
echo "gpu_check: $( [ $failed -eq 0 ] && echo all steps passed || echo some steps FAILED, see $log)" | tee -a "$log"
exit $failed
