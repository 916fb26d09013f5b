// errors.cu: the messages of the GROVE_ERR_* codes every launcher returns (grove_cuda.h).
#include "grove_cuda.h"

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

}  // extern "C"
