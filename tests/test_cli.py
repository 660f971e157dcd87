"""Command lines: bad arguments fail with a message (exit code 2), good ones resolve as documented."""
from __future__ import annotations

import pytest

from _train_helpers import one_thread  # noqa: F401  (fixture)
from _train_helpers import tiny_config
from switch_dit.train import build_parser, resolve_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _fails(main, argv, capsys, *needles):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("argv,needles", [
    (["--preset", "imagenet"], ["--preset", "invalid choice"]),
    (["--max-steps", "0"], ["max_steps", "positive integer"]),
    (["--max-steps", "ten"], ["--max-steps", "invalid int"]),
    (["--backend", "cuda-magic"], ["--backend", "invalid choice"]),
    (["--lr", "-1"], ["lr", "> 0"]),
    (["--ema-decay", "1.5"], ["ema_decay"]),
    (["--data", "folder"], ["data_path", "--data-path"]),
    (["--precision", "fp8"], ["--precision", "invalid choice"]),
    (["--resume", "/nonexistent/ck.pt"], ["--resume", "no checkpoint there"]),
    (["--no-such-flag"], ["unrecognized arguments"]),
])
def test_train_bad_arguments(argv, needles, capsys):
    from switch_dit.train import main

    _fails(main, argv + ["--results-dir", "/tmp/never-written"], capsys, *needles)


def test_train_resolves_presets_and_overrides():
    p = build_parser()
    cfg, resume = resolve_config(p.parse_args([]), p)
    assert cfg.preset == "digits" and cfg.model == "SwitchDiT-S/4" and resume is None
    assert cfg.results_dir == "results/digits-SwitchDiT-S-4"
    assert (cfg.image_size, cfg.in_channels, cfg.num_classes, cfg.data) == (16, 1, 10, "digits")
    cfg, _ = resolve_config(p.parse_args(["--preset", "latent256-XL", "--data-path", "/x",
                                          "--model", "DiT-XL/2", "--seed", "3"]), p)
    assert (cfg.model, cfg.lr, cfg.ema_decay, cfg.global_batch_size, cfg.seed) == \
        ("DiT-XL/2", 1e-4, 0.9999, 256, 3)  # the paper's settings
    assert cfg.in_channels == 4 and cfg.image_size == 32
    assert not cfg.moe_recompute
    cfg, _ = resolve_config(p.parse_args(["--moe-recompute"]), p)
    assert cfg.moe_recompute
    from switch_dit.train import build_model
    assert all(b.moe.recompute for b in build_model(cfg).blocks)


def test_resume_refuses_changes_that_alter_the_run(tmp_path, capsys):
    from switch_dit.train import main, train

    train(tiny_config(tmp_path / "run", max_steps=1, ckpt_every=1), progress=False)
    ck = str(tmp_path / "run" / "latest.pt")
    _fails(main, ["--resume", ck, "--lr", "0.5", "--max-steps", "3"], capsys, "cannot change",
           "lr")
    _fails(main, ["--resume", ck, "--max-steps", "1"], capsys, "already at step 1")
    # a fresh run never writes over an existing one
    _fails(main, ["--results-dir", str(tmp_path / "run")], capsys, "already holds a training run",
           "--resume auto")
    p = build_parser()
    cfg, resume = resolve_config(p.parse_args(["--resume", ck, "--max-steps", "5",
                                               "--moe-recompute"]), p)
    assert resume == ck and cfg.max_steps == 5 and cfg.image_size == 8  # the checkpoint's config
    assert cfg.moe_recompute  # how the same maths runs may change on resume
    assert cfg.results_dir == str(tmp_path / "run")


def test_sample_and_evaluate_bad_arguments(tmp_path, capsys):
    from switch_dit.evaluate import main as evaluate_main
    from switch_dit.sample import main as sample_main

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    _fails(sample_main, ["--checkpoint", str(bad)], capsys, "nothing to do")
    _fails(sample_main, ["--checkpoint", str(bad), "--out", "g.png"], capsys, str(bad),
           "corrupt or truncated")
    _fails(sample_main, ["--checkpoint", str(tmp_path / "missing.pt"), "--out", "g.png"], capsys,
           "does not exist")
    _fails(sample_main, ["--checkpoint", str(bad), "--npz", "s.npz"], capsys, "--num-samples")
    _fails(sample_main, ["--checkpoint", str(bad), "--out", "g.png", "--sampler", "euler"], capsys,
           "invalid choice")
    _fails(sample_main, ["--checkpoint", str(bad), "--out", "g.png", "--num-sampling-steps", "0"],
           capsys, "--num-sampling-steps must be >= 1")
    _fails(evaluate_main, [], capsys, "one of the arguments --checkpoint --npz is required")
    _fails(evaluate_main, ["--npz", str(tmp_path / "none.npz")], capsys, "does not exist")
    _fails(evaluate_main, ["--npz", "a", "--checkpoint", "b"], capsys, "not allowed with")


def test_encode_latents_without_vae_fails_clearly(tmp_path, capsys):
    from switch_dit.encode_latents import main

    _fails(main, ["--data-path", str(tmp_path), "--vae", str(tmp_path / "vae"), "--out",
                  str(tmp_path / "o")], capsys, "nothing is downloaded")
    _fails(main, ["--data-path", str(tmp_path), "--vae", "v", "--out", "o", "--image-size", "100"],
           capsys, "multiple of 8")


def test_help_lists_the_main_flags(capsys):
    # switch_dit.train:main is the console script `switch-dit-train`
    from switch_dit.train import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--preset", "--model", "--max-steps", "--results-dir", "--resume", "--backend",
                 "--seed"):
        assert flag in out
