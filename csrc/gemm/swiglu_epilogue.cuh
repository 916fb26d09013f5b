// swiglu_epilogue.cuh: GEMM-1's epilogue with SwiGLU fused, for the ptr-array grouped GEMM of
// grouped_gemm.cuh (layout M_GROUPED_NT_SWIGLU, B = w1 / a1 as they are, its gate and up rows
// loaded into the two halves of each B tile by gate_up_mainloop.cuh).
//
//   acc [BM, BN] of tile n = x rows @ [gate rows | up rows]^T    acc[m, c]          gate col n BN/2 + c
//                                                                acc[m, BN/2 + c]   up   col n BN/2 + c
//   D   [M, N/2]  D[m, n BN/2 + c] = s[m] * silu(acc[m, c]) * acc[m, BN/2 + c]
//                 (fp32, one rounding to D's type; s: the launch's row scale of D's row, else 1)
//
// Row scales: the folded layout scales a row's expert part by its router weight and its
// adjugate part by λ Σ w before GEMM-2 (K = I + Ia mixes both parts, so GEMM-2 cannot); doing it
// here saves a pass over z. Each section of the launch may give one fp32 scale per row of its D
// buffer; a problem finds its first row from its D pointer ((ptr_D[l] - d_base) / ldd), so the
// argument fill needs nothing more.
//
// Why the halves pair in registers: the tile's wgmma atom spans all BN columns, and in its
// accumulator fragment a thread holds, for each of its rows, the column pairs
// 8j + 2(lane % 4) + {0, 1} for every j < BN/8, as fragment entries 4j + {0, 1} (+2 for the row 8
// below); so column c + BN/2 is entry i + size/2 of the same thread: SwiGLU needs no exchange
// between threads.
//
// The store goes through shared memory, in two phases per work tile and consumer warpgroup:
//   1. stage: each thread writes its silu(gate) * up pairs (4 bytes) into its warpgroup's slab,
//      [64 rows, BN / 2 columns] of the output tile (the rows of its 64-row wgmma tile);
//   2. write: the warpgroup's 128 threads copy the slab to D row by row, 16 bytes (8 outputs) per
//      thread and store, consecutive threads on consecutive 16 bytes of a row: whole 32-byte
//      sectors, a quarter of the store instructions of storing from the accumulator registers.
// Each consumer warpgroup has its own slab and synchronises only its 128 threads (a named
// barrier per warpgroup, never the producer warp): the cooperative schedule's two warpgroups
// hold disjoint 64-row halves of one tile, the ping-pong schedule's hold different tiles. A
// barrier before phase 1 keeps a slab from being overwritten while the previous tile's phase 2
// still reads it; one between the phases publishes the slab.
// The slab is swizzled, not padded: 16-byte chunk c of row r sits at chunk c ^ (r % 8). A
// phase-1 warp store covers 8 consecutive rows x 16 bytes of one chunk column, which the XOR
// spreads over all 32 banks; a phase-2 quarter warp reads 8 consecutive chunks of one row, which
// the XOR permutes within their 128 bytes: both conflict-free, with no bytes added.
// tests/cuda/swiglu_epilogue_check.cu runs both phases on the host for every thread of every
// fused kernel (phase 1 for all, then phase 2 for all) and checks the pairing, the slab
// addressing (each slab entry staged exactly once, by its own warpgroup), every output written
// exactly once and the bounds.
//
// The h = [gate | up] pre-activations are never stored, which saves writing and re-reading
// [R, 2N] and one launch per forward (docs/design.md §3): it serves forwards that keep nothing
// for a backward; a training forward stores h with the plain GEMM-1 and runs SwiGLU after it.
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/arch/memory.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/numeric_conversion.h"
#include "cutlass/numeric_types.h"
#include "grove_cuda.h"

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

namespace grove {

// Operator-style collective epilogue (wrapped by SwigluEpilogue below): per work tile, phase 1
// stages SwiGLU of the accumulator fragment in the warpgroup's shared-memory slab, phase 2
// copies the slab to D with 16-byte stores.
template <class Element, class TileShape>
class SwigluEpilogueArray {
 public:
  using EpilogueSchedule = cutlass::epilogue::PtrArrayNoSmemWarpSpecialized;
  using DispatchPolicy = EpilogueSchedule;
  using ElementAccumulator = float;
  using ElementC = void;  // no source operand
  using ElementD = Element;
  using ElementOutput = Element;
  using InternalStrideC = cute::Stride<int64_t, cute::Int<1>, cute::Int<0>>;
  using InternalStrideD = InternalStrideC;
  using StrideC = InternalStrideC*;
  using StrideD = InternalStrideD*;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;

  // What CUTLASS's device adapter reads of an operator-style epilogue's elementwise op.
  struct ThreadEpilogueOp {
    using ElementOutput = Element;
    using ElementAccumulator = float;
    using ElementCompute = float;
    using ElementD = Element;
    static constexpr int kCount = 2;
  };

  static constexpr int kTileN = cute::size<1>(TileShape{});
  static constexpr int kOutN = kTileN / 2;               // output columns of a tile
  static constexpr int kSlabRows = 64;                   // rows of one warpgroup's wgmma tile
  static constexpr int kWarpGroupThreads = 128;
  static constexpr int kConsumerWarpGroups = 2;          // both sm90 warp-specialized schedules
  static constexpr int kVec = 16 / int(sizeof(Element));  // outputs per 16-byte store
  static constexpr int kChunksPerRow = kOutN / kVec;
  static constexpr int kSlabElements = kSlabRows * kOutN;
  static_assert(kTileN % 16 == 0, "each half of the tile holds whole 8-column blocks");
  static_assert(kChunksPerRow % 8 == 0, "the slab swizzle permutes 8 chunks of 16 bytes per row");
  static_assert(kSlabRows * kChunksPerRow % kWarpGroupThreads == 0,
                "phase 2 gives every thread the same number of chunks");
  // First user named barrier of the two slabs (ids 0 and 1 above CUTLASS's reserved ones; the
  // ptr-array mainloops and kernels use none).
  static constexpr uint32_t kBarrierBase = 0;

  struct SharedStorage {
    alignas(128) Element slab[kConsumerWarpGroups][kSlabElements];
  };
  using TensorMapStorage = SharedStorage;

  struct Arguments {
    ElementD** ptr_D = nullptr;  // per problem: D_p, [M_p, N_p / 2] with row stride dD[p]
    StrideD dD = nullptr;
    // Per section s of the launch (problems [first_problem[s], first_problem[s + 1])): its D
    // buffer and row stride, and one fp32 scale per row of that buffer, or null (no scale).
    int num_sections = 0;
    int first_problem[GROVE_MAX_SECTIONS] = {};
    ElementD const* d_base[GROVE_MAX_SECTIONS] = {};
    int64_t ldd[GROVE_MAX_SECTIONS] = {};
    float const* row_scale[GROVE_MAX_SECTIONS] = {};
  };
  using Params = Arguments;

  // The row scales of one work tile: scale[tile row] below `rows` (the problem's rows from the
  // tile's first), 1 where there is no scale or no row (those outputs are not stored).
  struct TileScale {
    float const* scale = nullptr;
    int rows = 0;
    CUTLASS_HOST_DEVICE float operator()(int tile_row) const {
      return scale != nullptr && tile_row < rows ? scale[tile_row] : 1.f;
    }
  };

  CUTLASS_HOST_DEVICE TileScale tile_scale(int l, int first_row, int M) const {
    static_assert(GROVE_MAX_SECTIONS == 2, "sections picked by one comparison");
    // Selects, not a dynamic index: an indexed kernel-parameter array goes to local memory.
    const bool second = params_.num_sections > 1 && l >= params_.first_problem[1];
    float const* scale = second ? params_.row_scale[1] : params_.row_scale[0];
    if (scale == nullptr) return {};
    ElementD const* base = second ? params_.d_base[1] : params_.d_base[0];
    const int64_t ldd = second ? params_.ldd[1] : params_.ldd[0];
    const int64_t row0 = (params_.ptr_D[l] - base) / ldd;
    return {scale + row0 + first_row, M - first_row};
  }

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args,
                                                  void*) {
    return args;
  }

  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&, int) {
    return 0;
  }

  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*,
                                              cudaStream_t, cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  // Problem shapes live on the device only: N % 16 == 0 is checked by the launcher's caller
  // (bindings.cpp) on the section sizes, which bound every problem's N; D's pointers are 16-byte
  // aligned and its row strides multiples of 8 (checked by grove_grouped_args_fill).
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.ptr_D != nullptr && args.dD != nullptr;
  }

  CUTLASS_HOST_DEVICE explicit SwigluEpilogueArray(Params const& params) : params_(params) {}

  CUTLASS_HOST_DEVICE bool is_source_needed() const { return false; }

  CUTLASS_HOST_DEVICE static float silu_mul(float gate, float up) {
#if defined(__CUDA_ARCH__)
    return gate / (1.f + expf(-gate)) * up;  // the formula of swiglu.cu's unfused SwiGLU
#else
    return gate / (1.f + std::exp(-gate)) * up;
#endif
  }

  // Element offset of output (row, col) of a slab: 16-byte chunk col / kVec of the row lands at
  // chunk (col / kVec) ^ (row % 8), which stays inside the row's aligned group of 8 chunks.
  CUTLASS_HOST_DEVICE static int slab_offset(int row, int col) {
    return row * kOutN + (((col / kVec) ^ (row & 7)) * kVec) + col % kVec;
  }

  // First tile row of the 64-row wgmma tile of MMA thread thread_idx (cooperative: the TiledMma
  // stacks its two warpgroups along M; ping-pong: one warpgroup, row 0).
  CUTLASS_HOST_DEVICE static int slab_first_row(int thread_idx) {
    return thread_idx / kWarpGroupThreads * kSlabRows;
  }

  // Phase 1: s * silu(gate) * up of the thread's fragment into its warpgroup's slab.
  template <class FrgEngine, class FrgLayout, class TiledMma>
  CUTLASS_HOST_DEVICE static void stage(cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                        TiledMma tiled_mma, int thread_idx, ElementD* slab,
                                        TileScale tile_scale = {}) {
    using namespace cute;
    static_assert(is_static<FrgLayout>::value, "accumulator layout must be static");
    // The wgmma value mode is (2 columns, 2 rows 8 apart, BN/8 column blocks) and the tile's
    // atom spans BN: entry i + kHalf is entry i's column + BN/2, its up value (checked on the host
    // by tests/cuda/swiglu_epilogue_check.cu for every fused kernel).
    constexpr int kHalf = size(FrgLayout{}) / 2;
    static_assert(size<0>(FrgLayout{}) == kTileN / 2 && size(FrgLayout{}) == size<0>(FrgLayout{}),
                  "one wgmma atom spans the tile's N: the fragment is its value mode only");
    static_assert(size<0>(TileShape{}) == size(TiledMma{}) / kWarpGroupThreads * kSlabRows,
                  "each MMA warpgroup owns 64 rows of the tile");

    Tensor thr_coord = tiled_mma.get_thread_slice(thread_idx)
                           .partition_C(make_identity_tensor(take<0, 2>(TileShape{})));
    const int row0 = slab_first_row(thread_idx);
    // A thread's fragment covers two rows, 8 apart: entries 4j + {0, 1} and 4j + {2, 3}.
    const float scale[2] = {tile_scale(get<0>(thr_coord(0))), tile_scale(get<0>(thr_coord(2)))};
    cutlass::NumericArrayConverter<ElementD, float, 2> convert;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kHalf; i += 4) {
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < 4; r += 2) {  // the thread's two rows of this block
        const int row = get<0>(thr_coord(i + r)) - row0;
        const int col = get<1>(thr_coord(i + r));  // even: the pair stays in one 16-byte chunk
        cutlass::Array<float, 2> out;
        out[0] = scale[r / 2] * silu_mul(accumulators(i + r), accumulators(i + r + kHalf));
        out[1] = scale[r / 2] * silu_mul(accumulators(i + r + 1), accumulators(i + r + 1 + kHalf));
        cutlass::AlignedArray<ElementD, 2> pair;
        static_cast<cutlass::Array<ElementD, 2>&>(pair) = convert(out);
        *reinterpret_cast<cutlass::AlignedArray<ElementD, 2>*>(slab + slab_offset(row, col)) =
            pair;
      }
    }
  }

  // Phase 2: the warpgroup's slab to D, 16 bytes per store, predicated on the problem's M and
  // N / 2 (N / 2 is a multiple of 8: a chunk is wholly inside or wholly outside).
  template <class ProblemShapeMNKL, class BlockCoordMNKL>
  CUTLASS_HOST_DEVICE void write(ProblemShapeMNKL problem_shape_mnkl,
                                 BlockCoordMNKL blk_coord_mnkl, int thread_idx,
                                 ElementD const* slab) const {
    using namespace cute;
    const int M = get<0>(problem_shape_mnkl);
    const int W = get<1>(problem_shape_mnkl) / 2;  // N: gate and up rows, 2 x the output width
    const int l = get<3>(blk_coord_mnkl);
    ElementD* d = params_.ptr_D[l];
    const int64_t ldd = get<0>(params_.dD[l]);
    const int m0 = get<0>(blk_coord_mnkl) * size<0>(TileShape{}) + slab_first_row(thread_idx);
    const int c0 = get<1>(blk_coord_mnkl) * kOutN;
    const int t = thread_idx % kWarpGroupThreads;
    using Chunk = cutlass::AlignedArray<ElementD, kVec>;
    CUTLASS_PRAGMA_UNROLL
    for (int v = 0; v < kSlabRows * kChunksPerRow; v += kWarpGroupThreads) {
      const int row = (v + t) / kChunksPerRow;
      const int col = (v + t) % kChunksPerRow * kVec;
      const Chunk chunk = *reinterpret_cast<Chunk const*>(slab + slab_offset(row, col));
      const int m = m0 + row;
      const bool inside = m < M && c0 + col < W;
      ElementD* dst = d + static_cast<int64_t>(m) * ldd + (c0 + col);
#if defined(__CUDA_ARCH__)
      // A predicated st.global.v4 (a plain store through the generic pointer compiles to ST.E).
      cutlass::arch::global_store<Chunk, sizeof(Chunk)>(chunk, dst, inside);
#else
      if (inside) *reinterpret_cast<Chunk*>(dst) = chunk;
#endif
    }
  }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
            class FrgLayout, class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK,
                                 BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char* smem) {
    static_assert(cute::is_same_v<BlockShapeMNK, TileShape>, "the kernel's tile shape");
    // Consumer warpgroup 0 or 1 (the producer is warpgroup 0 of the CTA), warp-uniform.
    const int wg = cutlass::canonical_warp_group_idx() - 1;
    ElementD* slab = reinterpret_cast<SharedStorage*>(smem)->slab[wg];
    const int first_row = cute::get<0>(blk_coord_mnkl) * cute::size<0>(TileShape{});
    const TileScale scale = tile_scale(cute::get<3>(blk_coord_mnkl), first_row,
                                       cute::get<0>(problem_shape_mnkl));
    cutlass::arch::NamedBarrier::sync(kWarpGroupThreads, kBarrierBase + wg);  // slab free
    stage(accumulators, tiled_mma, thread_idx, slab, scale);
    cutlass::arch::NamedBarrier::sync(kWarpGroupThreads, kBarrierBase + wg);  // slab staged
    write(problem_shape_mnkl, blk_coord_mnkl, thread_idx, slab);
  }

 private:
  Params params_;
};

// The collective the kernel sees: CUTLASS's adapter for operator-style epilogues, with the
// tensor-map storage (the adapter reuses SharedStorage for it) made empty so that the slabs are
// not allocated twice; the methods that take that storage are redeclared for the new type.
template <class Element, class TileShape>
class SwigluEpilogue : public cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
                           SwigluEpilogueArray<Element, TileShape>> {
  using Base = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
      SwigluEpilogueArray<Element, TileShape>>;

 public:
  using Base::Base;
  struct TensorMapStorage {};
  using Params = typename Base::Params;

  CUTLASS_DEVICE auto load_init(Params const&, TensorMapStorage&, int32_t, int32_t) {
    return cute::make_tuple(nullptr);
  }
  CUTLASS_DEVICE auto store_init(Params const&, TensorMapStorage&, int32_t, int32_t, int32_t) {
    return cute::make_tuple(nullptr);
  }
  template <bool IsLoad, class ProblemShapeMNKL>
  CUTLASS_DEVICE void tensormaps_perform_update(TensorMapStorage&, Params const&,
                                                cute::TmaDescriptor const*, ProblemShapeMNKL,
                                                int32_t, int32_t) {}
  template <bool IsLoad>
  CUTLASS_DEVICE void tensormaps_cp_fence_release(TensorMapStorage&, cute::TmaDescriptor const*,
                                                  int32_t) {}
};

}  // namespace grove
