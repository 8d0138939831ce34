# lightning_patterning — developer commands.
#   make demo   main job: build .venv, then train the parentheses recipe on 3 seeds × 3 arms (natural
#               weights, toward NESTED, toward EQUAL-COUNT) plus one online-patterning run, 2 at a
#               time (~3 min on 2 cores); prints what moved; results, figure, TensorBoard logs and a
#               report in runs/demo/
#   make llc-demo  a one-minute LLCCallback demo on a teacher-student MLP
#   make test   ruff + default pytest suite (slow tests excluded) + strict docs build

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is pinned and installed first: a bare `torch` requirement would pull a multi-GB CUDA build.
# Here pip's configured wheel folder supplies the CPU build of torch==2.13.0. Elsewhere, point
# TORCH_INDEX at PyTorch's CPU wheel index:  make venv TORCH_INDEX=<cpu wheel index url>
TORCH_VERSION ?= 2.13.0
TORCH_INDEX   ?=
TORCH_INDEX_ARGS := $(if $(strip $(TORCH_INDEX)),--index-url $(TORCH_INDEX))

.PHONY: venv test lint pytest docs demo llc-demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "torch==$(TORCH_VERSION)" $(TORCH_INDEX_ARGS)
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .

pytest: venv
	$(BIN)/python -m pytest -q

docs: venv
	$(BIN)/mkdocs build --strict -d site

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q
	$(BIN)/mkdocs build --strict -d site

demo: venv
	$(BIN)/python -m recipes.parentheses.demo --out runs/demo --jobs 2

llc-demo: venv
	$(BIN)/python -m recipes.demo

clean:
	rm -rf site build dist .pytest_cache .ruff_cache *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
