# Entry points: `make demo` (the main job on the bundled digits data) and `make test`.
# Both create or reuse the virtualenv $(VENV); on a machine without torch they install the CPU
# wheel first (a plain `torch` requirement would pull a multi-GB CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?= -q -n 2
# Local wheel folder used by this project's CI machines when it exists.
WHEELS := $(wildcard /opt/wheels)
FIND_LINKS := $(if $(WHEELS),--find-links $(WHEELS),)

.PHONY: venv install test demo bench-cpu clean

$(PY):
	python3 -m venv $(VENV)

venv: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || { \
	  echo "installing the CPU build of torch"; \
	  $(PIP) install -q $(FIND_LINKS) torch==2.13.0 \
	  || $(PIP) install -q torch --index-url https://download.pytorch.org/whl/cpu; }

install: venv
	$(PIP) install -q $(FIND_LINKS) -e ".[test]"

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(PY) -m switch_dit.demo

bench-cpu: install
	$(PY) -m pytest benchmarks/test_bench_cpu.py --benchmark-only -q

clean:
	rm -rf build *.egg-info switch_dit_kernels/_C*.so results

.PHONY: bench-gpu plots
bench-gpu:
	bash benchmarks/gpu_check.sh

plots: install
	$(PY) -m benchmarks.plot benchmarks/results/*/*.json --tables

.PHONY: compile-check
# The Hopper codegen gate (no GPU needed): every Triton kernel compiled for sm_90 by Triton 3.6, the
# GPU machines' version, in its own virtualenv beside the CPU torch; fails on a compile error, a
# serialised wgmma main loop (only wgmma.wait_group 0, or ptxas C7515) or a spill in a config the
# autotuner may keep. QUICK=1: one config per kernel and the untuned launch path (minutes, not 15+).
TRITON36_VENV ?= .venv-triton36
PY36 := $(TRITON36_VENV)/bin/python
COMPILE_CHECK_ARGS ?=

$(PY36):
	python3 -m venv $(TRITON36_VENV)
	$(PY36) -m pip install -q $(FIND_LINKS) torch==2.13.0 \
	  || $(PY36) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PY36) -m pip install -q triton==3.6.0 numpy

compile-check: $(PY36)
	$(if $(QUICK),SWITCH_DIT_AUTOTUNE=0 ,)$(PY36) benchmarks/compile_check.py --gate $(if $(QUICK),--configs quick,) $(COMPILE_CHECK_ARGS)
