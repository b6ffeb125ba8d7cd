// Runtime choice of the CPU kernel path. The build is portable (baseline
// x86-64 flags); kernel files that need AVX2/AVX-512 enable them per function
// with `#pragma GCC target` *after* their includes, and callers pick the path
// with active_isa(). FASTLAYERS_ISA=scalar|avx2|avx512 forces one at start-up.
#pragma once
#include <string>
#include <vector>

namespace fastlayers::cpu {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

Isa active_isa();
// The GEMM kernels' path (Linear, Conv2d's GEMMs): active_isa(), except that
// where the AVX-512 path was chosen automatically (no FASTLAYERS_ISA, or
// set_isa("auto")) on a CPU whose 512-bit FMAs issue as two 256-bit halves
// (AMD family 0x19, Zen 4), the GEMM runs the AVX2 kernels: there they
// measured 3-8 % faster (Linear and GEMM at 2 threads, convs 0-7 %), while
// the AVX-512 pooling and BatchNorm kernels stay. Forcing 'avx512' runs the
// AVX-512 GEMM kernels too (so tests cover them).
Isa gemm_isa();
Isa set_isa(const std::string& name);  // throws c10::Error if unsupported
const char* isa_name(Isa isa);
std::vector<std::string> supported_isa_names();

}  // namespace fastlayers::cpu
