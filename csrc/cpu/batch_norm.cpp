// BatchNorm on the CPU over dim 1 of an (N, C, *) input, seen as N x C x L.
//
// Layout: a 4-D input keeps its suggested memory format (outputs too), any
// other input is made contiguous. Contiguous data is "seg" (per (n, c) a run
// of L values, cut into chunks of kSegChunk); channels-last data and L == 1
// (e.g. (N, C)) is "rows" (rows of C channels, cut into blocks of rows).
//
// train forward:  pass 1 per chunk/block (mean, M2) around a shift (one
//                 sweep), merged per channel in a fixed order
//                 (Chan et al.) -> mean, biased var; pass 2 one fused
//                 y = (x - mean) * (invstd * w) + b. The mean is split into
//                 two T's (hi + lo) so x - mean stays exact-ish when the mean
//                 is large against the spread. Running stats updated in place.
// eval forward:   pass 2 only, with the running stats.
// backward:       training: one reduction pass (sum dy, sum dy * (x - mean)),
//                 then one pass dx = ((dy - k) - (x - mean) * b) * a with
//                   a = w invstd, b = invstd^2 mean(dy (x - mean)), k = mean(dy)
//                 (the form of the formula keeps dx exactly 0 where it cancels);
//                 eval: dx = dy * w * invstd.
//                 grad_weight = invstd sum dy (x - mean), grad_bias = sum dy.
// Every reduction is per chunk/block in fixed order then merged in a fixed
// order: results do not depend on the thread count. No atomics.
//
// Memory traffic (the layer is memory bound):
// - channel-fused (seg layout, C >= 2 threads): one thread does a whole
//   channel, its reduction then at once its elementwise pass, while the
//   channel's data (N * L values; 128 KB to 1.5 MB in common nets) is still
//   in cache: x (and dy) come from DRAM once. The chunks and the merge order
//   are those of the two-pass path, so both give bitwise the same results.
//   Short runs (e.g. 14x14): a group of consecutive channels at a time, so
//   each image's part is one contiguous run (kGroupValues).
// - two-pass (few channels, rows layout): the second pass walks each
//   thread's items backwards (kReverse), starting on the data the reduction
//   pass touched last, still in cache when the tensor is larger than it.
// - outputs of kStreamBytes or more are written with non-temporal stores:
//   no read-for-ownership, and they do not evict the inputs from the cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "batch_norm_kernels.h"
#include "alloc.h"
#include "stream_copy.h"
#include "common.h"
#include "isa.h"

// The "scalar" (baseline x86-64) build of the loops.
#define FL_BN_SIMD_IMPL bn_scalar
#define FL_BN_VBYTES 16
#include "batch_norm_simd.h"

namespace fastlayers {
namespace cpu {
void bn_kernels_scalar(BnKernels<float>* f, BnKernels<double>* d) {
  bn_scalar::fill(f);
  bn_scalar::fill(d);
}
}  // namespace cpu

namespace {

constexpr int64_t kSegChunk = 4096;   // values per seg work item
constexpr int64_t kRowsValues = 16384;  // values per rows block (at most kMaxRows rows)
constexpr int64_t kMaxRows = 256;
// Short runs (e.g. 14x14 planes): a channel-fused pass takes G consecutive
// channels, so that image n's runs of the G channels are one contiguous run of
// about kGroupValues (fewer, longer DRAM streams, and the streaming stores of
// the output leave partial cache lines only at the ends of that run), while
// the G channels' data (<= kGroupCache values per tensor) stays in L2.
constexpr int64_t kGroupValues = 1024;
constexpr int64_t kGroupCache = 32768;
using cpu::kStreamBytes;  // outputs this big: streaming stores

// Orders this thread's streaming stores before what follows (the end of the
// parallel region).
void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

struct Tables {
  cpu::BnKernels<float> f;
  cpu::BnKernels<double> d;
};

// Tables are filled only for the active (hence supported) ISA.
const Tables& tables(cpu::Isa isa) {
  switch (isa) {
    case cpu::Isa::Avx512: {
      static const Tables t = [] { Tables r; cpu::bn_kernels_avx512(&r.f, &r.d); return r; }();
      return t;
    }
    case cpu::Isa::Avx2: {
      static const Tables t = [] { Tables r; cpu::bn_kernels_avx2(&r.f, &r.d); return r; }();
      return t;
    }
    default: {
      static const Tables t = [] { Tables r; cpu::bn_kernels_scalar(&r.f, &r.d); return r; }();
      return t;
    }
  }
}

template <typename T>
const cpu::BnKernels<T>& kernels() {
  const Tables& t = tables(cpu::active_isa());
  if constexpr (std::is_same_v<T, float>) return t.f;
  else return t.d;
}

// The input as seg or rows work items.
struct Layout {
  at::MemoryFormat fmt;
  at::Tensor x;
  bool rows;
  int64_t N, C, L, M;  // M = N * L values per channel
  int64_t nch;         // seg: chunks per (n, c) run
  int64_t rb, nb;      // rows: rows per block, blocks
  int64_t items() const { return rows ? nb : N * C * nch; }
  // seg item -> (channel, offset of the chunk, length)
  int64_t seg_c(int64_t i) const { return (i / nch) % C; }
  int64_t seg_off(int64_t i) const { return (i / nch) * L + (i % nch) * kSegChunk; }
  int64_t seg_len(int64_t i) const { return std::min(kSegChunk, L - (i % nch) * kSegChunk); }
  int64_t blk_rows(int64_t b) const { return std::min(rb, M - b * rb); }
  int64_t seg_item(int64_t n, int64_t c, int64_t j) const { return (n * C + c) * nch + j; }
  // The s-th item (s = n * nch + j) of channel c: offset and length, without
  // a division in the common nch == 1 case (short runs: per item overhead).
  int64_t chan_off(int64_t c, int64_t s) const {
    if (nch == 1) return (s * C + c) * L;
    return ((s / nch) * C + c) * L + (s % nch) * kSegChunk;
  }
  int64_t chan_len(int64_t s) const {
    return nch == 1 ? L : std::min(kSegChunk, L - (s % nch) * kSegChunk);
  }
  // seg layout with enough channels for every thread: channel-fused passes
  bool fused() const { return !rows && C >= 2 * static_cast<int64_t>(at::get_num_threads()); }
  // Channels a fused pass takes together (short runs, see kGroupValues).
  int64_t group() const {
    if (nch != 1) return 1;
    return std::max<int64_t>(1, std::min(kGroupValues / L, kGroupCache / std::max<int64_t>(M, 1)));
  }
};

// Block moments merged in order (Chan et al.): count, mean, M2.
struct Moments {
  double cnt = 0, mu = 0, q = 0;
  void add(double n, double bm, double bq) {
    if (cnt == 0) { cnt = n; mu = bm; q = bq; return; }
    const double tot = cnt + n, d = bm - mu;
    mu += d * (n / tot);
    q += bq + d * d * (cnt * n / tot);
    cnt = tot;
  }
};

// Per channel affine coefficients in T: y = ((x - mh) - ml) * a + b.
template <typename T>
struct Affine {
  T mh, ml, a, b;
  Affine(double mean, double ad, double bd)
      : mh(static_cast<T>(mean)), ml(static_cast<T>(mean - static_cast<double>(mh))),
        a(static_cast<T>(ad)), b(static_cast<T>(bd)) {}
};

Layout make_layout(const at::Tensor& input) {
  Layout g;
  g.fmt = input.dim() == 4 ? input.suggest_memory_format() : at::MemoryFormat::Contiguous;
  g.x = input.contiguous(g.fmt);
  g.N = input.size(0);
  g.C = input.size(1);
  g.L = 1;
  for (int64_t i = 2; i < input.dim(); ++i) g.L *= input.size(i);
  g.M = g.N * g.L;
  // C == 1: channels-last memory is the contiguous one, so seg works too.
  g.rows = (g.fmt == at::MemoryFormat::ChannelsLast || g.L == 1) && g.C > 1;
  g.nch = std::max<int64_t>(1, (g.L + kSegChunk - 1) / kSegChunk);
  g.rb = std::clamp<int64_t>(kRowsValues / std::max<int64_t>(g.C, 1), 1, kMaxRows);
  g.nb = (g.M + g.rb - 1) / g.rb;
  return g;
}

void check_param(const std::optional<at::Tensor>& t, const at::Tensor& input, int64_t C,
                 const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  check_same(input, *t, op, "input", name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "fastlayers.", op, ": ", name,
              " should contain ", C, " elements not ", t->numel(), " (shape ", t->sizes(), ")");
}

void check_input(const at::Tensor& input, const char* op) {
  check_float_dtype(input, op, "input");
  TORCH_CHECK(input.dim() >= 2, "fastlayers.", op,
              ": expected an (N, C, *) input with at least 2 dims, got ", input.dim(), "-D");
}

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// float16 / bfloat16 input (computed in float32, common.h): the per-channel tensors
// have the input's dtype or float32 (torch's mixed BatchNorm), all the same one.
// Returns that dtype.
at::ScalarType check_reduced_params(const at::Tensor& input,
                                    std::initializer_list<std::pair<const char*, const at::Tensor*>> ps,
                                    const char* op) {
  std::optional<at::ScalarType> pst;
  for (const auto& [name, t] : ps) {
    if (t == nullptr || !t->defined()) continue;
    const at::ScalarType st = t->scalar_type();
    TORCH_CHECK(st == input.scalar_type() || st == at::kFloat, "fastlayers.", op, ": ", name,
                " has dtype ", st, "; expected ", input.scalar_type(), " or float32");
    TORCH_CHECK(!pst || *pst == st, "fastlayers.", op, ": ", name, " has dtype ", st,
                " but another per-channel tensor has dtype ", *pst);
    pst = st;
  }
  return pst.value_or(input.scalar_type());
}

const at::Tensor* ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

template <typename T>
std::vector<double> to_double(const std::optional<at::Tensor>& t, int64_t C, double dflt) {
  std::vector<double> v(C, dflt);
  if (!has(t)) return v;
  at::Tensor c = t->contiguous();
  const T* p = c.const_data_ptr<T>();
  for (int64_t i = 0; i < C; ++i) v[i] = static_cast<double>(p[i]);
  return v;
}

// y = (x - mean) * a + b per channel, mean split into hi + lo.
template <typename T>
void affine_pass(const Layout& g, const std::vector<double>& mean, const std::vector<double>& a,
                 const std::vector<double>& b, at::Tensor& out) {
  const auto& k = kernels<T>();
  std::vector<T> mh(g.C), ml(g.C), ta(g.C), tb(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    const Affine<T> f(mean[c], a[c], b[c]);
    mh[c] = f.mh;
    ml[c] = f.ml;
    ta[c] = f.a;
    tb[c] = f.b;
  }
  const T* x = g.x.const_data_ptr<T>();
  T* y = out.mutable_data_ptr<T>();
  const bool nt = static_cast<int64_t>(out.nbytes()) >= kStreamBytes;
  at::parallel_for(0, g.items(), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i1 - 1; i >= i0; --i) {  // backwards: see kReverse
      if (g.rows) {
        const int64_t o = i * g.rb * g.C;
        k.rows_affine(x + o, g.blk_rows(i), g.C, mh.data(), ml.data(), ta.data(), tb.data(), y + o,
                      nt);
      } else {
        const int64_t c = g.seg_c(i), o = g.seg_off(i);
        k.seg_affine(x + o, g.seg_len(i), mh[c], ml[c], ta[c], tb[c], y + o, nt);
      }
    }
    store_fence();
  });
}

// A channel's chunks are strided runs (N * nch of them): the hardware
// prefetcher misses the start of each, short runs (e.g. 14x14) entirely, so
// a reduction over a channel prefetches the start of the chunk kAhead later.
constexpr int64_t kAhead = 4;
constexpr int64_t kPrefetchBytes = 4096;  // a 32x32 plane of float

template <typename T>
void prefetch_chunk(const Layout& g, const T* p, int64_t c, int64_t s) {
  if (s >= g.N * g.nch) return;
  const char* q = reinterpret_cast<const char*>(p + g.chan_off(c, s));
  const int64_t bytes = std::min<int64_t>(g.chan_len(s) * sizeof(T), kPrefetchBytes);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(q + b);
}

// Seg layout, channel c: moments of its chunks merged in (n, chunk) order.
template <typename T>
void seg_channel_stats(const Layout& g, const cpu::BnKernels<T>& k, const T* x, int64_t c,
                       double* mean, double* m2) {
  Moments mo;
  for (int64_t s = 0; s < kAhead; ++s) prefetch_chunk(g, x, c, s);
  for (int64_t s = 0; s < g.N * g.nch; ++s) {  // s = n * nch + j
    prefetch_chunk(g, x, c, s + kAhead);
    const int64_t n = g.chan_len(s);
    double bm, bq;
    k.seg_stats(x + g.chan_off(c, s), n, &bm, &bq);
    mo.add(static_cast<double>(n), bm, bq);
  }
  *mean = mo.mu;
  *m2 = mo.q;
}

// Channels [ca, cb) (a group, nch == 1): seg_channel_stats of each, the
// group's runs read image by image (one contiguous run per image).
template <typename T>
void seg_group_stats(const Layout& g, const cpu::BnKernels<T>& k, const T* x, int64_t ca,
                     int64_t cb, double* mean, double* m2) {
  Moments mo[kGroupValues];
  const int64_t run = (cb - ca) * g.L;
  auto prefetch = [&](int64_t n) {
    if (n >= g.N) return;
    const char* q = reinterpret_cast<const char*>(x + (n * g.C + ca) * g.L);
    const int64_t bytes = std::min<int64_t>(run * sizeof(T), 2 * kPrefetchBytes);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(q + b);
  };
  for (int64_t n = 0; n < kAhead; ++n) prefetch(n);
  for (int64_t n = 0; n < g.N; ++n) {
    prefetch(n + kAhead);
    for (int64_t c = ca; c < cb; ++c) {
      double bm, bq;
      k.seg_stats(x + (n * g.C + c) * g.L, g.L, &bm, &bq);
      mo[c - ca].add(static_cast<double>(g.L), bm, bq);
    }
  }
  for (int64_t c = ca; c < cb; ++c) {
    mean[c] = mo[c - ca].mu;
    m2[c] = mo[c - ca].q;
  }
}

// Per channel mean and M2 over the whole batch.
template <typename T>
void batch_stats(const Layout& g, std::vector<double>& mean, std::vector<double>& m2) {
  const auto& k = kernels<T>();
  const T* x = g.x.const_data_ptr<T>();
  const int64_t items = g.items();
  const int64_t per = g.rows ? g.C : 1;
  std::vector<double> pm(items * per), pq(items * per);
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<double> scratch(g.rows ? g.C * (1 + 3 * sizeof(T) / sizeof(double) + 1) : 0);
    for (int64_t i = i0; i < i1; ++i) {
      if (g.rows)
        k.rows_stats(x + i * g.rb * g.C, g.blk_rows(i), g.C, &pm[i * g.C], &pq[i * g.C],
                     scratch.data());
      else
        k.seg_stats(x + g.seg_off(i), g.seg_len(i), &pm[i], &pq[i]);
    }
  });
  // Merge the blocks of each channel in order (Chan et al.).
  mean.assign(g.C, 0.0);
  m2.assign(g.C, 0.0);
  at::parallel_for(0, g.C, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      Moments mo;  // the order of seg_channel_stats
      if (g.rows) {
        for (int64_t b = 0; b < g.nb; ++b)
          mo.add(static_cast<double>(g.blk_rows(b)), pm[b * g.C + c], pq[b * g.C + c]);
      } else {
        for (int64_t n = 0; n < g.N; ++n)
          for (int64_t j = 0; j < g.nch; ++j) {
            const int64_t i = g.seg_item(n, c, j);
            mo.add(static_cast<double>(g.seg_len(i)), pm[i], pq[i]);
          }
      }
      mean[c] = mo.mu;
      m2[c] = mo.q;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double momentum, double eps) {
  const char* op = "batch_norm";
  if (is_reduced(input)) {
    check_reduced_params(input, {{"weight", ptr(weight)}, {"bias", ptr(bias)},
                                 {"running_mean", ptr(running_mean)}, {"running_var", ptr(running_var)}}, op);
    const std::optional<at::Tensor> rm = widen(running_mean), rv = widen(running_var);
    auto [y, mean, invstd] = fastlayers::batch_norm_train(widen(input), widen(weight), widen(bias), rm, rv,
                                              momentum, eps);
    if (is_reduced(running_mean)) running_mean->copy_(*rm);  // the buffers are updated in place
    if (is_reduced(running_var)) running_var->copy_(*rv);
    return {round_to(y, input.scalar_type()), mean, invstd};  // statistics stay float32
  }
  check_input(input, op);
  const int64_t C = input.size(1);
  check_param(weight, input, C, op, "weight");
  check_param(bias, input, C, op, "bias");
  check_param(running_mean, input, C, op, "running_mean");
  check_param(running_var, input, C, op, "running_var");
  TORCH_CHECK(has(running_mean) == has(running_var), "fastlayers.", op,
              ": running_mean and running_var must both be given or both be None");
  Layout g = make_layout(input);
  at::Tensor out = cpu::empty_like(g.x, g.fmt);
  at::Tensor save_mean = at::empty({C}, input.options());
  at::Tensor save_invstd = at::empty({C}, input.options());
  if (g.M == 0 || C == 0) {  // nothing to normalise
    save_mean.zero_();
    save_invstd.zero_();
    return {out, save_mean, save_invstd};
  }

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastlayers_batch_norm_train", [&] {
    using T = scalar_t;
    const auto w = to_double<T>(weight, C, 1.0), b = to_double<T>(bias, C, 0.0);
    std::vector<double> mean(C), m2(C), invstd(C), a(C);
    const double M = static_cast<double>(g.M);
    auto coef = [&](int64_t c) {
      invstd[c] = 1.0 / std::sqrt(m2[c] / M + eps);
      a[c] = invstd[c] * w[c];
    };
    if (g.fused()) {
      const auto& k = kernels<T>();
      const T* x = g.x.const_data_ptr<T>();
      T* y = out.mutable_data_ptr<T>();
      const bool nt = static_cast<int64_t>(out.nbytes()) >= kStreamBytes;
      const int64_t G = g.group();
      at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
        if (G > 1) {
          std::vector<T> ex;  // the group's coefficients, per value of a run
          for (int64_t ca = c0; ca < c1; ca += G) {
            const int64_t cb = std::min(ca + G, c1);
            seg_group_stats<T>(g, k, x, ca, cb, mean.data(), m2.data());
            std::vector<Affine<T>> f;
            for (int64_t c = ca; c < cb; ++c) {
              coef(c);
              f.emplace_back(mean[c], a[c], b[c]);
            }
            // The group's run of each image, one row of (cb - ca) * L values
            // with per-value coefficients (streamed out as one run).
            const int64_t len = (cb - ca) * g.L;
            ex.resize(4 * len);
            for (int64_t c = ca; c < cb; ++c) {
              const Affine<T>& e = f[c - ca];
              const int64_t j0 = (c - ca) * g.L;
              std::fill_n(ex.data() + j0, g.L, e.mh);
              std::fill_n(ex.data() + len + j0, g.L, e.ml);
              std::fill_n(ex.data() + 2 * len + j0, g.L, e.a);
              std::fill_n(ex.data() + 3 * len + j0, g.L, e.b);
            }
            for (int64_t n = g.N - 1; n >= 0; --n) {  // backwards: latest in cache first
              const int64_t o = (n * C + ca) * g.L;
              k.rows_affine(x + o, 1, len, ex.data(), ex.data() + len, ex.data() + 2 * len,
                            ex.data() + 3 * len, y + o, nt);
            }
          }
          store_fence();
          return;
        }
        for (int64_t c = c0; c < c1; ++c) {
          seg_channel_stats<T>(g, k, x, c, &mean[c], &m2[c]);
          coef(c);
          const Affine<T> f(mean[c], a[c], b[c]);
          for (int64_t s = g.N * g.nch - 1; s >= 0; --s) {  // backwards: latest in cache first
            const int64_t o = g.chan_off(c, s);
            k.seg_affine(x + o, g.chan_len(s), f.mh, f.ml, f.a, f.b, y + o, nt);
          }
        }
        store_fence();
      });
    } else {
      batch_stats<T>(g, mean, m2);
      for (int64_t c = 0; c < C; ++c) coef(c);
      affine_pass<T>(g, mean, a, b, out);
    }
    scalar_t* sm = save_mean.mutable_data_ptr<scalar_t>();
    scalar_t* si = save_invstd.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      sm[c] = static_cast<scalar_t>(mean[c]);
      si[c] = static_cast<scalar_t>(invstd[c]);
    }
    if (has(running_mean)) {
      auto rm = to_double<scalar_t>(running_mean, C, 0.0);
      auto rv = to_double<scalar_t>(running_var, C, 0.0);
      // Written in place through the (1-D) strides, as torch's kernel does: no
      // copy, and like torch's the buffers' version counters are not bumped.
      scalar_t* pm = running_mean->mutable_data_ptr<scalar_t>();
      scalar_t* pv = running_var->mutable_data_ptr<scalar_t>();
      const int64_t sm_st = running_mean->stride(0), sv_st = running_var->stride(0);
      // Unbiased variance; M == 1 gives inf/nan as torch (Python checks M > 1).
      const double unbias = M / (M - 1.0);
      for (int64_t c = 0; c < C; ++c) {
        pm[c * sm_st] = static_cast<scalar_t>((1.0 - momentum) * rm[c] + momentum * mean[c]);
        pv[c * sv_st] =
            static_cast<scalar_t>((1.0 - momentum) * rv[c] + momentum * (m2[c] / M) * unbias);
      }
    }
  });
  return {out, save_mean, save_invstd};
}

at::Tensor batch_norm_eval(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                           const at::Tensor& running_var, double eps) {
  const char* op = "batch_norm_eval";
  if (is_reduced(input)) {
    check_reduced_params(input, {{"weight", ptr(weight)}, {"bias", ptr(bias)},
                                 {"running_mean", &running_mean}, {"running_var", &running_var}}, op);
    return round_to(fastlayers::batch_norm_eval(widen(input), widen(weight), widen(bias), widen(running_mean),
                                    widen(running_var), eps),
                    input.scalar_type());
  }
  check_input(input, op);
  const int64_t C = input.size(1);
  check_param(weight, input, C, op, "weight");
  check_param(bias, input, C, op, "bias");
  check_param(running_mean, input, C, op, "running_mean");
  check_param(running_var, input, C, op, "running_var");
  Layout g = make_layout(input);
  at::Tensor out = cpu::empty_like(g.x, g.fmt);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastlayers_batch_norm_eval", [&] {
    const auto w = to_double<scalar_t>(weight, C, 1.0), b = to_double<scalar_t>(bias, C, 0.0);
    const auto rm = to_double<scalar_t>(running_mean, C, 0.0);
    const auto rv = to_double<scalar_t>(running_var, C, 0.0);
    std::vector<double> a(C);
    for (int64_t c = 0; c < C; ++c) a[c] = w[c] / std::sqrt(rv[c] + eps);
    affine_pass<scalar_t>(g, rm, a, b, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean_t, const at::Tensor& invstd_t, bool training,
    std::array<bool, 3> mask) {
  const char* op = "batch_norm_backward";
  if (is_reduced(input) || is_reduced(grad_output)) {
    check_same(input, grad_output, op, "input", "grad_output");
    const at::ScalarType pst = check_reduced_params(input, {{"weight", ptr(weight)}}, op);
    check_reduced_params(input, {{"mean", &mean_t}, {"invstd", &invstd_t}}, op);
    auto [gi, gw, gb] = fastlayers::batch_norm_backward(widen(grad_output), widen(input), widen(weight),
                                            widen(mean_t), widen(invstd_t), training, mask);
    const at::ScalarType st = input.scalar_type();  // (placeholders: the input's dtype)
    return {round_to(gi, st), round_to(gw, mask[1] ? pst : st), round_to(gb, mask[2] ? pst : st)};
  }
  check_input(input, op);
  check_same(input, grad_output, op, "input", "grad_output");
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "fastlayers.", op, ": grad_output shape ",
              grad_output.sizes(), " differs from input shape ", input.sizes());
  const int64_t C = input.size(1);
  check_param(weight, input, C, op, "weight");
  check_param(mean_t, input, C, op, "mean");
  check_param(invstd_t, input, C, op, "invstd");
  Layout g = make_layout(input);
  const at::Tensor dy_t = grad_output.contiguous(g.fmt);
  at::Tensor gi = no_grad_placeholder(input), gw = no_grad_placeholder(input),
             gb = no_grad_placeholder(input);  // distinct: outputs must not alias
  if (mask[0]) gi = cpu::empty_like(g.x, g.fmt);
  if (mask[1]) gw = at::zeros({C}, input.options());
  if (mask[2]) gb = at::zeros({C}, input.options());
  if (g.M == 0 || C == 0) return {gi, gw, gb};

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastlayers_batch_norm_backward", [&] {
    using T = scalar_t;
    const auto& k = kernels<T>();
    const T* x = g.x.const_data_ptr<T>();
    const T* dy = dy_t.const_data_ptr<T>();
    const auto w = to_double<T>(weight, C, 1.0);
    const auto mean = to_double<T>(mean_t, C, 0.0), invstd = to_double<T>(invstd_t, C, 0.0);
    std::vector<T> tm(C);
    for (int64_t c = 0; c < C; ++c) tm[c] = static_cast<T>(mean[c]);

    // Per channel sum dy and sum dy * (x - mean), and the coefficients of
    // dx = ((dy - k) - (x - mean) * b) * a.
    std::vector<double> sdy(C, 0.0), sdyx(C, 0.0);
    std::vector<T> ta(C), tb(C, T(0)), tk(C, T(0));
    const double M = static_cast<double>(g.M);
    auto coef = [&](int64_t c) {
      ta[c] = static_cast<T>(w[c] * invstd[c]);
      if (training) {
        tb[c] = static_cast<T>(invstd[c] * invstd[c] * (sdyx[c] / M));
        tk[c] = static_cast<T>(sdy[c] / M);
      }
    };
    // seg channel c: the sums of its chunks in (n, chunk) order
    auto seg_channel_reduce = [&](int64_t c) {
      double s1 = 0, s2 = 0;
      for (int64_t s = 0; s < kAhead; ++s) {
        prefetch_chunk(g, dy, c, s);
        prefetch_chunk(g, x, c, s);
      }
      for (int64_t s = 0; s < g.N * g.nch; ++s) {  // s = n * nch + j
        prefetch_chunk(g, dy, c, s + kAhead);
        prefetch_chunk(g, x, c, s + kAhead);
        const int64_t o = g.chan_off(c, s);
        double p1, p2;
        k.seg_bwd_reduce(dy + o, x + o, g.chan_len(s), tm[c], &p1, &p2);
        s1 += p1;
        s2 += p2;
      }
      sdy[c] = s1;
      sdyx[c] = s2;
    };
    // channels [ca, cb) (a group, nch == 1): the sums of seg_channel_reduce,
    // the group's runs read image by image
    auto seg_group_reduce = [&](int64_t ca, int64_t cb) {
      const int64_t run = (cb - ca) * g.L;
      auto prefetch = [&](int64_t n) {
        if (n >= g.N) return;
        const int64_t o = (n * C + ca) * g.L;
        const int64_t bytes = std::min<int64_t>(run * sizeof(T), 2 * kPrefetchBytes);
        for (int64_t b = 0; b < bytes; b += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(dy + o) + b);
          __builtin_prefetch(reinterpret_cast<const char*>(x + o) + b);
        }
      };
      for (int64_t n = 0; n < kAhead; ++n) prefetch(n);
      for (int64_t n = 0; n < g.N; ++n) {
        prefetch(n + kAhead);
        for (int64_t c = ca; c < cb; ++c) {
          const int64_t o = (n * C + c) * g.L;
          double p1, p2;
          k.seg_bwd_reduce(dy + o, x + o, g.L, tm[c], &p1, &p2);
          sdy[c] += p1;  // from 0, in n order: as seg_channel_reduce
          sdyx[c] += p2;
        }
      }
    };
    const bool reduce = (mask[0] && training) || mask[1] || mask[2];
    const T* xin = training ? x : nullptr;
    T* dx = mask[0] ? gi.mutable_data_ptr<T>() : nullptr;
    const bool nt = mask[0] && static_cast<int64_t>(gi.nbytes()) >= kStreamBytes;

    if (g.fused() && reduce && mask[0]) {
      // Channel-fused: reduce channel c, then its dx while it is in cache.
      const int64_t G = g.group();
      at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
        if (G > 1) {
          std::vector<T> ex;  // the group's coefficients, per value of a run
          for (int64_t ca = c0; ca < c1; ca += G) {
            const int64_t cb = std::min(ca + G, c1);
            seg_group_reduce(ca, cb);
            for (int64_t c = ca; c < cb; ++c) coef(c);
            // As the forward: one row per image with per-value coefficients.
            const int64_t len = (cb - ca) * g.L;
            ex.resize(4 * len);
            for (int64_t c = ca; c < cb; ++c) {
              const int64_t j0 = (c - ca) * g.L;
              std::fill_n(ex.data() + j0, g.L, tm[c]);
              std::fill_n(ex.data() + len + j0, g.L, ta[c]);
              std::fill_n(ex.data() + 2 * len + j0, g.L, tb[c]);
              std::fill_n(ex.data() + 3 * len + j0, g.L, tk[c]);
            }
            for (int64_t n = g.N - 1; n >= 0; --n) {  // backwards: latest in cache first
              const int64_t o = (n * C + ca) * g.L;
              k.rows_bwd_apply(dy + o, xin ? xin + o : nullptr, 1, len, ex.data(),
                               ex.data() + len, ex.data() + 2 * len, ex.data() + 3 * len, dx + o,
                               nt);
            }
          }
          store_fence();
          return;
        }
        for (int64_t c = c0; c < c1; ++c) {
          seg_channel_reduce(c);
          coef(c);
          for (int64_t s = g.N * g.nch - 1; s >= 0; --s) {  // backwards: latest in cache first
            const int64_t o = g.chan_off(c, s);
            k.seg_bwd_apply(dy + o, xin ? xin + o : nullptr, g.chan_len(s), tm[c], ta[c], tb[c],
                            tk[c], dx + o, nt);
          }
        }
        store_fence();
      });
    } else {
      if (reduce && g.fused()) {
        at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) seg_channel_reduce(c);
        });
      } else if (reduce) {
        // Reduction pass over the work items, then per channel in order.
        const int64_t items = g.items(), per = g.rows ? C : 1;
        std::vector<double> p1(items * per), p2(items * per);
        at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
          std::vector<T> scratch(g.rows ? 2 * C : 0);
          for (int64_t i = i0; i < i1; ++i) {
            if (g.rows) {
              const int64_t o = i * g.rb * C;
              k.rows_bwd_reduce(dy + o, x + o, g.blk_rows(i), C, tm.data(), &p1[i * C],
                                &p2[i * C], scratch.data());
            } else {
              const int64_t o = g.seg_off(i);
              k.seg_bwd_reduce(dy + o, x + o, g.seg_len(i), tm[g.seg_c(i)], &p1[i], &p2[i]);
            }
          }
        });
        at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            double s1 = 0, s2 = 0;  // the order of seg_channel_reduce
            if (g.rows) {
              for (int64_t b = 0; b < g.nb; ++b) { s1 += p1[b * C + c]; s2 += p2[b * C + c]; }
            } else {
              for (int64_t n = 0; n < g.N; ++n)
                for (int64_t j = 0; j < g.nch; ++j) {
                  const int64_t i = g.seg_item(n, c, j);
                  s1 += p1[i];
                  s2 += p2[i];
                }
            }
            sdy[c] = s1;
            sdyx[c] = s2;
          }
        });
      }
      if (mask[0]) {
        for (int64_t c = 0; c < C; ++c) coef(c);
        at::parallel_for(0, g.items(), 1, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i1 - 1; i >= i0; --i) {  // backwards: see kReverse
            if (g.rows) {
              const int64_t o = i * g.rb * C;
              k.rows_bwd_apply(dy + o, xin ? xin + o : nullptr, g.blk_rows(i), C, tm.data(),
                               ta.data(), tb.data(), tk.data(), dx + o, nt);
            } else {
              const int64_t c = g.seg_c(i), o = g.seg_off(i);
              k.seg_bwd_apply(dy + o, xin ? xin + o : nullptr, g.seg_len(i), tm[c], ta[c], tb[c],
                              tk[c], dx + o, nt);
            }
          }
          store_fence();
        });
      }
    }
    if (mask[1]) {
      T* p = gw.mutable_data_ptr<T>();
      for (int64_t c = 0; c < C; ++c) p[c] = static_cast<T>(sdyx[c] * invstd[c]);
    }
    if (mask[2]) {
      T* p = gb.mutable_data_ptr<T>();
      for (int64_t c = 0; c < C; ++c) p[c] = static_cast<T>(sdy[c]);
    }
  });
  return {gi, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlayers, CPU, m) {
  m.impl("batch_norm_train", &batch_norm_train);
  m.impl("batch_norm_eval", &batch_norm_eval);
  m.impl("batch_norm_backward", &batch_norm_backward);
}

}  // namespace fastlayers
