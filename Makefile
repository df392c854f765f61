# The two commands: `make demo` (verify and profile a CLIP model) and `make test` (the test suite).
# Both create .venv on first use and install the project into it, at the versions pinned in
# constraints/cpu.txt. `make compat` runs the suite again with the GPU machine's versions.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
EXTRAS ?= test,integrations
CONSTRAINTS ?= constraints/cpu.txt

.PHONY: demo test test-cpu-variants test-numerics-variant test-gpu aot aot-full bench gpu-suite compat clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade -c $(CONSTRAINTS) pip setuptools wheel

# Re-install only when the packaging or the pins change.
$(VENV)/.installed-$(EXTRAS): setup.py $(CONSTRAINTS) | $(PY)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $@

# verify (numerics, module by module) then profile: ViT-B-16 in bf16 on a GPU, a tiny model through the
# Triton interpreter on CPU.
demo: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m clipfast.cli verify
	$(PY) -m clipfast.cli bench model

# tests/ (interpreter kernels vs float64, AOT quick subset, CLI) and bench/ (the benchmark smoke pass), then
# a short numerics selection on another CPU path (test-numerics-variant).
test: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-numerics-variant

# The numerics tolerances must not depend on the CPU that computes eager's error: a short selection of
# numerics tests (~1-2 minutes on 2 cores) on PyTorch's non-vectorized kernels, single-threaded.
NUMERICS_VARIANT ?= ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1
NUMERICS_SELECTION ?= tests/test_numerics_standard.py tests/test_layer_norm.py \
	tests/test_dispatch.py::test_torch_mode_launches_nothing_and_matches_the_unpatched_model \
	"tests/test_attention_varlen.py::test_every_shipped_tile_runs_in_the_interpreter" \
	tests/integrations/test_siglip.py::test_verify_hf_siglip
test-numerics-variant: $(VENV)/.installed-$(EXTRAS)
	env $(NUMERICS_VARIANT) $(PY) -m pytest -q $(NUMERICS_SELECTION)

# The numerics tests under each CPU path other machines take (PyTorch's ISA, MKL's and OpenBLAS's GEMM
# paths, thread counts); pass a selection with ARGS="tests/test_mlp.py -k float64".
CPU_VARIANTS ?= "ATEN_CPU_CAPABILITY=default" "ATEN_CPU_CAPABILITY=avx2" \
	"MKL_ENABLE_INSTRUCTIONS=AVX2 OPENBLAS_CORETYPE=Haswell" "OMP_NUM_THREADS=1" "OMP_NUM_THREADS=2"
ARGS ?= tests/test_numerics_standard.py tests/test_layer_norm.py tests/test_attention_varlen.py \
	tests/test_attention.py tests/test_mlp.py tests/integrations/test_siglip.py -m "not slow"
test-cpu-variants: $(VENV)/.installed-$(EXTRAS)
	@fail=0; for v in $(CPU_VARIANTS); do echo "== $$v"; \
	  env $$v $(PY) -m pytest -q $(ARGS) || { echo "   FAILED under $$v"; fail=1; }; done; exit $$fail

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

# The suite with the GPU machine's versions (Python 3.12 where there is one, torch 2.11, triton 3.6,
# transformers 5.17, numpy < 2.4 for triton 3.6's interpreter; pinned in constraints/compat.txt) in a side
# venv, .venv-compat. Like the GPU machine it has no open_clip / OpenAI clip / cn_clip (those tests skip).
COMPAT_VENV ?= .venv-compat
COMPAT_PY   := $(COMPAT_VENV)/bin/python
COMPAT_PYTHON ?= $(firstword $(foreach p,python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(PYTHON),\
                   $(if $(shell $(p) -c 'import sys' 2>/dev/null && echo ok),$(p))))

$(COMPAT_PY):
	$(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade -c constraints/compat.txt pip setuptools wheel

$(COMPAT_VENV)/.installed: setup.py constraints/compat.txt | $(COMPAT_PY)
	$(COMPAT_PY) -m pip install -q -c constraints/compat.txt -e ".[test]" torchvision transformers
	touch $@

compat: $(COMPAT_VENV)/.installed
	$(COMPAT_PY) -c "import sys, torch, triton, transformers; print('compat:', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
	$(COMPAT_PY) -m pytest -q

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info .pytest_cache
