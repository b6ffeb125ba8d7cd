// Shared argument checks and helpers for the CPU ops (torch-side code only).
#pragma once
#include <ATen/ATen.h>

namespace fastlayers {

// float32 is the fast path, float64 the gradcheck path; anything else is refused.
inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "fastlayers.", op, ": ", name, " has dtype ", t.scalar_type(),
              "; fastlayers supports float32 and float64 on the CPU");
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
