# Two entry points that work on a fresh clone (with ../shared beside it):
#   make quickstart   install, then train + evaluate the multi-task teacher on recipes/quickstart.yaml
#   make test         install, then run the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install quickstart test validate

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "torch==2.13.0" -e ".[test]" -c constraints.txt
	$(VENV)/bin/pip check
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/compressor run recipes/quickstart.yaml --out runs/quickstart --resume

validate: $(STAMP)
	$(VENV)/bin/compressor validate recipes/*.yaml

test: $(STAMP)
	$(VENV)/bin/compressor validate recipes/*.yaml
	$(VENV)/bin/pytest -q
