// rows.cu: the memory-bound row kernels around the grouped GEMMs of a Grove MoE layer.
// Torch-free: raw pointers, a cudaStream_t, an int error code (grove_rows.h, grove_cuda.h).
//
// Shapes: T tokens, H hidden, R = R_e + R_a plan rows (token, problem), N = I (experts) or
// Ia (adjugates) intermediate width, C row slots per token.
//   forward   x [T,H] --gather_rows(row_token[R], row_weight[R]?)--> xr [R,H]
//             xr --GEMM W1--> h [R,2N] --swiglu_fwd--> a [R,N] --GEMM W2--> y [R,H]
//             y [R,H] --combine_rows(token_rows [T,C], token_mask [T,C], weight?)--> out [T,H]
//   backward  g = dY.W2 [R,N], h [R,2N] --swiglu_bwd(row_weight?)--> dh [R,2N], d_row_weight [R]
//   rows_dot_scale: rows [R,H], x [T,H] --> dot [R] = rows . x[row_token], rows *= row_weight
//
// A section's end is a device scalar, never read on the host: each row kernel walks the rows
// in an order that lists the real ones first and stops at their count, so a plan padded to
// capacity costs only blocks that exit at once (or that write a 0 for a per-row output).
//
// Every thread owns whole 8-element chunks on the vector and the scalar path alike, so a
// reduction's order depends only on the width and the block size (itself a function of the
// width), never on pointer alignment: results are bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "grove_cuda.h"
#include "grove_rows.h"

namespace {

constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kChunk = 8;               // elements per 16-byte access
constexpr int64_t kMaxBlocks = 16384;   // grid-stride loops beyond this; far above residency
constexpr int kSlotCache = 64;          // combine: slots per token staged in shared memory

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

// Raw copy, so an unweighted gather is bit-exact (NaN payloads included).
template <typename T, bool Vec>
__device__ __forceinline__ void copy8(T* dst, const T* src, int64_t e, int64_t width) {
  if constexpr (Vec) {
    *reinterpret_cast<uint4*>(dst + e) = *reinterpret_cast<const uint4*>(src + e);
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
      if (e + i < width) dst[e + i] = src[e + i];
  }
}

__device__ __forceinline__ int64_t chunk_begin() { return int64_t(threadIdx.x) * kChunk; }
__device__ __forceinline__ int64_t chunk_step() { return int64_t(blockDim.x) * kChunk; }

// Sections with their ends read (clamped: a corrupt end never widens a section).
struct Rows {
  int64_t rows_e, end_e, end_a, total;

  __device__ int64_t real() const { return end_e + end_a; }

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

__device__ __forceinline__ Rows read_sections(const GroveRowSections& s) {
  return Rows{s.rows_e, read_end(s.end_e, s.rows_e), read_end(s.end_a, s.rows_a),
              s.rows_e + s.rows_a};
}

// Fixed-order block sum (blockDim.x a multiple of 32, <= kMaxThreads): xor butterfly in each
// warp, then warp 0 folds the warp sums the same way. Valid in thread 0; block-uniform call.
__device__ float block_sum(float v) {
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

// expf (not __expf) everywhere: the accurate exp; the kernels are bandwidth-bound anyway.
// Forward silu is g / (1 + expf(-g)) (the reference formula); backward uses s = sigmoid(g).
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

template <typename T, bool Vec>
__global__ void __launch_bounds__(kMaxThreads)
gather_rows_kernel(const T* __restrict__ x, int64_t ldx, int64_t num_tokens, int64_t H,
                   const int64_t* __restrict__ row_token, const float* __restrict__ row_weight,
                   GroveRowSections sec, T* __restrict__ out, int64_t ldo) {
  const Rows rows = read_sections(sec);
  for (int64_t k = blockIdx.x; k < rows.real(); k += gridDim.x) {
    const int64_t r = rows.row(k);
    const int64_t t = row_token[r];
    const bool valid = t >= 0 && t < num_tokens;
    const T* xr = x + (valid ? t : 0) * ldx;
    T* o = out + r * ldo;
    const float w = row_weight ? row_weight[r] : 1.f;
    for (int64_t e = chunk_begin(); e < H; e += chunk_step()) {
      if (valid && !row_weight) { copy8<T, Vec>(o, xr, e, H); continue; }
      float f[kChunk] = {};
      if (valid) {
        load8<T, Vec>(xr, e, H, f);
#pragma unroll
        for (int i = 0; i < kChunk; ++i) f[i] *= w;
      }
      store8<T, Vec>(o, e, H, f);
    }
  }
}

template <typename T, bool Vec>
__global__ void __launch_bounds__(kMaxThreads)
swiglu_fwd_kernel(const T* __restrict__ h, int64_t ldh, int64_t N, GroveRowSections sec,
                  T* __restrict__ out, int64_t ldo) {
  const Rows rows = read_sections(sec);
  for (int64_t k = blockIdx.x; k < rows.real(); k += gridDim.x) {
    const int64_t r = rows.row(k);
    const T* hr = h + r * ldh;
    T* o = out + r * ldo;
    for (int64_t e = chunk_begin(); e < N; e += chunk_step()) {
      float gate[kChunk], up[kChunk];
      load8<T, Vec>(hr, e, N, gate);
      load8<T, Vec>(hr + N, e, N, up);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) gate[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
      store8<T, Vec>(o, e, N, gate);
    }
  }
}

template <typename T, bool Vec>
__global__ void __launch_bounds__(kMaxThreads)
swiglu_bwd_kernel(const T* __restrict__ g, int64_t ldg, const T* __restrict__ h, int64_t ldh,
                  int64_t N, const float* __restrict__ row_weight, GroveRowSections sec,
                  T* __restrict__ dh, int64_t lddh, float* __restrict__ d_row_weight) {
  const Rows rows = read_sections(sec);
  const int64_t limit = d_row_weight ? rows.total : rows.real();
  for (int64_t k = blockIdx.x; k < limit; k += gridDim.x) {
    const int64_t r = rows.row(k);
    if (k >= rows.real()) {  // padding: only its d_row_weight is an output
      if (threadIdx.x == 0) d_row_weight[r] = 0.f;
      continue;
    }
    const float w = row_weight ? row_weight[r] : 1.f;
    const T* gr = g + r * ldg;
    const T* hr = h + r * ldh;
    T* dr = dh + r * lddh;
    float acc = 0.f;
    for (int64_t e = chunk_begin(); e < N; e += chunk_step()) {
      float gv[kChunk], gate[kChunk], up[kChunk];
      load8<T, Vec>(gr, e, N, gv);
      load8<T, Vec>(hr, e, N, gate);
      load8<T, Vec>(hr + N, e, N, up);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const float s = sigmoid(gate[i]);
        const float silu = gate[i] * s;
        // Tail elements of the scalar path are skipped, not added as +0 (keeps -0 sums equal).
        if (Vec || e + i < N) acc += gv[i] * silu * up[i];
        const float d_gate = w * gv[i] * up[i] * s * (1.f + gate[i] * (1.f - s));
        up[i] = w * gv[i] * silu;  // d up
        gate[i] = d_gate;
      }
      store8<T, Vec>(dr, e, N, gate);
      store8<T, Vec>(dr + N, e, N, up);
    }
    if (d_row_weight) {
      const float s = block_sum(acc);
      if (threadIdx.x == 0) d_row_weight[r] = s;
    }
  }
}

// Row of a slot, or -1 when the slot is masked off or points outside [0, R).
__device__ __forceinline__ int64_t slot_row(const int64_t* __restrict__ token_rows,
                                            const uint8_t* __restrict__ token_mask, int64_t R,
                                            int64_t i) {
  if (!token_mask[i]) return -1;
  const int64_t r = token_rows[i];
  return r >= 0 && r < R ? r : -1;
}

template <typename T, bool Vec>
__global__ void __launch_bounds__(kMaxThreads)
combine_rows_kernel(const T* __restrict__ rows, int64_t ldr, int64_t R,
                    const int64_t* __restrict__ token_rows, const uint8_t* __restrict__ token_mask,
                    const float* __restrict__ token_weight, int64_t num_tokens, int64_t C,
                    int64_t H, T* __restrict__ out, int64_t ldo) {
  // Every chunk of a token walks all its slots; staging them once per token saves C mask,
  // index and weight reads per chunk.
  __shared__ int64_t s_row[kSlotCache];
  __shared__ float s_weight[kSlotCache];
  const bool cached = C <= kSlotCache;
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    const int64_t base = t * C;
    if (cached) {
      for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
        s_row[j] = slot_row(token_rows, token_mask, R, base + j);
        s_weight[j] = token_weight ? token_weight[base + j] : 1.f;
      }
      __syncthreads();
    }
    T* o = out + t * ldo;
    for (int64_t e = chunk_begin(); e < H; e += chunk_step()) {
      float acc[kChunk] = {};
      bool any = false;
      for (int64_t j = 0; j < C; ++j) {
        const int64_t r = cached ? s_row[j] : slot_row(token_rows, token_mask, R, base + j);
        if (r < 0) continue;
        const float w = cached ? s_weight[j] : (token_weight ? token_weight[base + j] : 1.f);
        float v[kChunk];
        load8<T, Vec>(rows + r * ldr, e, H, v);
        // The first term is w*v, not 0 + w*v: a single unit-weight slot is an exact copy (-0 too).
#pragma unroll
        for (int i = 0; i < kChunk; ++i) acc[i] = any ? fmaf(w, v[i], acc[i]) : w * v[i];
        any = true;
      }
      store8<T, Vec>(o, e, H, acc);
    }
    if (cached) __syncthreads();  // the next token overwrites the slot table
  }
}

template <typename T, bool Vec>
__global__ void __launch_bounds__(kMaxThreads)
rows_dot_scale_kernel(T* __restrict__ rows_p, int64_t ldr, const T* __restrict__ x, int64_t ldx,
                      int64_t num_tokens, int64_t H, const int64_t* __restrict__ row_token,
                      const float* __restrict__ row_weight, GroveRowSections sec,
                      float* __restrict__ dot) {
  const Rows rows = read_sections(sec);
  const int64_t limit = dot ? rows.total : rows.real();
  for (int64_t k = blockIdx.x; k < limit; k += gridDim.x) {
    const int64_t r = rows.row(k);
    if (k >= rows.real()) {  // padding: only its dot is an output
      if (threadIdx.x == 0) dot[r] = 0.f;
      continue;
    }
    const int64_t t = dot ? row_token[r] : -1;
    const bool valid = t >= 0 && t < num_tokens;
    const T* xr = x + (valid ? t : 0) * ldx;
    T* rr = rows_p + r * ldr;
    const float w = row_weight[r];
    float acc = 0.f;
    for (int64_t e = chunk_begin(); e < H; e += chunk_step()) {
      float v[kChunk];
      load8<T, Vec>(rr, e, H, v);
      if (valid) {
        float xv[kChunk];
        load8<T, Vec>(xr, e, H, xv);
#pragma unroll
        for (int i = 0; i < kChunk; ++i)
          if (Vec || e + i < H) acc += v[i] * xv[i];
      }
#pragma unroll
      for (int i = 0; i < kChunk; ++i) v[i] *= w;
      store8<T, Vec>(rr, e, H, v);  // each element is read and written by the same thread
    }
    if (dot) {
      const float s = block_sum(acc);
      if (threadIdx.x == 0) dot[r] = s;
    }
  }
}

// ----------------------------------------------------------------------------------- host --

bool vec_ok(const void* p, int64_t ld) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0 && ld % kChunk == 0;
}

// One block per row: a warp per 32 chunks of the width, at most kMaxThreads.
int threads_for(int64_t width) {
  int64_t t = ((width + kChunk - 1) / kChunk + 31) / 32 * 32;
  return int(t < 32 ? 32 : (t > kMaxThreads ? kMaxThreads : t));
}

int blocks_for(int64_t work) { return int(work < kMaxBlocks ? work : kMaxBlocks); }

bool sections_ok(const GroveRowSections& s) {
  return s.rows_e >= 0 && s.rows_a >= 0 && s.rows_e <= INT64_MAX - s.rows_a;
}

bool dtype_ok(int dtype) { return dtype == GROVE_DTYPE_BF16 || dtype == GROVE_DTYPE_FP16; }

int launched() { return cudaGetLastError() == cudaSuccess ? GROVE_OK : GROVE_ERR_CUDA; }

template <typename F>
int dispatch(int dtype, F&& f) {
  if (dtype == GROVE_DTYPE_BF16) return f(Tag<__nv_bfloat16>{});
  if (dtype == GROVE_DTYPE_FP16) return f(Tag<__half>{});
  return GROVE_ERR_INVALID_ARGUMENT;
}

// Launch KERNEL<T, VEC> (T: the element type in scope) and report the launch error.
#define GROVE_ROWS_LAUNCH(KERNEL, VEC, GRID, BLOCK, STREAM, ...)                         \
  do {                                                                                   \
    if (VEC) KERNEL<T, true><<<(GRID), (BLOCK), 0, (STREAM)>>>(__VA_ARGS__);             \
    else KERNEL<T, false><<<(GRID), (BLOCK), 0, (STREAM)>>>(__VA_ARGS__);                \
    return launched();                                                                   \
  } while (0)

}  // namespace

extern "C" {

int grove_gather_rows(int dtype, const void* x, int64_t ldx, int64_t num_tokens, int64_t H,
                      const int64_t* row_token, const float* row_weight, GroveRowSections sec,
                      void* out, int64_t ldo, cudaStream_t stream) {
  if (!dtype_ok(dtype) || num_tokens < 0 || H < 0 || !sections_ok(sec))
    return GROVE_ERR_INVALID_ARGUMENT;
  const int64_t R = sec.rows_e + sec.rows_a;
  if (R == 0 || H == 0) return GROVE_OK;
  if (!row_token || !out || ldo < H || (num_tokens > 0 && (!x || ldx < H)))
    return GROVE_ERR_INVALID_ARGUMENT;
  const bool vec = H % kChunk == 0 && vec_ok(x, ldx) && vec_ok(out, ldo);
  return dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    GROVE_ROWS_LAUNCH(gather_rows_kernel, vec, blocks_for(R), threads_for(H), stream,
                      static_cast<const T*>(x), ldx, num_tokens, H, row_token, row_weight, sec,
                      static_cast<T*>(out), ldo);
  });
}

int grove_swiglu_fwd(int dtype, const void* h, int64_t ldh, int64_t N, GroveRowSections sec,
                     void* out, int64_t ldo, cudaStream_t stream) {
  if (!dtype_ok(dtype) || N < 0 || N > INT64_MAX / 2 || !sections_ok(sec))
    return GROVE_ERR_INVALID_ARGUMENT;
  const int64_t R = sec.rows_e + sec.rows_a;
  if (R == 0 || N == 0) return GROVE_OK;
  if (!h || !out || ldh < 2 * N || ldo < N) return GROVE_ERR_INVALID_ARGUMENT;
  // N % 8 also keeps the up half (h + N) 16-byte aligned.
  const bool vec = N % kChunk == 0 && vec_ok(h, ldh) && vec_ok(out, ldo);
  return dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    GROVE_ROWS_LAUNCH(swiglu_fwd_kernel, vec, blocks_for(R), threads_for(N), stream,
                      static_cast<const T*>(h), ldh, N, sec, static_cast<T*>(out), ldo);
  });
}

int grove_swiglu_bwd(int dtype, const void* g, int64_t ldg, const void* h, int64_t ldh,
                     int64_t N, const float* row_weight, GroveRowSections sec, void* dh,
                     int64_t lddh, float* d_row_weight, cudaStream_t stream) {
  if (!dtype_ok(dtype) || N < 0 || N > INT64_MAX / 2 || !sections_ok(sec))
    return GROVE_ERR_INVALID_ARGUMENT;
  const int64_t R = sec.rows_e + sec.rows_a;
  // With N == 0 the d_row_weight rows (empty sums) are still outputs.
  if (R == 0 || (N == 0 && !d_row_weight)) return GROVE_OK;
  if (N > 0 && (!g || !h || !dh || ldg < N || ldh < 2 * N || lddh < 2 * N))
    return GROVE_ERR_INVALID_ARGUMENT;
  const bool vec = N % kChunk == 0 && vec_ok(g, ldg) && vec_ok(h, ldh) && vec_ok(dh, lddh);
  return dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    GROVE_ROWS_LAUNCH(swiglu_bwd_kernel, vec, blocks_for(R), threads_for(N), stream,
                      static_cast<const T*>(g), ldg, static_cast<const T*>(h), ldh, N,
                      row_weight, sec, static_cast<T*>(dh), lddh, d_row_weight);
  });
}

int grove_combine_rows(int dtype, const void* rows, int64_t ldr, int64_t R,
                       const int64_t* token_rows, const uint8_t* token_mask,
                       const float* token_weight, int64_t num_tokens, int64_t C, int64_t H,
                       void* out, int64_t ldo, cudaStream_t stream) {
  if (!dtype_ok(dtype) || R < 0 || num_tokens < 0 || C < 0 || H < 0)
    return GROVE_ERR_INVALID_ARGUMENT;
  if (num_tokens == 0 || H == 0) return GROVE_OK;
  if (!out || ldo < H || (C > 0 && (!token_rows || !token_mask)) ||
      (C > 0 && R > 0 && (!rows || ldr < H)))
    return GROVE_ERR_INVALID_ARGUMENT;
  const bool vec = H % kChunk == 0 && vec_ok(rows, ldr) && vec_ok(out, ldo);
  return dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    GROVE_ROWS_LAUNCH(combine_rows_kernel, vec, blocks_for(num_tokens), threads_for(H), stream,
                      static_cast<const T*>(rows), ldr, R, token_rows, token_mask, token_weight,
                      num_tokens, C, H, static_cast<T*>(out), ldo);
  });
}

int grove_rows_dot_scale(int dtype, void* rows, int64_t ldr, const void* x, int64_t ldx,
                         int64_t num_tokens, int64_t H, const int64_t* row_token,
                         const float* row_weight, GroveRowSections sec, float* dot,
                         cudaStream_t stream) {
  if (!dtype_ok(dtype) || num_tokens < 0 || H < 0 || !sections_ok(sec))
    return GROVE_ERR_INVALID_ARGUMENT;
  const int64_t R = sec.rows_e + sec.rows_a;
  // With H == 0 the dot rows (empty sums) are still outputs.
  if (R == 0 || (H == 0 && !dot)) return GROVE_OK;
  if (!row_weight || (H > 0 && (!rows || ldr < H)) ||
      (dot && (!row_token || (num_tokens > 0 && H > 0 && (!x || ldx < H)))))
    return GROVE_ERR_INVALID_ARGUMENT;
  const bool vec = H % kChunk == 0 && vec_ok(rows, ldr) && (!dot || vec_ok(x, ldx));
  return dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    GROVE_ROWS_LAUNCH(rows_dot_scale_kernel, vec, blocks_for(R), threads_for(H), stream,
                      static_cast<T*>(rows), ldr, static_cast<const T*>(x), ldx, num_tokens, H,
                      row_token, row_weight, sec, dot);
  });
}

}  // extern "C"
