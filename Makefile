# replicate's two jobs: `make demo` (train the demo over towers) and `make test`.
# Both start from nothing: they create .venv, install what is needed, then run.

PYTHON ?= python3
VENV ?= .venv
GPU_VENV ?= .venv-gpu
BIN := $(VENV)/bin
DEPS := $(VENV)/.deps-installed
PYTEST_ARGS ?=

.PHONY: demo test conformance conformance-table lint horovod horovod-gpu install bench clean test-compat

$(DEPS): setup.cfg setup.py pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=61,<81" wheel
	$(BIN)/python -m pip install --quiet --no-build-isolation '.[test,demo]'
	touch $@

# The package itself, installed (not linked) so that tests exercise the artifact.
install: $(DEPS)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation --force-reinstall .
	rm -rf build

# Horovod 0.28.1 built against the installed TensorFlow, cached as a wheel.
horovod: $(DEPS)
	scripts/build-horovod.sh $(VENV)

# Horovod 0.28.1 with NCCL for GPU tensors, built without a GPU (about 4 minutes
# the first time), into $(GPU_VENV), which shares $(VENV)'s TensorFlow, so that
# $(VENV) keeps the CPU build the other tests use; tests/test_horovod_gpu_build.py
# checks it.
horovod-gpu: $(DEPS)
	scripts/build-horovod.sh --gpu --tensorflow-from $(VENV) $(GPU_VENV)

demo: install
	$(BIN)/replicate demo

lint: $(DEPS)
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --check --no-cache .
	@if [ -d docker ]; then $(BIN)/hadolint docker/*.Dockerfile; fi

test: lint install horovod horovod-gpu
	$(BIN)/pytest $(PYTEST_ARGS)

# Public Keras examples (keras.io), one device against replicate() on 2 and 3 towers;
# kept out of `make test` (pyproject's addopts ignore tests/conformance).
conformance: install
	$(BIN)/pytest tests/conformance $(PYTEST_ARGS)

# The same run, writing the results table docs/conformance.md.
conformance-table: install
	$(BIN)/pytest tests/conformance --conformance-table docs/conformance.md $(PYTEST_ARGS)

# The oldest supported TensorFlow and Keras (pinned in requirements/oldest.txt), in
# $(COMPAT_VENV) made from nothing (no Horovod), and the core equivalence, loss and
# compatibility tests run there. `make test` covers the newest pair.
COMPAT_VENV ?= .venv-compat
COMPAT_TESTS := tests/test_builder.py tests/test_compat.py tests/test_model.py \
	tests/test_loss.py tests/test_steps.py tests/test_merge.py tests/test_tower.py \
	tests/test_reduce.py tests/test_state.py tests/test_building.py tests/test_checking.py \
	tests/test_keras_compat.py tests/test_house.py tests/test_activity.py

test-compat:
	rm -rf $(COMPAT_VENV) build
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --upgrade pip "setuptools>=61,<81" wheel
	$(COMPAT_VENV)/bin/python -m pip install --quiet --no-build-isolation \
		-c requirements/oldest.txt '.[test]'
	rm -rf build
	$(COMPAT_VENV)/bin/python -m pip list 2>/dev/null | grep -E '^(tensorflow|keras) '
	$(COMPAT_VENV)/bin/pytest $(PYTEST_ARGS) $(COMPAT_TESTS)

bench: install
	$(BIN)/replicate-bench scaling --quick --output docs/benchmarks
	$(BIN)/replicate-bench optimizers --quick --output docs/benchmarks

clean:
	rm -rf $(VENV) $(GPU_VENV) $(COMPAT_VENV) build *.egg-info
