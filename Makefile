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

.PHONY: install demo test layers bench lint airflow-init mlflow-ui clean docker-engine image postgres redis wrk serve-stop up down status chromium prometheus haproxy
.DEFAULT_GOAL := help

help:
	@echo "make demo   - install, initialise Airflow (SQLite), run the penguins pipeline end to end"
	@echo "make test   - install and run the whole test suite"
	@echo "make docker-engine - install (Debian) and start a Docker engine unless one answers"
	@echo "make image  - build the CPU test images kiln-train:cpu and kiln-serve:cpu (docker/README.md)"
	@echo "make postgres - start the local PostgreSQL (lease-store tests and benchmark) unless it answers"
	@echo "make bench  - run the benchmarks and write BENCHMARKS.md"
	@echo "make lint   - ruff, mypy and the layer contracts (make layers: lint-imports and deptry alone)"
	@echo "make mlflow-ui - MLflow UI on http://127.0.0.1:5000 over var/mlflow.db"
	@echo "make up     - start Airflow (UI + REST), MLflow and the model servers as services; PROFILE=prod for"
	@echo "             PostgreSQL + CeleryExecutor on Redis (README: Service mode)"
	@echo "make down   - stop everything make up started; make status - what runs"
	@echo "make serve-stop - stop the model servers the pipelines started (var/serving/<model>/server.pid)"

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
	@$(VENV)/bin/kiln run penguins_species --log $(KILN_HOME)/logs/demo.log $(if $(CONF),--conf '$(CONF)') \
	  || { echo "demo failed; last lines of $(KILN_HOME)/logs/demo.log:"; tail -40 $(KILN_HOME)/logs/demo.log; exit 1; }

test: install image postgres redis chromium prometheus haproxy wrk layers
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The layer contracts (pyproject.toml [tool.importlinter]) and the declared dependencies against the imports.
layers: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/deptry tasks operators dags

# The Docker launcher's tests run real containers: an engine (dockerd started by hand where there is no systemd,
# its log and pid under $(KILN_HOME)) and the CPU test image, rebuilt only when its inputs change.
docker-engine:
	@docker/engine.sh $(KILN_HOME)

image: docker-engine install
	@PYTHON=$(PY) docker/build-test-image.sh

bench: install airflow-init image postgres wrk haproxy
	$(PY) bench/run_all.py

# The serving benchmark's load generator (a Python client would saturate a core before the servers do).
wrk:
	@command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }

# The load balancer in front of a model's replicas (a deployment with `replicas`; README: Serving at scale). Only the
# binary is used: kiln starts one HAProxy per model with its own configuration, never the package's service.
haproxy:
	@command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy; }

serve-stop:
	@[ ! -x $(VENV)/bin/kiln ] || $(VENV)/bin/kiln serve stop

# Service mode. PROFILE=embedded (SQLite, LocalExecutor) or prod (PostgreSQL + CeleryExecutor on Redis); every
# setting is an environment variable (README: Service mode).
PROFILE ?= embedded
up: install haproxy $(if $(filter prod,$(PROFILE)),postgres redis)
	@KILN_PROFILE=$(PROFILE) $(VENV)/bin/kiln up

down:
	@[ ! -x $(VENV)/bin/kiln ] || $(VENV)/bin/kiln down

status:
	@$(VENV)/bin/kiln status

redis:
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }
	@mkdir -p $(KILN_HOME); redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || redis-server --daemonize yes --bind 127.0.0.1 --port 6379 \
	  --save "" --appendonly no --logfile $(KILN_HOME)/redis.log
	@for i in $$(seq 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && exit 0; sleep 1; done; \
	  echo "Redis does not answer on 127.0.0.1:6379 (see $(KILN_HOME)/redis.log)"; exit 1

# The browser test drives Debian's Chromium through Playwright (no browser download).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# The alert-rule tests run Debian's Prometheus and promtool on loopback with their own config (the package's
# service is not started; see the script).
prometheus:
	@docker/monitoring/install-prometheus.sh

# The resource-pool lease store's tests and benchmark run against the local PostgreSQL (trust auth, 127.0.0.1:5432).
postgres:
	@pg_isready -h 127.0.0.1 -p 5432 -q || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start
	@for i in $$(seq 30); do pg_isready -h 127.0.0.1 -p 5432 -q && exit 0; sleep 1; done; \
	  echo "PostgreSQL does not answer on 127.0.0.1:5432 (see /var/log/postgresql)"; exit 1

lint: layers
	$(VENV)/bin/ruff check tasks operators dags tests bench
	$(VENV)/bin/mypy tasks operators

mlflow-ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(KILN_HOME)/mlflow.db --host 127.0.0.1 --port 5000

clean: down serve-stop
	rm -rf $(KILN_HOME)
