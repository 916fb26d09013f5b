// bindings.cpp: registers the torch-free CUDA launchers of csrc/*.cu as torch ops
// (namespace grove_cuda). Compiled by g++ as a plain CppExtension: it links libtorch/libc10
// but not libtorch_cuda/libc10_cuda, so the extension also links and imports under the CPU
// torch wheel (docs/design.md §4), where the ops register and validate but cannot run.
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

#include "grove_cuda.h"

namespace {

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

// Row stride of a 2-D tensor as the kernels read it. torch calls a one-row tensor contiguous
// whatever its stride(0) (e.g. a [1, H] view of [H, 1] has strides (1, 1)), but the kernels
// check ld >= width, so a single row reports its width instead.
int64_t leading_dim(const at::Tensor& t) {
  return t.size(0) <= 1 ? std::max<int64_t>(t.stride(0), t.size(1)) : t.stride(0);
}

at::ScalarType scalar_type_of(int dtype) {
  return dtype == GROVE_DTYPE_BF16 ? at::kBFloat16 : at::kHalf;
}

// Section s's GroveGemmSection from its tensors; see grove_cuda.h for the layouts:
//   m_grouped_nt:        a [R, K], b [P, N, K], out [R, N]
//   m_grouped_nt_swiglu: a [R, K], b [P, N, K] (gate/up packed), out [R, N / 2]
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
                "for ", kernel.name, " (whole gate/up blocks of 8), got ", n);
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

// For every problem p of the plan, D_p = A_p @ B_p with the kernel's dtype and layout.
//   a, b, out: one tensor per section (experts, then adjugates)
//   start, count [sum P_s] int32 or int64 (same dtype): absolute plan rows; section s's rows
//          begin at sum_{s' < s} R_s'
void grouped_gemm(at::TensorList a, at::TensorList b, at::TensorList out, const at::Tensor& start,
                  const at::Tensor& count, const std::string& kernel, int64_t stream) {
  const GemmKernel& gemm = find_kernel(kernel);
  const size_t num_sections = a.size();
  TORCH_CHECK(num_sections >= 1 && num_sections <= GROVE_MAX_SECTIONS,
              "grouped_gemm: a must hold 1 to ", GROVE_MAX_SECTIONS, " tensors, got ",
              num_sections);
  TORCH_CHECK(b.size() == num_sections && out.size() == num_sections,
              "grouped_gemm: a, b and out must have the same length, got ", num_sections, ", ",
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

  std::vector<GroveGemmSection> sections(num_sections);
  int64_t num_problems = 0, row_base = 0;
  for (size_t s = 0; s < num_sections; ++s) {
    int64_t problems = 0;
    sections[s] = make_section(gemm, s, a[s], b[s], out[s], &problems);
    sections[s].row_base = row_base;
    sections[s].first_problem = static_cast<int32_t>(num_problems);
    sections[s].num_problems = static_cast<int32_t>(problems);
    num_problems += problems;
    row_base += sections[s].rows;
  }
  TORCH_CHECK(num_problems <= std::numeric_limits<int32_t>::max(),
              "grouped_gemm: too many problems: ", num_problems);
  TORCH_CHECK(start.numel() == num_problems && count.numel() == num_problems,
              "grouped_gemm: start and count must have one entry per problem (", num_problems,
              " in all sections), got ", start.numel(), " and ", count.numel());

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

// --------------------------------------------------------------------- element-wise kernels
// Thin checked wrappers of gather.cu, swiglu.cu and combine.cu (grove_elementwise.h). A
// sections argument triple (rows_e, end_e, end_a) splits a row buffer of R rows into the
// expert section [0, rows_e) and the adjugate section [rows_e, R); end_e / end_a are optional
// one-element int64 device tensors holding how many rows of each section are real
// (e.g. expert_offsets[E:]).

cudaStream_t as_stream(int64_t stream) {
  return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream));
}

// The checks of one element-wise op, against the dtype and device of its first row tensor.
class RowOp {
 public:
  // `first` must be a 2-D bf16 / fp16 row tensor on a CUDA device.
  RowOp(const char* op, const at::Tensor& first, const char* name)
      : op_(op), type_(first.scalar_type()), device_(first.device()) {
    TORCH_CHECK(type_ == at::kBFloat16 || type_ == at::kHalf, op_, ": ", name,
                " must be bfloat16 or float16, got ", type_);
    TORCH_CHECK(device_.is_cuda(), op_, ": tensors must be on a CUDA device, got ", name, " on ",
                device_);
    rows(first, name);
  }

  int dtype() const { return type_ == at::kBFloat16 ? GROVE_DTYPE_BF16 : GROVE_DTYPE_FP16; }
  const at::Device& device() const { return device_; }

  // A 2-D row tensor of the op's dtype and device with a contiguous last dimension.
  void rows(const at::Tensor& t, const char* name) const {
    TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, op_, ": ", name,
                " must be 2-D with a contiguous last dimension, got sizes ", t.sizes(),
                " and strides ", t.strides());
    TORCH_CHECK(t.scalar_type() == type_, op_, ": ", name, " must be ", type_, ", got ",
                t.scalar_type());
    on_device(t, name);
  }

  // t has H = `width` columns.
  void columns(const at::Tensor& t, const char* name, int64_t width) const {
    TORCH_CHECK(t.size(1) == width, op_, ": ", name, " must have H = ", width, " columns, got ",
                t.size(1));
  }

  // A contiguous `dtype` tensor of `numel` elements on the op's device.
  void vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel) const {
    TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.numel() == numel, op_, ": ",
                name, " must be a contiguous ", dtype, " tensor of ", numel, " elements, got ",
                t.scalar_type(), " ", t.sizes());
    on_device(t, name);
  }

  // The data of an optional vector (nullptr when absent).
  template <class T>
  T* optional(const c10::optional<at::Tensor>& t, const char* name, at::ScalarType dtype,
              int64_t numel) const {
    if (!t.has_value()) return nullptr;
    vector(*t, name, dtype, numel);
    return t->data_ptr<std::remove_const_t<T>>();
  }

  GroveSections sections(int64_t rows, int64_t rows_e, const c10::optional<at::Tensor>& end_e,
                         const c10::optional<at::Tensor>& end_a) const {
    TORCH_CHECK(rows_e >= 0 && rows_e <= rows, op_, ": rows_e must be in [0, ", rows, "], got ",
                rows_e);
    GroveSections sec;
    sec.rows_e = rows_e;
    sec.end_e = optional<const int64_t>(end_e, "end_e", at::kLong, 1);
    sec.rows_a = rows - rows_e;
    sec.end_a = optional<const int64_t>(end_a, "end_a", at::kLong, 1);
    return sec;
  }

  void check(int rc) const {
    TORCH_CHECK(rc == GROVE_OK, op_, " failed: ", grove_cuda_error_string(rc));
  }

 private:
  void on_device(const at::Tensor& t, const char* name) const {
    TORCH_CHECK(t.device() == device_, op_, ": ", name, " must be on ", device_, ", got ",
                t.device());
  }

  const char* op_;
  at::ScalarType type_;
  at::Device device_;
};

// out[r] = x[row_token[r]] (· row_weight[r]) for the real rows of out [R, H].
void gather_rows(const at::Tensor& x, const at::Tensor& row_token,
                 const c10::optional<at::Tensor>& row_weight, int64_t rows_e,
                 const c10::optional<at::Tensor>& end_e, const c10::optional<at::Tensor>& end_a,
                 const at::Tensor& out, int64_t stream) {
  const RowOp op("gather_rows", x, "x");
  op.rows(out, "out");
  op.columns(out, "out", x.size(1));
  const int64_t R = out.size(0);
  op.vector(row_token, "row_token", at::kLong, R);
  const float* w = op.optional<const float>(row_weight, "row_weight", at::kFloat, R);
  const GroveSections sec = op.sections(R, rows_e, end_e, end_a);
  c10::DeviceGuard guard(op.device());
  op.check(grove_gather_rows(op.dtype(), x.data_ptr(), leading_dim(x), x.size(0), x.size(1),
                             row_token.data_ptr<int64_t>(), w, sec, out.data_ptr(),
                             leading_dim(out), as_stream(stream)));
}

// out [R, N] = silu(h[:, :N]) * h[:, N:2N] on the real rows.
void swiglu_fwd(const at::Tensor& h, int64_t rows_e, const c10::optional<at::Tensor>& end_e,
                const c10::optional<at::Tensor>& end_a, const at::Tensor& out, int64_t stream) {
  const RowOp op("swiglu_fwd", h, "h");
  op.rows(out, "out");
  const int64_t R = out.size(0), N = out.size(1);
  TORCH_CHECK(h.size(0) == R && h.size(1) == 2 * N, "swiglu_fwd: h must be [", R, ", ", 2 * N,
              "] for out [", R, ", ", N, "], got ", h.sizes());
  const GroveSections sec = op.sections(R, rows_e, end_e, end_a);
  c10::DeviceGuard guard(op.device());
  op.check(grove_swiglu_fwd(op.dtype(), h.data_ptr(), leading_dim(h), N, sec, out.data_ptr(),
                            leading_dim(out), as_stream(stream)));
}

// dh [R, 2N] from g [R, N] and h [R, 2N]; d_row_weight [R] (fp32) = Σ_n g·silu(gate)·up.
void swiglu_bwd(const at::Tensor& g, const at::Tensor& h,
                const c10::optional<at::Tensor>& row_weight, int64_t rows_e,
                const c10::optional<at::Tensor>& end_e, const c10::optional<at::Tensor>& end_a,
                const at::Tensor& dh, const c10::optional<at::Tensor>& d_row_weight,
                int64_t stream) {
  const RowOp op("swiglu_bwd", g, "g");
  op.rows(h, "h");
  op.rows(dh, "dh");
  const int64_t R = g.size(0), N = g.size(1);
  TORCH_CHECK(h.size(0) == R && h.size(1) == 2 * N && dh.size(0) == R && dh.size(1) == 2 * N,
              "swiglu_bwd: h and dh must be [", R, ", ", 2 * N, "] for g [", R, ", ", N,
              "], got ", h.sizes(), " and ", dh.sizes());
  const float* w = op.optional<const float>(row_weight, "row_weight", at::kFloat, R);
  float* dw = op.optional<float>(d_row_weight, "d_row_weight", at::kFloat, R);
  const GroveSections sec = op.sections(R, rows_e, end_e, end_a);
  c10::DeviceGuard guard(op.device());
  op.check(grove_swiglu_bwd(op.dtype(), g.data_ptr(), leading_dim(g), h.data_ptr(),
                            leading_dim(h), N, w, sec, dh.data_ptr(), leading_dim(dh), dw,
                            as_stream(stream)));
}

// out[t] = Σ_j (token_weight[t, j] ·) rows[token_rows[t, j]] over real slots, in slot order.
void combine_rows(const at::Tensor& rows, const at::Tensor& token_rows,
                  const at::Tensor& token_mask, const c10::optional<at::Tensor>& token_weight,
                  const at::Tensor& out, int64_t stream) {
  const RowOp op("combine_rows", rows, "rows");
  op.rows(out, "out");
  op.columns(out, "out", rows.size(1));
  TORCH_CHECK(token_rows.dim() == 2 && token_rows.size(0) == out.size(0),
              "combine_rows: token_rows must be [T, C] with T = ", out.size(0), ", got ",
              token_rows.sizes());
  const int64_t T = out.size(0), C = token_rows.size(1);
  op.vector(token_rows, "token_rows", at::kLong, T * C);
  op.vector(token_mask, "token_mask", at::kBool, T * C);
  const float* tw = op.optional<const float>(token_weight, "token_weight", at::kFloat, T * C);
  c10::DeviceGuard guard(op.device());
  op.check(grove_combine_rows(op.dtype(), rows.data_ptr(), leading_dim(rows), rows.size(0),
                              token_rows.data_ptr<int64_t>(),
                              reinterpret_cast<const uint8_t*>(token_mask.data_ptr<bool>()), tw,
                              T, C, rows.size(1), out.data_ptr(), leading_dim(out),
                              as_stream(stream)));
}

// dot[r] = <rows[r], x[row_token[r]]> (unscaled), then rows[r] *= row_weight[r], real rows.
void rows_dot_scale(const at::Tensor& rows, const at::Tensor& x, const at::Tensor& row_token,
                    const at::Tensor& row_weight, int64_t rows_e,
                    const c10::optional<at::Tensor>& end_e, const c10::optional<at::Tensor>& end_a,
                    const c10::optional<at::Tensor>& dot, int64_t stream) {
  const RowOp op("rows_dot_scale", rows, "rows");
  op.rows(x, "x");
  op.columns(x, "x", rows.size(1));
  const int64_t R = rows.size(0);
  op.vector(row_token, "row_token", at::kLong, R);
  op.vector(row_weight, "row_weight", at::kFloat, R);
  float* d = op.optional<float>(dot, "dot", at::kFloat, R);
  const GroveSections sec = op.sections(R, rows_e, end_e, end_a);
  c10::DeviceGuard guard(op.device());
  op.check(grove_rows_dot_scale(op.dtype(), rows.data_ptr(), leading_dim(rows), x.data_ptr(),
                                leading_dim(x), x.size(0), rows.size(1),
                                row_token.data_ptr<int64_t>(), row_weight.data_ptr<float>(), sec,
                                d, as_stream(stream)));
}

}  // namespace

TORCH_LIBRARY(grove_cuda, m) {
  m.def(
      "grouped_gemm(Tensor[] a, Tensor[] b, Tensor(a!)[] out, Tensor start, Tensor count, "
      "str kernel, int stream) -> ()");
  m.def("grouped_gemm_kernels() -> str[]", &grouped_gemm_kernels);
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
  m.def("grouped_gemm_workspace_size(int num_problems, str kernel, int sm_count) -> int",
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
