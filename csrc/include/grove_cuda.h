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

#include "grove_elementwise.h"  // GROVE_DTYPE_*, the element-wise kernels (gather, SwiGLU, combine)
#include "grove_gemm_kernels.h"  // GROVE_FOR_EACH_GEMM_KERNEL (generated)

#ifdef __cplusplus
extern "C" {
#endif

enum {
  GROVE_OK = 0,
  GROVE_ERR_INVALID_ARGUMENT = 1,  // bad sizes, null pointer, misalignment, unknown layout
  GROVE_ERR_WORKSPACE_TOO_SMALL = 2,
  GROVE_ERR_CUDA = 3,              // a CUDA runtime call failed (launch, attribute query)
  GROVE_ERR_CUTLASS = 4,           // CUTLASS can_implement / initialize / run refused
  GROVE_ERR_NOT_COMPILED = 5,      // the object was built without sm_90a support
};

const char* grove_cuda_error_string(int code);

// ---------------------------------------------------------------------------------------------
// Grouped GEMM over the problems of a Plan:  D_p = A_p @ B_p  (bf16 or fp16, fp32 accumulation)
//
// A plan's rows form two sections, experts then adjugates, each with its own sizes and operand
// tensors (GroveGemmSection; at most GROVE_MAX_SECTIONS). Problem p (global index) belongs to
// the section s with first_problem_s <= p < first_problem_s + num_problems_s; j = p -
// first_problem_s; its plan rows are [start[p], start[p] + count[p]) (absolute;
// section-local row = r - row_base_s).
//
// A layout (GROVE_GEMM_*) says which axis is grouped (m: a problem's M is its row count; k:
// its K is) and the operand majors in DeepGEMM's letters, A's then B's, for D = A @ B with
// A (M, K) and B (K, N): n = stored as such, t = stored transposed.
//   nt  A [M, K] K-major   B [N, K] K-major
//   nn  A [M, K] K-major   B [K, N] N-major
//   tn  A [K, M] M-major   B [K, N] N-major
// Kernel names say the same (csrc/README.md): sm90_bf16_m_grouped_nt_coop_128x256x64_c1x1.
//
// M_GROUPED_NT (GEMM-1, GEMM-2), M_GROUPED_NN (dGEMM-2, dGEMM-1): M = the problem's rows,
//   N = n_s, K = k_s.
//   A_p = a_s + local_row * lda_s     [M, K] K-major (rows of the section's [rows_s, K] buffer)
//   B_p = b_s + (j / b_shared_s) * b_problem_stride_s   (b_shared_s problems read one B: the
//         folded layout's adjugate problems, one per expert, read the A1 of the expert's group)
//         nt: [N, K] K-major, row stride ldb_s (w1 / w2 as stored)
//         nn: [K, N] N-major, row stride ldb_s (w2 / w1 as stored, read as [K, N])
//   D_p = d_s + local_row * ldd_s     [M, N] row-major
// M_GROUPED_NT_SWIGLU (GEMM-1 with SwiGLU fused): as M_GROUPED_NT, B_p = w1 / a1 as stored
//   (rows [0, N/2) gate, [N/2, N) up) and N = n_s = 2 x the output width: D_p is [M, N / 2],
//   D[m, j] = s * silu(acc[m, j]) * acc[m, N/2 + j], s = row_scale_s[local_row] (1 when
//   row_scale_s is null); n_s % 16 == 0.
// K_GROUPED_TN (dW1, dW2): K = the problem's rows; M = m_s, N = n_s.
//   A_p = a_s + local_row * lda_s     [K, M] M-major: the problem's rows of a [rows_s, M] buffer
//   B_p = b_s + local_row * ldb_s     [K, N] N-major: the problem's rows of a [rows_s, N] buffer
//   D_p = d_s + j * d_problem_stride_s   [M, N] row-major, row stride ldd_s (dW_j)
//   Problems without rows are zeroed (grove_grouped_zero_empty), not left to CUTLASS.
// Rows outside [row_base_s, row_base_s + rows_s) are clamped away (never out of bounds).
// Two sections may read the same row buffers (a_s, d_s views of one tensor): the folded
// layout's GEMM-1 runs each expert over all its rows (section 0) and, over its leader prefix,
// the adjugate of its group (section 1) on the same gathered rows, writing other columns of h.
// ---------------------------------------------------------------------------------------------
#define GROVE_MAX_SECTIONS 2

enum {
  GROVE_GEMM_M_GROUPED_NT = 0,
  GROVE_GEMM_M_GROUPED_NN = 1,
  GROVE_GEMM_K_GROUPED_TN = 2,
  GROVE_GEMM_M_GROUPED_NT_SWIGLU = 3,
};

// CUTLASS kernel schedules (warp-specialized, persistent): cooperative (two consumer warp
// groups on one tile) or ping-pong (each on its own tile, epilogue overlapped).
enum { GROVE_SCHEDULE_COOP = 0, GROVE_SCHEDULE_PINGPONG = 1 };

// One section's operands and sizes.
typedef struct GroveGemmSection {
  const void* a;
  const void* b;
  void* d;
  int64_t lda, ldb, ldd;        // in elements: the stride of each operand's non-unit mode
  int64_t b_problem_stride;     // m-grouped: elements between problems' B
  int64_t d_problem_stride;     // k-grouped: elements between problems' D
  int64_t row_base;             // absolute plan row of this section's row 0
  int64_t rows;                 // rows of the section's row buffers
  int32_t m, n, k;              // m: k-grouped only; k: m-grouped only
  int32_t first_problem, num_problems;
  int32_t b_shared;             // m-grouped: problems per B (>= 1); k-grouped: 1
  const float* row_scale;       // M_GROUPED_NT_SWIGLU only: fp32 [rows], D row r scaled by
                                // row_scale[r] (null: unscaled)
} GroveGemmSection;

// The device arguments of a CUTLASS ptr-array grouped GEMM, laid out in one buffer:
//   int32 shapes[P][3] (M, N, K) | ptr A[P] | ptr B[P] | ptr D[P] | int64 ldA[P] | ldB[P] | ldD[P]
// each block 128-byte aligned. The GEMM objects static_assert that CUTLASS's own types match.
size_t grove_grouped_args_bytes(int num_problems);

// Fill the argument buffer on the device from start[P] / count[P] (int32 when index_bytes == 4,
// int64 when 8) for `layout` (GROVE_GEMM_*). One kernel launch on `stream`; no host
// synchronisation (CUDA-graph safe).
int grove_grouped_args_fill(int layout, const GroveGemmSection* sections, int num_sections,
                            const void* start, const void* count, int index_bytes,
                            int num_problems, void* args, cudaStream_t stream);

// The same arguments computed on the host into a host buffer of grove_grouped_args_bytes(P)
// bytes, by the function the fill kernel runs (start / count are host arrays here): lets a CPU
// test compare plan -> problems with the contract. Operand addresses are never dereferenced.
int grove_grouped_args_fill_host(int layout, const GroveGemmSection* sections, int num_sections,
                                 const void* start, const void* count, int index_bytes,
                                 int num_problems, void* args);

// K_GROUPED_TN: zero D_p (m_s x n_s, row stride ldd_s) of every problem with count[p] == 0.
// dtype: GROVE_DTYPE_BF16 or GROVE_DTYPE_FP16. One launch; no host sync.
int grove_grouped_zero_empty(int dtype, const GroveGemmSection* sections, int num_sections,
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
// CUTLASS 3.x sm_90a persistent ptr-array grouped GEMMs, one kernel per object
// (csrc/gemm/instantiations/<NAME>.cu), listed by GROVE_FOR_EACH_GEMM_KERNEL
// (grove_gemm_kernels.h, generated from csrc/generate_kernels.py). Each exposes
//   size_t grove_<NAME>_workspace_size(int num_problems, int sm_count);
//   int    grove_<NAME>(sections, num_sections, start, count, index_bytes, num_problems,
//                       sm_count, workspace, workspace_bytes, stream);
// The workspace holds the argument buffer followed by CUTLASS's own workspace; the launcher
// fills the arguments on the device (grove_grouped_args_fill), initialises CUTLASS with
// device-side problem shapes only (host shapes stay null) and launches on `stream`.
// sm_count: multiprocessors of the current device (0: query it with cudaDeviceGetAttribute).
// ---------------------------------------------------------------------------------------------
#define GROVE_DECLARE_GEMM_KERNEL(NAME, DTYPE, LAYOUT, SCHEDULE, BM, BN, BK, CM, CN)          \
  size_t grove_##NAME##_workspace_size(int num_problems, int sm_count);                       \
  int grove_##NAME(const GroveGemmSection* sections, int num_sections, const void* start,     \
                   const void* count, int index_bytes, int num_problems, int sm_count,        \
                   void* workspace, size_t workspace_bytes, cudaStream_t stream);
GROVE_FOR_EACH_GEMM_KERNEL(GROVE_DECLARE_GEMM_KERNEL)
#undef GROVE_DECLARE_GEMM_KERNEL

// Multiprocessor count of the current device, or -1 on error.
int grove_device_sm_count(void);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // GROVE_CUDA_H_
