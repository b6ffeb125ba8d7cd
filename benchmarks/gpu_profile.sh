#!/usr/bin/env bash
# Build with CUDA, sweep the SIMT tile configs (benchmarks/gpu_profile.py) and,
# when Nsight Compute is there, profile one call of each op. Output in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++ CC=/usr/bin/gcc
MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} \
  python setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 120 python benchmarks/gpu_profile.py time 2>&1 | tee "$OUT/sweep.txt"
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  timeout "${NCU_TIMEOUT:-200}" "$NCU" --clock-control none -k regex:"simt|pool|splitk|bn_" \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis python benchmarks/gpu_profile.py once > "$OUT/ncu.txt" 2>&1
  echo "ncu rc=$?"; grep -E "simt|pool|splitk|bn_|Throughput|Achieved Occupancy|Registers|Stall|Duration" "$OUT/ncu.txt" | head -150
else
  echo "no ncu"
fi
