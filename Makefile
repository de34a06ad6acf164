# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch 2.13.0 (CPU) is on this machine's disk; the constraint keeps pip from fetching a CUDA build.
PIPFLAGS := --disable-pip-version-check -q -c constraints.txt
DEMO_OUT := build/demo-merged

.PHONY: demo test install install-test fixtures bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.core: $(PY) pyproject.toml constraints.txt
	$(PIP) install $(PIPFLAGS) -e '.[hf]'
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PIP) install $(PIPFLAGS) -e '.[test,onnx,hf]'
	touch $@

install: $(VENV)/.core
install-test: $(VENV)/.test

demo: $(VENV)/.core
	mkdir -p build
	$(PY) -m loramerge apply fixtures/bases/llama-fp32 fixtures/adapters/llama-basic $(DEMO_OUT) --overwrite --verify

test: $(VENV)/.test
	$(PY) -m pytest -q tests

fixtures: $(VENV)/.test
	$(PY) fixtures/make_fixtures.py

bench: $(VENV)/.test
	$(PY) bench/bench_apply.py

clean:
	rm -rf build $(VENV)
