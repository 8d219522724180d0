# The README's commands. Each bootstraps what it needs: .venv with the package installed editable
# (protos compiled by the build), and Debian packages via apt-get when running as root.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := qemu-system-x86 busybox-static cpio kmod open-iscsi libiscsi-bin fio sg3-utils \
	e2fsprogs util-linux
PYTEST_ARGS ?=

.PHONY: all venv deps test demo lab bench lint clean

all: test

$(STAMP): pyproject.toml setup.py $(wildcard protos/targetd_repl/v1/*.proto)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages for the QEMU lab and the initiators; only root can install them.
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian packages:" $$missing; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing \
			>/tmp/targetd-repl-apt.log 2>&1 || { apt-get update -q >/dev/null && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; }; \
	else \
		echo "not root: install these Debian packages yourself: $$missing" >&2; \
	fi

test: venv deps
	$(BIN)/pytest $(PYTEST_ARGS)

demo: venv deps
	$(BIN)/python -m targetd_repl.demo

lab: venv deps
	$(BIN)/python -m targetd_repl.lab $(if $(SCENARIO),run $(SCENARIO),run --all)

bench: venv
	$(BIN)/targetd-repl bench journal --json

lint: venv
	$(BIN)/ruff check targetd_repl bench tests
	$(BIN)/ruff format --check targetd_repl bench tests
	$(BIN)/mypy --strict targetd_repl bench

clean:
	rm -rf $(VENV) build *.egg-info targetd_repl/v1 .lab
