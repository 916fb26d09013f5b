// Host-side check of csrc/gemm/swiglu_epilogue.cuh and gate_up_mainloop.cuh (run by
// tests/test_cuda_host_checks.py; needs nvcc, no GPU). For each fused GEMM-1 kernel of the table
// (GROVE_FOR_EACH_GEMM_KERNEL, layout M_GROUPED_NT_SWIGLU: the template arguments of its
// instantiation):
// The mainloop's B halves, from the kernel's own types and functions:
//   - smem: each half's layout at half_offset(h) of a stage is the B tile's layout at rows
//     h BN/2 + n, for every stage (so the MMA reads gate at tile row n, up at n + BN/2),
//   - gmem: the TMA coordinates of the halves view (halves_tiles, as load_init builds them) with
//     the dims / strides the device writes per problem (halves_tensor through
//     fill_tma_gmem_shape_stride, as replace_tensor_properties does) address, for every box
//     entry of every tile, gate row t BN/2 + n (half 0) or N' + that (half 1) at column k of
//     B_p, with row stride ld_b; in bounds exactly when the row is < N' and k < K (so rows past
//     N' are zero-filled, not read from the other half or past w), dim 0 the contiguous one.
// The epilogue's two phases on the host as the kernel's two consumer warpgroups run them: per
// round, phase 1 (stage into the warpgroup's shared-memory slab) for every MMA thread of both
// warpgroups, then phase 2 (slab to D) for every thread; the cooperative schedule's warpgroups
// share a tile (MMA threads 128..255 are consumer warpgroup 0, 0..127 warpgroup 1), the
// ping-pong schedule's take consecutive tiles. Each thread's accumulator fragment is filled from
// the coordinates the kernel's TiledMma gives it, as the mainloop lays out B (tile column c < BN/2:
// gate of output t BN/2 + c, c >= BN/2: up of output t BN/2 + c - BN/2; garbage where that
// output is past N / 2). It checks:
//   - the pairing the epilogue assumes (fragment entry i + size/2 is column + BN/2 of entry
//     i < size/2, i + 1 is column + 1 for even i, entries 4j + {0, 1} share entry 0's row and
//     4j + {2, 3} entry 2's),
//   - phase 1: each thread writes size(fragment) / 2 outputs, all inside its own warpgroup's
//     slab, and the threads of a warpgroup stage every slab entry exactly once (each thread's
//     writes are found by running it alone on a poisoned copy),
//   - phase 2: every output of [M, N / 2] is written exactly once over all threads of all
//     rounds, bit for bit D[m, o] == s(m) * silu(gate(m, o)) * up(m, o) with the same
//     conversion, each problem unscaled (s = 1) and with row scales (s(m) the scale of D's row,
//     found from the problem's D pointer as the kernel does: tile_scale) (so
//     each thread read the slab its warpgroup staged), and nothing outside [M, N / 2] is
//     written (row padding and the problem's neighbours stay poisoned), through problem l's
//     pointer / stride,
//   - the slab accesses are free of bank conflicts (the swizzle): one 4-byte word per bank per
//     phase-1 warp store, per phase-2 quarter-warp 16-byte load,
//   - the kernel's shared memory fits the sm90 limit; its mainloop stage count is printed.
// Exit status 0 when every check passes; the first failures are printed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "grouped_gemm.cuh"

namespace {

using namespace cute;

const uint16_t kPoison = 0x5a5a;  // far outside any output here (|silu(g) u| < 20)

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

// Indices of `scratch` (all kPoison) that f changes; restores them to kPoison.
template <class F>
std::vector<size_t> written_by(std::vector<uint16_t>& scratch, F f) {
  f();
  std::vector<size_t> idx;
  for (size_t i = 0; i < scratch.size(); ++i)
    if (scratch[i] != kPoison) {
      idx.push_back(i);
      scratch[i] = kPoison;
    }
  return idx;
}

// Shared-memory banks of the slab accesses, for the swizzle: per warp instruction, the number
// of distinct 4-byte words that fall in one bank, maximised over banks and instructions (1:
// conflict-free). Phase 1 (4-byte stores): a warp's 32 lanes at a time, from the fragment
// coordinates the TiledMma gives and the epilogue's slab_offset. Phase 2 (16-byte loads, served
// a quarter warp at a time): each 8 lanes' chunks at the offsets write() reads.
template <class Epi, class TiledMma, class TileShape>
int worst_bank_conflict(bool phase2) {
  TiledMma mma;
  const int threads = size(mma);
  int worst = 0;
  auto degree = [&](const std::vector<int>& bytes) {
    std::vector<std::vector<int>> words(32);
    for (int b : bytes)
      for (int w = b / 4; w < (b + (phase2 ? 16 : 4)) / 4; ++w) {
        auto& in_bank = words[w % 32];
        if (std::find(in_bank.begin(), in_bank.end(), w) == in_bank.end()) in_bank.push_back(w);
      }
    for (auto& in_bank : words) worst = std::max(worst, int(in_bank.size()));
  };
  const int elem = int(sizeof(typename Epi::ElementD));
  if (!phase2) {
    auto coord = make_identity_tensor(take<0, 2>(TileShape{}));
    for (int warp = 0; warp < threads / 32; ++warp) {
      const int n_frag = size(partition_fragment_C(mma, take<0, 2>(TileShape{})));
      for (int i = 0; i < n_frag / 2; i += 4)
        for (int r = 0; r < 4; r += 2) {
          std::vector<int> bytes;
          for (int lane = 0; lane < 32; ++lane) {
            const int t = warp * 32 + lane;
            auto tc = mma.get_thread_slice(t).partition_C(coord);
            const int row = get<0>(tc(i + r)) - Epi::slab_first_row(t), n = get<1>(tc(i + r));
            bytes.push_back(Epi::slab_offset(row, n) * elem);
          }
          degree(bytes);
        }
    }
  } else {
    const int chunks = Epi::kSlabRows * Epi::kChunksPerRow;
    for (int v = 0; v < chunks; v += 128)
      for (int q = 0; q < 128; q += 8) {
        std::vector<int> bytes;
        for (int lane = q; lane < q + 8; ++lane) {
          const int row = (v + lane) / Epi::kChunksPerRow;
          const int col = (v + lane) % Epi::kChunksPerRow * Epi::kVec;
          bytes.push_back(Epi::slab_offset(row, col) * elem);
        }
        degree(bytes);
      }
  }
  return worst;
}

// The mainloop's B halves (see the header comment); returns the number of entries checked.
template <class Mainloop>
long check_b_halves(const char* name) {
  using SmemB = typename Mainloop::SmemLayoutB;
  using SmemHalf = typename Mainloop::SmemLayoutBHalf;
  constexpr int BN = Mainloop::kTileN, BK = Mainloop::kTileK, H = Mainloop::kHalfN;
  constexpr int stages = size<2>(SmemB{});
  long checked = 0;
  // Addresses through CuTe's smem tensors, as load() and the MMA build them (the swizzle acts on
  // address bits: the base is aligned as the kernel's shared memory is).
  alignas(1024) static uint16_t smem[stages * BN * BK];
  Tensor full = make_tensor(make_smem_ptr(smem), SmemB{});
  for (int s = 0; s < stages; ++s)
    for (int h = 0; h < 2; ++h) {
      Tensor part = make_tensor(
          make_smem_ptr(smem + s * Mainloop::kStageElementsB + Mainloop::half_offset(h)),
          SmemHalf{});
      for (int n = 0; n < H; ++n)
        for (int k = 0; k < BK; ++k, ++checked)
          if (&part(n, k) != &full(h * H + n, k, s))
            fail(name, "B half smem entry", s, h, n, k, 0);
    }
  // gmem: (N, K, ld_b) with N' below, at and above a tile multiple, K not a multiple of BK.
  const int shapes[][3] = {{16, 40, 48}, {2 * H, 64, 64}, {2 * H + 48, 72, 80}, {6 * H - 16, 136, 136}};
  typename Mainloop::TMA_B_Halves tma{};
  for (const auto& sh : shapes) {
    const int N = sh[0], K = sh[1], Nh = N / 2;
    const int64_t ld = sh[2];
    cute::array<uint32_t, 5> dims = {1, 1, 1, 1, 1};
    cute::array<uint64_t, 5> strides = {0, 0, 0, 0, 0};
    cute::detail::fill_tma_gmem_shape_stride(
        tma, Mainloop::halves_tensor(static_cast<uint16_t const*>(nullptr), N, K, ld), dims,
        strides);
    if (strides[0] != 1) fail(name, "TMA dim 0 not the contiguous one", N, K, int(strides[0]), 0, 0);
    auto tiles = Mainloop::halves_tiles(tma, N, K);  // (BN/2, BK, n, k, half)
    for (int t = 0; t < (N + BN - 1) / BN; ++t)
      for (int kt = 0; kt < (K + BK - 1) / BK; ++kt)
        for (int h = 0; h < 2; ++h)
          for (int n = 0; n < H; ++n)
            for (int k = 0; k < BK; ++k, ++checked) {
              auto crd = tiles(n, k, t, kt, h);
              int64_t addr = 0;
              bool inside = true;
              for_each(make_seq<decltype(rank(crd))::value>{}, [&](auto d) {
                const int64_t c = get<d>(crd);
                addr += c * int64_t(strides[d]);
                inside = inside && c >= 0 && c < int64_t(dims[d]);
              });
              const int row = t * H + n, col = kt * BK + k;
              const bool want_inside = row < Nh && col < K;
              if (inside != want_inside) fail(name, "B half bounds", N, K, row, col, h);
              if (want_inside && addr != (int64_t(h) * Nh + row) * ld + col)
                fail(name, "B half address", N, K, row, col, h);
            }
  }
  return checked;
}

template <class Cfg>
void check_config(const char* name) {
  using Kernel = typename Cfg::Kernel;
  using TiledMma = typename Kernel::CollectiveMainloop::TiledMma;
  using TileShape = typename Kernel::TileShape;
  using Epi = typename Kernel::CollectiveEpilogue;
  using Element = typename Cfg::Element;
  using StrideD = typename Epi::InternalStrideD;
  using Smem = typename Epi::SharedStorage;
  constexpr int BM = size<0>(TileShape{});
  constexpr int BN = size<1>(TileShape{});
  constexpr int kWarpGroups = Epi::kConsumerWarpGroups;
  constexpr int kSlab = Epi::kSlabElements;
  static_assert(sizeof(Smem) == kWarpGroups * kSlab * sizeof(Element), "slabs are packed");
  TiledMma mma;
  const int threads = size(mma);
  const bool cooperative = threads == 2 * 128;
  if (!cooperative && threads != 128) fail(name, "MMA threads", 0, 0, threads, 0, 0);

  // The slabs with one slab of guard on each side: a write there is outside every slab.
  const int guard = kSlab;
  std::vector<uint16_t> smem(guard + kWarpGroups * kSlab + guard), scratch_smem(smem.size());
  std::fill(scratch_smem.begin(), scratch_smem.end(), kPoison);
  auto slab_of = [&](std::vector<uint16_t>& s, int wg) {
    return reinterpret_cast<Element*>(s.data() + guard + wg * kSlab);
  };
  // Kernel thread 128 (w + 1) + j of consumer warpgroup w is MMA thread (that) % size(mma).
  auto mma_thread = [&](int wg, int j) { return (128 * (wg + 1) + j) % threads; };

  // (M, N): 1 row, rows not a tile multiple, N below / above / not a multiple of the tile.
  const int problems[][2] = {{1, 16}, {77, 48}, {BM, BN}, {2 * BM + 5, BN + 32}, {BM + 1, 2 * BN}};
  int checked = 0;
  long checked_b = 0;
  // Each problem twice: unscaled, then with row scales.
  for (int variant = 0; variant < 2 * int(sizeof(problems) / sizeof(problems[0])); ++variant) {
    const auto& pr = problems[variant / 2];
    const bool scaled = variant % 2 == 1;
    const int M = pr[0], N = pr[1], W = N / 2;
    auto bad = [&](const char* what, int a, int b, int c) { fail(name, what, M, N, a, b, c); };
    const int64_t ldd = W + 8;
    // Problem 1 of two: its D lies between guard rows, problem 0's pointer must not be used.
    std::vector<uint16_t> buf((M + 2) * ldd, kPoison), other(ldd, kPoison);
    std::vector<uint16_t> scratch_buf(buf.size(), kPoison);
    std::vector<int> writes(buf.size(), 0);
    Element* ptrs[2] = {reinterpret_cast<Element*>(other.data()),
                        reinterpret_cast<Element*>(buf.data() + ldd)};
    Element* scratch_ptrs[2] = {ptrs[0], reinterpret_cast<Element*>(scratch_buf.data() + ldd)};
    StrideD strides[2] = {StrideD{int64_t(1), Int<1>{}, Int<0>{}},
                          StrideD{ldd, Int<1>{}, Int<0>{}}};
    typename Epi::Params params, scratch_params;
    params.ptr_D = ptrs;
    params.dD = strides;
    scratch_params.ptr_D = scratch_ptrs;
    scratch_params.dD = strides;
    // The scaled variant: one section whose D buffer is buf (problem 1's rows start at its row
    // 1), one fp32 scale per row of buf, of both signs.
    std::vector<float> row_scale(M + 2);
    for (int r = 0; r < M + 2; ++r) row_scale[r] = (r % 3 == 1 ? -0.75f : 0.5f) + 0.125f * (r % 5);
    for (auto* p : {&params, &scratch_params}) {
      p->num_sections = scaled ? 1 : 0;
      p->ldd[0] = ldd;
      p->row_scale[0] = scaled ? row_scale.data() : nullptr;
    }
    params.d_base[0] = reinterpret_cast<Element const*>(buf.data());
    scratch_params.d_base[0] = reinterpret_cast<Element const*>(scratch_buf.data());
    Epi epi(params), scratch_epi(scratch_params);
    const auto shape = make_shape(M, N, 64, 1);

    std::vector<std::pair<int, int>> tiles;
    for (int tm = 0; tm < (M + BM - 1) / BM; ++tm)
      for (int tn = 0; tn < (N + BN - 1) / BN; ++tn) tiles.push_back({tm, tn});
    const int per_round = cooperative ? 1 : kWarpGroups;
    for (size_t first = 0; first < tiles.size(); first += per_round) {
      // The tile of each warpgroup this round (-1: none, ping-pong's last odd tile).
      int tile_of[kWarpGroups];
      for (int wg = 0; wg < kWarpGroups; ++wg) {
        const size_t t = first + (cooperative ? 0 : wg);
        tile_of[wg] = t < tiles.size() ? int(t) : -1;
      }
      std::fill(smem.begin(), smem.end(), kPoison);
      std::vector<int> staged(smem.size(), 0);
      // Phase 1 for every thread of every warpgroup.
      for (int wg = 0; wg < kWarpGroups; ++wg) {
        if (tile_of[wg] < 0) continue;
        const auto [tm, tn] = tiles[tile_of[wg]];
        for (int j = 0; j < 128; ++j) {
          const int t = mma_thread(wg, j);
          auto acc = partition_fragment_C(mma, take<0, 2>(TileShape{}));
          auto coord = local_tile(make_identity_tensor(make_shape(M, N)), take<0, 2>(TileShape{}),
                                  make_coord(tm, tn));
          auto tc = mma.get_thread_slice(t).partition_C(coord);
          const int half = size(acc) / 2;
          for (int i = 0; i < size(acc); ++i) {
            const int m = get<0>(tc(i)), c = get<1>(tc(i)) - tn * BN;  // tile column
            const int o = tn * (BN / 2) + c % (BN / 2);                   // its output column
            // Outside: finite, staged too, never stored.
            acc(i) = (m < M && o < W) ? acc_value(m, 2 * o + c / (BN / 2)) : 3.f;
            if (i < half) {
              const int mh = get<0>(tc(i + half)), ch = get<1>(tc(i + half)) - tn * BN;
              if (mh != m || ch != c + BN / 2 || c >= BN / 2) bad("gate/up pairing", t, i, c);
            }
            // The epilogue reads a thread's two row scales once, at entries 0 and 2.
            if (m != get<0>(tc(i % 4 < 2 ? 0 : 2))) bad("a thread's fragment rows", t, i, m);
            if (i % 2 == 0) {
              const int m1 = get<0>(tc(i + 1)), c1 = get<1>(tc(i + 1)) - tn * BN;
              if (m1 != m || c1 != c + 1) bad("column pair", t, i, c);
            }
          }
          const auto mine = written_by(scratch_smem, [&] {
            Epi::stage(acc, mma, t, slab_of(scratch_smem, wg), epi.tile_scale(1, tm * BM, M));
          });
          if (int(mine.size()) != size(acc) / 2) bad("outputs staged by a thread", t, mine.size(), 0);
          for (size_t k : mine) {
            const long s = long(k) - guard - long(wg) * kSlab;
            if (s < 0 || s >= kSlab) bad("staged outside its warpgroup's slab", wg, t, int(s));
            ++staged[k];
          }
          Epi::stage(acc, mma, t, slab_of(smem, wg), epi.tile_scale(1, tm * BM, M));
        }
      }
      for (int wg = 0; wg < kWarpGroups; ++wg)
        for (int s = 0; s < kSlab; ++s) {
          const int n = staged[guard + wg * kSlab + s];
          if (n != (tile_of[wg] >= 0 ? 1 : 0)) bad("slab entry staged times", wg, s, n);
        }
      // Phase 2 for every thread of every warpgroup.
      for (int wg = 0; wg < kWarpGroups; ++wg) {
        if (tile_of[wg] < 0) continue;
        const auto [tm, tn] = tiles[tile_of[wg]];
        const auto blk = make_coord(tm, tn, _, 1);
        for (int j = 0; j < 128; ++j) {
          const int t = mma_thread(wg, j);
          for (size_t k : written_by(scratch_buf, [&] {
                 scratch_epi.write(shape, blk, t, slab_of(smem, wg));
               }))
            ++writes[k];
          epi.write(shape, blk, t, slab_of(smem, wg));
        }
      }
    }
    cutlass::NumericConverter<Element, float> to_element;
    for (int m = -1; m <= M; ++m)
      for (int j = 0; j < ldd; ++j) {
        const size_t k = size_t(m + 1) * ldd + j;
        const uint16_t got = buf[k];
        if (m < 0 || m == M || j >= W) {
          if (got != kPoison || writes[k]) bad("write outside D", m, j, got);
          continue;
        }
        if (writes[k] != 1) bad("output written times", m, j, writes[k]);
        const float gate = acc_value(m, 2 * j), up = acc_value(m, 2 * j + 1);
        const float s = scaled ? row_scale[m + 1] : 1.f;
        const uint16_t want = bits(to_element(s * (gate / (1.f + std::exp(-gate)) * up)));
        if (got != want) bad("value", m, j, got);
        ++checked;
      }
    for (uint16_t v : other)
      if (v != kPoison) bad("wrote through another problem's pointer", M, N, v);
  }
  checked_b += check_b_halves<typename Kernel::CollectiveMainloop>(name);
  const int conflicts1 = worst_bank_conflict<Epi, TiledMma, TileShape>(false);
  const int conflicts2 = worst_bank_conflict<Epi, TiledMma, TileShape>(true);
  if (conflicts1 != 1 || conflicts2 != 1) fail(name, "bank conflicts", 0, 0, conflicts1, conflicts2, 0);
  std::printf("%s: %d MMA threads, %d mainloop stages, %zu bytes of shared memory (%zu of them "
              "slabs), slab accesses %d-way / %d-way in a bank, %d outputs and %ld B-tile "
              "entries checked\n",
              name, threads, Cfg::kStages, Cfg::kSharedBytes, sizeof(Smem), conflicts1,
              conflicts2, checked, checked_b);
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
