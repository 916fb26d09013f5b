// swiglu.cu: the SwiGLU stage between GEMM-1 and GEMM-2, forward and backward. Torch-free: raw
// pointers, a cudaStream_t, an int error code (grove_elementwise.h).
//
// Shapes: R = R_e + R_a plan rows in two sections, N = I (experts) or Ia (adjugates).
//   forward   h [R, 2N] = [gate | up] --swiglu_fwd--> a [R, N] = silu(gate) * up
//   backward  g = dY.W2 [R, N], h [R, 2N] --swiglu_bwd(row_weight?)--> dh [R, 2N],
//             d_row_weight [R]
#include "elementwise.cuh"

namespace {

template <typename T, bool Vec>
__global__ void __launch_bounds__(kMaxThreads)
swiglu_fwd_kernel(const T* __restrict__ h, int64_t ldh, int64_t N, GroveSections sec,
                  T* __restrict__ out, int64_t ldo) {
  const Sections rows = read_sections(sec);
  for (int64_t k = blockIdx.x; k < rows.real(); k += gridDim.x) {
    const int64_t r = rows.row(k);
    const T* hr = h + r * ldh;
    T* o = out + r * ldo;
    for (int64_t e = chunk_begin(); e < N; e += chunk_step()) {
      float gate[kChunk], up[kChunk];
      load8<T, Vec>(hr, e, N, gate);
      load8<T, Vec>(hr + N, e, N, up);
      swiglu_chunk(gate, up);
      store8<T, Vec>(o, e, N, gate);
    }
  }
}

template <typename T, bool Vec>
__global__ void __launch_bounds__(kMaxThreads)
swiglu_bwd_kernel(const T* __restrict__ g, int64_t ldg, const T* __restrict__ h, int64_t ldh,
                  int64_t N, const float* __restrict__ row_weight, GroveSections sec,
                  T* __restrict__ dh, int64_t lddh, float* __restrict__ d_row_weight) {
  const Sections rows = read_sections(sec);
  for (int64_t k = blockIdx.x; k < rows.walked(d_row_weight); k += gridDim.x) {
    const int64_t r = rows.row(k);
    if (skip_padding(rows, k, r, d_row_weight)) continue;
    const float w = row_weight ? row_weight[r] : 1.f;
    const T* gr = g + r * ldg;
    const T* hr = h + r * ldh;
    T* dr = dh + r * lddh;
    float acc = 0.f;
    for (int64_t e = chunk_begin(); e < N; e += chunk_step())
      acc = swiglu_bwd_chunk<T, Vec>(gr, hr, dr, e, N, w, acc);
    store_block_sum(d_row_weight, r, acc);
  }
}

}  // namespace

extern "C" {

int grove_swiglu_fwd(int dtype, const void* h, int64_t ldh, int64_t N, GroveSections sec,
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
    GROVE_LAUNCH(swiglu_fwd_kernel, vec, blocks_for(R), threads_for(N), stream,
                      static_cast<const T*>(h), ldh, N, sec, static_cast<T*>(out), ldo);
  });
}

int grove_swiglu_bwd(int dtype, const void* g, int64_t ldg, const void* h, int64_t ldh,
                     int64_t N, const float* row_weight, GroveSections sec, void* dh,
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
    GROVE_LAUNCH(swiglu_bwd_kernel, vec, blocks_for(R), threads_for(N), stream,
                      static_cast<const T*>(g), ldg, static_cast<const T*>(h), ldh, N,
                      row_weight, sec, static_cast<T*>(dh), lddh, d_row_weight);
  });
}

}  // extern "C"
