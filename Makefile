# prefixgate — run `make help` for the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
CACHE_DIR ?= $(HOME)/.cache/prefixgate
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run sim test lint format unit bench llama-server tiny-model contextpilot-client engines-venv vllm engine-tests install-hook redis-server clean

help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## create .venv and install prefixgate with its dev dependencies (pinned by constraints.txt)

run: $(STAMP) ## start prefixgate on 127.0.0.1:8765 in front of the built-in simulated engine
	$(BIN)/prefixgate serve

sim: $(STAMP) ## start only the built-in simulated engine on 127.0.0.1:8766
	$(BIN)/prefixgate sim-engine --port 8766

lint: $(STAMP) ## ruff format --check, ruff check, mypy --strict
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

format: $(STAMP) ## apply ruff format and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint llama-server tiny-model contextpilot-client engines-venv vllm redis-server ## lint, then every test (real llama-server, real vLLM, real engine caches, real Redis)
	PREFIXGATE_LLAMA_SERVER="$$($(MAKE) -s llama-server | tail -n1)" \
	PREFIXGATE_REDIS_SERVER="$$($(MAKE) -s redis-server | tail -n1)" \
	PREFIXGATE_CONTEXTPILOT_WHEEL="$$($(MAKE) -s contextpilot-client | tail -n1)" \
	PREFIXGATE_ENGINES_VENV="$$($(MAKE) -s engines-venv | tail -n1)" \
	PREFIXGATE_VLLM_VENV="$$($(MAKE) -s vllm | tail -n1)" \
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(STAMP) ## unit tests only
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

bench: $(STAMP) ## run the benchmarks (each prints a table)
	$(BIN)/python -m bench

llama-server: $(STAMP) ## build (once, cached under ~/.cache/prefixgate) the real llama-server; prints its path last
	@$(BIN)/python -m tests.builds.llamacpp --cache-dir $(CACHE_DIR)

contextpilot-client: $(STAMP) ## fetch (once) the contextpilot 0.5.0 wheel whose index client the tests drive; prints its path
	@test -f $(CACHE_DIR)/wheels/contextpilot-0.5.0-py3-none-any.whl || \
		$(BIN)/python -m pip download --quiet --no-deps --dest $(CACHE_DIR)/wheels contextpilot==0.5.0
	@echo $(CACHE_DIR)/wheels/contextpilot-0.5.0-py3-none-any.whl

engines-venv: $(STAMP) ## build (once, cached by lock hash) a venv with the real vLLM/SGLang cache classes; prints its path
	@$(BIN)/python -m tests.enginehooks.enginesvenv --cache-dir $(CACHE_DIR)

vllm: $(STAMP) ## build (once, cached by lock hash) a venv with the real vLLM for CPU, the hook, the peer routers and a tiny model; prints its path
	@$(BIN)/python -m tests.builds.vllm --cache-dir $(CACHE_DIR)

engine-tests: engines-venv ## only the eviction-hook tests against the real vLLM 0.33 / SGLang 0.5.23 classes
	"$$($(MAKE) -s engines-venv | tail -n1)/bin/python" -m pytest tests/enginehooks $(PYTEST_ARGS)

install-hook: $(STAMP) ## install the engine eviction hook's .pth into .venv (active only with PREFIXGATE_INDEX_URL set)
	$(BIN)/prefixgate install-hook

redis-server: ## install (once, Debian's package; needs root or an existing install) a real Redis server; prints its path last
	@command -v redis-server >/dev/null || { \
		test "$$(id -u)" = 0 || { echo "redis-server is missing: apt-get install redis-server (as root)" >&2; exit 1; }; \
		apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }
	@command -v redis-server

tiny-model: $(STAMP) ## write the tiny random-weight GGUF test model; prints its path last
	@$(BIN)/python -m tests.builds.tinymodel --cache-dir $(CACHE_DIR)

clean: ## remove the virtual environment and caches in the checkout
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
