"""Tile configurations of the Triton kernels, per token-count bucket.

`configs.json` (beside this file) holds measured choices keyed by device name and layer shape
"H,I,Ia,E,k", each a list of buckets {"max_rows_per_problem": n, "block_m": .., "gemm1": [BN,
BK, warps, stages], "rows": [...], "wgrad": [BM, BN, BK, warps, stages]} (the field orders of
Tile and WgradTile). Shapes or devices not
listed use the heuristic below: BM follows the mean rows per expert (T·k / E), since a row
block mostly padded with masked rows wastes its tensor-core work.
"""
import contextlib
import functools
import json
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton

from .gemm_common import INTERPRET

_PATH = os.path.join(os.path.dirname(__file__), "configs.json")


class Tile(NamedTuple):
    """An m-grouped GEMM's tile (GEMM-1, and the row-wise GEMMs: GEMM-2, dGEMM-2, dGEMM-1);
    its rows are the Config's block_m."""
    bn: int
    bk: int
    num_warps: int
    num_stages: int


class WgradTile(NamedTuple):
    """A k-grouped (weight-gradient) GEMM's tile: its own BM over the output's rows."""
    bm: int
    bn: int
    bk: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Config:
    block_m: int
    gemm1: Tile
    rows: Tile
    wgrad: WgradTile

    def __post_init__(self):
        # Plain tuples (configs.json, the tuner's grids) become the named tiles.
        object.__setattr__(self, "gemm1", Tile(*self.gemm1))
        object.__setattr__(self, "rows", Tile(*self.rows))
        object.__setattr__(self, "wgrad", WgradTile(*self.wgrad))


def dot_flags(dtype):
    """The numerics constexprs of a GEMM launch with operands of `dtype` (gemm_common.mma)."""
    return dict(INTERPRET=INTERPRET,
                IEEE=dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)


@functools.lru_cache(maxsize=None)
def _table():
    try:
        with open(_PATH) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def _heuristic(rows_per_problem, interpret=INTERPRET):
    if interpret:
        # The interpreter's cost is programs x loop trips: small tiles, few of each.
        return Config(16, (16, 32, 1, 1), (32, 32, 1, 1), (16, 32, 16, 1, 1))
    if rows_per_problem <= 16:
        return Config(16, (32, 128, 4, 5), (64, 128, 4, 5), (64, 64, 32, 4, 3))
    if rows_per_problem <= 32:
        return Config(32, (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 32, 4, 3))
    if rows_per_problem <= 96:
        return Config(64, (128, 64, 8, 3), (128, 64, 4, 4), (128, 128, 32, 8, 3))
    return Config(128, (64, 64, 8, 4), (128, 64, 8, 4), (128, 128, 32, 8, 3))


def swiglu_bwd_rows(conf):
    """The rows config for dGEMM-2 with the SwiGLU-backward epilogue.

    That epilogue holds about six [BM, BN] fp32 tiles at once (accumulator, hg, hu, sigmoid,
    silu, d_gate): at four warps and BM·BN = 8192 ptxas spills ~1.8 KB per thread (sm_90 AOT
    compile, ptxas -v). Eight warps and BM·BN <= 8192 keep it within the register file.
    """
    rows = conf.rows
    if conf.block_m * rows.bn < 4096:
        return rows
    return rows._replace(bn=min(rows.bn, 8192 // conf.block_m),
                         num_warps=max(rows.num_warps, 8))


def folded_gemm2_rows(conf):
    """The rows config for the folded layout's GEMM-2, which holds two [BM, BN] fp32
    accumulators (expert and adjugate parts, scaled apart) on leader blocks: the bound of
    swiglu_bwd_rows (eight warps once BM·BN >= 4096) keeps them in registers."""
    return swiglu_bwd_rows(conf)


def folded_dgemm2_rows(conf):
    """The rows config for the folded layout's dGEMM-2 + SwiGLU backward: the epilogue of
    swiglu_bwd_rows, inlined twice (expert tile, then the adjugate tiles of leader blocks),
    spilled 60 B per thread at BM = 64, BN = 128, eight warps (sm_90 AOT, ptxas -v); BM·BN
    <= 4096 keeps it in registers (183)."""
    rows = swiglu_bwd_rows(conf)
    return rows._replace(bn=min(rows.bn, max(16, 4096 // conf.block_m)))


SCHEDULE_VARIABLE = "GROVE_TRITON_SCHEDULE"
PROGRAMS_VARIABLE = "GROVE_TRITON_PROGRAMS"
# One program per SM: the folded GEMMs hold 150-254 registers per thread at 4-8 warps and up to
# ~128 KB of shared memory per program (sm_90), so a second one is rarely resident; launched
# anyway it would run as a second wave over items interleaved with the first's, re-reading from
# HBM the weight tiles the first wave already had in L2. GROVE_TRITON_PROGRAMS overrides.
PROGRAMS_PER_SM = 1
INTERPRET_PROGRAMS = 3  # the interpreter's persistent launches: few, so the loops iterate
# Streaming multiprocessors by device name (the traffic model's view, no GPU needed).
_SMS = {"NVIDIA H200": 132, "NVIDIA H100 80GB HBM3": 132, "NVIDIA H100 PCIe": 114,
        "NVIDIA H100 NVL": 132, "NVIDIA H20": 78, "NVIDIA A100-SXM4-80GB": 108,
        "NVIDIA A100-SXM4-40GB": 108, "NVIDIA A100 80GB PCIe": 108}
DEFAULT_SMS = 132


def persistent_programs(sms):
    """The most programs a persistent folded GEMM launches on a GPU of `sms` SMs (each then
    loops over the device's tile count; None: the interpreter), or 0 for the grid of one
    program per tile. Read on every call from GROVE_TRITON_SCHEDULE (persistent | tiles;
    default persistent) and GROVE_TRITON_PROGRAMS (a program count replacing
    sms · PROGRAMS_PER_SM)."""
    schedule = os.environ.get(SCHEDULE_VARIABLE, "persistent")
    if schedule == "tiles":
        return 0
    if schedule != "persistent":
        raise ValueError(f"{SCHEDULE_VARIABLE}={schedule!r}: expected 'persistent' or 'tiles'")
    forced = os.environ.get(PROGRAMS_VARIABLE)
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"{PROGRAMS_VARIABLE}={forced!r}: expected a positive integer")
        return int(forced)
    return INTERPRET_PROGRAMS if sms is None else sms * PROGRAMS_PER_SM


def sms_of(device_name):
    """The SM count of the GPU named device_name (DEFAULT_SMS when not listed)."""
    return _SMS.get(device_name, DEFAULT_SMS)


@functools.lru_cache(maxsize=None)
def _device_sms(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def programs_for(device):
    """persistent_programs for a launch on `device` (a torch.device)."""
    if INTERPRET or device.type != "cuda":
        return persistent_programs(None)
    return persistent_programs(_device_sms(device.index if device.index is not None
                                           else torch.cuda.current_device()))


def _for_dtype(conf, dtype):
    """fp32 operands take twice the shared memory per stage: halve BK, cap the stages."""
    if dtype != torch.float32 or INTERPRET:
        return conf
    return _fp32_tiles(conf)


def _fp32_tiles(conf):
    def halved(tile):
        return tile._replace(bk=max(16, tile.bk // 2), num_stages=min(tile.num_stages, 3))

    return Config(conf.block_m, halved(conf.gemm1), halved(conf.rows), halved(conf.wgrad))


_forced = []


@contextlib.contextmanager
def forced(config):
    """Run the enclosed calls with `config` whatever the shape (the tuner's hook)."""
    _forced.append(config)
    try:
        yield
    finally:
        _forced.pop()


def select(plan, H, I, Ia, dtype):
    if _forced:
        return _forced[-1]
    return _for_dtype(_select(plan, H, I, Ia), dtype)


def _select(plan, H, I, Ia):
    device = None
    if not INTERPRET and torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    return _choose(device, plan.num_tokens, plan.top_k, plan.num_experts, H, I, Ia)


def for_device(device_name, num_tokens, top_k, num_experts, H, I, Ia, dtype):
    """The Config a compiled (not interpreted) run on the GPU named `device_name`
    (torch.cuda.get_device_name()) selects; needs no GPU (the traffic model's view)."""
    conf = _choose(device_name, num_tokens, top_k, num_experts, H, I, Ia, interpret=False)
    return _fp32_tiles(conf) if dtype == torch.float32 else conf


def _choose(device_name, num_tokens, top_k, num_experts, H, I, Ia, interpret=INTERPRET):
    rows_per_problem = num_tokens * top_k / max(num_experts, 1)
    if device_name is not None:
        key = f"{H},{I},{Ia},{num_experts},{top_k}"
        buckets = _table().get(device_name, {}).get(key)
        if buckets:
            for b in buckets:
                if rows_per_problem <= b["max_rows_per_problem"]:
                    return Config(b["block_m"], b["gemm1"], b["rows"], b["wgrad"])
    return _heuristic(rows_per_problem, interpret)
