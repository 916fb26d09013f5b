"""Input checks of the public API (docs/design.md §2): metadata (shapes, dtypes, devices),
read on the host without a sync, always on. The checks of tensor VALUES (ids in range,
expert_map entries, a finite bias) live with the switch that governs them, in settings.py,
and are re-exported here so every caller checks through this module.
"""
import torch

from .settings import (all_finite, capturing, groups_whole, ids_in_range,  # noqa: F401
                       none_out_of_range, set_value_checks, value_checks,
                       value_checks_enabled)

# float64 serves the CPU reference runs of docs/design.md §5; kernels may refuse it.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)

def _describe(t):
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def tensor(name, t, ndim=None, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {_describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {list(dtypes)}, got {_describe(t)}")


def shape(name, t, expected):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {_describe(t)}")


def same_device(ref_name, ref, **others):
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"{name}: expected device {ref.device} (that of {ref_name}), got {_describe(t)}"
            )


def same_dtype(ref_name, ref, **others):
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(
                f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {_describe(t)}"
            )


def positive_int(name, value, upper=None, upper_name=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected >= 1, got {value}")
    if upper is not None and value > upper:
        raise ValueError(f"{name}: expected <= {upper} ({upper_name}), got {value}")
