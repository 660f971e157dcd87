"""Command lines: bad arguments fail with a message (exit code 2), good ones resolve as documented."""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

import pytest
import torch

from _train_helpers import one_thread  # noqa: F401  (fixture)
from _train_helpers import tiny_config
from switch_dit.train import build_parser, resolve_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _fails(main, argv, capsys, *needles):
    """main(argv) exits with code 2 and one "prog: error: ..." line that holds every needle."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    message = err.strip().splitlines()[-1]
    assert ": error: " in message, err
    for n in needles:
        assert n in message, err
    return message


@pytest.mark.parametrize("argv,needles", [
    (["--preset", "imagenet"], ["--preset", "invalid choice"]),
    (["--max-steps", "0"], ["--max-steps", "must be >= 1"]),
    (["--max-steps", "ten"], ["--max-steps", "invalid int"]),
    (["--backend", "cuda-magic"], ["--backend", "invalid choice"]),
    (["--lr", "-1"], ["--lr", "must be > 0"]),
    (["--lr", "inf"], ["--lr", "finite"]),
    (["--grad-clip", "nan"], ["--grad-clip", "finite"]),
    (["--grad-clip", "-0.5"], ["--grad-clip", ">= 0"]),
    (["--weight-decay=-inf"], ["--weight-decay", "finite"]),
    (["--ema-decay", "1.5"], ["--ema-decay", "< 1"]),
    (["--ema-decay", "1"], ["--ema-decay", "< 1"]),
    (["--seed", "-1"], ["--seed", ">= 0"]),
    (["--seed", str(2**40)], ["--seed", "<="]),
    (["--model", "SwitchDiT-M/3"], ["--model", "SwitchDiT-M/3", "{DiT,SwitchDiT,DTR}"]),
    (["--loss-weighting", "bogus"], ["--loss-weighting", "invalid choice", "min_snr"]),
    (["--noise-schedule", "bogus"], ["--noise-schedule", "invalid choice", "cosine"]),
    (["--data", "folder", "--data-path", "/nonexistent/images"], ["--data-path",
                                                                   "does not exist"]),
    (["--global-batch-size", "4096"], ["1797 items", "--global-batch-size"]),
    (["--num-heads", "5"], ["SwitchDiT-S/4", "divisible by num_heads"]),
    (["--k", "5"], ["k must be <= num_experts"]),
    (["--diffusion-steps", "10"], ["diffusion_steps"]),
    (["--data", "folder"], ["data_path", "--data-path"]),
    (["--precision", "fp8"], ["--precision", "invalid choice"]),
    (["--resume", "/nonexistent/ck.pt"], ["--resume", "no checkpoint there"]),
    (["--no-such-flag"], ["unrecognized arguments"]),
])
def test_train_bad_arguments(argv, needles, capsys, tmp_path):
    from switch_dit.train import main

    results = tmp_path / "never-written"
    _fails(main, ["--results-dir", str(results)] + argv, capsys, *needles)
    assert not results.exists()  # a refused run leaves no half-made results folder


def test_train_results_dir_that_is_a_file_or_unwritable(tmp_path, capsys):
    from switch_dit.train import main

    a_file = tmp_path / "file"
    a_file.write_text("x")
    _fails(main, ["--results-dir", str(a_file)], capsys, "--results-dir", "is a file")
    _fails(main, ["--results-dir", str(a_file / "run")], capsys, "cannot be created",
           "is a file")
    if os.geteuid() != 0:  # root writes through any permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            _fails(main, ["--results-dir", str(ro / "run")], capsys, "not writable")
        finally:
            ro.chmod(0o755)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_device_cuda_without_cuda_is_a_usage_error(tmp_path, capsys):
    from switch_dit.demo import main as demo_main  # noqa: F401  (imports cleanly)
    from switch_dit.evaluate import main as evaluate_main
    from switch_dit.sample import main as sample_main
    from switch_dit.train import main as train_main

    _fails(train_main, ["--results-dir", str(tmp_path / "r"), "--device", "cuda"], capsys,
           "--device cuda", "CUDA is not available")
    _fails(sample_main, ["--checkpoint", "x", "--out", str(tmp_path / "g.png"), "--device", "cuda"],
           capsys, "--device cuda")
    _fails(evaluate_main, ["--checkpoint", "x", "--device", "cuda"], capsys, "--device cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_backend_triton_without_cuda_is_a_usage_error(tmp_path):
    # The tests run with TRITON_INTERPRET=1 (conftest), which lets Triton run on the CPU; a user's
    # shell does not have it, so the command runs in a subprocess without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "switch_dit.train", "--backend", "triton",
                           "--results-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "error: --backend triton" in last and "CUDA" in last, proc.stderr
    assert not (tmp_path / "r").exists()


def test_dataset_smaller_than_the_batch_names_the_flag_and_writes_nothing(tmp_path):
    from switch_dit.train import train

    cfg = tiny_config(tmp_path / "run", global_batch_size=2048)
    with pytest.raises(ValueError, match="--global-batch-size"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


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
           capsys, "--num-sampling-steps", "must be >= 1")
    for scale, why in (("0.5", ">= 1"), ("nan", "finite"), ("inf", "finite")):
        _fails(sample_main, ["--checkpoint", str(bad), "--out", "g.png", "--cfg-scale", scale],
               capsys, "--cfg-scale", why)
        _fails(evaluate_main, ["--checkpoint", str(bad), "--cfg-scale", scale], capsys,
               "--cfg-scale", why)
    # outputs are checked before the checkpoint is even read
    _fails(sample_main, ["--checkpoint", str(bad), "--out", str(tmp_path)], capsys,
           "--out", "is a folder")
    _fails(sample_main, ["--checkpoint", str(bad), "--out", str(bad / "g.png")], capsys,
           "--out", "cannot be written")
    _fails(sample_main, ["--checkpoint", str(bad), "--npz", str(tmp_path), "--num-samples", "2"],
           capsys, "--npz", "is a folder")
    _fails(evaluate_main, ["--checkpoint", str(bad), "--out", str(tmp_path)], capsys,
           "--out", "is a folder")
    _fails(evaluate_main, ["--checkpoint", str(bad)], capsys, "corrupt or truncated")
    _fails(evaluate_main, ["--checkpoint", str(tmp_path)], capsys, "latest.pt", "does not exist")
    _fails(evaluate_main, ["--npz", str(bad)], capsys, "--npz", "not a readable .npz")
    _fails(evaluate_main, ["--npz", str(bad), "--real-dir", str(tmp_path / "none")], capsys,
           "--real-dir", "is not a folder")
    _fails(evaluate_main, ["--npz", str(bad), "--num-samples", "1"], capsys, "--num-samples",
           ">= 2")
    _fails(evaluate_main, [], capsys, "one of the arguments --checkpoint --npz is required")
    _fails(evaluate_main, ["--npz", str(tmp_path / "none.npz")], capsys, "does not exist")
    _fails(evaluate_main, ["--npz", "a", "--checkpoint", "b"], capsys, "not allowed with")


def test_encode_latents_without_vae_fails_clearly(tmp_path, capsys):
    from switch_dit.encode_latents import main

    _fails(main, ["--data-path", str(tmp_path), "--vae", str(tmp_path / "vae"), "--out",
                  str(tmp_path / "o")], capsys, "nothing is downloaded")
    _fails(main, ["--data-path", str(tmp_path), "--vae", "v", "--out", "o", "--image-size", "100"],
           capsys, "multiple of 8")


def test_sample_and_evaluate_checks_that_need_the_checkpoint(tmp_path, capsys):
    from switch_dit.evaluate import main as evaluate_main
    from switch_dit.sample import main as sample_main
    from switch_dit.train import train

    train(tiny_config(tmp_path / "dit", model="DiT-S/2", max_steps=1, ckpt_every=1),
          progress=False)
    grid = tmp_path / "grid.png"
    # --expert-map on a model without timestep routing: refused before the grid is sampled
    _fails(sample_main, ["--checkpoint", str(tmp_path / "dit"), "--out", str(grid),
                         "--expert-map", str(tmp_path / "m.png")], capsys,
           "--expert-map", "no timestep routing")
    assert not grid.exists()
    # the tiny run has 100 diffusion steps
    _fails(sample_main, ["--checkpoint", str(tmp_path / "dit"), "--out", str(grid),
                         "--num-sampling-steps", "101"], capsys, "at most")
    _fails(evaluate_main, ["--checkpoint", str(tmp_path / "dit"), "--num-sampling-steps", "101"],
           capsys, "at most")
    # np.savez appends ".npz": the report names the file that exists
    assert sample_main(["--checkpoint", str(tmp_path / "dit"), "--npz", str(tmp_path / "s"),
                        "--num-samples", "2", "--num-sampling-steps", "2", "--quiet"]) == 0
    assert '"npz": "%s.npz"' % (tmp_path / "s") in capsys.readouterr().out
    assert (tmp_path / "s.npz").is_file()
    # evaluate takes a results folder, as sample does
    out = tmp_path / "m.json"
    assert evaluate_main(["--checkpoint", str(tmp_path / "dit"), "--num-samples", "4",
                          "--num-sampling-steps", "2", "--out", str(out), "--quiet"]) == 0
    assert '"num_samples": 4' in out.read_text()


def test_generate_progress_bar_changes_nothing_but_stderr(tmp_path, capsys):
    from switch_dit.sample import generate, load_for_sampling
    from switch_dit.train import train

    train(tiny_config(tmp_path / "run", max_steps=1, ckpt_every=1), progress=False)
    ld = load_for_sampling(str(tmp_path / "run" / "latest.pt"))
    capsys.readouterr()
    quiet = generate(ld, [0, 1, 2], num_sampling_steps=3, batch_size=2, seed=1)
    assert capsys.readouterr().err == ""
    shown = generate(ld, [0, 1, 2], num_sampling_steps=3, batch_size=2, seed=1, progress=True)
    err = capsys.readouterr().err
    assert torch.equal(quiet, shown)
    assert "sampling 3 (ddim, 3 steps)" in err and "6/6" in err  # 2 batches x 3 steps


def test_progress_is_off_without_a_terminal(monkeypatch):
    from switch_dit import cli

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not cli.show_progress()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert cli.show_progress() and not cli.show_progress(quiet=True)


def test_float_types_refuse_non_finite_and_out_of_range_values():
    from switch_dit import cli

    unit = cli.float_in_range(0.0, 1.0, high_inclusive=False)
    assert unit("0") == 0.0 and unit("0.5") == 0.5 and unit("1e-3") == 1e-3
    for text in ("nan", "NaN", "inf", "-inf", "1", "1.5", "-0.1", "abc", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            unit(text)
    anything = cli.float_in_range()
    assert anything("-3.5") == -3.5
    for text in ("nan", "inf", "-Infinity"):
        with pytest.raises(argparse.ArgumentTypeError, match="finite"):
            anything(text)
    assert cli.positive_float("1e-4") == 1e-4
    with pytest.raises(argparse.ArgumentTypeError, match="> 0"):
        cli.positive_float("0")
    assert cli.cfg_scale_float("1") == 1.0
    assert cli.seed_int("0") == 0 and cli.seed_int(str(cli.MAX_SEED)) == cli.MAX_SEED
    for text in ("-1", str(cli.MAX_SEED + 1), "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.seed_int(text)
    assert not math.isnan(cli.non_negative_float("0"))


def test_output_path_problems(tmp_path):
    from switch_dit import cli

    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    assert cli.writable_file_problem(str(tmp_path / "new" / "deeper" / "g.png")) is None
    assert cli.writable_file_problem(str(a_file)) is None  # overwriting a file is fine
    assert "is a folder" in cli.writable_file_problem(str(tmp_path))
    assert "is a folder" in cli.writable_file_problem(str(tmp_path / "sub") + os.sep)
    assert "is a file" in cli.writable_file_problem(str(a_file / "g.png"))
    assert cli.writable_dir_problem(str(tmp_path / "a" / "b")) is None
    assert cli.writable_dir_problem(str(tmp_path)) is None
    assert "is a file" in cli.writable_dir_problem(str(a_file))


def test_read_only_results_dir_is_one_line_even_as_root(tmp_path, capsys, monkeypatch):
    # Root writes through permission bits, so the refusal is checked with os.access answering
    # as it does for an ordinary user on a read-only folder.
    from switch_dit import cli
    from switch_dit.train import main

    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False if os.path.abspath(path) ==
                        str(read_only) else real_access(path, mode))
    _fails(main, ["--results-dir", str(read_only)], capsys, "--results-dir", "is not writable")
    _fails(main, ["--results-dir", str(read_only / "run")], capsys, "cannot be created",
           "is not writable")
    assert cli.writable_file_problem(str(read_only / "g.png")).startswith("cannot be written")
    assert list(read_only.iterdir()) == []


def test_stale_checkpoint_temp_files_are_removed_on_the_next_start(tmp_path):
    from switch_dit import checkpoint as ckpt
    from switch_dit.train import train

    run = tmp_path / "run"
    train(tiny_config(run, max_steps=1, ckpt_every=1), progress=False)
    # what a kill -9 during atomic_torch_save / the latest.pt link leaves behind
    stale = [run / ".ckpt_0000002.pt.k3j_x9.tmp", run / ".latest.pt.4242.link",
             run / ".latest.pt.ab12.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    keep = [run / "notes.tmp", run / ".ckpt_notes.txt", run / "ckpt_0000001.pt", run / "latest.pt"]
    keep[0].write_text("user file")
    keep[1].write_text("user file")
    train(tiny_config(run, max_steps=2, ckpt_every=1), resume=str(run / "latest.pt"),
          progress=False)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)
    assert ckpt.remove_stale_temp_files(str(run)) == []
    assert ckpt.remove_stale_temp_files(str(tmp_path / "missing")) == []


def test_demo_bad_arguments(tmp_path, capsys):
    from switch_dit.demo import main

    _fails(main, ["--model", "SwitchDiT-S/3"], capsys, "--model", "SwitchDiT-S/3")
    _fails(main, ["--max-steps", "0"], capsys, "--max-steps", ">= 1")
    _fails(main, ["--seed", "nan"], capsys, "--seed", "invalid int")
    a_file = tmp_path / "f"
    a_file.write_text("x")
    _fails(main, ["--results-dir", str(a_file)], capsys, "--results-dir", "is a file")


def test_help_tells_the_truth(capsys):
    from switch_dit.config import get_preset
    from switch_dit.demo import main as demo_main
    from switch_dit.train import main as train_main

    with pytest.raises(SystemExit):
        train_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    assert "(default: None)" not in out and "(default: False)" not in out
    digits = get_preset("digits")
    assert f"sized-down {digits.model}" in out and "SwitchDiT-S/2 for CPUs" not in out
    assert "[presets: digits: 2000; latent256-*: 400000]" in out  # --max-steps
    assert "[presets: digits: 0.002; latent256-*: 0.0001]" in out  # --lr
    assert "{constant,min_snr,uw}" in out and "{linear,cosine}" in out
    with pytest.raises(SystemExit):
        demo_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"the digits preset's {digits.model}" in out and "S/2" not in out


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


def test_moe_layer_prints_each_row_once(capsys):
    from benchmarks import moe_layer

    rows = moe_layer.main(["--quick", "--device", "cpu", "--impls", "reference,torch_grouped_mm",
                           "--cases", "switch", "--modes", "forward", "--no-check"])
    captured = capsys.readouterr()
    assert len(rows) == 2 * len(moe_layer.QUICK_SWITCH_CASES)
    for case in moe_layer.QUICK_SWITCH_CASES:  # once in the table (stdout), once as progress
        assert captured.out.count(case.name) == 2, captured.out  # 2 impls
        assert captured.err.count(case.name) == 2, captured.err
    assert f"[{len(rows)}/{len(rows)}]" in captured.err


def test_plot_without_gpu_results_explains_itself(tmp_path, capsys):
    import json

    from benchmarks import plot

    cpu_only = tmp_path / "saved_activations_cpu.json"
    cpu_only.write_text(json.dumps({"benchmark": "saved_activations", "env": {}, "config": {},
                                    "rows": [{"model": "x", "bytes": 1}]}))
    assert plot.main([str(cpu_only), "--tables"]) == []
    assert "make bench-gpu" in capsys.readouterr().out
    _fails(plot.main, [str(tmp_path / "missing.json")], capsys, "no such file")


def test_make_installs_once_and_again_when_setup_changes(tmp_path):
    # `make -n` prints the recipes it would run: with a fresh stamp the editable install is not
    # among them; with a stamp older than setup.py (or none) it is.
    import shutil

    if shutil.which("make") is None:
        pytest.skip("no make")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)

    def dry_run():
        return subprocess.run(["make", "-n", "install", f"VENV={venv}"], cwd=root,
                              capture_output=True, text=True, timeout=60, check=True).stdout

    first = dry_run()
    assert "pip install" in first and "-e \".[test]\"" in first
    stamp = [line.split()[-1] for line in first.splitlines() if line.startswith("touch ")]
    assert len(stamp) == 1 and stamp[0].startswith(str(venv))
    open(stamp[0], "w").close()
    again = dry_run()
    assert "-e \".[test]\"" not in again and "touch" not in again
    os.utime(stamp[0], (0, 0))  # older than setup.py: install again
    assert "-e \".[test]\"" in dry_run()
