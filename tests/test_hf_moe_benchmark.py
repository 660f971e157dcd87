"""benchmarks.hf_moe --quick: rows for every implementation, logits equal to eager, clean CLI errors."""
import json

import pytest

pytest.importorskip("transformers", minversion="5.0")

from benchmarks import hf_moe  # noqa: E402


def test_quick_run_writes_rows_that_match_eager(tmp_path):
    path = tmp_path / "hf_moe.json"
    rows = hf_moe.main(["--quick", "--device", "cpu", "--impls", "eager,switch_dit",
                        "--modes", "fwd,fwd_bwd", "--backend", "torch", "--json", str(path)])
    assert [(r["impl"], r["mode"]) for r in rows] == [
        ("eager", "fwd"), ("eager", "fwd_bwd"), ("switch_dit", "fwd"), ("switch_dit", "fwd_bwd")]
    assert rows[0]["rel_err"] == 0.0  # eager against itself: the reference really is eager
    assert all("error" not in r and r["ms"] > 0 for r in rows)
    fwd = {r["impl"]: r for r in rows if r["mode"] == "fwd"}
    assert fwd["switch_dit"]["rel_err"] < 1e-5
    assert 0 < fwd["switch_dit"]["fwd_alloc_mib"] and fwd["switch_dit"]["expert_mib"] > 0
    saved = json.loads(path.read_text())
    assert saved["benchmark"] == "hf_moe" and len(saved["rows"]) == 4


@pytest.mark.parametrize("argv", [["--impls", "fast"], ["--modes", "bwd"], ["--budget-s", "0"],
                                  ["--backend", "cuda"]])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        hf_moe.main(argv)
    assert exc.value.code == 2 and "usage:" in capsys.readouterr().err
