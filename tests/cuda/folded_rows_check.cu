// Host-side check of the row walk of csrc/folded.cu (run by tests/test_cuda_host_checks.py;
// nvcc, no GPU): the expert of each real row (binary search of the offsets) and whether it
// leads its group, computed by the functions the kernels run, against a linear scan, on
// offsets with empty experts (first, last, consecutive), one expert, padding rows, empty
// leader prefixes, every row a leader, and corrupt offsets (clamped, never out of range).
// Exit status 0 when every check passes.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../../csrc/folded.cu"

namespace {

int failures = 0;

// monotone == false: a corrupt plan, where only "an expert in range, no out-of-bounds read" is
// required.
void check(const char* name, std::vector<int64_t> offsets, std::vector<int64_t> ends,
           int64_t R, bool monotone = true) {
  const int64_t E = static_cast<int64_t>(ends.size());
  GroveFoldedRows f{R, E, offsets.data(), ends.data()};
  const int64_t real = real_rows(f);
  int64_t want_real = offsets[E] < 0 ? 0 : (offsets[E] > R ? R : offsets[E]);
  if (real != want_real && ++failures <= 20)
    std::printf("FAIL %s: real rows %lld, want %lld\n", name, (long long)real,
                (long long)want_real);
  for (int64_t r = 0; r < real; ++r) {
    int64_t want_e = -1;
    for (int64_t e = 0; e < E; ++e)
      if (offsets[e] <= r && r < offsets[e + 1]) want_e = e;
    const int64_t e = expert_of_row(offsets.data(), E, r);
    const bool lead = is_leader_row(f, r);
    const bool want_lead = want_e >= 0 && r < ends[want_e];
    if (e < 0 || e >= E || (monotone && (e != want_e || lead != want_lead))) {
      if (++failures <= 20)
        std::printf("FAIL %s row %lld: expert %lld (want %lld), leader %d (want %d)\n", name,
                    (long long)r, (long long)e, (long long)want_e, lead, want_lead);
    }
  }
  std::printf("%s: checked %lld rows\n", name, (long long)real);
}

}  // namespace

int main() {
  // E = 6, R = 20: experts 0, 2, 3 and 5 empty; expert 1 rows [0, 7) with leaders [0, 4),
  // expert 4 rows [7, 16) with leaders [7, 16); rows 16.. are padding.
  check("empty experts and padding", {0, 0, 7, 7, 7, 16, 16}, {0, 4, 7, 7, 16, 16}, 20);
  check("one expert, every row a leader", {0, 9}, {9}, 9);
  check("one expert, no leader", {0, 9}, {0}, 9);
  check("all rows of the last expert", {0, 0, 0, 0, 12}, {0, 0, 0, 5}, 12);
  check("no rows", {0, 0, 0}, {0, 0}, 4);
  check("alternating", {0, 1, 2, 3, 4, 5, 6, 7, 8}, {1, 1, 3, 3, 5, 5, 7, 7}, 8);
  // Corrupt plans: the end past R is clamped, decreasing offsets still pick an expert in range.
  check("end past R", {0, 3, 50}, {2, 40}, 10);
  check("decreasing offsets", {0, 8, 3, 10}, {4, 9, 10}, 10, false);
  if (failures) std::printf("%d failures\n", failures);
  else std::printf("OK\n");
  return failures ? 1 : 0;
}
