// Host-side check of the conv2d implicit-GEMM index maps (csrc/cuda/conv2d.cuh),
// run both as a naive GEMM and through a host replica of the tiled SIMT kernel
// (tiles, split-K, workspace, ordered reduction), against direct loops, for NCHW and channels_last strides, groups, stride,
// padding and dilation; plus the GEMM split-K planner. Needs nvcc, no GPU:
//   nvcc -std=c++17 -Icsrc .ci/host_check.cu -o /tmp/host_check && /tmp/host_check
#include <algorithm>
#include <utility>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/conv2d.cuh"
// The max-pool and batch-norm fast paths: their per-element device functions
// (FL_HD) are run here on the host against direct loops.
#include "cuda/batch_norm.cu"
#include "cuda/max_pool2d.cu"

using namespace fastlayers::cuda;

static std::mt19937 rng(1234);

static void strides(int64_t n, int64_t c, int64_t h, int64_t w, bool cl, int64_t (&s)[4]) {
  if (cl) { s[1] = 1; s[3] = c; s[2] = w * c; s[0] = h * w * c; }
  else { s[3] = 1; s[2] = w; s[1] = h * w; s[0] = c * h * w; }
  (void)n;
}

static std::vector<double> randv(int64_t n) {
  std::normal_distribution<double> d;
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

template <class P>
static void run_problem(const P& p, int64_t groups) {
  for (int g = 0; g < groups; ++g)
    for (int64_t i = 0; i < p.M; ++i)
      for (int64_t j = 0; j < p.N; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < p.K; ++k) acc += elem_a(p, g, i, k) * elem_b(p, g, k, j);
        store_c(p, g, i, j, acc);
      }
}

// Host replica of gemm_simt_kernel + gemm_splitk_reduce (gemm_kernels.cuh): the
// same tile walk, the same TileLoader objects (thread -> element maps), the same
// register-block map (simt_local), split-K chunks and workspace layout, with the
// __syncthreads phases run one after the other for all 256 threads.
template <class P, int BM, int BN>
static void emulate_simt(const P& p, int64_t groups, const GemmPlan& pl) {
  using T = typename P::T;
  using Acc = typename Num<T>::Acc;
  using AOp = typename P::AOp;
  using BOp = typename P::BOp;
  constexpr int NT = kGemmThreads, BK = kSimtBK, LDA = BM + kSimtPad, LDB = BN + kSimtPad;
  constexpr int TM = BM / 16, TN = BN / 16, EA = BM / 32, EB = BN / 32, KH = BK / 8;
  if (pl.BM != BM || pl.BN != BN) { std::printf("FAIL plan tile\n"); std::exit(1); }
  std::vector<Acc> ws(pl.splits > 1 ? size_t(groups * pl.splits * p.M * p.N) : 0, Acc(NAN));
  const int64_t gy = ceil_div(p.M, BM), gx = ceil_div(p.N, BN), gz = groups * pl.splits;
  std::vector<T> As(2 * BK * LDA), Bs(2 * BK * LDB);
  std::vector<TileLoader<AOp, EA, KH>> la(NT);
  std::vector<TileLoader<BOp, EB, KH>> lb(NT);
  std::vector<Acc> acc(NT * TM * TN);
  for (int64_t bz = 0; bz < gz; ++bz)
    for (int64_t by = 0; by < gy; ++by)
      for (int64_t bx = 0; bx < gx; ++bx) {
        const int zg = int(bz), g = zg / pl.splits, sp = zg % pl.splits;
        const int64_t m0 = by * BM, n0 = bx * BN, kbeg = int64_t(sp) * pl.kchunk;
        const int64_t kend = kbeg + pl.kchunk < p.K ? kbeg + pl.kchunk : p.K;
        const int64_t ntiles = kend > kbeg ? (kend - kbeg + BK - 1) / BK : 0;
        const AOp aop = p.a_op(g);
        const BOp bop = p.b_op(g);
        std::fill(As.begin(), As.end(), T(NAN));
        std::fill(Bs.begin(), Bs.end(), T(NAN));
        for (int tid = 0; tid < NT; ++tid) {
          la[tid].init(aop, m0, p.M, p.a_k_fast, tid);
          lb[tid].init(bop, n0, p.N, p.b_k_fast, tid);
        }
        for (auto& v : acc) v = Acc(0);
        if (ntiles > 0)
          for (int tid = 0; tid < NT; ++tid) {
            la[tid].load(aop, kbeg, kend); lb[tid].load(bop, kbeg, kend);
            la[tid].store(As.data(), LDA); lb[tid].store(Bs.data(), LDB);
          }
        for (int64_t t = 0; t < ntiles; ++t) {
          const int buf = int(t & 1);
          const T* as = As.data() + buf * BK * LDA;
          const T* bs = Bs.data() + buf * BK * LDB;
          for (int tid = 0; tid < NT; ++tid) {
            int ty, tx;
            simt_thread(tid, ty, tx);
            if (t + 1 < ntiles) {
              la[tid].load(aop, kbeg + (t + 1) * BK, kend);
              lb[tid].load(bop, kbeg + (t + 1) * BK, kend);
            }
            for (int kk = 0; kk < BK; ++kk)
              for (int i = 0; i < TM; ++i)
                for (int j = 0; j < TN; ++j) {
                  const T a = as[kk * LDA + simt_local(ty, i)], b = bs[kk * LDB + simt_local(tx, j)];
                  acc[(tid * TM + i) * TN + j] = std::fma(Num<T>::to_acc(a), Num<T>::to_acc(b),
                                                          acc[(tid * TM + i) * TN + j]);
                }
          }
          if (t + 1 < ntiles)
            for (int tid = 0; tid < NT; ++tid) {
              la[tid].store(As.data() + (buf ^ 1) * BK * LDA, LDA);
              lb[tid].store(Bs.data() + (buf ^ 1) * BK * LDB, LDB);
            }
        }
        for (int tid = 0; tid < NT; ++tid) {
          int ty, tx;
          simt_thread(tid, ty, tx);
          for (int i = 0; i < TM; ++i) {
            const int64_t gm = m0 + simt_local(ty, i);
            if (gm >= p.M) continue;
            for (int j = 0; j < TN; ++j) {
              const int64_t gn = n0 + simt_local(tx, j);
              if (gn >= p.N) continue;
              const Acc v = acc[(tid * TM + i) * TN + j];
              if (pl.splits > 1) {
                const int64_t o = (int64_t(zg) * p.M + gm) * p.N + gn;
                if (o < 0 || o >= int64_t(ws.size())) { std::printf("FAIL ws index\n"); std::exit(1); }
                ws[o] = v;
              } else {
                store_c_at(p, g, gm, gn, p.c_row(g, gm) + p.c_col(g, gn), v);
              }
            }
          }
        }
      }
  if (pl.splits > 1) {
    const int64_t mn = p.M * p.N;
    for (int64_t q = 0; q < groups * mn; ++q) {
      const int64_t g = q / mn, r = q - g * mn, i = r / p.N, j = r - i * p.N;
      const Acc* w = ws.data() + g * pl.splits * mn + r;
      Acc s = Acc(0);
      for (int k = 0; k < pl.splits; ++k) s += w[int64_t(k) * mn];
      store_c(p, int(g), i, j, s);
    }
  }
}

// Runs the emulated kernel with the tile config the planner picks for dtype dt
// (the arithmetic stays in P's type, double, so results compare exactly).
// The same with a forced tile config (0: 64x64, 1: 128x128, 3: 64x128) and split count.
template <class P>
static void run_tiled_cfg(const P& p, int64_t groups, int cfg, int splits) {
  GemmPlan pl;
  pl.cfg = cfg;
  pl.BM = cfg == 1 ? 128 : 64;
  pl.BN = cfg == 0 ? 64 : 128;
  pl.kchunk = std::max<int64_t>(ceil_div(ceil_div(p.K, splits), pl.BK) * pl.BK, pl.BK);
  pl.splits = int(std::max<int64_t>(ceil_div(p.K, pl.kchunk), 1));
  if (pl.cfg == 1) emulate_simt<P, 128, 128>(p, groups, pl);
  else if (pl.cfg == 3) emulate_simt<P, 64, 128>(p, groups, pl);
  else emulate_simt<P, 64, 64>(p, groups, pl);
}

template <class P>
static void run_tiled(const P& p, int64_t groups, DType dt) {
  const GemmPlan pl = plan_gemm(p.M, p.N, p.K, groups, dt);
  if (pl.cfg == 1) emulate_simt<P, 128, 128>(p, groups, pl);
  else if (pl.cfg == 3) emulate_simt<P, 64, 128>(p, groups, pl);
  else emulate_simt<P, 64, 64>(p, groups, pl);
}

static double maxdiff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::fmax(m, std::fabs(a[i] - b[i]));
  return m;
}

static int check(int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, int64_t R, int64_t S,
                 int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                 int64_t G, bool xcl, bool wcl, bool ycl) {
  ConvDesc d;
  d.N = N; d.C = C; d.H = H; d.W = W; d.K = K; d.R = R; d.S = S;
  d.stride_h = sh; d.stride_w = sw; d.pad_h = ph; d.pad_w = pw; d.dil_h = dh; d.dil_w = dw;
  d.groups = G;
  d.P = (H + 2 * ph - dh * (R - 1) - 1) / sh + 1;
  d.Q = (W + 2 * pw - dw * (S - 1) - 1) / sw + 1;
  const int64_t Cg = C / G, Kg = K / G, P = d.P, Q = d.Q;
  strides(N, C, H, W, xcl, d.x_str);
  strides(K, Cg, R, S, wcl, d.w_str);
  strides(N, K, P, Q, ycl, d.y_str);
  auto X = [&](int64_t n, int64_t c, int64_t h, int64_t w) {
    return n * d.x_str[0] + c * d.x_str[1] + h * d.x_str[2] + w * d.x_str[3]; };
  auto Wt = [&](int64_t k, int64_t c, int64_t r, int64_t s) {
    return k * d.w_str[0] + c * d.w_str[1] + r * d.w_str[2] + s * d.w_str[3]; };
  auto Y = [&](int64_t n, int64_t k, int64_t p, int64_t q) {
    return n * d.y_str[0] + k * d.y_str[1] + p * d.y_str[2] + q * d.y_str[3]; };
  std::vector<double> x = randv(N * C * H * W), w = randv(K * Cg * R * S), b = randv(K),
                      gy = randv(N * K * P * Q);
  // Direct loops.
  std::vector<double> y_ref(N * K * P * Q, 0.0), gx_ref(x.size(), 0.0), gw_ref(w.size(), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t p = 0; p < P; ++p)
        for (int64_t q = 0; q < Q; ++q) {
          const int64_t g = k / Kg;
          double acc = b[k];
          for (int64_t c = 0; c < Cg; ++c)
            for (int64_t r = 0; r < R; ++r)
              for (int64_t s = 0; s < S; ++s) {
                const int64_t h = p * sh - ph + r * dh, ww = q * sw - pw + s * dw;
                if (h < 0 || h >= H || ww < 0 || ww >= W) continue;
                const int64_t xi = X(n, g * Cg + c, h, ww), wi = Wt(k, c, r, s);
                acc += x[xi] * w[wi];
                gx_ref[xi] += w[wi] * gy[Y(n, k, p, q)];
                gw_ref[wi] += x[xi] * gy[Y(n, k, p, q)];
              }
          y_ref[Y(n, k, p, q)] = acc;
        }
  std::vector<double> y(y_ref.size(), NAN), gx(x.size(), NAN), gw(w.size(), NAN);
  const bool unit = sh == 1 && sw == 1;
  auto dgrad_unit = [&] { return ConvDgradT<double, true>(d, gy.data(), w.data(), gx.data()); };
  auto dgrad_any = [&] { return ConvDgradT<double, false>(d, gy.data(), w.data(), gx.data()); };
  run_problem(ConvFwd<double>(d, x.data(), w.data(), b.data(), y.data()), G);
  if (unit) run_problem(dgrad_unit(), G); else run_problem(dgrad_any(), G);
  run_problem(ConvWgrad<double>(d, gy.data(), x.data(), gw.data()), G);
  double e1 = maxdiff(y, y_ref), e2 = maxdiff(gx, gx_ref), e3 = maxdiff(gw, gw_ref);
  auto reset = [&] {
    std::fill(y.begin(), y.end(), NAN); std::fill(gx.begin(), gx.end(), NAN);
    std::fill(gw.begin(), gw.end(), NAN);
  };
  auto collect = [&] {
    e1 = std::fmax(e1, maxdiff(y, y_ref)); e2 = std::fmax(e2, maxdiff(gx, gx_ref));
    e3 = std::fmax(e3, maxdiff(gw, gw_ref));
  };
  // The same through the emulated tiled kernel (tiles, split-K, workspace), as
  // planned for float64, then every tile config with 1 and 3 splits.
  reset();
  run_tiled(ConvFwd<double>(d, x.data(), w.data(), b.data(), y.data()), G, DType::F64);
  if (unit) run_tiled(dgrad_unit(), G, DType::F64); else run_tiled(dgrad_any(), G, DType::F64);
  run_tiled(ConvWgrad<double>(d, gy.data(), x.data(), gw.data()), G, DType::F64);
  collect();
  const int cfg_splits[4][2] = {{0, 1}, {0, 3}, {1, 1}, {3, 3}};
  for (const auto& cs : cfg_splits) {
    const int cfg = cs[0], splits = cs[1];
    reset();
    run_tiled_cfg(ConvFwd<double>(d, x.data(), w.data(), b.data(), y.data()), G, cfg, splits);
    // The general (dividing) grad_output gather must agree for unit strides too.
    if (unit && splits == 1) run_tiled_cfg(dgrad_unit(), G, cfg, splits);
    else run_tiled_cfg(dgrad_any(), G, cfg, splits);
    run_tiled_cfg(ConvWgrad<double>(d, gy.data(), x.data(), gw.data()), G, cfg, splits);
    collect();
  }
  // The 32-bit-index operands (the float fast path) through the big tiles.
  if (!conv_index32(d)) { std::printf("FAIL conv_index32 false for a small problem\n"); return 1; }
  for (const auto& cs : {std::pair<int, int>{3, 1}, {1, 3}}) {
    reset();
    run_tiled_cfg(ConvFwd<double, int32_t>(d, x.data(), w.data(), b.data(), y.data()), G, cs.first, cs.second);
    if (unit) run_tiled_cfg(ConvDgradT<double, true, int32_t>(d, gy.data(), w.data(), gx.data()), G, cs.first, cs.second);
    else run_tiled_cfg(dgrad_any(), G, cs.first, cs.second);
    run_tiled_cfg(ConvWgrad<double, int32_t>(d, gy.data(), x.data(), gw.data()), G, cs.first, cs.second);
    collect();
  }
  const bool ok = e1 < 1e-9 && e2 < 1e-9 && e3 < 1e-9;
  std::printf("%s N%ld C%ld %ldx%ld K%ld k%ldx%ld s%ld,%ld p%ld,%ld d%ld,%ld g%ld cl%d%d%d: "
              "fwd %.1e dgrad %.1e wgrad %.1e\n", ok ? "ok  " : "FAIL", long(N), long(C), long(H),
              long(W), long(K), long(R), long(S), long(sh), long(sw), long(ph), long(pw), long(dh),
              long(dw), long(G), xcl, wcl, ycl, e1, e2, e3);
  return ok ? 0 : 1;
}

// ---- FastDiv, max-pool fast paths, batch-norm vector paths -----------------------
static int check_fastdiv() {
  std::uniform_int_distribution<uint32_t> U(0, 0x7fffffffu);
  int bad = 0;
  std::vector<uint32_t> ds;
  for (uint32_t d = 1; d <= 3000; ++d) ds.push_back(d);
  for (int i = 0; i < 3000; ++i) ds.push_back(1 + U(rng) % 0x7fffffffu);
  ds.push_back(0x7fffffffu); ds.push_back(0x40000000u); ds.push_back(0x40000001u);
  for (uint32_t d : ds) {
    const FastDiv f(d);
    uint32_t ns[] = {0, 1, d - 1, d, d + 1, 2 * d - 1, 0x7fffffffu, 0x7ffffffeu, U(rng), U(rng),
                     U(rng) % 100000u, U(rng) % (1u << 20)};
    for (uint32_t n : ns) {
      if (n > 0x7fffffffu) continue;
      if (f.div(n) != n / d) { if (bad++ < 5) std::printf("FAIL fastdiv %u / %u\n", n, d); }
    }
  }
  std::printf("%s FastDiv (%zu divisors)\n", bad ? "FAIL" : "ok  ", ds.size());
  return bad ? 1 : 0;
}

static int64_t ref_pool_out(int64_t in, int64_t k, int64_t pad, int64_t stride, bool ceil) {
  const int64_t num = in + 2 * pad - (k - 1) - 1 + (ceil ? stride - 1 : 0);
  int64_t out = num / stride + 1;
  if (ceil && (out - 1) * stride >= in + pad) --out;
  return out;
}

template <typename S>
static int check_pool(int64_t N, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw,
                      int64_t sh, int64_t sw, int64_t ph, int64_t pw, bool ceil, bool cl) {
  PoolDesc d;
  d.N = N; d.C = C; d.H = H; d.W = W; d.kh = kh; d.kw = kw; d.sh = sh; d.sw = sw;
  d.ph = ph; d.pw = pw;
  d.P = ref_pool_out(H, kh, ph, sh, ceil); d.Q = ref_pool_out(W, kw, pw, sw, ceil);
  const int64_t P = d.P, Q = d.Q;
  strides(N, C, H, W, cl, d.in_str);
  strides(N, C, P, Q, cl, d.out_str);
  strides(N, C, P, Q, cl, d.off_str);
  d.in_channels_last = d.out_channels_last = cl;
  int bad = 0;
  // (C == 1 or H == W == 1: both layouts are the same memory; NCHW is picked.)
  if (pool_fast_layout(d, false) != (cl && C > 1 && H * W > 1 ? 2 : 1)) { std::printf("FAIL fast layout not chosen\n"); bad++; }
  if (pool_fast_layout(d, true) != 0) { std::printf("FAIL fast layout with int32 offsets\n"); bad++; }
  const PoolFast f = make_pool_fast(d);
  const int64_t nin = N * C * H * W, nout = N * C * P * Q;
  // Small integers: many ties; a few NaNs.
  std::uniform_int_distribution<int> vi(-3, 3), nanp(0, 40);
  std::vector<S> x(nin);
  for (auto& v : x) v = nanp(rng) == 0 ? S(NAN) : S(vi(rng));
  std::vector<S> y(nout);
  std::vector<uint8_t> off(nout);
  for (int64_t t = 0; t < nout; ++t) pool_fwd_fast_elem<S, false>(f, uint32_t(t), x.data(), y.data(), off.data());
  if (cl) for (int64_t t = 0; t < nout; ++t) pool_fwd_fast_elem<S, true>(f, uint32_t(t), x.data(), y.data(), off.data());
  auto xi = [&](int64_t n, int64_t c, int64_t h, int64_t w) {
    return n * d.in_str[0] + c * d.in_str[1] + h * d.in_str[2] + w * d.in_str[3]; };
  auto oi = [&](int64_t n, int64_t c, int64_t p, int64_t q) {
    return n * d.out_str[0] + c * d.out_str[1] + p * d.out_str[2] + q * d.out_str[3]; };
  int64_t nans = 0;
  for (int64_t n = 0; n < N; ++n) for (int64_t c = 0; c < C; ++c)
    for (int64_t p = 0; p < P; ++p) for (int64_t q = 0; q < Q; ++q) {
      // torch's rule over the full window: first max wins, a NaN replaces.
      S best = S(-INFINITY); int64_t bk = -1;
      for (int64_t r = 0; r < kh; ++r) for (int64_t s = 0; s < kw; ++s) {
        const int64_t h = p * sh - ph + r, w = q * sw - pw + s;
        if (h < 0 || h >= H || w < 0 || w >= W) continue;
        const S v = x[xi(n, c, h, w)];
        if (bk < 0 || v > best || std::isnan(v)) { best = v; bk = r * kw + s; }
      }
      const int64_t o = oi(n, c, p, q);
      nans += std::isnan(best);
      const bool same = (std::isnan(best) && std::isnan(y[o])) || best == y[o];
      if (!same || int64_t(off[o]) != bk) {
        if (bad++ < 5) std::printf("FAIL pool fwd n%ld c%ld p%ld q%ld: %g/%d vs %g/%ld\n", long(n),
                                   long(c), long(p), long(q), double(y[o]), int(off[o]),
                                   double(best), long(bk));
      }
    }
  // Backward twice: offsets from the forward, then random offsets (also into padding).
  std::uniform_int_distribution<int> ki(0, int(kh * kw - 1));
  for (int pass = 0; pass < 2; ++pass) {
    if (pass == 1) for (auto& o : off) o = uint8_t(ki(rng));
    std::vector<S> gy(nout), gx(nin, S(NAN)), ref(nin, S(0));
    for (auto& v : gy) v = S(vi(rng) + 4 * nanp(rng));
    for (int64_t n = 0; n < N; ++n) for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < P; ++p) for (int64_t q = 0; q < Q; ++q) {
        const int64_t o = oi(n, c, p, q), k = off[o];
        const int64_t h = p * sh - ph + k / kw, w = q * sw - pw + k % kw;
        if (h < 0 || h >= H || w < 0 || w >= W) continue;
        ref[xi(n, c, h, w)] += gy[o];
      }
    for (int64_t t = 0; t < nin; ++t) {
      if (cl) pool_bwd_fast_elem<S, true>(f, uint32_t(t), gy.data(), off.data(), gx.data());
      else pool_bwd_fast_elem<S, false>(f, uint32_t(t), gy.data(), off.data(), gx.data());
    }
    if (!cl && kh == 3 && kw == 3 && sh == 2 && sw == 2) {  // max_pool_bwd_k3s2: bitwise equal
      std::vector<S> gx2(nin, S(-7));
      const uint32_t G = uint32_t((W + 3) / 4);
      for (uint32_t row = 0; row < uint32_t(N * C * H); ++row)
        for (uint32_t j = 0; j < G; ++j)
          pool_bwd_k3s2_group<S, false>(f, row, j, gy.data(), off.data(), gx2.data());
      if (W % 4 == 0) {
        std::vector<S> gx3(nin + 8, S(-7));
        for (uint32_t row = 0; row < uint32_t(N * C * H); ++row)
          for (uint32_t j = 0; j < G; ++j)
            pool_bwd_k3s2_group<S, true>(f, row, j, gy.data(), off.data(), gx3.data());
        for (int64_t t = 0; t < nin; ++t)
          if (std::memcmp(&gx3[t], &gx2[t], sizeof(S)) != 0 && bad++ < 5)
            std::printf("FAIL pool bwd k3s2 vector store elem %ld\n", long(t));
      }
      for (int64_t t = 0; t < nin; ++t)
        if (std::memcmp(&gx2[t], &gx[t], sizeof(S)) != 0 && bad++ < 5)
          std::printf("FAIL pool bwd k3s2 pass %d elem %ld: %g vs %g\n", pass, long(t),
                      double(gx2[t]), double(gx[t]));
    }
    for (int64_t t = 0; t < nin; ++t)
      if (!(gx[t] == ref[t])) {
        if (bad++ < 5) std::printf("FAIL pool bwd pass %d elem %ld: %g vs %g\n", pass, long(t),
                                   double(gx[t]), double(ref[t]));
      }
  }
  std::printf("%s pool %s N%ld C%ld %ldx%ld -> %ldx%ld k%ldx%ld s%ld,%ld p%ld,%ld ceil%d cl%d"
              " (%ld NaN outputs)\n", bad ? "FAIL" : "ok  ", sizeof(S) == 4 ? "f32" : "f64",
              long(N), long(C), long(H), long(W), long(P), long(Q), long(kh), long(kw), long(sh),
              long(sw), long(ph), long(pw), int(ceil), int(cl), long(nans));
  return bad ? 1 : 0;
}

// Batch norm: the vectorised per-thread reductions, emulating the block/split walk
// of bn_stats_partial_vec / bn_bwd_partial_vec, and the vector -> channel map.
template <typename S>
static int check_bn(int64_t N, int64_t C, int64_t Sp, bool cl) {
  using Acc = typename Num<S>::Acc;
  constexpr int V = bn_vec<S>();
  BNDesc d;
  d.N = N; d.C = C; d.S = Sp; d.channels_last = cl;
  if (cl) { d.sN = C * Sp; d.sC = 1; d.sS = C; } else { d.sN = C * Sp; d.sC = Sp; d.sS = 1; }
  const int64_t total = N * C * Sp;
  std::vector<S> x(total + 4), gy(total + 4);  // 16-byte aligned data (malloc)
  std::normal_distribution<double> nd(0.5, 2.0);
  for (auto& v : x) v = S(nd(rng));
  for (auto& v : gy) v = S(nd(rng));
  int bad = 0;
  if (!cl && bn_planes_ok<S>(d)) {
    const BNPlanes pl = bn_planes<S>(d);
    const int64_t splits = bn_splits(d);
    const uint32_t vecs = uint32_t(N) * pl.SV, chunk = uint32_t(ceil_div(vecs, splits));
    for (int64_t c = 0; c < C; ++c) {
      double n = 0, mean = 0, m2 = 0, sdy = 0, sdyx = 0;
      const Acc mu = Acc(0.25);
      std::vector<int> seen(total, 0);
      for (int64_t sp = 0; sp < splits; ++sp) {
        const uint32_t v0 = std::min(uint32_t(sp) * chunk, vecs), v1 = std::min(v0 + chunk, vecs);
        for (uint32_t tid = 0; tid < 256; ++tid) {
          Acc tn = 0, tm = 0, tm2 = 0, a = 0, b = 0;
          bn_stats_thread<S>(pl, x.data(), c, v0 + tid, v1, 256, tn, tm, tm2);
          welford_merge<double>(n, mean, m2, double(tn), double(tm), double(tm2));
          bn_bwd_sums_thread<S>(pl, gy.data(), x.data(), c, mu, v0 + tid, v1, 256, a, b);
          sdy += a; sdyx += b;
          for (uint32_t v = v0 + tid; v < v1; v += 256) {
            const int64_t o = bn_plane_vec_offset<S>(pl, c, v);
            for (int i = 0; i < V; ++i) seen[o + i]++;
          }
        }
      }
      double rs = 0, rss = 0, rdy = 0, rdyx = 0;
      int cover_bad = 0;
      for (int64_t nn = 0; nn < N; ++nn) for (int64_t s = 0; s < Sp; ++s) {
        const int64_t o = nn * d.sN + c * d.sC + s;
        rs += double(x[o]); rdy += double(gy[o]); rdyx += double(gy[o]) * (double(x[o]) - 0.25);
        cover_bad += seen[o] != 1;
      }
      const double rmean = rs / double(N * Sp);
      for (int64_t nn = 0; nn < N; ++nn) for (int64_t s = 0; s < Sp; ++s) {
        const double e = double(x[nn * d.sN + c * d.sC + s]) - rmean; rss += e * e;
      }
      const double tol = sizeof(S) == 8 ? 1e-10 : 1e-4;
      const double M = double(N * Sp);
      if (cover_bad || n != M || std::fabs(mean - rmean) > tol * (1 + std::fabs(rmean)) ||
          std::fabs(m2 / M - rss / M) > tol * (1 + rss / M) ||
          std::fabs(sdy - rdy) > tol * M || std::fabs(sdyx - rdyx) > tol * M * 4) {
        if (bad++ < 5) std::printf("FAIL bn stats c%ld: cover %d n %g/%g mean %g/%g var %g/%g "
                                   "sdy %g/%g sdyx %g/%g\n", long(c), cover_bad, n, M, mean, rmean,
                                   m2 / M, rss / M, sdy, rdy, sdyx, rdyx);
      }
    }
  } else if (!cl) {
    std::printf("FAIL bn planes path not taken\n"); bad++;
  }
  if (!bn_elems_ok<S>(d)) { std::printf("FAIL bn elems path not taken\n"); bad++; }
  else {
    const BNElems e = bn_elems<S>(d);
    for (uint32_t v = 0; v < uint32_t(total / V); ++v) {
      const uint32_t c0 = bn_vec_channel<S>(e, v);
      for (int i = 0; i < V; ++i) {
        const int64_t t = int64_t(v) * V + i;
        const int64_t cref = cl ? t % C : (t / Sp) % C;
        if (int64_t(c0 + (cl ? i : 0)) != cref) {
          if (bad++ < 5) std::printf("FAIL bn channel of %ld: %u vs %ld\n", long(t), c0, long(cref));
        }
      }
    }
  }
  std::printf("%s bn %s N%ld C%ld S%ld cl%d splits %ld\n", bad ? "FAIL" : "ok  ",
              sizeof(S) == 8 ? "f64" : "f32", long(N), long(C), long(Sp), int(cl),
              long(bn_splits(d)));
  return bad ? 1 : 0;
}

// Batch norm, channels-last kernels: emulates the blocks of bn_stats_partial_nhwc /
// bn_bwd_partial_nhwc (per-thread functions, merge of rows ty = 0, 1, ... in order)
// and the row walk of the elementwise passes (every element exactly once).
template <typename S, int L>
static int check_bn_nhwc(int64_t N, int64_t C, int64_t Sp, double shift) {
  using Acc = typename Num<S>::Acc;
  BNDesc d;
  d.N = N; d.C = C; d.S = Sp; d.channels_last = true;
  d.sN = C * Sp; d.sC = 1; d.sS = C;
  int bad = 0;
  if (!bn_nhwc_ok(d) || C % L != 0) { std::printf("FAIL bn nhwc not eligible\n"); return 1; }
  const BNRows g = bn_rows(d, L);
  const int64_t total = N * C * Sp, R = N * Sp;
  std::vector<S> x(total + 16), gy(total + 16);
  std::normal_distribution<double> nd(0.0, 1.0);
  for (auto& v : x) v = S(shift + 0.5 * nd(rng));
  for (auto& v : gy) v = S(nd(rng));
  std::vector<double> n(C, 0), mean(C, 0), m2(C, 0), sdy(C, 0), sdyx(C, 0);
  std::vector<int> seen(total, 0);
  const Acc mu0 = Acc(shift);
  for (uint32_t ch = 0; ch < g.chunks; ++ch)
    for (uint32_t sp = 0; sp < g.splits; ++sp) {
      std::vector<Acc> bn(g.cols * L, 0), bm(g.cols * L, 0), bm2(g.cols * L, 0),
          bs(g.cols * L, 0), bsx(g.cols * L, 0);
      for (uint32_t tid = 0; tid < 256; ++tid) {
        uint32_t cu, r, r1;
        if (!bn_rows_thread(g, sp, ch, tid, cu, r, r1)) continue;
        Acc tn[L], tm[L], tm2[L], mu[L], a[L], b[L], piv[L];
        for (int l = 0; l < L; ++l) {
          tn[l] = tm[l] = tm2[l] = a[l] = b[l] = 0; mu[l] = mu0;
          piv[l] = bn_nhwc_pivot(x.data(), int64_t(cu) * L + l);   // the kernel's pivot
        }
        bn_nhwc_stats_thread<S, L>(g, x.data(), cu, r, r1, piv, tn, tm, tm2);
        bn_nhwc_sums_thread<S, L>(g, gy.data(), x.data(), cu, r, r1, mu, a, b);
        const uint32_t tx = tid % g.cols;
        for (int l = 0; l < L; ++l) {
          const uint32_t j = tx * L + l;
          welford_merge(bn[j], bm[j], bm2[j], tn[l], tm[l], tm2[l]);
          bs[j] += a[l]; bsx[j] += b[l];
        }
        for (uint32_t rr = r; rr < r1; rr += g.rpi)
          for (int l = 0; l < L; ++l) seen[int64_t(rr) * C + cu * L + l]++;
      }
      for (uint32_t tx = 0; tx < g.cols; ++tx)
        for (int l = 0; l < L; ++l) {
          const int64_t c = int64_t(ch * g.cols + tx) * L + l;
          if (c >= C) continue;
          const uint32_t j = tx * L + l;
          welford_merge<double>(n[c], mean[c], m2[c], bn[j], bm[j], bm2[j]);
          sdy[c] += bs[j]; sdyx[c] += bsx[j];
        }
    }
  int cover_bad = 0;
  for (int64_t t = 0; t < total; ++t) cover_bad += seen[t] != 1;
  if (cover_bad) { std::printf("FAIL bn nhwc coverage: %d elements\n", cover_bad); bad++; }
  const double tol = sizeof(S) == 8 ? 1e-10 : 2e-4;
  // The mean of x - pivot carries float rounding of values near the spread (0.5),
  // not near the shift: for float an absolute bound (without the pivot 5 of the 8
  // float cases below fail it); for double the reference sum itself rounds at the
  // shift's magnitude.
  for (int64_t c = 0; c < C; ++c) {
    mean[c] += double(bn_nhwc_pivot(x.data(), c));   // as the finalize does
    double rs = 0, rss = 0, rdy = 0, rdyx = 0;
    for (int64_t r = 0; r < R; ++r) rs += double(x[r * C + c]);
    const double rmean = rs / double(R);
    for (int64_t r = 0; r < R; ++r) {
      const double e = double(x[r * C + c]) - rmean, gv = double(gy[r * C + c]);
      rss += e * e; rdy += gv; rdyx += gv * (double(x[r * C + c]) - double(mu0));
    }
    if (n[c] != double(R) || std::fabs(mean[c] - rmean) > (sizeof(S) == 8 ? 1e-12 * (1 + std::fabs(rmean)) : 2e-6) ||
        std::fabs(m2[c] - rss) > tol * rss || std::fabs(sdy[c] - rdy) > tol * R ||
        std::fabs(sdyx[c] - rdyx) > tol * R * 4) {
      if (bad++ < 5) std::printf("FAIL bn nhwc c%ld: n %g/%ld mean %.9g/%.9g var %g/%g sdy %g/%g "
                                 "sdyx %g/%g\n", long(c), n[c], long(R), mean[c], rmean,
                                 m2[c] / R, rss / R, sdy[c], rdy, sdyx[c], rdyx);
    }
  }
  std::printf("%s bn nhwc %s L%d N%ld C%ld S%ld shift %g: splits %u chunks %u cols %u rpi %u\n",
              bad ? "FAIL" : "ok  ", sizeof(S) == 8 ? "f64" : "f32", L, long(N), long(C),
              long(Sp), shift, g.splits, g.chunks, g.cols, g.rpi);
  return bad ? 1 : 0;
}

int main() {
  // The host replays cover the newest kernels (common.cuh: new_paths_enabled), whatever the caller set.
  setenv("FASTLAYERS_CUDA_NEW", "1", 1);
  int bad = 0;
  bad += check_fastdiv();
  for (int cl = 0; cl < 2; ++cl) {
    bad += check_pool<float>(2, 3, 11, 13, 3, 3, 2, 2, 1, 1, false, cl);   // resnet stem-like
    bad += check_pool<float>(2, 3, 11, 13, 3, 3, 2, 2, 1, 1, true, cl);    // ceil_mode
    bad += check_pool<float>(1, 2, 10, 9, 3, 2, 2, 3, 1, 1, true, cl);    // last window in padding
    bad += check_pool<double>(2, 5, 7, 8, 2, 2, 2, 2, 0, 0, false, cl);
    bad += check_pool<double>(1, 4, 9, 10, 3, 3, 1, 1, 1, 1, false, cl);  // stride < kernel
    bad += check_pool<float>(2, 3, 17, 15, 5, 4, 3, 2, 2, 2, true, cl);   // overlap, odd
    bad += check_pool<float>(1, 2, 13, 12, 2, 3, 3, 4, 1, 1, true, cl);   // stride > kernel
    bad += check_pool<float>(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, false, cl);
    bad += check_pool<float>(1, 3, 6, 5, 4, 4, 1, 2, 2, 2, true, cl);
    bad += check_pool<double>(2, 2, 19, 6, 7, 1, 5, 1, 3, 0, true, cl);
    bad += check_pool<float>(1, 2, 12, 16, 3, 3, 2, 2, 0, 0, false, cl);   // k3s2 without padding
    bad += check_pool<float>(1, 2, 12, 16, 3, 3, 2, 2, 0, 0, true, cl);
    bad += check_pool<float>(2, 2, 9, 8, 3, 3, 2, 2, 1, 1, true, cl);     // W % 4 == 0: 16-byte stores
    bad += check_pool<double>(1, 3, 14, 20, 3, 3, 2, 2, 1, 1, false, cl);
    bad += check_pool<float>(1, 2, 3, 2, 3, 3, 2, 2, 1, 1, true, cl);     // tiny: one window
  }
  bad += check_bn<float>(3, 5, 12, false);
  bad += check_bn<float>(4, 3, 4 * 37, false);
  bad += check_bn<float>(32, 2, 112 * 112, false);
  bad += check_bn<double>(3, 7, 10, false);
  bad += check_bn<float>(5, 1, 4096 * 3 + 4, false);    // uneven splits
  bad += check_bn<double>(3, 2, 4096 * 5 + 2, false);
  bad += check_bn<float>(3, 8, 7, true);
  bad += check_bn<double>(2, 6, 5, true);
  bad += check_bn_nhwc<float, 1>(4, 3, 37, 100.0);
  bad += check_bn_nhwc<float, 4>(4, 16, 33, 100.0);
  bad += check_bn_nhwc<float, 4>(2, 64, 300, 1000.0);
  bad += check_bn_nhwc<float, 4>(3, 100, 50, 100.0);      // 25 units: 10 rows per iteration
  bad += check_bn_nhwc<float, 1>(3, 100, 50, 0.0);
  bad += check_bn_nhwc<float, 4>(2, 1028, 9, 5.0);        // 257 units: two chunks
  bad += check_bn_nhwc<float, 1>(1, 300, 7, 5.0);         // 300 units: two chunks, last partial
  bad += check_bn_nhwc<double, 2>(2, 6, 41, 100.0);
  bad += check_bn_nhwc<double, 1>(1, 5, 1000, 100.0);
  bad += check_bn_nhwc<float, 4>(64, 16, 64, 100.0);      // many splits
  bad += check_bn_nhwc<double, 2>(16, 8, 4096, 1e4);      // large shift in double
  {  // the float32 planner's tile choices (those kernels run on a GPU only)
    const GemmPlan a = plan_gemm(64, 576, 100352, 1, DType::F32);  // conv wgrad: split, 64x128
    const GemmPlan b = plan_gemm(128, 1024, 1024, 1, DType::F32);  // 64x128 would halve the blocks
    const GemmPlan c = plan_gemm(512, 1024, 1024, 1, DType::F32);  // Linear: split, 64x128
    const GemmPlan e = plan_gemm(4096, 4096, 4096, 1, DType::F32); // 128x128, no split
    const bool ok = a.cfg == 3 && a.splits > 1 && b.cfg == 0 && c.cfg == 3 && c.splits > 1 &&
                    e.cfg == 1 && e.splits == 1;
    std::printf("%s float32 GEMM plans: wgrad cfg %d x%d, 128x1024x1024 cfg %d x%d, "
                "512x1024x1024 cfg %d x%d, 4096^3 cfg %d x%d\n", ok ? "ok  " : "FAIL", a.cfg,
                a.splits, b.cfg, b.splits, c.cfg, c.splits, e.cfg, e.splits);
    bad += !ok;
  }
  {  // the pivot: row 0's value when finite, else 0
    const float pv[4] = {3.5f, INFINITY, -INFINITY, NAN};
    const bool ok = bn_nhwc_pivot(pv, 0) == 3.5f && bn_nhwc_pivot(pv, 1) == 0.f &&
                    bn_nhwc_pivot(pv, 2) == 0.f && bn_nhwc_pivot(pv, 3) == 0.f;
    std::printf("%s bn nhwc pivot of finite / inf / -inf / nan\n", ok ? "ok  " : "FAIL");
    bad += !ok;
  }
  bad += check(2, 3, 9, 11, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, false, false, false);
  bad += check(2, 4, 10, 7, 6, 3, 2, 2, 1, 1, 0, 1, 2, 2, false, false, false);
  bad += check(2, 4, 10, 7, 6, 3, 2, 2, 1, 1, 0, 1, 2, 2, true, false, true);
  bad += check(1, 6, 8, 8, 6, 3, 3, 2, 2, 1, 1, 1, 1, 6, true, true, true);
  bad += check(3, 5, 12, 13, 7, 5, 5, 3, 2, 2, 2, 2, 1, 1, false, true, false);
  bad += check(2, 8, 6, 6, 16, 1, 1, 1, 1, 0, 0, 1, 1, 4, true, false, false);
  bad += check(1, 2, 5, 5, 2, 5, 5, 1, 1, 0, 0, 1, 1, 1, false, false, false);
  // tests/test_cuda.py::test_gradcheck's conv (groups 2, stride 2x1, pad 1x0, dilation 1x2).
  bad += check(2, 4, 6, 7, 4, 3, 2, 2, 1, 1, 0, 1, 2, 2, false, false, false);
  bad += check(2, 4, 6, 7, 4, 3, 2, 2, 1, 1, 0, 1, 2, 2, true, false, true);
  // The grouped conv of test_modules_match_torch_nn_on_cuda (16 -> 8, 3x3, pad 1, groups 2).
  bad += check(8, 16, 8, 8, 8, 3, 3, 1, 1, 1, 1, 1, 1, 2, false, false, false);
  bad += check(8, 16, 8, 8, 8, 3, 3, 1, 1, 1, 1, 1, 1, 2, true, false, true);
  // Split-K weight gradients (emulated tiles): the net's first conv (2 splits), and
  // grouped with stride/dilation (workspace indexed by blockIdx.z = g * splits + split).
  bad += check(8, 3, 16, 16, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1, false, false, false);
  bad += check(8, 4, 32, 32, 4, 3, 3, 1, 1, 1, 1, 1, 1, 2, true, false, true);
  bad += check(4, 6, 45, 47, 9, 3, 2, 2, 1, 1, 0, 1, 2, 3, false, true, false);
  // Planner: splits and workspace for the benchmark shapes.
  struct Case { const char* what; int64_t M, N, K, G; DType dt; };
  const Case cases[] = {
      {"gemm 4096^3 f32", 4096, 4096, 4096, 1, DType::F32},
      {"gemm 4096^3 bf16", 4096, 4096, 4096, 1, DType::BF16},
      {"conv fwd 32x64x56x56", 64, 32 * 56 * 56, 576, 1, DType::F32},
      {"conv wgrad 32x64x56x56", 64, 576, 32 * 56 * 56, 1, DType::F32},
      {"linear wgrad 1024x1024, K=512", 1024, 1024, 512, 1, DType::F32},
      {"linear wgrad 40x24, K=8192", 40, 24, 8192, 1, DType::F32},
      {"K = 0", 5, 7, 0, 1, DType::F64},
  };
  for (const Case& c : cases) {
    const GemmPlan p = plan_gemm(c.M, c.N, c.K, c.G, c.dt);
    std::printf("plan %-32s cfg %d tile %ldx%ldx%ld splits %d kchunk %ld ws %ld B\n", c.what,
                p.cfg, long(p.BM), long(p.BN), long(p.BK), p.splits, long(p.kchunk),
                long(p.ws_bytes));
    if (p.splits < 1 || (int64_t)p.splits * p.kchunk < c.K || (p.splits > 1 && p.ws_bytes <= 0)) {
      std::printf("FAIL plan\n");
      ++bad;
    }
  }
  std::printf(bad ? "host_check: %d FAILURES\n" : "host_check: all OK\n", bad);
  return bad ? 1 : 0;
}
