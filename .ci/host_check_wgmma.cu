// Host replay of the wgmma GEMM's index maps (csrc/cuda/gemm_wgmma.cuh), no GPU
// needed: the kernel's own Copies (chunk -> swizzled shared offset, source
// offset, zero-fill sizes), grouped rasterisation, the K-tile ring order and
// the accumulator / epilogue maps drive a model of cp.async and of wgmma's
// shared-memory read through a SWIZZLE_128B K-major descriptor, written from
// the PTX ISA (logical byte address start + (row / 8) * SBO + (row % 8) * 128
// + 2 k, then bits [4,7) ^= bits [7,10)); the result is compared with a direct
// loop (small integers: exact). Also checks that every C element is written
// exactly once and that wgmma never reads a shared byte that was not written
// for the current K tile. The descriptor's hardware semantics themselves can
// only be checked on the GPU (tests/test_cuda_wgmma.py).
//   nvcc -std=c++17 -Icsrc .ci/host_check_wgmma.cu -o /tmp/hc_wg && /tmp/hc_wg
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/gemm_wgmma.cuh"

using namespace fastlayers::cuda;
using namespace fastlayers::cuda::wg;

static std::mt19937 rng(11);
static int failures = 0;

// The byte wgmma reads for (row, k) of a k16 step whose descriptor starts at `start`.
static uint32_t wgmma_byte(uint32_t start, int row, int k) {
  uint32_t a = start + uint32_t(row / 8) * 1024 + uint32_t(row % 8) * 128 + uint32_t(2 * k);
  return a ^ (((a >> 7) & 7) << 4);
}

template <class CF>
static void run(int64_t M, int64_t N, int64_t K, int64_t padA, int64_t padB, bool bias) {
  const int64_t lda = ((K + 7) / 8) * 8 + padA, ldb = ((K + 7) / 8) * 8 + padB;
  std::vector<float> A(M * lda, -99.f), B(N * ldb, -99.f), bn(N);   // padding: poison
  for (int64_t i = 0; i < M; ++i) for (int64_t k = 0; k < K; ++k) A[i * lda + k] = float(int(rng() % 7) - 3);
  for (int64_t j = 0; j < N; ++j) for (int64_t k = 0; k < K; ++k) B[j * ldb + k] = float(int(rng() % 7) - 3);
  for (auto& v : bn) v = float(int(rng() % 5) - 2);
  std::vector<float> C(M * N, 0.f);
  std::vector<int> written(M * N, 0);
  const int64_t sA = M == 1 ? 0 : lda, sB = N == 1 ? 0 : ldb;
  const int64_t tiles_m = ceil_div(M, kBM), tiles_n = ceil_div(N, CF::BN);
  const int64_t ktiles = ceil_div(K, kBK);
  int bad_read = 0, bad_val = 0;
  // Shared stage (elements as floats at byte offset / 2) and the K tile that wrote each byte.
  std::vector<float> sm(CF::STAGE_BYTES / 2);
  std::vector<int64_t> stamp(CF::STAGE_BYTES / 2);
  for (int64_t id = 0; id < tiles_m * tiles_n; ++id) {
    int64_t tm, tn;
    tc::raster(id, tiles_m, tiles_n, tm, tn);
    const int64_t m0 = tm * kBM, n0 = tn * CF::BN;
    std::vector<double> acc(kThreads * CF::ACC, 0.0);
    std::fill(stamp.begin(), stamp.end(), -1);
    for (int64_t kt = 0; kt < ktiles; ++kt) {
      // cp.async of every thread (one stage modelled: the ring only changes which stage).
      for (int tid = 0; tid < kThreads; ++tid) {
        Copies<CF> cp;
        cp.init(tid, m0, n0, M, N, K, sA, sB);
        cp.tile(kt * kBK, [&](bool b, uint32_t dst, int64_t src, int bytes) {
          if (dst % 16 || dst + 16 > uint32_t(CF::STAGE_BYTES)) { ++bad_read; return; }
          const std::vector<float>& G = b ? B : A;
          for (int e = 0; e < 8; ++e) {
            sm[dst / 2 + e] = 2 * e < bytes ? G[src + e] : 0.f;
            stamp[dst / 2 + e] = kt;
          }
        });
      }
      // wgmma: warpgroup g, k16 step kk; A rows g*64.., B rows 0..BN-1.
      for (int g = 0; g < 2; ++g)
        for (int kk = 0; kk < kBK / 16; ++kk) {
          const uint32_t sa = uint32_t(g * 64 * kRowBytes + 32 * kk), sb = uint32_t(CF::A_BYTES + 32 * kk);
          if (make_desc(sa) - make_desc(0) != sa / 16) ++bad_read;   // start-address field
          for (int t = 0; t < 128; ++t)
            for (int j = 0; j < CF::BN / 8; ++j)
              for (int e = 0; e < 4; ++e) {
                const int r = acc_row(t, e), col = acc_col(t, j, e);
                double s = 0;
                for (int k = 0; k < 16; ++k) {
                  const uint32_t ba = wgmma_byte(sa, r, k), bb = wgmma_byte(sb, col, k);
                  if (stamp[ba / 2] != kt || stamp[bb / 2] != kt) { ++bad_read; continue; }
                  s += double(sm[ba / 2]) * sm[bb / 2];
                }
                acc[(g * 128 + t) * CF::ACC + 4 * j + e] += s;
              }
        }
    }
    // Epilogue map (as in the kernel): d[4 j + e] -> (64 g + acc_row, acc_col).
    for (int tid = 0; tid < kThreads; ++tid) {
      const int g = tid / 128, t = tid % 128;
      for (int j = 0; j < CF::BN / 8; ++j)
        for (int e = 0; e < 4; ++e) {
          const int64_t i = m0 + 64 * g + acc_row(t, e), jj = n0 + acc_col(t, j, e);
          if (i >= M || jj >= N) continue;
          C[i * N + jj] = float(acc[tid * CF::ACC + 4 * j + e]) + (bias ? bn[jj] : 0.f);
          ++written[i * N + jj];
        }
    }
  }
  int bad_write = 0;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double ref = bias ? bn[j] : 0.0;
      for (int64_t k = 0; k < K; ++k) ref += double(A[i * lda + k]) * B[j * ldb + k];
      if (written[i * N + j] != 1) ++bad_write;
      else if (C[i * N + j] != float(ref)) ++bad_val;
    }
  const bool ok = !bad_read && !bad_val && !bad_write;
  std::printf("  BN=%d M=%lld N=%lld K=%lld lda=%lld ldb=%lld: %s (bad reads %d, values %d, writes %d)\n",
              CF::BN, (long long)M, (long long)N, (long long)K, (long long)lda, (long long)ldb,
              ok ? "ok" : "FAIL", bad_read, bad_val, bad_write);
  if (!ok) ++failures;
}

int main() {
  // Swizzle sanity: every 16-byte chunk of an 8-row atom is hit exactly once.
  int hits[64] = {};
  for (int r = 0; r < 8; ++r) for (int c = 0; c < 8; ++c) ++hits[swz(r, c) / 16];
  for (int h : hits) if (h != 1) { std::printf("swz is not a permutation\n"); return 1; }
  run<CfgSmall>(128, 128, 64, 0, 0, false);
  run<CfgSmall>(129, 130, 72, 8, 0, true);
  run<CfgSmall>(1, 5, 12, 0, 8, true);
  run<CfgSmall>(200, 40, 200, 0, 16, false);
  run<CfgBig>(128, 256, 64, 0, 0, true);
  run<CfgBig>(130, 257, 136, 8, 8, false);
  run<CfgBig>(37, 300, 13, 0, 0, true);
  run<CfgBig>(300, 20, 70, 0, 0, true);   // several tile rows, one tile column (raster groups)
  std::printf(failures ? "host_check_wgmma: FAILURES\n" : "host_check_wgmma: all OK\n");
  return failures ? 1 : 0;
}
