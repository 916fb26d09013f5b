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

template <typename Index>
__global__ void fill_grouped_args(Segments segs, const Index* __restrict__ start,
                                  const Index* __restrict__ count, int num_problems,
                                  GroveGroupedArgsView out) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= num_problems) return;
  int si = 0;
#pragma unroll
  for (int i = 1; i < GROVE_MAX_SEGMENTS; ++i) {
    if (i < segs.count && p >= segs.s[i].first_problem) si = i;
  }
  const GroveGemmSegment& seg = segs.s[si];
  const int64_t j = p - seg.first_problem;
  // Segment-local first row, clamped so that a corrupt plan shrinks M instead of writing
  // out of bounds.
  int64_t row = static_cast<int64_t>(start[p]) - seg.row_base;
  int64_t m = static_cast<int64_t>(count[p]);
  if (row < 0 || row > seg.rows) { row = 0; m = 0; }
  if (m < 0) m = 0;
  if (m > seg.rows - row) m = seg.rows - row;

  // bf16 elements are 2 bytes; only the address arithmetic matters here.
  const auto* a = static_cast<const uint16_t*>(seg.a);
  const auto* b = static_cast<const uint16_t*>(seg.b);
  auto* d = static_cast<uint16_t*>(seg.d);
  out.shapes[3 * p + 0] = static_cast<int32_t>(m);
  out.shapes[3 * p + 1] = seg.n;
  out.shapes[3 * p + 2] = seg.k;
  out.ptr_a[p] = a + row * seg.lda;
  out.ptr_b[p] = b + j * seg.b_problem_stride;
  out.ptr_d[p] = d + row * seg.ldd;
  out.ld_a[p] = seg.lda;
  out.ld_b[p] = seg.ldb;
  out.ld_d[p] = seg.ldd;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

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

int grove_grouped_args_fill(const GroveGemmSegment* segments, int num_segments,
                            const void* start, const void* count, int index_bytes,
                            int num_problems, void* args, cudaStream_t stream) {
  if (!segments || num_segments < 1 || num_segments > GROVE_MAX_SEGMENTS || num_problems < 0 ||
      !args || (index_bytes != 4 && index_bytes != 8))
    return GROVE_ERR_INVALID_ARGUMENT;
  if (num_problems == 0) return GROVE_OK;
  if (!start || !count) return GROVE_ERR_INVALID_ARGUMENT;
  Segments segs{};
  segs.count = num_segments;
  int next = 0;
  for (int i = 0; i < num_segments; ++i) {
    const GroveGemmSegment& s = segments[i];
    // Segments tile [0, P) in order; bf16 operands need 16-byte (8-element) alignment for TMA.
    if (s.first_problem != next || s.num_problems < 0 || s.n <= 0 || s.k <= 0 || s.rows < 0 ||
        (s.rows > 0 && (!s.a || !s.d)) || (s.num_problems > 0 && !s.b) ||
        !aligned16(s.a) || !aligned16(s.b) || !aligned16(s.d) ||
        s.lda % 8 || s.ldb % 8 || s.ldd % 8 || s.b_problem_stride % 8 || s.n % 8 || s.k % 8 ||
        s.lda < s.k || s.ldb < s.k || s.ldd < s.n)
      return GROVE_ERR_INVALID_ARGUMENT;
    next += s.num_problems;
    segs.s[i] = s;
  }
  if (next != num_problems) return GROVE_ERR_INVALID_ARGUMENT;
  const GroveGroupedArgsView view = grove_grouped_args_view(args, num_problems);
  const int threads = 128;
  const int blocks = (num_problems + threads - 1) / threads;
  if (index_bytes == 4) {
    fill_grouped_args<int32_t><<<blocks, threads, 0, stream>>>(
        segs, static_cast<const int32_t*>(start), static_cast<const int32_t*>(count),
        num_problems, view);
  } else {
    fill_grouped_args<int64_t><<<blocks, threads, 0, stream>>>(
        segs, static_cast<const int64_t*>(start), static_cast<const int64_t*>(count),
        num_problems, view);
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
