// Torch side of the CUDA ops: argument checks, output allocation, device guard,
// current stream, and the TORCH_LIBRARY_IMPL(fastlayers, CUDA) registrations.
// Compiled as plain C++ against torch's device-agnostic headers only (no
// ATen/cuda, no CUDA runtime headers): the kernels are reached through
// launchers.h with raw pointers.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>

#include "launchers.h"

namespace fastlayers {
namespace {

using cuda::DType;

cudaStream_t current_stream(const at::Tensor& t) {
  c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  const c10::Stream s = impl.getStream(t.device());
  return static_cast<cudaStream_t>(impl.getStreamNativeHandle(s));
}

DType dtype_tag(at::ScalarType st, const char* op, const char* name) {
  switch (st) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default:
      TORCH_CHECK(false, "fastlayers.", op, ": ", name, " has dtype ", st,
                  "; fastlayers supports float32, float64, float16 and bfloat16 on CUDA");
  }
}

void check_cuda_input(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), "fastlayers.", op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), "fastlayers.", op, ": expected ", name, " on a CUDA device, got ",
              t.device());
}

// Same dtype and device as the reference tensor `a`.
void check_same(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na,
                const char* nb) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "fastlayers.", op, ": expected ", nb,
              " to have the same dtype as ", na, ", but got ", nb, " ", b.scalar_type(),
              " and ", na, " ", a.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "fastlayers.", op, ": expected ", nb,
              " to be on the same device as ", na, ", but got ", b.device(), " and ",
              a.device());
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na,
                       const char* nb) {
  TORCH_CHECK(a.device() == b.device(), "fastlayers.", op, ": expected ", nb,
              " to be on the same device as ", na, ", but got ", b.device(), " and ",
              a.device());
}

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, "fastlayers.", op, ": CUDA kernel launch failed: ",
              cuda::error_string(err));
}

at::Tensor workspace(int64_t bytes, const at::Tensor& like) {
  return at::empty({std::max<int64_t>(bytes, 1)}, like.options().dtype(at::kByte));
}

void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

at::Tensor no_grad_placeholder(const at::Tensor& like) { return at::empty({0}, like.options()); }

bool is_channels_last(at::MemoryFormat f) {
  return f == at::MemoryFormat::ChannelsLast || f == at::MemoryFormat::ChannelsLast3d;
}

void check_pair(at::IntArrayRef v, const char* op, const char* name) {
  TORCH_CHECK_VALUE(v.size() == 2, "fastlayers.", op, ": ", name, " must have 2 elements, got ",
                    v.size());
}

// ---- Linear ---------------------------------------------------------------------

void check_linear(const at::Tensor& input, const at::Tensor& weight, const char* op) {
  check_cuda_input(input, op, "input");
  dtype_tag(input.scalar_type(), op, "input");
  check_same(input, weight, op, "input", "weight");
  TORCH_CHECK(input.dim() == 2, "fastlayers.", op, ": expected 2-D input, got ", input.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2, "fastlayers.", op, ": expected 2-D weight, got ", weight.dim(),
              "-D");
  TORCH_CHECK(input.size(1) == weight.size(1), "fastlayers.", op,
              ": mat1 and mat2 shapes cannot be multiplied (", input.size(0), "x", input.size(1),
              " and ", weight.size(1), "x", weight.size(0), ")");
}

// C = op(a) . op(b) written into c; ta / tb: use the transpose.
void matmul(const at::Tensor& a, bool ta, const at::Tensor& b, bool tb, at::Tensor& c,
            const at::Tensor& bias_n, const char* op) {
  cuda::GemmDesc g;
  g.M = c.size(0); g.N = c.size(1); g.K = ta ? a.size(0) : a.size(1);
  g.A = a.data_ptr(); g.rsA = a.stride(ta ? 1 : 0); g.csA = a.stride(ta ? 0 : 1);
  g.B = b.data_ptr(); g.rsB = b.stride(tb ? 1 : 0); g.csB = b.stride(tb ? 0 : 1);
  g.C = c.data_ptr(); g.rsC = c.stride(0); g.csC = c.stride(1);
  g.bias_n = ptr_or_null(bias_n);
  if (g.M == 0 || g.N == 0) return;
  const DType dt = dtype_tag(c.scalar_type(), op, "input");
  at::Tensor ws = workspace(cuda::gemm_workspace_bytes(g, dt), c);
  check_launch(cuda::gemm(g, dt, ws.data_ptr(), current_stream(c)), op);
}

at::Tensor linear_forward(const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias) {
  check_linear(input, weight, "linear");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    check_same(input, *bias, "linear", "input", "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "fastlayers.linear: bias",
                " must have shape [", weight.size(0), "], got ", bias->sizes());
    b = bias->contiguous();
  }
  c10::DeviceGuard guard(input.device());
  at::Tensor out = at::empty({input.size(0), weight.size(0)}, input.options());
  matmul(input, false, weight, true, out, b, "linear");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    std::array<bool, 3> mask) {
  check_linear(input, weight, "linear_backward");
  check_same(input, grad_output, "linear_backward", "input", "grad_output");
  TORCH_CHECK(grad_output.dim() == 2 && grad_output.size(0) == input.size(0) &&
                  grad_output.size(1) == weight.size(0),
              "fastlayers.linear_backward: grad_output has shape ", grad_output.sizes(),
              ", expected [", input.size(0), ", ", weight.size(0), "]");
  c10::DeviceGuard guard(input.device());
  at::Tensor gi = no_grad_placeholder(input), gw = no_grad_placeholder(input),
             gb = no_grad_placeholder(input);  // distinct: outputs must not alias
  if (mask[0]) {
    gi = at::empty(input.sizes(), input.options());
    matmul(grad_output, false, weight, false, gi, at::Tensor(), "linear_backward");
  }
  if (mask[1]) {
    gw = at::empty(weight.sizes(), weight.options());
    matmul(grad_output, true, input, false, gw, at::Tensor(), "linear_backward");
  }
  if (mask[2]) {
    gb = at::empty({weight.size(0)}, weight.options());
    const DType dt = dtype_tag(input.scalar_type(), "linear_backward", "input");
    const int64_t M = grad_output.size(0), N = grad_output.size(1);
    at::Tensor ws = workspace(cuda::channel_sum_workspace_bytes(M, N, 1, dt), gb);
    check_launch(cuda::channel_sum(grad_output.data_ptr(), dt, M, N, 1, grad_output.stride(0),
                                   grad_output.stride(1), 0, gb.data_ptr(), ws.data_ptr(),
                                   current_stream(gb)),
                 "linear_backward");
  }
  return {gi, gw, gb};
}

// ---- Conv2d ---------------------------------------------------------------------

at::MemoryFormat conv_format(const at::Tensor& input, const at::Tensor& weight) {
  return input.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                 weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

void set_strides(int64_t (&dst)[4], const at::Tensor& t) {
  for (int i = 0; i < 4; ++i) dst[i] = t.stride(i);
}

// Checks the arguments and fills the geometry (strides are set by the caller).
cuda::ConvDesc conv_desc(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                         const char* op) {
  check_cuda_input(input, op, "input");
  dtype_tag(input.scalar_type(), op, "input");
  check_same(input, weight, op, "input", "weight");
  TORCH_CHECK(input.dim() == 4, "fastlayers.", op, ": expected 4-D input (N, C, H, W), got ",
              input.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4, "fastlayers.", op, ": expected 4-D weight, got ", weight.dim(),
              "-D");
  check_pair(stride, op, "stride");
  check_pair(padding, op, "padding");
  check_pair(dilation, op, "dilation");
  TORCH_CHECK_VALUE(groups > 0, "fastlayers.", op, ": groups must be positive, got ", groups);
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_VALUE(stride[i] > 0, "fastlayers.", op, ": stride must be positive, got ", stride);
    TORCH_CHECK_VALUE(dilation[i] > 0, "fastlayers.", op, ": dilation must be positive, got ",
                      dilation);
    TORCH_CHECK_VALUE(padding[i] >= 0, "fastlayers.", op, ": padding must be non-negative, got ",
                      padding);
  }
  cuda::ConvDesc d;
  d.N = input.size(0); d.C = input.size(1); d.H = input.size(2); d.W = input.size(3);
  d.K = weight.size(0); d.R = weight.size(2); d.S = weight.size(3);
  d.stride_h = stride[0]; d.stride_w = stride[1];
  d.pad_h = padding[0]; d.pad_w = padding[1];
  d.dil_h = dilation[0]; d.dil_w = dilation[1];
  d.groups = groups;
  TORCH_CHECK(d.C % groups == 0, "fastlayers.", op, ": input channels (", d.C,
              ") must be divisible by groups (", groups, ")");
  TORCH_CHECK(d.K % groups == 0, "fastlayers.", op, ": output channels (", d.K,
              ") must be divisible by groups (", groups, ")");
  TORCH_CHECK(weight.size(1) * groups == d.C, "fastlayers.", op, ": weight of shape ",
              weight.sizes(), " expects ", weight.size(1) * groups, " input channels, got ", d.C);
  TORCH_CHECK(d.R > 0 && d.S > 0, "fastlayers.", op, ": kernel size must be positive, got ",
              weight.sizes());
  const int64_t eh = d.dil_h * (d.R - 1) + 1, ew = d.dil_w * (d.S - 1) + 1;
  TORCH_CHECK(d.H + 2 * d.pad_h >= eh && d.W + 2 * d.pad_w >= ew, "fastlayers.", op,
              ": input size (", d.H + 2 * d.pad_h, " x ", d.W + 2 * d.pad_w,
              ", padded) is smaller than the kernel (", eh, " x ", ew, ")");
  d.P = (d.H + 2 * d.pad_h - eh) / d.stride_h + 1;
  d.Q = (d.W + 2 * d.pad_w - ew) / d.stride_w + 1;
  TORCH_CHECK(groups <= 65535, "fastlayers.", op, ": at most 65535 groups on CUDA");
  return d;
}

at::Tensor conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  cuda::ConvDesc d = conv_desc(input, weight, stride, padding, dilation, groups, "conv2d");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    check_same(input, *bias, "conv2d", "input", "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d.K, "fastlayers.conv2d: bias must have",
                " shape [", d.K, "], got ", bias->sizes());
    b = bias->contiguous();
  }
  c10::DeviceGuard guard(input.device());
  at::Tensor out = at::empty({d.N, d.K, d.P, d.Q},
                             input.options().memory_format(conv_format(input, weight)));
  if (out.numel() == 0) return out;
  set_strides(d.x_str, input);
  set_strides(d.w_str, weight);
  set_strides(d.y_str, out);
  const DType dt = dtype_tag(input.scalar_type(), "conv2d", "input");
  at::Tensor ws = workspace(cuda::conv2d_forward_workspace_bytes(d, dt), out);
  check_launch(cuda::conv2d_forward(d, dt, input.data_ptr(), weight.data_ptr(), ptr_or_null(b),
                                    out.data_ptr(), ws.data_ptr(), current_stream(out)),
               "conv2d");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> mask) {
  const char* op = "conv2d_backward";
  cuda::ConvDesc d = conv_desc(input, weight, stride, padding, dilation, groups, op);
  check_same(input, grad_output, op, "input", "grad_output");
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == d.N && grad_output.size(1) == d.K &&
                  grad_output.size(2) == d.P && grad_output.size(3) == d.Q,
              "fastlayers.", op, ": grad_output has shape ", grad_output.sizes(), ", expected [",
              d.N, ", ", d.K, ", ", d.P, ", ", d.Q, "]");
  c10::DeviceGuard guard(input.device());
  const DType dt = dtype_tag(input.scalar_type(), op, "input");
  const at::MemoryFormat fmt = conv_format(input, weight);
  const cudaStream_t stream = current_stream(input);
  at::Tensor gi = no_grad_placeholder(input), gw = no_grad_placeholder(input),
             gb = no_grad_placeholder(input);  // distinct: outputs must not alias
  set_strides(d.x_str, input);
  set_strides(d.w_str, weight);
  set_strides(d.y_str, grad_output);
  if (mask[0]) {
    gi = at::empty(input.sizes(), input.options().memory_format(fmt));
    if (gi.numel() > 0) {
      cuda::ConvDesc dd = d;
      set_strides(dd.x_str, gi);
      at::Tensor ws = workspace(cuda::conv2d_dgrad_workspace_bytes(dd, dt), gi);
      check_launch(cuda::conv2d_dgrad(dd, dt, grad_output.data_ptr(), weight.data_ptr(),
                                      gi.data_ptr(), ws.data_ptr(), stream),
                   op);
    }
  }
  if (mask[1]) {
    gw = at::empty_like(weight);  // weight's own layout, as on the CPU
    if (gw.numel() > 0) {
      cuda::ConvDesc dw = d;
      set_strides(dw.w_str, gw);
      at::Tensor ws = workspace(cuda::conv2d_wgrad_workspace_bytes(dw, dt), gw);
      check_launch(cuda::conv2d_wgrad(dw, dt, grad_output.data_ptr(), input.data_ptr(),
                                      gw.data_ptr(), ws.data_ptr(), stream),
                   op);
    }
  }
  if (mask[2]) {
    gb = at::empty({d.K}, weight.options());
    // Channel sum over (n, s = p * Q + q): needs one stride for s.
    at::Tensor g = grad_output;
    int64_t sS;
    if (d.Q == 1) sS = g.stride(2);
    else if (d.P == 1 || g.stride(2) == d.Q * g.stride(3)) sS = g.stride(3);
    else { g = grad_output.clone(at::MemoryFormat::Contiguous); sS = 1; }
    at::Tensor ws = workspace(cuda::channel_sum_workspace_bytes(d.N, d.K, d.P * d.Q, dt), gb);
    check_launch(cuda::channel_sum(g.data_ptr(), dt, d.N, d.K, d.P * d.Q, g.stride(0), g.stride(1),
                                   sS, gb.data_ptr(), ws.data_ptr(), stream),
                 op);
  }
  return {gi, gw, gb};
}

// ---- MaxPool2d --------------------------------------------------------------------

// torch's pooling_output_shape.
int64_t pool_out_size(int64_t in, int64_t k, int64_t pad, int64_t stride, int64_t dil, bool ceil) {
  const int64_t num = in + 2 * pad - dil * (k - 1) - 1 + (ceil ? stride - 1 : 0);
  int64_t out = (num >= 0 ? num / stride : -((-num + stride - 1) / stride)) + 1;
  if (ceil && (out - 1) * stride >= in + pad) --out;
  return out;
}

cuda::PoolDesc pool_desc(at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, const char* op) {
  check_pair(kernel_size, op, "kernel_size");
  check_pair(stride, op, "stride");
  check_pair(padding, op, "padding");
  check_pair(dilation, op, "dilation");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_VALUE(kernel_size[i] > 0, "fastlayers.", op, ": kernel_size must be positive, got ",
                      kernel_size);
    TORCH_CHECK_VALUE(stride[i] > 0, "fastlayers.", op, ": stride must be positive, got ", stride);
    TORCH_CHECK_VALUE(dilation[i] > 0, "fastlayers.", op, ": dilation must be positive, got ",
                      dilation);
    TORCH_CHECK_VALUE(padding[i] >= 0 && padding[i] <= kernel_size[i] / 2, "fastlayers.", op,
                      ": pad should be at most half of effective kernel size, but got pad=",
                      padding, " and kernel_size=", kernel_size);
  }
  cuda::PoolDesc d;
  d.kh = kernel_size[0]; d.kw = kernel_size[1];
  d.sh = stride[0]; d.sw = stride[1];
  d.ph = padding[0]; d.pw = padding[1];
  d.dh = dilation[0]; d.dw = dilation[1];
  return d;
}

at::ScalarType offsets_dtype(const cuda::PoolDesc& d) {
  return d.kh * d.kw <= 256 ? at::kByte : at::kInt;
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_forward(const at::Tensor& input,
                                                      at::IntArrayRef kernel_size,
                                                      at::IntArrayRef stride,
                                                      at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, bool ceil_mode) {
  const char* op = "max_pool2d";
  check_cuda_input(input, op, "input");
  const DType dt = dtype_tag(input.scalar_type(), op, "input");
  TORCH_CHECK(input.dim() == 4, "fastlayers.", op, ": expected 4-D input (N, C, H, W), got ",
              input.dim(), "-D");
  cuda::PoolDesc d = pool_desc(kernel_size, stride, padding, dilation, op);
  d.N = input.size(0); d.C = input.size(1); d.H = input.size(2); d.W = input.size(3);
  d.P = pool_out_size(d.H, d.kh, d.ph, d.sh, d.dh, ceil_mode);
  d.Q = pool_out_size(d.W, d.kw, d.pw, d.sw, d.dw, ceil_mode);
  TORCH_CHECK(d.P > 0 && d.Q > 0, "fastlayers.", op, ": given input size (", d.C, "x", d.H, "x",
              d.W, "), calculated output size (", d.C, "x", d.P, "x", d.Q, ") is too small");
  c10::DeviceGuard guard(input.device());
  const at::MemoryFormat fmt = input.suggest_memory_format();
  at::Tensor out = at::empty({d.N, d.C, d.P, d.Q}, input.options().memory_format(fmt));
  at::Tensor off = at::empty({d.N, d.C, d.P, d.Q},
                             input.options().dtype(offsets_dtype(d)).memory_format(fmt));
  if (out.numel() == 0) return {out, off};
  set_strides(d.in_str, input);
  set_strides(d.out_str, out);
  set_strides(d.off_str, off);
  d.out_channels_last = d.in_channels_last = fmt == at::MemoryFormat::ChannelsLast;
  check_launch(cuda::max_pool2d_forward(d, dt, input.data_ptr(), out.data_ptr(), off.data_ptr(),
                                        off.scalar_type() == at::kInt, current_stream(out)),
               op);
  return {out, off};
}

void check_offsets(const at::Tensor& offsets, const at::Tensor& ref, const cuda::PoolDesc& d,
                   const char* op) {
  check_cuda_input(offsets, op, "offsets");
  check_same_device(ref, offsets, op, "grad_output", "offsets");
  TORCH_CHECK(offsets.scalar_type() == offsets_dtype(d), "fastlayers.", op, ": offsets must have",
              " dtype ", offsets_dtype(d), " for a ", d.kh, "x", d.kw, " window, got ",
              offsets.scalar_type());
  TORCH_CHECK(offsets.dim() == 4, "fastlayers.", op, ": expected 4-D offsets, got ",
              offsets.dim(), "-D");
}

at::Tensor max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& offsets,
                               at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool channels_last) {
  const char* op = "max_pool2d_backward";
  check_cuda_input(grad_output, op, "grad_output");
  const DType dt = dtype_tag(grad_output.scalar_type(), op, "grad_output");
  cuda::PoolDesc d = pool_desc(kernel_size, stride, padding, dilation, op);
  check_offsets(offsets, grad_output, d, op);
  TORCH_CHECK_VALUE(input_size.size() == 4, "fastlayers.", op, ": input_size must have 4",
                    " elements, got ", input_size.size());
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.sizes() == offsets.sizes(), "fastlayers.", op,
              ": grad_output ", grad_output.sizes(), " and offsets ", offsets.sizes(),
              " must have the same 4-D shape");
  d.N = input_size[0]; d.C = input_size[1]; d.H = input_size[2]; d.W = input_size[3];
  d.P = grad_output.size(2); d.Q = grad_output.size(3);
  TORCH_CHECK(grad_output.size(0) == d.N && grad_output.size(1) == d.C, "fastlayers.", op,
              ": grad_output ", grad_output.sizes(), " does not match input_size ", input_size);
  c10::DeviceGuard guard(grad_output.device());
  at::Tensor gi = at::empty(input_size, grad_output.options().memory_format(
                                            channels_last ? at::MemoryFormat::ChannelsLast
                                                          : at::MemoryFormat::Contiguous));
  if (gi.numel() == 0) return gi;
  if (grad_output.numel() == 0) return gi.zero_();
  set_strides(d.in_str, gi);
  set_strides(d.out_str, grad_output);
  set_strides(d.off_str, offsets);
  d.in_channels_last = channels_last;
  d.out_channels_last = channels_last;
  check_launch(cuda::max_pool2d_backward(d, dt, grad_output.data_ptr(), offsets.data_ptr(),
                                         offsets.scalar_type() == at::kInt, gi.data_ptr(),
                                         current_stream(gi)),
               op);
  return gi;
}

at::Tensor max_pool2d_indices(const at::Tensor& offsets, int64_t input_width,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "max_pool2d_indices";
  cuda::PoolDesc d = pool_desc(kernel_size, stride, padding, dilation, op);
  check_offsets(offsets, offsets, d, op);
  TORCH_CHECK_VALUE(input_width > 0, "fastlayers.", op, ": input_width must be positive, got ",
                    input_width);
  d.N = offsets.size(0); d.C = offsets.size(1); d.P = offsets.size(2); d.Q = offsets.size(3);
  d.W = input_width;
  c10::DeviceGuard guard(offsets.device());
  const at::MemoryFormat fmt = offsets.suggest_memory_format();
  at::Tensor idx = at::empty(offsets.sizes(), offsets.options().dtype(at::kLong).memory_format(fmt));
  if (idx.numel() == 0) return idx;
  set_strides(d.out_str, idx);
  set_strides(d.off_str, offsets);
  d.out_channels_last = fmt == at::MemoryFormat::ChannelsLast;
  check_launch(cuda::max_pool2d_indices(d, offsets.data_ptr(), offsets.scalar_type() == at::kInt,
                                        idx.data_ptr<int64_t>(), current_stream(idx)),
               op);
  return idx;
}

// ---- BatchNorm --------------------------------------------------------------------

struct BNInput {
  cuda::BNDesc d;
  at::MemoryFormat fmt;
  at::Tensor x;  // dense in fmt
};

BNInput bn_input(const at::Tensor& input, const char* op) {
  check_cuda_input(input, op, "input");
  dtype_tag(input.scalar_type(), op, "input");
  TORCH_CHECK(input.dim() >= 2, "fastlayers.", op, ": expected an (N, C, *) input, got ",
              input.dim(), "-D");
  BNInput r;
  r.fmt = input.suggest_memory_format();
  r.x = input.contiguous(r.fmt);
  cuda::BNDesc& d = r.d;
  d.N = input.size(0); d.C = input.size(1); d.S = 1;
  for (int64_t i = 2; i < input.dim(); ++i) d.S *= input.size(i);
  d.channels_last = is_channels_last(r.fmt);
  if (d.channels_last) { d.sN = d.S * d.C; d.sC = 1; d.sS = d.C; }
  else { d.sN = d.C * d.S; d.sC = d.S; d.sS = 1; }
  return r;
}

// Per-channel tensor: 1-D of size C on the input's device, dtype the input's
// or (for float16/bfloat16 input) float32. Sets/checks the common dtype *pdt.
at::Tensor bn_param(const std::optional<at::Tensor>& t, const at::Tensor& input, int64_t C,
                    std::optional<at::ScalarType>& pdt, const char* op, const char* name,
                    bool in_place = false) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_same_device(input, *t, op, "input", name);
  const at::ScalarType st = t->scalar_type();
  const bool reduced = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  TORCH_CHECK(st == input.scalar_type() || (reduced && st == at::kFloat), "fastlayers.", op, ": ",
              name, " has dtype ", st, "; expected ", input.scalar_type(),
              reduced ? " or float32" : "");
  TORCH_CHECK(!pdt.has_value() || *pdt == st, "fastlayers.", op, ": ", name, " has dtype ", st,
              " but another per-channel tensor has dtype ", *pdt);
  pdt = st;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "fastlayers.", op, ": ", name,
              " must have shape [", C, "], got ", t->sizes());
  if (in_place) {
    TORCH_CHECK(t->is_contiguous(), "fastlayers.", op, ": ", name,
                " is updated in place and must be contiguous");
    return *t;
  }
  return t->contiguous();
}

at::ScalarType acc_type(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double momentum, double eps) {
  const char* op = "batch_norm";
  BNInput in = bn_input(input, op);
  const int64_t C = in.d.C;
  std::optional<at::ScalarType> pst;
  at::Tensor w = bn_param(weight, input, C, pst, op, "weight");
  at::Tensor b = bn_param(bias, input, C, pst, op, "bias");
  at::Tensor rm = bn_param(running_mean, input, C, pst, op, "running_mean", true);
  at::Tensor rv = bn_param(running_var, input, C, pst, op, "running_var", true);
  c10::DeviceGuard guard(input.device());
  const DType dt = dtype_tag(input.scalar_type(), op, "input");
  const DType pdt = pst ? dtype_tag(*pst, op, "weight") : dt;
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(in.fmt));
  at::Tensor save_mean = at::empty({C}, input.options().dtype(acc_type(input)));
  at::Tensor save_invstd = at::empty({C}, input.options().dtype(acc_type(input)));
  if (C == 0) return {out, save_mean, save_invstd};
  at::Tensor ws = workspace(cuda::batch_norm_workspace_bytes(in.d, dt), input);
  check_launch(cuda::batch_norm_train(in.d, dt, pdt, in.x.data_ptr(), ptr_or_null(w),
                                      ptr_or_null(b), ptr_or_null(rm), ptr_or_null(rv), momentum,
                                      eps, out.data_ptr(), save_mean.data_ptr(),
                                      save_invstd.data_ptr(), ws.data_ptr(), current_stream(input)),
               op);
  return {out, save_mean, save_invstd};
}

at::Tensor batch_norm_eval(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                           const at::Tensor& running_var, double eps) {
  const char* op = "batch_norm";
  BNInput in = bn_input(input, op);
  const int64_t C = in.d.C;
  std::optional<at::ScalarType> pst;
  at::Tensor w = bn_param(weight, input, C, pst, op, "weight");
  at::Tensor b = bn_param(bias, input, C, pst, op, "bias");
  at::Tensor rm = bn_param(running_mean, input, C, pst, op, "running_mean");
  at::Tensor rv = bn_param(running_var, input, C, pst, op, "running_var");
  c10::DeviceGuard guard(input.device());
  const DType dt = dtype_tag(input.scalar_type(), op, "input");
  const DType pdt = pst ? dtype_tag(*pst, op, "weight") : dt;
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(in.fmt));
  if (C == 0) return out;
  at::Tensor ws = workspace(cuda::batch_norm_workspace_bytes(in.d, dt), input);
  check_launch(cuda::batch_norm_eval(in.d, dt, pdt, in.x.data_ptr(), ptr_or_null(w),
                                     ptr_or_null(b), rm.data_ptr(), rv.data_ptr(), eps,
                                     out.data_ptr(), ws.data_ptr(), current_stream(input)),
               op);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool training, std::array<bool, 3> mask) {
  const char* op = "batch_norm_backward";
  BNInput in = bn_input(input, op);
  const int64_t C = in.d.C;
  check_same(input, grad_output, op, "input", "grad_output");
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "fastlayers.", op, ": grad_output has shape ",
              grad_output.sizes(), ", expected ", input.sizes());
  std::optional<at::ScalarType> pst;
  at::Tensor w = bn_param(weight, input, C, pst, op, "weight");
  std::optional<at::ScalarType> mst;
  at::Tensor mu = bn_param(mean, input, C, mst, op, "mean");
  std::optional<at::ScalarType> ist;
  at::Tensor is = bn_param(invstd, input, C, ist, op, "invstd");
  c10::DeviceGuard guard(input.device());
  const DType dt = dtype_tag(input.scalar_type(), op, "input");
  const DType pdt = pst ? dtype_tag(*pst, op, "weight") : dt;
  const DType mdt = dtype_tag(mean.scalar_type(), op, "mean");
  TORCH_CHECK(mean.scalar_type() == invstd.scalar_type(), "fastlayers.", op,
              ": mean and invstd must have the same dtype, got ", mean.scalar_type(), " and ",
              invstd.scalar_type());
  at::Tensor gy = grad_output.contiguous(in.fmt);
  const at::ScalarType gst = pst ? *pst : input.scalar_type();
  at::Tensor gi = no_grad_placeholder(input), gw = no_grad_placeholder(input),
             gb = no_grad_placeholder(input);  // distinct: outputs must not alias
  if (mask[0]) gi = at::empty(input.sizes(), input.options().memory_format(in.fmt));
  if (mask[1]) gw = at::empty({C}, input.options().dtype(gst));
  if (mask[2]) gb = at::empty({C}, input.options().dtype(gst));
  if (C == 0 || !(mask[0] || mask[1] || mask[2])) return {gi, gw, gb};
  at::Tensor ws = workspace(cuda::batch_norm_workspace_bytes(in.d, dt), input);
  check_launch(cuda::batch_norm_backward(in.d, dt, pdt, mdt, gy.data_ptr(), in.x.data_ptr(),
                                         ptr_or_null(w), mu.data_ptr(), is.data_ptr(), training,
                                         mask[0] ? gi.data_ptr() : nullptr,
                                         mask[1] ? gw.data_ptr() : nullptr,
                                         mask[2] ? gb.data_ptr() : nullptr, ws.data_ptr(),
                                         current_stream(input)),
               op);
  return {gi, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlayers, CUDA, m) {
  m.impl("linear_forward", &linear_forward);
  m.impl("linear_backward", &linear_backward);
  m.impl("conv2d_forward", &conv2d_forward);
  m.impl("conv2d_backward", &conv2d_backward);
  m.impl("max_pool2d_forward", &max_pool2d_forward);
  m.impl("max_pool2d_backward", &max_pool2d_backward);
  m.impl("max_pool2d_indices", &max_pool2d_indices);
  m.impl("batch_norm_train", &batch_norm_train);
  m.impl("batch_norm_eval", &batch_norm_eval);
  m.impl("batch_norm_backward", &batch_norm_backward);
}

}  // namespace fastlayers
