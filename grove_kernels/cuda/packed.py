"""Packed copies of w1 / a1 for the cuda backend's fused GEMM-1 (opt-in: cuda.FUSE_SWIGLU).

    w [P, 2N, H] (gate rows, then up rows) -> pack_gate_up(w): the same rows interleaved in
    blocks of 8, so each thread's wgmma fragment holds gate and up of the same outputs
    (csrc/gemm/swiglu_epilogue.cuh). Extra memory: one copy of w1 and a1.
"""
import weakref

from ..settings import capturing as _capturing  # (tests replace it here)
from .ext import pack_gate_up


class PackedGateUp:
    """cuda.pack_gate_up copies of w1 / a1 for the fused GEMM-1 (opt-in: cuda.FUSE_SWIGLU).

    One copy per live weight tensor, made on its first eager forward and replaced when the
    tensor's version changes (an in-place update made through torch). Writes torch does not
    version (w.data.copy_, collectives or kernels writing through data_ptr) are NOT seen: with
    FUSE_SWIGLU on, weights must stay frozen, or release_packed_weights() be called after
    changing them. Never packs while a CUDA graph is being captured; a graph captured with a
    packed copy keeps reading that copy, so it is pinned (kept alive) until release.
    """

    def __init__(self):
        self._entries = {}  # id(w) -> (weakref to w, state of w, packed copy)
        self._pinned = []  # packed copies that captured graphs may read

    @staticmethod
    def _state(w):
        # Inference tensors have no version counter: their values count as frozen.
        version = None if w.is_inference() else w._version
        return (version, w.data_ptr(), tuple(w.shape), w.stride(), w.dtype, w.device)

    def get(self, w):
        """The packed copy of w, or None while capturing a graph without one."""
        key, state = id(w), self._state(w)
        entry = self._entries.get(key)
        valid = entry is not None and entry[0]() is w and entry[1] == state
        if _capturing(w):
            if not valid:
                return None
            if not any(p is entry[2] for p in self._pinned):
                self._pinned.append(entry[2])
            return entry[2]
        if not valid:
            entries = self._entries
            ref = weakref.ref(w, lambda _, k=key: entries.pop(k, None))
            entry = (ref, state, pack_gate_up(w))
            self._entries[key] = entry
        return entry[2]

    def clear(self):
        self._entries.clear()
        self._pinned.clear()


packed_gate_up = PackedGateUp()
