# kiln: `make demo` runs the example pipeline end to end; `make test` runs the test suite. Both set up from nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

# Embedded defaults: all state lives under var/ (Airflow on SQLite, MLflow on SQLite, artifacts on disk).
export KILN_HOME ?= $(CURDIR)/var
export AIRFLOW_HOME ?= $(KILN_HOME)/airflow
export AIRFLOW__CORE__DAGS_FOLDER ?= $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES ?= False
export AIRFLOW__CORE__PARALLELISM ?= 4
export GX_ANALYTICS_ENABLED ?= false
export MPLBACKEND ?= Agg

.PHONY: install demo test bench lint airflow-init mlflow-ui clean
.DEFAULT_GOAL := help

help:
	@echo "make demo   - install, initialise Airflow (SQLite), run the penguins pipeline end to end"
	@echo "make test   - install and run the whole test suite"
	@echo "make bench  - run the benchmarks and write BENCHMARKS.md"
	@echo "make lint   - ruff and mypy"
	@echo "make mlflow-ui - MLflow UI on http://127.0.0.1:5000 over var/mlflow.db"

install: $(VENV)/.installed

# torch is installed first and on its own: a resolver that backtracks over the whole set can otherwise
# download other torch builds (GBs of CUDA wheels) before settling on the pinned one.
$(VENV)/.installed: pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v == (3, 11) else f"kiln needs Python 3.11, found {v[0]}.{v[1]}: run make PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.lock
	$(PIP) install -q --no-deps -e .
	touch $@

$(AIRFLOW_HOME)/.migrated: $(VENV)/.installed
	mkdir -p $(AIRFLOW_HOME)
	$(VENV)/bin/airflow db migrate > $(AIRFLOW_HOME)/migrate.log 2>&1 || { tail -20 $(AIRFLOW_HOME)/migrate.log; exit 1; }
	touch $@

airflow-init: $(AIRFLOW_HOME)/.migrated

demo: install airflow-init
	@$(PY) -m operators.cli run penguins_species --log $(KILN_HOME)/logs/demo.log $(if $(CONF),--conf '$(CONF)') \
	  || { echo "demo failed; last lines of $(KILN_HOME)/logs/demo.log:"; tail -40 $(KILN_HOME)/logs/demo.log; exit 1; }

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: install airflow-init
	$(PY) bench/run_all.py

lint: install
	$(VENV)/bin/ruff check tasks operators dags tests bench
	$(VENV)/bin/mypy tasks operators

mlflow-ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(KILN_HOME)/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf $(KILN_HOME)
