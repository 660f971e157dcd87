"""Charts (PNG) and markdown tables from the benchmarks' JSON files.

Usage:

    python -m benchmarks.plot                                # every JSON under benchmarks/results/
    python -m benchmarks.plot out/moe_layer_switch.json out/train_step.json --out docs/perf
    python -m benchmarks.plot FILES... --tables              # also print markdown tables (README)
    python -m benchmarks.plot FILES... --tables --no-png     # tables only

Charts written to --out (default: the folder of the first file):
  moe_speedup.png       speed-up over the baseline loop (reference / loop) per case, impl and mode
  moe_dense_share.png   share of the dense ceiling: time of ONE GEMM with the same FLOPs / time
  moe_peak_memory.png   peak memory of forward+backward, beyond the resident inputs (GPU runs only)
  train_step.png        training step ms and peak GiB, DiT vs Switch-DiT, ratio to DiT on the bars
Rows from different devices are never mixed: a device's charts get its name as a suffix when the
files hold more than one device. Rows with an "error" are left out (the tables show the error).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional, Sequence

from benchmarks import common

BASELINE = {"switch": "reference", "ffn": "loop"}
DENSE = "dense_same_flops"
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load_rows(paths: Sequence[str]) -> Dict[str, List[dict]]:
    """{benchmark name: rows} over all files; each row gains "source" (file) and "date"."""
    out: Dict[str, List[dict]] = defaultdict(list)
    for path in paths:
        data = common.read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            print(f"(skipping {path}: no 'rows' to chart)")
            continue
        bench = data.get("benchmark")
        env = data.get("env", {})
        for row in data.get("rows", []):
            row = dict(row)
            row.setdefault("device", env.get("device"))
            row["source"] = os.path.relpath(path)
            row["date"] = env.get("date")
            out[bench or row.get("benchmark", "unknown")].append(row)
    return out


def _ok(row: dict) -> bool:
    return not row.get("error") and row.get("ms") is not None


def _by_device(rows: List[dict]) -> "OrderedDict[str, List[dict]]":
    groups: "OrderedDict[str, List[dict]]" = OrderedDict()
    for row in rows:
        groups.setdefault(row.get("device") or "unknown", []).append(row)
    return groups


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def _lookup(rows: List[dict]) -> Dict[tuple, dict]:
    """(suite, case, impl, mode) -> the last successful row."""
    return {(r.get("suite"), r["case"], r["impl"], r["mode"]): r for r in rows if _ok(r)}


def _ratio(num: Optional[dict], den: Optional[dict]) -> Optional[float]:
    if num is None or den is None or not den.get("ms"):
        return None
    return num["ms"] / den["ms"]


def _short(v: float) -> str:
    """3 significant digits without exponents: 1440, 12.3, 0.0123."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _grouped_bars(ax, cases: List[str], series: "OrderedDict[str, List[Optional[float]]]",
                  ylabel: str, title: str, hline: Optional[float] = None) -> None:
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (label, values) in enumerate(series.items()):
        xs = [c + (i - (n - 1) / 2) * width for c in range(len(cases))]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, heights, width, label=label)
        for bar, v in zip(bars, values):
            if v is not None:
                ax.annotate(_short(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=6)
    if hline is not None:
        ax.axhline(hline, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)


def _moe_panels(rows: List[dict]):
    """[(suite, mode, cases, impls)] of the successful rows, in order of appearance."""
    panels = OrderedDict()
    for r in rows:
        if _ok(r):
            key = (r["suite"], r["mode"])
            cases, impls = panels.setdefault(key, ([], []))
            if r["case"] not in cases:
                cases.append(r["case"])
            if r["impl"] not in impls:
                impls.append(r["impl"])
    return [(s, m, c, i) for (s, m), (c, i) in panels.items()]


def _figure(num_panels: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(2, max(num_panels, 1))
    rows = (max(num_panels, 1) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[num_panels:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat)


def _save(plt, fig, path: str, title: str) -> str:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _chart(panels, value, ylabel: str, path: str, title: str, hline: Optional[float]) -> Optional[str]:
    """One subplot per (suite, mode) panel, bars value(suite, case, impl, mode) per case and impl."""
    panels = [p for p in panels if p[3]]
    if not panels:
        return None
    plt, fig, axes = _figure(len(panels))
    for ax, (suite, mode, cases, impls) in zip(axes, panels):
        series = OrderedDict((i, [value(suite, c, i, mode) for c in cases]) for i in impls)
        _grouped_bars(ax, cases, series, ylabel, f"{suite}, {mode}", hline)
    return _save(plt, fig, path, title)


def plot_moe(rows: List[dict], out_dir: str, suffix: str = "") -> List[str]:
    """The three MoE layer charts; returns the paths written."""
    device = rows[0].get("device", "?") if rows else "?"
    lookup = _lookup(rows)
    panels = _moe_panels(rows)

    def speedup(suite, case, impl, mode):
        base = lookup.get((suite, case, BASELINE.get(suite), mode))
        return _ratio(base, lookup.get((suite, case, impl, mode)))

    def dense_share(suite, case, impl, mode):
        return _ratio(lookup.get((suite, case, DENSE, mode)), lookup.get((suite, case, impl, mode)))

    def peak(suite, case, impl, mode):
        return lookup.get((suite, case, impl, mode), {}).get("peak_extra_mib")

    has_dense = {(s, m) for (s, _, i, m) in lookup if i == DENSE}
    has_peak = {(s, m) for (s, _, _, m), r in lookup.items() if r.get("peak_extra_mib") is not None}
    charts = [
        ([(s, m, c, [i for i in imps if i != BASELINE.get(s) and not i.startswith("dense")])
          for s, m, c, imps in panels],
         speedup, "speed-up over the baseline (x)", "moe_speedup",
         "Speed-up over the baseline loop ('reference' / 'loop')", 1.0),
        ([(s, m, c, [i for i in imps if i != DENSE]) for s, m, c, imps in panels if (s, m) in has_dense],
         dense_share, "dense same-FLOP GEMM time / time", "moe_dense_share",
         "Share of the dense ceiling: one GEMM with the same FLOPs", 1.0),
        ([p for p in panels if p[1] == "forward+backward" and (p[0], p[1]) in has_peak],
         peak, "MiB beyond the resident inputs", "moe_peak_memory",
         "Peak memory of forward+backward", None),
    ]
    written = []
    for chart_panels, value, ylabel, name, title, hline in charts:
        path = _chart(chart_panels, value, ylabel, os.path.join(out_dir, f"{name}{suffix}.png"),
                      f"{title} ({device})", hline)
        if path:
            written.append(path)
    return written


def plot_train(rows: List[dict], out_dir: str, suffix: str = "") -> List[str]:
    ok = [r for r in rows if _ok(r)]
    if not ok:
        return []
    device = ok[0].get("device", "?")
    models = list(OrderedDict.fromkeys(f"{r['model']} (B={r['batch']})" for r in ok))
    variants = list(OrderedDict.fromkeys(r["variant"] for r in ok))
    table = {(f"{r['model']} (B={r['batch']})", r["variant"]): r for r in ok}
    has_peak = any(r.get("peak_gib") is not None for r in ok)
    precision = ok[0].get("precision") or "?"
    plt, fig, axes = _figure(2 if has_peak else 1)
    ms = OrderedDict((v, [table.get((m, v), {}).get("ms") for m in models]) for v in variants)
    _grouped_bars(axes[0], models, ms, "ms per step",
                  f"training step (fwd + bwd + AdamW, {precision}); x DiT inside the bars")
    for container, v in zip(axes[0].containers, variants):
        for bar, m in zip(container, models):
            ratio = table.get((m, v), {}).get("ratio_to_dit")
            if ratio is not None:
                middle = (bar.get_x() + bar.get_width() / 2, bar.get_height() / 2)
                axes[0].annotate(f"{ratio:.2f}x", middle, ha="center", fontsize=6, rotation=90,
                                 color="white")
    if has_peak:
        gib = OrderedDict((v, [table.get((m, v), {}).get("peak_gib") for m in models]) for v in variants)
        _grouped_bars(axes[1], models, gib, "peak GiB", "peak memory of a step")
    return [_save(plt, fig, os.path.join(out_dir, f"train_step{suffix}.png"),
                  f"DiT vs Switch-DiT training step ({device})")]


def _cell(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def moe_tables(rows: List[dict]) -> str:
    """Markdown: per suite, one line per (case, impl) with forward and forward+backward side by side."""
    lookup = _lookup(rows)
    errors = {(r.get("suite"), r["case"], r["impl"]): r["error"] for r in rows if r.get("error")}
    out = []
    for suite in OrderedDict.fromkeys(r.get("suite") for r in rows):
        srows = [r for r in rows if r.get("suite") == suite]
        base = BASELINE.get(suite)
        out.append(f"\n**{suite}** ({srows[0].get('device')}, torch {srows[0].get('torch')}, triton "
                   f"{srows[0].get('triton')}, {srows[0].get('dtype')}, {srows[0].get('date')}; "
                   f"source: `{srows[0].get('source')}`)\n")
        out.append(f"| case | impl | fwd ms | fwd+bwd ms | speed-up f+b over {base} | share of dense (f+b) "
                   "| TFLOP/s f+b | peak MiB f+b (beyond inputs) | rel err |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for case in OrderedDict.fromkeys(r["case"] for r in srows):
            for impl in OrderedDict.fromkeys(r["impl"] for r in srows if r["case"] == case):
                f = lookup.get((suite, case, impl, "forward"))
                b = lookup.get((suite, case, impl, "forward+backward"))
                if f is None and b is None:
                    err = errors.get((suite, case, impl), "")
                    if err.startswith("skipped"):
                        continue
                    out.append(f"| {case} | {impl} | error: {err[:80]} | | | | | | |")
                    continue
                speed = _ratio(lookup.get((suite, case, base, "forward+backward")), b)
                dense = _ratio(lookup.get((suite, case, DENSE, "forward+backward")), b)
                peak = "" if b is None or b.get("peak_mib") is None else \
                    f"{b['peak_mib']:.0f} ({b['peak_extra_mib']:.0f})"
                rel = (f or b or {}).get("rel_err")
                cells = [case, impl, _cell(f and f["ms"], ".3f"), _cell(b and b["ms"], ".3f"),
                         _cell(speed, ".2f"), _cell(dense, ".0%"), _cell(b and b["tflops"], ".3g"), peak,
                         _cell(rel, ".1e")]
                out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def train_tables(rows: List[dict]) -> str:
    if not rows:
        return ""
    r0 = rows[0]
    out = [f"\n**train step** ({r0.get('device')}, torch {r0.get('torch')}, triton {r0.get('triton')}, "
           f"{r0.get('date')}; source: `{r0.get('source')}`)\n",
           "| model | batch | variant | step ms | images/s | peak GiB | time x DiT | memory x DiT |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not _ok(r):
            if not str(r.get("error", "")).startswith("skipped"):
                error = str(r.get("error"))[:80]
                out.append(f"| {r['model']} | {r['batch']} | {r['variant']} | error: {error} | | | | |")
            continue
        out.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['ms']:.1f} | "
                   f"{_cell(r.get('images_per_s'), '.0f')} | {_cell(r.get('peak_gib'), '.1f')} | "
                   f"{_cell(r.get('ratio_to_dit'), '.2f')} | "
                   f"{_cell(r.get('peak_ratio_to_dit'), '.2f')} |")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", help="JSON files (default: benchmarks/results/**/*.json)")
    p.add_argument("--out", default=None, help="folder of the PNGs (default: the first file's folder)")
    p.add_argument("--tables", action="store_true", help="print markdown tables too")
    p.add_argument("--no-png", action="store_true", help="write no charts")
    args = p.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(RESULTS_DIR, "**", "*.json"), recursive=True))
    if not files:
        p.error("no JSON files given and none under benchmarks/results/")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        p.error(f"no such file: {', '.join(missing)}")
    by_bench = load_rows(files)
    out_dir = args.out or os.path.dirname(os.path.abspath(files[0]))
    os.makedirs(out_dir, exist_ok=True)
    written: List[str] = []
    plotters = {"moe_layer": (plot_moe, moe_tables), "train_step": (plot_train, train_tables)}
    for bench, rows in by_bench.items():
        if bench not in plotters:
            print(f"(no chart for benchmark {bench!r}: {len(rows)} rows)")
            continue
        plotter, tabler = plotters[bench]
        groups = _by_device(rows)
        for device, drows in groups.items():
            suffix = "" if len(groups) == 1 else "_" + _slug(device)
            if not args.no_png:
                written += plotter(drows, out_dir, suffix)
            if args.tables:
                print(tabler(drows))
    for path in written:
        print(f"wrote {path}")
    if not any(bench in plotters for bench in by_bench):
        # A fresh clone holds only the CPU results (quality, saved activations): the charts are of
        # GPU runs, which benchmarks/results/<date>_<card>/ folders hold once someone adds them.
        print(f"nothing to chart: {len(files)} file(s) read, none with moe_layer or train_step "
              "rows. Those come from a CUDA machine: `make bench-gpu` (benchmarks/gpu_check.sh) "
              "writes them; copy its output folder to benchmarks/results/<date>_<card>/ and run "
              "`make plots` again.")
    return written


if __name__ == "__main__":
    main()
