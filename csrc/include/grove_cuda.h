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
// Grouped GEMM over the problems of a Plan:  D_p[M_p, N_s] = A_p[M_p, K_s] @ B_p[N_s, K_s]^T
//
// Problems are split into at most GROVE_MAX_SEGMENTS segments (experts, then adjugates), each
// with its own N, K and operand tensors. Problem p (global index) belongs to the segment s with
// first_problem_s <= p < first_problem_s + num_problems_s and j = p - first_problem_s:
//   rows  r in [start[p], start[p] + count[p])   (absolute plan rows; segment-local row is
//                                                  r - row_base_s)
//   A_p = a_s + (start[p] - row_base_s) * lda_s      row-major [M, K], leading dim lda_s
//   B_p = b_s + j * b_problem_stride_s               [N, K] with K contiguous, leading dim ldb_s
//   D_p = d_s + (start[p] - row_base_s) * ldd_s      row-major [M, N], leading dim ldd_s
// Rows outside [row_base_s, row_base_s + rows_s) are clamped away (M shrinks, never OOB).
// All element types are bf16 (A, B, D), accumulation fp32.
// ---------------------------------------------------------------------------------------------
#define GROVE_MAX_SEGMENTS 2

typedef struct GroveGemmSegment {
  const void* a;
  const void* b;
  void* d;
  int64_t lda, ldb, ldd;        // in elements
  int64_t b_problem_stride;     // in elements
  int64_t row_base;             // absolute plan row of this segment's row 0
  int64_t rows;                 // rows of a_s / d_s
  int32_t n, k;
  int32_t first_problem, num_problems;
} GroveGemmSegment;

// The device arguments of a CUTLASS ptr-array grouped GEMM, laid out in one buffer:
//   int32 shapes[P][3] (M, N, K) | ptr A[P] | ptr B[P] | ptr D[P] | int64 ldA[P] | ldB[P] | ldD[P]
// each block 128-byte aligned. The GEMM objects static_assert that CUTLASS's own types match.
size_t grove_grouped_args_bytes(int num_problems);

// Fill the argument buffer on the device from start[P] / count[P] (int32 when index_bytes == 4,
// int64 when 8). One kernel launch on `stream`; no host synchronisation (CUDA-graph safe).
int grove_grouped_args_fill(const GroveGemmSegment* segments, int num_segments,
                            const void* start, const void* count, int index_bytes,
                            int num_problems, void* args, cudaStream_t stream);

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
// CUTLASS 3.x sm_90a persistent ptr-array grouped GEMMs, one configuration per object
// (csrc/gemm/grouped_bf16_tn_<config>.cu). Each exposes
//   size_t grove_grouped_bf16_tn_<config>_workspace_size(int num_problems, int sm_count);
//   int    grove_grouped_bf16_tn_<config>(segments, num_segments, start, count, index_bytes,
//                                         num_problems, sm_count, workspace, workspace_bytes,
//                                         stream);
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

GROVE_DECLARE_GROUPED_GEMM(grove_grouped_bf16_tn_coop_128x256_c11)
GROVE_DECLARE_GROUPED_GEMM(grove_grouped_bf16_tn_pingpong_64x128_c11)

// Multiprocessor count of the current device, or -1 on error.
int grove_device_sm_count(void);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // GROVE_CUDA_H_
