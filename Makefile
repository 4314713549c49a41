# Fresh machine: `make train` or `make test` does all set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CPU_TORCH := 2.13.0

.PHONY: setup train test bench clean gpu-wheels gpu-smoke

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

# ---- GPU tier ------------------------------------------------------------------------------------
# `make gpu-wheels` (on a machine with network): the cp312 wheels a GPU image without network lacks
# (Megatron-Core, Hydra, OmegaConf and their small dependencies; torch, lightning, transformers come with
# the image), into the ignored folder $(GPU_WHEELS) (a few MiB).
# `make gpu-smoke`: the GPU checks, PASS/FAIL each (tests/gpu/smoke.py); `ACCEL=cpu make gpu-smoke` is
# the dry run on CPU. Where the image lacks Megatron-Core or Hydra, they are installed from $(GPU_WHEELS)
# into $(GPU_VENV), a venv that sees the image's own packages.
GPU_WHEELS := .gpu-wheels
GPU_VENV := .gpu-venv
GPU_PY ?= python3
GPU_WHEEL_PYTHON ?= 3.12
ACCEL ?= gpu

gpu-wheels:
	mkdir -p $(GPU_WHEELS)
	$(GPU_PY) -m pip download -q --no-deps --only-binary=:all: --implementation cp \
		--python-version $(GPU_WHEEL_PYTHON) --platform manylinux_2_28_x86_64 -d $(GPU_WHEELS) \
		"megatron-core==0.16.1" "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4" "PyYAML>=6"
	$(GPU_PY) -m pip wheel -q --no-deps -w $(GPU_WHEELS) "antlr4-python3-runtime==4.9.3"  # sdist only upstream
	du -sh $(GPU_WHEELS)

gpu-smoke:
	@if $(GPU_PY) -c "import megatron.core, hydra, omegaconf" 2>/dev/null; then \
		ACCEL=$(ACCEL) $(GPU_PY) tests/gpu/smoke.py; \
	else \
		test -d $(GPU_WHEELS) || { echo "error: Megatron-Core / Hydra missing and no $(GPU_WHEELS) (run make gpu-wheels)"; exit 2; }; \
		test -x $(GPU_VENV)/bin/python || $(GPU_PY) -m venv --system-site-packages $(GPU_VENV); \
		$(GPU_VENV)/bin/python -m pip install -q --no-index --find-links $(GPU_WHEELS) \
			megatron-core hydra-core omegaconf antlr4-python3-runtime; \
		ACCEL=$(ACCEL) $(GPU_VENV)/bin/python tests/gpu/smoke.py; \
	fi

clean:
	rm -rf $(VENV) outputs multirun
