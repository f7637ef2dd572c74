# Two commands set everything up on a fresh machine:
#   make train   the main job: train a GPT with hand-written gradients on the embedded corpus;
#                installs the package alone (JAX, optax, numpy, matplotlib: no PyTorch)
#   make test    the test suite (make test-slow: the slow tier); installs the test and interop
#                extras too (PyTorch and transformers, the reference the tests compare with)
# TORCH_INDEX=URL adds an index for PyTorch, e.g. https://download.pytorch.org/whl/cpu for the
# CPU build (PyPI's Linux wheel of torch is the CUDA build): see constraints.txt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
BASE   := $(VENV)/.installed-base
FULL   := $(VENV)/.installed-full
TORCH_INDEX ?=
PIP_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)

.PHONY: train test test-slow bench install clean

$(BASE): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e .
	touch $(BASE)

$(FULL): $(BASE)
	$(BIN)/pip install --quiet -c constraints.txt $(PIP_INDEX) -e '.[test,interop]'
	touch $(FULL)

install: $(FULL)

train: $(BASE)
	$(BIN)/python -m manual_grad train $(ARGS)

test: $(FULL)
	$(BIN)/python -m pytest -q -m "not slow" -n 2 $(ARGS)

test-slow: $(FULL)
	$(BIN)/python -m pytest -q -m slow -n 2 $(ARGS)

bench: $(FULL)
	$(BIN)/python -m benchmarks.run $(ARGS)

clean:
	rm -rf $(VENV) out
