# Fresh machine: `make train` or `make test` does all set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CPU_TORCH := 2.13.0

.PHONY: setup train test bench clean

setup: $(VENV)/.installed

# Idempotent: the stamp is rebuilt only when the project's requirements change.
# Without CUDA the CPU torch build is installed first; an existing torch (GPU clusters) is kept.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "setup: keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		echo "setup: CUDA machine, pip will choose torch"; \
	else \
		echo "setup: no CUDA, installing CPU torch $(CPU_TORCH)"; \
		$(PY) -m pip install -q "torch==$(CPU_TORCH)"; \
	fi
	$(PY) -m pip install -q -e ".[test]"
	touch $@

train: setup
	$(PY) train.py recipe=glm45 $(ARGS)

# The suite runs Megatron on the CPU: CUDA is hidden so it passes on a GPU node too.
test: setup
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -q tests $(ARGS)

# Export / import against save_file / load_file, training stall, memory, and the GLM-4.5 355B plan:
# prints a table, writes docs/benchmarks.md, docs/benchmarks.png and the raw figures (a few minutes).
bench: setup $(VENV)/.bench-installed
	$(PY) benchmarks/export_import_bench.py $(ARGS)
	$(PY) benchmarks/plan_bench.py
	$(PY) benchmarks/report.py

$(VENV)/.bench-installed: pyproject.toml
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

clean:
	rm -rf $(VENV) outputs multirun
