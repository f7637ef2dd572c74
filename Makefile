# Two commands set everything up on a fresh machine:
#   make train   the main job: train a GPT with hand-written gradients on the embedded corpus
#   make test    the test suite (make test-slow: the slow tier)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: train test test-slow bench install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,interop]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/python -m manual_grad train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n 2 $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -n 2 $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(ARGS)

clean:
	rm -rf $(VENV) out
