# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CUDA kernels are built only where a GPU can run them; .ci/run compile-checks them separately.
S2H_SKIP_CUDA ?= $(if $(shell command -v nvidia-smi 2>/dev/null),0,1)
export S2H_SKIP_CUDA
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: setup install data demo test test-fast bench cuda-check portable-check wheel gpu-static gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Pinned torch/torchvision (CUDA 13.0 builds); the rest from PyPI.
$(VENV)/.deps: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -r requirements.txt
	touch $@

install: $(VENV)/.deps
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .

setup: install

# Fashion-MNIST, the benchmark of the accuracy studies: Debian's package (four idx files under
# /usr/share/datasets/fashion-mnist). Installed where apt-get can run (root); elsewhere it says how.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
data:
	@if [ -f $(FASHION_MNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) && \
	    echo "installed dataset-fashion-mnist"; \
	else echo "Fashion-MNIST not installed: run 'sudo apt-get install dataset-fashion-mnist', or put the four" \
	    "*-idx*-ubyte.gz files in a folder and set S2H_DATA to it (its tests are skipped until then)"; fi

demo: install
	$(BIN)/python -m s2h demo

test: install data
	$(BIN)/python -m pytest tests benchmarks --benchmark-disable -q

test-fast: install
	$(BIN)/python -m pytest tests -q -m "not slow"

bench: install
	$(BIN)/python -m pytest benchmarks --benchmark-only --benchmark-columns=min,median,mean,rounds --benchmark-json=benchmarks/results/cpu.json

# The only check CUDA C++ gets without a GPU: build every .cu for sm_90 (a full link, out of tree).
cuda-check: $(VENV)/.deps
	@start=$$(date +%s); \
	S2H_SKIP_CUDA=0 S2H_CUDA_ARCHS="9.0" $(BIN)/python setup.py -q build_ext \
	    --build-temp build/cuda-check/tmp --build-lib build/cuda-check/lib && \
	echo "CUDA compile check (sm_90): $$(( $$(date +%s) - start )) s"
	$(BIN)/python tools/check_cuda_build.py build/cuda-check/lib/s2h_kernels/_C*.so

# The C++ sources with clang (x86-64) and GCC for aarch64 (Grace Hopper, Graviton), which setup.py
# does not use here; missing compilers are apt-get installed when running as root, else skipped.
portable-check: $(VENV)/.deps
	$(BIN)/python tools/check_portable_build.py --install

# A wheel for S2H_CUDA_ARCHS (default 8.0;9.0): `make wheel S2H_CUDA_ARCHS="8.0;9.0a"`.
# It then lists the cubins in the wheel with cuobjdump and fails unless they are exactly those.
S2H_CUDA_ARCHS ?= 8.0;9.0
wheel: $(VENV)/.deps
	rm -rf dist build/wheel
	S2H_SKIP_CUDA=0 S2H_CUDA_ARCHS="$(S2H_CUDA_ARCHS)" $(BIN)/python -m pip wheel --no-build-isolation --no-deps -w dist .
	$(BIN)/pip install -q nvidia-cuda-cuobjdump
	$(BIN)/python tools/check_wheel_archs.py dist/s2h-*.whl "$(S2H_CUDA_ARCHS)"

# Without a GPU: every Triton kernel compiled for sm_80/sm_90 and every .cu by nvcc, with registers, spills,
# shared memory, theoretical occupancy and roofline estimates -> benchmarks/results/gpu_static.md (~5 min on 2 cores).
gpu-static: install
	$(BIN)/python tools/gpu_resources.py

# On a machine with a CUDA GPU: gpu tests, fused-vs-eager/compile benchmarks, two-stream overlap, a 1-epoch
# prune run -> benchmarks/results/gpu_<device>.md; exits 1 on any mismatch. Without a GPU: says so, exits 0.
gpu-check: install
	$(BIN)/python tools/gpu_check.py

clean:
	rm -rf build dist *.egg-info s2h_kernels/_C*.so
