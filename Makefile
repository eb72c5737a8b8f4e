# raylm: `make demo` runs the pipeline on an embedded local Ray; `make test` runs the tests.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# CPU-only machines get the CPU torch wheel first, so the project install does not pull a
# multi-GB CUDA build. constraints.txt pins the versions CI tests (TORCH_CPU must agree with it).
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_CPU ?= torch==2.13.0

.PHONY: install demo test lint bench drills gpu-check clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ -z "$(HAS_GPU)" ]; then $(PY) -m pip install -q -c constraints.txt "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	@touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m jobs.demo

# pytest exit 5 ("no tests collected") is a failure here, like any other.
test: install
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: no tests were collected" >&2; exit 1; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check cluster jobs tune serve tests bench

bench: install
	$(PY) -m bench.prepare
	$(PY) -m bench.train_overhead
	$(PY) -m bench.ingest
	$(PY) -m bench.source_checks
	$(PY) -m bench.serve
	$(PY) -m bench.tune_efficiency
	$(PY) -m bench.evaluate

# Faults, load and hostile input across the pipeline; writes RELIABILITY.md (about 25 minutes).
drills: install
	$(PY) -m bench.drills.run

# What only a GPU proves (MFU, FSDP and resume on CUDA, Serve on the GPU): one CUDA GPU, ~8 minutes.
# Never part of `make test` or CI; on a machine without one it stops at once, before installing.
gpu-check:
	@if [ -z "$(HAS_GPU)" ]; then echo "gpu-check: needs one NVIDIA GPU with its driver (nvidia-smi finds none);" \
		"python -m bench.gpu_check --rehearse runs the same steps, tiny, on the CPU" >&2; exit 2; fi
	@$(MAKE) --no-print-directory install
	$(PY) -m bench.gpu_check

clean:
	rm -rf runs .pytest_cache
