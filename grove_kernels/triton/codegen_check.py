"""`python -m grove_kernels.triton.codegen_check`: compile the GEMM kernels for sm_90 without a
GPU and report what the code generator made of them.

For each grouped-GEMM kernel, in the variants the backend launches, it compiles ahead of time
(triton.compile with a GPUTarget; Triton ships its own ptxas) with the argument hints the JIT
would attach at run time (pointers and the strides / sizes that are multiples of 16 in the
grove-33b shapes) and counts in the PTX:
    wgmma      Hopper tensor-core instructions (a kernel without them runs on mma.sync or FMA)
    cp16       16-byte asynchronous global->shared copies (vectorized, pipelined loads)
A kernel that loses its stride specializations compiles with no cp.async at all: this check
catches that, and GPU-only compile errors, on a CPU machine. Must run WITHOUT TRITON_INTERPRET.
The folded adjugate layout's kernels (gemm_folded.py, wgrad_folded.py) are listed first;
`--folded` compiles those alone. Options: --json, --heuristic (every bucket, bf16 and fp32).
"""
import json
import os
import re
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("codegen_check: unset TRITON_INTERPRET (it compiles real GPU code)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import gemm1_swiglu, gemm_folded, gemm_k_grouped, gemm_m_grouped, wgrad_folded  # noqa

# Integer arguments that are multiples of 16 at grove-33b shapes (H=2048, I=768, Ia=128).
_ALIGNED_INTS = {"stride_xt", "s_w1_p", "s_w1_n", "s_a1_p", "s_a1_n", "K", "N_E", "N_A", "K_E",
                 "K_A", "s_be_p", "s_be", "s_ba_p", "s_ba", "stride_a_gather",
                 "stride_out_shared", "M_E", "M_A", "s_oe_p", "s_oa_p", "stride_b_gather",
                 # the folded layout's kernels (I + Ia = 896, 2I + 2Ia = 1792)
                 "I", "IA", "stride_z", "stride_h", "stride_a", "A_OFF", "s_be_k", "s_be_n",
                 "s_ba_k", "s_ba_n", "N", "stride_o", "stride_dy", "s_w2_p", "s_w2_k",
                 "s_w2_n", "s_a2_p", "s_a2_k", "s_a2_n", "stride_b", "A_COL", "B_COL"}
_INDEX_PTRS = {"row_token_ptr": "*i64", "row_weight_ptr": "*fp32", "block_offsets": "*i32",
               "prob_start": "*i32", "prob_count": "*i32", "part_ptr": "*fp32",
               "leader_ends": "*i64", "expert_offsets": "*i64", "leader_weight_ptr": "*fp32",
               "part_e_ptr": "*fp32", "part_a_ptr": "*fp32",
               "token_rows_ptr": "*i64", "token_mask_ptr": "*i1", "ids_ptr": "*i32",
               "weights_ptr": "*fp32", "bias_ptr": "*fp32"}


def _compile(kernel, constexprs, num_warps, num_stages, dtype="bf16"):
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        pointer = name.endswith("_ptr") or name in _INDEX_PTRS
        sig[name] = _INDEX_PTRS.get(name, "*" + dtype) if pointer else "i32"
        if pointer or name in _ALIGNED_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def config_jobs(conf, dtype="bf16"):
    """(label, kernel, constexprs, warps, stages) of every GEMM launch the backend makes
    with Config `conf` (forward, backward, weight-on-input variants)."""
    from . import config as cfg

    bm = conf.block_m
    # fp32 operands: IEEE dots, torch's default (config.dot_flags).
    dot = dict(INTERPRET=False, IEEE=dtype == "fp32")
    g1 = dict(P_POW2=256, BM=bm, BN=conf.gemm1.bn, BK=conf.gemm1.bk, WEIGHT_ON_INPUT=False, **dot)

    def rows(r, epilogue, **kw):
        return dict(P_POW2=256, BM=bm, BN=r.bn, BK=r.bk, ROW_WEIGHT_OUT=True, **dot,
                    EPILOGUE=epilogue.value, **kw)

    bwd = cfg.swiglu_bwd_rows(conf)
    wg = dict(BM=conf.wgrad.bm, BN=conf.wgrad.bn, BK=conf.wgrad.bk, **dot)
    gw, gs = conf.gemm1.num_warps, conf.gemm1.num_stages
    rw, rs = conf.rows.num_warps, conf.rows.num_stages
    ww, ws = conf.wgrad.num_warps, conf.wgrad.num_stages
    m = gemm_m_grouped
    # Folded layout: unit strides are JIT specializations (an int argument equal to 1); the
    # weights' last dimension is the unit one, so per launch these operand strides are 1.
    f1 = dict(P_POW2=256, BM=bm, BN=conf.gemm1.bn, BK=conf.gemm1.bk, s_w1_k=1, s_a1_k=1, **dot)

    def frows(r, **kw):
        return dict(P_POW2=256, BM=bm, BN=r.bn, BK=r.bk, **dot, **kw)

    fg2, fbwd = cfg.folded_gemm2_rows(conf), cfg.folded_dgemm2_rows(conf)
    fwg = dict(wg, S=2)
    # Each folded GEMM on both schedules (gemm_folded.grid): persistent, then "/tiles".
    folded_gemms = [
        ("folded_gemm1", gemm_folded._folded_gemm1_kernel, dict(f1, STORE_H=False), gw, gs),
        ("folded_gemm1+h", gemm_folded._folded_gemm1_kernel, dict(f1, STORE_H=True), gw, gs),
        ("folded_gemm2", gemm_folded._folded_k_concat_kernel,
         frows(fg2, ROW_WEIGHT_OUT=True, s_be_k=1, s_ba_k=1), fg2.num_warps, fg2.num_stages),
        ("folded_dgemm2", gemm_folded._folded_dgemm2_kernel,
         frows(fbwd, s_w2_n=1, s_a2_n=1), fbwd.num_warps, fbwd.num_stages),
        ("folded_dgemm1", gemm_folded._folded_k_concat_kernel,
         frows(conf.rows, ROW_WEIGHT_OUT=False, s_be_n=1, s_ba_n=1), rw, rs),
    ]
    folded = [(label + suffix, kernel, dict(constexprs, PERSISTENT=persistent), w, s)
              for persistent, suffix in ((True, ""), (False, "/tiles"))
              for label, kernel, constexprs, w, s in folded_gemms] + [
        ("folded_wgrad_dw2", wgrad_folded._folded_wgrad_kernel,
         dict(fwg, GATHER_A=True, GATHER_B=False, ROW_WEIGHT_A=True), ww, ws),
        ("folded_wgrad_dw1", wgrad_folded._folded_wgrad_kernel,
         dict(fwg, GATHER_A=False, GATHER_B=True, ROW_WEIGHT_A=False), ww, ws),
    ]
    return folded + [
        ("gemm1_swiglu", gemm1_swiglu._gemm1_swiglu_kernel, dict(g1, STORE_H=False), gw, gs),
        ("gemm1_swiglu+h", gemm1_swiglu._gemm1_swiglu_kernel, dict(g1, STORE_H=True), gw, gs),
        ("gemm2", m._gemm_m_grouped_kernel,
         rows(conf.rows, m.STORE, B_K_CONTIG=True, GATHER_A=False, OUT_SHARED=True), rw, rs),
        ("dgemm2_swiglu_bwd", m._gemm_m_grouped_kernel,
         rows(bwd, m.SWIGLU_BWD, B_K_CONTIG=False, GATHER_A=True, OUT_SHARED=False),
         bwd.num_warps, bwd.num_stages),
        ("dgemm1", m._gemm_m_grouped_kernel,
         rows(conf.rows, m.STORE, B_K_CONTIG=False, GATHER_A=False, OUT_SHARED=True), rw, rs),
        ("dgemm1_dot_x", m._gemm_m_grouped_kernel,
         rows(conf.rows, m.DOT_X, B_K_CONTIG=False, GATHER_A=False, OUT_SHARED=True), rw, rs),
        ("wgrad_dw2", gemm_k_grouped._gemm_k_grouped_kernel,
         dict(wg, GATHER_A=True, GATHER_B=False, ROW_WEIGHT_A=True, ROW_WEIGHT_B=False), ww,
         ws),
        ("wgrad_dw1", gemm_k_grouped._gemm_k_grouped_kernel,
         dict(wg, GATHER_A=False, GATHER_B=True, ROW_WEIGHT_A=False, ROW_WEIGHT_B=False), ww,
         ws),
    ]


_SSA = re.compile(r"^\s*(%[\w.#-]+)(?::\d+)? = ([\w.]+)(.*)$")


def narrow_products(ttir):
    """The 32-bit multiplications of two run-time values (row x stride, program id x size)
    that reach a pointer offset in the TTIR `ttir`: each such product overflows silently past
    2^31 elements, so offsets must be formed in 64 bits. Not reported: a product with a
    constant (a tile size: the index of one dimension, whose size the host bounds) and one of
    launch sizes alone (arguments, no program id: tile counts of the grid)."""
    out = []
    for func in re.split(r"\btt\.func\b", ttir)[1:]:
        # Sibling regions (the branches of an scf.if) reuse SSA names: a name maps to every
        # op that defines it, and the walk follows all of them.
        defs = {}
        for line in func.splitlines():
            m = _SSA.match(line)
            if m:
                body = m.group(3).split(" loc(")[0]
                operands = re.findall(r"%[\w.#-]+", body.split(" : ")[0])
                defs.setdefault(m.group(1), []).append((m.group(2), operands, body))

        def const(v):
            return v in defs and all(op == "arith.constant" or (
                op in ("tt.splat", "tt.broadcast", "tt.expand_dims") and all(map(const, ops)))
                for op, ops, _ in defs[v])

        def sizes_only(v, depth=0):  # launch sizes: arguments, constants and their arithmetic
            if v not in defs:
                return True  # a function argument (or a loop's block argument)
            return depth < 8 and all(
                op.startswith("arith.") and op != "arith.constant" and
                all(sizes_only(o, depth + 1) for o in ops) or op == "arith.constant"
                for op, ops, _ in defs[v])

        seen = set()
        stack = [d[1][1] for ds in defs.values() for d in ds
                 if d[0] == "tt.addptr" and len(d[1]) == 2]
        while stack:
            v = stack.pop()
            if v in seen or v not in defs:
                continue
            seen.add(v)
            for op, operands, body in defs[v]:
                if op == "arith.muli" and re.search(r":\s*(tensor<[\dx]*)?i32>?\s*$", body) \
                        and not any(const(o) for o in operands) \
                        and not all(sizes_only(o) for o in operands):
                    out.append(f"{v} = {op}{body}")
                if op in ("arith.addi", "arith.subi", "arith.muli", "arith.extsi",
                          "arith.extui", "tt.splat", "tt.broadcast", "tt.expand_dims",
                          "arith.select", "arith.remsi", "arith.divsi"):
                    stack.extend(operands)
    return sorted(set(out))


def offset_report():
    """{kernel launch: its 32-bit run-time products that reach a pointer offset} over every
    launch config_jobs lists (kernels added there are covered), bf16 and fp32."""
    from . import config as cfg

    import torch

    out = {}
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        conf = cfg._for_dtype(cfg._heuristic(64), dtype)
        for label, kernel, constexprs, warps, stages in config_jobs(conf, name):
            compiled = _compile(kernel, constexprs, warps, stages, name)
            out[f"{label} {name}"] = narrow_products(compiled.asm["ttir"])
    for label, kernel, constexprs in _other_kernels():
        out[label] = narrow_products(_compile(kernel, constexprs, 4, 1).asm["ttir"])
    return out


def _other_kernels():
    """(label, kernel, constexprs) of the launches outside the GEMM configs."""
    import triton.language as tl

    from . import combine, routing

    return [("combine", combine._combine_rows_kernel, dict(C=4, BH=1024, INTERPRET=False)),
            ("topk_softmax", routing._topk_softmax_kernel,
             dict(K=8, KP=8, EP=128, BT=16, HAS_BIAS=True, RENORMALIZE=True, ACC=tl.float32))]


def _ptxas_usage(ptx):
    """(registers, spill-store bytes) per thread from `ptxas -v` on the kernel's PTX."""
    import subprocess
    import tempfile

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", "-arch=sm_90a", path, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else 0


def _report(label, compiled, **extra):
    ptx = compiled.asm["ptx"]
    regs, spill = _ptxas_usage(ptx)
    return dict(extra, kernel=label, shared_bytes=compiled.metadata.shared,
                wgmma=ptx.count("wgmma.mma_async"),
                cp16=len(re.findall(r"cp\.async\.cg\.shared\.global[^;]*, 0x10", ptx)),
                registers=regs, spill_bytes=spill)


def _every(label):
    return True


def _folded_only(label):
    return label.startswith("folded")


def check(select=_every):
    """Every launch of the heuristic's 64-rows-per-expert Config (BM = 64: wgmma territory;
    BM < 64 tiles run on mma.sync by design) in bf16."""
    from . import config as cfg

    return [_report(label, _compile(kernel, constexprs, warps, stages))
            for label, kernel, constexprs, warps, stages in config_jobs(cfg._heuristic(64))
            if select(label)]


def heuristic_usage(select=_every):
    """Shared memory, registers and spills of every launch under each heuristic bucket's
    Config, in bf16 and fp32 (fp32 halves BK): [{"rows_per_problem", "dtype", "kernel", ...}]."""
    import torch

    from . import config as cfg

    out = []
    for rows_per_problem in (8, 24, 64, 1024):
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            conf = cfg._for_dtype(cfg._heuristic(rows_per_problem), dtype)
            for label, kernel, constexprs, warps, stages in config_jobs(conf, name):
                if not select(label):
                    continue
                compiled = _compile(kernel, constexprs, warps, stages, name)
                out.append(_report(label, compiled, rows_per_problem=rows_per_problem,
                                   dtype=name))
    return out


def main():
    if "--offsets" in sys.argv:
        print(json.dumps(offset_report()))
        return
    select = _folded_only if "--folded" in sys.argv else _every  # the folded layout's alone
    if "--heuristic" in sys.argv:
        print(json.dumps(heuristic_usage(select)))
        return
    rows = check(select)
    if "--json" in sys.argv:
        print(json.dumps(rows))
        return
    print(f"{'kernel':<20} {'shared B':>9} {'wgmma':>6} {'cp16':>5} {'regs':>5} {'spill B':>8}")
    for r in rows:
        print(f"{r['kernel']:<20} {r['shared_bytes']:>9} {r['wgmma']:>6} {r['cp16']:>5} "
              f"{r['registers']:>5} {r['spill_bytes']:>8}")


if __name__ == "__main__":
    main()
