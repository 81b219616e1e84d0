# Every target installs what it needs into $(VENV) first, so each works on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
# A host with an NVIDIA GPU gets the GPU runtime (onnxruntime-gpu, NVML) pinned by
# constraints-gpu.txt; every other host gets the CPU one. Override with GPU=yes or GPU=no.
GPU ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes || echo no)
ifeq ($(GPU),yes)
EXTRAS ?= gpu,dev
CONSTRAINTS ?= -c constraints.txt -c constraints-gpu.txt
else
EXTRAS ?= cpu,dev
CONSTRAINTS ?= -c constraints.txt
endif
PY := $(VENV)/bin/python
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

VARIANT ?= hiera_tiny_224
WEIGHTS ?= random
REPO ?= model_repository
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=

.PHONY: install test test-fast lint export run bench gpu-check clean

$(STAMP): pyproject.toml $(wildcard constraints*.txt)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# onnxruntime and onnxruntime-gpu install the same module: never keep both.
	case ",$(EXTRAS)," in *,gpu,*) $(PY) -m pip uninstall -qy onnxruntime 2>/dev/null ;; \
		*) $(PY) -m pip uninstall -qy onnxruntime-gpu 2>/dev/null ;; esac
	$(PY) -m pip install --quiet --disable-pip-version-check $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

export: $(STAMP)
	$(VENV)/bin/hiera-export --variant $(VARIANT) --weights $(WEIGHTS) --out $(REPO) --overwrite $(ARGS)

# Raw runtimes (fp32, int8, bf16), hiera-serve and a plain FastAPI app in one run; prints a
# Markdown table and writes bench/results/*.json, *.md and *.png. Exports (again, with the
# int8 artifact) when the repository has no onnx_int8 yet.
bench: $(STAMP)
	grep -qs '"onnx_int8"' $(REPO)/$(VARIANT)/manifest.json || $(VENV)/bin/hiera-export \
		--variant $(VARIANT) --weights $(WEIGHTS) --out $(REPO) \
		--formats onnx,torchscript,onnx_int8 --overwrite
	$(VENV)/bin/hiera-bench --model-repository $(REPO)/$(VARIANT) $(ARGS)

# Every GPU path against CPU fp32 on real photos, then Hiera-B fp16 throughput (JSON + table in
# bench/results/gpu-check). Exits 77 (skipped) on a machine without a CUDA device.
gpu-check: $(STAMP)
	$(PY) -m bench.gpu_check $(ARGS)

# Serves VARIANT with WEIGHTS (random by default, so it works offline; loudly labelled as such).
# The ONNX export lands in REPO and is reused while the weights stay the same.
run: $(STAMP)
	$(VENV)/bin/hiera-serve --variant $(VARIANT) --weights $(WEIGHTS) --export-dir $(REPO) \
		--host $(HOST) --port $(PORT) --log-format text $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
