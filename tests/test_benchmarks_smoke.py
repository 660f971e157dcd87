"""Smoke tests of the benchmarks: the baselines compute the right function, `moe_layer --quick` writes
well-formed JSON rows (and survives a failing implementation), `plot` writes PNGs and tables.

Kept to a few seconds: tiny shapes, CPU, float32/float64, no Triton kernels (their correctness is
tested in their own files; the benchmark only has to call them).
"""
import json

import pytest
import torch

from benchmarks import moe_layer, plot
from benchmarks.official_loop import (expert_mlp_grouped_mm, expert_mlp_loop, grouped_mm_unavailable,
                                      switch_modulation_grouped_mm, switch_modulation_loop)
from switch_dit_kernels import reference

# Implementations with no Triton kernel: what the smoke run measures.
SMOKE_IMPLS = ("reference,loop,torch_grouped_mm,switch_modulation_torch,expert_mlp_torch,"
               "dense_same_flops,dense_linear")
ROW_KEYS = {"benchmark", "suite", "case", "impl", "mode", "dtype", "params", "ms", "p20_ms", "p80_ms",
            "flops", "tflops", "peak_mib", "peak_extra_mib", "inputs_mib", "rel_err", "grad_rel_err",
            "timer", "error", "device", "torch", "triton"}


def _routing(rows, num_experts, k, dtype):
    probs = torch.softmax(torch.randn(rows, num_experts, dtype=torch.float64), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    return weights.to(dtype), ids


# B=5 odd batch, N=3 tokens, D=24, prime E=5 with k=2: with 5 samples some expert likely gets none.
@pytest.mark.parametrize("num_experts,k", [(5, 2), (3, 3), (2, 1)])  # k = E and k = 1 edges
def test_switch_loop_matches_reference(num_experts, k):
    x = torch.randn(5, 3, 24, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(num_experts, 24, 24, dtype=torch.float64) / 5
    bias = torch.randn(num_experts, 24, dtype=torch.float64)
    tw, ti = _routing(5, num_experts, k, torch.float64)
    ref = reference.switch_modulation(x, weight, bias, tw, ti)
    out = switch_modulation_loop(x, weight.transpose(1, 2).contiguous(), bias, tw, ti)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    (dx_ref,) = torch.autograd.grad(ref, x, grad)
    (dx,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)


def test_mlp_loop_matches_reference():
    # T=37 odd token count, E=7 prime, k=2, F=20: tokens spread over experts, some may get none.
    x = torch.randn(37, 16, dtype=torch.float64)
    w1 = torch.randn(7, 16, 20, dtype=torch.float64) / 4
    w2 = torch.randn(7, 20, 16, dtype=torch.float64) / 4
    tw, ti = _routing(37, 7, 2, torch.float64)
    ref = reference.expert_mlp(x, w1, None, w2, None, tw, ti, activation="gelu_tanh")
    out = expert_mlp_loop(x, w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous(), tw, ti)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(grouped_mm_unavailable("cpu", torch.float32) is not None,
                    reason="torch._grouped_mm does not run on this CPU build")
def test_grouped_mm_baselines_match_reference():
    # float32 (grouped_mm has no float64): compare with the float64 reference at float32 tolerance.
    x = torch.randn(6, 4, 32, dtype=torch.float64)  # B=6, N=4: each pair a run of 4 rows
    weight = torch.randn(5, 32, 32, dtype=torch.float64) / 6
    bias = torch.randn(5, 32, dtype=torch.float64)
    tw, ti = _routing(6, 5, 2, torch.float64)
    ref = reference.switch_modulation(x, weight, bias, tw, ti)
    out = switch_modulation_grouped_mm(x.float(), weight.float(), bias.float(), tw.float(), ti)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)

    xt = torch.randn(29, 16, dtype=torch.float64)  # T=29 tokens, E=4, k=2
    w1 = torch.randn(4, 16, 32, dtype=torch.float64) / 4
    w2 = torch.randn(4, 32, 16, dtype=torch.float64) / 6
    tw, ti = _routing(29, 4, 2, torch.float64)
    ref = reference.expert_mlp(xt, w1, None, w2, None, tw, ti, activation="gelu_tanh")
    out = expert_mlp_grouped_mm(xt.float(), w1.float(), w2.float(), tw.float(), ti)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_moe_layer_quick_json(tmp_path):
    path = tmp_path / "moe.json"
    rows = moe_layer.main(["--quick", "--device", "cpu", "--json", str(path), "--impls", SMOKE_IMPLS])
    data = json.loads(path.read_text())
    assert data["benchmark"] == "moe_layer" and len(data["rows"]) == len(rows) > 0
    assert data["env"]["device"].startswith("cpu") and data["env"]["torch"] == torch.__version__
    seen = set()
    for row in data["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        key = (row["case"], row["impl"], row["mode"])
        assert key not in seen
        seen.add(key)
        assert row["mode"] in moe_layer.MODES
        if row["error"] is None:
            assert row["ms"] > 0 and row["p20_ms"] <= row["p80_ms"] and row["timer"] == "perf_counter"
            assert row["flops"] > 0 and row["tflops"] > 0
        elif not row["error"].startswith("skipped"):
            pytest.fail(f"{key} failed: {row['error']}")
    # Every suite has its baseline measured in both modes, and the torch paths agree with it.
    for suite, base in moe_layer.BASELINE.items():
        base_rows = [r for r in data["rows"] if r["suite"] == suite and r["impl"] == base]
        assert len(base_rows) == len(moe_layer.MODES) * sum(
            c.suite == suite for c in moe_layer.QUICK_SWITCH_CASES + moe_layer.QUICK_FFN_CASES)
        assert all(r["error"] is None and r["rel_err"] < 1e-6 for r in base_rows)
    for row in data["rows"]:
        if row["impl"].endswith("_torch") or row["impl"] == "torch_grouped_mm":
            if row["error"] is None:
                assert row["rel_err"] < 1e-5
                assert row["mode"] == "forward" or row["grad_rel_err"] < 1e-5


def test_moe_layer_records_a_failing_impl_and_goes_on(monkeypatch, tmp_path):
    def broken(case, inp):
        raise RuntimeError("kernel exploded")
    impl = moe_layer.IMPLS["switch_modulation_torch/switch"]
    monkeypatch.setitem(moe_layer.IMPLS, "switch_modulation_torch/switch",
                        moe_layer.Impl(impl.name, impl.suite, impl.needs, broken))
    rows = moe_layer.main(["--quick", "--device", "cpu", "--cases", "switch", "--filter", "B3",
                           "--impls", "switch_modulation_torch,reference"])
    errors = [r["error"] for r in rows if r["impl"] == "switch_modulation_torch"]
    assert len(errors) == 2 and all("kernel exploded" in e for e in errors)
    assert all(r["error"] is None for r in rows if r["impl"] == "reference")


def _synthetic_files(tmp_path):
    env = {"device": "Fake GPU", "torch": "2.x", "triton": "3.x", "date": "2026-01-01"}
    rows = []
    for case in ("S: B2 N4 D8 E3 k2", "XL: B2 N4 D16 E3 k2"):
        for impl, ms in (("reference", 4.0), ("switch_modulation_triton", 1.0), ("dense_same_flops", 0.5)):
            for mode, factor in (("forward", 1.0), ("forward+backward", 3.0)):
                rows.append({"benchmark": "moe_layer", "suite": "switch", "case": case, "impl": impl,
                             "mode": mode, "ms": ms * factor, "tflops": 1.0, "peak_mib": 10.0,
                             "peak_extra_mib": 5.0 * factor, "rel_err": 1e-3, "error": None,
                             "device": "Fake GPU", "dtype": "bfloat16"})
    rows.append({"benchmark": "moe_layer", "suite": "switch", "case": "S: B2 N4 D8 E3 k2",
                 "impl": "switch_modulation_cuda", "mode": "forward", "ms": None,
                 "error": "skipped: not built", "device": "Fake GPU"})
    moe = tmp_path / "moe.json"
    moe.write_text(json.dumps({"benchmark": "moe_layer", "env": env, "rows": rows}))
    train = [{"benchmark": "train_step", "model": "S/2", "batch": 4, "variant": v, "ms": ms,
              "images_per_s": 4 / ms * 1e3, "peak_gib": 1.5, "ratio_to_dit": ms / 10.0, "error": None,
              "device": "Fake GPU"} for v, ms in (("DiT", 10.0), ("SwitchDiT[triton]", 12.0))]
    tr = tmp_path / "train.json"
    tr.write_text(json.dumps({"benchmark": "train_step", "env": env, "rows": train}))
    return [str(moe), str(tr)]


def test_plot_writes_pngs_and_tables(tmp_path, capsys):
    files = _synthetic_files(tmp_path)
    written = plot.main(files + ["--out", str(tmp_path / "png"), "--tables"])
    names = sorted(p.rsplit("/", 1)[-1] for p in written)
    assert names == ["moe_dense_share.png", "moe_peak_memory.png", "moe_speedup.png", "train_step.png"]
    for p in written:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    # speed-up of the fused kernel over the reference: 4 ms / 1 ms
    assert "| S: B2 N4 D8 E3 k2 | switch_modulation_triton | 1.000 | 3.000 | 4.00 | 50% |" in out
    assert "| S/2 | 4 | SwitchDiT[triton] | 12.0 |" in out and "1.20 |" in out
    assert "switch_modulation_cuda" not in out  # skipped rows stay out of the tables


def test_train_step_quick_rows(tmp_path):
    # One variant, the one with the most moving parts (Switch-DiT + the prior loss), one step.
    from benchmarks import train_step
    path = tmp_path / "train.json"
    rows = train_step.main(["--quick", "--device", "cpu", "--variants", "SwitchDiT[torch]+prior",
                            "--warmup", "0", "--steps", "1", "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["benchmark"] == "train_step" and len(data["rows"]) == len(rows) == 1
    row = data["rows"][0]
    assert {"model", "batch", "variant", "ms", "images_per_s", "peak_gib", "ratio_to_dit", "error",
            "precision", "device", "torch", "triton"} <= set(row)
    assert row["ratio_to_dit"] is None  # no DiT row to compare with
    if row["error"] is None:  # a model still being written shows up as an error row instead
        assert row["ms"] > 0 and row["images_per_s"] == pytest.approx(2 / (row["ms"] * 1e-3))


def test_saved_activations_counts_the_expert_output_exactly(tmp_path):
    # Tiny model (depth 1, D = 32, 16 tokens); the recompute variant keeps exactly one bf16 y
    # ([B, N, D], 2 bytes per token and channel) less than the default fused layer.
    from benchmarks import saved_activations
    path = tmp_path / "saved.json"
    rows = saved_activations.main(["--depth", "1", "--hidden-size", "32", "--num-heads", "2",
                                   "--input-size", "8", "--batches", "1,3", "--device", "cpu",
                                   "--json", str(path)])
    by = {r["variant"]: r for r in rows}
    assert all(r["error"] is None for r in rows), rows
    assert by["DiT"]["ratio_to_dit"] == 1.0
    fused, lean = by["SwitchDiT[triton]"], by["SwitchDiT[triton,recompute]"]
    assert fused["bytes_per_token_channel"] - lean["bytes_per_token_channel"] == pytest.approx(2.0)
    assert by["DiT"]["bytes_per_token_channel"] < lean["bytes_per_token_channel"]
    assert json.loads(path.read_text())["benchmark"] == "saved_activations"


def test_decide_reads_one_runs_json(tmp_path):
    # Each verdict of benchmarks.decide from rows built here: faster everywhere, slower, missing.
    from benchmarks import decide

    def row(impl, case, mode, ms, error=None):
        return {"impl": impl, "case": case, "mode": mode, "ms": ms, "error": error}

    rows = [row("switch_modulation_triton", c, m, 1.0) for c in ("XL", "S")
            for m in ("forward", "forward+backward")]
    rows += [row("switch_modulation_gluon", c, m, 0.8) for c in ("XL", "S")
             for m in ("forward", "forward+backward")]
    rows += [row("switch_modulation_gluon_256x64", "XL", "forward", 0.9),
             row("switch_modulation_gluon_256x64", "S", "forward", None, error="boom")]
    rows += [row("switch_modulation_triton_fused_u", c, "forward+backward", 1.2)
             for c in ("XL", "S")]
    path = tmp_path / "moe.json"
    path.write_text(json.dumps({"benchmark": "moe_layer", "rows": rows}))
    text = decide.report(decide.load_rows([str(path)]))
    assert "Gluon forward+dx as the sm_90 default: candidate wins everywhere (0.80-0.80x" in text
    assert "(one sample per tile): undecided: no figure for S forward" in text
    assert "fused u instead of the sm_90 u pre-pass: keep the incumbent" in text
    assert "moe_recompute in training: no data" in text
    with pytest.raises(SystemExit):
        decide.main([str(tmp_path / "missing.json")])
