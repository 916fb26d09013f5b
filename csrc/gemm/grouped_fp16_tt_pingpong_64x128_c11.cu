// Grouped fp16 GEMM, layout tt (see grouped_gemm.cuh):
// ping-pong, tile 64x128x64, cluster 1x1x1:
// small T (DESIGN §4: best up to T~1024 for tn).
#include "grouped_gemm.cuh"

namespace {
using Config = grove::GroupedGemm<cutlass::half_t, GROVE_LAYOUT_TT,
                                  cute::Shape<cute::_64, cute::_128, cute::_64>,
                                  cute::Shape<cute::_1, cute::_1, cute::_1>,
                                  cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong,
                                  cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>;
}  // namespace

GROVE_DEFINE_GROUPED_GEMM(grove_grouped_fp16_tt_pingpong_64x128_c11, Config)
