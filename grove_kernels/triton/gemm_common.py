"""Shared @triton.jit pieces of the Triton grouped GEMMs: the row-block lookup, the K loops and
the interpreter numerics (the host side of the schedule, block_schedule, is in backend.py).

Every grouped kernel runs over the problems of a plan (E experts, then G adjugates), each a
contiguous run of rows [start_p, start_p + count_p). Row blocks of BM rows are numbered
problem by problem:

    block_offsets [P+1] = exclusive cumsum of ceil(count_p / BM)      (device, no host read)
    grid axis 0 = an upper bound on the blocks: ceil(R_e / BM) + ceil(R_a / BM) + P

A program finds its problem by counting the block_offsets <= its id (P is small), and exits
when it lies past the last real block: the grid never depends on a device value, so launches
capture in CUDA graphs.
"""
import triton
import triton.language as tl

from . import INTERPRET


@triton.jit
def locate_block(pid_m, block_offsets, prob_start, prob_count, P, P_POW2: tl.constexpr,
                 BM: tl.constexpr):
    """(problem, first row, end row) of row block pid_m; problem == P past the last block."""
    q = tl.arange(0, P_POW2)
    ends = tl.load(block_offsets + 1 + q, mask=q < P, other=2147483647)
    p = tl.sum((ends <= pid_m).to(tl.int32), axis=0)
    pc = tl.minimum(p, P - 1)
    first = tl.load(block_offsets + pc)
    start = tl.load(prob_start + pc)
    end = start + tl.load(prob_count + pc)
    return p, start + (pid_m - first) * BM, end


@triton.jit
def row_block(block_offsets, prob_start, prob_count, P, P_POW2: tl.constexpr, BM: tl.constexpr):
    """(problem, rows [BM], row_ok [BM]) of this program's row block (grid axis 0)."""
    p, m0, m_end = locate_block(tl.program_id(0), block_offsets, prob_start, prob_count, P,
                                P_POW2, BM)
    rows = m0 + tl.arange(0, BM)
    return p, rows, rows < m_end


@triton.jit
def mma(acc, a, b, INTERPRET: tl.constexpr, IEEE: tl.constexpr):
    # The interpreter treats bf16 as raw uint16 bits in tl.dot: compute in fp32 there. fp32
    # operands run in IEEE fp32 unless torch allows tf32 (torch.backends.cuda.matmul.allow_tf32),
    # where tl.dot's default would silently use tf32.
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def k_loop(acc, a_ptrs, b_ptrs, b_step, row_ok, col_ok, K, BK: tl.constexpr,
           INTERPRET: tl.constexpr, IEEE: tl.constexpr):
    """acc + A[rows, :K] @ B[:K, cols], from the pointers of the first K tile (A steps BK
    columns, B b_step elements per K tile); masked rows, columns and K load 0."""
    ks = tl.arange(0, BK)
    for k0 in range(0, K, BK):
        k_ok = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(acc, a, b, INTERPRET, IEEE)
        a_ptrs += BK
        b_ptrs += b_step
    return acc


@triton.jit
def gate_up_loop(a_ptrs, g_ptrs, u_ptrs, b_step, row_ok, col_ok, K, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr,
                 IEEE: tl.constexpr):
    """(A @ B_gate, A @ B_up) [BM, BN] in fp32, as k_loop with one A tile feeding both."""
    ks = tl.arange(0, BK)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bg = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        bu = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_g = mma(acc_g, a, bg, INTERPRET, IEEE)
        acc_u = mma(acc_u, a, bu, INTERPRET, IEEE)
        a_ptrs += BK
        g_ptrs += b_step
        u_ptrs += b_step
    return acc_g, acc_u


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> dtype with round-to-nearest-even, also under the interpreter (whose casts to
    bf16 truncate: twice the rounding error of a GPU)."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    return x.to(dtype)
