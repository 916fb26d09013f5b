// Host-side check of csrc/gemm/swiglu_epilogue.cuh (run by tests/test_cuda_host_checks.py;
// needs nvcc, no GPU). For each fused GEMM-1 kernel of the table (GROVE_FOR_EACH_GEMM_KERNEL,
// layout M_GROUPED_NT_SWIGLU: the template arguments of its instantiation) it runs the
// epilogue's per-tile operator on the host for every MMA thread of every tile of several
// problems, with each thread's accumulator fragment filled from the coordinates the kernel's
// TiledMma gives it, and checks:
//   - the pairing the epilogue assumes (fragment entry i + 4 is column + 8 of entry i, i + 1 is
//     column + 1, gate columns have (n / 8) even),
//   - D[m, 8q + r] == silu(acc[m, 16q + r]) * acc[m, 16q + 8 + r] for every m < M, every output
//     column, bit for bit with the same conversion,
//   - nothing outside [M, N / 2] is written (row padding and the problem's neighbours stay
//     poisoned), and problem l's pointer / stride are the ones used.
// Exit status 0 when every check passes; the first failures are printed.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "grouped_gemm.cuh"

namespace {

using namespace cute;

float acc_value(int m, int n) {
  // Deterministic, sign-varying, spread over [-4, 4): exercises both silu tails.
  const uint32_t h = (uint32_t(m) * 2654435761u) ^ (uint32_t(n) * 40503u + 977u);
  return float(int(h % 8001u) - 4000) / 1000.f;
}

template <class Element>
uint16_t bits(Element v) {
  uint16_t b;
  std::memcpy(&b, &v, 2);
  return b;
}

int failures = 0;
void fail(const char* cfg, const char* what, int M, int N, int a, int b, int c) {
  if (++failures <= 20)
    std::printf("FAIL %s M=%d N=%d: %s (%d, %d, %d)\n", cfg, M, N, what, a, b, c);
}

template <class Cfg>
void check_config(const char* name) {
  using Kernel = typename Cfg::Kernel;
  using TiledMma = typename Kernel::CollectiveMainloop::TiledMma;
  using TileShape = typename Kernel::TileShape;
  using Epi = typename Kernel::CollectiveEpilogue;
  using Element = typename Cfg::Element;
  using StrideD = typename Epi::InternalStrideD;
  constexpr int BM = size<0>(TileShape{});
  constexpr int BN = size<1>(TileShape{});
  TiledMma mma;
  const int threads = size(mma);
  const uint16_t poison = 0x5a5a;  // far outside any output here (|silu(g) u| < 20)

  // (M, N): 1 row, rows not a tile multiple, N below / above / not a multiple of the tile.
  const int problems[][2] = {{1, 16}, {77, 48}, {BM, BN}, {2 * BM + 5, BN + 32}, {BM + 1, 2 * BN}};
  int checked = 0;
  for (const auto& pr : problems) {
    const int M = pr[0], N = pr[1], W = N / 2;
    auto bad = [&](const char* what, int a, int b, int c) { fail(name, what, M, N, a, b, c); };
    const int64_t ldd = W + 8;
    // Problem 1 of two: its D lies between guard rows, problem 0's pointer must not be used.
    std::vector<uint16_t> buf((M + 2) * ldd, poison), other(ldd, poison);
    Element* ptrs[2] = {reinterpret_cast<Element*>(other.data()),
                        reinterpret_cast<Element*>(buf.data() + ldd)};
    StrideD strides[2] = {StrideD{int64_t(1), Int<1>{}, Int<0>{}},
                          StrideD{ldd, Int<1>{}, Int<0>{}}};
    typename Epi::Params params;
    params.ptr_D = ptrs;
    params.dD = strides;
    Epi epi(params);
    const int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
    for (int tm = 0; tm < tiles_m; ++tm)
      for (int tn = 0; tn < tiles_n; ++tn)
        for (int t = 0; t < threads; ++t) {
          auto acc = partition_fragment_C(mma, take<0, 2>(TileShape{}));
          auto coord = local_tile(make_identity_tensor(make_shape(M, N)), take<0, 2>(TileShape{}),
                                  make_coord(tm, tn));
          auto tc = mma.get_thread_slice(t).partition_C(coord);
          for (int i = 0; i < size(acc); ++i) {
            const int m = get<0>(tc(i)), n = get<1>(tc(i));
            acc(i) = (m < M && n < N) ? acc_value(m, n) : 3.f;  // outside: finite, written if used
            const int g = i % 8;
            if (g < 4) {
              const int m4 = get<0>(tc(i + 4)), n4 = get<1>(tc(i + 4));
              if (m4 != m || n4 != n + 8 || (n & 8)) bad("gate/up pairing", t, i, n);
            }
            if (g % 2 == 0) {
              const int m1 = get<0>(tc(i + 1)), n1 = get<1>(tc(i + 1));
              if (m1 != m || n1 != n + 1) bad("column pair", t, i, n);
            }
          }
          epi(make_shape(M, N, 64, 1), TileShape{}, make_coord(tm, tn, _, 1), acc, mma,
              make_tuple(0, 0, 0), t, nullptr);
        }
    cutlass::NumericConverter<Element, float> to_element;
    for (int m = -1; m <= M; ++m)
      for (int j = 0; j < ldd; ++j) {
        const uint16_t got = buf[(m + 1) * ldd + j];
        if (m < 0 || m == M || j >= W) {
          if (got != poison) bad("write outside D", m, j, got);
          continue;
        }
        const int n = (j / 8) * 16 + j % 8;
        const float gate = acc_value(m, n), up = acc_value(m, n + 8);
        const uint16_t want = bits(to_element(gate / (1.f + std::exp(-gate)) * up));
        if (got != want) bad("value", m, j, got);
        ++checked;
      }
    for (uint16_t v : other)
      if (v != poison) bad("wrote through another problem's pointer", M, N, v);
  }
  std::printf("%s: %d threads, %d outputs checked\n", name, threads, checked);
}

// Instantiates the check only for the fused kernels of the table.
template <int Layout, class Cfg>
void check_if_fused(const char* name) {
  if constexpr (Layout == GROVE_GEMM_M_GROUPED_NT_SWIGLU) check_config<Cfg>(name);
}

}  // namespace

int main() {
#define GROVE_CHECK_FUSED(NAME, DTYPE, LAYOUT, SCHEDULE, BM, BN, BK, CM, CN) \
  check_if_fused<LAYOUT, grove::GroupedGemm<DTYPE, LAYOUT, SCHEDULE, BM, BN, BK, CM, CN>>(#NAME);
  GROVE_FOR_EACH_GEMM_KERNEL(GROVE_CHECK_FUSED)
#undef GROVE_CHECK_FUSED
  if (failures) std::printf("%d failures\n", failures);
  else std::printf("OK\n");
  return failures ? 1 : 0;
}
