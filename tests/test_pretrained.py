"""Pretrained weights: official Switch-DiT / DTR / DiT layouts in, this project's checkpoints in,
safetensors export out, train --init-from. State dicts in the official layouts are built here from
the key names of facebookresearch/DiT and byeongjun-park/Switch-DiT, DTR (models.py, MoE.py,
taskrouting.py); their fixed tables with the official formula written out below."""
import json
import re
import sys
import types

import numpy as np
import pytest
import torch

from switch_dit.models import create_model, load_pretrained, read_state_dict

T = 20
TINY = dict(input_size=8, in_channels=3, num_classes=5, depth=2, hidden_size=32, num_heads=4,
            num_timesteps=T, backend="torch")


def official_mask_table(unit_count, task_count, alpha, beta):
    """The official create_mask_tasks: a window of int(unit_count * beta) ones per task."""
    table = torch.zeros(task_count, unit_count)
    filled = int(unit_count * beta)
    index = ((np.linspace(0, 1, task_count) ** alpha) * (unit_count - filled)).round().astype(np.int64)
    for task in range(task_count):
        table[task, index[task]:index[task] + filled] = 1.0
    return table


def randomized(name, seed=0, **kw):
    torch.manual_seed(seed)
    model = create_model(name, **{**TINY, **kw})
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname != "pos_embed":
                p.add_(0.2 * torch.randn_like(p))   # zero-initialised layers (adaLN, experts) too
    return model.eval()


def to_official(model, kind):
    """This project's state dict -> the official Switch-DiT ("DMoE") or DTR layout."""
    out = {}
    for k, v in model.state_dict().items():
        m = re.match(r"blocks\.(\d+)\.moe\.(weight|bias|gate\.1\.weight|gate\.1\.bias)$", k)
        if m:
            i, what = m.groups()
            what = {"weight": "experts.w", "bias": "experts.b"}.get(what, what.replace("gate", "f_gate"))
            out[f"routers.{i}.{what}"] = v.clone()
        else:
            out[k] = v.clone()
    depth, d = model.depth, model.hidden_size
    if kind == "switch":
        out["full_time"] = torch.arange(T)
        out["prior._unit_mapping"] = official_mask_table(depth * model.num_experts, T, 4.0,
                                                         model.k / model.num_experts)
    else:  # DTR: every router holds the same table
        for i in range(depth):
            out[f"routers.{i}._unit_mapping"] = official_mask_table(d, T, 4.0, 0.8)
    return out


def outputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.randint(0, T, (4,), generator=g)
    y = torch.randint(0, 5, (4,), generator=g)
    with torch.no_grad():
        return model(x, t, y)


@pytest.fixture
def unimportable_config():
    """An object of a class whose module disappears before loading (an OmegaConf config)."""
    mod = types.ModuleType("fake_omegaconf_for_test")

    class DictConfig:
        def __init__(self, d):
            self.d = d

    DictConfig.__module__ = mod.__name__
    DictConfig.__qualname__ = "DictConfig"
    mod.DictConfig = DictConfig
    sys.modules[mod.__name__] = mod
    yield DictConfig({"routing": {"name": "DMoE"}})
    sys.modules.pop(mod.__name__, None)


@pytest.mark.parametrize("kind,name", [("switch", "SwitchDiT-S/2"), ("dtr", "DTR-S/2")])
def test_official_training_checkpoint(tmp_path, kind, name, unimportable_config):
    src = randomized(name, seed=0)
    ema = randomized(name, seed=5)
    path = tmp_path / "0400000.pt"
    torch.save({"model": to_official(src, kind), "ema": {"module." + k: v for k, v in
                                                         to_official(ema, kind).items()},
                "opt": {"state": {}}, "config": unimportable_config}, path)
    sys.modules.pop("fake_omegaconf_for_test")            # the config's class is gone now
    dst = create_model(name, **TINY).eval()
    report = load_pretrained(dst, str(path))              # EMA weights by default
    assert "ema" in report["source"] and report["identity_experts"] == []
    assert torch.equal(outputs(dst), outputs(ema))
    load_pretrained(dst, str(path), use_ema=False)
    assert torch.equal(outputs(dst), outputs(src))


def test_official_tables_are_checked(tmp_path):
    src = randomized("SwitchDiT-S/2")
    sd = to_official(src, "switch")
    sd["prior._unit_mapping"] = official_mask_table(6, T, 2.0, 2 / 3)   # another alpha
    dst = create_model("SwitchDiT-S/2", **TINY)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=r"prior\._unit_mapping.*differs"):
        load_pretrained(dst, sd)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())   # untouched
    sd = to_official(src, "switch")
    sd["full_time"] = torch.arange(T + 1)
    with pytest.raises(ValueError, match=r"full_time"):
        load_pretrained(dst, sd)
    dtr = to_official(randomized("DTR-S/2"), "dtr")
    dtr["routers.1._unit_mapping"] = official_mask_table(32, T, 4.0, 0.5)   # another beta
    with pytest.raises(ValueError, match=r"routers\.1\._unit_mapping"):
        load_pretrained(create_model("DTR-S/2", **TINY), dtr)
    with pytest.raises(ValueError, match="DTR's channel masks"):        # DTR weights into DiT
        load_pretrained(create_model("DiT-S/2", **TINY), to_official(randomized("DTR-S/2"), "dtr"))
    with pytest.raises(ValueError, match="full_time"):                   # Switch-DiT into DiT
        load_pretrained(create_model("DiT-S/2", **TINY), to_official(src, "switch"))


def test_dit_state_dict_into_switch_dit_is_dit(tmp_path):
    dit = randomized("DiT-S/2", seed=3)
    path = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save(dit.state_dict(), path)                    # the released format: a raw state dict
    switch = randomized("SwitchDiT-S/2", seed=4)           # nonzero experts before loading
    report = load_pretrained(switch, str(path))
    assert "raw state dict" in report["source"] and len(report["identity_experts"]) == 4
    for blk in switch.blocks:
        assert not blk.moe.weight.any() and not blk.moe.bias.any()
    torch.testing.assert_close(outputs(switch), outputs(dit), rtol=1e-5, atol=1e-6)
    # DiT -> DiT round trip: exact
    other = create_model("DiT-S/2", **TINY).eval()
    load_pretrained(other, str(path))
    assert torch.equal(outputs(other), outputs(dit))


def test_mismatches_name_key_and_shapes():
    dit = randomized("DiT-S/2")
    wide = create_model("DiT-S/2", **{**TINY, "hidden_size": 48})
    with pytest.raises(ValueError, match=r"key 'pos_embed'.*\(1, 16, 32\).*\(1, 16, 48\)"):
        load_pretrained(wide, dit.state_dict())
    sd = dit.state_dict()
    del sd["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2\.bias.*\(32,\).*missing"):
        load_pretrained(create_model("DiT-S/2", **TINY), sd)
    switch = randomized("SwitchDiT-S/2")
    with pytest.raises(ValueError, match=r"blocks\.0\.moe\..*no place in DiT"):
        load_pretrained(create_model("DiT-S/2", **TINY), switch.state_dict())
    partial = switch.state_dict()
    del partial["blocks.1.moe.weight"]                   # some experts but not all: an error
    with pytest.raises(ValueError, match=r"blocks\.1\.moe\.weight.*missing"):
        load_pretrained(create_model("SwitchDiT-S/2", **TINY), partial)
    with pytest.raises(TypeError, match="source"):
        load_pretrained(dit, 3)
    with pytest.raises(FileNotFoundError):
        read_state_dict("/nonexistent/weights.pt")


def test_project_checkpoint_export_and_init_from(tmp_path, capsys):
    from _train_helpers import tiny_config
    from safetensors import safe_open
    from switch_dit import checkpoint as ckpt
    from switch_dit.export import main as export_main
    from switch_dit.train import build_model, train

    cfg = tiny_config(tmp_path / "run", max_steps=2, ckpt_every=2)
    train(cfg, progress=False)
    st = ckpt.load_checkpoint(str(tmp_path / "run" / "latest.pt"))
    model = build_model(cfg)
    load_pretrained(model, str(tmp_path / "run"))          # a results folder: latest.pt, EMA
    assert all(torch.equal(v, st["ema"][k]) for k, v in model.state_dict().items())
    load_pretrained(model, str(tmp_path / "run" / "latest.pt"), use_ema=False)
    assert all(torch.equal(v, st["model"][k]) for k, v in model.state_dict().items())

    out = tmp_path / "model.safetensors"
    assert export_main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["weights"] == "ema" and report["step"] == 2
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert json.loads(meta["config"])["model"] == cfg.model and meta["weights"] == "ema"
        assert set(f.keys()) == set(st["ema"])
    fresh = build_model(cfg)
    load_pretrained(fresh, str(out))
    assert all(torch.equal(v, st["ema"][k]) for k, v in fresh.state_dict().items())
    with pytest.raises(SystemExit) as e:
        export_main(["--checkpoint", str(tmp_path / "none"), "--out", str(out)])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        export_main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "m.pt")])
    assert e.value.code == 2

    # train --init-from a DiT checkpoint: the Switch-DiT run starts from DiT's weights (a vanishing
    # learning rate keeps them after one step) with zero experts, model and EMA alike
    dit_cfg = tiny_config(tmp_path / "dit", model="DiT-S/2", max_steps=2, ckpt_every=2)
    train(dit_cfg, progress=False)
    dit_ema = ckpt.load_checkpoint(str(tmp_path / "dit" / "latest.pt"))["ema"]
    warm = tiny_config(tmp_path / "warm", max_steps=1, ckpt_every=1, lr=1e-30,
                       init_from=str(tmp_path / "dit"))
    train(warm, progress=False)
    st = ckpt.load_checkpoint(str(tmp_path / "warm" / "latest.pt"))
    for which in ("model", "ema"):
        for k, v in st[which].items():
            if ".moe." in k:
                if not k.endswith("gate.1.weight") and not k.endswith("gate.1.bias"):
                    assert v.abs().max() < 1e-20, k
            else:
                torch.testing.assert_close(v, dit_ema[k], rtol=0, atol=1e-20)
    assert st["config"]["init_from"] == str(tmp_path / "dit")


def test_init_from_missing_is_a_usage_error(tmp_path, capsys):
    from switch_dit.train import main as train_main

    with pytest.raises(SystemExit) as e:
        train_main(["--init-from", str(tmp_path / "nothing.pt"), "--results-dir", str(tmp_path / "r")])
    assert e.value.code == 2 and "--init-from" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    # weights that do not fit the preset's model: one usage line naming the key, nothing written
    wrong = tmp_path / "wrong.pt"
    torch.save(create_model("DiT-S/2", **TINY).state_dict(), wrong)
    with pytest.raises(SystemExit) as e:
        train_main(["--init-from", str(wrong), "--results-dir", str(tmp_path / "r"),
                    "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--init-from" in err and "missing from raw state dict" in err
    assert "Traceback" not in err and not (tmp_path / "r").exists()
