"""The cuda backend's launches of one call, as the traffic model counts them (the model and its
byte rules: grove_kernels/traffic.py). Mirrors backend.py launch for launch, with the schedule
the backend picks (schedule_for: ping-pong for few rows per expert, cooperative above; weight
gradients cooperative) and the CUTLASS tile of that kernel in gemm_kernels.py;
needs neither a GPU nor the extension.

    launches(plan, x_shape (T, H), weights_shapes, dtype, layout, pass_, device_name) -> [Launch]

A CUTLASS grouped GEMM is three launches: the argument fill (a block per 128 problems), for
weight gradients the zeroing of problems without rows (grid P x 16), and the persistent GEMM
(one CTA per SM, looping over the tiles of every problem; CTAs without a tile are idle). The
row kernels (gather, SwiGLU, combine, rows_dot_scale) run one block per row (or token), at
most 16384 blocks, over the real rows of their sections.

Sections layout (backend.py):
    fwd      gather x -> xg [R, H]; GEMM-1 (nt) -> h [R, 2N]; SwiGLU per section -> z;
             GEMM-2 (nt) -> o [R, H]; combine (weights applied there) -> y
             (settings.fused_gemm1, as the backend decides: GEMM-1 writes z, no SwiGLU
             launches)
    fwd+bwd  the training forward (h, z kept), then gather x and dY, dGEMM-2 (nn) -> g,
             SwiGLU' per section, z scaled on a copy per section, dW2/dA2 and dW1/dA1
             (k-grouped tn), dGEMM-1 (nn) -> dx rows, combine, d topk_weights (torch)

Folded layout (folded.py): one gather of the R = T*k expert rows; GEMM-1 over 2E problems (all
rows of e against w1[e], its leader prefix against a1[e // S]) -> h; one SwiGLU row kernel ->
z scaled (fused: GEMM-1's epilogue writes z scaled, no row kernel); GEMM-2 over 2E problems,
all against the packed [W2_e | A2_g] (leader rows K = I + Ia, the others its first I columns,
ldb = I + Ia: each expert's W2_e read once) -> o; combine of k rows. The packed copy is kept while w2 and a2 keep their versions (inference and training
alike: a training loop repacks once per optimizer step), so no eager call counts the pack (a
training forward captured in a CUDA graph reads w2 / a2 as stored, its leader rows' adjugate
term into rows of their own: not modelled, the model is of eager calls); the backward mirrors
the forward (dx rows 2R: the adjugate term gets its own).
"""
import torch

from ..settings import fused_gemm1
from ..traffic import (INDEX_BYTES, WEIGHT_BYTES, Launch, by_layout, cdiv, distinct_tokens,
                       element_size, real_rows, sm_count, topk_grad_launch, torch_op,
                       zero_activations_launch)
from . import ext
from .gemm_kernels import GEMM_KERNELS

MAX_BLOCKS = 16384  # csrc/elementwise.cuh kMaxBlocks


def kernel_for(dtype, grouped, majors, schedule, epilogue=None):
    """The GEMM_KERNELS record backend.py's call names (ext.gemm_kernel, without the ext)."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    if name is None:
        raise ValueError(f"dtype: the cuda backend runs bf16 and fp16, not {dtype}")
    for k in GEMM_KERNELS:
        if (k.dtype, k.grouped, k.majors, k.epilogue, k.schedule) == (
                name, grouped, majors, epilogue, schedule):
            return k
    raise ValueError(f"dtype: no grouped-GEMM kernel {name} {grouped} {majors} {schedule}")


def schedule_for(plan):
    """The m-grouped GEMMs' schedule of a call: the backend's own rule (ext.m_grouped_schedule
    where the extension's wrappers define it, else backend.py's threshold)."""
    rule = getattr(ext, "m_grouped_schedule", None)
    if rule is not None:
        return rule(plan)
    from .backend import _PINGPONG_MAX_ROWS_PER_EXPERT
    rows_per_expert = plan.num_tokens * plan.top_k / max(plan.num_experts, 1)
    return "pingpong" if rows_per_expert <= _PINGPONG_MAX_ROWS_PER_EXPERT else "coop"


class Problems:
    """A CUTLASS problem list: per problem the rows (start, count), the GEMM's N and K (or, for
    a weight gradient, M and N with K = rows), and the key of the B (weight) matrix it reads:
    problems sharing a key share the weight (read once per launch)."""

    def __init__(self, start, count, n, k, weight_key=None):
        self.start, self.count = start.cpu().long(), count.cpu().long()
        self.n, self.k = n, k
        self.weight_key = (torch.arange(self.count.numel()) if weight_key is None
                           else weight_key)
        self.rows = real_rows(self.start, self.count)
        self.P = self.count.numel()

    def weight_elements(self):
        """Elements of the distinct weights that problems with rows read."""
        used = self.count > 0
        keys = self.weight_key[used]
        sizes = (self.n * self.k)[used]
        seen, total = set(), 0
        for key, size in zip(keys.tolist(), sizes.tolist()):
            if key not in seen:
                seen.add(key)
                total += size
        return total


def args_fill(name, P):
    return Launch(f"{name}: args fill", cdiv(P, 128), 0, 2 * P * INDEX_BYTES, 64 * P, 0)


def m_grouped(name, pr, kernel, e, device_name, *, a_distinct, extra_read=0, out_cols=None,
              b_elements=None):
    """The persistent m-grouped GEMM over problems pr: D_p [M_p, N_p] = A_p [M_p, K_p] B_p."""
    BM, BN, BK = kernel.tile
    tm = (pr.count + BM - 1) // BM
    tn = (pr.n + BN - 1) // BN
    tiles = int((tm * tn).sum())
    ctas = sm_count(device_name)
    b = (pr.weight_elements() if b_elements is None else b_elements) * e
    cols = pr.n if out_cols is None else out_cols
    write = int((pr.count * cols).sum()) * e
    loads = int((pr.count * pr.k * tn + pr.n * pr.k * tm).sum()) * e
    mma = 2 * BM * BN * int((tm * tn * ((pr.k + BK - 1) // BK * BK)).sum())
    flops = 2 * int((pr.count * pr.n * pr.k).sum())
    return [args_fill(name, pr.P),
            Launch(f"{name} [{kernel.name}]", ctas, max(0, ctas - tiles),
                   a_distinct + b + extra_read, write, flops, tiles, loads, mma)]


def k_grouped(name, pr, kernel, e, device_name, *, a_bytes, b_bytes):
    """The persistent k-grouped GEMM: dW_p [M_p, N_p] = sum over the problem's rows; problems
    without rows zeroed by their own launch. pr.n = M_p, pr.k = N_p here."""
    BM, BN, BK = kernel.tile
    used = pr.count > 0
    tm = (pr.n + BM - 1) // BM
    tn = (pr.k + BN - 1) // BN
    tiles = int((tm * tn * used).sum())
    ctas = sm_count(device_name)
    out_el = pr.n * pr.k
    write_gemm = int((out_el * used).sum()) * e
    write_zero = int((out_el * ~used).sum()) * e
    loads = int((pr.count * (pr.n * tn + pr.k * tm)).sum()) * e
    mma = 2 * BM * BN * int((tm * tn * ((pr.count + BK - 1) // BK * BK)).sum())
    flops = 2 * int((pr.count * pr.n * pr.k).sum())
    empty_blocks = int((~used).sum()) * 16
    return [args_fill(name, pr.P),
            Launch(f"{name}: zero empty problems", pr.P * 16, pr.P * 16 - empty_blocks,
                   2 * pr.P * INDEX_BYTES, write_zero, 0),
            Launch(f"{name} [{kernel.name}]", ctas, max(0, ctas - tiles), a_bytes + b_bytes,
                   write_gemm, flops, tiles, loads, mma)]


def row_kernel(name, total_rows, real, read, write, loads=0):
    """A row kernel: min(rows, 16384) blocks looping over the real rows."""
    blocks = min(total_rows, MAX_BLOCKS)
    return Launch(name, blocks, max(0, blocks - real), read, write, 0, load_bytes=loads)


def combine(name, plan, H, e, weighted):
    T, C = plan.token_rows.shape
    real = int(plan.token_mask.sum())
    blocks = min(T, MAX_BLOCKS)
    read = T * C * (1 + INDEX_BYTES + (WEIGHT_BYTES if weighted else 0)) + real * H * e
    return Launch(name, blocks, 0, read, T * H * e, 0)


class _Sections:
    def __init__(self, plan, I, Ia, H):
        start, count = plan.problem_rows()
        self.E, self.G = plan.num_experts, plan.num_groups
        self.start, self.count = start.cpu().long(), count.cpu().long()
        self.n = torch.tensor([I] * self.E + [Ia] * self.G, dtype=torch.int64)
        self.H = H
        rows = real_rows(self.start, self.count)
        self.real = rows.numel()
        self.real_e = int(self.count[:self.E].sum())
        self.real_a = self.real - self.real_e
        self.tokens = distinct_tokens(plan.row_token, rows)

    def problems(self, n, k):
        return Problems(self.start, self.count, n, k)


def _gather(name, s, R, H, e, weighted=False):
    read = s.tokens * H * e + s.real * (INDEX_BYTES + (WEIGHT_BYTES if weighted else 0))
    loads = s.real * H * e + s.real * (INDEX_BYTES + (WEIGHT_BYTES if weighted else 0))
    return row_kernel(name, R, s.real, read, s.real * H * e, loads)


def _sections(plan, x_shape, weights_shapes, dtype, pass_, device_name):
    T, H = x_shape
    I = weights_shapes[0][1] // 2
    Ia = weights_shapes[2][1] // 2 if weights_shapes[2] is not None else 0
    e = element_size(dtype)
    s = _Sections(plan, I, Ia, H)
    Re, Ra, R = plan.num_expert_rows, plan.num_adjugate_rows, plan.num_rows
    P = s.E + s.G
    train = pass_ == "fwd+bwd"
    sched = schedule_for(plan)
    nt = kernel_for(dtype, "m", "nt", sched)
    nn = kernel_for(dtype, "m", "nn", sched)
    tn = kernel_for(dtype, "k", "tn", "coop")
    Hs = torch.full((P,), H, dtype=torch.int64)
    cnt = s.count
    out = [torch_op("torch: problem_rows (3 ops)", 4 * P * INDEX_BYTES, 3 * P * INDEX_BYTES)]
    if train and s.G:
        out.append(zero_activations_launch(plan, I, Ia, e))
    out.append(_gather("gather x", s, R, H, e))
    xg = s.real * H * e
    fused = fused_gemm1(train)
    if fused:
        sw = kernel_for(dtype, "m", "nt", sched, epilogue="swiglu")
        out += m_grouped("GEMM-1 + SwiGLU", s.problems(2 * s.n, Hs), sw, e, device_name,
                         a_distinct=xg, out_cols=s.n)
    else:
        out += m_grouped("GEMM-1", s.problems(2 * s.n, Hs), nt, e, device_name, a_distinct=xg)
        out.append(row_kernel("SwiGLU experts", Re, s.real_e, s.real_e * 2 * I * e,
                              s.real_e * I * e))
        if s.G:
            out.append(row_kernel("SwiGLU adjugates", Ra, s.real_a, s.real_a * 2 * Ia * e,
                                  s.real_a * Ia * e))
    z = int((cnt * s.n).sum()) * e
    out += m_grouped("GEMM-2", s.problems(Hs, s.n), nt, e, device_name, a_distinct=z)
    out.append(combine("combine", plan, H, e, weighted=True))
    if not train:
        return out

    out.append(torch_op("torch: problem_rows (3 ops)", 4 * P * INDEX_BYTES, 3 * P * INDEX_BYTES))
    out.append(_gather("gather x", s, R, H, e))
    out.append(_gather("gather dY", s, R, H, e))
    # dGEMM-2: g [R, N] = dY rows @ W2 ([K = H, N]).
    out += m_grouped("dGEMM-2", s.problems(s.n, Hs), nn, e, device_name, a_distinct=xg)
    for label, rows, total_rows, n in (("experts", s.real_e, Re, I), ("adjugates", s.real_a,
                                                                      Ra, Ia)):
        if label == "adjugates" and not s.G:
            continue
        # g, h and the row weight in; dh and d row weight (padding rows too) out.
        out.append(row_kernel(f"SwiGLU' {label}", total_rows, rows,
                              rows * (3 * n * e + WEIGHT_BYTES),
                              rows * 2 * n * e + total_rows * 4))
    for label, rows, total_rows, n in (("experts", s.real_e, Re, I), ("adjugates", s.real_a,
                                                                      Ra, Ia)):
        if label == "adjugates" and not s.G:
            continue
        out.append(torch_op(f"torch: clone z {label}", total_rows * n * e, total_rows * n * e,
                            total_rows * n))
        out.append(row_kernel(f"scale z {label}", total_rows, rows,
                              rows * (n * e + WEIGHT_BYTES), rows * n * e))
    dh = 2 * z
    out += k_grouped("dW2 / dA2", Problems(s.start, cnt, Hs, s.n), tn, e, device_name,
                     a_bytes=xg, b_bytes=z)
    out += k_grouped("dW1 / dA1", Problems(s.start, cnt, 2 * s.n, Hs), tn, e, device_name,
                     a_bytes=dh, b_bytes=xg)
    out += m_grouped("dGEMM-1", s.problems(Hs, 2 * s.n), nn, e, device_name, a_distinct=dh)
    out.append(combine("combine dx", plan, H, e, weighted=False))
    out.append(topk_grad_launch(plan))
    return out


def _folded(plan, x_shape, weights_shapes, dtype, pass_, device_name):
    """The folded layout (cuda/folded.py): 2E-problem GEMMs over one gathered xg, the packed
    [W2_e | A2_g] for the leader rows of GEMM-2, k rows per token in the combine."""
    T, H = x_shape
    I = weights_shapes[0][1] // 2
    Ia = weights_shapes[2][1] // 2
    e = element_size(dtype)
    E, G = plan.num_experts, plan.num_groups
    S = E // G
    Z, W = I + Ia, 2 * I + 2 * Ia
    off = plan.expert_offsets.cpu().long()
    ends = plan.leader_ends.cpu().long()
    first, count = off[:-1], off.diff()
    lead = ends - first
    R, L = int(count.sum()), int(lead.sum())
    R_alloc = plan.num_rows
    rows = real_rows(first, count)
    tokens = distinct_tokens(plan.row_token, rows)
    train = pass_ == "fwd+bwd"
    sched = schedule_for(plan)
    nt = kernel_for(dtype, "m", "nt", sched)
    nn = kernel_for(dtype, "m", "nn", sched)
    tn = kernel_for(dtype, "k", "tn", "coop")
    full = lambda n, P=E: torch.full((P,), n, dtype=torch.int64)  # noqa: E731
    cat = torch.cat
    experts = torch.arange(E)
    # Problem lists (start, count) per section: all rows / leader rows / other rows per expert.
    own_key, group_key = experts, E + experts // S  # B operands: w[e], a[e // S]

    def two(sec1, sec2, n1, k1, n2, k2, key2=group_key):
        return Problems(cat([sec1[0], sec2[0]]), cat([sec1[1], sec2[1]]), cat([n1, n2]),
                        cat([k1, k2]), cat([own_key, key2]))

    all_rows, leaders, others = (first, count), (first, lead), (ends, count - lead)
    out = [torch_op("torch: problem lists (~8 ops)", 12 * E * INDEX_BYTES,
                    8 * E * INDEX_BYTES)]
    if train:
        out.append(zero_activations_launch(plan, I, Ia, e))
    out.append(row_kernel("gather x", R_alloc, R, tokens * H * e + R * INDEX_BYTES,
                          R * H * e, R * (H * e + INDEX_BYTES)))
    xg = R * H * e
    fused = fused_gemm1(train)
    g1 = two(all_rows, leaders, full(2 * I), full(H), full(2 * Ia), full(H))
    if fused:
        sw = kernel_for(dtype, "m", "nt", sched, epilogue="swiglu")
        # The row scales (w, λΣw) are applied in the epilogue: zs written once, no row kernel.
        out += m_grouped("GEMM-1 + SwiGLU (folded)", g1, sw, e, device_name, a_distinct=xg,
                         extra_read=R * 4 + L * 4, out_cols=cat([full(I), full(Ia)]))
    else:
        out += m_grouped("GEMM-1 (folded)", g1, nt, e, device_name, a_distinct=xg)
        out.append(row_kernel("SwiGLU (folded)", R_alloc, R,
                              (R * 2 * I + L * 2 * Ia) * e + R * 4 + L * 4,
                              R * Z * e * (2 if train else 1)))
    # Both sections read the packed [W2_e | A2_g] (kept across calls: packed once per weight
    # version, not counted here): a leader problem reads its H x Z block, a non-leader problem
    # the first I columns of the same rows, so an expert with both kinds of rows reads H x Z.
    g2 = Problems(cat([leaders[0], others[0]]), cat([leaders[1], others[1]]), full(H, 2 * E),
                  cat([full(Z), full(I)]), cat([experts, E + experts]))
    has_lead, has_other = lead > 0, (count - lead) > 0
    down = int((has_lead * H * Z + (has_other & ~has_lead) * H * I).sum())
    out += m_grouped("GEMM-2 (folded)", g2, nt, e, device_name, a_distinct=(L * Z + (R - L) * I)
                     * e, b_elements=down)
    out.append(combine("combine", plan, H, e, weighted=False))
    if not train:
        return out

    out.append(torch_op("torch: problem lists (~8 ops)", 12 * E * INDEX_BYTES,
                        8 * E * INDEX_BYTES))
    for name in ("gather x", "gather dY"):
        out.append(row_kernel(name, R_alloc, R, tokens * H * e + R * INDEX_BYTES, R * H * e,
                              R * (H * e + INDEX_BYTES)))
    out += m_grouped("dGEMM-2 (folded)", two(all_rows, leaders, full(I), full(H), full(Ia),
                                             full(H)), nn, e, device_name, a_distinct=xg)
    h_real = (R * 2 * I + L * 2 * Ia) * e
    out.append(row_kernel("SwiGLU' (folded)", R_alloc, R,
                          (R * I + L * Ia) * e + h_real + R * 4 + L * 4,
                          R * W * e + 2 * R_alloc * 4))
    out.append(row_kernel("scale z (folded)", R_alloc, R, (R * I + L * Ia) * e + R * 4 + L * 4,
                          R * Z * e))
    gfirst, glast = off[:-1:S], off[S::S]
    groups = (gfirst, glast - gfirst)
    wg = lambda M, N, M2, N2: Problems(  # noqa: E731
        cat([all_rows[0], groups[0]]), cat([all_rows[1], groups[1]]),
        cat([full(M), full(M2, G)]), cat([full(N), full(N2, G)]))
    out += k_grouped("dW2 / dA2 (folded)", wg(H, I, H, Ia), tn, e, device_name,
                     a_bytes=xg, b_bytes=R * Z * e)
    out += k_grouped("dW1 / dA1 (folded)", wg(2 * I, H, 2 * Ia, H), tn, e, device_name,
                     a_bytes=R * W * e, b_bytes=xg)
    out += m_grouped("dGEMM-1 (folded)", two(all_rows, leaders, full(H), full(2 * I), full(H),
                                             full(2 * Ia)), nn, e, device_name,
                     a_distinct=h_real)
    T_, k = plan.token_rows.shape
    out.append(torch_op("torch: token rows and mask for 2R rows (2 cats, 1 add)",
                        3 * T_ * k * (INDEX_BYTES + 1), 3 * T_ * k * (INDEX_BYTES + 1),
                        2 * T_ * k))
    blocks = min(T_, MAX_BLOCKS)
    out.append(Launch("combine dx", blocks, 0, T_ * 2 * k * (1 + INDEX_BYTES) + (R + L) * H * e,
                      T_ * H * e, 0))
    out.append(topk_grad_launch(plan))
    return out


# The launches of the cuda backend's experts stage for one call (see the module docstring);
# the plan stage's are grove_kernels.traffic.plan_launches.
launches = by_layout(_folded, _sections)
