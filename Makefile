# Two commands do the whole set-up on a fresh machine:
#   make up    install everything into .venv and run the whole stack (gestalt up)
#   make test  install everything into .venv and run the test suite
#   make test-fast  the unit and app-level tests only (no worker processes, no gunicorn): ~3 min on 2 cores
#   make image      build the CPU image from deploy/Dockerfile (docker, or buildah; deploy/README.md)
#   make test-image build the CPU image and start it (tests/test_image.py; root and buildah): its own CI step
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install up test test-fast test-image image bench clean

# The inner loop: unit tests and app-level tests (Flask test_client, one embedded database), no Celery
# worker processes, no gunicorn, no model trained in a subprocess. Each file here runs in under a minute.
FAST_TESTS := tests/test_structure.py tests/test_static.py tests/test_admin_console.py tests/test_evaluation.py \
	tests/test_identity.py tests/test_imaging.py tests/test_nets.py tests/test_phenotype.py tests/test_prepcache.py \
	tests/test_trust.py tests/test_training.py tests/test_encoder.py tests/test_hardening.py tests/test_config.py

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

test-fast: install
	$(BIN)/python -m pytest -q $(FAST_TESTS)

# IMAGE_TEST=require (.ci/run) fails where buildah or root is missing; 1 skips with the reason.
test-image: install
	IMAGE_TEST=$${IMAGE_TEST:-1} $(BIN)/python -m pytest tests/test_image.py

image:
	deploy/build-image.sh --target cpu

bench: install
	$(BIN)/python bench/pipeline.py

clean:
	rm -rf $(VENV) .pytest_cache
