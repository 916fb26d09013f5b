// Host-side check of csrc/grouped_args.cu (run by tests/test_cuda_epilogue.py; nvcc, no GPU):
// the argument checks of every layout (tn, tn_swiglu, tt, nt) and the per-problem arguments the
// fill kernel writes (shapes, A/B/D addresses, leading dimensions), computed on the host by the
// same function the kernel runs and compared with values derived from grove_cuda.h's contract.
// Operand addresses are fake (never dereferenced). Exit status 0 when every check passes.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../../csrc/grouped_args.cu"

namespace {

int failures = 0;
void expect(bool ok, const char* what, int layout, int p, long long got, long long want) {
  if (!ok && ++failures <= 30)
    std::printf("FAIL layout %d problem %d: %s: got %lld, want %lld\n", layout, p, what, got,
                want);
}

const char* fake(uintptr_t addr) { return reinterpret_cast<const char*>(addr); }

// Two segments (experts: 5 problems over 40 rows; adjugates: 3 problems over 24 rows) shaped
// as bindings.cpp builds them for `layout`.
std::vector<GroveGemmSegment> segments(int layout) {
  const int P[2] = {5, 3}, R[2] = {40, 24}, N[2] = {96, 32}, K[2] = {64, 128}, M[2] = {48, 16};
  std::vector<GroveGemmSegment> out(2);
  for (int s = 0; s < 2; ++s) {
    GroveGemmSegment& g = out[s];
    g = GroveGemmSegment{};
    g.a = fake(0x100000 * (s + 1));
    g.b = fake(0x10000000 * (s + 1));
    g.d = const_cast<char*>(fake(0x40000000 + 0x1000000 * s));
    g.rows = R[s];
    g.first_problem = s == 0 ? 0 : P[0];
    g.num_problems = P[s];
    g.row_base = s == 0 ? 0 : R[0];
    g.n = N[s];
    if (layout == GROVE_LAYOUT_NT) {  // a [R, M], b [R, N], d [P, M, N]
      g.m = M[s];
      g.lda = M[s];
      g.ldb = N[s];
      g.ldd = N[s];
      g.d_problem_stride = int64_t(M[s]) * N[s];
    } else {  // a [R, K]; tn/tn_swiglu b [P, N, K], tt b [P, K, N]; d [R, N or N / 2]
      g.k = K[s];
      g.lda = K[s];
      g.ldb = layout == GROVE_LAYOUT_TT ? N[s] : K[s];
      g.b_problem_stride = int64_t(N[s]) * K[s];
      g.ldd = layout == GROVE_LAYOUT_TN_SWIGLU ? N[s] / 2 : N[s];
    }
  }
  return out;
}

template <typename Index>
void check_fill(int layout) {
  std::vector<GroveGemmSegment> segs = segments(layout);
  const int P = 8;
  // Absolute plan rows: experts 0..39, adjugates 40..63. Problem 2 and 6 are empty; problem 4
  // is corrupt (starts past its segment) and problem 7 overruns it: both are clamped.
  const Index start[P] = {0, 7, 7, 20, 90, 40, 52, 52};
  const Index count[P] = {7, 13, 0, 20, 5, 12, 0, 40};
  Segments packed;
  const int rc = check_segments(layout, segs.data(), 2, P, &packed);
  expect(rc == GROVE_OK, "check_segments", layout, -1, rc, GROVE_OK);
  std::vector<char> buf(grove_grouped_args_bytes(P));
  GroveGroupedArgsView v = grove_grouped_args_view(buf.data(), P);
  for (int p = 0; p < P; ++p) fill_problem(layout, packed, start, count, p, v);

  const int64_t want_row[P] = {0, 7, 7, 20, 0, 0, 12, 12};
  const int64_t want_rows[P] = {7, 13, 0, 20, 0, 12, 0, 12};
  for (int p = 0; p < P; ++p) {
    const int s = p < 5 ? 0 : 1;
    const GroveGemmSegment& g = segs[s];
    const int64_t j = p - g.first_problem, row = want_row[p], rows = want_rows[p];
    const auto addr = [](const void* q) { return (long long)reinterpret_cast<uintptr_t>(q); };
    long long M, N = g.n, K, a, b, d;
    if (layout == GROVE_LAYOUT_NT) {
      M = rows > 0 ? g.m : 0;
      K = rows;
      a = addr(g.a) + 2 * row * g.lda;
      b = addr(g.b) + 2 * row * g.ldb;
      d = addr(g.d) + 2 * j * g.d_problem_stride;
    } else {
      M = rows;
      K = g.k;
      a = addr(g.a) + 2 * row * g.lda;
      b = addr(g.b) + 2 * j * g.b_problem_stride;
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
  Segments packed;
  auto rejected = [&](int layout, std::vector<GroveGemmSegment> segs, const char* what) {
    const int rc = check_segments(layout, segs.data(), int(segs.size()), 8, &packed);
    expect(rc == GROVE_ERR_INVALID_ARGUMENT, what, layout, -1, rc, GROVE_ERR_INVALID_ARGUMENT);
  };
  auto segs = segments(GROVE_LAYOUT_TN);
  segs[0].ldd = segs[0].n / 2;  // a tn output narrower than N
  rejected(GROVE_LAYOUT_TN, segs, "tn: ldd < N");
  segs = segments(GROVE_LAYOUT_TN_SWIGLU);
  segs[1].n = 40;  // not whole gate/up blocks
  segs[1].ldd = 24;
  rejected(GROVE_LAYOUT_TN_SWIGLU, segs, "tn_swiglu: N % 16");
  segs = segments(GROVE_LAYOUT_TN_SWIGLU);
  segs[0].ldd = 40;  // < N / 2 = 48
  rejected(GROVE_LAYOUT_TN_SWIGLU, segs, "tn_swiglu: ldd < N / 2");
  segs = segments(GROVE_LAYOUT_TT);
  segs[0].b = fake(0x10000008);  // 8-byte aligned only
  rejected(GROVE_LAYOUT_TT, segs, "misaligned B");
  segs = segments(GROVE_LAYOUT_NT);
  segs[1].first_problem = 4;  // segments must tile [0, P)
  rejected(GROVE_LAYOUT_NT, segs, "segments overlap");
  rejected(7, segments(GROVE_LAYOUT_TN), "unknown layout");
}

}  // namespace

int main() {
  for (int layout : {GROVE_LAYOUT_TN, GROVE_LAYOUT_TN_SWIGLU, GROVE_LAYOUT_TT, GROVE_LAYOUT_NT}) {
    check_fill<int32_t>(layout);
    check_fill<int64_t>(layout);
  }
  check_rejects();
  if (failures) std::printf("%d failures\n", failures);
  else std::printf("OK\n");
  return failures ? 1 : 0;
}
