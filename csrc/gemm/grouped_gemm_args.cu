// grouped_args.cu: writes the device-side arguments of a ptr-array grouped GEMM from a Plan's
// problem rows (start[P], count[P]) in one small kernel, so a forward never reads the routing
// back to the host (DESIGN §4: host problem shapes stay null; ~20 torch ops cost 44-200 us).
// Torch-free: raw pointers, a cudaStream_t, an int error code.
#include <cuda_runtime.h>

#include "grove_cuda.h"

namespace {

constexpr size_t kAlign = 128;

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

struct Segments {
  GroveGemmSegment s[GROVE_MAX_SEGMENTS];
  int count;
};

// Segment-local first row and row count of problem p, clamped so that a corrupt plan shrinks
// the problem instead of addressing out of bounds.
template <typename Index>
__host__ __device__ void local_rows(const GroveGemmSegment& seg, const Index* start, const Index* count,
                           int p, int64_t* row, int64_t* m) {
  int64_t r = static_cast<int64_t>(start[p]) - seg.row_base;
  int64_t c = static_cast<int64_t>(count[p]);
  if (r < 0 || r > seg.rows) { r = 0; c = 0; }
  if (c < 0) c = 0;
  if (c > seg.rows - r) c = seg.rows - r;
  *row = r;
  *m = c;
}

__host__ __device__ int segment_of(const Segments& segs, int p) {
  int si = 0;
#pragma unroll
  for (int i = 1; i < GROVE_MAX_SEGMENTS; ++i) {
    if (i < segs.count && p >= segs.s[i].first_problem) si = i;
  }
  return si;
}

// The arguments of problem p (host-callable: tests/cuda/grouped_args_check.cu runs it on the CPU).
template <typename Index>
__host__ __device__ void fill_problem(int layout, const Segments& segs, const Index* start,
                                      const Index* count, int p, GroveGroupedArgsView out) {
  const GroveGemmSegment& seg = segs.s[segment_of(segs, p)];
  const int64_t j = p - seg.first_problem;
  int64_t row, rows;
  local_rows(seg, start, count, p, &row, &rows);

  // 16-bit elements: only the address arithmetic matters here.
  const auto* a = static_cast<const uint16_t*>(seg.a);
  const auto* b = static_cast<const uint16_t*>(seg.b);
  auto* d = static_cast<uint16_t*>(seg.d);
  if (layout == GROVE_LAYOUT_NT) {
    // K = rows. An empty problem gets M = 0 so CUTLASS schedules no tile for it (its D is
    // zeroed by grove_grouped_zero_empty: a K = 0 accumulator would be garbage).
    out.shapes[3 * p + 0] = rows > 0 ? seg.m : 0;
    out.shapes[3 * p + 1] = seg.n;
    out.shapes[3 * p + 2] = static_cast<int32_t>(rows);
    out.ptr_a[p] = a + row * seg.lda;
    out.ptr_b[p] = b + row * seg.ldb;
    out.ptr_d[p] = d + j * seg.d_problem_stride;
  } else {
    out.shapes[3 * p + 0] = static_cast<int32_t>(rows);
    out.shapes[3 * p + 1] = seg.n;
    out.shapes[3 * p + 2] = seg.k;
    out.ptr_a[p] = a + row * seg.lda;
    out.ptr_b[p] = b + j * seg.b_problem_stride;
    out.ptr_d[p] = d + row * seg.ldd;
  }
  out.ld_a[p] = seg.lda;
  out.ld_b[p] = seg.ldb;
  out.ld_d[p] = seg.ldd;
}

template <typename Index>
__global__ void fill_grouped_args(int layout, Segments segs, const Index* __restrict__ start,
                                  const Index* __restrict__ count, int num_problems,
                                  GroveGroupedArgsView out) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p < num_problems) fill_problem(layout, segs, start, count, p, out);
}

// grid (problems, chunks): each block zeroes a strided part of D_p when problem p has no rows.
template <typename Index>
__global__ void zero_empty_problems(Segments segs, const Index* __restrict__ start,
                                    const Index* __restrict__ count, int num_problems) {
  const int p = blockIdx.x;
  if (p >= num_problems) return;
  const GroveGemmSegment& seg = segs.s[segment_of(segs, p)];
  int64_t row, rows;
  local_rows(seg, start, count, p, &row, &rows);  // the same clamping as the fill's M = 0
  if (rows > 0) return;
  const int64_t j = p - seg.first_problem;
  auto* d = static_cast<uint16_t*>(seg.d) + j * seg.d_problem_stride;
  const int64_t total = static_cast<int64_t>(seg.m) * seg.n;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    d[(i / seg.n) * seg.ldd + i % seg.n] = 0;  // +0.0 in both bf16 and fp16
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// Host-side checks shared by the fill and the zeroing; copies the segments into `segs`.
int check_segments(int layout, const GroveGemmSegment* segments, int num_segments,
                          int num_problems, Segments* segs) {
  if (!segments || num_segments < 1 || num_segments > GROVE_MAX_SEGMENTS || num_problems < 0 ||
      (layout != GROVE_LAYOUT_TN && layout != GROVE_LAYOUT_TT && layout != GROVE_LAYOUT_NT &&
       layout != GROVE_LAYOUT_TN_SWIGLU))
    return GROVE_ERR_INVALID_ARGUMENT;
  // tn_swiglu: N counts packed gate + up columns, D holds N / 2 (whole blocks of 8 pairs).
  const bool swiglu = layout == GROVE_LAYOUT_TN_SWIGLU;
  *segs = Segments{};
  segs->count = num_segments;
  int next = 0;
  for (int i = 0; i < num_segments; ++i) {
    const GroveGemmSegment& s = segments[i];
    // Segments tile [0, P) in order; 16-bit operands need 16-byte (8-element) alignment for
    // TMA, in every pointer and every non-unit stride.
    bool ok = s.first_problem == next && s.num_problems >= 0 && s.n > 0 && s.rows >= 0 &&
              (s.rows == 0 || (s.a && s.d)) && (s.num_problems == 0 || (s.b && s.d)) &&
              aligned16(s.a) && aligned16(s.b) && aligned16(s.d) && s.lda % 8 == 0 &&
              s.ldb % 8 == 0 && s.ldd % 8 == 0 && s.n % (swiglu ? 16 : 8) == 0 &&
              s.ldd >= (swiglu ? s.n / 2 : s.n);
    if (layout == GROVE_LAYOUT_NT) {
      // A rows hold M values, B rows N values; D_j = d + j * d_problem_stride.
      ok = ok && s.m > 0 && s.m % 8 == 0 && s.lda >= s.m && s.ldb >= s.n &&
           s.d_problem_stride % 8 == 0 && s.d_problem_stride >= s.ldd * (s.m - 1) + s.n;
    } else {
      const int64_t b_row = layout == GROVE_LAYOUT_TT ? s.n : s.k;  // B's contiguous extent
      ok = ok && s.k > 0 && s.k % 8 == 0 && s.lda >= s.k && s.ldb >= b_row &&
           s.b_problem_stride % 8 == 0;
    }
    if (!ok) return GROVE_ERR_INVALID_ARGUMENT;
    next += s.num_problems;
    segs->s[i] = s;
  }
  return next == num_problems ? GROVE_OK : GROVE_ERR_INVALID_ARGUMENT;
}

}  // namespace

extern "C" {

const char* grove_cuda_error_string(int code) {
  switch (code) {
    case GROVE_OK: return "success";
    case GROVE_ERR_INVALID_ARGUMENT: return "invalid argument";
    case GROVE_ERR_WORKSPACE_TOO_SMALL: return "workspace too small";
    case GROVE_ERR_CUDA: return "CUDA runtime error";
    case GROVE_ERR_CUTLASS: return "CUTLASS refused the problem (can_implement/initialize/run)";
    case GROVE_ERR_NOT_COMPILED: return "kernel not compiled for sm_90a";
    default: return "unknown error";
  }
}

size_t grove_grouped_args_bytes(int num_problems) {
  if (num_problems <= 0) return 0;
  const size_t p = static_cast<size_t>(num_problems);
  return align_up(p * 3 * sizeof(int32_t)) + 3 * align_up(p * sizeof(void*)) +
         3 * align_up(p * sizeof(int64_t));
}

GroveGroupedArgsView grove_grouped_args_view(void* args, int num_problems) {
  const size_t p = static_cast<size_t>(num_problems > 0 ? num_problems : 0);
  char* base = static_cast<char*>(args);
  GroveGroupedArgsView v;
  v.shapes = reinterpret_cast<int32_t*>(base);
  base += align_up(p * 3 * sizeof(int32_t));
  v.ptr_a = reinterpret_cast<const void**>(base);
  base += align_up(p * sizeof(void*));
  v.ptr_b = reinterpret_cast<const void**>(base);
  base += align_up(p * sizeof(void*));
  v.ptr_d = reinterpret_cast<void**>(base);
  base += align_up(p * sizeof(void*));
  v.ld_a = reinterpret_cast<int64_t*>(base);
  base += align_up(p * sizeof(int64_t));
  v.ld_b = reinterpret_cast<int64_t*>(base);
  base += align_up(p * sizeof(int64_t));
  v.ld_d = reinterpret_cast<int64_t*>(base);
  return v;
}

int grove_grouped_args_fill(int layout, const GroveGemmSegment* segments, int num_segments,
                            const void* start, const void* count, int index_bytes,
                            int num_problems, void* args, cudaStream_t stream) {
  if (!args || (index_bytes != 4 && index_bytes != 8)) return GROVE_ERR_INVALID_ARGUMENT;
  Segments segs;
  int rc = check_segments(layout, segments, num_segments, num_problems, &segs);
  if (rc != GROVE_OK) return rc;
  if (num_problems == 0) return GROVE_OK;
  if (!start || !count) return GROVE_ERR_INVALID_ARGUMENT;
  const GroveGroupedArgsView view = grove_grouped_args_view(args, num_problems);
  const int threads = 128;
  const int blocks = (num_problems + threads - 1) / threads;
  if (index_bytes == 4) {
    fill_grouped_args<int32_t><<<blocks, threads, 0, stream>>>(
        layout, segs, static_cast<const int32_t*>(start), static_cast<const int32_t*>(count),
        num_problems, view);
  } else {
    fill_grouped_args<int64_t><<<blocks, threads, 0, stream>>>(
        layout, segs, static_cast<const int64_t*>(start), static_cast<const int64_t*>(count),
        num_problems, view);
  }
  return cudaGetLastError() == cudaSuccess ? GROVE_OK : GROVE_ERR_CUDA;
}

int grove_grouped_zero_empty(int dtype, const GroveGemmSegment* segments, int num_segments,
                             const void* start, const void* count, int index_bytes,
                             int num_problems, cudaStream_t stream) {
  if ((dtype != GROVE_DTYPE_BF16 && dtype != GROVE_DTYPE_FP16) ||
      (index_bytes != 4 && index_bytes != 8))
    return GROVE_ERR_INVALID_ARGUMENT;
  Segments segs;
  int rc = check_segments(GROVE_LAYOUT_NT, segments, num_segments, num_problems, &segs);
  if (rc != GROVE_OK) return rc;
  if (num_problems == 0) return GROVE_OK;
  if (!start || !count) return GROVE_ERR_INVALID_ARGUMENT;
  // Most problems have rows and their blocks exit at once; an empty one spreads its m x n
  // zeros over `chunks` blocks.
  const dim3 grid(num_problems, 16);
  if (index_bytes == 4) {
    zero_empty_problems<int32_t><<<grid, 256, 0, stream>>>(
        segs, static_cast<const int32_t*>(start), static_cast<const int32_t*>(count),
        num_problems);
  } else {
    zero_empty_problems<int64_t><<<grid, 256, 0, stream>>>(
        segs, static_cast<const int64_t*>(start), static_cast<const int64_t*>(count),
        num_problems);
  }
  return cudaGetLastError() == cudaSuccess ? GROVE_OK : GROVE_ERR_CUDA;
}

int grove_device_sm_count(void) {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return -1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return -1;
  return sms;
}

}  // extern "C"
