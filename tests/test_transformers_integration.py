"""The transformers experts backend against transformers' own eager experts, on tiny random configs.

Offline: every model is built from a config in code. Each comparison follows the project's rule:
|ours - eager in float64| <= 2 |eager in float32 - eager in float64| + atol.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from switch_dit_kernels import reference  # noqa: E402
from switch_dit_kernels.integrations import transformers as sdk_hf  # noqa: E402
from moe_testing import assert_matches_reference  # noqa: E402

BACKENDS = ["torch", "triton"]
TINY = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64)


def _mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **TINY, intermediate_size=24, num_local_experts=5, num_experts_per_tok=2))


def _qwen2_moe():  # softmax top-k without renormalisation, a sigmoid-gated shared expert
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **TINY, intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=40,
        num_experts=7, num_experts_per_tok=3, norm_topk_prob=False))


def _qwen3_moe():
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **TINY, head_dim=16, intermediate_size=40, moe_intermediate_size=24, num_experts=5,
        num_experts_per_tok=2, norm_topk_prob=True))


def _olmoe():
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        **TINY, intermediate_size=24, num_experts=5, num_experts_per_tok=5))  # k = E


def _deepseek_v3():  # sigmoid + correction bias, group-limited top-k, routed scaling, shared
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        **TINY, intermediate_size=40, moe_intermediate_size=24, n_routed_experts=8, n_group=2,
        topk_group=1, num_experts_per_tok=1, first_k_dense_replace=1, kv_lora_rank=16,
        q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        routed_scaling_factor=2.5, rope_scaling=None))
    for layer in model.model.layers[1:]:  # a non-zero correction bias, as trained checkpoints have
        layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


MODELS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe,
          "olmoe": _olmoe, "deepseek_v3": _deepseek_v3}


@pytest.fixture(scope="module")
def impl_names():
    """One registered experts implementation per backend."""
    return {b: sdk_hf.register(f"switch_dit_test_{b}", backend=b) for b in BACKENDS}


@pytest.fixture
def count_calls(monkeypatch):
    """Counts the adapter's calls into expert_mlp (proves the kernels ran, not eager)."""
    calls = []
    real = sdk_hf.expert_mlp

    def spy(*args, **kwargs):
        calls.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sdk_hf, "expert_mlp", spy)
    return calls


def _experts_modules(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Experts")]


def _logits_and_grads(model, input_ids, dlogits):
    """logits and the gradients of sum(logits * dlogits) w.r.t. the experts' weights and routers."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids).logits
    (logits * dlogits.to(logits.dtype)).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
             if p.grad is not None and ("experts" in name or ".gate." in name
                                        or name.endswith("gate.weight"))}
    return logits.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_model_matches_eager(model_name, backend, impl_names, count_calls):
    model = MODELS[model_name]().eval()
    model.set_experts_implementation("eager")
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    dlogits = torch.randn(2, 7, TINY["vocab_size"], dtype=torch.float64)

    logits64, grads64 = _logits_and_grads(model.double(), input_ids, dlogits)
    logits32, grads32 = _logits_and_grads(model.float(), input_ids, dlogits)
    model.set_experts_implementation(impl_names[backend])
    assert model.config._experts_implementation == impl_names[backend]
    logits, grads = _logits_and_grads(model, input_ids, dlogits)

    experts = _experts_modules(model)
    assert len(count_calls) == len(experts) >= 1 and set(count_calls) == {backend}
    assert_matches_reference("logits", logits, logits64, logits32, torch.float32)
    assert any("gate_up_proj" in n for n in grads) and any("down_proj" in n for n in grads)
    assert set(grads) == set(grads64)
    for name in grads64:
        assert_matches_reference(name, grads[name], grads64[name], grads32[name], torch.float32)


def _standalone_experts(model_name="mixtral"):
    model = MODELS[model_name]()
    experts = _experts_modules(model)[0]
    return model, experts


def _check_experts(experts, reference_impl, impl, hidden, ids, weights):
    """``impl`` against ``reference_impl`` in float64 (the truth) and float32 (its own error):
    the output and every gradient of the experts module, by the 2x-PyTorch rule."""
    out64, grads64 = _run_experts(experts.double(), reference_impl, hidden.double(), ids,
                                  weights.double())
    out32, grads32 = _run_experts(experts.float(), reference_impl, hidden, ids, weights)
    out, grads = _run_experts(experts, impl, hidden, ids, weights)
    assert_matches_reference("y", out, out64, out32, torch.float32)
    for name in grads64:
        assert_matches_reference(name, grads[name], grads64[name], grads32[name], torch.float32)


def _run_experts(experts, impl, hidden, ids, weights):
    """The experts module's forward through implementation ``impl``, with grads of everything."""
    experts.config._experts_implementation = impl
    experts.zero_grad(set_to_none=True)
    hidden = hidden.detach().clone().requires_grad_(True)
    weights = weights.detach().clone().requires_grad_(True)
    out = experts(hidden, ids, weights)
    dy = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * dy).sum().backward()
    return out.detach(), {"hidden": hidden.grad, "weights": weights.grad,
                          **{n: p.grad.clone() for n, p in experts.named_parameters()}}


@pytest.mark.parametrize("backend", BACKENDS)
def test_foreign_expert_ids_contribute_nothing(backend, impl_names):
    """ids == E (another rank's expert under expert parallelism): eager skips them; so do we,
    and their routing weights get a zero gradient."""
    _, experts = _standalone_experts("mixtral")
    num_experts = experts.gate_up_proj.shape[0]
    tokens, k = 37, 2
    hidden = torch.randn(tokens, experts.gate_up_proj.shape[2])
    ids = torch.stack([torch.randperm(num_experts)[:k] for _ in range(tokens)])
    ids[::3, 0] = num_experts
    ids[5, :] = num_experts  # a token with no local expert at all
    weights = torch.rand(tokens, k)
    weights[ids == num_experts] = float("nan")  # must not leak through the masked slots
    out_ref, grads_ref = _run_experts(experts, "eager", hidden, ids, weights)
    out, grads = _run_experts(experts, impl_names[backend], hidden, ids, weights)
    assert torch.equal(out[5], torch.zeros_like(out[5]))
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(grads["weights"][ids == num_experts],
                       torch.zeros(int((ids == num_experts).sum())))
    for name in ("hidden", "gate_up_proj", "down_proj"):
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6)
    mask = ids != num_experts
    torch.testing.assert_close(grads["weights"][mask], grads_ref["weights"][mask],
                               rtol=1e-5, atol=1e-6)


def _allocated_bytes(fn):
    """(sum, max) of the bytes of the new storage every op called by ``fn`` returns (views and
    in-place results, which alias an input's storage, excluded)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    sizes = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            inputs = {t.untyped_storage().data_ptr()
                      for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            out = func(*args, **(kwargs or {}))
            if func._schema.is_mutable:  # in place / out= (and the interpreter's set_ on a host alias)
                return out
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    sizes.append(t.untyped_storage().nbytes())
            return out

    with Count():
        fn()
    return sum(sizes), max(sizes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_reads_hf_weights_in_place(backend, impl_names):
    """No per-forward copy of HF's [E, 2I, D] / [E, D, I] weights: every tensor a forward
    allocates is smaller than the smallest weight, and the total is activations only."""
    _, experts = _standalone_experts("mixtral")
    tokens, k = 16, 2
    hidden = torch.randn(tokens, experts.gate_up_proj.shape[2])
    ids = torch.stack([torch.randperm(experts.gate_up_proj.shape[0])[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k)
    experts.config._experts_implementation = impl_names[backend]
    with torch.no_grad():
        total, largest = _allocated_bytes(lambda: experts(hidden, ids, weights))
    weight_bytes = min(experts.gate_up_proj.nbytes, experts.down_proj.nbytes)
    assert largest < weight_bytes, (largest, weight_bytes)
    # activations: x [T, D], h [T*k, 2I] and [T*k, I], out [T*k, D], y [T, D], metadata; 4 bytes
    dim, inter = experts.gate_up_proj.shape[2], experts.down_proj.shape[2]
    activations = 4 * (tokens * dim * 2 + tokens * k * (3 * inter + dim))
    assert total < 4 * activations + 4096, (total, activations)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_experts_with_biases_match_batched_mm(backend, impl_names):
    """is_transposed=True ([E, D, 2I] weights) with biases and a tanh-GELU gate, against
    transformers' own batched_mm forward (which handles both flags)."""
    from transformers.activations import ACT2FN
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation

    @use_experts_implementation(is_transposed=True, has_bias=True)
    class TransposedExperts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            e, d, i = 7, 24, 40
            self.num_experts = e
            self.gate_up_proj = torch.nn.Parameter(torch.randn(e, d, 2 * i) / d ** 0.5)
            self.gate_up_proj_bias = torch.nn.Parameter(torch.randn(e, 2 * i))
            self.down_proj = torch.nn.Parameter(torch.randn(e, i, d) / i ** 0.5)
            self.down_proj_bias = torch.nn.Parameter(torch.randn(e, d))
            self.act_fn = ACT2FN["gelu_pytorch_tanh"]

    experts = TransposedExperts(transformers.PretrainedConfig())
    assert sdk_hf.expert_weights(experts).activation == "geglu"
    tokens = 40
    hidden = torch.randn(tokens, 24)
    ids = torch.stack([torch.randperm(7)[:3] for _ in range(tokens)])
    weights = torch.rand(tokens, 3)
    assert "batched_mm" in ALL_EXPERTS_FUNCTIONS
    _check_experts(experts, "batched_mm", impl_names[backend], hidden, ids, weights)


def test_ungated_experts_match_eager(impl_names):
    """has_gate=False (NemotronH's up_proj -> act -> down_proj) with relu runs on the kernels."""
    config = transformers.NemotronHConfig(
        vocab_size=61, hidden_size=24, num_hidden_layers=1, layers_block_type=["moe"],
        n_routed_experts=5, num_experts_per_tok=2, moe_intermediate_size=40,
        moe_shared_expert_intermediate_size=40, mlp_hidden_act="relu")
    experts = transformers.models.nemotron_h.modeling_nemotron_h.NemotronHExperts(config)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    assert sdk_hf.expert_weights(experts).activation == "relu"
    tokens = 24
    hidden = torch.randn(tokens, 24)
    ids = torch.stack([torch.randperm(5)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2)
    _check_experts(experts, "eager", impl_names["torch"], hidden, ids, weights)


def test_gpt_oss_is_refused_naming_the_clamped_swiglu(impl_names):
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(
        **TINY, head_dim=16, intermediate_size=24, num_local_experts=5, num_experts_per_tok=2))
    reason = sdk_hf.unsupported_reason(_experts_modules(model)[0])
    assert "clamped SwiGLU" in reason and "interleaved" in reason
    model.set_experts_implementation(impl_names["torch"])
    with pytest.raises(sdk_hf.UnsupportedExpertsError, match="GptOssExperts.*clamped SwiGLU"):
        model(torch.randint(0, TINY["vocab_size"], (1, 5)))


def test_unsupported_activation_and_post_norm_are_named(impl_names):
    config = transformers.NemotronHConfig(
        vocab_size=61, hidden_size=24, num_hidden_layers=1, layers_block_type=["moe"],
        n_routed_experts=5, num_experts_per_tok=2, moe_intermediate_size=40,
        moe_shared_expert_intermediate_size=40, mlp_hidden_act="relu2")
    experts = transformers.models.nemotron_h.modeling_nemotron_h.NemotronHExperts(config)
    assert "ReLUSquaredActivation" in sdk_hf.unsupported_reason(experts)
    _, mixtral_experts = _standalone_experts("mixtral")
    mixtral_experts.act_fn = transformers.activations.ACT2FN["gelu"]  # gated exact GELU
    assert "GELUActivation" in sdk_hf.unsupported_reason(mixtral_experts)
    mixtral_experts.act_fn = transformers.activations.ACT2FN["silu"]
    mixtral_experts.has_post_expert_norm = True
    assert "has_post_expert_norm" in sdk_hf.unsupported_reason(mixtral_experts)


@pytest.mark.parametrize("name", ["silu", "swish", "relu", "gelu", "gelu_python",
                                  "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_accurate"])
def test_activation_mapping_computes_the_same_function(name):
    act = transformers.activations.ACT2FN[name]
    kind = sdk_hf._activation_kind(act)
    x = torch.randn(257, dtype=torch.float64) * 4
    torch.testing.assert_close(reference.activation_fn(kind, x), act(x), rtol=1e-9, atol=1e-9)


def test_save_and_from_pretrained_round_trip(tmp_path, impl_names, count_calls):
    model = _mixtral().eval()
    model.set_experts_implementation("eager")
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, experts_implementation=impl_names["torch"]).eval()
    assert loaded.config._experts_implementation == impl_names["torch"]
    with torch.no_grad():
        got = loaded(input_ids).logits
    assert len(count_calls) == len(_experts_modules(loaded)) >= 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(_experts_modules(model), _experts_modules(loaded)):  # read in place, unchanged
        assert torch.equal(a.gate_up_proj, b.gate_up_proj)


def test_register_checks_arguments_and_returns_the_name():
    assert sdk_hf.register("switch_dit_test_name", backend="torch") == "switch_dit_test_name"
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    assert "switch_dit_test_name" in ALL_EXPERTS_FUNCTIONS
    with pytest.raises(ValueError, match="backend"):
        sdk_hf.register("x", backend="cuda_graphs")
    with pytest.raises(ValueError, match="name"):
        sdk_hf.register("")
    with pytest.raises(ValueError, match="eager"):
        sdk_hf.register("eager")


def test_importing_the_package_does_not_import_transformers():
    code = ("import sys, switch_dit_kernels, switch_dit_kernels.integrations.transformers; "
            "assert 'transformers' not in sys.modules, 'transformers imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens,k", [(1, 2), (24, 1), (40, 5)])  # T = 1; k = 1; k = E
def test_experts_module_matches_eager_at_odd_sizes(tokens, k, backend, impl_names):
    """The experts module alone, called as the MoE blocks call it; T = 1 leaves most experts
    without rows."""
    _, experts = _standalone_experts("mixtral")
    num_experts, dim = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[2]
    hidden = torch.randn(tokens, dim)
    ids = torch.stack([torch.randperm(num_experts)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k)
    _check_experts(experts, "eager", impl_names[backend], hidden, ids, weights)


def test_autocast_runs_experts_in_the_autocast_dtype(impl_names):
    """Under autocast the kernels see autocast's dtype (custom Functions do not autocast by
    themselves); the output keeps the hidden states' dtype, as eager's does."""
    _, experts = _standalone_experts("mixtral")
    hidden = torch.randn(24, experts.gate_up_proj.shape[2])
    ids = torch.stack([torch.randperm(5)[:2] for _ in range(24)])
    weights = torch.rand(24, 2)
    seen = []
    real = sdk_hf.expert_mlp

    def spy(x, *args, **kwargs):
        seen.append((x.dtype, args[0].dtype))
        return real(x, *args, **kwargs)

    sdk_hf.expert_mlp, saved = spy, sdk_hf.expert_mlp
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            experts.config._experts_implementation = "eager"
            ref = experts(hidden, ids, weights)
            experts.config._experts_implementation = impl_names["torch"]
            out = experts(hidden, ids, weights)
    finally:
        sdk_hf.expert_mlp = saved
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)
