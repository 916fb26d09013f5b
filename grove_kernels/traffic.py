"""The launch-level traffic model: HBM bytes and FLOPs of every launch a call makes, derived on
the CPU from a real plan (plan.py / plan_folded.py) and the tiles the kernels would use on a
given GPU (no GPU, no compiled kernel, no extension needed). Each backend describes its own
launches next to its kernels (triton/traffic.py, cuda/traffic.py: `launches(plan, x_shape,
weights_shapes, dtype, layout, pass_, device_name)`); this module holds what they share and the
plan stage's launches (the op layer's stage, the same for both backends).

    plan (row_token [R], offsets, ...) + tiles -> row blocks (problem, first row, rows) per
    problem -> per launch: programs launched, programs without work, bytes read / written,
    FLOPs -> Launch

The byte model (one rule for every launch):
  read_bytes   the distinct bytes a launch reads: each weight element, each gathered x / dY row
               (per distinct token), each activation row once per launch, i.e. perfect L2 reuse
               between the programs of one launch and none between launches. A lower bound on
               the launch's HBM reads (programs that run waves apart may miss in L2).
  load_bytes   what all programs load, tile by tile, with no reuse between programs (a weight
               tile once per program that reads it, an x row once per n tile): the upper bound.
  write_bytes  every element a launch stores (outputs are written once).
  Masked loads and stores (rows past a problem's end, columns past its N) move nothing.
  flops        2·M·N·K of the real rows and columns; mma_flops what the tensor cores issue
               (whole BM x BN tiles, K rounded up to BK).
  Small torch operations between kernels (zeroing, sums, index arithmetic) are launches too;
  their bytes are their tensors' sizes.
"""
from typing import NamedTuple

import torch

PASSES = ("fwd", "fwd+bwd")
LAYOUTS = ("sections", "folded")
DEFAULT_DEVICE = "NVIDIA H200"
# SMs per device name: the CTAs of a persistent (CUTLASS) kernel.
SM_COUNT = {"NVIDIA H200": 132, "NVIDIA H100 80GB HBM3": 132, "NVIDIA H100": 132,
            "NVIDIA H100 PCIe": 114}
INDEX_BYTES = 8  # int64 plan indices
WEIGHT_BYTES = 4  # fp32 row weights


class Launch(NamedTuple):
    name: str
    programs: int  # programs (Triton) / thread blocks (CUDA) launched
    idle_programs: int  # launched programs that exit without work
    read_bytes: int  # distinct bytes read (the model above)
    write_bytes: int
    flops: int  # useful: real rows and columns
    tiles: int = 0  # work units (row block x n tile) with work
    load_bytes: int = 0  # bytes loaded by all programs, no reuse between programs
    mma_flops: int = 0  # tensor-core FLOPs issued (whole tiles)

    def as_dict(self):
        return self._asdict()


def element_size(dtype):
    return torch.empty(0, dtype=dtype).element_size()


def sm_count(device_name):
    return SM_COUNT.get(device_name, 132)


def cdiv(a, b):
    return -(-a // b)


class RowBlocks(NamedTuple):
    """The row blocks of BM rows of a list of problems, problem by problem (the schedule every
    m-grouped kernel walks): one entry per block."""
    problem: torch.Tensor  # [B] int64
    first: torch.Tensor  # [B] int64: first row
    rows: torch.Tensor  # [B] int64: real rows (<= BM)

    @classmethod
    def of(cls, start, count, block_m):
        start, count = start.cpu().long(), count.cpu().long()
        nb = (count + block_m - 1) // block_m
        problem = torch.repeat_interleave(torch.arange(count.numel()), nb)
        first_block = torch.cumsum(nb, 0) - nb
        index = torch.arange(int(nb.sum())) - first_block[problem]
        rows = torch.minimum(count[problem] - index * block_m, torch.tensor(block_m))
        return cls(problem, start[problem] + index * block_m, rows)

    def __len__(self):
        return self.problem.numel()


def real_rows(start, count):
    """[n] int64: every real row of the problems (start, count), in problem order."""
    start, count = start.cpu().long(), count.cpu().long()
    p = torch.repeat_interleave(torch.arange(count.numel()), count)
    offset = torch.arange(int(count.sum())) - (torch.cumsum(count, 0) - count)[p]
    return start[p] + offset


def distinct_tokens(row_token, rows):
    """Number of distinct tokens among `rows` of row_token (the gathered rows' sources)."""
    if rows.numel() == 0:
        return 0
    return int(torch.unique(row_token.cpu()[rows]).numel())


class TileWork(NamedTuple):
    programs: int  # working programs (tiles)
    a_loads: int  # bytes
    b_loads: int  # bytes
    mma_flops: int
    row_tiles: int  # sum over working programs of their real rows


def tile_work(blocks, n, k, block_m, block_n, block_k, n_tiles, a_elem, b_elem):
    """The working programs of an m-grouped grid over `blocks` x n_tiles tiles of BN columns:
    problem p (n [P], k [P] int64 tensors) has N = n[p] columns and K = k[p]; a program works
    when its first column is < N. A loads: the block's real rows x K per working n tile;
    B loads: the columns it covers x K (elements of a_elem / b_elem bytes)."""
    if len(blocks) == 0:
        return TileWork(0, 0, 0, 0, 0)
    n_p, k_p = n[blocks.problem], k[blocks.problem]
    tiles = torch.clamp((n_p + block_n - 1) // block_n, max=n_tiles)
    cols = torch.minimum(n_p, tiles * block_n)
    k_issued = (k_p + block_k - 1) // block_k * block_k
    return TileWork(int(tiles.sum()), int((blocks.rows * k_p * tiles).sum()) * a_elem,
                    int((cols * k_p).sum()) * b_elem,
                    2 * block_m * block_n * int((tiles * k_issued).sum()),
                    int((blocks.rows * tiles).sum()))


def by_layout(folded, sections):
    """A backend's `launches(plan, x_shape, weights_shapes, dtype, layout, pass_, device_name)`
    from its two models `folded` / `sections` (same arguments less `layout`): the folded one for
    a Grove layer (a1 given) on the folded layout, the sections one otherwise."""
    def launches(plan, x_shape, weights_shapes, dtype, layout, pass_, device_name):
        model = folded if layout == "folded" and weights_shapes[2] is not None else sections
        return model(plan, x_shape, weights_shapes, dtype, pass_, device_name)

    return launches


def total(launches):
    """(hbm bytes, flops) of a list of launches: read + write bytes, useful FLOPs."""
    return (sum(l.read_bytes + l.write_bytes for l in launches), sum(l.flops for l in launches))


def torch_op(name, read_bytes, write_bytes, elements=0):
    """A small torch operation between kernels (its launch, bytes from its tensors)."""
    blocks = max(1, cdiv(elements, 512)) if elements else 1
    return Launch(name, blocks, 0, int(read_bytes), int(write_bytes), 0)


def zero_activations_launch(plan, I, Ia, elem):
    """experts.forward's zeroing of the activations no kernel writes (a training forward with
    adjugates): the adjugate section's h and z (sections layout), the adjugate columns of every
    row's h and z (folded layout); None without adjugates."""
    if not Ia:
        return None
    rows = plan.num_rows if plan.layout == "folded" else plan.num_adjugate_rows
    return torch_op("torch: zero adjugate h, z (2 ops)", 0, rows * 3 * Ia * elem, rows * 3 * Ia)


def topk_grad_launch(plan):
    """experts.backward's d topk_weights (plan.topk_weight_grad): a few torch ops over
    [T, c] and [T, k, k], counted as one."""
    T, C = plan.token_rows.shape
    k = plan.top_k
    read = T * C * (1 + INDEX_BYTES + 4) + T * k * k + 3 * T * k * 4
    return torch_op("torch: d topk_weights (~6 ops)", read, T * C * 4 + 3 * T * k * 4, T * C)


def plan_launches(plan, routing_dtype=torch.float32):
    """The plan stage's launches on a GPU (grove_kernels/triton/plan.py, both layouts: slots,
    scan, offsets, scatter): ids and routing weights in, every plan tensor out once, with the
    per-block histogram (NB blocks of 64 slots x P keys) and the sort keys between them."""
    T, k = plan.num_tokens, plan.top_k
    slots = T * k
    w_elem = element_size(routing_dtype)
    acc = plan.row_weight.element_size()
    ids_in = slots * (4 + w_elem)
    nb = max(1, cdiv(slots, 64))
    out = sum(t.numel() * t.element_size() for t in plan.named_tensors().values())
    rows_out = sum(t.numel() * t.element_size()
                   for t in (plan.row_token, plan.row_weight, plan.token_rows))
    if plan.layout == "folded":
        E = plan.num_experts
        P = 2 * E + 1
        keys = slots * 4 + slots * acc  # sort keys and λ·Σw per slot
        rows_out += plan.leader_weight.numel() * acc
        offsets_out = (plan.expert_offsets.numel() + plan.leader_ends.numel()) * INDEX_BYTES
    else:
        E, G = plan.num_experts, plan.num_groups
        P = E + 1 + (G + 1 if G else 0)
        keys = (2 if G else 1) * slots * 4
        offsets_out = sum(t.numel() * INDEX_BYTES for t in (plan.expert_offsets,
                                                            plan.adjugate_offsets)
                          if t is not None)
    counts = nb * P * 4
    slot_out = out - rows_out - offsets_out
    return [
        Launch("plan slots", nb, 0, ids_in, slot_out + keys + counts, 0),
        Launch("plan scan", cdiv(P, 4), 0, counts, counts + 2 * P * 4, 0),
        Launch("plan offsets", 1, 0, P * 4, P * 4 + offsets_out, 0),
        Launch("plan scatter", nb, 0, keys + counts + P * 4 + slots * (acc + 1), rows_out, 0),
    ]
