// fastlayers: every op is declared once here. Backends register their kernels
// in csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(fastlayers, CPU, m)) and
// csrc/cuda/*_glue.cpp (TORCH_LIBRARY_IMPL(fastlayers, CUDA, m)).
// Fake (meta) kernels live in fastlayers/_fake.py.
//
// Conventions
//  * Backward ops take bool[3] output_mask (input, weight, bias); a gradient
//    that is not asked for comes back as an empty tensor of shape [0].
//  * max_pool2d keeps compact window offsets (uint8 when the window has at
//    most 256 elements, else int32) instead of int64 flat indices.
#include <torch/library.h>
#include <torch/extension.h>

#include "cpu/alloc.h"
#include "cpu/isa.h"

TORCH_LIBRARY(fastlayers, m) {
  // Linear: input [M, K], weight [N, K], bias [N] -> [M, N].
  m.def("linear_forward(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_backward(Tensor grad_output, Tensor input, Tensor weight, bool[3] output_mask)"
        " -> (Tensor, Tensor, Tensor)");

  // Conv2d on 4-D input, zero padding (other padding modes are applied in Python).
  m.def("conv2d_forward(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding,"
        " int[2] dilation, int groups) -> Tensor");
  m.def("conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride,"
        " int[2] padding, int[2] dilation, int groups, bool[3] output_mask)"
        " -> (Tensor, Tensor, Tensor)");

  // MaxPool2d on 4-D input -> (output, offsets inside the window).
  m.def("max_pool2d_forward(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding,"
        " int[2] dilation, bool ceil_mode) -> (Tensor, Tensor)");
  m.def("max_pool2d_backward(Tensor grad_output, Tensor offsets, int[4] input_size,"
        " int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation,"
        " bool channels_last) -> Tensor");
  // The output alone (no offsets), for calls autograd does not record; backends
  // without their own kernel run max_pool2d_forward and drop the offsets.
  m.def("max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding,"
        " int[2] dilation, bool ceil_mode) -> Tensor");
  // Window offsets -> torch's int64 flat indices (h * W + w), for return_indices=True.
  m.def("max_pool2d_indices(Tensor offsets, int input_width, int[2] kernel_size, int[2] stride,"
        " int[2] padding, int[2] dilation) -> Tensor");

  // BatchNorm over dim 1 of an (N, C, *) input.
  // Training: batch statistics; running stats (if given) updated in place with
  // running = (1 - momentum) * running + momentum * batch (unbiased var).
  m.def("batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean,"
        " Tensor(b!)? running_var, float momentum, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean,"
        " Tensor running_var, float eps) -> Tensor");
  // training=True: full backward through batch statistics; False: the affine map only.
  m.def("batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean,"
        " Tensor invstd, bool training, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

namespace fastlayers {
double fma_peak_gflops(int64_t iters);  // csrc/cpu/roofline.cpp
}

namespace {

// max_pool2d where a backend has no value-only kernel (CUDA): the forward
// with offsets, offsets dropped.
at::Tensor max_pool2d_via_forward(const at::Tensor& input, at::IntArrayRef k, at::IntArrayRef s,
                                  at::IntArrayRef p, at::IntArrayRef d, bool ceil_mode) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastlayers::max_pool2d_forward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                 at::IntArrayRef, at::IntArrayRef, bool)>();
  return std::get<0>(op.call(input, k, s, p, d, ceil_mode));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlayers, CompositeExplicitAutograd, m) {
  m.impl("max_pool2d", &max_pool2d_via_forward);
}

namespace {

// Runs a parallel_for over `n` items and reports how many distinct threads ran
// them: the test that torch.set_num_threads governs our kernels uses it.
int64_t probe_threads(int64_t n) {
  std::vector<int> seen(64, 0);
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    volatile double x = 0;
    for (int64_t i = b; i < e; ++i)
      for (int j = 0; j < 20000; ++j) x = x + 1e-9 * j;
    int t = at::get_thread_num();
    if (t >= 0 && t < 64) seen[t] = 1;
  });
  int64_t c = 0;
  for (int s : seen) c += s;
  return c;
}

bool with_cuda() {
#ifdef FASTLAYERS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "fastlayers native kernels";
  mod.def("isa", [] { return fastlayers::cpu::isa_name(fastlayers::cpu::active_isa()); },
          "The CPU kernel path in use: 'avx512', 'avx2' or 'scalar'.");
  mod.def("gemm_isa", [] { return fastlayers::cpu::isa_name(fastlayers::cpu::gemm_isa()); },
          "The path the GEMM kernels (Linear, Conv2d) run on: the active one, or 'avx2'\n"
          "where 'avx512' was chosen automatically on a CPU with 256-bit FMA units (Zen 4).");
  mod.def("set_isa", [](const std::string& name) {
            return fastlayers::cpu::isa_name(fastlayers::cpu::set_isa(name));
          }, "Force a CPU kernel path; raises if the CPU lacks it.");
  mod.def("supported_isas", &fastlayers::cpu::supported_isa_names,
          "CPU kernel paths this machine can run, fastest first.");
  mod.def("probe_threads", &probe_threads);
  mod.def("with_cuda", &with_cuda);
  mod.def("empty_cache", &fastlayers::cpu::empty_cache,
          "Free the cached output and workspace blocks; returns the bytes freed.");
  mod.def("cached_bytes", &fastlayers::cpu::cached_bytes,
          "Bytes of freed output and workspace blocks held for reuse.");
  mod.def("blocks_mapped", &fastlayers::cpu::blocks_mapped,
          "Fresh output/workspace blocks mapped so far (block-cache misses).");
  mod.def("fma_peak_gflops", &fastlayers::fma_peak_gflops, pybind11::arg("iters") = 200000000,
          "Measured fp32 FMA peak over all threads, GFLOP/s (benchmark roofline).");
}
