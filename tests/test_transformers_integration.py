"""grove_kernels.integrations.transformers (skipped where transformers >= 5 is absent).

  experts implementation  tiny Qwen3-MoE / Mixtral: logits and every gradient with
                          experts_implementation="grove_kernels" equal "eager" (torch backend;
                          triton under the interpreter once per model); unsupported experts
                          modules raise naming the feature
  GroveMoeForCausalLM     tiny random configs against an eager per-expert twin written here
                          (ReleasedGroveBlock: the released block's structure and loops), and
                          against grove_model on checkpoints grove_model writes; generate(),
                          AdamW, the Trainer, save -> load round trips, config errors
  apply_grove_kernels     a model of ReleasedGroveBlocks, before and after the swap
  README                  the "With transformers" section runs as written
"""
import copy
import json
import os
import re

import pytest
import torch
from torch import nn

transformers = pytest.importorskip(
    "transformers", minversion="5",
    reason="transformers >= 5 is not installed (pip install 'grove-kernels[transformers]')")

import grove_kernels as gk  # noqa: E402
import grove_kernels.integrations.transformers as gt  # noqa: E402
from grove_model import GroveMoeConfig as RefConfig  # noqa: E402
from grove_model import GroveMoeForCausalLM as RefModel  # noqa: E402
from grove_model import read_checkpoint, write_random_checkpoint  # noqa: E402
from transformers import (AutoConfig, AutoModelForCausalLM, MixtralConfig,  # noqa: E402
                          Qwen3MoeConfig)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP32_TOL = 1e-5
BATCH, SEQ = 2, 7

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
GROVE = dict(TINY, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
             experts_per_group=2, adjugate_intermediate_size=8, norm_topk_prob=True,
             rope_theta=10000.0)
# grove_model variants: a dense layer (mlp_only_layers); k=3, S=4, raw softmax weights, tied
# embeddings, attention biases, λ = 0.1, a dense layer by decoder_sparse_step.
REF_VARIANTS = {
    "mlp_only": dict(GROVE, num_hidden_layers=3, mlp_only_layers=[1]),
    "sparse_step": dict(GROVE, decoder_sparse_step=2, num_experts_per_tok=3, experts_per_group=4,
                        norm_topk_prob=False, tie_word_embeddings=True, attention_bias=True,
                        adjugate_scale=0.1),
}


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    den = ref.norm()
    return float((out - ref).norm() / den) if den > 0 else float(out.norm())


def batch(vocab, seed=1):
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids)
    g = torch.Generator().manual_seed(7)
    (out.logits * torch.randn(out.logits.shape, generator=g)).sum().backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_grads_close(grads, ref, tol):
    assert set(grads) == set(ref)
    for name in ref:
        assert grads[name] is not None, f"{name}: no gradient"
        assert rel_err(grads[name], ref[name]) <= tol, (name, rel_err(grads[name], ref[name]))


def test_kernel_package_imports_without_transformers():
    """`import grove_kernels` never imports transformers; the integration, where transformers
    is missing, raises ImportError naming the extra."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "import grove_kernels, grove_model\n"
            "try:\n    import grove_kernels.integrations.transformers\n"
            "except ImportError as e:\n    print(e)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT, os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "grove-kernels[transformers]" in proc.stdout


# --- the experts implementation on transformers' own MoE models -------------------------------
def tiny_plain_moe(kind):
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        cfg = Qwen3MoeConfig(**TINY, moe_intermediate_size=16, num_experts=8,
                             num_experts_per_tok=2, norm_topk_prob=True)
    else:
        cfg = MixtralConfig(**dict(TINY, intermediate_size=16), num_local_experts=8,
                            num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(cfg)
    # transformers inits routers at zero (every logit ties); random routing tests the kernels.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 1)
            elif "experts" in name:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_experts_implementation_matches_eager(kind, backend):
    model = tiny_plain_moe(kind)
    ids = batch(model.config.vocab_size)
    model.set_experts_implementation("eager")
    ref_logits, ref_grads = logits_and_grads(model, ids)
    model.set_experts_implementation("grove_kernels")
    assert model.config._experts_implementation == "grove_kernels"
    calls = []
    hook = gt.experts.api.fused_experts
    with gk.use_backend(backend), pytest.MonkeyPatch.context() as mp:
        mp.setattr(gt.experts.api, "fused_experts",
                   lambda *a, **k: calls.append(1) or hook(*a, **k))
        logits, grads = logits_and_grads(model, ids)
    assert len(calls) == model.config.num_hidden_layers, "the experts did not run on the kernels"
    assert rel_err(logits, ref_logits) <= FP32_TOL
    assert_grads_close(grads, ref_grads, 1e-4)


def test_from_pretrained_with_experts_implementation(tmp_path):
    model = tiny_plain_moe("qwen3_moe")
    model.save_pretrained(tmp_path)
    ids = batch(model.config.vocab_size)
    fused = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="grove_kernels")
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    assert fused.config._experts_implementation == "grove_kernels"
    with torch.no_grad():
        assert rel_err(fused(ids).logits, eager(ids).logits) <= FP32_TOL


def test_a_model_with_biased_experts_is_refused_by_name():
    # gpt-oss: biased, transposed, interleaved experts; the first of these is named.
    cfg = AutoConfig.for_model("gpt_oss", **dict(TINY, num_hidden_layers=1, intermediate_size=16),
                               num_local_experts=4, num_experts_per_tok=2,
                               layer_types=["full_attention"])
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="grove_kernels")
    with pytest.raises(gt.UnsupportedExpertsError, match=r"GptOssExperts: expert biases"):
        model(batch(cfg.vocab_size))


class _CustomGate(transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts):
    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.sigmoid(gate) * up


@pytest.mark.parametrize("change, feature", [
    (dict(has_bias=True), "expert biases"),
    (dict(is_transposed=True), "transposed expert weights"),
    (dict(is_concatenated=False), "interleaved gate/up"),
    (dict(has_gate=False), "non-gated experts"),
    (dict(has_post_expert_norm=True), "post-expert norm"),
    (dict(act_fn=nn.GELU()), "activation GELU"),
    (dict(_is_expert_parallel=True), "expert parallel"),
    ("custom_gate", "custom gating function"),
])
def test_unsupported_experts_raise_naming_the_feature(change, feature):
    cfg = Qwen3MoeConfig(**TINY, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    cls = _CustomGate if change == "custom_gate" else \
        transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts
    experts = cls(cfg)
    nn.init.normal_(experts.gate_up_proj)
    nn.init.normal_(experts.down_proj)
    for name, value in (change.items() if isinstance(change, dict) else ()):
        setattr(experts, name, value)
    x = torch.randn(3, 32)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]])
    with pytest.raises(gt.UnsupportedExpertsError, match=re.escape(feature)):
        gt.grove_kernels_experts_forward(experts, x, ids, torch.full((3, 2), 0.5))


# --- GroveMoE: an eager twin with the released block's structure -------------------------------
class ReleasedMLP(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ReleasedGroveBlock(nn.Module):
    """The released GroveMoeSparseMoeBlock's structure and loops: one pass per expert, then one
    per adjugate over every (token, slot) whose expert is in its group, each with the slot's
    weight (so an adjugate is computed once per selected expert, and the duplicates sum).
    The released forward selects by sigmoid(logits) alone (use_expert_bias=False) and always
    renormalizes; grove_model's routing adds expert_bias (use_expert_bias=True)."""

    def __init__(self, hidden, inter, num_experts, top_k, group_size, adj_inter,
                 adjugate_scale=0.05, norm_topk_prob=True, use_expert_bias=True):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.num_experts_per_group = group_size
        self.parallel_expert_intermediate_size = adj_inter
        self.adjugate_scale = adjugate_scale
        self.use_expert_bias = use_expert_bias
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.experts = nn.ModuleList(ReleasedMLP(hidden, inter) for _ in range(num_experts))
        self.chunk_experts = nn.ModuleList(ReleasedMLP(hidden, adj_inter)
                                           for _ in range(num_experts // group_size))

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = self.gate(x).float()
        score = torch.sigmoid(logits)
        if self.use_expert_bias:
            score = score + self.expert_bias
        ids = torch.topk(score, self.top_k, dim=-1).indices
        w = torch.softmax(logits, dim=-1).gather(-1, ids)
        if self.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        w = w.to(x.dtype)
        out, adj = torch.zeros_like(x), torch.zeros_like(x)
        for table, modules, dest in ((ids, self.experts, out),
                                     (ids // self.num_experts_per_group, self.chunk_experts, adj)):
            for j, module in enumerate(modules):
                tok, slot = torch.where(table == j)
                if tok.numel():
                    dest.index_add_(0, tok, module(x[tok]) * w[tok, slot, None])
        return (out + self.adjugate_scale * adj).reshape(hidden_states.shape)


def released_twin(block):
    """A ReleasedGroveBlock holding the weights of a fused GroveMoE (copies)."""
    twin = ReleasedGroveBlock(block.hidden_size, block.intermediate_size, block.num_experts,
                              block.top_k, block.group_size, block.adjugate_intermediate_size,
                              block.adjugate_scale, block.renormalize,
                              getattr(block, "use_expert_bias", True))
    I, Ia = block.intermediate_size, block.adjugate_intermediate_size
    with torch.no_grad():
        twin.gate.weight.copy_(block.gate.weight)
        twin.expert_bias.copy_(block.expert_bias)
        for modules, gate_up, down, inter in ((twin.experts, block.w1, block.w2, I),
                                              (twin.chunk_experts, block.a1, block.a2, Ia)):
            for j, m in enumerate(modules):
                m.gate_proj.weight.copy_(gate_up[j, :inter])
                m.up_proj.weight.copy_(gate_up[j, inter:])
                m.down_proj.weight.copy_(down[j])
    return twin.to(block.w1.dtype)


def tiny_grove(seed=0, **over):
    torch.manual_seed(seed)
    config = AutoConfig.for_model("grove_moe", **dict(GROVE, **over))
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for block in model.moe_blocks().values():
            for p in (block.w1, block.w2, block.a1, block.a2):
                p.normal_(0, 0.2)
            block.gate.weight.normal_(0, 1)
            block.expert_bias.normal_(0, 0.1)
    return model


def eager_twin(model):
    twin = copy.deepcopy(model)
    for i, block in model.moe_blocks().items():
        twin.model.layers[i].mlp = released_twin(block)
    return twin


def test_grove_model_is_registered_and_uses_the_kernels():
    model = tiny_grove()
    assert isinstance(model, gt.GroveMoeForCausalLM)
    assert type(AutoConfig.for_model("grove_moe")) is gt.GroveMoeConfig
    assert sorted(model.moe_blocks()) == [0, 1]
    assert all(type(b) is gt.GroveMoeSparseMoeBlock and isinstance(b, gk.GroveMoE)
               for b in model.moe_blocks().values())


def test_grove_logits_grads_and_generate_match_eager_twin():
    model = tiny_grove()
    twin = eager_twin(model)
    ids = batch(model.config.vocab_size)
    logits, grads = logits_and_grads(model, ids)
    ref_logits, ref_grads = logits_and_grads(twin, ids)
    assert rel_err(logits, ref_logits) <= FP32_TOL
    # Every parameter gets a gradient, equal to the twin's under the released names.
    from grove_model.checkpoint import released_tensors

    packed = released_tensors(model, lambda t: t.grad)
    twin_grads = {n: (g if g is not None else torch.zeros_like(dict(twin.named_parameters())[n]))
                  for n, g in ref_grads.items()}
    assert all(g is not None for g in grads.values())
    assert set(packed) - {n for n in packed if n.endswith("expert_bias")} == set(twin_grads)
    for name, ref in twin_grads.items():
        assert rel_err(packed[name], ref) <= 1e-4, name
    prompt = ids[:, :3]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16)
        ref = twin.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert out.shape == (BATCH, 3 + 16)
    assert torch.equal(out, ref)


def test_selection_without_expert_bias_as_released():
    """use_expert_bias=False: the released forward's selection (the bias is held, not read)."""
    ids = batch(64)
    with torch.no_grad():
        model = tiny_grove(use_expert_bias=False)
        assert not model.moe_blocks()[0].use_expert_bias
        logits = model(ids).logits
        assert rel_err(logits, eager_twin(model)(ids).logits) <= FP32_TOL
        # The bias must matter in this set-up, or the comparison above would prove nothing.
        assert rel_err(logits, tiny_grove(use_expert_bias=True)(ids).logits) > 1e-2


def test_adamw_steps_match_eager_twin():
    model = tiny_grove()
    twin = eager_twin(model)
    ids = batch(model.config.vocab_size)
    losses = []
    for m in (model, twin):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0)
        run = []
        for _ in range(3):
            loss = m(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            # A packed expert no token chose gets a zero gradient, which AdamW still steps
            # with its momentum; a per-expert parameter without one is skipped. Same footing:
            for p in m.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0][0] > losses[0][2], "training did not lower the loss"
    for a, b in zip(*losses):
        assert abs(a - b) <= FP32_TOL * abs(b), losses


def test_trainer_runs_with_gradient_checkpointing(tmp_path):
    pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    model = tiny_grove()
    before = model.moe_blocks()[0].w1.detach().clone()
    data = [{"input_ids": batch(64, seed=s)[0], "labels": batch(64, seed=s)[0]} for s in range(4)]
    # Renamed in transformers 5.x; the old name warns.
    checkpointing = ("activation_checkpointing"
                     if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                     else "gradient_checkpointing")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no",
                             logging_steps=1, disable_tqdm=True, **{checkpointing: True})
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.moe_blocks()[0].w1, before)


def test_triton_backend_matches_torch():
    model = tiny_grove(num_hidden_layers=1)
    ids = batch(model.config.vocab_size)
    ref_logits, ref_grads = logits_and_grads(model, ids)
    with gk.use_backend("triton"):
        logits, grads = logits_and_grads(model, ids)
    assert rel_err(logits, ref_logits) <= FP32_TOL
    assert_grads_close(grads, ref_grads, 1e-4)


@pytest.mark.parametrize("variant", sorted(REF_VARIANTS))
def test_loads_released_format_and_matches_grove_model(tmp_path, variant):
    ref_cfg = RefConfig.from_json({k: v for k, v in REF_VARIANTS[variant].items()})
    written = write_random_checkpoint(tmp_path / "ckpt", ref_cfg, seed=3)
    # As released: the config points at the remote code, which must not be needed.
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    raw.update(auto_map={"AutoConfig": "configuration_grove_moe.GroveMoeConfig",
                         "AutoModelForCausalLM": "modeling_grove_moe.GroveMoeForCausalLM"},
               transformers_version="4.51.0")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(raw))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert isinstance(model, gt.GroveMoeForCausalLM)
    ref = RefModel.from_pretrained(tmp_path / "ckpt")
    ids = batch(ref_cfg.vocab_size)
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref(ids)) <= FP32_TOL
    # Saved in the released format: the same names and the same bits as the file read.
    model.save_pretrained(tmp_path / "saved")
    saved = read_checkpoint(tmp_path / "saved")
    assert sorted(saved) == sorted(written)
    for name, t in written.items():
        assert saved[name].dtype == t.dtype and torch.equal(saved[name], t), name
    # ... which grove_model (no transformers) reads back to the same model.
    again = RefModel.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(ids), ref(ids))


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny_grove()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    a, b = model.state_dict(), again.state_dict()
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    ids = batch(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_bf16_load_keeps_selection_bias_fp32(tmp_path):
    tiny_grove().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for block in model.moe_blocks().values():
        assert block.w1.dtype == torch.bfloat16 and block.expert_bias.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(batch(64)).logits).all()


def test_config_errors():
    with pytest.raises(ValueError, match="experts_per_group"):
        gt.GroveMoeConfig(**dict(GROVE, num_experts=6, experts_per_group=4))
    with pytest.raises(ValueError, match="hidden_act"):
        gt.GroveMoeConfig(**dict(GROVE, hidden_act="gelu"))
    with pytest.raises(NotImplementedError, match="output_router_logits"):
        tiny_grove()(batch(64), output_router_logits=True)
    # The released config.json has no Grove fields: the release's values apply.
    cfg = gt.GroveMoeConfig(**{k: v for k, v in GROVE.items()
                               if k not in ("experts_per_group", "adjugate_intermediate_size")})
    assert (cfg.experts_per_group, cfg.adjugate_intermediate_size, cfg.adjugate_scale) == \
        (2, 128, 0.05)


# --- apply_grove_kernels ------------------------------------------------------------------------
class ReleasedStack(nn.Module):
    """Two layers x -> x + block(x) with released blocks, the second k = 3, S = 4."""

    def __init__(self, use_expert_bias=False):
        super().__init__()
        blocks = [ReleasedGroveBlock(32, 16, 8, 2, 2, 8, use_expert_bias=use_expert_bias),
                  ReleasedGroveBlock(32, 16, 8, 3, 4, 8, use_expert_bias=use_expert_bias)]
        self.layers = nn.ModuleList(nn.ModuleDict({"mlp": b}) for b in blocks)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["mlp"](x)
        return x


@pytest.mark.parametrize("use_expert_bias", [False, True])
def test_apply_grove_kernels_swaps_in_place(use_expert_bias):
    torch.manual_seed(0)
    model = ReleasedStack(use_expert_bias)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1 if name.endswith("gate.weight") else 0.2)
        for layer in model.layers:
            layer["mlp"].expert_bias.normal_(0, 0.3)
    x = torch.randn(BATCH, SEQ, 32, requires_grad=True)
    ref = model(x)
    ref_dx, = torch.autograd.grad(ref.square().sum(), x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert gt.apply_grove_kernels(model, use_expert_bias=use_expert_bias) == 2
    assert all(isinstance(layer["mlp"], gk.GroveMoE) for layer in model.layers)
    assert model.layers[1]["mlp"].group_size == 4 and model.layers[1]["mlp"].top_k == 3
    out = model(x)
    out.square().sum().backward()
    assert rel_err(out, ref) <= FP32_TOL and rel_err(x.grad, ref_dx) <= 1e-4
    # Every parameter gets a gradient (the router through the routing weights).
    assert all(p.grad is not None for p in model.parameters())
    after = model.state_dict()
    assert list(after) == list(before) or sorted(after) == sorted(before)
    for name, t in before.items():
        assert torch.equal(after[name], t), name
    # load_state_dict takes the released names back into the packed weights.
    fresh = ReleasedStack(use_expert_bias)
    gt.apply_grove_kernels(fresh, use_expert_bias=use_expert_bias)
    fresh.load_state_dict(before)
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    # The bias must matter here, or the two settings would prove nothing.
    other = ReleasedStack(not use_expert_bias)
    other.load_state_dict(before)
    with torch.no_grad():
        assert rel_err(other(x), ref) > 1e-2
    with pytest.raises(ValueError, match="no released Grove sparse block"):
        gt.apply_grove_kernels(model)


def test_apply_grove_kernels_then_save_pretrained_writes_released_format(tmp_path):
    """A transformers model whose sparse blocks have the released structure: after the swap,
    save_pretrained writes the same tensors under the same names, bit for bit."""
    model = tiny_grove()
    model.save_pretrained(tmp_path / "packed")
    released = eager_twin(model)
    ids = batch(model.config.vocab_size)
    with torch.no_grad():
        ref = released(ids).logits
    assert gt.apply_grove_kernels(released, use_expert_bias=True) == 2
    with torch.no_grad():
        assert rel_err(released(ids).logits, ref) <= FP32_TOL
    released.save_pretrained(tmp_path / "swapped")
    a, b = read_checkpoint(tmp_path / "packed"), read_checkpoint(tmp_path / "swapped")
    assert sorted(a) == sorted(b) and any(".chunk_experts.3.down_proj." in n for n in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- README ---------------------------------------------------------------------------------------
def readme_block(heading):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_with_transformers_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_block("With transformers"), "README.md", "exec"), {})
