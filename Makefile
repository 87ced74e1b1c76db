# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup bench clean
$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/lightning-fpq demo

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_quantize.py
	$(PY) benchmarks/bench_step.py
	$(PY) benchmarks/bench_kernels.py

clean:
	rm -rf $(VENV) build *.egg-info lightning_logs .pytest_cache
