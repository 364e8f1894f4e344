# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ANIML_HOME ?= $(CURDIR)/.animl
export ANIML_HOME

.PHONY: setup demo demo-challenger test ui bench clean

# uv installs what pip would, several times faster (the 6 GB of PyTorch's CUDA build in well under a minute);
# pip installs it where uv cannot be had.
$(BIN)/animl: pyproject.toml animl_assets/core/detect/_jpegregion.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip uv || true
	UV_CACHE_DIR=$(VENV)/.uv-cache $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python $$($(PYTHON) .ci/uv_args.py) -e '.[dev]' \
		|| $(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/animl  ## create .venv with the animl command and the test tools

demo: setup  ## generate the sample export and materialize every asset for it, up to a champion model
	$(BIN)/animl demo

demo-challenger: setup  ## after make demo: a worse model, which the champion gate leaves as challenger
	$(BIN)/animl demo --challenger

test: setup  ## the whole test suite (CI runs exactly this)
	$(BIN)/python -m pytest -n 2 --durations=15

ui: setup  ## the Dagster UI and daemon (sensors, schedules) on http://127.0.0.1:3000
	$(BIN)/animl ui

bench: setup  ## print the benchmark figures
	for script in benchmarks/[!_]*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(ANIML_HOME)
