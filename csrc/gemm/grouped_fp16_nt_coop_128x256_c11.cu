// Grouped fp16 GEMM, layout nt (see grouped_gemm.cuh):
// cooperative, tile 128x256x64, cluster 1x1x1:
// large T (DESIGN §4: best from T~4096, within 6% of the best everywhere for tn).
#include "grouped_gemm.cuh"

namespace {
using Config = grove::GroupedGemm<cutlass::half_t, GROVE_LAYOUT_NT,
                                  cute::Shape<cute::_128, cute::_256, cute::_64>,
                                  cute::Shape<cute::_1, cute::_1, cute::_1>,
                                  cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative,
                                  cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;
}  // namespace

GROVE_DEFINE_GROUPED_GEMM(grove_grouped_fp16_nt_coop_128x256_c11, Config)
