"""Benchmarks of switch_dit_kernels against the official Switch-DiT loop, torch._grouped_mm and dense GEMMs.

    python -m benchmarks.moe_layer  [--device cuda|cpu] [--quick] [--json FILE] [--cases switch|ffn|all]
    python -m benchmarks.train_step [--device cuda|cpu] [--quick] [--json FILE]
    python -m benchmarks.plot       [FILES...] [--out DIR] [--tables]
    bash benchmarks/gpu_check.sh    # the whole GPU suite (tests + benchmarks) in one call of < 8 min
    pytest benchmarks/test_bench_cpu.py --benchmark-only   # pytest-benchmark cases of the CPU paths

Results (JSON) live in benchmarks/results/; every figure of the README's "Performance" section comes
from one of those files.
"""
