// bindings.hpp: what the two torch-facing files of the extension share (bindings.cpp: the
// grouped GEMMs and the module; bindings_rows.cpp: the row kernels). Not a CUDA header: the
// .cu objects never include it.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace grove_bindings {

// Row stride of a 2-D tensor as the kernels read it. torch calls a one-row tensor contiguous
// whatever its stride(0) (e.g. a [1, H] view of [H, 1] has strides (1, 1)), but the kernels
// check ld >= width, so a single row reports its width instead.
inline int64_t leading_dim(const at::Tensor& t) {
  return t.size(0) <= 1 ? std::max<int64_t>(t.stride(0), t.size(1)) : t.stride(0);
}

}  // namespace grove_bindings
