# Two commands do the whole set-up on a fresh machine:
#   make up    install everything into .venv and run the whole stack (gestalt up)
#   make test  install everything into .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install up test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: pip takes the local wheels where they exist instead of a download
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	# production face backends; --no-deps because their metadata pins ancient torch (see pyproject.toml)
	$(BIN)/pip install --quiet --no-deps face-alignment==1.5.0 retinaface-pytorch==0.0.8
	touch $@

up: install
	$(BIN)/gestalt up

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/pipeline.py

clean:
	rm -rf $(VENV) .pytest_cache
