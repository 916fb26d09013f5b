// Grouped bf16 GEMM, cooperative schedule, tile 128x256x64, cluster 1x1x1: the large-T
// configuration (DESIGN §4: best from T~4096, within 6% of the best everywhere).
#include "grouped_bf16_tn.cuh"

namespace {
using Config = grove::GroupedBf16Tn<cute::Shape<cute::_128, cute::_256, cute::_64>,
                                    cute::Shape<cute::_1, cute::_1, cute::_1>,
                                    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative,
                                    cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;
}  // namespace

GROVE_DEFINE_GROUPED_GEMM(grove_grouped_bf16_tn_coop_128x256_c11, Config)
