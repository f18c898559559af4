# Two commands for a first run (README.md, "Start here"):
#   make demo   train on the embedded preset (PRESET, default mini: the committed trained mini stack, toy tiles)
#   make test   check the import layers (lint-imports, contracts in pyproject.toml), then run the test suite
# Each first sets up .venv if it is missing. That happens once (4 to 8 minutes and 6.4 GB, mostly torch): a stamp file
# records it, and only a change to a requirements file repeats it. Underneath it is plain venv, pip and
# `accelerate launch`; the README's long form gives the same commands by hand.
#
#   make demo PRESET=tiny        the preset to train (tiny: random tiny models, seconds, for the plumbing)
#   make setup TORCH="torch==X torchvision==Y"   another torch pair, e.g. for your CUDA; `rm .venv/.setup-done` first
#   make demo PYTHON=python3.12  the Python that creates .venv (3.10 or newer)

PYTHON ?= python3
PRESET ?= mini
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
# Explicit values for everything `accelerate launch` would otherwise guess (and warn about): one process, no mixed
# precision, no compilation; on the GPU when there is one.
LAUNCH = $(VENV)/bin/accelerate launch --quiet --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
# Resubmitting a finished run stops at once with "complete"; an interrupted one resumes.
DEMO_FLAGS ?= --resume_from_checkpoint latest
STAMP = $(VENV)/.setup-done
# CI=true (no terminal, logs kept): no progress bars and no questions from pip.
PIP_INSTALL = $(strip $(VENV)/bin/python -m pip install $(if $(filter true,$(CI)),--no-input --progress-bar off))

.PHONY: demo test setup browser

demo: $(STAMP)
	$(LAUNCH) train_adapter_lora.py --preset $(PRESET) $(DEMO_FLAGS)

test: $(STAMP) browser
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/python -m pytest -q

# The report's browser test opens report.html in Debian's headless Chromium. As root on Debian (CI) it is installed
# here when missing; elsewhere nothing is installed and that test fails saying how to install it.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
				chromium chromium-driver fonts-dejavu-core; \
		else echo "No /usr/bin/chromium or /usr/bin/chromedriver: the browser test will fail (apt-get install chromium chromium-driver as root)." >&2; fi; \
	fi

setup: $(STAMP)

# torch and torchvision first: left to the requirements, pip would choose a torch of its own.
$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "Python 3.10 or newer is needed: make $(MAKECMDGOALS) PYTHON=/path/to/python3.x" >&2; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) $(TORCH)
	$(PIP_INSTALL) -r requirements-dev.txt
	touch $@
