// combine.cu: the combine stage, every token's rows summed back into it in slot order
// (deterministic; no atomics). Torch-free: raw pointers, a cudaStream_t, an int error code
// (grove_elementwise.h).
//
// Shapes: T tokens, H hidden, R plan rows, C row slots per token.
//   forward   y [R, H] --combine_rows(token_rows [T, C], token_mask [T, C], weight?)--> out [T, H]
//   backward  dx rows [R, H] --combine_rows--> dx [T, H]
#include "elementwise.cuh"

namespace {

constexpr int kSlotCache = 64;  // slots per token staged in shared memory

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

}  // namespace

extern "C" {

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
    GROVE_LAUNCH(combine_rows_kernel, vec, blocks_for(num_tokens), threads_for(H), stream,
                      static_cast<const T*>(rows), ldr, R, token_rows, token_mask, token_weight,
                      num_tokens, C, H, static_cast<T*>(out), ldo);
  });
}

}  // extern "C"
