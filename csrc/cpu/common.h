// Shared argument checks and helpers for the CPU ops (torch-side code only).
#pragma once
#include <ATen/ATen.h>

namespace fastlayers {

// float32 is the fast path, float64 the gradcheck path; float16 and bfloat16
// are widened to float32 before this check (below); anything else is refused.
inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "fastlayers.", op, ": ", name, " has dtype ", t.scalar_type(),
              "; fastlayers supports float32 and float64 on the CPU (float16 and bfloat16 "
              "are computed in float32)");
}

// float16 / bfloat16 on the CPU: each op widens its reduced-precision tensors to
// float32, runs its float32 kernels (calling itself) and rounds the outputs to the
// dtypes its fake kernel gives: the input's for activations and gradients, float32
// for BatchNorm's statistics. Dtype rules are checked on the original tensors first.
inline bool is_reduced(const at::Tensor& t) {
  return t.defined() && (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16);
}
inline bool is_reduced(const std::optional<at::Tensor>& t) { return t.has_value() && is_reduced(*t); }
inline at::Tensor widen(const at::Tensor& t) { return is_reduced(t) ? t.to(at::kFloat) : t; }
inline std::optional<at::Tensor> widen(const std::optional<at::Tensor>& t) {
  return is_reduced(t) ? std::optional<at::Tensor>(t->to(at::kFloat)) : t;
}
inline at::Tensor round_to(const at::Tensor& t, at::ScalarType st) {
  return t.scalar_type() == st ? t : t.to(st);
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* op,
                       const char* na, const char* nb) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "fastlayers.", op, ": expected ", nb,
              " to have the same dtype as ", na, ", but got ", nb, " ", b.scalar_type(),
              " and ", na, " ", a.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "fastlayers.", op, ": expected ", nb,
              " to be on the same device as ", na, ", but got ", b.device(), " and ",
              a.device());
}

// Tensor that a masked-out gradient returns (a fresh one per output: outputs
// of one op must not alias each other).
inline at::Tensor no_grad_placeholder(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

}  // namespace fastlayers
