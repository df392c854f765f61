# The two commands: `make demo` (verify and profile a CLIP model) and `make test` (the test suite).
# Both create .venv on first use and install the project into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
EXTRAS ?= test,integrations

.PHONY: demo test test-gpu aot aot-full bench gpu-suite clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# Re-install only when the packaging changes.
$(VENV)/.installed-$(EXTRAS): setup.py | $(PY)
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

# verify (numerics, module by module) then profile: ViT-B-16 in bf16 on a GPU, a tiny model through the
# Triton interpreter on CPU.
demo: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m clipfast.cli verify
	$(PY) -m clipfast.cli bench model

# tests/ (interpreter kernels vs float64, AOT quick subset, CLI) and bench/ (the benchmark smoke pass)
test: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m pytest -q

aot: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m clipfast.aot --quick

aot-full: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m clipfast.aot

bench: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m clipfast.cli bench all

# The GPU check (at most 8 minutes on an H100/H200; a rehearsal without CUDA), results in OUT.
OUT ?= out/gpu-check
gpu-suite:
	PYTHON=$(if $(wildcard $(PY)),$(PY),python3) bash bench/gpu_suite.sh $(OUT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
