// bindings.cpp: registers the torch-free grouped-GEMM launchers of csrc/gemm as torch ops
// (namespace grove_cuda; the row kernels are in bindings_rows.cpp). Compiled by g++ as a plain
// CppExtension: it links libtorch/libc10 but not libtorch_cuda/libc10_cuda, so the extension
// also links and imports under the CPU torch wheel (docs/design.md §4), where the ops register
// and validate but cannot run.
//
// The caller passes the CUDA stream as an int (torch.cuda.current_stream().cuda_stream): a
// c10::Stream id is not a cudaStream_t, and resolving one needs libc10_cuda. The workspace is
// allocated from torch's allocator on the tensors' device, so the stream must be the current
// torch stream of that device (which is what the Python wrappers pass).
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "bindings.hpp"
#include "grove_cuda.h"

namespace {

using grove_bindings::leading_dim;

typedef size_t (*WorkspaceFn)(int, int);
typedef int (*GemmFn)(const GroveGemmSection*, int, const void*, const void*, int, int, int,
                      void*, size_t, cudaStream_t);

struct GemmKernel {
  const char* name;  // e.g. "sm90_bf16_m_grouped_nt_coop_128x256x64_c1x1"
  int dtype;         // GROVE_DTYPE_*
  int layout;        // GROVE_GEMM_*
  WorkspaceFn workspace_size;
  GemmFn run;
};

#define GROVE_GEMM_KERNEL_ENTRY(NAME, DTYPE, LAYOUT, SCHEDULE, BM, BN, BK, CM, CN) \
  {#NAME, DTYPE, LAYOUT, grove_##NAME##_workspace_size, grove_##NAME},

const GemmKernel kGemmKernels[] = {GROVE_FOR_EACH_GEMM_KERNEL(GROVE_GEMM_KERNEL_ENTRY)};

#undef GROVE_GEMM_KERNEL_ENTRY

const GemmKernel& find_kernel(const std::string& kernel) {
  for (const auto& k : kGemmKernels)
    if (kernel == k.name) return k;
  std::string names;
  for (const auto& k : kGemmKernels) names += std::string(names.empty() ? "" : ", ") + k.name;
  TORCH_CHECK(false, "grouped_gemm: kernel must be one of [", names, "], got '", kernel, "'");
}

std::vector<std::string> grouped_gemm_kernels() {
  std::vector<std::string> names;
  for (const auto& k : kGemmKernels) names.emplace_back(k.name);
  return names;
}

int64_t grouped_gemm_workspace_size(int64_t num_problems, const std::string& kernel,
                                    int64_t sm_count) {
  const GemmKernel& k = find_kernel(kernel);
  TORCH_CHECK(num_problems >= 0 && num_problems <= std::numeric_limits<int>::max(),
              "grouped_gemm_workspace_size: num_problems must be in [0, 2^31), got ", num_problems);
  TORCH_CHECK(sm_count > 0, "grouped_gemm_workspace_size: sm_count must be > 0, got ", sm_count);
  return static_cast<int64_t>(k.workspace_size(static_cast<int>(num_problems),
                                               static_cast<int>(sm_count)));
}

void check_fits_int32(int64_t v, const char* what, size_t s) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int32_t>::max(), "grouped_gemm: ", what,
              " of section ", s, " must fit in int32, got ", v);
}


at::ScalarType scalar_type_of(int dtype) {
  return dtype == GROVE_DTYPE_BF16 ? at::kBFloat16 : at::kHalf;
}

// Section s's GroveGemmSection from its tensors; see grove_cuda.h for the layouts:
//   m_grouped_nt:        a [R, K], b [P, N, K], out [R, N]
//   m_grouped_nt_swiglu: a [R, K], b [P, N, K] (rows [0, N/2) gate, [N/2, N) up), out [R, N / 2]
//   m_grouped_nn:        a [R, K], b [P, K, N], out [R, N]
//   k_grouped_tn:        a [R, M], b [R, N],    out [P, M, N]   (a problem's K = its rows)
GroveGemmSection make_section(const GemmKernel& kernel, size_t s, const at::Tensor& as,
                              const at::Tensor& bs, const at::Tensor& ds, int64_t* problems) {
  const bool swiglu = kernel.layout == GROVE_GEMM_M_GROUPED_NT_SWIGLU;
  const bool k_grouped = kernel.layout == GROVE_GEMM_K_GROUPED_TN;
  const bool b_nk = kernel.layout == GROVE_GEMM_M_GROUPED_NT || swiglu;  // B stored [N, K]
  const at::ScalarType dt = scalar_type_of(kernel.dtype);
  TORCH_CHECK(as.scalar_type() == dt && bs.scalar_type() == dt && ds.scalar_type() == dt,
              "grouped_gemm: a[", s, "], b[", s, "] and out[", s, "] must be ", dt,
              " for kernel ", kernel.name, ", got ", as.scalar_type(), ", ", bs.scalar_type(),
              " and ", ds.scalar_type());
  TORCH_CHECK(as.dim() == 2, "grouped_gemm: a[", s, "] must be 2-D [rows, ",
              k_grouped ? "M" : "K", "], got ", as.sizes());
  TORCH_CHECK(bs.dim() == (k_grouped ? 2 : 3), "grouped_gemm: b[", s, "] must be ",
              k_grouped ? "2-D [rows, N]" : (b_nk ? "3-D [problems, N, K]"
                                                  : "3-D [problems, K, N]"),
              ", got ", bs.sizes());
  TORCH_CHECK(ds.dim() == (k_grouped ? 3 : 2), "grouped_gemm: out[", s, "] must be ",
              k_grouped ? "3-D [problems, M, N]" : "2-D [rows, N]", ", got ", ds.sizes());
  TORCH_CHECK(as.stride(1) == 1 && bs.stride(bs.dim() - 1) == 1 && ds.stride(ds.dim() - 1) == 1,
              "grouped_gemm: the last dimension of a[", s, "], b[", s, "] and out[", s,
              "] must be contiguous");
  GroveGemmSection g{};
  g.b_shared = 1;
  g.a = as.data_ptr();
  g.b = bs.data_ptr();
  g.d = ds.data_ptr();
  g.lda = leading_dim(as);
  g.rows = as.size(0);
  int64_t m = 0, n, k = 0;
  if (k_grouped) {
    m = as.size(1);
    n = bs.size(1);
    TORCH_CHECK(bs.size(0) == as.size(0), "grouped_gemm: b[", s, "] must have the rows of a[",
                s, "] (", as.size(0), "), got ", bs.size(0));
    TORCH_CHECK(ds.size(1) == m && ds.size(2) == n, "grouped_gemm: out[", s, "] must be [P, ",
                m, ", ", n, "], got ", ds.sizes());
    g.ldb = leading_dim(bs);
    g.ldd = ds.stride(1);
    g.d_problem_stride = ds.stride(0);
    *problems = ds.size(0);
  } else {
    k = as.size(1);
    n = b_nk ? bs.size(1) : bs.size(2);
    const int64_t bk = b_nk ? bs.size(2) : bs.size(1);
    TORCH_CHECK(bk == k, "grouped_gemm: b[", s, "] has K = ", bk, " but a[", s, "] has K = ", k);
    const int64_t width = swiglu ? n / 2 : n;
    TORCH_CHECK(ds.size(0) == as.size(0) && ds.size(1) == width, "grouped_gemm: out[", s,
                "] must be [", as.size(0), ", ", width, "]", swiglu ? " (half of b's N)" : "",
                ", got ", ds.sizes());
    TORCH_CHECK(!swiglu || n % 16 == 0, "grouped_gemm: b[", s, "] must have N a multiple of 16 "
                "for ", kernel.name, " (its output width N / 2 in whole 16-byte chunks), got ", n);
    g.ldb = bs.stride(1);
    g.ldd = leading_dim(ds);
    g.b_problem_stride = bs.stride(0);
    *problems = bs.size(0);
  }
  TORCH_CHECK(n > 0 && (k_grouped ? m > 0 : k > 0), "grouped_gemm: the sizes of section ", s,
              " must be positive, got M = ", m, ", N = ", n, ", K = ", k);
  TORCH_CHECK(n % 8 == 0 && k % 8 == 0 && m % 8 == 0,
              "grouped_gemm: M, N and K must be multiples of 8 (16-byte TMA alignment), got M = ",
              m, ", N = ", n, ", K = ", k, " in section ", s);
  TORCH_CHECK(g.lda % 8 == 0 && g.ldb % 8 == 0 && g.ldd % 8 == 0 && g.b_problem_stride % 8 == 0 &&
                  g.d_problem_stride % 8 == 0,
              "grouped_gemm: row strides of a[", s, "], b[", s, "] and out[", s,
              "] must be multiples of 8 elements");
  TORCH_CHECK((reinterpret_cast<uintptr_t>(g.a) | reinterpret_cast<uintptr_t>(g.b) |
               reinterpret_cast<uintptr_t>(g.d)) % 16 == 0,
              "grouped_gemm: a[", s, "], b[", s, "] and out[", s, "] must be 16-byte aligned");
  check_fits_int32(g.rows, "the rows", s);
  check_fits_int32(m, "M", s);
  check_fits_int32(n, "N", s);
  check_fits_int32(k, "K", s);
  check_fits_int32(*problems, "the problems", s);
  g.m = static_cast<int32_t>(m);
  g.n = static_cast<int32_t>(n);
  g.k = static_cast<int32_t>(k);
  return g;
}

// The sections of one grouped GEMM from its tensors (see make_section); returns the problem
// count. b_shared (m-grouped only; empty: all 1): problems per B of each section, so section s
// has b[s].size(0) * b_shared[s] problems (the folded layout's adjugate problems: one per
// expert, b = a1 [G, ...], b_shared = S).
int64_t make_sections(const GemmKernel& gemm, at::TensorList a, at::TensorList b,
                      at::TensorList out, const at::Tensor& start, const at::Tensor& count,
                      at::IntArrayRef b_shared, std::vector<GroveGemmSection>* sections) {
  const size_t num_sections = a.size();
  TORCH_CHECK(num_sections >= 1 && num_sections <= GROVE_MAX_SECTIONS,
              "grouped_gemm: a must hold 1 to ", GROVE_MAX_SECTIONS, " tensors, got ",
              num_sections);
  TORCH_CHECK(b.size() == num_sections && out.size() == num_sections,
              "grouped_gemm: a, b and out must have the same length, got ", num_sections, ", ",
              b.size(), " and ", out.size());
  TORCH_CHECK(b_shared.empty() || b_shared.size() == num_sections,
              "grouped_gemm: b_shared must be empty or hold one entry per section (",
              num_sections, "), got ", b_shared.size());
  TORCH_CHECK(start.dim() == 1 && count.dim() == 1,
              "grouped_gemm: start and count must be 1-D, got ", start.sizes(), " and ",
              count.sizes());
  TORCH_CHECK(start.scalar_type() == count.scalar_type() &&
                  (start.scalar_type() == at::kInt || start.scalar_type() == at::kLong),
              "grouped_gemm: start and count must both be int32 or both int64, got ",
              start.scalar_type(), " and ", count.scalar_type());
  TORCH_CHECK(start.is_contiguous() && count.is_contiguous(),
              "grouped_gemm: start and count must be contiguous");

  sections->assign(num_sections, GroveGemmSection{});
  int64_t num_problems = 0, row_base = 0;
  for (size_t s = 0; s < num_sections; ++s) {
    int64_t problems = 0;
    GroveGemmSection& g = (*sections)[s];
    g = make_section(gemm, s, a[s], b[s], out[s], &problems);
    const int64_t shared = b_shared.empty() ? 1 : b_shared[s];
    TORCH_CHECK(shared >= 1 && shared <= std::numeric_limits<int32_t>::max() &&
                    (shared == 1 || gemm.layout != GROVE_GEMM_K_GROUPED_TN),
                "grouped_gemm: b_shared[", s, "] must be >= 1 (1 for a k-grouped kernel), got ",
                shared);
    g.b_shared = static_cast<int32_t>(shared);
    problems *= shared;
    check_fits_int32(problems, "the problems", s);
    g.row_base = row_base;
    g.first_problem = static_cast<int32_t>(num_problems);
    g.num_problems = static_cast<int32_t>(problems);
    num_problems += problems;
    row_base += g.rows;
  }
  TORCH_CHECK(num_problems <= std::numeric_limits<int32_t>::max(),
              "grouped_gemm: too many problems: ", num_problems);
  TORCH_CHECK(start.numel() == num_problems && count.numel() == num_problems,
              "grouped_gemm: start and count must have one entry per problem (", num_problems,
              " in all sections), got ", start.numel(), " and ", count.numel());
  return num_problems;
}

// For every problem p of the plan, D_p = A_p @ B_p with the kernel's dtype and layout.
//   a, b, out: one tensor per section (experts, then adjugates)
//   start, count [sum P_s] int32 or int64 (same dtype): absolute plan rows; section s's rows
//          begin at sum_{s' < s} R_s' (two sections may view one row buffer: then the second
//          section's rows are numbered from R_0 on)
//   row_scale: empty, or (fused SwiGLU kernels only) one fp32 [>= rows_s] per section: D row r
//          of section s is scaled by row_scale[s][r]
void grouped_gemm(at::TensorList a, at::TensorList b, at::TensorList out, const at::Tensor& start,
                  const at::Tensor& count, const std::string& kernel, int64_t stream,
                  at::IntArrayRef b_shared, at::TensorList row_scale) {
  const GemmKernel& gemm = find_kernel(kernel);
  std::vector<GroveGemmSection> sections;
  const int64_t num_problems = make_sections(gemm, a, b, out, start, count, b_shared, &sections);
  const size_t num_sections = sections.size();
  TORCH_CHECK(row_scale.empty() || gemm.layout == GROVE_GEMM_M_GROUPED_NT_SWIGLU,
              "grouped_gemm: row_scale is only for the fused SwiGLU kernels, not ", gemm.name);
  TORCH_CHECK(row_scale.empty() || row_scale.size() == num_sections,
              "grouped_gemm: row_scale must be empty or hold one tensor per section (",
              num_sections, "), got ", row_scale.size());
  for (size_t s = 0; s < row_scale.size(); ++s) {
    const at::Tensor& r = row_scale[s];
    TORCH_CHECK(r.scalar_type() == at::kFloat && r.dim() == 1 && r.is_contiguous() &&
                    r.size(0) >= a[s].size(0),
                "grouped_gemm: row_scale[", s, "] must be a contiguous float32 vector of at least ",
                a[s].size(0), " entries (the rows of a[", s, "]), got ", r.scalar_type(), " ",
                r.sizes());
    TORCH_CHECK(r.device() == a[0].device(), "grouped_gemm: row_scale[", s, "] must be on ",
                a[0].device(), ", got ", r.device());
    sections[s].row_scale = r.data_ptr<float>();
  }

  const at::Device device = a[0].device();
  TORCH_CHECK(device.is_cuda(), "grouped_gemm: tensors must be on a CUDA device, got a[0] on ",
              device);
  for (size_t s = 0; s < num_sections; ++s) {
    TORCH_CHECK(a[s].device() == device && b[s].device() == device && out[s].device() == device,
                "grouped_gemm: a, b and out must all be on ", device);
  }
  TORCH_CHECK(start.device() == device && count.device() == device,
              "grouped_gemm: start and count must be on ", device, ", got ", start.device(),
              " and ", count.device());
  if (num_problems == 0) return;

  c10::DeviceGuard guard(device);
  const int sm_count = grove_device_sm_count();
  TORCH_CHECK(sm_count > 0, "grouped_gemm: could not query the multiprocessor count of ", device);
  const size_t bytes = gemm.workspace_size(static_cast<int>(num_problems), sm_count);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, a[0].options().dtype(at::kByte));
  const int rc = gemm.run(sections.data(), static_cast<int>(num_sections), start.data_ptr(),
                          count.data_ptr(), static_cast<int>(start.element_size()),
                          static_cast<int>(num_problems), sm_count, workspace.data_ptr(), bytes,
                          reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream)));
  TORCH_CHECK(rc == GROVE_OK, "grouped_gemm (kernel ", gemm.name, ") failed: ",
              grove_cuda_error_string(rc));
}

// The argument buffer grouped_gemm would fill on the device (grove_cuda.h's layout:
// shapes | A | B | D | ldA | ldB | ldD), computed on the host by the same fill function from
// host start / count: operands may live anywhere (only their addresses are used), so a CPU
// test checks plan -> problems. Returns a CPU uint8 tensor of grove_grouped_args_bytes(P).
at::Tensor grouped_gemm_args(at::TensorList a, at::TensorList b, at::TensorList out,
                             const at::Tensor& start, const at::Tensor& count,
                             const std::string& kernel, at::IntArrayRef b_shared) {
  const GemmKernel& gemm = find_kernel(kernel);
  std::vector<GroveGemmSection> sections;
  const int64_t num_problems = make_sections(gemm, a, b, out, start, count, b_shared, &sections);
  TORCH_CHECK(start.device().is_cpu() && count.device().is_cpu(),
              "grouped_gemm_args: start and count must be CPU tensors (the fill runs on the "
              "host), got ", start.device());
  const size_t bytes = grove_grouped_args_bytes(static_cast<int>(num_problems));
  at::Tensor args = at::zeros({static_cast<int64_t>(bytes)}, at::kByte);
  const int rc = grove_grouped_args_fill_host(
      gemm.layout, sections.data(), static_cast<int>(sections.size()), start.data_ptr(),
      count.data_ptr(), static_cast<int>(start.element_size()), static_cast<int>(num_problems),
      args.data_ptr());
  TORCH_CHECK(rc == GROVE_OK, "grouped_gemm_args (kernel ", gemm.name, ") failed: ",
              grove_cuda_error_string(rc));
  return args;
}

}  // namespace

TORCH_LIBRARY(grove_cuda, m) {
  m.def(
      "grouped_gemm(Tensor[] a, Tensor[] b, Tensor(a!)[] out, Tensor start, Tensor count, "
      "str kernel, int stream, int[] b_shared, Tensor[] row_scale) -> ()");
  m.def(
      "grouped_gemm_args(Tensor[] a, Tensor[] b, Tensor[] out, Tensor start, Tensor count, "
      "str kernel, int[] b_shared=[]) -> Tensor");
  m.def("grouped_gemm_kernels() -> str[]", &grouped_gemm_kernels);
  m.def("grouped_gemm_workspace_size(int num_problems, str kernel, int sm_count) -> int",
        &grouped_gemm_workspace_size);
}

// CompositeExplicitAutograd: one kernel for every device, so that argument errors surface as
// the checks above (also on CPU tensors under the CPU wheel) rather than as a dispatch error.
TORCH_LIBRARY_IMPL(grove_cuda, CompositeExplicitAutograd, m) {
  m.impl("grouped_gemm", &grouped_gemm);
  m.impl("grouped_gemm_args", &grouped_gemm_args);
}

// `import grove_kernels._C` loads the library (and so runs the registrations above).
static struct PyModuleDef grove_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                            "grove-kernels CUDA ops (torch.ops.grove_cuda)", -1,
                                            nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&grove_c_module); }
