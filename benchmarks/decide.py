"""The default-setting decisions a GPU run is for, read off its JSON: one markdown table.

Opt-in paths wait for GPU figures before they become defaults (README, "Hopper codegen gate"). This
reads `benchmarks.moe_layer` and `benchmarks.train_step` JSON of ONE run (timings compare only
within a run on one card) and prints, for each decision, the candidate against what it would
replace, per case and mode: both medians, the ratio and a verdict. A candidate "wins" where it is
at least THRESHOLD faster in every case the decision covers and produced no error; its correctness
comes from the GPU tests (gpu_check.sh's tests_gluon / tests_gpu stages), not from here.

    python -m benchmarks.decide out/moe_layer_switch.json out/train_step.json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

# A candidate must be this much faster (5 %): below it, run-to-run noise on one card decides.
THRESHOLD = 0.05


@dataclass(frozen=True)
class Decision:
    name: str
    benchmark: str          # "moe_layer" or "train_step"
    candidate: str          # impl / variant under test
    incumbent: str          # what it would replace
    modes: Tuple[str, ...]  # moe_layer modes the decision covers ("" for train_step)
    action: str             # what to change if it wins


DECISIONS = [
    Decision("Gluon forward+dx as the sm_90 default", "moe_layer", "switch_modulation_gluon",
             "switch_modulation_triton", ("forward", "forward+backward"),
             "gluon_enabled(): default on for sm_90 (SWITCH_DIT_SMOD_GLUON=0 to opt out)"),
    Decision("Gluon forward tile 256x64x32 (one sample per tile)", "moe_layer",
             "switch_modulation_gluon_256x64", "switch_modulation_gluon", ("forward",),
             "_TILE_PREFERENCE: a 256-row forward tile first"),
    # The orientation alone: the forward has no u; forward+backward against the fused-u row,
    # which differs from merged_b in the orientation only (both SWITCH_DIT_SMOD_DX_PREPASS=0).
    Decision("merged W~ chunk back to the shared operand (forward)", "moe_layer",
             "switch_modulation_triton_merged_b", "switch_modulation_triton", ("forward",),
             "merged_as_register_operand(): default 'b' (on sm_90)"),
    Decision("merged W~ chunk back to the shared operand (fused u, fwd+bwd)", "moe_layer",
             "switch_modulation_triton_merged_b", "switch_modulation_triton_fused_u",
             ("forward+backward",),
             "merged_as_register_operand(): default 'b' (on sm_90, with the fused u)"),
    Decision("fused u instead of the sm_90 u pre-pass", "moe_layer",
             "switch_modulation_triton_fused_u", "switch_modulation_triton", ("forward+backward",),
             "u_prepass_enabled(): auto -> off on sm_90 (the dx then waits for every wgmma)"),
    Decision("Gluon in a Switch-DiT training step", "train_step", "SwitchDiT[triton,gluon]+prior",
             "SwitchDiT[triton]+prior", ("",), "(confirms the layer-level decision end to end)"),
    Decision("moe_recompute in training", "train_step", "SwitchDiT[triton,recompute]+prior",
             "SwitchDiT[triton]+prior", ("",),
             "SwitchDiT(moe_recompute=True) by default (memory for one more GEMM a block)"),
]


def load_rows(paths: Sequence[str]) -> Dict[str, List[dict]]:
    """Rows of every JSON, by benchmark name."""
    rows: Dict[str, List[dict]] = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        rows.setdefault(data.get("benchmark", ""), []).extend(data.get("rows", []))
    return rows


def _key(row: dict, benchmark: str) -> Tuple[str, str]:
    if benchmark == "train_step":
        return f"{row.get('model')} B{row.get('batch')}", ""
    return row.get("case", ""), row.get("mode", "")


def _name(row: dict, benchmark: str) -> str:
    return row.get("variant" if benchmark == "train_step" else "impl", "")


def compare(decision: Decision, rows: Dict[str, List[dict]]):
    """(table lines, verdict) of one decision."""
    mine = rows.get(decision.benchmark, [])
    by = {}
    for row in mine:
        by[(_name(row, decision.benchmark),) + _key(row, decision.benchmark)] = row
    cases = sorted({k[1:] for k in by if k[0] == decision.candidate and k[2] in decision.modes})
    lines, ratios, problems = [], [], []
    for case, mode in cases:
        cand = by.get((decision.candidate, case, mode))
        inc = by.get((decision.incumbent, case, mode))
        c_ms = cand.get("ms") if cand else None
        i_ms = inc.get("ms") if inc else None
        err = (cand or {}).get("error") or (inc or {}).get("error")
        if err or not c_ms or not i_ms:
            problems.append(f"{case} {mode}".strip())
            lines.append(f"| {case} | {mode or '-'} | {_fmt(i_ms)} | {_fmt(c_ms)} | - | "
                         f"{(err or 'missing row')[:60]} |")
            continue
        ratio = c_ms / i_ms
        ratios.append(ratio)
        verdict = "faster" if ratio <= 1 - THRESHOLD else ("slower" if ratio >= 1 + THRESHOLD
                                                           else "same")
        lines.append(f"| {case} | {mode or '-'} | {i_ms:.4g} | {c_ms:.4g} | {ratio:.3f} | "
                     f"{verdict} |")
    if not ratios and not problems:
        return lines, "no data (the candidate did not run)"
    if problems:
        return lines, f"undecided: no figure for {', '.join(problems[:3])}"
    if all(r <= 1 - THRESHOLD for r in ratios):
        return lines, f"candidate wins everywhere ({min(ratios):.2f}-{max(ratios):.2f}x the time)"
    if all(r >= 1 - THRESHOLD for r in ratios) and any(r >= 1 + THRESHOLD for r in ratios):
        return lines, "keep the incumbent"
    return lines, "mixed: decide per case"


def _fmt(value: Optional[float]) -> str:
    return f"{value:.4g}" if value else "-"


def report(rows: Dict[str, List[dict]]) -> str:
    out = ["## Decisions (benchmarks.decide)", "",
           f"A candidate wins where it is >= {THRESHOLD:.0%} faster in every case (medians, ms).", ""]
    for decision in DECISIONS:
        lines, verdict = compare(decision, rows)
        out += [f"### {decision.name}: {verdict}", "",
                f"{decision.candidate} vs {decision.incumbent}; if it wins: {decision.action}", ""]
        if lines:
            out += ["| case | mode | incumbent ms | candidate ms | ratio | |", "|---|---|---|---|---|---|",
                    *lines, ""]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="moe_layer / train_step JSON files of one run")
    args = parser.parse_args(argv)
    try:
        rows = load_rows(args.json)
    except (OSError, json.JSONDecodeError) as exc:
        parser.error(f"cannot read the JSON: {exc}")
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
