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

#include <algorithm>
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
  const char* name;    // "<dtype>_<layout>_<tile config>", e.g. "bf16_tn_coop_128x256_c11"
  const char* dtype;   // "bf16" | "fp16"
  const char* layout;  // "tn" | "tn_swiglu" | "tt" | "nt"
  WorkspaceFn workspace_size;
  GroupedGemmFn run;
};

#define GROVE_CONFIG(DT, LAYOUT, CONFIG)                                                     \
  {#DT "_" #LAYOUT "_" #CONFIG, #DT, #LAYOUT, grove_grouped_##DT##_##LAYOUT##_##CONFIG##_workspace_size, \
   grove_grouped_##DT##_##LAYOUT##_##CONFIG},

const GemmConfig kGemmConfigs[] = {GROVE_FOR_EACH_GROUPED_GEMM(GROVE_CONFIG)};

const GemmConfig& find_config(const std::string& config) {
  for (const auto& c : kGemmConfigs)
    if (config == c.name) return c;
  std::string names;
  for (const auto& c : kGemmConfigs) names += std::string(names.empty() ? "" : ", ") + c.name;
  TORCH_CHECK(false, "grouped_gemm: config must be one of [", names, "], got '", config, "'");
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
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int32_t>::max(), "grouped_gemm: ", what, "[",
              s, "] must fit in int32, got ", v);
}

// Row stride of a 2-D tensor as the kernels read it. torch calls a one-row tensor contiguous
// whatever its stride(0) (e.g. a [1, H] view of [H, 1] has strides (1, 1)), but the kernels
// check ld >= width, so a single row reports its width instead.
int64_t leading_dim(const at::Tensor& t) {
  return t.size(0) <= 1 ? std::max<int64_t>(t.stride(0), t.size(1)) : t.stride(0);
}

at::ScalarType dtype_of(const GemmConfig& c) {
  return std::string(c.dtype) == "bf16" ? at::kBFloat16 : at::kHalf;
}

// One segment's GroveGemmSegment from its tensors; see grove_cuda.h for the layouts:
//   tn: a [R, K], b [P, N, K], out [R, N]      tt: a [R, K], b [P, K, N], out [R, N]
//   tn_swiglu: a [R, K], b [P, N, K] (gate/up packed), out [R, N / 2]
//   nt: a [R, M], b [R, N],    out [P, M, N]   (per-problem K = the problem's rows)
GroveGemmSegment make_segment(const GemmConfig& cfg, size_t s, const at::Tensor& as,
                              const at::Tensor& bs, const at::Tensor& ds, int64_t* problems) {
  const bool swiglu = std::string(cfg.layout) == "tn_swiglu";
  const std::string layout = swiglu ? "tn" : cfg.layout;
  const bool wgrad = layout == "nt";
  const at::ScalarType dt = dtype_of(cfg);
  TORCH_CHECK(as.scalar_type() == dt && bs.scalar_type() == dt && ds.scalar_type() == dt,
              "grouped_gemm: a[", s, "], b[", s, "] and out[", s, "] must be ", dt,
              " for config ", cfg.name, ", got ", as.scalar_type(), ", ", bs.scalar_type(),
              " and ", ds.scalar_type());
  TORCH_CHECK(as.dim() == 2, "grouped_gemm: a[", s, "] must be 2-D [rows, ",
              wgrad ? "M" : "K", "], got ", as.sizes());
  TORCH_CHECK(bs.dim() == (wgrad ? 2 : 3), "grouped_gemm: b[", s, "] must be ",
              wgrad ? "2-D [rows, N]" : (layout == "tn" ? "3-D [problems, N, K]"
                                                        : "3-D [problems, K, N]"),
              ", got ", bs.sizes());
  TORCH_CHECK(ds.dim() == (wgrad ? 3 : 2), "grouped_gemm: out[", s, "] must be ",
              wgrad ? "3-D [problems, M, N]" : "2-D [rows, N]", ", got ", ds.sizes());
  TORCH_CHECK(as.stride(1) == 1 && bs.stride(bs.dim() - 1) == 1 && ds.stride(ds.dim() - 1) == 1,
              "grouped_gemm: the last dimension of a[", s, "], b[", s, "] and out[", s,
              "] must be contiguous");
  GroveGemmSegment g{};
  g.a = as.data_ptr();
  g.b = bs.data_ptr();
  g.d = ds.data_ptr();
  g.lda = leading_dim(as);
  g.rows = as.size(0);
  int64_t m = 0, n, k = 0;
  if (wgrad) {
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
    n = layout == "tn" ? bs.size(1) : bs.size(2);
    const int64_t bk = layout == "tn" ? bs.size(2) : bs.size(1);
    TORCH_CHECK(bk == k, "grouped_gemm: b[", s, "] has K = ", bk, " but a[", s, "] has K = ", k);
    const int64_t width = swiglu ? n / 2 : n;
    TORCH_CHECK(ds.size(0) == as.size(0) && ds.size(1) == width, "grouped_gemm: out[", s,
                "] must be [", as.size(0), ", ", width, "]", swiglu ? " (half of b's N)" : "",
                ", got ", ds.sizes());
    TORCH_CHECK(!swiglu || n % 16 == 0, "grouped_gemm: b[", s, "] must have N a multiple of 16 "
                "for ", cfg.name, " (whole gate/up blocks of 8), got ", n);
    g.ldb = bs.stride(1);
    g.ldd = leading_dim(ds);
    g.b_problem_stride = bs.stride(0);
    *problems = bs.size(0);
  }
  TORCH_CHECK(n > 0 && (wgrad ? m > 0 : k > 0), "grouped_gemm: the sizes of segment ", s,
              " must be positive, got M = ", m, ", N = ", n, ", K = ", k);
  TORCH_CHECK(n % 8 == 0 && k % 8 == 0 && m % 8 == 0,
              "grouped_gemm: M, N and K must be multiples of 8 (16-byte TMA alignment), got M = ",
              m, ", N = ", n, ", K = ", k, " in segment ", s);
  TORCH_CHECK(g.lda % 8 == 0 && g.ldb % 8 == 0 && g.ldd % 8 == 0 && g.b_problem_stride % 8 == 0 &&
                  g.d_problem_stride % 8 == 0,
              "grouped_gemm: row strides of a[", s, "], b[", s, "] and out[", s,
              "] must be multiples of 8 elements");
  TORCH_CHECK((reinterpret_cast<uintptr_t>(g.a) | reinterpret_cast<uintptr_t>(g.b) |
               reinterpret_cast<uintptr_t>(g.d)) % 16 == 0,
              "grouped_gemm: a[", s, "], b[", s, "] and out[", s, "] must be 16-byte aligned");
  check_fits_int32(g.rows, "rows of segment", s);
  check_fits_int32(m, "M of segment", s);
  check_fits_int32(n, "N of segment", s);
  check_fits_int32(k, "K of segment", s);
  check_fits_int32(*problems, "problems of segment", s);
  g.m = static_cast<int32_t>(m);
  g.n = static_cast<int32_t>(n);
  g.k = static_cast<int32_t>(k);
  return g;
}

// For every problem p of the plan, D_p = A_p @ B_p with the config's dtype and layout.
//   start, count [sum P_s] int32 or int64 (same dtype): absolute plan rows; segment s's rows
//          begin at sum_{s' < s} R_s' (the plan's expert section, then its adjugate section)
void grouped_gemm(at::TensorList a, at::TensorList b, at::TensorList out, const at::Tensor& start,
                  const at::Tensor& count, const std::string& config, int64_t stream) {
  const GemmConfig& cfg = find_config(config);
  const size_t num_segments = a.size();
  TORCH_CHECK(num_segments >= 1 && num_segments <= GROVE_MAX_SEGMENTS,
              "grouped_gemm: a must hold 1 to ", GROVE_MAX_SEGMENTS, " tensors, got ",
              num_segments);
  TORCH_CHECK(b.size() == num_segments && out.size() == num_segments,
              "grouped_gemm: a, b and out must have the same length, got ", num_segments, ", ",
              b.size(), " and ", out.size());
  TORCH_CHECK(start.dim() == 1 && count.dim() == 1,
              "grouped_gemm: start and count must be 1-D, got ", start.sizes(), " and ",
              count.sizes());
  TORCH_CHECK(start.scalar_type() == count.scalar_type() &&
                  (start.scalar_type() == at::kInt || start.scalar_type() == at::kLong),
              "grouped_gemm: start and count must both be int32 or both int64, got ",
              start.scalar_type(), " and ", count.scalar_type());
  TORCH_CHECK(start.is_contiguous() && count.is_contiguous(),
              "grouped_gemm: start and count must be contiguous");

  std::vector<GroveGemmSegment> segments(num_segments);
  int64_t num_problems = 0, row_base = 0;
  for (size_t s = 0; s < num_segments; ++s) {
    int64_t problems = 0;
    segments[s] = make_segment(cfg, s, a[s], b[s], out[s], &problems);
    segments[s].row_base = row_base;
    segments[s].first_problem = static_cast<int32_t>(num_problems);
    segments[s].num_problems = static_cast<int32_t>(problems);
    num_problems += problems;
    row_base += segments[s].rows;
  }
  TORCH_CHECK(num_problems <= std::numeric_limits<int32_t>::max(),
              "grouped_gemm: too many problems: ", num_problems);
  TORCH_CHECK(start.numel() == num_problems && count.numel() == num_problems,
              "grouped_gemm: start and count must have one entry per problem (", num_problems,
              " in all segments), got ", start.numel(), " and ", count.numel());

  const at::Device device = a[0].device();
  TORCH_CHECK(device.is_cuda(), "grouped_gemm: tensors must be on a CUDA device, got a[0] on ",
              device);
  for (size_t s = 0; s < num_segments; ++s) {
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
  const size_t bytes = cfg.workspace_size(static_cast<int>(num_problems), sm_count);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, a[0].options().dtype(at::kByte));
  const int rc = cfg.run(segments.data(), static_cast<int>(num_segments), start.data_ptr(),
                         count.data_ptr(), static_cast<int>(start.element_size()),
                         static_cast<int>(num_problems), sm_count, workspace.data_ptr(), bytes,
                         reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream)));
  TORCH_CHECK(rc == GROVE_OK, "grouped_gemm (config ", cfg.name, ") failed: ",
              grove_cuda_error_string(rc));
}

// ------------------------------------------------------------------------------ row kernels
// Thin checked wrappers of csrc/rows.cu (grove_rows.h). A "sections" argument triple
// (rows_e, end_e, end_a) splits a row buffer of R rows into the expert section [0, rows_e) and
// the adjugate section [rows_e, R); end_e / end_a are optional one-element int64 device tensors
// holding how many rows of each section are real (e.g. expert_offsets[E:]).

int grove_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, op, ": ", name,
              " must be bfloat16 or float16, got ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16 ? GROVE_DTYPE_BF16 : GROVE_DTYPE_FP16;
}

void check_rows_tensor(const at::Tensor& t, const char* op, const char* name,
                       at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, op, ": ", name,
              " must be 2-D with a contiguous last dimension, got sizes ", t.sizes(),
              " and strides ", t.strides());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, ", got ", t.device());
}

void check_vector(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                  int64_t numel, const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.numel() == numel, op, ": ",
              name, " must be a contiguous ", dtype, " tensor of ", numel, " elements, got ",
              t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, ", got ", t.device());
}

const int64_t* end_ptr(const c10::optional<at::Tensor>& end, const char* op, const char* name,
                       const at::Device& device) {
  if (!end.has_value()) return nullptr;
  check_vector(*end, op, name, at::kLong, 1, device);
  return end->data_ptr<int64_t>();
}

GroveRowSections sections(int64_t rows, int64_t rows_e, const c10::optional<at::Tensor>& end_e,
                          const c10::optional<at::Tensor>& end_a, const char* op,
                          const at::Device& device) {
  TORCH_CHECK(rows_e >= 0 && rows_e <= rows, op, ": rows_e must be in [0, ", rows, "], got ",
              rows_e);
  GroveRowSections sec;
  sec.rows_e = rows_e;
  sec.end_e = end_ptr(end_e, op, "end_e", device);
  sec.rows_a = rows - rows_e;
  sec.end_a = end_ptr(end_a, op, "end_a", device);
  return sec;
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cuda(), op, ": tensors must be on a CUDA device, got ", name, " on ",
              t.device());
}

cudaStream_t as_stream(int64_t stream) {
  return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream));
}

void check_rc(int rc, const char* op) {
  TORCH_CHECK(rc == GROVE_OK, op, " failed: ", grove_cuda_error_string(rc));
}

// out[r] = x[row_token[r]] (· row_weight[r]) for the real rows of out [R, H].
void gather_rows(const at::Tensor& x, const at::Tensor& row_token,
                 const c10::optional<at::Tensor>& row_weight, int64_t rows_e,
                 const c10::optional<at::Tensor>& end_e, const c10::optional<at::Tensor>& end_a,
                 const at::Tensor& out, int64_t stream) {
  const char* op = "gather_rows";
  const int dtype = grove_dtype(x, op, "x");
  check_cuda(x, op, "x");
  const at::Device dev = x.device();
  check_rows_tensor(x, op, "x", x.scalar_type(), dev);
  check_rows_tensor(out, op, "out", x.scalar_type(), dev);
  TORCH_CHECK(out.size(1) == x.size(1), op, ": out must have H = ", x.size(1), " columns, got ",
              out.size(1));
  const int64_t R = out.size(0);
  check_vector(row_token, op, "row_token", at::kLong, R, dev);
  if (row_weight.has_value()) check_vector(*row_weight, op, "row_weight", at::kFloat, R, dev);
  GroveRowSections sec = sections(R, rows_e, end_e, end_a, op, dev);
  c10::DeviceGuard guard(dev);
  check_rc(grove_gather_rows(dtype, x.data_ptr(), leading_dim(x), x.size(0), x.size(1),
                             row_token.data_ptr<int64_t>(),
                             row_weight.has_value() ? row_weight->data_ptr<float>() : nullptr,
                             sec, out.data_ptr(), leading_dim(out), as_stream(stream)),
           op);
}

// out [R, N] = silu(h[:, :N]) * h[:, N:2N] on the real rows.
void swiglu_fwd(const at::Tensor& h, int64_t rows_e, const c10::optional<at::Tensor>& end_e,
                const c10::optional<at::Tensor>& end_a, const at::Tensor& out, int64_t stream) {
  const char* op = "swiglu_fwd";
  const int dtype = grove_dtype(h, op, "h");
  check_cuda(h, op, "h");
  const at::Device dev = h.device();
  check_rows_tensor(h, op, "h", h.scalar_type(), dev);
  check_rows_tensor(out, op, "out", h.scalar_type(), dev);
  const int64_t R = out.size(0), N = out.size(1);
  TORCH_CHECK(h.size(0) == R && h.size(1) == 2 * N, op, ": h must be [", R, ", ", 2 * N,
              "] for out [", R, ", ", N, "], got ", h.sizes());
  GroveRowSections sec = sections(R, rows_e, end_e, end_a, op, dev);
  c10::DeviceGuard guard(dev);
  check_rc(grove_swiglu_fwd(dtype, h.data_ptr(), leading_dim(h), N, sec, out.data_ptr(),
                            leading_dim(out), as_stream(stream)),
           op);
}

// dh [R, 2N] from g [R, N] and h [R, 2N]; d_row_weight [R] (fp32) = Σ_n g·silu(gate)·up.
void swiglu_bwd(const at::Tensor& g, const at::Tensor& h,
                const c10::optional<at::Tensor>& row_weight, int64_t rows_e,
                const c10::optional<at::Tensor>& end_e, const c10::optional<at::Tensor>& end_a,
                const at::Tensor& dh, const c10::optional<at::Tensor>& d_row_weight,
                int64_t stream) {
  const char* op = "swiglu_bwd";
  const int dtype = grove_dtype(g, op, "g");
  check_cuda(g, op, "g");
  const at::Device dev = g.device();
  check_rows_tensor(g, op, "g", g.scalar_type(), dev);
  check_rows_tensor(h, op, "h", g.scalar_type(), dev);
  check_rows_tensor(dh, op, "dh", g.scalar_type(), dev);
  const int64_t R = g.size(0), N = g.size(1);
  TORCH_CHECK(h.size(0) == R && h.size(1) == 2 * N && dh.size(0) == R && dh.size(1) == 2 * N, op,
              ": h and dh must be [", R, ", ", 2 * N, "] for g [", R, ", ", N, "], got ",
              h.sizes(), " and ", dh.sizes());
  if (row_weight.has_value()) check_vector(*row_weight, op, "row_weight", at::kFloat, R, dev);
  if (d_row_weight.has_value())
    check_vector(*d_row_weight, op, "d_row_weight", at::kFloat, R, dev);
  GroveRowSections sec = sections(R, rows_e, end_e, end_a, op, dev);
  c10::DeviceGuard guard(dev);
  check_rc(grove_swiglu_bwd(dtype, g.data_ptr(), leading_dim(g), h.data_ptr(), leading_dim(h),
                            N,
                            row_weight.has_value() ? row_weight->data_ptr<float>() : nullptr,
                            sec, dh.data_ptr(), leading_dim(dh),
                            d_row_weight.has_value() ? d_row_weight->data_ptr<float>() : nullptr,
                            as_stream(stream)),
           op);
}

// out[t] = Σ_j (token_weight[t, j] ·) rows[token_rows[t, j]] over real slots, in slot order.
void combine_rows(const at::Tensor& rows, const at::Tensor& token_rows,
                  const at::Tensor& token_mask, const c10::optional<at::Tensor>& token_weight,
                  const at::Tensor& out, int64_t stream) {
  const char* op = "combine_rows";
  const int dtype = grove_dtype(rows, op, "rows");
  check_cuda(rows, op, "rows");
  const at::Device dev = rows.device();
  check_rows_tensor(rows, op, "rows", rows.scalar_type(), dev);
  check_rows_tensor(out, op, "out", rows.scalar_type(), dev);
  TORCH_CHECK(out.size(1) == rows.size(1), op, ": out must have H = ", rows.size(1),
              " columns, got ", out.size(1));
  TORCH_CHECK(token_rows.dim() == 2 && token_rows.size(0) == out.size(0), op,
              ": token_rows must be [T, C] with T = ", out.size(0), ", got ", token_rows.sizes());
  const int64_t T = out.size(0), C = token_rows.size(1);
  check_vector(token_rows, op, "token_rows", at::kLong, T * C, dev);
  check_vector(token_mask, op, "token_mask", at::kBool, T * C, dev);
  if (token_weight.has_value())
    check_vector(*token_weight, op, "token_weight", at::kFloat, T * C, dev);
  c10::DeviceGuard guard(dev);
  check_rc(grove_combine_rows(dtype, rows.data_ptr(), leading_dim(rows), rows.size(0),
                              token_rows.data_ptr<int64_t>(),
                              reinterpret_cast<const uint8_t*>(token_mask.data_ptr<bool>()),
                              token_weight.has_value() ? token_weight->data_ptr<float>() : nullptr,
                              T, C, rows.size(1), out.data_ptr(), leading_dim(out),
                              as_stream(stream)),
           op);
}

// dot[r] = <rows[r], x[row_token[r]]> (unscaled), then rows[r] *= row_weight[r], real rows.
void rows_dot_scale(const at::Tensor& rows, const at::Tensor& x, const at::Tensor& row_token,
                    const at::Tensor& row_weight, int64_t rows_e,
                    const c10::optional<at::Tensor>& end_e, const c10::optional<at::Tensor>& end_a,
                    const c10::optional<at::Tensor>& dot, int64_t stream) {
  const char* op = "rows_dot_scale";
  const int dtype = grove_dtype(rows, op, "rows");
  check_cuda(rows, op, "rows");
  const at::Device dev = rows.device();
  check_rows_tensor(rows, op, "rows", rows.scalar_type(), dev);
  check_rows_tensor(x, op, "x", rows.scalar_type(), dev);
  TORCH_CHECK(x.size(1) == rows.size(1), op, ": x must have H = ", rows.size(1),
              " columns, got ", x.size(1));
  const int64_t R = rows.size(0);
  check_vector(row_token, op, "row_token", at::kLong, R, dev);
  check_vector(row_weight, op, "row_weight", at::kFloat, R, dev);
  if (dot.has_value()) check_vector(*dot, op, "dot", at::kFloat, R, dev);
  GroveRowSections sec = sections(R, rows_e, end_e, end_a, op, dev);
  c10::DeviceGuard guard(dev);
  check_rc(grove_rows_dot_scale(dtype, rows.data_ptr(), leading_dim(rows), x.data_ptr(),
                                leading_dim(x), x.size(0), rows.size(1),
                                row_token.data_ptr<int64_t>(), row_weight.data_ptr<float>(), sec,
                                dot.has_value() ? dot->data_ptr<float>() : nullptr,
                                as_stream(stream)),
           op);
}

}  // namespace

TORCH_LIBRARY(grove_cuda, m) {
  m.def(
      "grouped_gemm(Tensor[] a, Tensor[] b, Tensor(a!)[] out, Tensor start, Tensor count, "
      "str config, int stream) -> ()");
  m.def("grouped_gemm_configs() -> str[]", &grouped_gemm_configs);
  m.def(
      "gather_rows(Tensor x, Tensor row_token, Tensor? row_weight, int rows_e, Tensor? end_e, "
      "Tensor? end_a, Tensor(a!) out, int stream) -> ()");
  m.def(
      "swiglu_fwd(Tensor h, int rows_e, Tensor? end_e, Tensor? end_a, Tensor(a!) out, "
      "int stream) -> ()");
  m.def(
      "swiglu_bwd(Tensor g, Tensor h, Tensor? row_weight, int rows_e, Tensor? end_e, "
      "Tensor? end_a, Tensor(a!) dh, Tensor(b!)? d_row_weight, int stream) -> ()");
  m.def(
      "combine_rows(Tensor rows, Tensor token_rows, Tensor token_mask, Tensor? token_weight, "
      "Tensor(a!) out, int stream) -> ()");
  m.def(
      "rows_dot_scale(Tensor(a!) rows, Tensor x, Tensor row_token, Tensor row_weight, "
      "int rows_e, Tensor? end_e, Tensor? end_a, Tensor(b!)? dot, int stream) -> ()");
  m.def("grouped_gemm_workspace_size(int num_problems, str config, int sm_count) -> int",
        &grouped_gemm_workspace_size);
}

// CompositeExplicitAutograd: one kernel for every device, so that argument errors surface as
// the checks above (also on CPU tensors under the CPU wheel) rather than as a dispatch error.
TORCH_LIBRARY_IMPL(grove_cuda, CompositeExplicitAutograd, m) {
  m.impl("grouped_gemm", &grouped_gemm);
  m.impl("gather_rows", &gather_rows);
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
  m.impl("combine_rows", &combine_rows);
  m.impl("rows_dot_scale", &rows_dot_scale);
}

// `import grove_kernels._C` loads the library (and so runs the registrations above).
static struct PyModuleDef grove_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                            "grove-kernels CUDA ops (torch.ops.grove_cuda)", -1,
                                            nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&grove_c_module); }
