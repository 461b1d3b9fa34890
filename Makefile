# Two commands do everything on a fresh machine with Python 3.11+:
#   make demo   create .venv from the lock file and run the training pipeline on the bike data
#   make test   same set-up, then lint, import-layer contracts, type checks and the test suite
PYTHON ?= python3
UV_VERSION := 0.13.9
UV := .tools/bin/uv
VENV := .venv
RUN := $(VENV)/bin/python

# Prefect: no telemetry from ephemeral mode (it logs "database is locked" otherwise).
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install demo test lint browser unit bench backtest stack-up stack-down drift-demo mlflow-ui prefect-ui clean

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# --compile-bytecode: machines that set PYTHONDONTWRITEBYTECODE would otherwise recompile
# mlflow, prefect and dask from source in every process (3-4x slower imports, workers included).
$(VENV)/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --locked --extra postgres --extra cluster --compile-bytecode --python $(PYTHON)
	@touch $@

# Migrated databases for new Prefect homes and new MLflow stores (infra/templates.py): kept under
# ~/.cache/keel, built once per version (12-17 s here); the check alone costs 0.1 s.
install: $(VENV)/.synced
	@$(RUN) -m infra.templates

demo: install
	$(RUN) -m flows.pipeline $(ARGS)

lint: install
	$(VENV)/bin/ruff check flows tasks deployments infra tests benchmarks
	$(VENV)/bin/ruff format --check flows tasks deployments infra tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

test: lint browser
	$(RUN) -m pytest $(PYTEST_ARGS)

# Headless Chromium and its WebDriver for the browser tests (Debian's packages, when run as root;
# otherwise they skip, and fail under CI=true).
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { [ "$$(id -u)" = 0 ] && \
		command -v apt-get >/dev/null && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "chromium or chromedriver is not installed: the browser tests will skip"

unit: install
	$(RUN) -m pytest -m "not integration and not servers" $(PYTEST_ARGS)

# Which retrain policy pays on the bike data (weekly batches, every policy; about 2 minutes on 2 cores)
backtest: install
	$(RUN) -m flows.backtest $(ARGS)

# Every benchmark (about an hour and a half on 2 cores); one of them: make bench ARGS="--only drift_check"
bench: install
	$(RUN) -m benchmarks $(ARGS)

stack-up: install
	$(RUN) -m infra.stack up $(ARGS)

stack-down:
	$(RUN) -m infra.stack down $(ARGS)

drift-demo: install
	$(RUN) -m deployments.drift_demo $(ARGS)

mlflow-ui: install
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(CURDIR)/.keel/mlflow.db

prefect-ui: install
	$(VENV)/bin/prefect server start --host 127.0.0.1

clean:
	rm -rf .keel .pytest_cache .ruff_cache
