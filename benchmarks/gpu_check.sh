#!/usr/bin/env bash
# The one GPU check, sized for a lent H200 (10 minutes a command, no network, 8 files back).
# Each part runs under its own time limit, inside an overall one (TEMPO_GPU_CHECK_S, default
# 450 s), and writes its own result file; a part that fails does not stop the next:
#   log.txt             every part's output and exit status
#   kernel_tests.txt    pytest tests/test_kernels.py on CUDA (run while the extension builds)
#   kernels/results.*   the Triton kernels against their references at V=151,936 in bf16, and
#                       timed against the materialised path and Liger at T=8k and 16k
#                       (benchmarks/gpu_kernels.py)
#   system.{md,json}    the CUDA vote kernel against the C++ one; TEMPO steps at Qwen3-0.6B shape
#                       on the HF backend (bf16) and the Megatron backend (TP=1): s/step, tokens/s,
#                       peak memory, MFU; vLLM parity where vLLM is installed (benchmarks/gpu_check.py)
#   profile.txt         torch.profiler's table of one more HF step (NVTX ranges on)
#   ncu.txt             Nsight Compute on the fused kernels, where ncu can read the counters
#
#   benchmarks/gpu_check.sh OUT [WHEELS]     # WHEELS: a folder of Python 3.12 wheels (default .whl)
#   benchmarks/gpu_check.sh OUT --smoke      # the same parts at tiny shapes on CPU (no build, no ncu)
#
# The wheels are those the GPU machine lacks: megatron-core, liger-kernel, math-verify and its
# two dependencies, each installed on its own (one that does not fit the machine is logged and
# skipped). Fetch them with --python-version 3.12 --only-binary=:all: (README, "On a GPU").
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
deadline=$((SECONDS + ${TEMPO_GPU_CHECK_S:-450}))
failed=0

step() {  # step NAME SECONDS CMD...: run with a time limit (cut to what is left), log output and status
    local name=$1 limit=$2 start=$SECONDS rc left=$((deadline - SECONDS))
    shift 2
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "=== $name: skipped, ${left}s of the check's time left" | tee -a "$log"; failed=1; return 1
    fi
    echo "=== $name (limit ${limit}s): $*" >>"$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    rc=$?
    echo "=== $name: rc=$rc after $((SECONDS - start))s" | tee -a "$log"
    [ $rc -eq 0 ] || failed=1
    return $rc
}

if [ -n "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    for whl in "$wheels"/*.whl; do
        step "wheel $(basename "$whl")" 30 $py -m pip install -q --no-index --no-deps --no-compile \
            --target /tmp/tempo-wheels "$whl"
    done
    export PYTHONPATH=/tmp/tempo-wheels${PYTHONPATH:+:$PYTHONPATH}
fi
$py -c "import pytest" 2>/dev/null || echo "pytest is not installed: the kernel tests cannot run" | tee -a "$log"

if [ -z "$smoke" ]; then
    # The packages from the source tree, not pip (an editable install wants setuptools from an
    # index): links to tempo/ and kernels/ (as tempo_kernels), not the repository root, whose
    # kernels/ would shadow the Hugging Face package of that name that transformers probes.
    shim=/tmp/tempo-shim
    mkdir -p $shim && ln -sfn "$PWD/tempo" $shim/tempo && ln -sfn "$PWD/kernels" $shim/tempo_kernels
    export PYTHONPATH=$shim${PYTHONPATH:+:$PYTHONPATH}
    # The kernel tests (GPU) run while the vote extension (C++ and CUDA) compiles (CPU); without
    # the extension the vote falls back to Python and the vote part says so.
    (step "kernel tests" 150 \
        bash -c "cd tests && $py -m pytest -q -p no:cacheprovider test_kernels.py >'$out/kernel_tests.txt' 2>&1; rc=\$?; tail -3 '$out/kernel_tests.txt'; exit \$rc") &
    tests_pid=$!
    MAX_JOBS=${MAX_JOBS:-12} step build 240 $py setup.py -q build_ext --inplace
    wait $tests_pid || failed=1
    step kernels 120 $py benchmarks/gpu_kernels.py "$out/kernels" --skip-tests --budget-s 110
    step system 200 $py benchmarks/gpu_check.py "$out" --profile --budget-s 190
    if command -v ncu >/dev/null; then
        step ncu 60 ncu --clock-control none --section SpeedOfLight -k 'regex:_lp_|_policy_loss|_group_adv' \
            -c 6 $py benchmarks/gpu_kernels.py /tmp/tempo-ncu --ncu-target
        grep -v "^==PROF==" "$log" | sed -n '/=== ncu (limit/,$p' >"$out/ncu.txt"
    else
        echo "ncu: not on the PATH" | tee "$out/ncu.txt" >>"$log"
    fi
else
    step kernels 300 $py benchmarks/gpu_kernels.py "$out/kernels" --smoke --budget-s 280
    step system 300 $py benchmarks/gpu_check.py "$out" --profile --smoke --budget-s 290
fi
echo "gpu_check: $( [ $failed -eq 0 ] && echo all parts passed || echo some parts FAILED, see $log)" | tee -a "$log"
exit $failed
