#include "isa.h"

#include <atomic>
#include <cstdlib>

#include <c10/util/Exception.h>

namespace fastlayers::cpu {
namespace {

bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  switch (isa) {
    case Isa::Scalar: return true;
    case Isa::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
  }
  return false;
#else
  return isa == Isa::Scalar;
#endif
}

Isa best_isa() {
  if (cpu_has(Isa::Avx512)) return Isa::Avx512;
  if (cpu_has(Isa::Avx2)) return Isa::Avx2;
  return Isa::Scalar;
}

Isa parse(const std::string& name) {
  if (name == "avx512") return Isa::Avx512;
  if (name == "avx2") return Isa::Avx2;
  if (name == "scalar") return Isa::Scalar;
  TORCH_CHECK_VALUE(false, "fastlayers: unknown ISA '", name,
                    "'; expected one of 'avx512', 'avx2', 'scalar'");
}

Isa initial_isa() {
  const char* env = std::getenv("FASTLAYERS_ISA");
  if (env == nullptr || *env == '\0' || std::string(env) == "auto") return best_isa();
  Isa want = parse(env);
  TORCH_CHECK(cpu_has(want), "fastlayers: FASTLAYERS_ISA=", env, " but this CPU lacks it");
  return want;
}

std::atomic<int>& current() {
  static std::atomic<int> isa{static_cast<int>(initial_isa())};
  return isa;
}

}  // namespace

Isa active_isa() { return static_cast<Isa>(current().load(std::memory_order_relaxed)); }

Isa set_isa(const std::string& name) {
  Isa want = name == "auto" ? best_isa() : parse(name);
  TORCH_CHECK(cpu_has(want), "fastlayers: this CPU cannot run the '", name, "' kernels");
  current().store(static_cast<int>(want));
  return want;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

std::vector<std::string> supported_isa_names() {
  std::vector<std::string> out;
  for (Isa i : {Isa::Avx512, Isa::Avx2, Isa::Scalar})
    if (cpu_has(i)) out.emplace_back(isa_name(i));
  return out;
}

}  // namespace fastlayers::cpu
