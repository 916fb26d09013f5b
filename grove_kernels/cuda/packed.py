"""The packed weight copy the cuda backend's folded GEMM-2 reads, kept per weight tensor while
its version is unchanged.

    down (the folded layout's GEMM-2) w2 [E, H, I], a2 [G, H, Ia] -> pack_down(w2, a2)
        [E, H, I + Ia], row n of expert e = [W2_e[n] | A2_{e // S}[n]]: leader rows run
        K = I + Ia against it, the other rows its first I columns (ldb = I + Ia), so GEMM-2
        reads no w2. Extra memory: one copy of w2 plus S copies of a2, E·H·(I + Ia) elements
        (470 MB in bf16 at grove-33b), kept while w2 and a2 keep their versions, in training
        as in inference: a training loop packs once per optimizer step (the step's in-place
        update bumps the versions), not once per forward; gradient-accumulation micro-batches
        and activation-checkpointing recomputes of one step share the copy. Each repack reads
        w2 and a2 and writes the copy (~1 GB of traffic at grove-33b, bf16). The copy stays
        allocated between steps (the backward does not read it). A training forward captured
        in a CUDA graph reads w2 and a2 instead (cuda/folded.py): no pack inside a graph.
Staleness: the key is (version, data_ptr, shape, stride, dtype, device) of each weight. A write
torch does not version (w.data.copy_, w.data.add_, collectives or kernels writing through
data_ptr, as some mixed-precision optimizers do when copying master weights back) is NOT
seen and the forward would read the old weights: after such a write call
grove_kernels.cuda.release_packed_weights().
"""
import weakref

import torch

from ..settings import capturing as _capturing  # (tests replace it here)


def pack_down(w2, a2):
    """[W2_e | A2_{e // S}] along K, S = E / G: [E, H, I + Ia] (one copy)."""
    return torch.cat([w2, a2.repeat_interleave(w2.shape[0] // a2.shape[0], dim=0)], dim=2)


class PackedCopies:
    """pack(*weights) per live tuple of weight tensors, made on its first eager call and
    replaced when a tensor's version changes (an in-place update made through torch). Writes
    torch does not version (w.data.copy_, collectives or kernels writing through data_ptr) are
    NOT seen: change the weights only through torch's in-place ops (as torch.optim does), or
    call release_packed_weights() after changing them otherwise. Never packs while a CUDA
    graph is being captured; a graph captured with a packed copy keeps reading that copy, so
    it is pinned (kept alive) until release.
    """

    def __init__(self, pack):
        self._pack = pack
        self._entries = {}  # ids of the weights -> (weakrefs, states, packed copy)
        self._pinned = []  # packed copies that captured graphs may read

    @staticmethod
    def _state(w):
        # Inference tensors have no version counter: their values count as frozen.
        version = None if w.is_inference() else w._version
        return (version, w.data_ptr(), tuple(w.shape), w.stride(), w.dtype, w.device)

    def get(self, *weights):
        """The packed copy of weights, or None while capturing a graph without one."""
        key = tuple(id(w) for w in weights)
        state = tuple(self._state(w) for w in weights)
        entry = self._entries.get(key)
        valid = (entry is not None and all(r() is w for r, w in zip(entry[0], weights))
                 and entry[1] == state)
        if _capturing(weights[0]):
            if not valid:
                return None
            if not any(p is entry[2] for p in self._pinned):
                self._pinned.append(entry[2])
            return entry[2]
        if not valid:
            entries = self._entries
            entries.pop(key, None)  # the stale copy goes first: one copy at a time at peak
            refs = tuple(weakref.ref(w, lambda _, k=key: entries.pop(k, None)) for w in weights)
            with torch.no_grad():  # a copy attached to the weights' graph would keep them alive
                entry = (refs, state, self._pack(*weights))
            self._entries[key] = entry
        return entry[2]

    def clear(self):
        self._entries.clear()
        self._pinned.clear()


packed_down = PackedCopies(pack_down)
