// gather.cu: the gather stage (plan rows from tokens) and rows_dot_scale (a row weight applied
// in place, with the dot product that is its gradient). Torch-free: raw pointers, a
// cudaStream_t, an int error code (grove_elementwise.h).
//
// Shapes: T tokens, H hidden, R = R_e + R_a plan rows (token, problem) in two sections.
//   forward   x [T, H] --gather_rows(row_token [R], row_weight [R]?)--> xr [R, H]
//   backward  dY [T, H] --gather_rows--> dY rows [R, H]
//             rows [R, H], x [T, H] --rows_dot_scale--> dot [R] = rows . x[row_token],
//             rows *= row_weight
#include "elementwise.cuh"

namespace {

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

template <typename T, bool Vec>
__global__ void __launch_bounds__(kMaxThreads)
gather_rows_kernel(const T* __restrict__ x, int64_t ldx, int64_t num_tokens, int64_t H,
                   const int64_t* __restrict__ row_token, const float* __restrict__ row_weight,
                   GroveSections sec, T* __restrict__ out, int64_t ldo) {
  const Sections rows = read_sections(sec);
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
rows_dot_scale_kernel(T* __restrict__ rows_p, int64_t ldr, const T* __restrict__ x, int64_t ldx,
                      int64_t num_tokens, int64_t H, const int64_t* __restrict__ row_token,
                      const float* __restrict__ row_weight, GroveSections sec,
                      float* __restrict__ dot) {
  const Sections rows = read_sections(sec);
  for (int64_t k = blockIdx.x; k < rows.walked(dot); k += gridDim.x) {
    const int64_t r = rows.row(k);
    if (skip_padding(rows, k, r, dot)) continue;
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
    store_block_sum(dot, r, acc);
  }
}

}  // namespace

extern "C" {

int grove_gather_rows(int dtype, const void* x, int64_t ldx, int64_t num_tokens, int64_t H,
                      const int64_t* row_token, const float* row_weight, GroveSections sec,
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
    GROVE_LAUNCH(gather_rows_kernel, vec, blocks_for(R), threads_for(H), stream,
                      static_cast<const T*>(x), ldx, num_tokens, H, row_token, row_weight, sec,
                      static_cast<T*>(out), ldo);
  });
}

int grove_rows_dot_scale(int dtype, void* rows, int64_t ldr, const void* x, int64_t ldx,
                         int64_t num_tokens, int64_t H, const int64_t* row_token,
                         const float* row_weight, GroveSections sec, float* dot,
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
    GROVE_LAUNCH(rows_dot_scale_kernel, vec, blocks_for(R), threads_for(H), stream,
                      static_cast<T*>(rows), ldr, static_cast<const T*>(x), ldx, num_tokens, H,
                      row_token, row_weight, sec, dot);
  });
}

}  // extern "C"
