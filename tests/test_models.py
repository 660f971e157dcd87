"""Models: registry, DiT parameter count, Switch-DiT == DiT at init and warm start, gate tables and
their cache, shared timesteps, CFG, DTR masks, auxiliary loss. CPU, tiny sizes, backend="torch"."""
import copy

import pytest
import torch

from switch_dit.models import DTR, MODELS, DiT, SwitchDiT, create_model, dtr_channel_masks
from switch_dit.models.registry import SIZES as REGISTRY_SIZES
from switch_dit.prior import diffusion_prior_loss

SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# A tiny model: depth 2, D = 32, 4 heads, 8x8 input with 3 channels, 5 classes, T = 20 timesteps.
TINY = dict(input_size=8, in_channels=3, num_classes=5, depth=2, hidden_size=32, num_heads=4)
T_TINY = 20


def tiny(name="SwitchDiT-S/2", **kw):
    opts = dict(TINY, num_timesteps=T_TINY, backend="torch")
    opts.update(kw)
    return create_model(name, **opts)


def randomize_(model, scale=0.3):
    """Make every parameter (zero-initialised adaLN/output layers included) nonzero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".moe." not in name and name != "pos_embed":
                p.add_(scale * torch.randn_like(p))
    return model


def inputs(batch=4, channels=3, size=8, steps=T_TINY, classes=5, dtype=torch.float32):
    x = torch.randn(batch, channels, size, size, dtype=dtype)
    t = torch.randint(0, steps, (batch,))
    y = torch.randint(0, classes, (batch,))
    return x, t, y


def test_registry_names_and_configs():
    expected = {f"{fam}-{s}/{p}" for fam in ("DiT", "SwitchDiT", "DTR") for s in SIZES
                for p in (2, 4, 8)}
    assert set(MODELS) == expected
    for name in sorted(MODELS):
        family, rest = name.split("-")
        size, patch = rest.split("/")
        with torch.device("meta"):  # depth 1: the per-entry config without allocating it
            m = create_model(name, depth=1, input_size=32)
        depth, hidden, heads = SIZES[size]
        assert (m.hidden_size, m.num_heads, m.patch_size, m.depth) == (hidden, heads, int(patch), 1)
        assert type(m) is {"DiT": DiT, "SwitchDiT": SwitchDiT, "DTR": DTR}[family]
    assert REGISTRY_SIZES == SIZES  # the depths (not built above: 28 blocks cost time)
    with torch.device("meta"):
        sw = create_model("SwitchDiT-S/2")
    assert (sw.depth, sw.num_experts, sw.k, sw.learn_sigma, sw.input_size, sw.in_channels,
            sw.num_classes, sw.num_timesteps, sw.prior_loss_weight) == \
        (12, 3, 2, True, 32, 4, 1000, 1000, 1.0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shape_every_entry(name):
    # Each entry's own patch size and head count; depth 1 and D = 4 * heads keep it tiny.
    size, patch = name.split("-")[1].split("/")
    heads = SIZES[size][2]
    input_size = 2 * int(patch)  # a 2 x 2 token grid
    model = create_model(name, input_size=input_size, in_channels=3, num_classes=5, depth=1,
                         hidden_size=4 * heads, num_timesteps=T_TINY, backend="torch")
    x, t, y = inputs(batch=3, size=input_size)  # odd batch
    for train in (True, False):
        model.train(train)
        out = model(x, t, y)
        assert isinstance(out, torch.Tensor) and out.shape == (3, 6, input_size, input_size)
    assert model.out_channels == 6 and model.learn_sigma


@pytest.mark.parametrize("name", ["DiT-S/4", "SwitchDiT-S/4", "DTR-S/4"])
def test_output_shape_without_learned_sigma(name):
    model = tiny(name, learn_sigma=False)
    x, t, y = inputs(batch=1)  # batch of one
    assert model.out_channels == 3 and model(x, t, y).shape == (1, 3, 8, 8)


def test_dit_xl2_parameter_count():
    with torch.device("meta"):
        model = create_model("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000,
                             learn_sigma=True)
        assert model(torch.zeros(2, 4, 32, 32), torch.zeros(2, dtype=torch.long),
                     torch.zeros(2, dtype=torch.long)).shape == (2, 8, 32, 32)
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    # Switch-DiT adds per block E D^2 + E D expert weights and a D -> E gate.
    with torch.device("meta"):
        switch = create_model("SwitchDiT-XL/2")
    d, e = 1152, 3
    extra = 28 * (e * d * d + e * d + d * e + e)
    assert sum(p.numel() for p in switch.parameters()) == 675_129_632 + extra


def test_switch_dit_equals_dit_at_init_and_warm_start():
    torch.manual_seed(1)
    dit = randomize_(create_model("DiT-S/2", **TINY)).double()
    switch = tiny().double()
    assert all((b.moe.weight == 0).all() and (b.moe.bias == 0).all() for b in switch.blocks)
    missing, unexpected = switch.load_state_dict(dit.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".moe." in key for key in missing)
    assert set(dit.state_dict()) | set(missing) == set(switch.state_dict())
    x, t, y = inputs(dtype=torch.float64)
    for train in (False, True):
        dit.train(train)
        switch.train(train)
        torch.manual_seed(2)  # same label dropout in both
        ref = dit(x, t, y)
        torch.manual_seed(2)
        out = switch(x, t, y)
        assert ref.abs().max() > 0.1  # not the trivial all-zero output of a fresh DiT
        # The gate table embeds all T timesteps in one GEMM, DiT only the batch's: float64 noise.
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    with torch.no_grad():
        for block in switch.blocks:
            block.moe.weight.normal_(std=0.3)
            block.moe.bias.normal_(std=0.3)
    switch.eval()
    dit.eval()
    assert (switch(x, t, y) - dit(x, t, y)).abs().max() > 1e-2


def test_block_form_equals_official():
    """forward_routed(x, r) == official: h(r) + (1 - m) * x with r = x * m."""
    torch.manual_seed(3)
    model = randomize_(tiny("DiT-S/2"))
    block = model.blocks[0]
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    c = torch.randn(2, 32, dtype=torch.float64)
    m = 1 + 0.5 * torch.randn(2, 1, 32, dtype=torch.float64)
    block.double()
    official = block(x * m, c) + (1 - m) * x
    torch.testing.assert_close(block.forward_routed(x, x * m, c), official, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["DiT-S/2", "SwitchDiT-S/2", "DTR-S/2"])
def test_shared_timestep_forms_match_per_sample(name):
    torch.manual_seed(4)
    model = randomize_(tiny(name)).eval().double()  # float64: GEMMs of 1 vs 4 rows round apart
    if isinstance(model, SwitchDiT):
        with torch.no_grad():
            for block in model.blocks:
                block.moe.weight.normal_(std=0.2)
    x, _, y = inputs(dtype=torch.float64)
    per_sample = model(x, torch.full((4,), 7), y)
    for shared in (7, torch.tensor(7), torch.tensor([7])):
        torch.testing.assert_close(model(x, shared, y), per_sample, rtol=1e-10, atol=1e-12)


def test_gate_table_batched_equals_per_block_route_and_cache():
    torch.manual_seed(5)
    model = randomize_(tiny()).eval()
    tables = model.compute_gate_tables()
    assert tables.probs.shape == (T_TINY, 2, 3) and tables.probs.dtype == torch.float32
    for i, block in enumerate(model.blocks):
        routing = block.moe.route(tables.t_emb)
        torch.testing.assert_close(tables.probs[:, i], routing.probs)
        assert torch.equal(tables.topk_ids[:, i], routing.topk_ids)
    with torch.no_grad():
        first = model.gate_tables()
        assert model.gate_tables() is first  # cached while parameters are unchanged
        model.blocks[1].moe.gate[1].weight.add_(1.0)  # bumps _version
        second = model.gate_tables()
        assert second is not first and not torch.equal(second.probs, first.probs)
        model.t_embedder.mlp[0].bias.sub_(0.5)
        assert model.gate_tables() is not second
    assert model.gate_tables() is not model.gate_tables()  # grad enabled: fresh each time
    table = model.expert_routing_table()
    assert table.shape == (T_TINY, 2, 3) and not table.requires_grad
    torch.testing.assert_close(table.sum(-1), torch.ones(T_TINY, 2))


def test_sampling_reuses_cache_and_optimizer_step_invalidates_it():
    torch.manual_seed(6)
    model = randomize_(tiny())
    x, t, y = inputs()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        model(x, t, y)
        cached = model._scratch.cache
        model(x, t, y)
        assert model._scratch.cache is cached
        assert model._scratch.pending_match is None  # no prior loss follows a no-grad forward
    loss = model(x, t, y).square().mean() + model.auxiliary_loss(t)
    loss.backward()
    opt.step()
    with torch.no_grad():
        model(x, t, y)
        assert model._scratch.cache is not cached
        torch.testing.assert_close(model._scratch.cache.probs, model.compute_gate_tables().probs)


def test_auxiliary_loss_gradients_reach_only_gate_and_timestep_embedder():
    torch.manual_seed(7)
    model = randomize_(tiny(prior_loss_weight=0.5)).train()
    x, t, y = inputs()
    model(x, t, y)
    aux = model.auxiliary_loss(t)
    assert aux.dim() == 0 and aux.item() > 0
    aux.backward()
    for name, p in model.named_parameters():
        reached = p.grad is not None and p.grad.abs().sum() > 0
        assert reached == (".moe.gate." in name or name.startswith("t_embedder.")), name
    # lambda scales it; same matching (same generator) -> exactly half of the unit-weight loss.
    model.prior_loss_weight = 1.0
    g = torch.Generator().manual_seed(0)
    full = model.auxiliary_loss(t, generator=g)
    model.prior_loss_weight = 0.5
    torch.testing.assert_close(model.auxiliary_loss(t, generator=g.manual_seed(0)), full / 2)
    # The forward queued the matching of its gate table; the loss equals the one matched anew.
    assert model._scratch.pending_match is not None
    fresh = diffusion_prior_loss(model._scratch.last_probs, t, model.prior_mask, model.k, weight=0.5,
                                 generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(model.auxiliary_loss(t, generator=g.manual_seed(5)), fresh,
                               rtol=0, atol=0)
    model.prior_loss_weight = 0.0
    assert model.auxiliary_loss(t) is None
    for name in ("DiT-S/2", "DTR-S/2"):
        assert tiny(name).auxiliary_loss(t) is None


def test_moe_recompute_reaches_every_layer_and_changes_nothing_computed():
    torch.manual_seed(8)
    lean = randomize_(tiny(moe_recompute=True))
    kept = tiny()
    kept.load_state_dict(lean.state_dict())
    assert all(b.moe.recompute for b in lean.blocks) and not any(b.moe.recompute for b in kept.blocks)
    x, t, y = inputs()
    torch.testing.assert_close(lean(x, t, y), kept(x, t, y), rtol=0, atol=0)


def test_deepcopy_after_training_forward():
    model = tiny()
    x, t, y = inputs()
    model(x, t, y).mean().backward()
    ema = copy.deepcopy(model)  # must not try to copy the gate table's autograd graph
    with torch.no_grad():
        torch.testing.assert_close(ema.eval()(x, t, y), model.eval()(x, t, y))


def test_forward_with_cfg():
    torch.manual_seed(8)
    model = randomize_(tiny("SwitchDiT-S/2", class_dropout_prob=0.1)).eval().double()
    x, t, y = inputs(dtype=torch.float64)
    y_cfg = torch.cat([y[:2], torch.full((2,), 5)])  # uncond half uses the null label
    out = model.forward_with_cfg(x, t[0], y_cfg, cfg_scale=3.0)
    assert out.shape == (4, 6, 8, 8)
    cond = model(x[:2], t[0], y[:2])
    uncond = model(x[:2], t[0], torch.full((2,), 5))
    guided = uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3])  # all 3 channels guided
    torch.testing.assert_close(out[:2, :3], guided, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[2:, :3], guided, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[:2, 3:], cond[:, 3:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.forward_with_cfg(x, t[0], y_cfg, 1.0)[:2], cond,
                               rtol=1e-10, atol=1e-12)


def test_dtr_masks_and_forward():
    masks = dtr_channel_masks(40, 7, alpha=4.0, beta=0.8)  # D = 40: 32 active channels
    assert masks.shape == (7, 40) and (masks.sum(1) == 32).all()
    assert masks[0, :32].all() and masks[-1, -32:].all()
    starts = masks.argmax(1)
    assert (starts[1:] >= starts[:-1]).all()
    torch.manual_seed(9)
    dit = randomize_(create_model("DiT-S/2", **TINY)).eval()
    dtr_all = tiny("DTR-S/2", dtr_beta=1.0).eval()  # every channel active: DiT exactly
    dtr = tiny("DTR-S/2").eval()
    for m in (dtr_all, dtr):
        m.load_state_dict(dit.state_dict(), strict=True)  # same keys: masks are not persistent
    x, t, y = inputs()
    torch.testing.assert_close(dtr_all(x, t, y), dit(x, t, y), rtol=0, atol=0)
    assert (dtr(x, t, y) - dit(x, t, y)).abs().max() > 1e-3


def test_bad_arguments():
    model = tiny()
    x, t, y = inputs()
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :2], t, y)
    with pytest.raises(TypeError, match="integer"):
        model(x, t.float(), y)
    with pytest.raises(ValueError, match="t must be"):
        model(x, t[:3], y)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("DiT-M/2")
    with pytest.raises(TypeError, match="unknown model option"):
        create_model("DiT-S/2", num_expert=3)
    with pytest.raises(ValueError, match="k must be"):
        create_model("SwitchDiT-S/2", k=4, **TINY)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        create_model("DiT-S/4", input_size=6)
    # options of another family are accepted and ignored; None keeps the default
    assert create_model("DiT-S/2", num_experts=5, k=None, dtr_beta=0.5, depth=None,
                        **{k: v for k, v in TINY.items() if k != "depth"}).depth == 12


@pytest.mark.gpu
def test_gpu_hot_paths_do_not_sync_and_bf16_autocast():
    """Sampling (shared t, cached gates) and a whole training step (forward, prior loss with its
    matching, backward, AdamW) run without a synchronising CUDA call after the warm-up."""
    from switch_dit.diffusion import create_diffusion

    device = torch.device("cuda")
    torch.manual_seed(10)
    model = randomize_(create_model("SwitchDiT-S/2", input_size=16, in_channels=4, num_classes=10,
                                    depth=2, backend="auto")).to(device)
    diffusion = create_diffusion(loss_weighting="uw")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(8, 4, 16, 16, device=device)
    y = torch.randint(0, 10, (8,), device=device)
    shared_t = torch.tensor(5, device=device)

    def sample_step():
        model.eval()
        with torch.no_grad():
            return model.forward_with_cfg(x, shared_t, y, 2.0)

    def train_step():
        model.train()
        t = diffusion.sample_timesteps(8, device)
        losses = diffusion.training_losses(model, x, t, model_kwargs=dict(y=y))
        aux = model.auxiliary_loss(t)  # waits for the matching's cost copy only
        opt.zero_grad(set_to_none=True)
        (losses["loss"].float().mean() + aux.float()).backward()
        opt.step()
        return losses, aux

    with torch.autocast("cuda", dtype=torch.bfloat16):
        sample_step(), train_step()  # warm-up: kernels, gate cache, per-device tables, AdamW state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = sample_step()
            losses, aux = train_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert out.shape == (8, 8, 16, 16) and torch.isfinite(out.float()).all()
    assert torch.isfinite(losses["loss"]).all() and torch.isfinite(aux) and aux > 0
    assert model.blocks[0].moe.gate[1].weight.grad.abs().sum() > 0
