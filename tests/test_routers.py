"""`MoE` as today's routers: against transformers' own sparse MoE blocks, and `route` by hand.

HF blocks run their eager experts in float64 and float32; `MoE` (loaded from the block's
state dict) must be within twice PyTorch's float32 error of the float64 result, forward and
every gradient (input, router, experts, shared expert).
"""
from __future__ import annotations

import pytest
import torch

from switch_dit_kernels import MoE
from switch_dit_kernels.routers import route
from moe_testing import assert_matches_reference

TINY = dict(vocab_size=61, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2)


def _hf_block(model_type):
    """(config, sparse MoE block) of a tiny random transformers config."""
    transformers = pytest.importorskip("transformers", minversion="5.0")
    if model_type == "mixtral":
        config = transformers.MixtralConfig(**TINY, intermediate_size=40, num_local_experts=5,
                                            num_experts_per_tok=2)
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
    elif model_type == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**TINY, moe_intermediate_size=40,
                                             shared_expert_intermediate_size=56, num_experts=7,
                                             num_experts_per_tok=3, norm_topk_prob=False)
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block
    elif model_type == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**TINY, moe_intermediate_size=40, num_experts=5,
                                             num_experts_per_tok=5, norm_topk_prob=True)
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
    elif model_type == "olmoe":
        config = transformers.OlmoeConfig(**TINY, intermediate_size=40, num_experts=7,
                                          num_experts_per_tok=1)
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block
    else:
        config = transformers.DeepseekV3Config(
            **TINY, moe_intermediate_size=40, n_routed_experts=12, n_group=4, topk_group=2,
            num_experts_per_tok=3, n_shared_experts=2, routed_scaling_factor=2.5,
            norm_topk_prob=True)
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Block
    config._experts_implementation = "eager"
    block = Block(config)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_(0, 0.3 if "gate." in name or name.startswith("gate") else 0.15)
        for name, b in block.named_buffers():
            if "correction_bias" in name:
                b.normal_(0, 0.3)  # steers the choice away from the plain top-k
    return config, block


def _grads(module, x, dy, names):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    (out * dy.to(out.dtype)).sum().backward()
    params = dict(module.named_parameters())
    return out.detach(), {"x": x.grad, **{key: params[name].grad for key, name in names}}


def _name_pairs(moe, model_type):
    """(our parameter, HF's) for every parameter with a gradient."""
    pairs = [("router.weight", "gate.weight"), ("w1", "experts.gate_up_proj"),
             ("w2", "experts.down_proj")]
    shared = "shared_experts" if model_type == "deepseek_v3" else "shared_expert"
    if moe.shared_expert is not None:
        pairs += [(f"shared_expert.{p}.weight", f"{shared}.{p}.weight")
                  for p in ("gate_proj", "up_proj", "down_proj")]
    if moe.shared_expert_gate is not None:
        pairs.append(("shared_expert_gate.weight", "shared_expert_gate.weight"))
    return pairs


@pytest.mark.parametrize("model_type,backend", [
    ("mixtral", "torch"), ("qwen2_moe", "torch"), ("qwen3_moe", "torch"), ("olmoe", "torch"),
    ("deepseek_v3", "torch"), ("mixtral", "triton"), ("qwen2_moe", "triton"),
    ("deepseek_v3", "triton")])
def test_moe_matches_hf_block(model_type, backend):
    config, block = _hf_block(model_type)
    moe = MoE.from_hf_config(config, backend=backend)
    moe.load_hf_state_dict(block.state_dict())
    if model_type == "deepseek_v3":
        assert moe.score_func == "sigmoid" and moe.num_groups == 4 and moe.topk_groups == 2
        assert torch.equal(moe.e_score_correction_bias, block.gate.e_score_correction_bias)
    pairs = _name_pairs(moe, model_type)
    hf_pairs = [(theirs, theirs) for _, theirs in pairs]
    our_pairs = [(ours, ours) for ours, _ in pairs]
    x = torch.randn(2, 20, config.hidden_size)
    dy = torch.randn(2, 20, config.hidden_size, dtype=torch.float64)

    out64, g64 = _grads(block.double(), x.double(), dy, hf_pairs)
    out32, g32 = _grads(block.float(), x, dy, hf_pairs)
    out, g = _grads(moe, x, dy, our_pairs)
    assert_matches_reference("y", out, out64, out32, torch.float32)
    for ours, theirs in [("x", "x")] + pairs:
        got = g[ours]
        if ours in ("w1", "w2"):  # ours [E, in, out], HF's [E, out, in]
            got = got.transpose(1, 2)
        assert_matches_reference(ours, got, g64[theirs], g32[theirs], torch.float32)


def _route_by_hand(logits, k, score_func, bias, num_groups, topk_groups, renormalize, scale):
    """One token at a time, plain Python over groups and experts."""
    tokens, num_experts = logits.shape
    size = num_experts // num_groups
    weights = torch.empty(tokens, k, dtype=torch.float64)
    ids = torch.empty(tokens, k, dtype=torch.int64)
    for t in range(tokens):
        row = logits[t].double()
        scores = row.sigmoid() if score_func == "sigmoid" else row.softmax(0)
        choice = scores + (bias.double() if bias is not None else 0)
        group_score = [sum(sorted(choice[g * size:(g + 1) * size].tolist())[-2:])
                       for g in range(num_groups)]
        best = sorted(range(num_groups), key=lambda g: -group_score[g])[:topk_groups]
        eligible = [e for e in range(num_experts) if e // size in best]
        chosen = sorted(eligible, key=lambda e: -choice[e].item())[:k]
        w = scores[chosen]
        if renormalize:
            w = w / w.sum()
        weights[t], ids[t] = w * scale, torch.tensor(chosen)
    return weights, ids


@pytest.mark.parametrize("score_func,num_experts,num_groups,topk_groups,k,renormalize", [
    ("softmax", 12, 4, 2, 3, True),      # group-limited softmax (DeepSeek-V2 style)
    ("sigmoid", 12, 4, 1, 3, False),     # every expert from one group
    ("sigmoid", 8, 8, 3, 3, True),       # groups of one expert: group score = the expert's
    ("sigmoid", 7, 1, None, 1, True),    # prime E, k = 1, no groups
    ("sigmoid", 5, 1, None, 5, False),   # k = E
    ("softmax", 6, 3, 3, 6, False),      # every group eligible (no limit), k = E
])
def test_route_matches_hand_reference(score_func, num_experts, num_groups, topk_groups, k,
                                      renormalize):
    logits = torch.randn(37, num_experts)
    bias = torch.randn(num_experts) * 0.5
    weights, ids, scores = route(logits, k, score_func=score_func, correction_bias=bias,
                                 num_groups=num_groups, topk_groups=topk_groups,
                                 renormalize=renormalize, routed_scaling_factor=1.5,
                                 backend="torch")
    ref_w, ref_ids = _route_by_hand(logits, k, score_func, bias, num_groups,
                                    topk_groups or num_groups, renormalize, 1.5)
    order, ref_order = ids.sort(-1).indices, ref_ids.sort(-1).indices
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(weights.gather(1, order).double(), ref_w.gather(1, ref_order),
                               rtol=1e-5, atol=1e-6)
    assert scores.shape == (37, num_experts) and scores.dtype == torch.float32


def test_route_weights_are_differentiable_and_bias_only_steers():
    logits = torch.randn(24, 8, requires_grad=True)
    bias = torch.zeros(8)
    bias[3] = 10.0  # forces expert 3 into every token's choice
    weights, ids, scores = route(logits, 2, score_func="sigmoid", correction_bias=bias,
                                 backend="torch")
    assert (ids == 3).any(-1).all()
    slot = (ids == 3).float().argmax(-1)
    torch.testing.assert_close(weights.gather(1, slot[:, None])[:, 0],
                               torch.sigmoid(logits[:, 3]).detach())  # no bias in the weight
    weights.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_plain_softmax_route_keeps_route_topk():
    from switch_dit_kernels import route_topk
    logits = torch.randn(40, 7)
    weights, ids, _ = route(logits, 3, renormalize=True, backend="torch")
    ref_w, ref_ids = route_topk(logits, 3, renormalize=True, backend="torch")
    assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_w)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_groups=3), "num_groups"),
    (dict(num_groups=4, topk_groups=5), "topk_groups"),
    (dict(num_groups=4, topk_groups=1, k=3), "k=3 exceeds"),
    (dict(score_func="tanh"), "score_func"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(shared_expert_gate=True), "shared_expert_hidden"),
])
def test_moe_router_arguments_are_checked(kwargs, match):
    args = dict(d_model=16, num_experts=8, k=2, d_hidden=24, activation="swiglu")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MoE(**args)


def test_load_hf_state_dict_names_missing_unused_and_misshaped_keys():
    config, block = _hf_block("qwen2_moe")
    moe = MoE.from_hf_config(config, backend="torch")
    state = dict(block.state_dict())
    del state["shared_expert_gate.weight"]
    state["gate.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['shared_expert_gate.weight'\].*gate.extra"):
        moe.load_hf_state_dict(state)
    state = dict(block.state_dict())
    state["experts.down_proj"] = state["experts.down_proj"][:, :, :-1]
    with pytest.raises(ValueError, match="experts.down_proj has shape"):
        moe.load_hf_state_dict(state)
    with pytest.raises(ValueError, match="model_type"):
        MoE.from_hf_config(type("C", (), {"model_type": "llama", "hidden_act": "silu",
                                          "hidden_size": 8, "num_experts_per_tok": 1})())


def test_sigmoid_moe_aux_loss_uses_normalised_scores():
    moe = MoE(16, 6, 2, d_hidden=24, activation="swiglu", bias=False, score_func="sigmoid",
              correction_bias=True, backend="torch", load_balance_coef=0.5)
    x = torch.randn(37, 16)
    moe(x)
    scores = torch.sigmoid(moe.router(x).float())
    probs = scores / scores.sum(-1, keepdim=True)
    _, ids, _ = route(moe.router(x), 2, score_func="sigmoid",
                      correction_bias=moe.e_score_correction_bias, backend="torch")
    fraction = torch.bincount(ids.reshape(-1), minlength=6).float() / ids.numel()
    expected = 6 * (fraction * probs.mean(0)).sum()
    torch.testing.assert_close(moe.load_balance_loss, expected)
    torch.testing.assert_close(moe.aux_loss, 0.5 * expected)


def test_deepseek_v3_bf16_routes_as_hf(monkeypatch):
    """bf16 inputs: DeepSeek-V3's router runs in float32 (router_float32), so MoE picks the
    experts HF picks and the outputs agree to bf16 precision."""
    import switch_dit_kernels.modules as modules

    config, block = _hf_block("deepseek_v3")
    moe = MoE.from_hf_config(config, backend="torch")
    moe.load_hf_state_dict(block.state_dict())
    assert moe.router_float32
    block, moe = block.to(torch.bfloat16), moe.to(torch.bfloat16)
    block.gate.weight.data = block.gate.weight.data.float()  # HF keeps this router in float32
    moe.router.float()  # a float32 router inside a bf16 MoE, as HF's checkpoints have it
    chosen = []

    def spy(logits, *args, **kwargs):
        assert logits.dtype == torch.float32
        out = route(logits, *args, **kwargs)
        chosen.append(out[1])
        return out

    monkeypatch.setattr(modules, "route", spy)
    x = torch.randn(4, 50, config.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        _, _, hf_ids = block.gate(x)
        out = moe(x)
    assert torch.equal(chosen[0].sort(-1).values, hf_ids.sort(-1).values)
    torch.testing.assert_close(out.float(), block(x).float(), rtol=5e-2, atol=5e-2)
