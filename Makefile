# Two commands do everything: `make run` and `make test` (see README.md). The bench tools are
# modules of the package bench/, run from here as `python -m bench.<tool>`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test test-fast load bench scenarios chaos soak clean docker docker-down

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python3 -m venv failed; installing python3-venv from apt"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv && \
	  $(PYTHON) -m venv $(VENV); }
	@$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	@touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(BIN)/pip install -q -r requirements-dev.txt
	@touch $@

# make run and make load share a purge token, so each load starts from an empty ledger.
run load: export PURGE_TOKEN ?= local-arena

run: $(VENV)/.dev
	$(BIN)/python -m bench.arena

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q test_rinha.py bench/

# The tests that start no process (rinha.py, emulators, haproxy, k6, Docker): the `slow`
# marker, given in conftest.py, leaves the others out. A few seconds.
test-fast: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m "not slow" test_rinha.py bench/

# Variables read by the scripts (see README): load: MAX_REQUESTS, DURATION_S, PHASES, AMOUNTS,
# TRACE; bench: the same and CAPACITY, LB; scenarios: SCENARIOS, MAX_REQUESTS, DURATION_S, TRACE, LB.
load: $(VENV)/.dev
	$(BIN)/python -m bench.load

bench: $(VENV)/.dev
	$(BIN)/python -m bench.bench

scenarios: $(VENV)/.dev
	$(BIN)/python -m bench.scenarios

# The compose stack on a real Docker engine (bench/docker.py): engine installed and dockerd
# started when missing, left running on :9999 for `make load`. `make docker-down IMAGES=1`
# also removes the images built for it.
docker: export PURGE_TOKEN ?= local-arena

docker: | $(BIN)/python
	$(BIN)/python -m bench.docker up

docker-down: | $(BIN)/python
	$(BIN)/python -m bench.docker down $(if $(IMAGES),--images)

clean:
	rm -rf $(VENV) bench/out run

# A seeded chaos run (bench/chaos.py): make chaos SEED=42 [DURATION=180]
chaos: $(VENV)/.dev
	$(BIN)/python -m bench.chaos $(if $(SEED),--seed $(SEED)) $(if $(DURATION),--duration $(DURATION))

# A soak under the limits (bench/soak.py, not in make test): make soak [DURATION=600] [RATE=280]
# [HISTORY=n: n confirmed payments generated into the ledgers first] [LIMITS=per-service] [SLICE=60];
# make soak STARTUP=n: start-up time of an instance holding n confirmed payments instead (no load).
# The issue's proof: make soak HISTORY=4500000 RATE=1500 LIMITS=per-service; make soak STARTUP=10000000
soak: $(VENV)/.dev
	$(BIN)/python -m bench.soak $(if $(DURATION),--duration $(DURATION)) $(if $(RATE),--rate $(RATE)) \
	  $(if $(SLICE),--slice $(SLICE)) $(if $(HISTORY),--history $(HISTORY)) $(if $(LIMITS),--limits $(LIMITS)) \
	  $(if $(STARTUP),--startup $(STARTUP))
