// Host-side check of csrc/gemm/grouped_gemm_args.cu (run by tests/test_cuda_host_checks.py; nvcc,
// no GPU): the argument checks of every layout (GROVE_GEMM_*) and the per-problem arguments the
// fill kernel writes (shapes, A/B/D addresses, leading dimensions), computed on the host by the
// same function the kernel runs and compared with values derived from grove_cuda.h's contract.
// Operand addresses are fake (never dereferenced). Exit status 0 when every check passes.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../../csrc/gemm/grouped_gemm_args.cu"

namespace {

int failures = 0;
void expect(bool ok, const char* what, int layout, int p, long long got, long long want) {
  if (!ok && ++failures <= 30)
    std::printf("FAIL layout %d problem %d: %s: got %lld, want %lld\n", layout, p, what, got,
                want);
}

const char* fake(uintptr_t addr) { return reinterpret_cast<const char*>(addr); }

// Two sections (experts: 5 problems over 40 rows; adjugates: 3 problems over 24 rows) shaped
// as bindings.cpp builds them for `layout`.
std::vector<GroveGemmSection> sections(int layout) {
  const int P[2] = {5, 3}, R[2] = {40, 24}, N[2] = {96, 32}, K[2] = {64, 128}, M[2] = {48, 16};
  std::vector<GroveGemmSection> out(2);
  for (int s = 0; s < 2; ++s) {
    GroveGemmSection& g = out[s];
    g = GroveGemmSection{};
    g.a = fake(0x100000 * (s + 1));
    g.b = fake(0x10000000 * (s + 1));
    g.d = const_cast<char*>(fake(0x40000000 + 0x1000000 * s));
    g.rows = R[s];
    g.b_shared = 1;
    g.first_problem = s == 0 ? 0 : P[0];
    g.num_problems = P[s];
    g.row_base = s == 0 ? 0 : R[0];
    g.n = N[s];
    if (layout == GROVE_GEMM_K_GROUPED_TN) {  // a [R, M], b [R, N], d [P, M, N]
      g.m = M[s];
      g.lda = M[s];
      g.ldb = N[s];
      g.ldd = N[s];
      g.d_problem_stride = int64_t(M[s]) * N[s];
    } else {  // a [R, K]; m_grouped_nt[_swiglu] b [P, N, K], nn b [P, K, N]; d [R, N or N / 2]
      g.k = K[s];
      g.lda = K[s];
      g.ldb = layout == GROVE_GEMM_M_GROUPED_NN ? N[s] : K[s];
      g.b_problem_stride = int64_t(N[s]) * K[s];
      g.ldd = layout == GROVE_GEMM_M_GROUPED_NT_SWIGLU ? N[s] / 2 : N[s];
    }
  }
  return out;
}

// shared: b_shared of the second section (m-grouped): its 3 problems read B (j / shared).
template <typename Index>
void check_fill(int layout, int shared = 1) {
  std::vector<GroveGemmSection> secs = sections(layout);
  secs[1].b_shared = shared;
  const int P = 8;
  // Absolute plan rows: experts 0..39, adjugates 40..63. Problem 2 and 6 are empty; problem 4
  // is corrupt (starts past its section) and problem 7 overruns it: both are clamped.
  const Index start[P] = {0, 7, 7, 20, 90, 40, 52, 52};
  const Index count[P] = {7, 13, 0, 20, 5, 12, 0, 40};
  Sections packed;
  const int rc = check_sections(layout, secs.data(), 2, P, &packed);
  expect(rc == GROVE_OK, "check_sections", layout, -1, rc, GROVE_OK);
  std::vector<char> buf(grove_grouped_args_bytes(P));
  GroveGroupedArgsView v = grove_grouped_args_view(buf.data(), P);
  for (int p = 0; p < P; ++p) fill_problem(layout, packed, start, count, p, v);

  const int64_t want_row[P] = {0, 7, 7, 20, 0, 0, 12, 12};
  const int64_t want_rows[P] = {7, 13, 0, 20, 0, 12, 0, 12};
  for (int p = 0; p < P; ++p) {
    const int s = p < 5 ? 0 : 1;
    const GroveGemmSection& g = secs[s];
    const int64_t j = p - g.first_problem, row = want_row[p], rows = want_rows[p];
    const auto addr = [](const void* q) { return (long long)reinterpret_cast<uintptr_t>(q); };
    long long M, N = g.n, K, a, b, d;
    if (layout == GROVE_GEMM_K_GROUPED_TN) {
      M = rows > 0 ? g.m : 0;
      K = rows;
      a = addr(g.a) + 2 * row * g.lda;
      b = addr(g.b) + 2 * row * g.ldb;
      d = addr(g.d) + 2 * j * g.d_problem_stride;
    } else {
      M = rows;
      K = g.k;
      a = addr(g.a) + 2 * row * g.lda;
      b = addr(g.b) + 2 * (j / g.b_shared) * g.b_problem_stride;
      d = addr(g.d) + 2 * row * g.ldd;
    }
    expect(v.shapes[3 * p] == M, "M", layout, p, v.shapes[3 * p], M);
    expect(v.shapes[3 * p + 1] == N, "N", layout, p, v.shapes[3 * p + 1], N);
    expect(v.shapes[3 * p + 2] == K, "K", layout, p, v.shapes[3 * p + 2], K);
    expect(addr(v.ptr_a[p]) == a, "A address", layout, p, addr(v.ptr_a[p]), a);
    expect(addr(v.ptr_b[p]) == b, "B address", layout, p, addr(v.ptr_b[p]), b);
    expect(addr(v.ptr_d[p]) == d, "D address", layout, p, addr(v.ptr_d[p]), d);
    expect(v.ld_a[p] == g.lda && v.ld_b[p] == g.ldb && v.ld_d[p] == g.ldd, "leading dims",
           layout, p, v.ld_d[p], g.ldd);
  }
}

void check_rejects() {
  Sections packed;
  auto rejected = [&](int layout, std::vector<GroveGemmSection> secs, const char* what) {
    const int rc = check_sections(layout, secs.data(), int(secs.size()), 8, &packed);
    expect(rc == GROVE_ERR_INVALID_ARGUMENT, what, layout, -1, rc, GROVE_ERR_INVALID_ARGUMENT);
  };
  auto secs = sections(GROVE_GEMM_M_GROUPED_NT);
  secs[0].ldd = secs[0].n / 2;  // an output narrower than N
  rejected(GROVE_GEMM_M_GROUPED_NT, secs, "m_grouped_nt: ldd < N");
  secs = sections(GROVE_GEMM_M_GROUPED_NT_SWIGLU);
  secs[1].n = 40;  // not whole gate/up blocks
  secs[1].ldd = 24;
  rejected(GROVE_GEMM_M_GROUPED_NT_SWIGLU, secs, "m_grouped_nt_swiglu: N % 16");
  secs = sections(GROVE_GEMM_M_GROUPED_NT_SWIGLU);
  secs[0].ldd = 40;  // < N / 2 = 48
  rejected(GROVE_GEMM_M_GROUPED_NT_SWIGLU, secs, "m_grouped_nt_swiglu: ldd < N / 2");
  secs = sections(GROVE_GEMM_M_GROUPED_NN);
  secs[0].b = fake(0x10000008);  // 8-byte aligned only
  rejected(GROVE_GEMM_M_GROUPED_NN, secs, "misaligned B");
  secs = sections(GROVE_GEMM_K_GROUPED_TN);
  secs[1].first_problem = 4;  // sections must tile [0, P)
  rejected(GROVE_GEMM_K_GROUPED_TN, secs, "sections overlap");
  rejected(7, sections(GROVE_GEMM_M_GROUPED_NT), "unknown layout");
  secs = sections(GROVE_GEMM_M_GROUPED_NT);
  secs[1].b_shared = 0;
  rejected(GROVE_GEMM_M_GROUPED_NT, secs, "b_shared < 1");
  secs = sections(GROVE_GEMM_K_GROUPED_TN);
  secs[1].b_shared = 2;  // weight gradients own their D: one problem per B
  rejected(GROVE_GEMM_K_GROUPED_TN, secs, "k-grouped b_shared != 1");
}

}  // namespace

int main() {
  for (int layout : {GROVE_GEMM_M_GROUPED_NT, GROVE_GEMM_M_GROUPED_NT_SWIGLU,
                     GROVE_GEMM_M_GROUPED_NN, GROVE_GEMM_K_GROUPED_TN}) {
    check_fill<int32_t>(layout);
    check_fill<int64_t>(layout);
    if (layout != GROVE_GEMM_K_GROUPED_TN) {  // the folded adjugates: S experts per a1 / a2
      check_fill<int32_t>(layout, 2);
      check_fill<int64_t>(layout, 3);
    }
  }
  check_rejects();
  if (failures) std::printf("%d failures\n", failures);
  else std::printf("OK\n");
  return failures ? 1 : 0;
}
