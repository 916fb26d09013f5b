"""The process-wide settings of grove-kernels, in one object, and the value checks they govern.

    settings.backend          the backend name calls use: torch | triton | cuda | auto
                              (per thread; GROVE_KERNELS_BACKEND sets the default; auto by default)
    settings.value_checks     host-side checks of tensor values (ids in range, finite bias):
                              process-wide, on unless GROVE_KERNELS_VALUE_CHECKS=0
    GROVE_ADJUGATE_LAYOUT     sections | folded: the adjugate layout, read on every call by
                              backends.requested_layout (where the backend is chosen, so a call
                              enters each file once); unset: each backend's default_layout
                              (folded on triton, sections on torch and cuda)
    GROVE_TRITON_SCHEDULE     persistent | tiles: the triton backend's folded GEMM launches,
                              programs looping over the device's item count (default) or one
                              program per item of the host bound; GROVE_TRITON_PROGRAMS=n sets
                              the persistent program count (default 1 per SM); both read on
                              every call (grove_kernels/triton/config.py)
    settings.fuse_swiglu      the cuda backend's GEMM-1 with SwiGLU in its epilogue, reading
                              w1 / a1 in place (process-wide; inference forwards):
                              True | False | "auto" (GROVE_CUDA_FUSE_SWIGLU=1 | 0 | auto, or
                              set_fuse_swiglu); unset: "auto", which FUSE_SWIGLU_AUTO decides.
                              fused_gemm1(train) is the per-call decision the backend and its
                              traffic model both take: a training forward never fuses (it
                              saves h)

Setters: grove_kernels.set_backend / use_backend / set_value_checks, settings.value_checks
(a context manager), settings.set_fuse_swiglu.
Checks that need tensor values copy to the host, so they are skipped while a CUDA graph is
being captured; they run inside the custom ops, where torch.compile sees no data-dependent
Python, and are switched off for serving with `set_value_checks(False)`.
"""
import contextlib
import os
import threading

import torch

ADJUGATE_LAYOUTS = ("sections", "folded")
LAYOUT_VARIABLE = "GROVE_ADJUGATE_LAYOUT"
FUSE_SWIGLU_VARIABLE = "GROVE_CUDA_FUSE_SWIGLU"
# What fuse_swiglu = "auto" (the default) does for an inference forward: True runs the fused
# GEMM-1 + SwiGLU, False the plain GEMM-1 and the SwiGLU row kernel. It costs no memory (w1 / a1
# read in place) and 0.8 GB less traffic at T = 16384 (bench --traffic), but its one timing
# lost (H200, 2026-11-28: 3680 vs 3372 µs at T = 16384, with the epilogue storing from
# registers and a packed weight copy); the epilogue now stores through shared memory in
# 16-byte chunks and the copy is gone, neither yet timed. Set it True once scripts/gpu_check.sh's
# `fused` setting shows the fused forward faster (bench/results).
FUSE_SWIGLU_AUTO = False


def _fuse_swiglu_mode(value, name):
    """True | False | "auto" from a setting's value (bool or "0" / "1" / "auto")."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true"):
        return True
    if text in ("0", "false"):
        return False
    if text == "auto":
        return "auto"
    raise ValueError(f"{name}: expected 0, 1 or auto, got {value!r}")


class Settings(threading.local):
    """Reading a setting is an attribute read, not a call. `backend` is per thread (an
    instance attribute once a thread sets it, the class default before); the others are
    process-wide (class attributes, set through the class)."""

    backend = os.environ.get("GROVE_KERNELS_BACKEND", "auto")
    value_checks = os.environ.get("GROVE_KERNELS_VALUE_CHECKS", "1") != "0"
    fuse_swiglu = _fuse_swiglu_mode(os.environ.get(FUSE_SWIGLU_VARIABLE) or "auto",
                                    FUSE_SWIGLU_VARIABLE)


settings = Settings()


def set_value_checks(enabled):
    """Turn the host-side value checks (ids in range) on or off, for every thread. On by
    default."""
    Settings.value_checks = bool(enabled)


def set_fuse_swiglu(mode):
    """The cuda backend's GEMM-1 for later inference forwards, in every thread: True fused with
    SwiGLU, False plain, "auto" as FUSE_SWIGLU_AUTO says."""
    Settings.fuse_swiglu = _fuse_swiglu_mode(mode, "set_fuse_swiglu")


def fused_gemm1(train):
    """Whether a cuda forward runs GEMM-1 with SwiGLU fused: never for a training forward (it
    saves h for the backward), otherwise settings.fuse_swiglu, "auto" as FUSE_SWIGLU_AUTO."""
    if train:
        return False
    mode = settings.fuse_swiglu
    return FUSE_SWIGLU_AUTO if mode == "auto" else mode


def value_checks_enabled():
    return settings.value_checks


@contextlib.contextmanager
def value_checks(enabled):
    """Set the value checks for a block and restore the caller's setting after it (timing
    loops switch them off without changing the process for whoever runs next)."""
    before = settings.value_checks
    set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(before)


def capturing(t):
    """True while `t`'s CUDA stream is being captured into a graph (no host reads then)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _skip(t):
    return t is None or not settings.value_checks or t.numel() == 0 or capturing(t)


def ids_in_range(name, ids, low, high):
    """Raise IndexError unless low <= ids < high; host read, skipped when disabled/capturing."""
    if _skip(ids):
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < low or hi >= high:
        raise IndexError(f"{name}: values must lie in [{low}, {high}), found min {lo}, max {hi}")


def none_out_of_range(name, count, low, high):
    """Raise IndexError unless `count` (a tensor: how many values of `name` fell outside
    [low, high), counted on the device) is zero; host read, skipped when disabled/capturing."""
    if _skip(count):
        return
    n = int(count)
    if n:
        raise IndexError(f"{name}: values must lie in [{low}, {high}), found {n} outside it")


def groups_whole(expert_map, group_size):
    """Raise ValueError unless every global group of expert_map is wholly on this rank, in one
    local group, or wholly off it (an adjugate is computed once, by the rank of its group)."""
    if _skip(expert_map):
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
    if _skip(t):
        return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise ValueError(f"{name}: expected finite values, found {t[tuple(bad)].item()} at "
                         f"index {tuple(bad) if len(bad) > 1 else bad[0]} "
                         f"({int((~finite).sum())} non-finite of {t.numel()})")
