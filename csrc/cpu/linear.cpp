// Linear on the CPU: three calls into the shared GEMM core.
//   forward      Y  = X . W^T (+ b)      A = X,    B = W^T (strides swapped)
//   grad_input   dX = dY . W             A = dY,   B = W
//   grad_weight  dW = dY^T . X           A = dY^T, B = X
//   grad_bias    db = sum over rows of dY
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "alloc.h"
#include "common.h"
#include "gemm.h"

namespace fastlayers {
namespace {

void check_linear(const at::Tensor& input, const at::Tensor& weight, const char* op) {
  check_float_dtype(input, op, "input");
  check_same(input, weight, op, "input", "weight");
  TORCH_CHECK(input.dim() == 2, "fastlayers.", op, ": expected 2-D input, got ", input.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2, "fastlayers.", op, ": expected 2-D weight, got ", weight.dim(), "-D");
  TORCH_CHECK(input.size(1) == weight.size(1), "fastlayers.", op,
              ": mat1 and mat2 shapes cannot be multiplied (", input.size(0), "x", input.size(1),
              " and ", weight.size(1), "x", weight.size(0), ")");
}

template <typename T>
cpu::GemmArgs<T> matmul_args(const at::Tensor& a, bool ta, const at::Tensor& b, bool tb,
                             at::Tensor& c) {
  cpu::GemmArgs<T> g;
  g.M = c.size(0); g.N = c.size(1); g.K = ta ? a.size(0) : a.size(1);
  g.A = a.const_data_ptr<T>(); g.rsA = a.stride(ta ? 1 : 0); g.csA = a.stride(ta ? 0 : 1);
  g.B = b.const_data_ptr<T>(); g.rsB = b.stride(tb ? 1 : 0); g.csB = b.stride(tb ? 0 : 1);
  g.C = c.mutable_data_ptr<T>(); g.rsC = c.stride(0); g.csC = c.stride(1);
  return g;
}

at::Tensor linear_forward(const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias) {
  if (is_reduced(input) || is_reduced(weight) || is_reduced(bias)) {  // in float32 (common.h)
    check_same(input, weight, "linear", "input", "weight");
    if (bias.has_value() && bias->defined()) check_same(input, *bias, "linear", "input", "bias");
    return round_to(fastlayers::linear_forward(widen(input), widen(weight), widen(bias)), input.scalar_type());
  }
  check_linear(input, weight, "linear");
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor b;
  if (has_bias) {
    check_same(input, *bias, "linear", "input", "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "fastlayers.linear: bias",
                " must have shape [", weight.size(0), "], got ", bias->sizes());
    b = bias->contiguous();
  }
  at::Tensor out = cpu::empty({input.size(0), weight.size(0)}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastlayers_linear_forward", [&] {
    auto g = matmul_args<scalar_t>(input, false, weight, true, out);
    g.bias_n = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
    cpu::gemm(g);
  });
  return out;
}

template <typename T>
void sum_rows(const at::Tensor& x, at::Tensor& out) {  // out[j] = sum_i x[i, j]
  const int64_t M = x.size(0), N = x.size(1), rs = x.stride(0), cs = x.stride(1);
  const T* p = x.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  at::parallel_for(0, N, 256, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) o[j] = T(0);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = j0; j < j1; ++j) o[j] += p[i * rs + j * cs];
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    std::array<bool, 3> mask) {
  if (is_reduced(grad_output) || is_reduced(input) || is_reduced(weight)) {
    check_same(input, weight, "linear_backward", "input", "weight");
    check_same(input, grad_output, "linear_backward", "input", "grad_output");
    auto [gi, gw, gb] = fastlayers::linear_backward(widen(grad_output), widen(input), widen(weight), mask);
    const at::ScalarType st = input.scalar_type();
    return {round_to(gi, st), round_to(gw, st), round_to(gb, st)};
  }
  check_linear(input, weight, "linear_backward");
  check_same(input, grad_output, "linear_backward", "input", "grad_output");
  TORCH_CHECK(grad_output.dim() == 2 && grad_output.size(0) == input.size(0) &&
                  grad_output.size(1) == weight.size(0),
              "fastlayers.linear_backward: grad_output has shape ", grad_output.sizes(),
              ", expected [", input.size(0), ", ", weight.size(0), "]");
  at::Tensor gi = no_grad_placeholder(input), gw = no_grad_placeholder(input),
             gb = no_grad_placeholder(input);  // distinct: outputs must not alias
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastlayers_linear_backward", [&] {
    if (mask[0]) {
      gi = cpu::empty_like(input, at::MemoryFormat::Contiguous);
      cpu::gemm(matmul_args<scalar_t>(grad_output, false, weight, false, gi));
    }
    if (mask[1]) {
      gw = cpu::empty_like(weight, at::MemoryFormat::Contiguous);
      cpu::gemm(matmul_args<scalar_t>(grad_output, true, input, false, gw));
    }
    if (mask[2]) {
      gb = at::empty({weight.size(0)}, weight.options());
      sum_rows<scalar_t>(grad_output, gb);
    }
  });
  return {gi, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlayers, CPU, m) {
  m.impl("linear_forward", &linear_forward);
  m.impl("linear_backward", &linear_backward);
}

}  // namespace fastlayers
