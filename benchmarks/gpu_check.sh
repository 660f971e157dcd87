#!/usr/bin/env bash
# The whole GPU check in one call of < 8 minutes: install, GPU tests in bf16, benchmarks -> $OUT.
#
# Usage, from the repository root of a CUDA machine that already has torch and triton (nothing is
# downloaded; torch is never installed here):
#     bash benchmarks/gpu_check.sh                  # writes under $OUT (default ./out)
#     OUT=/tmp/o BUDGET_S=420 bash benchmarks/gpu_check.sh
#
# Stages, most important figures first, each under its own `timeout` so one failure or hang does
# not lose the others (a stage gets min(its cap, what is left of BUDGET_S)):
#   setup            pip install -e . --no-deps --no-build-isolation (builds csrc in place when nvcc
#                    is there; SWITCH_DIT_BUILD_CUDA is passed through); PYTHONPATH=. as a fallback
#   env              device, versions, extension flag -> env.json
#   tests_gluon      pytest -m gpu tests/test_switch_modulation_gluon.py: the opt-in sm_90 Gluon
#                    forward/dx against the float64 reference and the Triton twin, first and on its
#                    own, so a fault in never-run code is named and costs no other stage
#   moe_switch       python -m benchmarks.moe_layer --cases switch   (XL and S first)
#   moe_ffn          python -m benchmarks.moe_layer --cases ffn
#   tests_gpu        pytest -m gpu tests/   (the bf16 GPU tests of every other file)
#   train_step       python -m benchmarks.train_step
#   permute_bw       python -m benchmarks.permute_bandwidth (when that module exists)
#   tests_regular    the regular (unmarked) tests of the files that do GPU work without the gpu
#                    mark: the csrc extension on CUDA tensors, kernel compiles for sm_90 with this
#                    machine's triton, validation, modules ($GPU_TEST_FILES overrides the list;
#                    the other files test on CPU tensors through the interpreter, CI's job)
#   saved_act        python -m benchmarks.saved_activations (activation bytes per token; the CPU
#                    count is in the repository, this checks it with CUDA's attention kernels)
#   hf_moe           python -m benchmarks.hf_moe: a small transformers MoE (Qwen3-MoE shape, 64
#                    experts, top-8), forward and forward+backward, eager vs grouped_mm vs
#                    switch_dit (SWITCH_DIT_AUTOTUNE=$HF_MOE_AUTOTUNE, default 0: one config, so the
#                    stage stays small); its table goes into summary.md (no file of its own)
#   summary          markdown tables of every JSON (python -m benchmarks.plot --tables --no-png)
#                    and the default-setting decisions (python -m benchmarks.decide: Gluon, its
#                    tile, the merged operand, the sm_90 u pre-pass, moe_recompute, each candidate
#                    against its incumbent)
#
# Knobs (environment): OUT, PY (python3), BUDGET_S (470), SKIP_SETUP=1, SKIP_TESTS=1,
# GPU_TEST_FILES (space-separated test files for tests_regular), PYTEST_WORKERS (4),
# TEST_AUTOTUNE (0: the test stages run with SWITCH_DIT_AUTOTUNE=0, one grouped-GEMM config per
# kernel variant instead of compiling and timing ~8; the tests check correctness, the benchmark
# stages keep full autotuning; 1 autotunes in the tests too),
# SWITCH_DIT_BUILD_CUDA / SWITCH_DIT_CUDA_ARCHS (see setup.py); DEVICE=cpu QUICK=1 run the same
# stages on tiny shapes on the CPU (to try the script itself without a GPU).
#
# Output: at most 8 files, flat under $OUT (the device runner brings back at most 8): summary.md,
# gpu_check.log (every stage's output), env.json, moe_layer_switch.json, moe_layer_ffn.json,
# train_step.json, permute_bandwidth.json, saved_activations.json. The stage table is printed last.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
PY="${PY:-python3}"
BUDGET_S="${BUDGET_S:-470}"
PYTEST_WORKERS="${PYTEST_WORKERS:-4}"
DEVICE="${DEVICE:-cuda}"
QUICK_ARGS=(); [[ "${QUICK:-0}" == 1 ]] && QUICK_ARGS=(--quick)
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
TMPD="$(mktemp -d)"
STAGES="$TMPD/stages.md"
START=$(date +%s)
export PYTHONUNBUFFERED=1
export SWITCH_DIT_CUDA_ARCHS="${SWITCH_DIT_CUDA_ARCHS:-90}"
: > "$LOG"
printf '| stage | status | seconds | last line of its output |\n|---|---|---|---|\n' > "$STAGES"

remaining() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# stage NAME CAP_SECONDS CMD... : run CMD under timeout min(CAP, remaining), log it, record status.
stage() {
  local name="$1" cap="$2"; shift 2
  local left; left=$(remaining)
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 15 )); then
    echo "| $name | skipped (budget spent) | 0 | |" >> "$STAGES"
    echo "=== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"
    return 0
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0; t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$TMPD/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  cat "$TMPD/$name.log" >> "$LOG"
  local status="ok"
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT"; elif (( rc != 0 )); then status="FAILED (rc $rc)"; fi
  local last; last="$(grep -v '^[[:space:]]*$' "$TMPD/$name.log" | tail -n 1 | cut -c1-120 | tr '|' '/')"
  echo "| $name | $status | $dt | $last |" >> "$STAGES"
  echo "=== $name: $status after ${dt}s" | tee -a "$LOG"
  return 0
}

# A python stage gets a soft budget 15 s under its hard limit, so it writes its JSON and exits
# before `timeout` kills it.
py_budget() { local left; left=$(remaining); local cap=$1; local lim=$(( cap < left ? cap : left )); echo $(( lim > 30 ? lim - 15 : lim )); }

# ---- setup ---------------------------------------------------------------------------------
setup_install() {
  "$PY" -m pip install -e . --no-deps --no-build-isolation --no-index && return 0
  echo "editable install with the extension failed; retrying without it (SWITCH_DIT_BUILD_CUDA=0)"
  SWITCH_DIT_BUILD_CUDA=0 "$PY" -m pip install -e . --no-deps --no-build-isolation --no-index
}
if [[ "${SKIP_SETUP:-0}" != 1 ]]; then
  export -f setup_install; export PY
  stage setup 120 bash -c setup_install
fi
# The checkout itself first on the path: works whether or not the install above succeeded.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

stage env 30 "$PY" - "$OUT/env.json" <<'EOF'
import json, subprocess, sys, torch
from benchmarks import common
env = common.environment(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
try:
    env["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
except Exception as exc:  # noqa: BLE001
    env["nvcc"] = f"unavailable: {exc}"
env["torch_grouped_mm"] = hasattr(torch, "_grouped_mm")
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env, indent=1))
if not torch.cuda.is_available():
    print("no CUDA GPU visible")
EOF

# ---- benchmarks and tests --------------------------------------------------------------------
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  stage tests_gluon 60 "$PY" -m pytest tests/test_switch_modulation_gluon.py -q -m gpu -x \
    -p no:cacheprovider -p no:randomly
fi
stage moe_switch 120 "$PY" -m benchmarks.moe_layer --device "$DEVICE" --cases switch ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"} \
  --json "$OUT/moe_layer_switch.json" --budget-s "$(py_budget 120)"
stage moe_ffn 90 "$PY" -m benchmarks.moe_layer --device "$DEVICE" --cases ffn ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"} \
  --json "$OUT/moe_layer_ffn.json" --budget-s "$(py_budget 90)"

XDIST=()
if "$PY" -c "import xdist" 2>/dev/null && (( PYTEST_WORKERS > 1 )); then XDIST=(-n "$PYTEST_WORKERS"); fi
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  stage tests_gpu 80 env SWITCH_DIT_AUTOTUNE="${TEST_AUTOTUNE:-0}" \
    "$PY" -m pytest tests/ -q -m gpu --ignore=tests/test_switch_modulation_gluon.py \
    -p no:cacheprovider -p no:randomly ${XDIST[@]+"${XDIST[@]}"}
fi

stage train_step 130 "$PY" -m benchmarks.train_step --device "$DEVICE" ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"} \
  --json "$OUT/train_step.json" --budget-s "$(py_budget 130)"

if [[ -f benchmarks/permute_bandwidth.py ]]; then
  stage permute_bw 40 "$PY" -m benchmarks.permute_bandwidth --json "$OUT/permute_bandwidth.json" \
    --budget-s "$(py_budget 40)"
fi

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  if [[ -z "${GPU_TEST_FILES:-}" ]]; then  # TRITON_INTERPRET is unset with a GPU (conftest)
    GPU_TEST_FILES="$(ls tests/test_*.py 2>/dev/null \
      | grep -E 'cuda|grouped|validation|modules' \
      | tr '\n' ' ')"
  fi
  if [[ -n "$GPU_TEST_FILES" ]]; then
    # shellcheck disable=SC2086 - a list of paths
    stage tests_regular 60 env SWITCH_DIT_AUTOTUNE="${TEST_AUTOTUNE:-0}" \
      "$PY" -m pytest $GPU_TEST_FILES -q -m "not gpu" -p no:cacheprovider \
      -p no:randomly ${XDIST[@]+"${XDIST[@]}"}
  fi
fi

stage saved_act 30 "$PY" -m benchmarks.saved_activations --device "$DEVICE" \
  --json "$OUT/saved_activations.json"

stage hf_moe 60 env SWITCH_DIT_AUTOTUNE="${HF_MOE_AUTOTUNE:-0}" "$PY" -m benchmarks.hf_moe \
  --device "$DEVICE" ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"} --budget-s "$(py_budget 60)"
HF_MOE_TABLE="$(awk '/^impl  /{buf=""} {buf=buf $0 "\n"} END{printf "%s", buf}' "$TMPD/hf_moe.log" 2>/dev/null)"

# ---- summary ---------------------------------------------------------------------------------
{
  echo "# GPU check $(date -u '+%Y-%m-%d %H:%M UTC'), $(( $(date +%s) - START ))s"
  echo
  [[ -f "$OUT/env.json" ]] && { echo '```'; cat "$OUT/env.json"; echo '```'; }
} > "$OUT/summary.md"
JSONS=()
for f in moe_layer_switch moe_layer_ffn train_step; do
  [[ -f "$OUT/$f.json" ]] && JSONS+=("$OUT/$f.json")
done
if (( ${#JSONS[@]} )); then
  timeout -k 5 30 "$PY" -m benchmarks.plot --tables --no-png "${JSONS[@]}" >> "$OUT/summary.md" 2>> "$LOG" \
    || echo "(tables failed: see gpu_check.log)" >> "$OUT/summary.md"
fi
DECIDE_JSONS=()
for f in moe_layer_switch train_step; do [[ -f "$OUT/$f.json" ]] && DECIDE_JSONS+=("$OUT/$f.json"); done
if (( ${#DECIDE_JSONS[@]} )); then  # the default-setting decisions this run is for
  { echo; timeout -k 5 30 "$PY" -m benchmarks.decide "${DECIDE_JSONS[@]}"; } >> "$OUT/summary.md" 2>> "$LOG" \
    || echo "(decisions failed: see gpu_check.log)" >> "$OUT/summary.md"
fi
if [[ "$HF_MOE_TABLE" == impl* ]]; then
  { echo; echo "## hf_moe (benchmarks.hf_moe)"; echo; echo '```'; printf '%b\n' "$HF_MOE_TABLE"; echo '```'; } >> "$OUT/summary.md"
fi
{ echo; echo "## Stages"; echo; cat "$STAGES"; } >> "$OUT/summary.md"
rm -rf "$TMPD"
cat "$OUT/summary.md"
echo
echo "files under $OUT:"; ls -la "$OUT"
