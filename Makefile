# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv
# and install on first use (re-install when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install demo test lint types imports unit bench bench-campaign bench-bms bms-data train-bms cell-model bms-demo bench-bms-mqtt mock-cell-model bench-md clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on this machine's disk. Anything that
	# later depends on torch then finds it satisfied instead of pulling a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[lab,edge,sim,sim-peers,models,bms-truth,dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

demo: install
	$(BIN)/labctl demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: install
	$(BIN)/mypy

imports: install
	$(BIN)/lint-imports

unit: install
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint types imports unit

bench: install
	$(PY) scripts/bench_latency.py
	$(PY) scripts/bench_tiled.py
	$(PY) scripts/bench_onnx.py

# edge BMS: PyBaMM ground truth (~20 min on one core, resumable), training, benchmark.
bms-data: install
	$(BIN)/labctl models bms-data --out data/bms --jobs 2

train-bms: bms-data
	$(BIN)/labctl models train-bms --data data/bms --ship-to edge_bms/data/models

bench-bms: bms-data
	$(PY) scripts/bench_bms.py --sections cost accuracy soh sop

# edge_bms over MQTT: in-process broker on 1884, simulated packs, the service, a live table.
bms-demo: install
	$(BIN)/edge-bms demo --port 1884 --packs 4 --cells 16

# edge-bms run end to end through the Mosquitto on 127.0.0.1:1883 (~2 min).
bench-bms-mqtt: install
	$(PY) scripts/bench_bms_mqtt.py

# The cell model fed from cycling on the simulated lab (~4 min).
cell-model: install
	$(PY) scripts/cell_model_from_lab.py

# The edge_bms cell model of the simulated lab's cell: characterization on the mock cell's
# physics, then edge-bms identify (writes edge_bms/data/cells/labctl-sim-5ah.json).
mock-cell-model: install
	$(PY) scripts/characterize_mock_cell.py

# sim_backend's batched MD against ASE's own MD and TorchSim, same model and box (~2 min).
bench-md: install
	$(PY) scripts/bench_md.py --quick

# BO vs random vs BO with the property model as prior, 3 landscapes x 10 seeds (~20 min).
bench-campaign: install
	$(PY) scripts/bench_campaign.py --seeds 10 --budget 40

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis .import_linter_cache
