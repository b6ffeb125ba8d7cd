// Host replay of the tensor-core GEMM (csrc/cuda/gemm_tc.cuh), no GPU needed:
// the kernel's own index maps (Loader chunk mapping and zero-fill sizes, shared
// tile layouts, ldmatrix row addresses, grouped rasterisation) drive a model of
// cp.async, ldmatrix(.trans) and mma.m16n8k16 written from the PTX ISA fragment
// tables, then the epilogue map; the result is compared with a direct loop
// (small integer values: exact in float). Also checks that every C element is
// written exactly once, that no unwritten (padding) shared element is read,
// and that every ldmatrix phase hits 8 distinct 16-byte bank groups.
//   nvcc -std=c++17 -Icsrc .ci/host_check_gemm_tc.cu -o /tmp/hc_tc && /tmp/hc_tc
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda/gemm_tc.cuh"

using namespace fastlayers::cuda;
using namespace fastlayers::cuda::tc;

static std::mt19937 rng(7);
static int failures = 0;

// Model of ldmatrix.x4 for one warp: row[l] = element offset supplied by lane
// l; out[lane][j][0..1] = the two 16-bit values of register j of that lane.
static void ldmatrix(const std::vector<float>& sm, const int (&row)[32], bool trans,
                     float (&out)[32][4][2], int& conflicts) {
  for (int j = 0; j < 4; ++j) {
    bool used[8] = {};
    for (int r = 0; r < 8; ++r) {
      const int bank = (row[8 * j + r] * 2 / 16) % 8;
      if (used[bank]) ++conflicts;
      used[bank] = true;
      if (row[8 * j + r] % 8) ++conflicts;   // rows must be 16-byte aligned
    }
    for (int t = 0; t < 32; ++t)
      for (int h = 0; h < 2; ++h)
        out[t][j][h] = trans ? sm[row[8 * j + 2 * (t % 4) + h] + t / 4]
                             : sm[row[8 * j + t / 4] + 2 * (t % 4) + h];
  }
}

// Model of mma.m16n8k16.row.col (fp32 accumulate) for one warp.
static void mma(float (&d)[32][4], const float (&a)[32][4][2], const float (&b)[32][2][2]) {
  double A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = a[l][0][h];
      A[g + 8][2 * t + h] = a[l][1][h];
      A[g][2 * t + 8 + h] = a[l][2][h];
      A[g + 8][2 * t + 8 + h] = a[l][3][h];
      B[2 * t + h][g] = b[l][0][h];
      B[2 * t + 8 + h][g] = b[l][1][h];
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 4; ++e) {
      const int r = g + (e / 2) * 8, c = 2 * t + e % 2;
      double s = 0;
      for (int k = 0; k < 16; ++k) s += A[r][k] * B[k][c];
      d[l][e] += float(s);
    }
  }
}

struct Mat {   // rows x cols, element (r, c) at r * rs + c * cs, in a buffer of `size`
  int64_t rows, cols, rs, cs;
  std::vector<float> buf;
  float& at(int64_t r, int64_t c) { return buf[r * rs + c * cs]; }
};
static Mat make(int64_t rows, int64_t cols, int64_t rs, int64_t cs, bool fill) {
  Mat m{rows, cols, rs, cs, {}};
  m.buf.assign((rows - 1) * rs + (cols - 1) * cs + 1, 0.f);
  std::uniform_int_distribution<int> d(-3, 3);
  if (fill) for (auto& x : m.buf) x = float(d(rng));   // padding too: must never be used
  return m;
}

template <class CF, bool A_KC, bool B_KC>
static void run(int64_t M, int64_t N, int64_t K, int64_t padA, int64_t padB, bool c_t,
                bool accumulate, bool bias) {
  using L = Layout<CF, A_KC, B_KC>;
  using TA = typename L::TA;
  using TB = typename L::TB;
  // A: K-contiguous [m][k] with row pitch K + padA, or [k][m] with pitch M + padA;
  // padA / padB: extra elements beyond rounding the pitch up to a multiple of 8.
  auto pad8 = [](int64_t n, int64_t extra) { return (8 - n % 8) % 8 + extra; };
  padA = pad8(A_KC ? K : M, padA);
  padB = pad8(B_KC ? K : N, padB);
  Mat A = A_KC ? make(M, K, K + padA, 1, true) : make(M, K, 1, M + padA, true);
  Mat B = B_KC ? make(K, N, 1, K + padB, true) : make(K, N, N + padB, 1, true);
  Mat C = c_t ? make(M, N, 1, M, accumulate) : make(M, N, N, 1, accumulate);
  std::vector<float> bm(M), bn(N);
  for (auto& x : bm) x = float(int(rng() % 5) - 2);
  for (auto& x : bn) x = float(int(rng() % 5) - 2);
  std::vector<double> ref(M * N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += double(A.at(i, k)) * B.at(k, j);
      if (accumulate) s += C.at(i, j);
      if (bias) s += bm[i] + bn[j];
      ref[i * N + j] = s;
    }

  int64_t sA = -1, sB = -1;
  const int ua = unit_dim(M, K, A.rs, A.cs, &sA), ub = unit_dim(K, N, B.rs, B.cs, &sB);
  const bool ok_layout = ua == (A_KC ? 1 : 2) || (M == 1 || K == 1);
  const bool ok_layout_b = ub == (B_KC ? 2 : 1) || (N == 1 || K == 1);
  if (!ua || !ub || !ok_layout || !ok_layout_b) {
    std::printf("FAIL unit_dim M=%lld N=%lld K=%lld ua=%d ub=%d\n", (long long)M, (long long)N,
                (long long)K, ua, ub);
    ++failures;
    return;
  }
  if (M > 1 && K > 1) sA = A_KC ? A.rs : A.cs;   // the layout under test
  if (N > 1 && K > 1) sB = B_KC ? B.cs : B.rs;

  const int64_t tiles_m = ceil_div(M, CF::BM), tiles_n = ceil_div(N, CF::BN);
  std::vector<int> written(M * N, 0), visited(tiles_m * tiles_n, 0);
  const float NaN = std::nanf("");
  int conflicts = 0, bad = 0;
  for (int64_t id = 0; id < tiles_m * tiles_n; ++id) {
    int64_t tm, tn;
    raster(id, tiles_m, tiles_n, tm, tn);
    if (tm < 0 || tm >= tiles_m || tn < 0 || tn >= tiles_n) { ++bad; continue; }
    ++visited[tm * tiles_n + tn];
    const int64_t m0 = tm * CF::BM, n0 = tn * CF::BN;
    std::vector<float> smA(CF::STAGES * L::A_STAGE, NaN), smB(CF::STAGES * L::B_STAGE, NaN);
    std::vector<Loader<float, TA, A_KC>> la(kThreads);
    std::vector<Loader<float, TB, B_KC>> lb(kThreads);
    for (int tid = 0; tid < kThreads; ++tid) {
      la[tid].init(A.buf.data(), sA, m0, M, tid);
      lb[tid].init(B.buf.data(), sB, n0, N, tid);
    }
    auto copy_into = [&](std::vector<float>& sm, int stage_off, const std::vector<float>& src_buf) {
      return [&sm, stage_off, &src_buf, &bad](int off, const float* src, int bytes) {
        if (bytes % 2 || bytes < 0 || bytes > 16) ++bad;
        const int64_t s = src - src_buf.data();
        for (int e = 0; e < 8; ++e) {
          float v = 0.f;
          if (e < bytes / 2) {
            if (s + e < 0 || s + e >= int64_t(src_buf.size())) { ++bad; continue; }
            v = src_buf[s + e];
          }
          sm[stage_off + off + e] = v;
        }
        if (bytes && s % 8) ++bad;   // 16-byte aligned source (buffer base aligned)
      };
    };
    auto load_tile = [&](int stage, int64_t kt) {
      for (int tid = 0; tid < kThreads; ++tid) {
        la[tid].load(K - kt * CF::BK, tid, copy_into(smA, stage * L::A_STAGE, A.buf));
        lb[tid].load(K - kt * CF::BK, tid, copy_into(smB, stage * L::B_STAGE, B.buf));
      }
    };
    static float acc[8][CF::MI][CF::NI][32][4];
    for (auto& w : acc) for (auto& x : w) for (auto& y : x) for (auto& z : y) for (auto& e : z) e = 0;

    const int64_t ktiles = (K + CF::BK - 1) / CF::BK;
    for (int s = 0; s < CF::STAGES - 1; ++s)
      if (s < ktiles) load_tile(s, s);
    int rd = 0, wr = CF::STAGES - 1;
    for (int64_t kt = 0; kt < ktiles; ++kt) {
      const int64_t kn = kt + CF::STAGES - 1;
      if (kn < ktiles) load_tile(wr, kn);
      for (int warp = 0; warp < 8; ++warp) {
        const int wm0 = (warp / CF::WARPS_N) * CF::WM, wn0 = (warp % CF::WARPS_N) * CF::WN;
        for (int kk = 0; kk < CF::BK; kk += 16) {
          float af[CF::MI][32][4][2], bf[CF::NI / 2][32][4][2];
          for (int mi = 0; mi < CF::MI; ++mi) {
            int row[32];
            for (int l = 0; l < 32; ++l) row[l] = rd * L::A_STAGE + L::a_ldsm(l, wm0, mi, kk);
            ldmatrix(smA, row, !A_KC, af[mi], conflicts);
          }
          for (int p = 0; p < CF::NI / 2; ++p) {
            int row[32];
            for (int l = 0; l < 32; ++l) row[l] = rd * L::B_STAGE + L::b_ldsm(l, wn0, p, kk);
            ldmatrix(smB, row, !B_KC, bf[p], conflicts);
          }
          for (int mi = 0; mi < CF::MI; ++mi)
            for (int ni = 0; ni < CF::NI; ++ni) {
              float b2[32][2][2];
              for (int l = 0; l < 32; ++l)
                for (int h = 0; h < 2; ++h) {
                  b2[l][0][h] = bf[ni / 2][l][(ni % 2) * 2][h];
                  b2[l][1][h] = bf[ni / 2][l][(ni % 2) * 2 + 1][h];
                }
              float d[32][4];
              for (int l = 0; l < 32; ++l) for (int e = 0; e < 4; ++e) d[l][e] = acc[warp][mi][ni][l][e];
              mma(d, af[mi], b2);
              for (int l = 0; l < 32; ++l) for (int e = 0; e < 4; ++e) acc[warp][mi][ni][l][e] = d[l][e];
            }
        }
      }
      rd = rd + 1 == CF::STAGES ? 0 : rd + 1;
      wr = wr + 1 == CF::STAGES ? 0 : wr + 1;
    }
    // Epilogue map of the kernel.
    for (int warp = 0; warp < 8; ++warp) {
      const int wm0 = (warp / CF::WARPS_N) * CF::WM, wn0 = (warp % CF::WARPS_N) * CF::WN;
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        for (int mi = 0; mi < CF::MI; ++mi)
          for (int h = 0; h < 2; ++h) {
            const int64_t i = m0 + wm0 + mi * 16 + g + h * 8;
            if (i >= M) continue;
            for (int ni = 0; ni < CF::NI; ++ni)
              for (int e = 0; e < 2; ++e) {
                const int64_t j = n0 + wn0 + ni * 8 + 2 * t + e;
                if (j >= N) continue;
                float v = acc[warp][mi][ni][lane][2 * h + e];
                if (accumulate) v += C.at(i, j);
                if (bias) v += bm[i] + bn[j];
                C.at(i, j) = v;
                ++written[i * N + j];
              }
          }
      }
    }
  }
  int64_t wrong = 0, wrong_count = 0;
  for (int64_t q = 0; q < M * N; ++q) {
    if (written[q] != 1) ++wrong_count;
    if (!(double(C.at(q / N, q % N)) == ref[q])) ++wrong;
  }
  for (int v : visited) if (v != 1) ++bad;
  const bool fail = wrong || wrong_count || bad || conflicts;
  std::printf("%s BM=%d BN=%d A_%s B_%s M=%lld N=%lld K=%lld padA=%lld padB=%lld%s%s%s: "
              "wrong %lld, write-count errors %lld, bad copies/tiles %d, ldmatrix conflicts %d\n",
              fail ? "FAIL" : "ok  ", CF::BM, CF::BN, A_KC ? "kc" : "mc", B_KC ? "kc" : "nc",
              (long long)M, (long long)N, (long long)K, (long long)padA, (long long)padB,
              c_t ? " C^T" : "", accumulate ? " acc" : "", bias ? " bias" : "", (long long)wrong,
              (long long)wrong_count, bad, conflicts);
  if (fail) ++failures;
}

template <class CF>
static void all_layouts(int64_t M, int64_t N, int64_t K, int64_t padA, int64_t padB, bool c_t,
                        bool acc, bool bias) {
  run<CF, true, true>(M, N, K, padA, padB, c_t, acc, bias);
  run<CF, true, false>(M, N, K, padA, padB, c_t, acc, bias);
  run<CF, false, true>(M, N, K, padA, padB, c_t, acc, bias);
  run<CF, false, false>(M, N, K, padA, padB, c_t, acc, bias);
}

int main() {
  // Extra pads on top of the multiple-of-8 pitch gemm_tc requires.
  all_layouts<CfgSmall>(1, 1, 1, 0, 8, false, false, false);
  all_layouts<CfgSmall>(37, 29, 53, 0, 8, false, true, true);   // K % 8 != 0, M, N % 8 != 0
  all_layouts<CfgSmall>(129, 257, 72, 0, 0, true, false, true);
  all_layouts<CfgSmall>(128, 128, 64, 0, 0, false, false, false);
  all_layouts<CfgSmall>(3, 200, 8, 0, 0, false, true, false);
  all_layouts<CfgBig>(129, 257, 72, 8, 0, false, true, false);
  all_layouts<CfgBig>(200, 300, 100, 0, 0, false, false, true);
  all_layouts<CfgBig>(1100, 300, 40, 0, 0, true, false, false);  // > 8 tile rows: raster groups
  std::printf(failures ? "host_check_gemm_tc: %d FAILURES\n" : "host_check_gemm_tc: all OK\n", failures);
  return failures ? 1 : 0;
}
