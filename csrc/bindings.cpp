// bindings.cpp: registers the torch-free CUDA launchers of csrc/*.cu as torch ops
// (namespace grove_cuda). Compiled by g++ as a plain CppExtension: it links libtorch/libc10
// but not libtorch_cuda/libc10_cuda, so the extension also links and imports under the CPU
// torch wheel (DESIGN §4), where the ops register and validate but cannot run.
//
// The caller passes the CUDA stream as an int (torch.cuda.current_stream().cuda_stream): a
// c10::Stream id is not a cudaStream_t, and resolving one needs libc10_cuda. The workspace is
// allocated from torch's allocator on the tensors' device, so the stream must be the current
// torch stream of that device (which is what the Python wrappers pass).
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "grove_cuda.h"

namespace {

typedef size_t (*WorkspaceFn)(int, int);
typedef int (*GroupedGemmFn)(const GroveGemmSegment*, int, const void*, const void*, int, int,
                             int, void*, size_t, cudaStream_t);

struct GemmConfig {
  const char* name;
  WorkspaceFn workspace_size;
  GroupedGemmFn run;
};

#define GROVE_CONFIG(SHORT) \
  { #SHORT, grove_grouped_bf16_tn_##SHORT##_workspace_size, grove_grouped_bf16_tn_##SHORT }

const GemmConfig kGemmConfigs[] = {
    GROVE_CONFIG(coop_128x256_c11),
    GROVE_CONFIG(pingpong_64x128_c11),
};

const GemmConfig& find_config(const std::string& config) {
  for (const auto& c : kGemmConfigs)
    if (config == c.name) return c;
  std::string names;
  for (const auto& c : kGemmConfigs) names += std::string(names.empty() ? "" : ", ") + c.name;
  TORCH_CHECK(false, "grouped_gemm_bf16: config must be one of [", names, "], got '", config, "'");
}

std::vector<std::string> grouped_gemm_configs() {
  std::vector<std::string> names;
  for (const auto& c : kGemmConfigs) names.emplace_back(c.name);
  return names;
}

int64_t grouped_gemm_workspace_size(int64_t num_problems, const std::string& config,
                                    int64_t sm_count) {
  const GemmConfig& c = find_config(config);
  TORCH_CHECK(num_problems >= 0 && num_problems <= std::numeric_limits<int>::max(),
              "grouped_gemm_workspace_size: num_problems must be in [0, 2^31), got ", num_problems);
  TORCH_CHECK(sm_count > 0, "grouped_gemm_workspace_size: sm_count must be > 0, got ", sm_count);
  return static_cast<int64_t>(c.workspace_size(static_cast<int>(num_problems),
                                               static_cast<int>(sm_count)));
}

void check_fits_int32(int64_t v, const char* what, size_t s) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int32_t>::max(), "grouped_gemm_bf16: ", what,
              "[", s, "] must fit in int32, got ", v);
}

// D_p = A_p @ B_p^T for every problem p of the plan; see grove_cuda.h for the segment layout.
//   a[s]   [R_s, K_s] bf16, row-major (last-dim stride 1): the rows of segment s
//   b[s]   [P_s, N_s, K_s] bf16, K contiguous: one weight matrix per problem
//   out[s] [R_s, N_s] bf16, row-major: written only on the rows of the problems
//   start, count [sum P_s] int32 or int64 (same dtype): absolute plan rows; segment s's rows
//          begin at sum_{s' < s} R_s' (the plan's expert section, then its adjugate section)
void grouped_gemm_bf16(at::TensorList a, at::TensorList b, at::TensorList out,
                       const at::Tensor& start, const at::Tensor& count, const std::string& config,
                       int64_t stream) {
  const GemmConfig& cfg = find_config(config);
  const size_t num_segments = a.size();
  TORCH_CHECK(num_segments >= 1 && num_segments <= GROVE_MAX_SEGMENTS,
              "grouped_gemm_bf16: a must hold 1 to ", GROVE_MAX_SEGMENTS, " tensors, got ",
              num_segments);
  TORCH_CHECK(b.size() == num_segments && out.size() == num_segments,
              "grouped_gemm_bf16: a, b and out must have the same length, got ", num_segments, ", ",
              b.size(), " and ", out.size());
  TORCH_CHECK(start.dim() == 1 && count.dim() == 1,
              "grouped_gemm_bf16: start and count must be 1-D, got ", start.sizes(), " and ",
              count.sizes());
  TORCH_CHECK(start.scalar_type() == count.scalar_type() &&
                  (start.scalar_type() == at::kInt || start.scalar_type() == at::kLong),
              "grouped_gemm_bf16: start and count must both be int32 or both int64, got ",
              start.scalar_type(), " and ", count.scalar_type());
  TORCH_CHECK(start.is_contiguous() && count.is_contiguous(),
              "grouped_gemm_bf16: start and count must be contiguous");

  std::vector<GroveGemmSegment> segments(num_segments);
  int64_t num_problems = 0, row_base = 0;
  for (size_t s = 0; s < num_segments; ++s) {
    const at::Tensor& as = a[s];
    const at::Tensor& bs = b[s];
    const at::Tensor& ds = out[s];
    TORCH_CHECK(as.dim() == 2, "grouped_gemm_bf16: a[", s, "] must be 2-D [rows, K], got ",
                as.sizes());
    TORCH_CHECK(bs.dim() == 3, "grouped_gemm_bf16: b[", s, "] must be 3-D [problems, N, K], got ",
                bs.sizes());
    TORCH_CHECK(ds.dim() == 2, "grouped_gemm_bf16: out[", s, "] must be 2-D [rows, N], got ",
                ds.sizes());
    TORCH_CHECK(as.scalar_type() == at::kBFloat16 && bs.scalar_type() == at::kBFloat16 &&
                    ds.scalar_type() == at::kBFloat16,
                "grouped_gemm_bf16: a[", s, "], b[", s, "] and out[", s,
                "] must be bfloat16, got ", as.scalar_type(), ", ", bs.scalar_type(), " and ",
                ds.scalar_type());
    const int64_t rows = as.size(0), k = as.size(1), n = bs.size(1);
    TORCH_CHECK(bs.size(2) == k, "grouped_gemm_bf16: b[", s, "] has K = ", bs.size(2),
                " but a[", s, "] has K = ", k);
    TORCH_CHECK(ds.size(0) == rows && ds.size(1) == n, "grouped_gemm_bf16: out[", s,
                "] must be [", rows, ", ", n, "], got ", ds.sizes());
    TORCH_CHECK(k > 0 && n > 0, "grouped_gemm_bf16: N and K of segment ", s,
                " must be positive, got N = ", n, ", K = ", k);
    TORCH_CHECK(as.stride(1) == 1 && bs.stride(2) == 1 && ds.stride(1) == 1,
                "grouped_gemm_bf16: the last dimension of a[", s, "], b[", s, "] and out[", s,
                "] must be contiguous");
    TORCH_CHECK(n % 8 == 0 && k % 8 == 0, "grouped_gemm_bf16: N and K must be multiples of 8 ",
                "(16-byte TMA alignment), got N = ", n, ", K = ", k, " in segment ", s);
    TORCH_CHECK(as.stride(0) % 8 == 0 && bs.stride(1) % 8 == 0 && bs.stride(0) % 8 == 0 &&
                    ds.stride(0) % 8 == 0,
                "grouped_gemm_bf16: row strides of a[", s, "], b[", s, "] and out[", s,
                "] must be multiples of 8 elements");
    check_fits_int32(rows, "a.size(0) of segment", s);
    check_fits_int32(n, "N of segment", s);
    check_fits_int32(k, "K of segment", s);
    check_fits_int32(bs.size(0), "problems of segment", s);
    GroveGemmSegment& g = segments[s];
    g.a = as.data_ptr();
    g.b = bs.data_ptr();
    g.d = ds.data_ptr();
    g.lda = as.stride(0);
    g.ldb = bs.stride(1);
    g.ldd = ds.stride(0);
    g.b_problem_stride = bs.stride(0);
    g.row_base = row_base;
    g.rows = rows;
    g.n = static_cast<int32_t>(n);
    g.k = static_cast<int32_t>(k);
    g.first_problem = static_cast<int32_t>(num_problems);
    g.num_problems = static_cast<int32_t>(bs.size(0));
    TORCH_CHECK(
        (reinterpret_cast<uintptr_t>(g.a) | reinterpret_cast<uintptr_t>(g.b) |
         reinterpret_cast<uintptr_t>(g.d)) % 16 == 0 || rows == 0,
        "grouped_gemm_bf16: a[", s, "], b[", s, "] and out[", s, "] must be 16-byte aligned");
    num_problems += bs.size(0);
    row_base += rows;
  }
  TORCH_CHECK(num_problems <= std::numeric_limits<int32_t>::max(),
              "grouped_gemm_bf16: too many problems: ", num_problems);
  TORCH_CHECK(start.numel() == num_problems && count.numel() == num_problems,
              "grouped_gemm_bf16: start and count must have one entry per problem (",
              num_problems, " = sum of b[s].size(0)), got ", start.numel(), " and ",
              count.numel());

  const at::Device device = a[0].device();
  TORCH_CHECK(device.is_cuda(), "grouped_gemm_bf16: tensors must be on a CUDA device, got a[0] on ",
              device);
  for (size_t s = 0; s < num_segments; ++s) {
    TORCH_CHECK(a[s].device() == device && b[s].device() == device && out[s].device() == device,
                "grouped_gemm_bf16: a, b and out must all be on ", device);
  }
  TORCH_CHECK(start.device() == device && count.device() == device,
              "grouped_gemm_bf16: start and count must be on ", device, ", got ", start.device(),
              " and ", count.device());
  if (num_problems == 0) return;

  c10::DeviceGuard guard(device);
  const int sm_count = grove_device_sm_count();
  TORCH_CHECK(sm_count > 0, "grouped_gemm_bf16: could not query the multiprocessor count of ",
              device);
  const size_t bytes = cfg.workspace_size(static_cast<int>(num_problems), sm_count);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(bytes)}, a[0].options().dtype(at::kByte));
  const int rc = cfg.run(segments.data(), static_cast<int>(num_segments), start.data_ptr(),
                         count.data_ptr(), static_cast<int>(start.element_size()),
                         static_cast<int>(num_problems), sm_count, workspace.data_ptr(), bytes,
                         reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream)));
  TORCH_CHECK(rc == GROVE_OK, "grouped_gemm_bf16 (config ", cfg.name, ") failed: ",
              grove_cuda_error_string(rc));
}

}  // namespace

TORCH_LIBRARY(grove_cuda, m) {
  m.def(
      "grouped_gemm_bf16(Tensor[] a, Tensor[] b, Tensor(a!)[] out, Tensor start, Tensor count, "
      "str config, int stream) -> ()");
  m.def("grouped_gemm_configs() -> str[]", &grouped_gemm_configs);
  m.def("grouped_gemm_workspace_size(int num_problems, str config, int sm_count) -> int",
        &grouped_gemm_workspace_size);
}

// CompositeExplicitAutograd: one kernel for every device, so that argument errors surface as
// the checks above (also on CPU tensors under the CPU wheel) rather than as a dispatch error.
TORCH_LIBRARY_IMPL(grove_cuda, CompositeExplicitAutograd, m) {
  m.impl("grouped_gemm_bf16", &grouped_gemm_bf16);
}

// `import grove_kernels._C` loads the library (and so runs the registrations above).
static struct PyModuleDef grove_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                            "grove-kernels CUDA ops (torch.ops.grove_cuda)", -1,
                                            nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&grove_c_module); }
