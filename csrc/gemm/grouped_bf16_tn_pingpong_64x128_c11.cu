// Grouped bf16 GEMM, ping-pong schedule, tile 64x128x64, cluster 1x1x1: the small-T
// configuration (DESIGN §4: best up to T~1024).
#include "grouped_bf16_tn.cuh"

namespace {
using Config = grove::GroupedBf16Tn<cute::Shape<cute::_64, cute::_128, cute::_64>,
                                    cute::Shape<cute::_1, cute::_1, cute::_1>,
                                    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong,
                                    cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>;
}  // namespace

GROVE_DEFINE_GROUPED_GEMM(grove_grouped_bf16_tn_pingpong_64x128_c11, Config)
