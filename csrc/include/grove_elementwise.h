// grove_elementwise.h: the C interface of the element-wise kernels around the grouped GEMMs,
// by stage:
//   gather.cu    gather tokens into plan rows (± row weight); rows_dot_scale: a row weight
//                applied in place with the dot product its gradient needs
//   swiglu.cu    SwiGLU forward and backward (with d row weight)
//   combine.cu   combine rows back into tokens, in slot order
//   folded.cu    SwiGLU forward / backward and the row scales of the folded layout
//
// Same conventions as grove_cuda.h: raw device pointers, sizes, a cudaStream_t; no allocation,
// no host synchronisation; returns GROVE_OK (0) or a GROVE_ERR_* code of grove_cuda.h.
// Plain C/C++ with no CUDA or torch include, so the g++-compiled binding can include it.
//
// Rows are (token, problem) pairs in two sections (GroveSections): expert rows [0, R_e),
// adjugate rows [R_e, R_e + R_a). Only the first *end rows of a section are real; the rest is
// padding whose outputs are never read, so the kernels skip it (the ends are read on the
// device only).
// Leading dimensions (ld*) are in elements. Arithmetic is fp32; results are rounded once to
// the element type (round to nearest even). Reductions are deterministic (fixed order, no
// atomics). 16-byte vector accesses are used when every pointer is 16-byte aligned and every
// leading dimension and width is a multiple of 8; otherwise a scalar path with the same
// results (the reduction order depends only on the widths, never on alignment).
#ifndef GROVE_ELEMENTWISE_H_
#define GROVE_ELEMENTWISE_H_

#include <stddef.h>
#include <stdint.h>

// Same declaration as the CUDA runtime's (driver_types.h); repeating an identical typedef is legal.
typedef struct CUstream_st* cudaStream_t;

#ifdef __cplusplus
extern "C" {
#endif

// Element type of the activations (the `dtype` argument); anything else is
// GROVE_ERR_INVALID_ARGUMENT.
enum { GROVE_DTYPE_BF16 = 0, GROVE_DTYPE_FP16 = 1 };

// Row r (R = rows_e + rows_a) is real iff
//   r < rows_e            and (end_e == NULL or r < *end_e), or
//   rows_e <= r < R       and (end_a == NULL or r - rows_e < *end_a).
// The device scalars are clamped to [0, rows] when read.
typedef struct GroveSections {
  int64_t rows_e;        // R_e: rows of the expert section
  const int64_t* end_e;  // device scalar: real rows of the expert section (<= rows_e); NULL: all
  int64_t rows_a;        // R_a: rows of the adjugate section (0 when none)
  const int64_t* end_a;  // device scalar for the adjugate section; NULL: all
} GroveSections;

// out[r, 0:H] = x[row_token[r], 0:H] * (row_weight ? row_weight[r] : 1) for every real row
// (an exact copy without row_weight). A token outside [0, T) gives a zero row. Padding rows are
// not written. x [T, ldx], out [R, ldo].
int grove_gather_rows(int dtype, const void* x, int64_t ldx, int64_t T, int64_t H,
                      const int64_t* row_token, const float* row_weight, GroveSections sec,
                      void* out, int64_t ldo, cudaStream_t stream);

// For every real row r, t = row_token[r]:
//   dot[r] = sum_h rows[r, h] * x[t, h]   (fp32, from the unscaled rows; 0 when t is outside
//                                          [0, T)), when dot is non-NULL;
//   rows[r, 0:H] *= row_weight[r]         (in place, rounded once).
// When dot is non-NULL it is written for EVERY row in [0, R) (0 for padding rows). row_weight
// is required; x and row_token are only read (and required) when dot is non-NULL.
int grove_rows_dot_scale(int dtype, void* rows, int64_t ldr, const void* x, int64_t ldx,
                         int64_t T, int64_t H, const int64_t* row_token,
                         const float* row_weight, GroveSections sec, float* dot,
                         cudaStream_t stream);

// h [R, 2N] per row = [gate | up]; out[r, n] = silu(gate) * up, silu(g) = g / (1 + expf(-g)),
// for every real row. out [R, ldo].
int grove_swiglu_fwd(int dtype, const void* h, int64_t ldh, int64_t N, GroveSections sec,
                     void* out, int64_t ldo, cudaStream_t stream);

// g [R, N] = dY.W2 of the row (before its weight), h [R, 2N] as in grove_swiglu_fwd,
// w = row_weight ? row_weight[r] : 1, s = sigmoid(gate), silu = gate * s. For every real row:
//   dh[r, n]     = w * g * up * s * (1 + gate * (1 - s))
//   dh[r, N + n] = w * g * silu
// and, when d_row_weight is non-NULL, for EVERY row r in [0, R):
//   d_row_weight[r] = sum_n g * silu * up   (fp32; 0 for padding rows).
int grove_swiglu_bwd(int dtype, const void* g, int64_t ldg, const void* h, int64_t ldh,
                     int64_t N, const float* row_weight, GroveSections sec, void* dh,
                     int64_t lddh, float* d_row_weight, cudaStream_t stream);

// out[t, 0:H] = sum over j = 0..C-1 with token_mask[t*C + j] != 0 of
//   (token_weight ? token_weight[t*C + j] : 1) * rows[token_rows[t*C + j], 0:H]
// summed in fp32 in the order of j, rounded once. Entries of token_rows outside [0, R) are
// skipped. Every row t in [0, T) of out is written (zeros when no slot is real).
// rows [R, ldr], token_rows / token_mask / token_weight [T, C] contiguous, out [T, ldo].
int grove_combine_rows(int dtype, const void* rows, int64_t ldr, int64_t R,
                       const int64_t* token_rows, const uint8_t* token_mask,
                       const float* token_weight, int64_t T, int64_t C, int64_t H, void* out,
                       int64_t ldo, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// The folded layout (folded.cu): R = T*k rows, expert rows only, sorted by expert; the rows of
// expert e are [offsets[e], offsets[e+1]) and its *leader* rows (those that carry the adjugate
// of their (token, group)) the prefix [offsets[e], leader_ends[e]); rows past offsets[E] are
// padding. Per row, h [R, 2I + 2Ia] = [gate_e | up_e | gate_a | up_a] and z [R, I + Ia] =
// [z_e | z_a]; the adjugate columns are meaningful on leader rows only. A row's expert is
// found by a binary search of offsets (device arrays, never read on the host; entries are
// clamped so that a corrupt plan never addresses outside [0, R)). I and Ia are multiples of 8.
typedef struct GroveFoldedRows {
  int64_t rows;                // R: rows of every row buffer
  int64_t num_experts;         // E >= 1
  const int64_t* offsets;      // [E + 1] device: expert_offsets
  const int64_t* leader_ends;  // [E] device: absolute ends of the leader prefixes
} GroveFoldedRows;

// SwiGLU forward on the folded layout, both parts of a row in one block. For every real row r
// (r < offsets[E]), with silu(g) = g / (1 + expf(-g)), lead = r is a leader row:
//   z[r]  = [silu(gate_e) * up_e | lead ? silu(gate_a) * up_a : 0]                (z non-NULL)
//   zs[r] = [row_weight[r] * z_e | lead ? leader_weight[r] * z_a : 0], from the fp32 values
//           (one rounding), the scaled rows GEMM-2 reads                           (zs non-NULL)
//   h[r, 2I:] = 0 when r is not a leader and zero_h != 0 (a saved h holds zeros there)
// row_weight / leader_weight are required when zs is given. h [R, ldh], z [R, ldz], zs [R, ldzs].
int grove_swiglu_folded_fwd(int dtype, void* h, int64_t ldh, int64_t I, int64_t Ia,
                            GroveFoldedRows rows, const float* row_weight,
                            const float* leader_weight, int zero_h, void* z, int64_t ldz,
                            void* zs, int64_t ldzs, cudaStream_t stream);

// zs[r] = [row_weight[r] * z_e | lead ? leader_weight[r] * z_a : 0] for every real row (z_a is
// not read on other rows); zs == z (in place) is allowed.
int grove_scale_folded(int dtype, const void* z, int64_t ldz, int64_t I, int64_t Ia,
                       GroveFoldedRows rows, const float* row_weight, const float* leader_weight,
                       void* zs, int64_t ldzs, cudaStream_t stream);

// SwiGLU backward on the folded layout. g [R, I + Ia] = dY.[W2_e | A2_g] of the row (g_a read
// on leader rows only), h as saved. For every real row, with the formulas of grove_swiglu_bwd:
//   dh[r] = [SwiGLU'(g_e, h_e) * row_weight[r] | lead ? SwiGLU'(g_a, h_a) * leader_weight[r] : 0]
// and for EVERY row r in [0, R) (0 on padding):
//   d_row_weight[r]    = sum_n g_e * silu(gate_e) * up_e
//   d_leader_weight[r] = lead ? sum_n g_a * silu(gate_a) * up_a : 0
// (fp32, fixed order). row_weight, leader_weight, d_row_weight and d_leader_weight are
// required. g [R, ldg], h [R, ldh], dh [R, lddh].
int grove_swiglu_folded_bwd(int dtype, const void* g, int64_t ldg, const void* h, int64_t ldh,
                            int64_t I, int64_t Ia, GroveFoldedRows rows, const float* row_weight,
                            const float* leader_weight, void* dh, int64_t lddh,
                            float* d_row_weight, float* d_leader_weight, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // GROVE_ELEMENTWISE_H_
