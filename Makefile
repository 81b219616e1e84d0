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

.PHONY: install test test-fast lint lint-deploy docs docs-serve container-smoke export run bench gpu-check clean

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
	$(VENV)/bin/mypy docs/hooks/generated.py

# The documentation site (mkdocs.yml, docs/) into build/site. --strict: a broken link, a page
# missing from the navigation or a stale generated block fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict

# Deployment files, checked by real tools: hadolint, Docker Compose v2, promtool, yamllint,
# kubectl kustomize + kubernetes-validate, and the Grafana dashboard against a live /metrics.
# A missing tool fails the target (promtool: `apt-get install --no-install-recommends prometheus`).
DEPLOY_STAMP := $(VENV)/.deploy-check-installed
K8S_VERSION ?= 1.30.0
# Custom resources kubernetes-validate has no schema for; any other unknown kind fails.
K8S_CRDS := ServiceMonitor|ServingRuntime|InferenceService
COMPOSE = $(shell $(PY) -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')

$(DEPLOY_STAMP): $(STAMP) deploy/check-requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r deploy/check-requirements.txt
	touch $@

lint-deploy: $(DEPLOY_STAMP)
	@command -v promtool >/dev/null || { echo "lint-deploy: promtool missing: apt-get install --no-install-recommends prometheus" >&2; exit 1; }
	$(VENV)/bin/hadolint docker/Dockerfile*
	$(COMPOSE) -f docker-compose.yml config --quiet
	$(COMPOSE) -f docker-compose.yml -f docker-compose.cpu.yml config --quiet
	$(COMPOSE) -f docker-compose.yml --profile retrieval config --quiet
	promtool check config docker/prometheus/prometheus.yml
	promtool check rules docker/prometheus/rules/*.yml
	promtool test rules docker/prometheus/tests/*.test.yml
	$(VENV)/bin/yamllint --strict docker-compose.yml docker-compose.cpu.yml docker/ deploy/
	@set -e; for dir in deploy/base deploy/overlays/* deploy/kserve; do \
		echo "kubectl kustomize $$dir | kubernetes-validate --strict -k $(K8S_VERSION)"; \
		$(VENV)/bin/kubectl kustomize $$dir > $(VENV)/.kustomized.yaml; \
		$(VENV)/bin/kubernetes-validate --strict --quiet -k $(K8S_VERSION) $(VENV)/.kustomized.yaml \
			> $(VENV)/.validated.log 2>&1 || { cat $(VENV)/.validated.log; exit 1; }; \
		cat $(VENV)/.validated.log; \
		if grep -v -E "for kind ($(K8S_CRDS)) with" $(VENV)/.validated.log | grep -q .; then \
			echo "lint-deploy: $$dir: a resource was not validated" >&2; exit 1; fi; \
	done
	$(PY) -m pytest -q -p no:cacheprovider tests/deploy/test_grafana_dashboard.py
	# The GPU pins must resolve together, on one CUDA major (metadata only; nothing installed).
	$(PY) -m pip install --dry-run --ignore-installed --quiet --disable-pip-version-check \
		--report $(VENV)/.gpu-resolve.json -c constraints-gpu.txt '.[gpu]'
	$(PY) deploy/check_gpu_pins.py $(VENV)/.gpu-resolve.json constraints-gpu.txt

# Build docker/Dockerfile.cpu with podman (no registry: a debootstrap base), run it, query it.
# Minutes and gigabytes: not part of .ci/run.
container-smoke:
	bash docker/container-smoke.sh

export: $(STAMP)
	$(VENV)/bin/hiera-export --variant $(VARIANT) --weights $(WEIGHTS) --out $(REPO) --overwrite $(ARGS)

# Raw runtimes (fp32, int8, bf16), hiera-serve and a plain FastAPI app in one run; prints a
# Markdown table and writes docs/bench/bench-*.json and the two plots (the Benchmarks page). Exports (again, with the
# int8 artifact) when the repository has no onnx_int8 yet.
# An existing export is reused only if it loads (checksums, format, sealed contract) and has int8.
bench: $(STAMP)
	$(PY) -c "import sys; from model.artifacts import ModelRepository as R; \
		sys.exit('onnx_int8' not in R.load('$(REPO)/$(VARIANT)').manifest.artifacts)" \
		2>/dev/null || $(VENV)/bin/hiera-export \
		--variant $(VARIANT) --weights $(WEIGHTS) --out $(REPO) \
		--formats onnx,torchscript,onnx_int8 --overwrite
	$(VENV)/bin/hiera-bench --model-repository $(REPO)/$(VARIANT) $(ARGS)

# Every GPU path against CPU fp32 on real photos, then Hiera-B fp16 throughput (a table, and
# docs/bench/gpu-check-*.json for the Benchmarks page). Exits 77 (skipped) on a machine without a CUDA device.
gpu-check: $(STAMP)
	$(PY) -m bench.gpu_check $(ARGS)

# Serves VARIANT with WEIGHTS (random by default, so it works offline; loudly labelled as such).
# The ONNX export lands in REPO and is reused while the weights stay the same.
run: $(STAMP)
	$(VENV)/bin/hiera-serve --variant $(VARIANT) --weights $(WEIGHTS) --export-dir $(REPO) \
		--host $(HOST) --port $(PORT) --log-format text $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
