// swiglu_epilogue.cuh: GEMM-1's epilogue with SwiGLU fused, for the ptr-array grouped GEMM of
// grouped_gemm.cuh (layout M_GROUPED_NT_SWIGLU, B = w1 / a1 packed by
// grove_kernels.cuda.pack_gate_up).
//
//   acc [M, 2N] = x rows @ packed(w1)^T      packed row 16q + r     = gate row 8q + r  (r < 8)
//                                            packed row 16q + 8 + r = up   row 8q + r
//   D   [M, N]  D[m, 8q + r] = silu(acc[m, 16q + r]) * acc[m, 16q + 8 + r]  (fp32, then D's type)
//
// Why interleave by 8: in a wgmma accumulator fragment a thread holds, for each of its rows, the
// column pairs 8j + 2(lane % 4) + {0, 1} for every j of the atom's N, so with blocks of 8 the
// gate and up values of one output sit in the same thread (fragment index i and i + 4): the
// epilogue needs no shared memory and no exchange between threads, and any tile N that is a
// multiple of 16 works. tests/cuda/swiglu_epilogue_check.cu runs this epilogue on the host for
// every thread of every fused kernel and checks that pairing and the bounds.
//
// The h = [gate | up] pre-activations are never stored, which saves writing and re-reading
// [R, 2N] and one launch per forward (docs/design.md §3): it serves forwards that keep nothing
// for a backward; a training forward stores h with the plain GEMM-1 and runs SwiGLU after it.
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/arch/memory.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/numeric_conversion.h"
#include "cutlass/numeric_types.h"

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

namespace grove {

// Operator-style collective epilogue (wrapped in CUTLASS's Sm90TmaWarpSpecializedAdapter by
// grouped_gemm.cuh): per work tile it reads the accumulator fragment and stores straight from
// registers to global memory, two outputs (4 bytes) per store.
template <class Element>
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

  struct SharedStorage {};
  using TensorMapStorage = SharedStorage;

  struct Arguments {
    ElementD** ptr_D = nullptr;  // per problem: D_p, [M_p, N_p / 2] with row stride dD[p]
    StrideD dD = nullptr;
  };
  using Params = Arguments;

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
  // (bindings.cpp) on the section sizes, which bound every problem's N.
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

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
            class FrgLayout, class TiledMma, class ResidueMNK>
  CUTLASS_HOST_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl,
                                      BlockShapeMNK blk_shape_mnk, BlockCoordMNKL blk_coord_mnkl,
                                      cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                      TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    using namespace cute;
    static_assert(is_static<FrgLayout>::value, "accumulator layout must be static");
    static_assert(is_static<BlockShapeMNK>::value, "tile shape must be static");
    static_assert(size<1>(BlockShapeMNK{}) % 16 == 0, "tile N must hold whole gate/up blocks");
    // The wgmma value mode is (2 columns, 2 rows 8 apart, N/8 column blocks): groups of 8
    // consecutive fragment entries are one gate block then its up block (checked on the host
    // by tests/cuda/swiglu_epilogue_check.cu for every fused kernel).
    static_assert(size<0>(FrgLayout{}) % 8 == 0, "fragment value mode must hold gate/up pairs");

    const int M = get<0>(problem_shape_mnkl);
    const int N = get<1>(problem_shape_mnkl);  // packed: 2 x the output width
    const int l = get<3>(blk_coord_mnkl);
    ElementD* d = params_.ptr_D[l];
    const int64_t ldd = get<0>(params_.dD[l]);

    auto thr_mma = tiled_mma.get_thread_slice(thread_idx);
    Tensor coord = local_tile(make_identity_tensor(make_shape(M, N)), take<0, 2>(blk_shape_mnk),
                              make_coord(get<0>(blk_coord_mnkl), get<1>(blk_coord_mnkl)));
    Tensor thr_coord = thr_mma.partition_C(coord);  // (MMA, MMA_M, MMA_N) -> (m, n)

    cutlass::NumericArrayConverter<ElementD, float, 2> convert;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(accumulators); i += 8) {
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < 4; r += 2) {  // the thread's two rows of this block
        const int m = get<0>(thr_coord(i + r));
        const int n = get<1>(thr_coord(i + r));
        // N % 16 == 0: a gate column inside the problem has its up partner inside too.
        const bool inside = m < M && n < N;
        cutlass::Array<float, 2> out;
        out[0] = silu_mul(accumulators(i + r), accumulators(i + r + 4));
        out[1] = silu_mul(accumulators(i + r + 1), accumulators(i + r + 5));
        cutlass::AlignedArray<ElementD, 2> pair;
        static_cast<cutlass::Array<ElementD, 2>&>(pair) = convert(out);
        const int64_t col = (n >> 4) * 8 + (n & 7);  // even: a 4-byte aligned pair
        ElementD* dst = d + static_cast<int64_t>(m) * ldd + col;
#if defined(__CUDA_ARCH__)
        // A predicated st.global (a plain store through the generic pointer compiles to ST.E).
        cutlass::arch::global_store<cutlass::AlignedArray<ElementD, 2>, 4>(pair, dst, inside);
#else
        if (inside) *reinterpret_cast<cutlass::AlignedArray<ElementD, 2>*>(dst) = pair;
#endif
      }
    }
  }

 private:
  Params params_;
};

}  // namespace grove
