"""grove_model end to end: a tiny random checkpoint in the released format, loaded with
from_pretrained, against a naive float64 per-token model written here from the raw tensors.

naive: input_ids [B, S] -> embedding -> per layer (RMSNorm -> explicit GQA attention with
q/k RMSNorm + RoPE -> RMSNorm -> per-token Grove MoE loop or SwiGLU) -> RMSNorm -> lm_head
-> logits [B, S, V] (float64). Gradients of loss = sum(logits * R) are compared tensor by
tensor under the released names. Tolerances (docs/design.md §5): fp32 <= 1e-4, bf16 <= 2e-2
relative.
"""
import json
import math
import re

import pytest
import torch

import grove_kernels as gk
from grove_model import (CheckpointError, GroveMoeConfig, GroveMoeForCausalLM, load_weights,
                         read_checkpoint, released_tensors, write_random_checkpoint,
                         write_tensors)

FP32_TOL, LOW_TOL = 1e-4, 2e-2
BATCH, SEQ = 2, 7

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=24, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, num_experts=8,
            adjugate_intermediate_size=8, rope_theta=10000.0, max_position_embeddings=64)
VARIANTS = {
    # 3 layers, layer 1 dense via mlp_only_layers; k=2, S=2, renormalized, untied.
    "mlp_only": dict(TINY, num_hidden_layers=3, mlp_only_layers=[1], num_experts_per_tok=2),
    # 2 layers, layer 0 dense via decoder_sparse_step; k=3, S=4, raw softmax weights, tied
    # embeddings, attention biases, λ=0.1; written sharded.
    "sparse_step": dict(TINY, num_hidden_layers=2, decoder_sparse_step=2, num_experts_per_tok=3,
                        experts_per_group=4, norm_topk_prob=False, tie_word_embeddings=True,
                        attention_bias=True, adjugate_scale=0.1),
}
SHARD = {"mlp_only": None, "sparse_step": 4096}


# --- the naive float64 model ---------------------------------------------------------------------
def _rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _swiglu(W, p, x):
    g = x @ W[p + "gate_proj.weight"].T
    u = x @ W[p + "up_proj.weight"].T
    return (g * torch.sigmoid(g) * u) @ W[p + "down_proj.weight"].T


def _rope(x, theta):
    """x [S, heads, D]: pairs (j, j + D/2) rotate by angle pos * theta^(-2j/D)."""
    S, _, D = x.shape
    j = torch.arange(D // 2, dtype=torch.float64)
    ang = torch.arange(S, dtype=torch.float64)[:, None] * theta ** (-2 * j / D)   # [S, D/2]
    c, s = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _attention(W, cfg, p, h):
    S, D = h.shape[0], cfg.head_dim
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads

    def proj(n):
        y = h @ W[f"{p}self_attn.{n}_proj.weight"].T
        bias = W.get(f"{p}self_attn.{n}_proj.bias")
        return y if bias is None else y + bias

    q = _rms(proj("q").view(S, nq, D), W[p + "self_attn.q_norm.weight"], cfg.rms_norm_eps)
    k = _rms(proj("k").view(S, nkv, D), W[p + "self_attn.k_norm.weight"], cfg.rms_norm_eps)
    v = proj("v").view(S, nkv, D)
    q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
    future = torch.ones(S, S, dtype=torch.bool).triu(1)
    heads = []
    for hq in range(nq):
        hk = hq // (nq // nkv)
        scores = (q[:, hq] @ k[:, hk].T / math.sqrt(D)).masked_fill(future, -math.inf)
        heads.append(torch.softmax(scores, dim=-1) @ v[:, hk])
    o = torch.cat(heads, dim=-1) @ W[p + "self_attn.o_proj.weight"].T
    bias = W.get(p + "self_attn.o_proj.bias")
    return o if bias is None else o + bias


def _grove_token(W, cfg, p, x, selection_logits=None, bias=None):
    """One token's Grove MoE output; selection_logits (when given) pick the experts instead
    of this token's own logits (bf16 runs: routing is compared at the model's decisions)."""
    logits = W[p + "gate.weight"] @ x                                       # [E]
    probs = torch.softmax(logits, dim=0)
    sel = logits.detach() if selection_logits is None else selection_logits
    bias = W[p + "expert_bias"] if bias is None else bias
    ids = torch.topk(torch.sigmoid(sel) + bias, cfg.num_experts_per_tok).indices.tolist()
    w = probs[ids]
    if cfg.norm_topk_prob:
        w = w / w.sum()
    y = torch.zeros_like(x)
    group_weight = {}
    for j, e in enumerate(ids):
        y = y + w[j] * _swiglu(W, f"{p}experts.{e}.", x)
        g = e // cfg.experts_per_group
        group_weight[g] = group_weight.get(g, 0.0) + w[j]
    for g, wg in group_weight.items():   # one adjugate per distinct group, summed weight
        y = y + cfg.adjugate_scale * wg * _swiglu(W, f"{p}chunk_experts.{g}.", x)
    return y


def naive_logits(W, cfg, input_ids, selection_logits=None, zero_bias=False):
    """W: released name -> float64 tensor. Returns float64 logits [B, S, V]."""
    B, S = input_ids.shape
    eps = cfg.rms_norm_eps
    out = []
    for b in range(B):
        x = W["model.embed_tokens.weight"][input_ids[b]]
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            x = x + _attention(W, cfg, p, _rms(x, W[p + "input_layernorm.weight"], eps))
            h = _rms(x, W[p + "post_attention_layernorm.weight"], eps)
            if p + "mlp.gate.weight" in W:
                sel = None if selection_logits is None else selection_logits[i][b]
                bias = torch.zeros(cfg.num_experts, dtype=torch.float64) if zero_bias else None
                x = x + torch.stack([
                    _grove_token(W, cfg, p + "mlp.", h[t], None if sel is None else sel[t], bias)
                    for t in range(S)])
            else:
                x = x + _swiglu(W, p + "mlp.", h)
        x = _rms(x, W["model.norm.weight"], eps)
        out.append(x @ W.get("lm_head.weight", W["model.embed_tokens.weight"]).T)
    return torch.stack(out)


# --- helpers -------------------------------------------------------------------------------------
def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite values"
    den = ref.norm()
    # A zero reference (an expert no token chose) must come out zero: absolute then.
    return float((out - ref).norm() / den) if den > 0 else float(out.norm())


def make_checkpoint(path, variant="mlp_only", seed=0, dtype=torch.float32, **kw):
    cfg = GroveMoeConfig(**VARIANTS[variant])
    tensors = write_random_checkpoint(path, cfg, seed, dtype=dtype,
                                      max_shard_size=SHARD[variant], **kw)
    return cfg, tensors


def inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)
    R = torch.randn(BATCH, SEQ, cfg.vocab_size, generator=g, dtype=torch.float64)
    return ids, R


def naive_with_grads(tensors, cfg, ids, R, **kw):
    W = {n: t.double().requires_grad_(not n.endswith("expert_bias")) for n, t in tensors.items()}
    logits = naive_logits(W, cfg, ids, **kw)
    (logits * R).sum().backward()
    # Experts no token chose are outside the graph: their gradient is zero.
    return logits.detach(), {n: torch.zeros_like(t) if t.grad is None else t.grad
                             for n, t in W.items() if t.requires_grad}


def model_with_grads(model, ids, R, capture=False):
    """logits, {released name: grad}, and (capture) router logits {layer: [B, S, E]}."""
    routed, hooks = {}, []
    if capture:
        for i, block in model.moe_blocks().items():
            hooks.append(block.gate.register_forward_hook(
                lambda mod, args, out, i=i: routed.__setitem__(
                    i, out.detach().double().cpu().view(BATCH, SEQ, -1))))
    device = next(model.parameters()).device
    logits = model(ids.to(device))
    for h in hooks:
        h.remove()
    (logits * R.to(device, torch.float32)).sum().backward()
    return logits, released_tensors(model, lambda t: t.grad), routed


def assert_close(logits, grads, ref_logits, ref_grads, tol, per_tensor=True):
    """Logits, then gradients: each tensor on its own (fp32), or the whole gradient as one
    vector (bf16: its per-tensor errors reach ~3e-2 from the bf16 attention and norm backward
    alone, dense layers included, so one tensor's error says nothing about the MoE path)."""
    assert logits.dtype == torch.float32
    assert rel_err(logits, ref_logits) <= tol, f"logits: {rel_err(logits, ref_logits):.2e}"
    assert set(grads) == set(ref_grads), "parameters without a gradient (or extra ones)"
    errs = {n: rel_err(grads[n], ref_grads[n]) for n in ref_grads}
    if per_tensor:
        worst = max(errs, key=errs.get)
        assert errs[worst] <= tol, f"gradient of {worst}: rel err {errs[worst]:.2e}"
    else:
        names = sorted(ref_grads)
        whole = rel_err(torch.cat([grads[n].double().cpu().flatten() for n in names]),
                        torch.cat([ref_grads[n].flatten() for n in names]))
        assert whole <= tol, f"whole gradient: rel err {whole:.2e}"


# --- config --------------------------------------------------------------------------------------
def test_config_defaults_when_grove_fields_absent(tmp_path):
    raw = dict(VARIANTS["mlp_only"], auto_map={"AutoConfig": "x"}, transformers_version="4.5",
               dtype="bfloat16")
    del raw["adjugate_intermediate_size"]   # as in the released config.json: no Grove fields
    (tmp_path / "config.json").write_text(json.dumps(raw))
    for source in (raw, tmp_path / "config.json", str(tmp_path)):
        cfg = GroveMoeConfig.from_json(source)
        assert (cfg.experts_per_group, cfg.adjugate_intermediate_size,
                cfg.adjugate_scale) == (2, 128, 0.05)
        assert cfg.hidden_size == 32 and cfg.num_experts == 8 and cfg.mlp_only_layers == [1]
        assert cfg.torch_dtype == "bfloat16"
    d = cfg.to_dict()
    assert "auto_map" not in d and d["experts_per_group"] == 2
    assert GroveMoeConfig.from_json(json.loads(json.dumps(d))) == cfg
    explicit = GroveMoeConfig.from_json(dict(raw, experts_per_group=4, adjugate_scale=0.2,
                                             adjugate_intermediate_size=16))
    assert (explicit.experts_per_group, explicit.adjugate_intermediate_size,
            explicit.adjugate_scale) == (4, 16, 0.2)


@pytest.mark.parametrize("variant, sparse", [("mlp_only", [0, 2]), ("sparse_step", [1])])
def test_sparse_layers(variant, sparse):
    cfg = GroveMoeConfig(**VARIANTS[variant])
    model = GroveMoeForCausalLM(cfg)
    assert sorted(model.moe_blocks()) == sparse
    for i, layer in enumerate(model.model.layers):
        assert isinstance(layer.mlp, gk.GroveMoE) == (i in sparse)


# --- numerics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fp32_logits_and_grads_match_naive(tmp_path, variant):
    cfg, tensors = make_checkpoint(tmp_path, variant)
    model = GroveMoeForCausalLM.from_pretrained(tmp_path)
    assert model.lm_head.weight.dtype == torch.float32
    ids, R = inputs(cfg)
    logits, grads, _ = model_with_grads(model, ids, R)
    ref_logits, ref_grads = naive_with_grads(tensors, cfg, ids, R)
    assert logits.shape == (BATCH, SEQ, cfg.vocab_size)
    assert_close(logits, grads, ref_logits, ref_grads, FP32_TOL)


def test_bf16_checkpoint_matches_naive(tmp_path):
    # A bf16 checkpoint (as released) loaded with dtype="auto": the naive model reads the same
    # bf16 values exactly, so what differs is bf16 arithmetic alone.
    cfg, tensors = make_checkpoint(tmp_path, "mlp_only", dtype=torch.bfloat16)
    model = GroveMoeForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert all(b.expert_bias.dtype == torch.float32 for b in model.moe_blocks().values())
    ids, R = inputs(cfg)
    logits, grads, routed = model_with_grads(model, ids, R, capture=True)
    # Selection is discontinuous: bf16 rounding of the router logits may flip a near-tie, so the
    # reference routes at the model's router logits (its own weights stay float64).
    ref_logits, ref_grads = naive_with_grads(tensors, cfg, ids, R, selection_logits=routed)
    assert_close(logits, grads, ref_logits, ref_grads, LOW_TOL, per_tensor=False)


@pytest.mark.parametrize("mode", ["pinned", "random"])
def test_expert_bias_steers_selection(tmp_path, mode):
    cfg = GroveMoeConfig(**VARIANTS["mlp_only"])
    if mode == "pinned":
        # +10 on experts 5 and 6 outweighs any sigmoid gap: every token must select exactly them.
        tensors = write_random_checkpoint(tmp_path, cfg, seed=3, expert_bias_std=0.0)
        for name in tensors:
            if name.endswith("expert_bias"):
                tensors[name][[5, 6]] = 10.0
        write_tensors(tmp_path, tensors)
    else:
        tensors = write_random_checkpoint(tmp_path, cfg, seed=3, expert_bias_std=0.5)
    model = GroveMoeForCausalLM.from_pretrained(tmp_path).train()
    ids, R = inputs(cfg)
    with torch.no_grad():
        logits = model(ids)
    W = {n: t.double() for n, t in tensors.items()}
    ref = naive_logits(W, cfg, ids)
    assert rel_err(logits, ref) <= FP32_TOL
    # The bias must matter in this set-up, or the comparison above would prove nothing.
    assert rel_err(naive_logits(W, cfg, ids, zero_bias=True), ref) > 1e-2
    if mode == "pinned":
        for block in model.moe_blocks().values():
            chosen = block.last_topk_ids.sort(dim=1).values
            assert chosen.tolist() == [[5, 6]] * (BATCH * SEQ)


# --- checkpoint format ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("shard", [None, 2048])
def test_round_trip(tmp_path, variant, shard):
    cfg, _ = make_checkpoint(tmp_path / "a", variant)
    model = GroveMoeForCausalLM.from_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b", max_shard_size=shard)
    sharded = (tmp_path / "b" / "model.safetensors.index.json").exists()
    assert sharded == (shard is not None)
    first, second = read_checkpoint(tmp_path / "a"), read_checkpoint(tmp_path / "b")
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name].dtype == second[name].dtype and torch.equal(first[name], second[name]), name
    assert GroveMoeConfig.from_json(tmp_path / "b") == GroveMoeConfig.from_json(tmp_path / "a")
    again = GroveMoeForCausalLM.from_pretrained(tmp_path / "b")
    ids, _ = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


@pytest.mark.parametrize("dirname", ["run[1]", "a*b?", "[ab]"])
def test_directory_names_are_not_glob_patterns(tmp_path, dirname):
    """Saved sharded, then unsharded into the same directory: the stale shards must go, and
    the loader must find the files of a path with glob metacharacters. A sibling the pattern
    would match (run1, a-b-, a) must be neither read nor emptied."""
    cfg, _ = make_checkpoint(tmp_path / "src", "mlp_only")
    model = GroveMoeForCausalLM.from_pretrained(tmp_path / "src")
    decoy = tmp_path / {"run[1]": "run1", "a*b?": "a-b-", "[ab]": "a"}[dirname]
    make_checkpoint(decoy, "mlp_only", seed=5)
    decoy_files = sorted(p.name for p in decoy.iterdir())
    dest = tmp_path / dirname
    model.save_pretrained(dest, max_shard_size=2048)
    model.save_pretrained(dest)
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in decoy.iterdir()) == decoy_files
    again = GroveMoeForCausalLM.from_pretrained(dest)
    ids, _ = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_built_on_meta_then_loaded(tmp_path, variant):
    """Deferred init: meta -> to_empty -> load_weights writes every tensor (each poisoned with
    NaN first), keeps the tie of a tied lm_head and the fp32 selection bias."""
    cfg, tensors = make_checkpoint(tmp_path, variant)
    model = GroveMoeForCausalLM(cfg, device="meta", dtype=torch.bfloat16).to_empty(device="cpu")
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.fill_(float("nan"))
    load_weights(model, tmp_path)
    for name, t in model.state_dict().items():
        assert torch.isfinite(t).all(), f"{name} not written by load_weights"
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == cfg.tie_word_embeddings
    for block in model.moe_blocks().values():
        assert block.expert_bias.dtype == torch.float32
    ref = GroveMoeForCausalLM(cfg, dtype=torch.bfloat16)
    load_weights(ref, tmp_path)
    ids, _ = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))
    # from_pretrained takes the same path, on the device asked for.
    loaded = GroveMoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == cfg.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(loaded(ids), ref(ids))


BROKEN = [
    ("missing", "model.layers.2.mlp.chunk_experts.1.up_proj.weight"),
    ("missing", "model.layers.0.mlp.expert_bias"),
    ("missing", "lm_head.weight"),
    ("unexpected", "model.layers.1.mlp.experts.0.gate_proj.weight"),  # layer 1 is dense
    ("unexpected", "model.layers.0.mlp.chunk_experts.4.gate_proj.weight"),  # G = 4
    ("shape", "model.layers.0.mlp.experts.7.down_proj.weight"),
    ("shape", "model.layers.2.self_attn.k_proj.weight"),
    ("shape", "model.layers.0.mlp.gate.weight"),
]


@pytest.mark.parametrize("kind, name", BROKEN)
def test_loading_errors_name_the_tensor(tmp_path, kind, name):
    cfg, tensors = make_checkpoint(tmp_path, "mlp_only")
    if kind == "missing":
        del tensors[name]
    elif kind == "unexpected":
        tensors[name] = torch.zeros(cfg.moe_intermediate_size, cfg.hidden_size)
    else:
        tensors[name] = tensors[name].T.contiguous()
    write_tensors(tmp_path, tensors)
    with pytest.raises(CheckpointError, match=re.escape(name)) as info:
        GroveMoeForCausalLM.from_pretrained(tmp_path)
    assert kind in str(info.value)


def test_loading_requires_weights(tmp_path):
    GroveMoeConfig(**VARIANTS["mlp_only"]).to_json(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        GroveMoeForCausalLM.from_pretrained(tmp_path)


# --- backends ------------------------------------------------------------------------------------
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# tf32 tensor-core paths are allowed 1e-3 on the GPU (docs/design.md §5).
DEVICE_FP32_TOL = 1e-3 if DEVICE == "cuda" else FP32_TOL


def _runs_here(backend):
    try:
        with gk.use_backend(backend):
            gk.grove_topk(torch.randn(2, 4, device=DEVICE), 2)
        return True
    except ValueError as exc:
        if "does not run on" in str(exc):
            return False
        raise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", gk.available_backends())
def test_backends_match_torch_and_naive(tmp_path, backend, dtype):
    if not _runs_here(backend):
        pytest.skip(f"backend {backend!r} does not run on {DEVICE}")
    cfg, tensors = make_checkpoint(tmp_path, "mlp_only", dtype=dtype)
    ids, R = inputs(cfg)

    def run(name):
        model = GroveMoeForCausalLM.from_pretrained(tmp_path, dtype="auto", device=DEVICE)
        with gk.use_backend(name):
            return model_with_grads(model, ids, R, capture=dtype != torch.float32)

    try:
        logits, grads, routed = run(backend)
    except ValueError as exc:  # e.g. the cuda backend runs bf16 / fp16 only
        if "cannot run this call" not in str(exc):
            raise
        pytest.skip(str(exc))
    ref_logits, ref_grads = naive_with_grads(tensors, cfg, ids, R,
                                             selection_logits=routed or None)
    if dtype == torch.float32:
        t_logits, t_grads, _ = run("torch")
        assert_close(logits, grads, t_logits, t_grads, DEVICE_FP32_TOL)
        assert_close(logits, grads, ref_logits, ref_grads, DEVICE_FP32_TOL)
    else:
        # Each run is compared at its own routing; docs/design.md §5: within 2e-2 and at most
        # twice the torch backend's error in the same dtype.
        t_logits, _, t_routed = run("torch")
        t_ref = naive_logits({n: t.double() for n, t in tensors.items()}, cfg, ids,
                             selection_logits=t_routed)
        err, torch_err = rel_err(logits, ref_logits), rel_err(t_logits, t_ref)
        assert err <= LOW_TOL and err <= 2 * torch_err + 1e-6, (err, torch_err)
        assert_close(logits, grads, ref_logits, ref_grads, LOW_TOL, per_tensor=False)
