// grove_cuda.h: the C interface of the torch-free CUDA objects of grove-kernels (csrc/*.cu).
//
// Every launcher takes raw device pointers, sizes and a cudaStream_t, never blocks the host,
// never allocates, and returns 0 on success or a GROVE_ERR_* code (see grove_cuda_error_string).
// This header is plain C/C++ with no CUDA or torch include, so the g++-compiled binding
// (csrc/bindings.cpp) can include it without the CUDA toolkit's headers.
#ifndef GROVE_CUDA_H_
#define GROVE_CUDA_H_

#include <stddef.h>
#include <stdint.h>

// Same declaration as the CUDA runtime's (driver_types.h); repeating an identical typedef is legal.
typedef struct CUstream_st* cudaStream_t;

#include "grove_rows.h"  // GROVE_DTYPE_*, the row kernels (gather, SwiGLU, combine)

#ifdef __cplusplus
extern "C" {
#endif

enum {
  GROVE_OK = 0,
  GROVE_ERR_INVALID_ARGUMENT = 1,  // bad sizes, null pointer, misalignment, unknown config
  GROVE_ERR_WORKSPACE_TOO_SMALL = 2,
  GROVE_ERR_CUDA = 3,              // a CUDA runtime call failed (launch, attribute query)
  GROVE_ERR_CUTLASS = 4,           // CUTLASS can_implement / initialize / run refused
  GROVE_ERR_NOT_COMPILED = 5,      // the object was built without sm_90a support
};

const char* grove_cuda_error_string(int code);

// ---------------------------------------------------------------------------------------------
// Grouped GEMM over the problems of a Plan:  D_p = A_p @ B_p  (bf16 or fp16, fp32 accumulation)
//
// Problems are split into at most GROVE_MAX_SEGMENTS segments (experts, then adjugates), each
// with its own sizes and operand tensors. Problem p (global index) belongs to the segment s with
// first_problem_s <= p < first_problem_s + num_problems_s; j = p - first_problem_s; its plan
// rows are [start[p], start[p] + count[p]) (absolute; segment-local row = r - row_base_s).
//
// Rows layouts (tn, tt): a problem's M is its row count; N = n_s, K = k_s.
//   A_p = a_s + local_row * lda_s     [M, K] K-major (rows of the segment's [rows_s, K] buffer)
//   B_p = b_s + j * b_problem_stride_s
//         tn: [N, K] K-major, row stride ldb_s (w1 / w2 as stored: GEMM-1, GEMM-2)
//         tt: [K, N] N-major, row stride ldb_s (the same weights transposed: dGEMM-2, dGEMM-1)
//   D_p = d_s + local_row * ldd_s     [M, N] row-major
// tn_swiglu (GEMM-1 with SwiGLU fused): as tn, with B_p holding gate and up rows interleaved in
//   blocks of 8 (grove_kernels.cuda.pack_gate_up) and N = n_s = 2 x the output width: D_p is
//   [M, N / 2], D[m, 8q + r] = silu(acc[m, 16q + r]) * acc[m, 16q + 8 + r]; n_s % 16 == 0.
// Weight-gradient layout (nt): a problem's K is its row count; M = m_s, N = n_s.
//   A_p = a_s + local_row * lda_s     (M, K) M-major: the problem's rows of a [rows_s, M] buffer
//   B_p = b_s + local_row * ldb_s     [K, N] N-major: the problem's rows of a [rows_s, N] buffer
//   D_p = d_s + j * d_problem_stride_s   [M, N] row-major, row stride ldd_s (dW_j)
//   Problems without rows are zeroed (grove_grouped_zero_empty), not left to CUTLASS.
// Rows outside [row_base_s, row_base_s + rows_s) are clamped away (never out of bounds).
// ---------------------------------------------------------------------------------------------
#define GROVE_MAX_SEGMENTS 2

enum { GROVE_LAYOUT_TN = 0, GROVE_LAYOUT_TT = 1, GROVE_LAYOUT_NT = 2, GROVE_LAYOUT_TN_SWIGLU = 3 };

typedef struct GroveGemmSegment {
  const void* a;
  const void* b;
  void* d;
  int64_t lda, ldb, ldd;        // in elements: the stride of each operand's non-unit mode
  int64_t b_problem_stride;     // rows layouts: elements between problems' B
  int64_t d_problem_stride;     // nt: elements between problems' D
  int64_t row_base;             // absolute plan row of this segment's row 0
  int64_t rows;                 // rows of the segment's row buffers
  int32_t m, n, k;              // m: nt only; k: rows layouts only
  int32_t first_problem, num_problems;
} GroveGemmSegment;

// The device arguments of a CUTLASS ptr-array grouped GEMM, laid out in one buffer:
//   int32 shapes[P][3] (M, N, K) | ptr A[P] | ptr B[P] | ptr D[P] | int64 ldA[P] | ldB[P] | ldD[P]
// each block 128-byte aligned. The GEMM objects static_assert that CUTLASS's own types match.
size_t grove_grouped_args_bytes(int num_problems);

// Fill the argument buffer on the device from start[P] / count[P] (int32 when index_bytes == 4,
// int64 when 8) for `layout` (GROVE_LAYOUT_*). One kernel launch on `stream`; no host
// synchronisation (CUDA-graph safe).
int grove_grouped_args_fill(int layout, const GroveGemmSegment* segments, int num_segments,
                            const void* start, const void* count, int index_bytes,
                            int num_problems, void* args, cudaStream_t stream);

// nt layout: zero D_p (m_s x n_s, row stride ldd_s) of every problem with count[p] == 0.
// dtype: GROVE_DTYPE_BF16 or GROVE_DTYPE_FP16 (grove_rows.h). One launch; no host sync.
int grove_grouped_zero_empty(int dtype, const GroveGemmSegment* segments, int num_segments,
                             const void* start, const void* count, int index_bytes,
                             int num_problems, cudaStream_t stream);

// Pointers into an argument buffer (host arithmetic only).
typedef struct GroveGroupedArgsView {
  int32_t* shapes;
  const void** ptr_a;
  const void** ptr_b;
  void** ptr_d;
  int64_t* ld_a;
  int64_t* ld_b;
  int64_t* ld_d;
} GroveGroupedArgsView;
GroveGroupedArgsView grove_grouped_args_view(void* args, int num_problems);

// ---------------------------------------------------------------------------------------------
// CUTLASS 3.x sm_90a persistent ptr-array grouped GEMMs, one specialization per object
// (csrc/gemm/grouped_<dtype>_<layout>_<config>.cu). Each exposes
//   size_t grove_grouped_<dtype>_<layout>_<config>_workspace_size(int num_problems,
//                                                                 int sm_count);
//   int    grove_grouped_<dtype>_<layout>_<config>(segments, num_segments, start, count,
//                                         index_bytes, num_problems, sm_count, workspace,
//                                         workspace_bytes, stream);
// The workspace holds the argument buffer followed by CUTLASS's own workspace; the launcher
// fills the arguments on the device (grove_grouped_args_fill), initialises CUTLASS with
// device-side problem shapes only (host shapes stay null) and launches on `stream`.
// sm_count: multiprocessors of the current device (0: query it with cudaDeviceGetAttribute).
// ---------------------------------------------------------------------------------------------
#define GROVE_DECLARE_GROUPED_GEMM(NAME)                                                      \
  size_t NAME##_workspace_size(int num_problems, int sm_count);                               \
  int NAME(const GroveGemmSegment* segments, int num_segments, const void* start,             \
           const void* count, int index_bytes, int num_problems, int sm_count,                \
           void* workspace, size_t workspace_bytes, cudaStream_t stream);

// The specializations built (keep in step with csrc/gemm/ and bindings.cpp's table).
#define GROVE_FOR_EACH_GROUPED_GEMM(X)                                                          \
  X(bf16, tn, coop_128x256_c11)                                                               \
  X(bf16, tn, pingpong_64x128_c11)                                                            \
  X(bf16, tn_swiglu, coop_128x256_c11)                                                        \
  X(bf16, tn_swiglu, pingpong_64x128_c11)                                                     \
  X(bf16, tt, coop_128x256_c11)                                                               \
  X(bf16, tt, pingpong_64x128_c11)                                                            \
  X(bf16, nt, coop_128x256_c11)                                                               \
  X(fp16, tn, coop_128x256_c11)                                                               \
  X(fp16, tn, pingpong_64x128_c11)                                                            \
  X(fp16, tn_swiglu, coop_128x256_c11)                                                        \
  X(fp16, tn_swiglu, pingpong_64x128_c11)                                                     \
  X(fp16, tt, coop_128x256_c11)                                                               \
  X(fp16, tt, pingpong_64x128_c11)                                                            \
  X(fp16, nt, coop_128x256_c11)

#define GROVE_DECLARE_ONE(DT, LAYOUT, CONFIG) \
  GROVE_DECLARE_GROUPED_GEMM(grove_grouped_##DT##_##LAYOUT##_##CONFIG)
GROVE_FOR_EACH_GROUPED_GEMM(GROVE_DECLARE_ONE)
#undef GROVE_DECLARE_ONE

// Multiprocessor count of the current device, or -1 on error.
int grove_device_sm_count(void);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // GROVE_CUDA_H_
