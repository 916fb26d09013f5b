// folded.cu: the row kernels of the folded layout (grove_elementwise.h), between its GEMMs.
// Torch-free: raw pointers, a cudaStream_t, an int error code.
//
// Shapes: R = T*k expert rows (leader rows first within each expert), I / Ia the expert /
// adjugate SwiGLU widths, W = 2I + 2Ia, Z = I + Ia.
//   forward   h [R, W] = [gate_e | up_e | gate_a | up_a] --swiglu_folded_fwd-->
//             z [R, Z] (unscaled, saved), zs [R, Z] = [w * z_e | lw * z_a] (GEMM-2's A)
//             z [R, Z] --scale_folded--> zs                    (after the fused GEMM-1)
//   backward  g [R, Z] = dY.[W2_e | A2_g], h --swiglu_folded_bwd--> dh [R, W],
//             d row weight [R], d leader weight [R]
// One block per row covers both parts (I/8 + Ia/8 chunks, so 128 threads at I = 768,
// Ia = 128: full warps, where a separate adjugate pass would run 16 active lanes). The
// adjugate columns of a row that is not a leader are never read; the outputs there are 0.
#include "elementwise.cuh"

namespace {

// The expert owning real row r: the last e in [0, E) with offsets[e] <= r (an empty expert
// shares its offset with the next one, so the search lands on the expert that holds r).
__host__ __device__ inline int64_t expert_of_row(const int64_t* offsets, int64_t E, int64_t r) {
  int64_t lo = 0, hi = E;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= r) lo = mid;
    else hi = mid;
  }
  return lo;
}

// Real row r carries its group's adjugate: offsets[e] <= r < leader_ends[e], e its expert.
__host__ __device__ inline bool is_leader_row(const GroveFoldedRows& f, int64_t r) {
  const int64_t e = expert_of_row(f.offsets, f.num_experts, r);
  return f.offsets[e] <= r && r < f.leader_ends[e];
}

// Rows [0, real) are real: offsets[E] clamped to [0, R].
__host__ __device__ inline int64_t real_rows(const GroveFoldedRows& f) {
  const int64_t n = f.offsets[f.num_experts];
  return n < 0 ? 0 : (n > f.rows ? f.rows : n);
}

// Column e (a multiple of 8) of a Z-wide row: which part, the column inside the part, and
// the part's offset in a W-wide h row.
struct Part {
  bool adj;
  int64_t col, width, h_base;
  __device__ Part(int64_t e, int64_t I, int64_t Ia)
      : adj(e >= I), col(e >= I ? e - I : e), width(e >= I ? Ia : I), h_base(e >= I ? 2 * I : 0) {}
};

template <typename T, bool Vec>
__device__ __forceinline__ void store_zero8(T* p, int64_t e, int64_t width) {
  const float zero[kChunk] = {};
  store8<T, Vec>(p, e, width, zero);
}

template <typename T, bool Vec>
__global__ void __launch_bounds__(kMaxThreads)
swiglu_folded_fwd_kernel(T* __restrict__ h, int64_t ldh, int64_t I, int64_t Ia, GroveFoldedRows f,
                         const float* __restrict__ row_weight,
                         const float* __restrict__ leader_weight, bool zero_h,
                         T* __restrict__ z, int64_t ldz, T* __restrict__ zs, int64_t ldzs) {
  const int64_t real = real_rows(f), Z = I + Ia;
  for (int64_t r = blockIdx.x; r < real; r += gridDim.x) {
    const bool lead = is_leader_row(f, r);
    T* hr = h + r * ldh;
    const float w = zs ? row_weight[r] : 0.f;
    const float lw = zs && lead ? leader_weight[r] : 0.f;
    for (int64_t e = chunk_begin(); e < Z; e += chunk_step()) {
      const Part p(e, I, Ia);
      T* gate_p = hr + p.h_base;
      float v[kChunk] = {};
      if (!p.adj || lead) {
        float up[kChunk];
        load8<T, Vec>(gate_p, p.col, p.width, v);
        load8<T, Vec>(gate_p + p.width, p.col, p.width, up);
        swiglu_chunk(v, up);
      } else if (zero_h) {
        store_zero8<T, Vec>(gate_p, p.col, p.width);
        store_zero8<T, Vec>(gate_p + p.width, p.col, p.width);
      }
      if (z) store8<T, Vec>(z + r * ldz, e, Z, v);
      if (zs) {
        const float s = p.adj ? lw : w;
#pragma unroll
        for (int i = 0; i < kChunk; ++i) v[i] *= s;
        store8<T, Vec>(zs + r * ldzs, e, Z, v);
      }
    }
  }
}

template <typename T, bool Vec>
__global__ void __launch_bounds__(kMaxThreads)
scale_folded_kernel(const T* z, int64_t ldz, int64_t I, int64_t Ia, GroveFoldedRows f,
                    const float* __restrict__ row_weight, const float* __restrict__ leader_weight,
                    T* zs, int64_t ldzs) {
  // z and zs may alias (in place): each element is read and written by the same thread.
  const int64_t real = real_rows(f), Z = I + Ia;
  for (int64_t r = blockIdx.x; r < real; r += gridDim.x) {
    const bool lead = is_leader_row(f, r);
    const float w = row_weight[r];
    const float lw = lead ? leader_weight[r] : 0.f;
    for (int64_t e = chunk_begin(); e < Z; e += chunk_step()) {
      const bool adj = e >= I;
      float v[kChunk] = {};
      if (!adj || lead) {
        load8<T, Vec>(z + r * ldz, e, Z, v);
        const float s = adj ? lw : w;
#pragma unroll
        for (int i = 0; i < kChunk; ++i) v[i] *= s;
      }
      store8<T, Vec>(zs + r * ldzs, e, Z, v);
    }
  }
}

template <typename T, bool Vec>
__global__ void __launch_bounds__(kMaxThreads)
swiglu_folded_bwd_kernel(const T* __restrict__ g, int64_t ldg, const T* __restrict__ h,
                         int64_t ldh, int64_t I, int64_t Ia, GroveFoldedRows f,
                         const float* __restrict__ row_weight,
                         const float* __restrict__ leader_weight, T* __restrict__ dh,
                         int64_t lddh, float* __restrict__ d_row_weight,
                         float* __restrict__ d_leader_weight) {
  const int64_t real = real_rows(f);
  // The thread's chunks of a Z-wide row are chunk_begin() + i * chunk_step(): those below I
  // are expert columns, the rest adjugate columns (I % 8 == 0: no chunk straddles).
  const int64_t first_a = chunk_begin() < I
      ? chunk_begin() + (I - chunk_begin() + chunk_step() - 1) / chunk_step() * chunk_step()
      : chunk_begin();
  for (int64_t r = blockIdx.x; r < f.rows; r += gridDim.x) {
    if (r >= real) {  // padding: only the per-row outputs (block-uniform branch)
      if (threadIdx.x == 0) d_row_weight[r] = d_leader_weight[r] = 0.f;
      continue;
    }
    const bool lead = is_leader_row(f, r);
    const T* gr = g + r * ldg;
    const T* hr = h + r * ldh;
    T* dr = dh + r * lddh;
    float acc_e = 0.f, acc_a = 0.f;
    const float w = row_weight[r];
    for (int64_t e = chunk_begin(); e < I; e += chunk_step())
      acc_e += swiglu_bwd_chunk<T, Vec>(gr, hr, dr, e, I, w, 0.f);
    if (lead) {
      const float lw = leader_weight[r];
      for (int64_t e = first_a; e < I + Ia; e += chunk_step())
        acc_a += swiglu_bwd_chunk<T, Vec>(gr + I, hr + 2 * I, dr + 2 * I, e - I, Ia, lw, 0.f);
    } else {
      for (int64_t e = first_a; e < I + Ia; e += chunk_step()) {
        store_zero8<T, Vec>(dr + 2 * I, e - I, Ia);
        store_zero8<T, Vec>(dr + 2 * I + Ia, e - I, Ia);
      }
    }
    const float sum_e = block_sum(acc_e);
    const float sum_a = block_sum(acc_a);
    if (threadIdx.x == 0) {
      d_row_weight[r] = sum_e;
      d_leader_weight[r] = lead ? sum_a : 0.f;
    }
  }
}

// Host-side checks shared by the three launchers.
bool folded_ok(int dtype, int64_t I, int64_t Ia, const GroveFoldedRows& f) {
  return dtype_ok(dtype) && I > 0 && Ia >= 0 && I % kChunk == 0 && Ia % kChunk == 0 &&
         I <= INT64_MAX / 4 - Ia && f.rows >= 0 && f.num_experts >= 1 &&
         (f.rows == 0 || (f.offsets && f.leader_ends));
}

}  // namespace

extern "C" {

int grove_swiglu_folded_fwd(int dtype, void* h, int64_t ldh, int64_t I, int64_t Ia,
                            GroveFoldedRows rows, const float* row_weight,
                            const float* leader_weight, int zero_h, void* z, int64_t ldz,
                            void* zs, int64_t ldzs, cudaStream_t stream) {
  if (!folded_ok(dtype, I, Ia, rows)) return GROVE_ERR_INVALID_ARGUMENT;
  if (rows.rows == 0) return GROVE_OK;
  const int64_t W = 2 * (I + Ia), Z = I + Ia;
  if (!h || ldh < W || (!z && !zs) || (z && ldz < Z) || (zs && ldzs < Z) ||
      (zs && (!row_weight || !leader_weight)))
    return GROVE_ERR_INVALID_ARGUMENT;
  const bool vec = vec_ok(h, ldh) && (!z || vec_ok(z, ldz)) && (!zs || vec_ok(zs, ldzs));
  return dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    GROVE_LAUNCH(swiglu_folded_fwd_kernel, vec, blocks_for(rows.rows), threads_for(Z), stream,
                 static_cast<T*>(h), ldh, I, Ia, rows, row_weight, leader_weight, zero_h != 0,
                 static_cast<T*>(z), ldz, static_cast<T*>(zs), ldzs);
  });
}

int grove_scale_folded(int dtype, const void* z, int64_t ldz, int64_t I, int64_t Ia,
                       GroveFoldedRows rows, const float* row_weight, const float* leader_weight,
                       void* zs, int64_t ldzs, cudaStream_t stream) {
  if (!folded_ok(dtype, I, Ia, rows)) return GROVE_ERR_INVALID_ARGUMENT;
  if (rows.rows == 0) return GROVE_OK;
  const int64_t Z = I + Ia;
  if (!z || !zs || ldz < Z || ldzs < Z || !row_weight || !leader_weight ||
      (z == zs && ldz != ldzs))
    return GROVE_ERR_INVALID_ARGUMENT;
  const bool vec = vec_ok(z, ldz) && vec_ok(zs, ldzs);
  return dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    GROVE_LAUNCH(scale_folded_kernel, vec, blocks_for(rows.rows), threads_for(Z), stream,
                 static_cast<const T*>(z), ldz, I, Ia, rows, row_weight, leader_weight,
                 static_cast<T*>(zs), ldzs);
  });
}

int grove_swiglu_folded_bwd(int dtype, const void* g, int64_t ldg, const void* h, int64_t ldh,
                            int64_t I, int64_t Ia, GroveFoldedRows rows, const float* row_weight,
                            const float* leader_weight, void* dh, int64_t lddh,
                            float* d_row_weight, float* d_leader_weight, cudaStream_t stream) {
  if (!folded_ok(dtype, I, Ia, rows)) return GROVE_ERR_INVALID_ARGUMENT;
  if (rows.rows == 0) return GROVE_OK;
  const int64_t W = 2 * (I + Ia), Z = I + Ia;
  if (!g || !h || !dh || ldg < Z || ldh < W || lddh < W || !row_weight || !leader_weight ||
      !d_row_weight || !d_leader_weight)
    return GROVE_ERR_INVALID_ARGUMENT;
  const bool vec = vec_ok(g, ldg) && vec_ok(h, ldh) && vec_ok(dh, lddh);
  return dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    GROVE_LAUNCH(swiglu_folded_bwd_kernel, vec, blocks_for(rows.rows), threads_for(Z), stream,
                 static_cast<const T*>(g), ldg, static_cast<const T*>(h), ldh, I, Ia, rows,
                 row_weight, leader_weight, static_cast<T*>(dh), lddh, d_row_weight,
                 d_leader_weight);
  });
}

}  // extern "C"
