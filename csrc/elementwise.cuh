// elementwise.cuh: what the element-wise kernels (gather.cu, swiglu.cu, combine.cu, folded.cu)
// share: 8-element chunk loads and stores, SwiGLU and SwiGLU' of a chunk, the order in which rows of the two sections are walked,
// a fixed-order block sum, and the launch helpers. Torch-free; internal to those files.
//
// Every thread owns whole 8-element chunks on the vector and the scalar path alike, so a
// reduction's order depends only on the width and the block size (itself a function of the
// width), never on pointer alignment: results are bitwise reproducible.
//
// A section's end is a device scalar, never read on the host: each kernel walks the rows in an
// order that lists the real ones first and stops at their count, so a plan padded to capacity
// costs only blocks that exit at once (or that write a 0 for a per-row output).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "grove_cuda.h"

namespace {

constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kChunk = 8;               // elements per 16-byte access
constexpr int64_t kMaxBlocks = 16384;   // grid-stride loops beyond this; far above residency

template <typename T> struct Tag { using type = T; };

__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ void from_f(float f, __nv_bfloat16& o) { o = __float2bfloat16_rn(f); }
__device__ __forceinline__ void from_f(float f, __half& o) { o = __float2half_rn(f); }

// Chunk [e, e+8) of a row; on the scalar path elements past `width` read as 0 / are not written.
template <typename T, bool Vec>
__device__ __forceinline__ void load8(const T* p, int64_t e, int64_t width, float (&f)[kChunk]) {
  if constexpr (Vec) {
    const uint4 u = *reinterpret_cast<const uint4*>(p + e);
    const T* v = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) f[i] = to_f(v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) f[i] = e + i < width ? to_f(p[e + i]) : 0.f;
  }
}

template <typename T, bool Vec>
__device__ __forceinline__ void store8(T* p, int64_t e, int64_t width,
                                       const float (&f)[kChunk]) {
  if constexpr (Vec) {
    uint4 u;
    T* v = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) from_f(f[i], v[i]);
    *reinterpret_cast<uint4*>(p + e) = u;
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
      if (e + i < width) from_f(f[i], p[e + i]);
  }
}

// SwiGLU of one chunk, in fp32. expf (not __expf) everywhere: the accurate exp; the kernels
// are bandwidth-bound anyway. Forward silu is g / (1 + expf(-g)) (the reference formula, also
// that of GEMM-1's fused epilogue); the backward uses s = sigmoid(g).
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// gate[i] <- silu(gate[i]) * up[i] over the chunk.
__device__ __forceinline__ void swiglu_chunk(float (&gate)[kChunk], const float (&up)[kChunk]) {
#pragma unroll
  for (int i = 0; i < kChunk; ++i) gate[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
}

// SwiGLU' of the chunk at column `e` of one part of a row (g, h, dh point at the part's first
// gate column, its up columns `width` further): writes d gate / d up scaled by w, returns
// acc + g * silu * up of each element in turn (the caller's order of additions). Tail elements
// of the scalar path are skipped, not added as +0 (keeps -0 sums equal).
template <typename T, bool Vec>
__device__ __forceinline__ float swiglu_bwd_chunk(const T* g, const T* h, T* dh, int64_t e,
                                                  int64_t width, float w, float acc) {
  float gv[kChunk], gate[kChunk], up[kChunk];
  load8<T, Vec>(g, e, width, gv);
  load8<T, Vec>(h, e, width, gate);
  load8<T, Vec>(h + width, e, width, up);
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const float s = sigmoid(gate[i]);
    const float silu = gate[i] * s;
    if (Vec || e + i < width) acc += gv[i] * silu * up[i];
    const float d_gate = w * gv[i] * up[i] * s * (1.f + gate[i] * (1.f - s));
    up[i] = w * gv[i] * silu;  // d up
    gate[i] = d_gate;
  }
  store8<T, Vec>(dh, e, width, gate);
  store8<T, Vec>(dh + width, e, width, up);
  return acc;
}

__device__ __forceinline__ int64_t chunk_begin() { return int64_t(threadIdx.x) * kChunk; }
__device__ __forceinline__ int64_t chunk_step() { return int64_t(blockDim.x) * kChunk; }

// GroveSections with their ends read (clamped: a corrupt end never widens a section).
struct Sections {
  int64_t rows_e, end_e, end_a, total;

  __device__ int64_t real() const { return end_e + end_a; }
  // Rows a kernel walks: the real ones, and the padding too when it has a per-row output.
  __device__ int64_t walked(const float* per_row) const { return per_row ? total : real(); }

  // The k-th row (k in [0, total)) in the order: real expert rows, real adjugate rows, expert
  // padding, adjugate padding. Loops stop at real() unless padding outputs must be zeroed.
  __device__ int64_t row(int64_t k) const {
    if (k < end_e) return k;
    k -= end_e;
    if (k < end_a) return rows_e + k;
    k -= end_a;
    if (k < rows_e - end_e) return end_e + k;
    return rows_e + end_a + (k - (rows_e - end_e));
  }
};

__device__ __forceinline__ int64_t read_end(const int64_t* end, int64_t rows) {
  if (!end) return rows;
  const int64_t e = *end;
  return e < 0 ? 0 : (e > rows ? rows : e);
}

__device__ __forceinline__ Sections read_sections(const GroveSections& s) {
  return Sections{s.rows_e, read_end(s.end_e, s.rows_e), read_end(s.end_a, s.rows_a),
                  s.rows_e + s.rows_a};
}

// Row k of a walk over rows.total rows is padding: write its per-row output (0; its only
// output) and skip it.
__device__ __forceinline__ bool skip_padding(const Sections& rows, int64_t k, int64_t r,
                                             float* per_row) {
  if (k < rows.real()) return false;
  if (threadIdx.x == 0) per_row[r] = 0.f;
  return true;
}

// Fixed-order block sum (blockDim.x a multiple of 32, <= kMaxThreads): xor butterfly in each
// warp, then warp 0 folds the warp sums the same way. Valid in thread 0; block-uniform call.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kMaxWarps];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = 0.f;
  if (warp == 0) {
    v = lane < int(blockDim.x >> 5) ? warp_sums[lane] : 0.f;
#pragma unroll
    for (int o = kMaxWarps / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  __syncthreads();  // warp_sums is reused by the next row of a grid-stride loop
  return v;
}

// out[r] = the sum of every thread's v (block-uniform call; nothing when out is NULL).
__device__ __forceinline__ void store_block_sum(float* out, int64_t r, float v) {
  if (!out) return;
  const float s = block_sum(v);
  if (threadIdx.x == 0) out[r] = s;
}

// Host side of the launchers.

inline bool vec_ok(const void* p, int64_t ld) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0 && ld % kChunk == 0;
}

// One block per row: a warp per 32 chunks of the width, at most kMaxThreads.
inline int threads_for(int64_t width) {
  int64_t t = ((width + kChunk - 1) / kChunk + 31) / 32 * 32;
  return int(t < 32 ? 32 : (t > kMaxThreads ? kMaxThreads : t));
}

inline int blocks_for(int64_t work) { return int(work < kMaxBlocks ? work : kMaxBlocks); }

inline bool sections_ok(const GroveSections& s) {
  return s.rows_e >= 0 && s.rows_a >= 0 && s.rows_e <= INT64_MAX - s.rows_a;
}

inline bool dtype_ok(int dtype) { return dtype == GROVE_DTYPE_BF16 || dtype == GROVE_DTYPE_FP16; }

inline int launched() { return cudaGetLastError() == cudaSuccess ? GROVE_OK : GROVE_ERR_CUDA; }

template <typename F>
int dispatch(int dtype, F&& f) {
  if (dtype == GROVE_DTYPE_BF16) return f(Tag<__nv_bfloat16>{});
  if (dtype == GROVE_DTYPE_FP16) return f(Tag<__half>{});
  return GROVE_ERR_INVALID_ARGUMENT;
}

// Launch KERNEL<T, VEC> (T: the element type in scope) and report the launch error.
#define GROVE_LAUNCH(KERNEL, VEC, GRID, BLOCK, STREAM, ...)                              \
  do {                                                                                   \
    if (VEC) KERNEL<T, true><<<(GRID), (BLOCK), 0, (STREAM)>>>(__VA_ARGS__);             \
    else KERNEL<T, false><<<(GRID), (BLOCK), 0, (STREAM)>>>(__VA_ARGS__);                \
    return launched();                                                                   \
  } while (0)

}  // namespace
