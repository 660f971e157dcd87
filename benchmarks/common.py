"""Timing and memory helpers of the benchmarks: medians, peak memory, environment, JSON files, tables.

GPU timing is `triton.testing.do_bench` (CUDA events, L2 flushed before each run, median and the
20th/80th percentiles); CPU timing is `time.perf_counter` around each call (median of a few runs).
Peak memory is `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, reported both as
the absolute peak and as the peak minus what was already allocated (inputs, weights) before the call.
Nothing here queries the GPU at import time.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch

MIB = 2.0 ** 20
GIB = 2.0 ** 30


@dataclass
class Timing:
    """Milliseconds per call: median and 20th/80th percentiles, with how they were measured."""

    ms: float
    p20_ms: float
    p80_ms: float
    timer: str


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    """The checkout's commit (None outside a git checkout, e.g. on a copied working tree)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    """"NVIDIA H200" for a GPU, "cpu (<processor>, N threads)" for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    """What a figure needs to be traceable: card, versions, date, commit, interpreter/extension flags."""
    from switch_dit_kernels import cuda_extension_available
    env = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "cuda_extension": cuda_extension_available(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["sm"] = f"{props.major}{props.minor}"
        env["gpu_mem_gib"] = round(props.total_memory / GIB, 1)
    return env


def resolve_device(name: Optional[str]) -> torch.device:
    """--device: None -> cuda when available else cpu; "cuda" without a GPU raises SystemExit."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return device


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: Optional[int]):
    """Run the block with ``threads`` torch threads on the CPU (None or a GPU device: unchanged).

    The quick CPU runs use one: at tiny sizes a second thread buys nothing and, on a shared machine,
    every op waits for a busy core (an official-loop forward took 1.4 ms on one thread, 736 ms on
    two, on a loaded 2-core box).
    """
    before = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def environ(values: Optional[dict]):
    """Run the block with the environment variables ``values`` set (restored after)."""
    values = values or {}
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drop garbage and cached blocks so one case's leftovers do not count in the next one's peak.

    GPU only: on the CPU nothing is measured that a collection would change, and a full
    gc.collect() costs ~0.3 s once torch has imported sympy.
    """
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def _quantile(sorted_values: List[float], q: float) -> float:
    """Linear-interpolation quantile of an ascending list (numpy's default rule)."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_cpu(fn: Callable[[], object], *, reps: int = 5, warmup: int = 1, max_seconds: float = 5.0,
             grad_to_none: Sequence[torch.Tensor] = ()) -> Timing:
    """Median / p20 / p80 of ``reps`` timed calls (time.perf_counter) after ``warmup`` untimed ones.

    Stops early once the timed calls have taken ``max_seconds`` (at least one call is timed).
    """
    for _ in range(warmup):
        _clear_grads(grad_to_none)
        fn()
    times = []
    budget_end = time.perf_counter() + max_seconds
    for _ in range(max(1, reps)):
        _clear_grads(grad_to_none)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        if time.perf_counter() > budget_end:
            break
    _clear_grads(grad_to_none)
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), "perf_counter")


def time_cuda(fn: Callable[[], object], *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
              min_reps: int = 10, max_rep_ms: float = 2000.0,
              grad_to_none: Sequence[torch.Tensor] = ()) -> Timing:
    """Median / p20 / p80 of `triton.testing.do_bench` (CUDA events, L2 flushed before each run).

    do_bench times ``rep_ms`` worth of runs; for slow functions (say a 60 ms expert loop) that would
    be one or two runs, so the repetition time is raised to at least ``min_reps`` runs (capped at
    ``max_rep_ms``) from a quick estimate. The first call (compilation, autotuning) happens before
    the estimate and is never timed.
    """
    from triton.testing import do_bench

    grads = list(grad_to_none)
    _clear_grads(grads)
    fn()  # compile / autotune / allocator warm-up, untimed
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(2):
        _clear_grads(grads)
        fn()
    torch.cuda.synchronize()
    estimate_ms = (time.perf_counter() - start) * 1e3 / 2
    rep = min(max(rep_ms, min_reps * estimate_ms), max(max_rep_ms, rep_ms))
    warmup = min(max(warmup_ms, 2 * estimate_ms), max(max_rep_ms, warmup_ms))
    kwargs = dict(warmup=warmup, rep=rep, grad_to_none=grads or None)
    try:
        result = do_bench(fn, quantiles=[0.5, 0.2, 0.8], **kwargs)
    except TypeError:  # a do_bench without quantiles: the median alone
        result = do_bench(fn, return_mode="median", **kwargs)
    _clear_grads(grads)
    if isinstance(result, (list, tuple)):
        med, p20, p80 = (list(result) + [result[0]] * 3)[:3]
    else:
        med = p20 = p80 = float(result)
    return Timing(float(med), float(p20), float(p80), "triton.testing.do_bench")


def time_fn(fn: Callable[[], object], device: torch.device, *, quick: bool = False,
            grad_to_none: Sequence[torch.Tensor] = ()) -> Timing:
    """do_bench on a GPU, perf_counter on the CPU (fewer runs with ``quick``)."""
    if device.type == "cuda":
        if quick:
            return time_cuda(fn, warmup_ms=5, rep_ms=20, min_reps=3, max_rep_ms=200,
                             grad_to_none=grad_to_none)
        return time_cuda(fn, grad_to_none=grad_to_none)
    if quick:
        return time_cpu(fn, reps=3, warmup=1, max_seconds=1.0, grad_to_none=grad_to_none)
    return time_cpu(fn, reps=10, warmup=2, max_seconds=10.0, grad_to_none=grad_to_none)


def peak_memory(fn: Callable[[], object], device: torch.device,
                grad_to_none: Sequence[torch.Tensor] = ()) -> Tuple[Optional[float], Optional[float]]:
    """(peak MiB, peak MiB minus what was allocated before the call) of one call; (None, None) on CPU.

    The second number is the memory the call itself needs (activations, outputs, gradients); the
    first adds the inputs and weights that were already resident.
    """
    if device.type != "cuda":
        return None, None
    _clear_grads(grad_to_none)
    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    _clear_grads(grad_to_none)
    return peak / MIB, (peak - base) / MIB


def tensors_mib(tensors: Iterable[torch.Tensor]) -> float:
    """Bytes held by the given tensors, in MiB."""
    return sum(t.numel() * t.element_size() for t in tensors) / MIB


def tflops(flops: Optional[float], ms: Optional[float]) -> Optional[float]:
    """TFLOP/s of ``flops`` floating-point operations done in ``ms`` milliseconds."""
    if not flops or not ms:
        return None
    return flops / (ms * 1e-3) / 1e12


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere gives NaN, never a pass)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    return float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64).clamp_min(1e-30))


def format_error(exc: BaseException, limit: int = 400) -> str:
    """One line: the exception type and the start of its message."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def write_json(path: str, benchmark: str, env: dict, rows: List[dict], config: Optional[dict] = None
               ) -> None:
    """Write {"benchmark", "env", "config", "rows"} atomically (rewritten after every row, so a run
    stopped by a timeout keeps what it measured)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    payload = {"benchmark": benchmark, "env": env, "config": config or {}, "rows": rows}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def report(rows: List[dict], columns: Sequence[Tuple[str, str, str]], json_path: Optional[str],
           benchmark: str, env: dict, config: Optional[dict] = None) -> List[dict]:
    """A benchmark's ending: the table of all rows on stdout, the JSON file (when asked), the rows."""
    print()
    print(format_table(rows, columns), flush=True)
    if json_path:
        write_json(json_path, benchmark, env, rows, config)
        print(f"\nwrote {len(rows)} rows to {json_path}")
    return rows


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec) if spec else str(value)


def format_table(rows: List[dict], columns: Sequence[Tuple[str, str, str]]) -> str:
    """A fixed-width text table; columns are (header, key, format spec); None prints as "-"."""
    cells = [[header for header, _, _ in columns]]
    for row in rows:
        cells.append([_fmt(row.get(key), spec) for _, key, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Deadline:
    """A soft time budget: `expired()` once ``seconds`` have passed (None: never)."""

    def __init__(self, seconds: Optional[float]):
        self.end = None if seconds is None else time.monotonic() + seconds

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() > self.end
