# pagedq: `make demo` runs the whole stack once; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default. On a GPU host: `make install TORCH_SPEC=torch` (or a CUDA-specific index).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo up test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "[1/4] creating the virtual environment $(VENV) (once; again only when pyproject.toml changes)"
	$(PYTHON) -m venv $(VENV)
	@echo "[2/4] upgrading pip"
	$(PY) -m pip install --quiet --upgrade pip
	@echo "[3/4] installing $(TORCH_SPEC) (the CPU build: about 200 MB, a minute or so)"
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	@echo "[4/4] installing pagedq with every extra (transformers, Celery, FastAPI, Flower, test tools)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@
	@echo "installed: $(VENV)"

demo: install
	$(PY) -m scripts.demo

# Fixed ports (API 8000, Redis 6380, Flower 5555, metrics 9464): `make up PAGEDQ_API_PORT=8001`; see --help.
up: install
	$(PY) -m scripts.up

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check shared producer worker scripts tests bench
	@# mypy cannot follow the editable install's import hook: it reads pagedq.* through a tree of links
	rm -rf .mypy_path && mkdir -p .mypy_path/pagedq && ln -s ../../shared ../../producer ../../worker .mypy_path/pagedq/
	MYPYPATH=.mypy_path $(VENV)/bin/mypy -p pagedq.shared -p pagedq.producer -p pagedq.worker

bench: install
	$(PY) bench/engine.py

clean:
	rm -rf .demo .models .pytest_cache
