// grouped_gemm.cuh: the CUTLASS 3.x sm_90a persistent ptr-array grouped GEMM behind every
// kernel of csrc/gemm/instantiations/ (one specialization per translation unit, so each
// compiles in about a minute and the build parallelises; the list is csrc/generate_kernels.py).
//
//   D_p[M_p, N_p] (row-major) = A_p[M_p, K_p] @ B_p[K_p, N_p],   bf16 or fp16, fp32 accumulate
//
//   layout (GROVE_GEMM_*)  A_p          B_p                       grouped  used for
//   M_GROUPED_NT           K-major      K-major ([N, K]: w1, w2)  M=rows   GEMM-1, GEMM-2
//   M_GROUPED_NN           K-major      N-major ([K, N]: w1, w2)  M=rows   dGEMM-2, dGEMM-1
//   K_GROUPED_TN           M-major      N-major (rows of [K, N])  K=rows   dW1 / dW2
//   M_GROUPED_NT_SWIGLU    as M_GROUPED_NT, SwiGLU in the epilogue: D_p [M_p, N_p / 2] =
//                          silu(gate) * up, B_p = w1 / a1 as they are ([gate; up] rows): each
//                          tile reads gate and up rows as two TMA boxes (gate_up_mainloop.cuh)
// Other epilogues: D = acc through CUTLASS's ptr-array TMA store of the schedule.
//
// Problem shapes, pointers and leading dimensions live only in device memory, written by
// grove_grouped_args_fill (grouped_gemm_args.cu); CUTLASS is initialised with host shapes =
// nullptr (docs/design.md §4: initialising with host shapes of an earlier routing leaves output
// unwritten), so fill + GEMM are stream-ordered, host-sync free and CUDA-graph capturable. In
// the k-grouped layout a problem with no rows is skipped by CUTLASS (M = 0) and its D zeroed
// by a separate kernel: CUTLASS leaves a K = 0 accumulator uninitialised.
// Torch-free: raw pointers, a cudaStream_t and an int error code.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "gate_up_mainloop.cuh"
#include "grove_cuda.h"
#include "swiglu_epilogue.cuh"

namespace grove {

template <int Layout>
struct OperandLayouts;
template <>
struct OperandLayouts<GROVE_GEMM_M_GROUPED_NT> {
  using A = cutlass::layout::RowMajor;     // [M, K], K contiguous
  using B = cutlass::layout::ColumnMajor;  // (K, N) column-major == [N, K] row-major
};
template <>
struct OperandLayouts<GROVE_GEMM_M_GROUPED_NT_SWIGLU> : OperandLayouts<GROVE_GEMM_M_GROUPED_NT> {};
template <>
struct OperandLayouts<GROVE_GEMM_M_GROUPED_NN> {
  using A = cutlass::layout::RowMajor;  // [M, K], K contiguous
  using B = cutlass::layout::RowMajor;  // [K, N], N contiguous
};
template <>
struct OperandLayouts<GROVE_GEMM_K_GROUPED_TN> {
  using A = cutlass::layout::ColumnMajor;  // (M, K) with M contiguous: rows of [K, M]
  using B = cutlass::layout::RowMajor;     // [K, N], N contiguous: rows of [K, N]
};

template <int Dtype>
struct ElementOf;
template <>
struct ElementOf<GROVE_DTYPE_BF16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct ElementOf<GROVE_DTYPE_FP16> {
  using type = cutlass::half_t;
};

// The mainloop and TMA-store epilogue schedules of a GROVE_SCHEDULE_*.
template <int Schedule>
struct SchedulesOf;
template <>
struct SchedulesOf<GROVE_SCHEDULE_COOP> {
  using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};
template <>
struct SchedulesOf<GROVE_SCHEDULE_PINGPONG> {
  using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};

// grouped_gemm_args.cu writes plain int32[3] shapes and one int64 per operand for the stride of
// its non-unit mode: each CUTLASS stride must be exactly one int64 plus static 1 / 0 modes.
template <class Stride>
constexpr bool is_one_int64_stride() {
  using namespace cute;
  return sizeof(Stride) == sizeof(int64_t) &&
         (std::is_same<Stride, cute::Stride<int64_t, Int<1>, Int<0>>>::value ||
          std::is_same<Stride, cute::Stride<Int<1>, int64_t, Int<0>>>::value);
}

// Epilogue tag of the M_GROUPED_NT_SWIGLU layout: GEMM-1 with SwiGLU fused (swiglu_epilogue.cuh).
struct EpilogueSwiglu {};

template <class Element, class Accumulator, class LayoutD, int Alignment, class TileShape,
          class ClusterShape, class EpilogueSchedule>
struct EpilogueFor {
  // No C operand (ElementC = void): D = acc, nothing is read back.
  using type = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, Accumulator,
      void, LayoutD*, Alignment, Element, LayoutD*, Alignment, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, Accumulator, void>>::CollectiveOp;
};
template <class Element, class Accumulator, class LayoutD, int Alignment, class TileShape,
          class ClusterShape>
struct EpilogueFor<Element, Accumulator, LayoutD, Alignment, TileShape, ClusterShape,
                   EpilogueSwiglu> {
  using type = SwigluEpilogue<Element, TileShape>;
};

// One kernel of the table: the arguments of GROVE_FOR_EACH_GEMM_KERNEL (grove_gemm_kernels.h).
template <int Dtype, int Layout, int Schedule, int BM, int BN, int BK, int CM, int CN>
struct GroupedGemm {
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // M, N, K
  using Element = typename ElementOf<Dtype>::type;
  using Accumulator = float;
  using TileShape = cute::Shape<cute::Int<BM>, cute::Int<BN>, cute::Int<BK>>;
  using ClusterShape = cute::Shape<cute::Int<CM>, cute::Int<CN>, cute::_1>;
  using LayoutA = typename OperandLayouts<Layout>::A;
  using LayoutB = typename OperandLayouts<Layout>::B;
  using LayoutD = cutlass::layout::RowMajor;  // [M, N], N contiguous
  static constexpr int kLayout = Layout;
  static constexpr int kDtype = Dtype;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 8 elements

  static constexpr bool kSwiglu = Layout == GROVE_GEMM_M_GROUPED_NT_SWIGLU;
  using KernelSchedule = typename SchedulesOf<Schedule>::Kernel;
  using EpilogueSchedule =
      std::conditional_t<kSwiglu, EpilogueSwiglu, typename SchedulesOf<Schedule>::Epilogue>;
  using Epilogue = typename EpilogueFor<Element, Accumulator, LayoutD, kAlignment, TileShape,
                                        ClusterShape, EpilogueSchedule>::type;

  using BuiltMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element,
      LayoutB*, kAlignment, Accumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Mainloop =
      std::conditional_t<kSwiglu, GateUpMainloop<BuiltMainloop>, BuiltMainloop>;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape = typename ProblemShape::UnderlyingProblemShape;

  static_assert(is_one_int64_stride<StrideA>(), "A stride must be one int64");
  static_assert(is_one_int64_stride<StrideB>(), "B stride must be one int64");
  static_assert(std::is_same<StrideD, cute::Stride<int64_t, cute::Int<1>, cute::Int<0>>>::value,
                "D stride must be (ld, 1, 0)");
  static_assert(sizeof(Shape) == 3 * sizeof(int32_t), "shape must be int32[3]");
  // The mainloop's stage count leaves room for the epilogue's shared memory; a kernel over the
  // limit would only fail at launch.
  static constexpr int kStages = Mainloop::DispatchPolicy::Stages;
  static constexpr size_t kSharedBytes = sizeof(typename Kernel::SharedStorage);
  static_assert(kSharedBytes <= size_t(cutlass::gemm::collective::detail::sm90_smem_capacity_bytes),
                "shared memory over the sm90 limit");

  static constexpr size_t kWorkspaceAlign = 256;

  // sections: the launch's (for the SwiGLU epilogue's row scales; null when only sizing).
  static typename Gemm::Arguments arguments(void* args_buffer, int num_problems, int sm_count,
                                            const GroveGemmSection* sections = nullptr,
                                            int num_sections = 0) {
    const GroveGroupedArgsView v = grove_grouped_args_view(args_buffer, num_problems);
    cutlass::KernelHardwareInfo hw_info;
    cudaGetDevice(&hw_info.device_id);
    hw_info.sm_count = sm_count;

    typename Gemm::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape = {num_problems, reinterpret_cast<Shape*>(v.shapes), nullptr};
    args.mainloop.ptr_A = reinterpret_cast<Element const**>(v.ptr_a);
    args.mainloop.dA = reinterpret_cast<StrideA*>(v.ld_a);
    args.mainloop.ptr_B = reinterpret_cast<Element const**>(v.ptr_b);
    args.mainloop.dB = reinterpret_cast<StrideB*>(v.ld_b);
    if constexpr (kSwiglu) {
      auto& epi = args.epilogue;
      epi.num_sections = sections ? num_sections : 0;
      for (int s = 0; s < epi.num_sections; ++s) {
        epi.first_problem[s] = sections[s].first_problem;
        epi.d_base[s] = static_cast<Element const*>(sections[s].d);
        epi.ldd[s] = sections[s].ldd;
        epi.row_scale[s] = sections[s].row_scale;
      }
    } else {
      auto& fusion = args.epilogue.thread;
      fusion.alpha = Accumulator(1);
      fusion.beta = Accumulator(0);
      fusion.alpha_ptr = nullptr;
      fusion.beta_ptr = nullptr;
      fusion.alpha_ptr_array = nullptr;
      fusion.beta_ptr_array = nullptr;
      args.epilogue.ptr_C = nullptr;
      args.epilogue.dC = nullptr;
    }
    args.epilogue.ptr_D = reinterpret_cast<Element**>(v.ptr_d);
    args.epilogue.dD = reinterpret_cast<StrideD*>(v.ld_d);
    args.hw_info = hw_info;
    return args;
  }

  static size_t cutlass_workspace_offset(int num_problems) {
    const size_t b = grove_grouped_args_bytes(num_problems);
    return (b + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
  }

  static size_t workspace_size(int num_problems, int sm_count) {
    if (num_problems <= 0) return 0;
    if (sm_count <= 0) sm_count = grove_device_sm_count();
    if (sm_count <= 0) return 0;
    auto args = arguments(nullptr, num_problems, sm_count);
    return cutlass_workspace_offset(num_problems) + Gemm::get_workspace_size(args);
  }

  static int run(const GroveGemmSection* sections, int num_sections, const void* start,
                 const void* count, int index_bytes, int num_problems, int sm_count,
                 void* workspace, size_t workspace_bytes, cudaStream_t stream) {
#if defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
    if (num_problems < 0) return GROVE_ERR_INVALID_ARGUMENT;
    if (num_problems == 0) return GROVE_OK;
    if (sm_count <= 0) sm_count = grove_device_sm_count();
    if (sm_count <= 0) return GROVE_ERR_CUDA;
    if (!workspace || workspace_bytes < workspace_size(num_problems, sm_count))
      return GROVE_ERR_WORKSPACE_TOO_SMALL;
    int rc = grove_grouped_args_fill(kLayout, sections, num_sections, start, count, index_bytes,
                                     num_problems, workspace, stream);
    if (rc != GROVE_OK) return rc;
    if (kLayout == GROVE_GEMM_K_GROUPED_TN) {
      rc = grove_grouped_zero_empty(kDtype, sections, num_sections, start, count, index_bytes,
                                    num_problems, stream);
      if (rc != GROVE_OK) return rc;
    }
    auto args = arguments(workspace, num_problems, sm_count, sections, num_sections);
    void* cutlass_workspace =
        static_cast<char*>(workspace) + cutlass_workspace_offset(num_problems);
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return GROVE_ERR_CUTLASS;
    if (gemm.initialize(args, cutlass_workspace, stream) != cutlass::Status::kSuccess)
      return GROVE_ERR_CUTLASS;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return GROVE_ERR_CUTLASS;
    return cudaGetLastError() == cudaSuccess ? GROVE_OK : GROVE_ERR_CUDA;
#else
    return GROVE_ERR_NOT_COMPILED;
#endif
  }
};

}  // namespace grove

// The two extern "C" launchers grove_<NAME> and grove_<NAME>_workspace_size of one kernel
// (declared in grove_cuda.h); the arguments are those of GROVE_FOR_EACH_GEMM_KERNEL.
#define GROVE_DEFINE_GEMM_KERNEL(NAME, DTYPE, LAYOUT, SCHEDULE, BM, BN, BK, CM, CN)              \
  using grove_##NAME##_t = grove::GroupedGemm<DTYPE, LAYOUT, SCHEDULE, BM, BN, BK, CM, CN>;     \
  extern "C" size_t grove_##NAME##_workspace_size(int num_problems, int sm_count) {             \
    return grove_##NAME##_t::workspace_size(num_problems, sm_count);                            \
  }                                                                                             \
  extern "C" int grove_##NAME(const GroveGemmSection* sections, int num_sections,               \
                              const void* start, const void* count, int index_bytes,            \
                              int num_problems, int sm_count, void* workspace,                  \
                              size_t workspace_bytes, cudaStream_t stream) {                    \
    return grove_##NAME##_t::run(sections, num_sections, start, count, index_bytes,             \
                                 num_problems, sm_count, workspace, workspace_bytes, stream);   \
  }
