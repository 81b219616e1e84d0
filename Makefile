# Every target installs what it needs into $(VENV) first, so each works on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= cpu,dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

VARIANT ?= hiera_tiny_224
WEIGHTS ?= random
REPO ?= model_repository
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=

.PHONY: install test test-fast lint export run bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[$(EXTRAS)]'
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

# Raw runtime vs the HTTP service in one run; prints a table and writes bench/results/*.json.
bench: $(STAMP)
	test -f $(REPO)/$(VARIANT)/manifest.json || $(VENV)/bin/hiera-export --variant $(VARIANT) \
		--weights $(WEIGHTS) --out $(REPO)
	$(VENV)/bin/hiera-bench --model-repository $(REPO)/$(VARIANT) $(ARGS)

# Serves VARIANT with WEIGHTS (random by default, so it works offline; loudly labelled as such).
# The ONNX export lands in REPO and is reused while the weights stay the same.
run: $(STAMP)
	$(VENV)/bin/hiera-serve --variant $(VARIANT) --weights $(WEIGHTS) --export-dir $(REPO) \
		--host $(HOST) --port $(PORT) --log-format text $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
