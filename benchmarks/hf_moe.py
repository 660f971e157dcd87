"""A small transformers MoE model, forward and forward+backward: eager vs grouped_mm vs switch_dit.

The model is built from a config in code (random weights, nothing downloaded): Qwen3-MoE-shaped by
default (SwiGLU experts, softmax top-k, renormalised). Each experts implementation is switched on
with ``model.set_experts_implementation``; "switch_dit" is `switch_dit_kernels.integrations.
transformers.register()` (backend "auto": the Triton kernels on CUDA, the PyTorch reference on
the CPU).

Columns: ms per call (median, do_bench on a GPU / perf_counter on the CPU), peak memory (GPU),
``fwd_alloc_mib``: bytes of new storage the ops of one no-grad forward return (a TorchDispatchMode
count, any device: shows that no implementation copies the [E, 2I, D] expert weights per forward,
next to ``expert_mib``, the expert weights' size), and rel_err of the logits against eager.

    python -m benchmarks.hf_moe --quick            # CPU, tiny model, < 1 minute
    python -m benchmarks.hf_moe --device cuda --json out/hf_moe.json
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional, Sequence

import torch

from benchmarks import common

# The kernels first: under a tight --budget-s (gpu_check.sh) their rows are the ones to keep.
IMPLS = ("switch_dit", "grouped_mm", "eager")
MODES = ("fwd", "fwd_bwd")
COLUMNS = [("impl", "impl", ""), ("mode", "mode", ""), ("dtype", "dtype", ""),
           ("tokens", "tokens", ""), ("ms", "ms", ".2f"), ("p20", "p20_ms", ".2f"),
           ("p80", "p80_ms", ".2f"), ("peak MiB", "peak_mib", ".0f"),
           ("fwd alloc MiB", "fwd_alloc_mib", ".1f"), ("experts MiB", "expert_mib", ".1f"),
           ("rel_err", "rel_err", ".1e"), ("error", "error", "")]

# (hidden, layers, heads, experts, k, moe_intermediate, vocab, batch, seq): the GPU size is a
# small OLMoE/Qwen3-MoE (64 experts, top-8); quick is for the CPU.
SIZES = {"gpu": (1024, 2, 8, 64, 8, 512, 32000, 4, 1024),
         "quick": (64, 2, 4, 8, 2, 48, 256, 2, 32)}


def build_model(size: str, device: torch.device, dtype: torch.dtype):
    """A Qwen3-MoE causal LM with random weights, every layer sparse."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    hidden, layers, heads, experts, k, inter, vocab, _, _ = SIZES[size]
    config = Qwen3MoeConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=heads,
                            head_dim=hidden // heads, intermediate_size=4 * hidden,
                            moe_intermediate_size=inter, num_experts=experts,
                            num_experts_per_tok=k, norm_topk_prob=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3MoeForCausalLM(config)
    return model.to(dtype), config


def forward_alloc_mib(fn) -> float:
    """MiB of new storage returned by the ops ``fn`` calls (views and in-place results excluded)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    total = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            inputs = {t.untyped_storage().data_ptr()
                      for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            out = func(*args, **(kwargs or {}))
            if not func._schema.is_mutable:
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                        total[0] += t.untyped_storage().nbytes()
            return out

    with Count():
        fn()
    return total[0] / common.MIB


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hf_moe",
                                description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="tiny model, few runs (CPU: < 1 minute)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + str(IMPLS))
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + str(MODES))
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="switch_dit_kernels backend of the switch_dit rows (auto: Triton on CUDA)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--json", default=None, help="write the rows here (rewritten after every row)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new rows after this many seconds")
    args = p.parse_args(argv)
    for name, given, known in (("--impls", args.impls, IMPLS), ("--modes", args.modes, MODES)):
        bad = [v for v in given.split(",") if v not in known]
        if bad or not given:
            p.error(f"{name}: unknown {bad or given!r}; choose from {known}")
    if args.budget_s is not None and args.budget_s <= 0:
        p.error("--budget-s must be > 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("benchmarks.hf_moe needs transformers >= 5 (pip install -e '.[test]')")
    with common.cpu_threads(device, 1 if args.quick else None):
        return _run(args, device)


def _run(args: argparse.Namespace, device: torch.device) -> List[dict]:
    from switch_dit_kernels.integrations.transformers import register

    register("switch_dit", backend=args.backend)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    size = "quick" if args.quick or device.type == "cpu" else "gpu"
    model, config = build_model(size, device, dtype)
    *_, batch, seq = SIZES[size]
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    expert_mib = common.tensors_mib(p for n, p in model.named_parameters() if ".experts." in n)
    env = common.environment(device)
    run_config = {"size": size, "sizes": SIZES[size], "model": "Qwen3MoeForCausalLM",
                  "dtype": str(dtype).replace("torch.", ""), "tokens": batch * seq,
                  "backend": args.backend, "autotune": os.environ.get("SWITCH_DIT_AUTOTUNE", "1") != "0"}
    deadline = common.Deadline(args.budget_s)
    rows: List[dict] = []
    model.set_experts_implementation("eager")
    with torch.no_grad():  # every row's rel_err is against eager's logits
        reference = model(input_ids).logits.float()
    for impl in args.impls.split(","):
        for mode in args.modes.split(","):
            if deadline.expired():
                print(f"budget spent: skipping {impl} {mode}")
                continue
            row = {"benchmark": "hf_moe", "impl": impl, "mode": mode,
                   "dtype": run_config["dtype"], "tokens": batch * seq, "expert_mib": expert_mib,
                   "device": env["device"], "torch": env["torch"], "triton": env["triton"]}
            try:
                model.set_experts_implementation(impl)
                params = [p for p in model.parameters() if p.requires_grad]
                if mode == "fwd":
                    def step():
                        with torch.no_grad():
                            return model(input_ids).logits
                    with torch.no_grad():
                        logits = model(input_ids).logits  # warm-up (compiles, autotunes)
                        row["fwd_alloc_mib"] = forward_alloc_mib(lambda: model(input_ids))
                    row["rel_err"] = common.rel_err(logits, reference)
                else:
                    def step():
                        model(input_ids, labels=input_ids).loss.backward()
                    step()
                timing = common.time_fn(step, device, quick=args.quick, grad_to_none=params)
                row.update(ms=timing.ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                           timer=timing.timer)
                row["peak_mib"], row["peak_extra_mib"] = common.peak_memory(step, device, params)
            except Exception as exc:  # noqa: BLE001 - one failing implementation keeps the others
                row["error"] = common.format_error(exc)
            finally:
                model.zero_grad(set_to_none=True)
                common.free_memory(device)
            rows.append(row)
            print(common.format_table([row], COLUMNS), flush=True)
            if args.json:
                common.write_json(args.json, "hf_moe", env, rows, run_config)
    return common.report(rows, COLUMNS, args.json, "hf_moe", env, run_config)


if __name__ == "__main__":
    main()
