# kdops: `make test` and `make bench` set everything up on a fresh machine.
#
#   make test    venv + deps, the mmdetection 3.x stack (mmcv 2.1.0 built from its sdist once per
#                machine and torch version, then cached: tools/install_mmdet.sh), detectron2 0.6 as
#                pure Python (tools/install_detectron2.sh), build (C++ CPU
#                kernels; CUDA sources compiled with FORCE_CUDA=1 as a compile check when a CUDA
#                toolkit is found), pytest (ops, losses, and the mmdet plug-in on the real
#                trainer), then the Triton kernels under
#                TRITON_INTERPRET=1 in their own pytest process, then the C++ kernels' tests again
#                against an AddressSanitizer + UBSan build (tests/sanitize.sh, build/sanitize/).
#   make bench   venv + deps, build (C++ only without a GPU; reuses make test's build), a quick
#                `kdops bench` (one case per op, COCO sizes) -> bench-results/<device>/ (untracked);
#                `kdops bench --full --out benchmarks/results` writes the committed results.
#
# On a machine with its own torch (e.g. a GPU box without internet): `make test SYSTEM_PYTHON=1`
# (no mmdet/detectron2 install there: the plug-ins' tests skip; MMDET=1 asks for them).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEPS ?= "numpy<2" ninja pytest matplotlib "setuptools<81" wheel
MAX_JOBS ?= 2
TORCH_CUDA_ARCH_LIST ?= 9.0

ifeq ($(SYSTEM_PYTHON),1)
PY := $(PYTHON)
DEPS_STAMP :=
MMDET ?= 0
else
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.stamp-deps
MMDET ?= 1
endif
# mmcv 2.1.0's ~10-minute build is paid once per machine and torch version (see tools/install_mmdet.sh).
KDOPS_WHEEL_CACHE ?= $(HOME)/.cache/kdops/wheels
MMDET_STAMP := $(if $(filter 1,$(MMDET)),.stamp-mmdet .stamp-detectron2,)

# The nvcc on PATH can be a wrapper one folder below the real toolkit (see docs/environment.md).
NVCC := $(shell command -v nvcc 2>/dev/null)
CUDA_HOME ?= $(shell if [ -n "$(NVCC)" ]; then d="$$(dirname "$$(dirname "$$(readlink -f "$(NVCC)")")")"; \
	for c in "$$(dirname "$$(dirname "$(NVCC)")")/cuda-13.0" "$$d"; do \
	  if [ -x "$$c/bin/nvcc" ] && [ -d "$$c/include" ]; then echo "$$c"; break; fi; done; fi)
FORCE_CUDA ?= $(if $(CUDA_HOME),1,0)
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: test bench build deps mmdet detectron2 clean sanitize

test: $(MMDET_STAMP) build
	@echo "== pytest (C++ CPU kernels, references, losses) =="
	$(PY) -m pytest -q -m "not triton" tests
	@echo "== pytest (Triton kernels under TRITON_INTERPRET=1) =="
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton tests
	@echo "== pytest (C++ CPU kernels built with AddressSanitizer + UBSan, hostile-input fuzz) =="
	bash tests/sanitize.sh $(PY)

sanitize: deps
	bash tests/sanitize.sh $(PY)

# make bench: the quick selection (BENCH_ARGS="--full" for every case) into the untracked bench-results/
# (BENCH_OUT=benchmarks/results writes the committed folder). It compiles no CUDA on a machine without a
# GPU: the CUDA compile check stays in `make test`.
BENCH_OUT ?= bench-results
BENCH_ARGS ?=
BENCH_GPU := $(shell nvidia-smi -L 2>/dev/null | grep -q GPU && echo 1 || echo 0)
BENCH_FORCE_CUDA ?= $(if $(filter 1,$(BENCH_GPU)),$(FORCE_CUDA),0)

bench: .stamp-build-bench
	@KDOPS_BACKEND= $(PY) -c "import kdops, sys; sys.exit(0 if kdops.HAS_C else 1)" 2>/dev/null || \
	  { echo "== kdops._C does not load (e.g. after make clean): building again =="; rm -f .stamp-build-bench; \
	    $(MAKE) --no-print-directory .stamp-build-bench; }
	$(PY) -m kdops.cli bench --out $(BENCH_OUT) $(BENCH_ARGS)

# Reuses `make test`'s build while it is up to date (.stamp-build newer than every source); else builds
# the C++ kernels (CUDA sources too only where a GPU is visible) without touching .stamp-build, so a
# later `make test` still compiles the CUDA sources.
.stamp-build-bench: $(DEPS_STAMP) $(SOURCES)
	@if [ -f .stamp-build ] && [ -z "$$(find $(SOURCES) -newer .stamp-build 2>/dev/null)" ]; then \
	  echo "== build: reusing the build of make test (.stamp-build) =="; \
	else \
	  if [ "$(BENCH_FORCE_CUDA)" = "1" ]; then echo "== build: C++ + CUDA sources (a GPU is visible) =="; \
	  else echo "== build: C++ only (no GPU visible: CUDA sources not compiled; make test compiles them) =="; fi; \
	  FORCE_CUDA=$(BENCH_FORCE_CUDA) CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" \
	    MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-build-isolation --no-deps -e . || exit 1; \
	fi
	KDOPS_BACKEND= $(PY) -c "import kdops, sys; sys.exit(0 if kdops.HAS_C else 'kdops._C failed to load')"
	touch $@

deps: $(DEPS_STAMP)

mmdet: .stamp-mmdet

detectron2: .stamp-detectron2

# detectron2 0.6 as pure Python (no wheels exist; the PyPI sdist lacks its C++ sources): ~20 s.
.stamp-detectron2: $(DEPS_STAMP) tools/install_detectron2.sh
	bash tools/install_detectron2.sh $(PY)
	touch $@

.stamp-mmdet: $(DEPS_STAMP) tools/install_mmdet.sh
	CUDA_HOME=$(CUDA_HOME) MAX_JOBS=$(MAX_JOBS) KDOPS_WHEEL_CACHE=$(KDOPS_WHEEL_CACHE) bash tools/install_mmdet.sh $(PY)
	touch $@

$(VENV)/.stamp-deps:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q $(TORCH_PINS) $(DEPS)
	touch $@

build: .stamp-build

.stamp-build: $(DEPS_STAMP) $(SOURCES)
	@if [ "$(FORCE_CUDA)" = "1" ]; then echo "== build: C++ + CUDA sources (CUDA_HOME=$(CUDA_HOME)) =="; \
	 else echo "== build: C++ only (no CUDA toolkit found: CUDA sources not compiled) =="; fi
	FORCE_CUDA=$(FORCE_CUDA) CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" \
	  MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import kdops, sys; sys.exit(0 if kdops.HAS_C else 'kdops._C failed to load')"
	touch $@

clean:
	rm -rf build kdops/_C*.so .stamp-build .stamp-build-bench .stamp-mmdet .stamp-detectron2 *.egg-info
