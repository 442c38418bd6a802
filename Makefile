# Two entry points: `make demo` and `make test`. Both create .venv and install
# into it when needed; a second run is a no-op unless pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck unit bench soak clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# OCR: without its opencv-python (we have the headless build); its real deps are in pyproject.toml.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps 'rapidocr-onnxruntime==1.4.4'
	@# librosa compiles with numba on first use (~20 s); do it once here, cached on disk.
	$(BIN)/python -m processors.warmup
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/autoglm demo --seconds 10 --sources 2

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python benchmarks/processors.py
	$(BIN)/python benchmarks/aligner.py
	$(BIN)/python benchmarks/bus.py --json benchmarks/bus.json
	$(BIN)/python benchmarks/plot.py benchmarks/bus.json benchmarks/bus.png
	$(BIN)/python benchmarks/e2e.py

# Five minutes of a stream with the engine SIGKILLed every minute.
soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(VENV) .autoglm .mypy_cache .ruff_cache .pytest_cache .hypothesis
