# The two commands of the README: `make demo` and `make test`. Both set up .venv first: the demo
# with what it needs (the package and its `plot` extra), the tests with the `dev` extra (all the
# extras a CPU machine can install, the test tools and the linters).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint setup bench clean
$(VENV)/.installed-%: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $*

setup: $(VENV)/.installed-dev

demo: $(VENV)/.installed-plot
	$(VENV)/bin/lightning-fpq demo

test: $(VENV)/.installed-dev
	$(PY) -m pytest -n 2 -q

# Type-checked: the numerics core (formats, quantizer, packing, specs, recipes, state, layers, backends).
MYPY_PATHS := lightning_fpq/_config.py lightning_fpq/formats.py lightning_fpq/quantize.py lightning_fpq/philox.py lightning_fpq/packing.py \
	lightning_fpq/spec.py lightning_fpq/named_recipes.py lightning_fpq/recipe.py lightning_fpq/state.py \
	lightning_fpq/fp4_estimators.py lightning_fpq/linear_function.py lightning_fpq/linear.py lightning_fpq/attention.py lightning_fpq/backends

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(MYPY_PATHS)

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/bench_quantize.py
	$(PY) benchmarks/bench_step.py
	PYTHONPATH=. $(PY) benchmarks/gpu_check.py runs/gpu-report

clean:
	rm -rf $(VENV) build *.egg-info lightning_logs .pytest_cache .ruff_cache .mypy_cache
