#!/usr/bin/env bash
# One-shot GPU check: build the CUDA extension, run the CUDA tests, run the
# benchmark. Everything is logged to ${OUT:-.}/gpu_check.log. The benchmark
# runs even if tests fail; the exit code is the build's or the tests'.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
LOG="${OUT:-.}/gpu_check.log"
mkdir -p "$(dirname "$LOG")"
exec > >(tee -a "$LOG") 2>&1

echo "== $(date -u +%FT%TZ) fastlayers gpu_check"
nvidia-smi || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

echo "== build"
# The GPU image sets CXX to a g++ wrapper (/opt/gcc/bin/g++) whose build of the
# extension crashed inside libstdc++'s ostream code whenever a TORCH_CHECK
# message formatted an integer (seen on the H200: SIGSEGV in
# ostream::_M_insert<long>, instantiated inside our .so). The distribution's
# g++ (same GCC 13.3) builds a working extension, so prefer it.
if [ -x /usr/bin/g++ ] && [ "${FASTLAYERS_KEEP_CXX:-0}" = 0 ]; then
  export CXX=/usr/bin/g++ CC=/usr/bin/gcc
fi
echo "CXX=${CXX:-default}"
t0=$(date +%s)
build_rc=0
BUILD_LOG="${OUT:-.}/build.log"
# 9.0a: one sm_90a image per file (the wgmma GEMM needs it; every kernel runs
# from it on an H100/H200), instead of 9.0 + the 9.0a that setup.py would add.
MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} \
  timeout 300 python setup.py build_ext --inplace > "$BUILD_LOG" 2>&1 || build_rc=$?
echo "build rc=$build_rc in $(( $(date +%s) - t0 )) s (full log: $BUILD_LOG)"
if [ "$build_rc" -ne 0 ]; then
  grep -n -E "error|Error" "$BUILD_LOG" | head -n 60 || true
  tail -n 60 "$BUILD_LOG"
  echo "RESULT: build FAILED"
  exit "$build_rc"
fi
grep -i -E "warning" "$BUILD_LOG" | grep -v -E "^\s*$" | head -n 20 || true
grep -q "code=sm_90a" "$BUILD_LOG" && echo "sm_90a image built (wgmma GEMM)" \
  || echo "no sm_90a image in the build: the wgmma GEMM declines"
python -c "import fastlayers, torch; print('fastlayers from', fastlayers.__file__, 'with_cuda', fastlayers._C.with_cuda())"

echo "== tests"
test_rc=0
# --maxfail rather than -x: one run should show every failing case it can.
# test_errors runs on its own afterwards: a crash there must not hide the
# other tests' failure reports.
timeout 300 python -m pytest tests/test_cuda.py tests/test_cuda_gemm_tc.py tests/test_cuda_wgmma.py tests/test_cuda_membound.py -v --maxfail=25 -rs --tb=short -p no:cacheprovider \
  --deselect tests/test_cuda.py::test_errors || test_rc=$?
echo "tests rc=$test_rc"
# FASTLAYERS_CUDA_NEW=0 turns off the newest kernels (csrc/cuda/common.cuh:
# new_paths_enabled); the older ones still serve other shapes and GPUs, so run
# the suite again on them (test_cuda_membound runs both ways by itself).
new_rc=0
FASTLAYERS_CUDA_NEW=0 timeout 240 python -m pytest tests/test_cuda.py -q \
  --maxfail=25 -rs --tb=short -p no:cacheprovider --deselect tests/test_cuda.py::test_errors || new_rc=$?
echo "tests with FASTLAYERS_CUDA_NEW=0 rc=$new_rc"
[ "$test_rc" -eq 0 ] && test_rc=$new_rc
err_rc=0
timeout 60 python -X faulthandler -m pytest tests/test_cuda.py::test_errors -v --tb=short \
  -p no:cacheprovider || err_rc=$?
echo "test_errors rc=$err_rc"
if [ "$err_rc" -gt 128 ] && command -v cuda-gdb >/dev/null 2>&1; then
  echo "== native backtrace of the crash (cuda-gdb)"
  timeout 120 cuda-gdb -q -batch -ex run -ex bt --args python -m pytest \
    tests/test_cuda.py::test_errors -q -p no:cacheprovider 2>&1 | tail -n 40 || true
fi
[ "$test_rc" -eq 0 ] && test_rc=$err_rc

echo "== benchmark"
bench_rc=0
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 150 python benchmarks/gpu_bench.py || bench_rc=$?
echo "benchmark rc=$bench_rc"
echo "== benchmark with FASTLAYERS_CUDA_NEW=0 (the older kernels)"
FASTLAYERS_CUDA_NEW=0 GPU_BENCH_NAME=gpu_bench_older.json PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
  timeout 150 python benchmarks/gpu_bench.py || bench_rc=$?
echo "benchmark (older kernels) rc=$bench_rc"

echo "RESULT: build ok; tests $([ $test_rc -eq 0 ] && echo passed || echo "FAILED (rc=$test_rc)"); benchmark $([ $bench_rc -eq 0 ] && echo ok || echo "FAILED (rc=$bench_rc)")"
exit "$test_rc"
