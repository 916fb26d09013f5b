// bindings_rows.cpp: registers the row kernels of csrc/gather.cu, swiglu.cu, combine.cu and
// folded.cu as torch ops (namespace grove_cuda; the library itself and the grouped GEMMs are in
// bindings.cpp). Compiled by g++ with bindings.cpp into the same CppExtension.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <cstdint>
#include <type_traits>

#include "bindings.hpp"
#include "grove_cuda.h"

namespace {

using grove_bindings::leading_dim;

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

// ------------------------------------------------------------------ the folded layout's rows
// offsets [E + 1] (expert_offsets) and leader_ends [E], int64 device tensors; I: the expert
// SwiGLU width; Ia follows from t [R, mult * (I + Ia)] (h: mult 2, z / g: mult 1). The per-row
// weights (fp32 [R]) are checked by the caller.
struct Folded {
  GroveFoldedRows rows;
  int64_t Ia;
};

Folded folded_rows(const RowOp& op, const char* name, const at::Tensor& t, int64_t I,
                   int64_t mult, const at::Tensor& offsets, const at::Tensor& leader_ends) {
  TORCH_CHECK(I > 0 && I % 8 == 0 && t.size(1) % mult == 0 && t.size(1) / mult >= I &&
                  (t.size(1) / mult - I) % 8 == 0,
              name, " must be [R, ", mult, " * (I + Ia)] with I (", I,
              ") and Ia multiples of 8, got ", t.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 2,
              "offsets must be [E + 1] with E >= 1, got ", offsets.sizes());
  const int64_t E = offsets.size(0) - 1;
  op.vector(offsets, "offsets", at::kLong, E + 1);
  op.vector(leader_ends, "leader_ends", at::kLong, E);
  return {{t.size(0), E, offsets.data_ptr<int64_t>(), leader_ends.data_ptr<int64_t>()},
          t.size(1) / mult - I};
}

// z (unscaled) and / or zs (row-scaled) [R, I + Ia] from h [R, 2I + 2Ia] (grove_elementwise.h).
void swiglu_folded_fwd(const at::Tensor& h, int64_t I, const at::Tensor& offsets,
                       const at::Tensor& leader_ends, const c10::optional<at::Tensor>& row_weight,
                       const c10::optional<at::Tensor>& leader_weight, bool zero_h,
                       const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& zs,
                       int64_t stream) {
  const RowOp op("swiglu_folded_fwd", h, "h");
  const Folded f = folded_rows(op, "swiglu_folded_fwd: h", h, I, 2, offsets, leader_ends);
  const int64_t R = h.size(0);
  TORCH_CHECK(z.has_value() || zs.has_value(), "swiglu_folded_fwd: z or zs must be given");
  TORCH_CHECK(!zs.has_value() || (row_weight.has_value() && leader_weight.has_value()),
              "swiglu_folded_fwd: zs needs row_weight and leader_weight");
  for (const auto* t : {&z, &zs}) {
    if (!t->has_value()) continue;
    op.rows(**t, "z");
    TORCH_CHECK((*t)->size(0) == R && (*t)->size(1) == I + f.Ia, "swiglu_folded_fwd: z and "
                "zs must be [", R, ", ", I + f.Ia, "], got ", (*t)->sizes());
  }
  const float* w = op.optional<const float>(row_weight, "row_weight", at::kFloat, R);
  const float* lw = op.optional<const float>(leader_weight, "leader_weight", at::kFloat, R);
  c10::DeviceGuard guard(op.device());
  op.check(grove_swiglu_folded_fwd(
      op.dtype(), h.data_ptr(), leading_dim(h), I, f.Ia, f.rows, w, lw, zero_h ? 1 : 0,
      z.has_value() ? z->data_ptr() : nullptr, z.has_value() ? leading_dim(*z) : 0,
      zs.has_value() ? zs->data_ptr() : nullptr, zs.has_value() ? leading_dim(*zs) : 0,
      as_stream(stream)));
}

// zs = [w * z_e | leader ? λΣw * z_a : 0] (zs may be z).
void scale_folded(const at::Tensor& z, int64_t I, const at::Tensor& offsets,
                  const at::Tensor& leader_ends, const at::Tensor& row_weight,
                  const at::Tensor& leader_weight, const at::Tensor& zs, int64_t stream) {
  const RowOp op("scale_folded", z, "z");
  op.rows(zs, "zs");
  const Folded f = folded_rows(op, "scale_folded: z", z, I, 1, offsets, leader_ends);
  TORCH_CHECK(zs.sizes() == z.sizes(), "scale_folded: zs must be ", z.sizes(), ", got ",
              zs.sizes());
  op.vector(row_weight, "row_weight", at::kFloat, z.size(0));
  op.vector(leader_weight, "leader_weight", at::kFloat, z.size(0));
  c10::DeviceGuard guard(op.device());
  op.check(grove_scale_folded(op.dtype(), z.data_ptr(), leading_dim(z), I, f.Ia, f.rows,
                              row_weight.data_ptr<float>(), leader_weight.data_ptr<float>(),
                              zs.data_ptr(), leading_dim(zs), as_stream(stream)));
}

// dh [R, 2I + 2Ia], d row weight and d leader weight [R] from g [R, I + Ia] and h.
void swiglu_folded_bwd(const at::Tensor& g, const at::Tensor& h, int64_t I,
                       const at::Tensor& offsets, const at::Tensor& leader_ends,
                       const at::Tensor& row_weight, const at::Tensor& leader_weight,
                       const at::Tensor& dh, const at::Tensor& d_row_weight,
                       const at::Tensor& d_leader_weight, int64_t stream) {
  const RowOp op("swiglu_folded_bwd", g, "g");
  op.rows(h, "h");
  op.rows(dh, "dh");
  const Folded f = folded_rows(op, "swiglu_folded_bwd: g", g, I, 1, offsets, leader_ends);
  const int64_t R = g.size(0);
  TORCH_CHECK(h.size(0) == R && h.size(1) == 2 * (I + f.Ia) && dh.sizes() == h.sizes(),
              "swiglu_folded_bwd: h and dh must be [", R, ", ", 2 * (I + f.Ia), "], got ",
              h.sizes(), " and ", dh.sizes());
  const at::Tensor* vectors[] = {&row_weight, &leader_weight, &d_row_weight, &d_leader_weight};
  const char* names[] = {"row_weight", "leader_weight", "d_row_weight", "d_leader_weight"};
  for (int i = 0; i < 4; ++i) op.vector(*vectors[i], names[i], at::kFloat, R);
  c10::DeviceGuard guard(op.device());
  op.check(grove_swiglu_folded_bwd(
      op.dtype(), g.data_ptr(), leading_dim(g), h.data_ptr(), leading_dim(h), I, f.Ia, f.rows,
      row_weight.data_ptr<float>(), leader_weight.data_ptr<float>(), dh.data_ptr(),
      leading_dim(dh), d_row_weight.data_ptr<float>(), d_leader_weight.data_ptr<float>(),
      as_stream(stream)));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(grove_cuda, m) {
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
  m.def(
      "swiglu_folded_fwd(Tensor(a!) h, int I, Tensor offsets, Tensor leader_ends, "
      "Tensor? row_weight, Tensor? leader_weight, bool zero_h, Tensor(b!)? z, Tensor(c!)? zs, "
      "int stream) -> ()");
  m.def(
      "scale_folded(Tensor z, int I, Tensor offsets, Tensor leader_ends, Tensor row_weight, "
      "Tensor leader_weight, Tensor(a!) zs, int stream) -> ()");
  m.def(
      "swiglu_folded_bwd(Tensor g, Tensor h, int I, Tensor offsets, Tensor leader_ends, "
      "Tensor row_weight, Tensor leader_weight, Tensor(a!) dh, Tensor(b!) d_row_weight, "
      "Tensor(c!) d_leader_weight, int stream) -> ()");
}

// CompositeExplicitAutograd, as in bindings.cpp: argument errors surface as the checks above.
TORCH_LIBRARY_IMPL(grove_cuda, CompositeExplicitAutograd, m) {
  m.impl("gather_rows", &gather_rows);
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
  m.impl("combine_rows", &combine_rows);
  m.impl("rows_dot_scale", &rows_dot_scale);
  m.impl("swiglu_folded_fwd", &swiglu_folded_fwd);
  m.impl("scale_folded", &scale_folded);
  m.impl("swiglu_folded_bwd", &swiglu_folded_bwd);
}
