# Two commands that work on a fresh machine:
#   make test    set up, build, run the test suite
#   make bench   set up, build, validate and benchmark on whatever device is present
# two install routes that CI (.ci/run) checks after the tests, each compiling the extension from scratch:
#   make check-sdist        sdist -> unpacked -> wheel against .venv's torch -> import from outside the tree
#   make check-cuda-build   the same with CUDA on, in .venv-cuda (a CUDA build of torch; .venv is untouched)
# and one for a GPU machine that brings its own python3/torch/triton and has no package registry:
#   make gpu-check OUT=dir
# and, without a GPU, `make sm90-report`: the sm_90 compile figures of every kernel (benchmarks/results/sm90-static.md)
#
# torch is pinned here (the CPU wheel on this kind of machine); the package itself asks for torch>=2.5.

PYTHON_BOOT ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
TORCH       := torch==2.13.0
TRITON      := triton==3.7.*
DEV_DEPS    := ninja pybind11 "setuptools>=64" wheel build pytest pytest-benchmark numpy transformers expecttest accelerate matplotlib
SOURCES     := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*.inc csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
OUT         ?= out
COMMIT      ?= $(shell git rev-parse --short HEAD 2>/dev/null)

.PHONY: setup build test bench gpu-check info clean check-sdist check-cuda-build sm90-report

setup: $(VENV)/.deps

$(VENV)/.deps: Makefile
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH) "$(TRITON)" $(DEV_DEPS)
	touch $@

build: $(VENV)/.built

# Editable install without build isolation: the extension compiles against the venv's torch.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=2 $(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import ptm_kernels._C"
	touch $@

info: build
	$(PY) -m ptm_kernels.info

test: build
	$(PY) -m ptm_kernels.info
	$(PY) -m pytest tests -q -ra --durations=15

bench: build
	$(PY) -m ptm_kernels.info
	$(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-columns=median,rounds \
		--benchmark-json=benchmarks/results/last-run.json
	$(PY) -m benchmarks.report benchmarks/results/last-run.json

# What ptxas makes of every kernel config the launchers choose on sm_90 (registers, spills, shared memory,
# occupancy, MMA kind, TMA), beside the Triton tutorial's attention; no GPU needed (a few minutes on 2 cores).
sm90-report: setup
	$(PY) -m tests.compile.sm90_report --out benchmarks/results/sm90-static.md

# On an H100/H200 lent for a few minutes: its own python3 (torch, triton, nvcc, ninja), no registry. One call
# gets 10 minutes, so each step is time-boxed and writes its log as it goes: the op tests and benchmarks (the
# kernels themselves) run before the model ones, and whatever finished is reported. Pass COMMIT=<sha> when
# the copy has no .git, so that the results name the commit they measured.
GPU_PYTEST := python3 -m pytest -q -p no:cacheprovider
gpu-check:
	mkdir -p $(OUT)
	( nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; echo "commit $(COMMIT)" ) > $(OUT)/device.txt 2>&1
	PTM_KERNELS_BUILD_CUDA=1 MAX_JOBS=16 python3 -m pip install --no-deps --no-build-isolation -e . > $(OUT)/build.log 2>&1 \
		|| { tail -50 $(OUT)/build.log; exit 1; }
	python3 -m ptm_kernels.info > $(OUT)/info.txt 2>&1; cat $(OUT)/info.txt
	-timeout 180 $(GPU_PYTEST) -ra --maxfail=50 tests/ops tests/test_info.py > $(OUT)/tests-ops.log 2>&1; tail -15 $(OUT)/tests-ops.log
	-timeout 120 $(GPU_PYTEST) benchmarks/test_attention.py benchmarks/test_memory_bound_ops.py benchmarks/test_relative_attention.py \
		--benchmark-json=$(OUT)/bench-ops.json > $(OUT)/bench-ops.log 2>&1; tail -3 $(OUT)/bench-ops.log
	-timeout 60 $(GPU_PYTEST) -ra --maxfail=20 tests/models > $(OUT)/tests-models.log 2>&1; tail -5 $(OUT)/tests-models.log
	-timeout 60 $(GPU_PYTEST) benchmarks/test_models_encoders.py benchmarks/test_models_decoders.py \
		benchmarks/test_models_seq2seq.py benchmarks/test_models_relative.py benchmarks/test_models_reformer.py \
		--benchmark-json=$(OUT)/bench-models.json > $(OUT)/bench-models.log 2>&1; tail -3 $(OUT)/bench-models.log
	-PTM_KERNELS_COMMIT=$(COMMIT) python3 -m benchmarks.report $(OUT)/bench-ops.json $(OUT)/bench-models.json --out $(OUT)

# ------------------------------------------------------------------------------------------ install routes
# Rerun only when a source, MANIFEST.in or the check itself changed (the stamps live in build/).
INSTALL_INPUTS := $(SOURCES) MANIFEST.in $(wildcard ptm_kernels/*.py ptm_kernels/*/*.py models/*.py) \
                  tests/install/build_from_sdist.sh tests/install/check_installed.py

check-sdist: build/check-sdist.ok

build/check-sdist.ok: $(VENV)/.deps $(INSTALL_INPUTS)
	tests/install/build_from_sdist.sh $(PY) build/check-sdist target
	touch $@

# The CUDA build of torch in its own venv. pip's '===' is exact string equality: it does not match the
# '2.13.0+cpu' wheel in this machine's find-links folder (which '==' would prefer), so pip takes torch 2.13.0
# from the index, the CUDA build (0.5 GB; with its nvidia-* runtime packages the venv is about 4.3 GB).
CUDA_VENV  ?= .venv-cuda
CUDA_PY    := $(CUDA_VENV)/bin/python
CUDA_TORCH := torch===2.13.0
CUDA_DEPS  := $(CUDA_VENV)/.deps-$(subst =,,$(CUDA_TORCH))

$(CUDA_DEPS):
	test -x $(CUDA_PY) || $(PYTHON_BOOT) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install -q --upgrade pip
	$(CUDA_PY) -m pip install -q "$(CUDA_TORCH)" ninja pybind11 "setuptools>=64" wheel build numpy
	$(CUDA_PY) -c "import torch; assert torch.version.cuda, torch.__version__ + ' is not a CUDA build'"
	touch $@

check-cuda-build: build/check-cuda.ok

build/check-cuda.ok: $(CUDA_DEPS) $(INSTALL_INPUTS)
	@command -v nvcc >/dev/null || test -n "$$CUDA_HOME" \
		|| { echo "check-cuda-build needs the CUDA toolkit: nvcc on PATH or CUDA_HOME"; exit 1; }
	tests/install/build_from_sdist.sh $(CUDA_PY) build/check-cuda venv --cuda
	touch $@

clean:
	rm -rf build *.egg-info ptm_kernels/*.so $(VENV)/.built
