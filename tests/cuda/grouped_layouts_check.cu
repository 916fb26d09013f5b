// Host-side check of the operand layouts of csrc/gemm/grouped_gemm.cuh (run by
// tests/test_cuda_host_checks.py; nvcc, no GPU). grouped_gemm_args.cu writes ONE int64 per
// operand and problem into the argument buffer, which CUTLASS reads as the kernel's
// InternalStride type; the sm90 ptr-array mainloop builds its TMA tensors as
// make_tensor(ptr_A, (M, K, 1), dA[g]) and make_tensor(ptr_B, (N, K, 1), dB[g]), the epilogue
// D as (M, N, 1). This program takes the
// stride types of every kernel of the table (GROVE_FOR_EACH_GEMM_KERNEL), fills them the way
// the device does (the int64 copied into the struct) and checks every element's offset against
// the torch tensors of grove_cuda.h's contract:
//   m_grouped_nt[_swiglu]  A [M, K] rows (lda)   B = w [N, K] (ldb)        D [M, N] rows (ldd)
//   m_grouped_nn           A [M, K] rows (lda)   B = w [K, N] (ldb)        D [M, N] rows (ldd)
//   k_grouped_tn           A = rows of [K, M]    B = rows of [K, N] (ldb)  D [M, N] (ldd)
// Exit status 0 when every check passes.
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "grouped_gemm.cuh"

namespace {

using namespace cute;

int failures = 0;

template <class Stride>
Stride from_int64(int64_t ld) {  // what the kernel sees after grouped_gemm_args.cu wrote `ld`
  static_assert(sizeof(Stride) == sizeof(int64_t), "one int64 per stride");
  Stride s;
  std::memcpy(&s, &ld, sizeof(ld));
  return s;
}

template <class Stride, class Want>
void check(const char* name, const char* operand, int rows, int cols, int64_t ld, Want want) {
  auto layout = make_layout(make_shape(rows, cols, Int<1>{}), from_int64<Stride>(ld));
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) {
      const int64_t got = layout(i, j, 0), w = want(i, j);
      if (got != w && ++failures <= 20)
        std::printf("FAIL %s %s (%d, %d): offset %lld, want %lld\n", name, operand, i, j,
                    (long long)got, (long long)w);
    }
}

template <class Cfg>
void check_layout(const char* name) {
  using Kernel = typename Cfg::Kernel;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  const int M = 5, N = 24, K = 16;
  const int64_t lda = 40, ldb = 48, ldd = 56;  // padded: a wrong mode shows up
  if (Cfg::kLayout == GROVE_GEMM_K_GROUPED_TN) {
    check<StrideA>(name, "A", M, K, lda, [&](int m, int k) { return k * lda + m; });
    check<StrideB>(name, "B", N, K, ldb, [&](int n, int k) { return k * ldb + n; });
  } else {
    check<StrideA>(name, "A", M, K, lda, [&](int m, int k) { return m * lda + k; });
    if (Cfg::kLayout == GROVE_GEMM_M_GROUPED_NN)
      check<StrideB>(name, "B", N, K, ldb, [&](int n, int k) { return k * ldb + n; });
    else
      check<StrideB>(name, "B", N, K, ldb, [&](int n, int k) { return n * ldb + k; });
  }
  check<StrideD>(name, "D", M, N, ldd, [&](int m, int n) { return m * ldd + n; });
  std::printf("%s: checked\n", name);
}

}  // namespace

int main() {
#define GROVE_CHECK_LAYOUT(NAME, DTYPE, LAYOUT, SCHEDULE, BM, BN, BK, CM, CN) \
  check_layout<grove::GroupedGemm<DTYPE, LAYOUT, SCHEDULE, BM, BN, BK, CM, CN>>(#NAME);
  GROVE_FOR_EACH_GEMM_KERNEL(GROVE_CHECK_LAYOUT)
#undef GROVE_CHECK_LAYOUT
  if (failures) std::printf("%d failures\n", failures);
  else std::printf("OK\n");
  return failures ? 1 : 0;
}
