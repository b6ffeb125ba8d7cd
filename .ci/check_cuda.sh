#!/usr/bin/env bash
# Compile checks for the CUDA sources without a GPU (and without a CUDA torch):
#  1. each csrc/cuda/*.cu with nvcc for sm_80 and sm_90, with the flags torch's
#     BuildExtension adds (no implicit half conversions etc.);
#  2. csrc/cuda/*.cpp (the torch glue) with g++ -fsyntax-only against the
#     installed torch headers;
#  3. .ci/host_check.cu: the conv2d index maps and the SIMT GEMM tiles run on
#     the host vs direct loops; .ci/host_check_gemm_tc.cu replays the
#     tensor-core GEMM (cp.async, ldmatrix, mma fragment maps) on the host;
#     .ci/host_check_wgmma.cu replays the wgmma GEMM's copy / swizzle /
#     accumulator maps against a model of the SWIZZLE_128B descriptor read.
# Exits non-zero on the first failure. Skips the nvcc part if nvcc is absent.
# Env: ARCHS (default "80 90"), NVCC_TIMEOUT (seconds per file, default 900).
set -uo pipefail
cd "$(dirname "$0")/.."
ARCHS=${ARCHS:-"80 90"}
NVCC_TIMEOUT=${NVCC_TIMEOUT:-900}
status=0

INC=$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))")
# torch >= 2.10 headers need C++20 (BuildExtension compiles the glue with it).
for f in csrc/cuda/*.cpp; do
  echo "== g++ -fsyntax-only $f"
  if ! g++ -std=c++20 -fsyntax-only -Wall -Wextra -Wno-unused-parameter $INC $(python3-config --includes) \
      -Icsrc -DFASTLAYERS_WITH_CUDA "$f"; then
    echo "FAIL: $f"; status=1
  fi
done

if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc not found: skipping the CUDA compile checks"
  exit $status
fi
GENCODE=""
for a in $ARCHS; do GENCODE="$GENCODE -gencode arch=compute_$a,code=sm_$a"; done
TORCH_NVCC_FLAGS="-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr"
for f in csrc/cuda/*.cu; do
  # The wgmma GEMM's device code exists only in the sm_90a image (setup.py adds
  # 9.0a to the build's arch list): compile that too, with ptxas' register report.
  extra=""
  case "$f" in
    *wgmma*) case " $ARCHS " in *" 90 "*) extra="-gencode arch=compute_90a,code=sm_90a -Xptxas -v";; esac;;
  esac
  echo "== nvcc $f ($ARCHS${extra:+ 90a})"
  start=$(date +%s)
  if ! timeout "$NVCC_TIMEOUT" nvcc -std=c++17 -O3 $TORCH_NVCC_FLAGS -Xcompiler -Wall \
      -Icsrc -c "$f" -o /dev/null $GENCODE $extra 2> >(grep -v -E "^ptxas info *: (Compile time|Function properties|[0-9]+ bytes gmem)" >&2); then
    echo "FAIL: $f"; status=1
  fi
  echo "   $(( $(date +%s) - start )) s"
done
echo "== host check of the conv index maps and the GEMM planner (.ci/host_check.cu)"
if timeout "$NVCC_TIMEOUT" nvcc -std=c++17 $TORCH_NVCC_FLAGS -Icsrc .ci/host_check.cu \
    -o /tmp/fastlayers_host_check -gencode arch=compute_90,code=sm_90; then
  /tmp/fastlayers_host_check || status=1
else
  echo "FAIL: .ci/host_check.cu"; status=1
fi
echo "== host replay of the tensor-core GEMM (.ci/host_check_gemm_tc.cu)"
if timeout "$NVCC_TIMEOUT" nvcc -std=c++17 $TORCH_NVCC_FLAGS -Icsrc .ci/host_check_gemm_tc.cu \
    -o /tmp/fastlayers_host_check_tc -gencode arch=compute_90,code=sm_90; then
  /tmp/fastlayers_host_check_tc || status=1
else
  echo "FAIL: .ci/host_check_gemm_tc.cu"; status=1
fi
echo "== host replay of the wgmma GEMM's copy / swizzle / epilogue maps (.ci/host_check_wgmma.cu)"
if timeout "$NVCC_TIMEOUT" nvcc -std=c++17 -O2 $TORCH_NVCC_FLAGS -Icsrc .ci/host_check_wgmma.cu \
    -o /tmp/fastlayers_host_check_wgmma -gencode arch=compute_90,code=sm_90; then
  /tmp/fastlayers_host_check_wgmma || status=1
else
  echo "FAIL: .ci/host_check_wgmma.cu"; status=1
fi
[ $status -eq 0 ] && echo "check_cuda: all OK" || echo "check_cuda: FAILURES"
exit $status
