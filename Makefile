# kdops: `make test` and `make bench` set everything up on a fresh machine.
#
#   make test    venv + deps, build (C++ CPU kernels; CUDA sources compiled with FORCE_CUDA=1 as a
#                compile check when a CUDA toolkit is found), pytest, then the Triton kernels under
#                TRITON_INTERPRET=1 in their own pytest process, then the C++ kernels' tests again
#                against an AddressSanitizer + UBSan build (tests/sanitize.sh, build/sanitize/).
#   make bench   venv + deps, build, `kdops bench` on the default COCO problem on the best device;
#                results go to benchmarks/results/<device>/.
#
# On a machine with its own torch (e.g. a GPU box without internet): `make test SYSTEM_PYTHON=1`.

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
else
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.stamp-deps
endif

# The nvcc on PATH can be a wrapper one folder below the real toolkit (see ENVIRONMENT.md).
NVCC := $(shell command -v nvcc 2>/dev/null)
CUDA_HOME ?= $(shell if [ -n "$(NVCC)" ]; then d="$$(dirname "$$(dirname "$$(readlink -f "$(NVCC)")")")"; \
	for c in "$$(dirname "$$(dirname "$(NVCC)")")/cuda-13.0" "$$d"; do \
	  if [ -x "$$c/bin/nvcc" ] && [ -d "$$c/include" ]; then echo "$$c"; break; fi; done; fi)
FORCE_CUDA ?= $(if $(CUDA_HOME),1,0)
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: test bench build deps clean sanitize

test: build
	@echo "== pytest (C++ CPU kernels, references, losses) =="
	$(PY) -m pytest -q -m "not triton" tests
	@echo "== pytest (Triton kernels under TRITON_INTERPRET=1) =="
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton tests
	@echo "== pytest (C++ CPU kernels built with AddressSanitizer + UBSan, hostile-input fuzz) =="
	bash tests/sanitize.sh $(PY)

sanitize: deps
	bash tests/sanitize.sh $(PY)

bench: build
	$(PY) -m kdops.cli bench --out benchmarks/results

deps: $(DEPS_STAMP)

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
	rm -rf build kdops/_C*.so .stamp-build *.egg-info
