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
Isa set_isa(const std::string& name);  // throws c10::Error if unsupported
const char* isa_name(Isa isa);
std::vector<std::string> supported_isa_names();

}  // namespace fastlayers::cpu
