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

# The editable install runs once per venv and again only when what it builds from changes (a stamp
# file in the venv): it also builds the optional CUDA extension whenever nvcc is found, about 30 s
# even on a machine without a GPU. The stamp's name carries this checkout's path, so two clones
# sharing one VENV each install themselves; `make clean` or a changed setup.py / pyproject.toml /
# CMakeLists.txt / csrc file re-runs it.
INSTALL_STAMP := $(VENV)/.switch-dit-installed-$(shell printf '%s' '$(CURDIR)' | cksum | cut -d' ' -f1)
INSTALL_INPUTS := setup.py pyproject.toml CMakeLists.txt $(wildcard csrc/*)
# Mirrors setup.py's find_nvcc and SWITCH_DIT_BUILD_CUDA, only to tell the user what takes time.
NVCC := $(or $(shell command -v nvcc 2>/dev/null),$(firstword $(wildcard $(CUDA_HOME)/bin/nvcc \
          $(CUDA_PATH)/bin/nvcc /usr/local/cuda/bin/nvcc)))
BUILDS_CUDA := $(if $(filter 0 false no off,$(SWITCH_DIT_BUILD_CUDA)),,$(NVCC))

.PHONY: venv install test demo bench-cpu clean

$(PY):
	python3 -m venv $(VENV)

# find_spec, not `import torch`: the check runs before every target, and importing torch takes
# seconds on a busy machine.
venv: $(PY)
	@$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" || { \
	  echo "installing the CPU build of torch"; \
	  $(PIP) install -q $(FIND_LINKS) torch==2.13.0 \
	  || $(PIP) install -q torch --index-url https://download.pytorch.org/whl/cpu; }

$(INSTALL_STAMP): $(INSTALL_INPUTS) | venv
	@echo "installing switch-dit (editable, with its test extras) into $(VENV)"
	@$(if $(BUILDS_CUDA),echo "building the optional CUDA extension with $(BUILDS_CUDA)" \
	  "(about 30 s; SWITCH_DIT_BUILD_CUDA=0 skips it)")
	$(PIP) install -q $(FIND_LINKS) -e ".[test]"
	@touch $@

install: $(INSTALL_STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(PY) -m switch_dit.demo

bench-cpu: install
	$(PY) -m pytest benchmarks/test_bench_cpu.py --benchmark-only -q

clean:
	rm -rf build *.egg-info switch_dit_kernels/_C*.so results $(INSTALL_STAMP)

.PHONY: bench-gpu plots
bench-gpu:
	bash benchmarks/gpu_check.sh

# Every JSON under benchmarks/results/ (a fresh clone holds only CPU results; `make bench-gpu`
# adds the GPU ones).
plots: install
	$(PY) -m benchmarks.plot --tables

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
