"""Training: exact resume, 2-process gloo DDP, checkpoint integrity and atomic writes, latents."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from _train_helpers import one_thread  # noqa: F401  (fixture)
from _train_helpers import assert_tree_equal, tiny_config
from switch_dit import checkpoint as ckpt
from switch_dit.train import main as train_main
from switch_dit.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _load(path):
    return ckpt.load_checkpoint(str(path))


def _log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("model,loss_weighting,precision", [
    ("SwitchDiT-S/2", "uw", "fp32"),     # prior loss + learnable loss-weighting params
    ("DiT-S/2", "constant", "fp32"),     # no auxiliary loss
    ("SwitchDiT-S/2", "min_snr", "fp16"),  # autocast + an enabled GradScaler in the checkpoint
])
def test_resume_is_bit_identical(tmp_path, model, loss_weighting, precision):
    # 6 straight steps vs 3 steps, stop, resume to 6: weights, EMA, optimiser, scaler, loss
    # weighting and the logged losses of steps 4-6 must match exactly (mid-epoch resume: the
    # epoch has 112 batches of 16). warmup_steps=4 also crosses the warm-up boundary on resume.
    straight = tiny_config(tmp_path / "a", model, max_steps=6, ckpt_every=3, warmup_steps=4,
                           loss_weighting=loss_weighting, precision=precision)
    train(straight, progress=False)
    first = tiny_config(tmp_path / "b", model, max_steps=3, ckpt_every=3, warmup_steps=4,
                        loss_weighting=loss_weighting, precision=precision)
    train(first, progress=False)
    # A different RNG state in between must not matter: resume restores every generator.
    torch.manual_seed(12345)
    np.random.seed(7)
    resumed = tiny_config(tmp_path / "b", model, max_steps=6, ckpt_every=3, warmup_steps=4,
                          loss_weighting=loss_weighting, precision=precision)
    train(resumed, resume=str(tmp_path / "b" / "latest.pt"), progress=False)

    a, b = _load(tmp_path / "a" / "latest.pt"), _load(tmp_path / "b" / "latest.pt")
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema", "opt", "scaler", "loss_weighting", "rng"):
        assert_tree_equal(a[key], b[key], key)
    if loss_weighting == "uw":
        assert any(v.abs().sum() > 0 for v in a["loss_weighting"].values())  # it did train
    if precision == "fp16":
        assert a["scaler"]["scale"] > 0  # the GradScaler state is saved and restored
    def losses(path):
        return [{k: v for k, v in r.items() if k != "images_per_sec"} for r in _log(path)]
    assert losses(tmp_path / "a" / "log.jsonl") == losses(tmp_path / "b" / "log.jsonl")
    assert [r["step"] for r in _log(tmp_path / "b" / "log.jsonl")] == [1, 2, 3, 4, 5, 6]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from switch_dit import distributed as du

    info = du.init_distributed("cpu")
    try:
        cfg = tiny_config(os.path.join(out_dir, "run"), "SwitchDiT-S/2", max_steps=3,
                          ckpt_every=3, global_batch_size=16, loss_weighting="uw")
        out = train(cfg, info=info, progress=False)
        tr = out["trainer"]
        torch.save({"model": tr.model.state_dict(), "ema": tr.ema.state_dict(),
                    "weighting": tr.weighting.state_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        du.cleanup()


def test_ddp_two_process_gloo_keeps_replicas_identical(tmp_path):
    # Two CPU processes, gloo, a DistributedSampler each (different data per rank), learnable
    # "uw" weighting outside DDP: after 3 steps both replicas hold identical weights.
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert_tree_equal(r0, r1)
    st = _load(tmp_path / "run" / "latest.pt")
    assert st["step"] == 3 and st["world_size"] == 2 and len(st["rng"]) == 2
    assert not torch.equal(st["rng"][0]["torch"], st["rng"][1]["torch"])  # per-rank RNG streams
    assert_tree_equal(st["model"], r0["model"])


# ----- checkpoint integrity and atomic writes --------------------------------------------------

def _small_state(value: float = 7.0):
    return {"model": {"w": torch.full((4096,), value)}, "ema": {}, "step": 1,
            "config": {"model": "x"}}


def test_truncated_checkpoint_gives_clear_error(tmp_path):
    path = tmp_path / "ck.pt"
    ckpt.save_checkpoint(_small_state(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated mid-file
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated") as e:
        ckpt.load_checkpoint(str(path))
    assert str(path) in str(e.value)
    path.write_bytes(b"")  # empty
    with pytest.raises(ckpt.CheckpointError, match="empty"):
        ckpt.load_checkpoint(str(path))


def test_flipped_bytes_inside_a_tensor_are_detected(tmp_path):
    # torch.load itself accepts this file: only the stored digest notices.
    path = tmp_path / "ck.pt"
    ckpt.save_checkpoint(_small_state(7.0), str(path))
    data = bytearray(path.read_bytes())
    pattern = torch.full((4,), 7.0).numpy().tobytes()
    at = bytes(data).find(pattern * 64)
    assert at > 0
    data[at + 100:at + 104] = torch.tensor([8.0]).numpy().tobytes()
    path.write_bytes(bytes(data))
    torch.load(str(path), weights_only=True)  # loads without complaint ...
    with pytest.raises(ckpt.CheckpointError, match="corrupt") as e:  # ... but we refuse it
        ckpt.load_checkpoint(str(path))
    assert str(path) in str(e.value)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    ckpt.save_checkpoint(_small_state(1.0), str(path))
    before = path.read_bytes()

    def exploding_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", exploding_save)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(_small_state(2.0), str(path))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["latest.pt"]  # no temp file left behind
    assert ckpt.load_checkpoint(str(path))["model"]["w"][0] == 1.0


def test_resume_from_corrupt_checkpoint_fails_and_touches_nothing(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", max_steps=2, ckpt_every=1)
    train(cfg, progress=False)
    latest = tmp_path / "run" / "latest.pt"
    step1 = tmp_path / "run" / "ckpt_0000001.pt"
    good = step1.read_bytes()
    data = latest.read_bytes()
    # latest.pt is a hard link of ckpt_0000002.pt: write a truncated copy in its place
    os.unlink(latest)
    latest.write_bytes(data[:1000])
    listing = sorted(os.listdir(tmp_path / "run"))
    with pytest.raises(SystemExit) as e:
        train_main(["--resume", "auto", "--results-dir", str(tmp_path / "run"), "--max-steps", "4",
                    "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "latest.pt" in err and "corrupt or truncated" in err and "Nothing was overwritten" in err
    assert sorted(os.listdir(tmp_path / "run")) == listing
    assert latest.read_bytes() == data[:1000] and step1.read_bytes() == good
    # the older step checkpoint still resumes
    assert train_main(["--resume", str(step1), "--max-steps", "3", "--no-progress"]) == 0
    assert _load(latest)["step"] == 3


def test_checkpoint_contents_and_pruning(tmp_path):
    cfg = tiny_config(tmp_path / "run", max_steps=4, ckpt_every=1, keep_checkpoints=2)
    train(cfg, progress=False)
    names = sorted(os.listdir(tmp_path / "run"))
    assert names == ["ckpt_0000003.pt", "ckpt_0000004.pt", "config.json", "latest.pt", "log.jsonl"]
    st = _load(tmp_path / "run" / "latest.pt")
    assert set(st) >= {"model", "ema", "opt", "scaler", "loss_weighting", "step", "rng", "config",
                       "integrity"}
    assert st["config"]["image_size"] == 8 and st["config"]["model"] == "SwitchDiT-S/2"
    log = _log(tmp_path / "run" / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert set(log[0]) == {"step", "loss", "prior_loss", "lr", "images_per_sec", "grad_norm",
                           "experts_shared", "experts_switching"}  # Switch-DiT's gate statistic
    assert all(r["prior_loss"] > 0 for r in log)  # Switch-DiT's diffusion prior loss is on
    # EMA differs from the raw weights (decay < 1) but tracks them
    w, e = st["model"]["final_layer.linear.weight"], st["ema"]["final_layer.linear.weight"]
    assert not torch.equal(w, e)


def test_train_on_latent_folder(tmp_path):
    # A latent folder as encode_latents writes it (4 channels, 8x8, 3 classes), 2 steps.
    root = tmp_path / "lat"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for s, n in enumerate((20, 13)):
        np.save(root / f"latents_000_{s:05d}.npy",
                torch.randn(n, 4, 8, 8, generator=g).numpy().astype(np.float16))
        np.save(root / f"labels_000_{s:05d}.npy", (np.arange(n) % 3).astype(np.int64))
    (root / "meta.json").write_text(json.dumps({"num_classes": 3, "scale_factor": 0.18215}))
    cfg = tiny_config(tmp_path / "run", data="latents", data_path=str(root), max_steps=2,
                      hflip=True, image_size=32, in_channels=4, num_classes=1000)
    out = train(cfg, progress=False)
    st = _load(out["checkpoint"])
    assert st["config"]["in_channels"] == 4 and st["config"]["num_classes"] == 3
    assert st["config"]["image_size"] == 8  # taken from the latents
