// Grouped bf16 GEMM-1 with SwiGLU fused (layout tn, packed gate/up B; see grouped_gemm.cuh
// and swiglu_epilogue.cuh): ping-pong, tile 64x128x64, cluster 1x1x1, for small T.
#include "grouped_gemm.cuh"

namespace {
using Config = grove::GroupedGemm<cutlass::bfloat16_t, GROVE_LAYOUT_TN,
                                  cute::Shape<cute::_64, cute::_128, cute::_64>,
                                  cute::Shape<cute::_1, cute::_1, cute::_1>,
                                  cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong,
                                  grove::EpilogueSwiglu>;
}  // namespace

GROVE_DEFINE_GROUPED_GEMM(grove_grouped_bf16_tn_swiglu_pingpong_64x128_c11, Config)
