// gate_up_mainloop.cuh: the mainloop of GEMM-1 with SwiGLU fused (layout M_GROUPED_NT_SWIGLU):
// CUTLASS's sm90 ptr-array TMA mainloop with B read as two halves of w1 / a1 in place.
//
//   B_p = w [2N', K] (rows [0, N') gate, [N', 2N') up; N' = N_p / 2), row stride ld_b
//   tile n of BN columns: smem B rows [0, BN/2)  = gate rows [n BN/2, (n+1) BN/2)
//                         smem B rows [BN/2, BN) = up   rows N' + the same
//   acc [BM, BN]: columns c < BN/2 gate, c + BN/2 its up (swiglu_epilogue.cuh pairs them)
//
// Why: SwiGLU in GEMM-1's epilogue needs a tile's gate and up columns of the same outputs in one
// CTA. Reading them as two boxes of one weight needs no copy of w1 (an interleaved copy costs
// 2 I H bytes per expert, as much as w1 itself).
// How: B's TMA descriptor views w as (N', K, 2) with strides (ld_b, 1, N' ld_b), the third mode
// the half; the box is (BN/2, BK, 1), so each k step issues two B loads, gate and up, into the two
// halves of the stage's B tile. The B tile's smem layout tiles N first (8-row swizzle atoms
// stacked along N), so rows [BN/2, BN) start BN/2 BK elements in, a multiple of the 1024-byte
// swizzle period: the half layout plus that offset is the full tile's layout (checked on the host
// by tests/cuda/swiglu_epilogue_check.cu, with the gmem element every smem entry comes from).
// Rows past N' are zero-filled by the TMA in each half separately (the descriptor's second
// dimension is N'), so a partial last tile reads neither the up rows as gate rows nor past w.
// Everything else (A, the pipeline, the MMA, tensor maps in the workspace) is the base's.
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"

namespace grove {

template <class Base>
struct GateUpMainloop : Base {
  using typename Base::Arguments;
  using typename Base::DispatchPolicy;
  using typename Base::InternalElementA;
  using typename Base::InternalElementB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutAtomB;
  using typename Base::SmemLayoutB;
  using typename Base::TensorMapStorage;
  using typename Base::TensorStorage;
  using typename Base::TileShape;

  static constexpr int kTileN = cute::size<1>(TileShape{});
  static constexpr int kTileK = cute::size<2>(TileShape{});
  static constexpr int kHalfN = kTileN / 2;
  static constexpr int kStageElementsB = kTileN * kTileK;
  static_assert(kHalfN % cute::size<0>(SmemLayoutAtomB{}) == 0, "a half holds whole swizzle atoms");
  static_assert(cute::size(typename DispatchPolicy::ClusterShape{}) == 1,
                "no TMA multicast: cluster 1x1");
  static_assert(cute::cosize_v<SmemLayoutB> == kStageElementsB * DispatchPolicy::Stages,
                "B stages are dense");
  static_assert(cute::is_same_v<typename Base::InternalStrideB,
                                cute::Stride<int64_t, cute::Int<1>, cute::Int<0>>>,
                "B is K-major [N, K] with one int64 row stride");

  // One half of a stage's B tile (the first: rows [0, BN/2)); the second is it + kHalfN kTileK.
  using SmemLayoutBHalf = decltype(cute::tile_to_shape(
      SmemLayoutAtomB{}, cute::make_shape(cute::Int<kHalfN>{}, cute::Int<kTileK>{})));
  // w as (row, k, half): one int64 row stride, the half's stride N' ld_b.
  using StrideBHalves = cute::Stride<int64_t, cute::Int<1>, int64_t>;
  using TileShapeHalf =
      cute::Shape<cute::_1, cute::Int<kHalfN>, cute::Int<kTileK>>;  // (-, BN/2, BK)
  using TMA_B_Halves = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{},
      cute::make_tensor(static_cast<InternalElementB const*>(nullptr),
                        cute::repeat_like(StrideBHalves{}, int32_t(0)), StrideBHalves{}),
      SmemLayoutBHalf{}, cute::make_shape(cute::Int<kHalfN>{}, cute::Int<kTileK>{}),
      cute::_1{}));

  struct Params : Base::Params {
    TMA_B_Halves tma_load_b_halves;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape problem_shapes, Arguments const& args,
                                        void* workspace) {
    // As the base does for its descriptors: a 16-byte-aligned placeholder address and unit
    // shapes; the device replaces address, dims and strides before the first load.
    auto const* placeholder = reinterpret_cast<InternalElementB const*>(
        reinterpret_cast<uint64_t>(args.ptr_B) & 0xFFFFFFFFFFFFFFF0);
    auto tensor = cute::make_tensor(
        placeholder, cute::make_layout(cute::make_shape(int32_t(1), int32_t(1), int32_t(1)),
                                       StrideBHalves{}));
    return Params{Base::to_underlying_arguments(problem_shapes, args, workspace),
                  cute::make_tma_copy(cute::SM90_TMA_LOAD{}, tensor, SmemLayoutBHalf{},
                                      cute::make_shape(cute::Int<kHalfN>{}, cute::Int<kTileK>{}),
                                      cute::_1{})};
  }

  // The halves view of problem (N, K)'s B: gate rows at half 0, up rows at half 1.
  template <class Int>
  CUTLASS_HOST_DEVICE static auto halves_tensor(InternalElementB const* ptr, Int N, Int K,
                                                int64_t ld_b) {
    const int32_t rows = int32_t(N) / 2;
    return cute::make_tensor(
        ptr, cute::make_layout(cute::make_shape(rows, int32_t(K), int32_t(2)),
                               StrideBHalves{ld_b, cute::_1{}, int64_t(rows) * ld_b}));
  }

  // TMA coordinates of the B halves, tiled: (BN/2, BK, n, k, half).
  template <class Int>
  CUTLASS_HOST_DEVICE static auto halves_tiles(TMA_B_Halves const& tma, Int N, Int K) {
    auto m = tma.get_tma_tensor(cute::make_shape(int32_t(N) / 2, int32_t(K), int32_t(2)));
    return cute::local_tile(m, TileShapeHalf{}, cute::make_coord(cute::_, cute::_, cute::_),
                            cute::Step<cute::X, cute::_1, cute::_1>{});
  }

  // Element offset, in a stage's B tile, of half `half`'s first entry.
  CUTLASS_HOST_DEVICE static constexpr int half_offset(int half) { return half * kHalfN * kTileK; }

  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL,
                                Params const& params) const {
    auto base = Base::load_init(problem_shape_MNKL, params);
    auto halves = halves_tiles(params.tma_load_b_halves, cute::get<1>(problem_shape_MNKL),
                               cute::get<2>(problem_shape_MNKL));
    return cute::make_tuple(cute::get<0>(base), cute::get<1>(base), halves);
  }

  template <class LoadInputs, class TensorMapA, class TensorMapB, class KTileIterator,
            class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline,
                           PipelineState smem_pipe_write, LoadInputs const& load_inputs,
                           cute::tuple<TensorMapA, TensorMapB> const& input_tensormaps,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter,
                           int k_tile_count, int, uint32_t, TensorStorage& shared_tensors) {
    using namespace cute;
    if (!elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    auto tma_a = params.tma_load_a.get_slice(0);
    auto tma_b = params.tma_load_b_halves.get_slice(0);
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    Tensor tAgA = tma_a.partition_S(get<0>(load_inputs)(_, _, m_coord, _, l_coord));
    Tensor tAsA = tma_a.partition_D(sA);                       // (TMA, TMA_M, TMA_K, PIPE)
    Tensor halves = get<2>(load_inputs);                       // (BN/2, BK, n, k, half)
    Tensor tBgGate = tma_b.partition_S(halves(_, _, n_coord, _, 0));  // (TMA, TMA_N, TMA_K, k)
    Tensor tBgUp = tma_b.partition_S(halves(_, _, n_coord, _, 1));
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      auto* sB = shared_tensors.smem_B.data() + stage * kStageElementsB;
      Tensor sGate = make_tensor(make_smem_ptr(sB + half_offset(0)), SmemLayoutBHalf{});
      Tensor sUp = make_tensor(make_smem_ptr(sB + half_offset(1)), SmemLayoutBHalf{});
      // The barrier expects the base's A + whole-B-tile bytes: the two halves are that tile.
      copy(params.tma_load_a.with(get<0>(input_tensormaps), *barrier, 0),
           tAgA(_, _, _, *k_tile_iter), tAsA(_, _, _, stage));
      copy(params.tma_load_b_halves.with(get<1>(input_tensormaps), *barrier, 0),
           tBgGate(_, _, _, *k_tile_iter), tma_b.partition_D(sGate));
      copy(params.tma_load_b_halves.with(get<1>(input_tensormaps), *barrier, 0),
           tBgUp(_, _, _, *k_tile_iter), tma_b.partition_D(sUp));
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }

  // The workspace's per-SM tensor maps start from A's and the halves descriptor.
  CUTLASS_DEVICE auto tensormaps_init(Params const& params, TensorMapStorage& shared_tensormaps,
                                      int32_t sm_count, int32_t sm_idx) {
    using namespace cute;
    TmaDescriptor* gmem = reinterpret_cast<TmaDescriptor*>(params.tensormaps);
    if (elect_one_sync()) {
      Tensor pA = make_tensor(params.tma_load_a.get_tma_descriptor(), Int<1>{}, Int<1>{});
      Tensor sA = make_tensor(make_smem_ptr(&shared_tensormaps.smem_tensormap_A), Int<1>{}, Int<1>{});
      Tensor pB = make_tensor(params.tma_load_b_halves.get_tma_descriptor(), Int<1>{}, Int<1>{});
      Tensor sB = make_tensor(make_smem_ptr(&shared_tensormaps.smem_tensormap_B), Int<1>{}, Int<1>{});
      copy(recast<uint128_t>(pA), recast<uint128_t>(sA));
      copy(recast<uint128_t>(pB), recast<uint128_t>(sB));
    }
    __syncwarp();
    return make_tuple(&gmem[sm_idx], &gmem[sm_idx + sm_count]);
  }

  // Problem next_group's dims and strides, A as the base writes them, B as the halves view.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE void replace_tensor_properties(TensorMapStorage& shared_tensormaps,
                                                Params const& params, int32_t next_group,
                                                ProblemShape_MNKL problem_shape_mnkl) {
    using namespace cute;
    const int32_t M = get<0>(problem_shape_mnkl);
    const int32_t N = get<1>(problem_shape_mnkl);
    const int32_t K = get<2>(problem_shape_mnkl);
    array<uint32_t, 5> shape_a = {1, 1, 1, 1, 1}, shape_b = {1, 1, 1, 1, 1};
    array<uint64_t, 5> stride_a = {0, 0, 0, 0, 0}, stride_b = {0, 0, 0, 0, 0};
    Tensor tensor_a = make_tensor(static_cast<InternalElementA const*>(nullptr),
                                  make_shape(M, K, Int<1>{}), params.dA[next_group]);
    Tensor tensor_b = halves_tensor(static_cast<InternalElementB const*>(nullptr), N, K,
                                    get<0>(params.dB[next_group]));
    detail::fill_tma_gmem_shape_stride(params.tma_load_a, tensor_a, shape_a, stride_a);
    detail::fill_tma_gmem_shape_stride(params.tma_load_b_halves, tensor_b, shape_b, stride_b);
    for (uint64_t& s : stride_a) s = s * sizeof_bits_v<InternalElementA> / 8;
    for (uint64_t& s : stride_b) s = s * sizeof_bits_v<InternalElementB> / 8;
    tma_descriptor_replace_dims_strides_in_shared_mem(shared_tensormaps.smem_tensormap_A, shape_a,
                                                      stride_a);
    tma_descriptor_replace_dims_strides_in_shared_mem(shared_tensormaps.smem_tensormap_B, shape_b,
                                                      stride_b);
  }

  template <class TensorMapA, class TensorMapB, class ProblemShape_MNKL>
  CUTLASS_DEVICE void tensormaps_perform_update(
      TensorMapStorage& shared_tensormaps, Params const& params,
      cute::tuple<TensorMapA, TensorMapB> const&, ProblemShape_MNKL problem_shape_mnkl,
      int32_t next_batch) {
    if (cute::elect_one_sync()) {
      // Both halves start at B_p: the base's address replacement serves the halves view too.
      Base::tensormaps_replace_global_address(shared_tensormaps, params, next_batch);
      replace_tensor_properties(shared_tensormaps, params, next_batch, problem_shape_mnkl);
    }
  }
};

}  // namespace grove
