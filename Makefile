# `make demo` and `make test` set up (or refresh) .venv themselves, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# img2dataset depends on the `dataclasses` backport, which shadows the
	# standard library and breaks pydantic (and so Prefect).
	$(PY) -m pip uninstall -y -q dataclasses || true
	$(PY) -c "import prefect, img2dataset, mlflow, dask.distributed, prefect_dask, torch; print('install ok: prefect', prefect.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dalle demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) demo-data
