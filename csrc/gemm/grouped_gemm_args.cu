// grouped_gemm_args.cu: writes the device-side arguments of a ptr-array grouped GEMM from a
// Plan's problem rows (start[P], count[P]) in one small kernel, so a forward never reads the
// routing back to the host (docs/design.md §4: host problem shapes stay null; ~20 torch ops cost
// 44-200 us); zeroes the weight gradient of k-grouped problems without rows.
// Torch-free: raw pointers, a cudaStream_t, an int error code.
#include <cuda_runtime.h>

#include "grove_cuda.h"

namespace {

constexpr size_t kAlign = 128;

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

struct Sections {
  GroveGemmSection s[GROVE_MAX_SECTIONS];
  int count;
};

// Section-local first row and row count of problem p, clamped so that a corrupt plan shrinks
// the problem instead of addressing out of bounds.
template <typename Index>
__host__ __device__ void local_rows(const GroveGemmSection& sec, const Index* start,
                                    const Index* count, int p, int64_t* row, int64_t* m) {
  int64_t r = static_cast<int64_t>(start[p]) - sec.row_base;
  int64_t c = static_cast<int64_t>(count[p]);
  if (r < 0 || r > sec.rows) { r = 0; c = 0; }
  if (c < 0) c = 0;
  if (c > sec.rows - r) c = sec.rows - r;
  *row = r;
  *m = c;
}

__host__ __device__ int section_of(const Sections& secs, int p) {
  int si = 0;
#pragma unroll
  for (int i = 1; i < GROVE_MAX_SECTIONS; ++i) {
    if (i < secs.count && p >= secs.s[i].first_problem) si = i;
  }
  return si;
}

// The arguments of problem p (host-callable: grove_grouped_args_fill_host and
// tests/cuda/grouped_gemm_args_check.cu run it on the CPU).
template <typename Index>
__host__ __device__ void fill_problem(int layout, const Sections& secs, const Index* start,
                                      const Index* count, int p, GroveGroupedArgsView out) {
  const GroveGemmSection& sec = secs.s[section_of(secs, p)];
  const int64_t j = p - sec.first_problem;
  int64_t row, rows;
  local_rows(sec, start, count, p, &row, &rows);

  // 16-bit elements: only the address arithmetic matters here.
  const auto* a = static_cast<const uint16_t*>(sec.a);
  const auto* b = static_cast<const uint16_t*>(sec.b);
  auto* d = static_cast<uint16_t*>(sec.d);
  if (layout == GROVE_GEMM_K_GROUPED_TN) {
    // K = rows. An empty problem gets M = 0 so CUTLASS schedules no tile for it (its D is
    // zeroed by grove_grouped_zero_empty: a K = 0 accumulator would be garbage).
    out.shapes[3 * p + 0] = rows > 0 ? sec.m : 0;
    out.shapes[3 * p + 1] = sec.n;
    out.shapes[3 * p + 2] = static_cast<int32_t>(rows);
    out.ptr_a[p] = a + row * sec.lda;
    out.ptr_b[p] = b + row * sec.ldb;
    out.ptr_d[p] = d + j * sec.d_problem_stride;
  } else {
    out.shapes[3 * p + 0] = static_cast<int32_t>(rows);
    out.shapes[3 * p + 1] = sec.n;
    out.shapes[3 * p + 2] = sec.k;
    out.ptr_a[p] = a + row * sec.lda;
    out.ptr_b[p] = b + (j / sec.b_shared) * sec.b_problem_stride;
    out.ptr_d[p] = d + row * sec.ldd;
  }
  out.ld_a[p] = sec.lda;
  out.ld_b[p] = sec.ldb;
  out.ld_d[p] = sec.ldd;
}

template <typename Index>
__global__ void fill_grouped_args(int layout, Sections secs, const Index* __restrict__ start,
                                  const Index* __restrict__ count, int num_problems,
                                  GroveGroupedArgsView out) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p < num_problems) fill_problem(layout, secs, start, count, p, out);
}

// grid (problems, chunks): each block zeroes a strided part of D_p when problem p has no rows.
template <typename Index>
__global__ void zero_empty_problems(Sections secs, const Index* __restrict__ start,
                                    const Index* __restrict__ count, int num_problems) {
  const int p = blockIdx.x;
  if (p >= num_problems) return;
  const GroveGemmSection& sec = secs.s[section_of(secs, p)];
  int64_t row, rows;
  local_rows(sec, start, count, p, &row, &rows);  // the same clamping as the fill's M = 0
  if (rows > 0) return;
  const int64_t j = p - sec.first_problem;
  auto* d = static_cast<uint16_t*>(sec.d) + j * sec.d_problem_stride;
  const int64_t total = static_cast<int64_t>(sec.m) * sec.n;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    d[(i / sec.n) * sec.ldd + i % sec.n] = 0;  // +0.0 in both bf16 and fp16
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// Host-side checks shared by the fill and the zeroing; copies the sections into `secs`.
int check_sections(int layout, const GroveGemmSection* sections, int num_sections,
                   int num_problems, Sections* secs) {
  if (!sections || num_sections < 1 || num_sections > GROVE_MAX_SECTIONS || num_problems < 0 ||
      (layout != GROVE_GEMM_M_GROUPED_NT && layout != GROVE_GEMM_M_GROUPED_NN &&
       layout != GROVE_GEMM_K_GROUPED_TN && layout != GROVE_GEMM_M_GROUPED_NT_SWIGLU))
    return GROVE_ERR_INVALID_ARGUMENT;
  // M_GROUPED_NT_SWIGLU: N counts packed gate + up columns, D holds N / 2 (whole blocks of 8).
  const bool swiglu = layout == GROVE_GEMM_M_GROUPED_NT_SWIGLU;
  *secs = Sections{};
  secs->count = num_sections;
  int next = 0;
  for (int i = 0; i < num_sections; ++i) {
    const GroveGemmSection& s = sections[i];
    // Sections tile [0, P) in order; 16-bit operands need 16-byte (8-element) alignment for
    // TMA, in every pointer and every non-unit stride.
    bool ok = s.first_problem == next && s.num_problems >= 0 && s.n > 0 && s.rows >= 0 &&
              (s.rows == 0 || (s.a && s.d)) && (s.num_problems == 0 || (s.b && s.d)) &&
              aligned16(s.a) && aligned16(s.b) && aligned16(s.d) && s.lda % 8 == 0 &&
              s.ldb % 8 == 0 && s.ldd % 8 == 0 && s.n % (swiglu ? 16 : 8) == 0 &&
              s.ldd >= (swiglu ? s.n / 2 : s.n) && s.b_shared >= 1;
    if (layout == GROVE_GEMM_K_GROUPED_TN) {
      // A rows hold M values, B rows N values; D_j = d + j * d_problem_stride.
      ok = ok && s.b_shared == 1 && s.m > 0 && s.m % 8 == 0 && s.lda >= s.m && s.ldb >= s.n &&
           s.d_problem_stride % 8 == 0 && s.d_problem_stride >= s.ldd * (s.m - 1) + s.n;
    } else {
      const int64_t b_row = layout == GROVE_GEMM_M_GROUPED_NN ? s.n : s.k;  // B's row extent
      ok = ok && s.k > 0 && s.k % 8 == 0 && s.lda >= s.k && s.ldb >= b_row &&
           s.b_problem_stride % 8 == 0;
    }
    if (!ok) return GROVE_ERR_INVALID_ARGUMENT;
    next += s.num_problems;
    secs->s[i] = s;
  }
  return next == num_problems ? GROVE_OK : GROVE_ERR_INVALID_ARGUMENT;
}

// The checks of both fills (device and host): the argument buffer and the index width, the
// sections, and the problem lists unless there are no problems (then nothing is filled).
int check_fill(int layout, const GroveGemmSection* sections, int num_sections, const void* start,
               const void* count, int index_bytes, int num_problems, const void* args,
               Sections* secs) {
  if (!args || (index_bytes != 4 && index_bytes != 8)) return GROVE_ERR_INVALID_ARGUMENT;
  const int rc = check_sections(layout, sections, num_sections, num_problems, secs);
  if (rc != GROVE_OK) return rc;
  if (num_problems > 0 && (!start || !count)) return GROVE_ERR_INVALID_ARGUMENT;
  return GROVE_OK;
}

}  // namespace

extern "C" {

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

int grove_grouped_args_fill(int layout, const GroveGemmSection* sections, int num_sections,
                            const void* start, const void* count, int index_bytes,
                            int num_problems, void* args, cudaStream_t stream) {
  Sections secs;
  const int rc = check_fill(layout, sections, num_sections, start, count, index_bytes,
                            num_problems, args, &secs);
  if (rc != GROVE_OK || num_problems == 0) return rc;
  const GroveGroupedArgsView view = grove_grouped_args_view(args, num_problems);
  const int threads = 128;
  const int blocks = (num_problems + threads - 1) / threads;
  if (index_bytes == 4) {
    fill_grouped_args<int32_t><<<blocks, threads, 0, stream>>>(
        layout, secs, static_cast<const int32_t*>(start), static_cast<const int32_t*>(count),
        num_problems, view);
  } else {
    fill_grouped_args<int64_t><<<blocks, threads, 0, stream>>>(
        layout, secs, static_cast<const int64_t*>(start), static_cast<const int64_t*>(count),
        num_problems, view);
  }
  return cudaGetLastError() == cudaSuccess ? GROVE_OK : GROVE_ERR_CUDA;
}

int grove_grouped_args_fill_host(int layout, const GroveGemmSection* sections, int num_sections,
                                 const void* start, const void* count, int index_bytes,
                                 int num_problems, void* args) {
  Sections secs;
  const int rc = check_fill(layout, sections, num_sections, start, count, index_bytes,
                            num_problems, args, &secs);
  if (rc != GROVE_OK || num_problems == 0) return rc;
  const GroveGroupedArgsView view = grove_grouped_args_view(args, num_problems);
  for (int p = 0; p < num_problems; ++p) {
    if (index_bytes == 4)
      fill_problem(layout, secs, static_cast<const int32_t*>(start),
                   static_cast<const int32_t*>(count), p, view);
    else
      fill_problem(layout, secs, static_cast<const int64_t*>(start),
                   static_cast<const int64_t*>(count), p, view);
  }
  return GROVE_OK;
}

int grove_grouped_zero_empty(int dtype, const GroveGemmSection* sections, int num_sections,
                             const void* start, const void* count, int index_bytes,
                             int num_problems, cudaStream_t stream) {
  if ((dtype != GROVE_DTYPE_BF16 && dtype != GROVE_DTYPE_FP16) ||
      (index_bytes != 4 && index_bytes != 8))
    return GROVE_ERR_INVALID_ARGUMENT;
  Sections secs;
  int rc = check_sections(GROVE_GEMM_K_GROUPED_TN, sections, num_sections, num_problems, &secs);
  if (rc != GROVE_OK) return rc;
  if (num_problems == 0) return GROVE_OK;
  if (!start || !count) return GROVE_ERR_INVALID_ARGUMENT;
  // Most problems have rows and their blocks exit at once; an empty one spreads its m x n
  // zeros over `chunks` blocks.
  const dim3 grid(num_problems, 16);
  if (index_bytes == 4) {
    zero_empty_problems<int32_t><<<grid, 256, 0, stream>>>(
        secs, static_cast<const int32_t*>(start), static_cast<const int32_t*>(count),
        num_problems);
  } else {
    zero_empty_problems<int64_t><<<grid, 256, 0, stream>>>(
        secs, static_cast<const int64_t*>(start), static_cast<const int64_t*>(count),
        num_problems);
  }
  return cudaGetLastError() == cudaSuccess ? GROVE_OK : GROVE_ERR_CUDA;
}

// The persistent GEMMs size their grid by it (CUTLASS's KernelHardwareInfo).
int grove_device_sm_count(void) {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return -1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return -1;
  return sms;
}

}  // extern "C"
