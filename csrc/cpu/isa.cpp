#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

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

// AMD family 0x19 (Zen 3 and Zen 4; only Zen 4 has AVX-512): 256-bit FMA
// units, a zmm FMA takes both. Zen 5 (0x1A) has full-width ones.
bool split_512bit_fma() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  char vendor[13];
  std::memcpy(vendor, &b, 4); std::memcpy(vendor + 4, &d, 4); std::memcpy(vendor + 8, &c, 4);
  vendor[12] = '\0';
  if (std::strcmp(vendor, "AuthenticAMD") != 0 || !__get_cpuid(1, &a, &b, &c, &d)) return false;
  unsigned family = (a >> 8) & 0xF;
  if (family == 0xF) family += (a >> 20) & 0xFF;
  return family == 0x19;
#else
  return false;
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

bool initial_auto() {
  const char* env = std::getenv("FASTLAYERS_ISA");
  return env == nullptr || *env == '\0' || std::string(env) == "auto";
}

std::atomic<int>& current() {
  static std::atomic<int> isa{static_cast<int>(initial_isa())};
  return isa;
}

std::atomic<bool>& chosen_automatically() {
  static std::atomic<bool> a{initial_auto()};
  return a;
}

}  // namespace

Isa active_isa() { return static_cast<Isa>(current().load(std::memory_order_relaxed)); }

Isa gemm_isa() {
  static const bool split = split_512bit_fma();
  const Isa isa = active_isa();
  if (isa == Isa::Avx512 && split && chosen_automatically().load(std::memory_order_relaxed))
    return Isa::Avx2;
  return isa;
}

Isa set_isa(const std::string& name) {
  Isa want = name == "auto" ? best_isa() : parse(name);
  TORCH_CHECK(cpu_has(want), "fastlayers: this CPU cannot run the '", name, "' kernels");
  chosen_automatically().store(name == "auto");
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
