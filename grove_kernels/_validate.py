"""Input checks for the public API (DESIGN §2).

Shape, dtype and device checks read only metadata and always run. Checks that need tensor
VALUES (ids in range, expert_map entries) copy to the host, so they are skipped while a CUDA
graph is being captured and can be switched off for serving with `set_value_checks(False)`
(or GROVE_KERNELS_VALUE_CHECKS=0); they run inside the custom ops, where torch.compile sees no
data-dependent Python.
"""
import contextlib
import os

import torch

# float64 serves the CPU reference runs of DESIGN §5; kernels may refuse it.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)

_value_checks = os.environ.get("GROVE_KERNELS_VALUE_CHECKS", "1") != "0"


def set_value_checks(enabled):
    """Turn the host-side value checks (ids in range) on or off. On by default."""
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_enabled():
    return _value_checks


@contextlib.contextmanager
def value_checks(enabled):
    """Set the value checks for a block and restore the caller's setting after it (timing
    loops switch them off without changing the process for whoever runs next)."""
    before = _value_checks
    set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(before)


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


def _capturing(t):
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def values_checked(t):
    """Whether the value checks run for a call on t (on, and no CUDA graph being captured):
    when they do not, out-of-range ids reach the kernels as skipped slots."""
    return _value_checks and not _capturing(t)


def ids_in_range(name, ids, low, high):
    """Raise IndexError unless low <= ids < high; host read, skipped when disabled/capturing."""
    if not _value_checks or ids.numel() == 0 or _capturing(ids):
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < low or hi >= high:
        raise IndexError(f"{name}: values must lie in [{low}, {high}), found min {lo}, max {hi}")


def none_out_of_range(name, count, low, high):
    """Raise IndexError unless `count` (a tensor: how many values of `name` fell outside
    [low, high), counted on the device) is zero; host read, skipped when disabled/capturing."""
    if not _value_checks or _capturing(count):
        return
    n = int(count)
    if n:
        raise IndexError(f"{name}: values must lie in [{low}, {high}), found {n} outside it")


def groups_whole(expert_map, group_size):
    """Raise ValueError unless every global group of expert_map is wholly on this rank, in one
    local group, or wholly off it (an adjugate is computed once, by the rank of its group)."""
    if not _value_checks or expert_map.numel() == 0 or _capturing(expert_map):
        return
    local = expert_map.long().view(-1, group_size)
    on = local >= 0
    group = torch.where(on, local // group_size, -1)
    mixed = (on.any(1) & ~on.all(1)) | (group.amax(1) != group.amin(1))
    if bool(mixed.any()):
        g = int(mixed.nonzero()[0, 0])
        raise ValueError(f"expert_map: global group {g} (experts {g * group_size}.."
                         f"{(g + 1) * group_size - 1}) maps to {local[g].tolist()}; a group's "
                         f"experts must all lie in one local group or all be off this rank (-1)")


def all_finite(name, t):
    """Raise ValueError unless every value of t is finite (no NaN, no inf); host read, skipped
    when value checks are off or a CUDA graph is being captured."""
    if t is None or not _value_checks or t.numel() == 0 or _capturing(t):
        return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise ValueError(f"{name}: expected finite values, found {t[tuple(bad)].item()} at "
                         f"index {tuple(bad) if len(bad) > 1 else bad[0]} "
                         f"({int((~finite).sum())} non-finite of {t.numel()})")
