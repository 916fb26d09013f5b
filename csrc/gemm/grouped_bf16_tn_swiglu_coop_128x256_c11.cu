// Grouped bf16 GEMM-1 with SwiGLU fused (layout tn, packed gate/up B; see grouped_gemm.cuh
// and swiglu_epilogue.cuh): cooperative, tile 128x256x64, cluster 1x1x1, for large T.
#include "grouped_gemm.cuh"

namespace {
using Config = grove::GroupedGemm<cutlass::bfloat16_t, GROVE_LAYOUT_TN,
                                  cute::Shape<cute::_128, cute::_256, cute::_64>,
                                  cute::Shape<cute::_1, cute::_1, cute::_1>,
                                  cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative,
                                  grove::EpilogueSwiglu>;
}  // namespace

GROVE_DEFINE_GROUPED_GEMM(grove_grouped_bf16_tn_swiglu_coop_128x256_c11, Config)
