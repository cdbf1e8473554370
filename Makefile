# One entry point for every task; see README.md.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODELS_DIR ?= models
PROTOS := shared_proto/inference.proto shared_proto/compositing.proto

# System packages: nginx (the load balancer of the local cluster), docker-compose (its config check in the tests),
# chromium (the browser viewer's end-to-end test), kubectl (`kubectl kustomize` of deploy/k8s in the tests).
RUN_PACKAGES := nginx-light
TEST_PACKAGES := nginx-light docker-compose chromium kubectl

.PHONY: system-deps system-deps-test install proto proto-check config-docs config-docs-check lint test test-fast bench bench-inference bench-image-libs bench-compositing bench-cluster bench-stream bench-hardening bench-splice bench-batching bench-import bench-webrtc soak models demo run clean

install: $(VENV)/.installed

# Installs missing system packages when run as root; otherwise says exactly what to install.
system-deps:
	@PACKAGES="$(RUN_PACKAGES)" sh tools/system_deps.sh

system-deps-test:
	@PACKAGES="$(TEST_PACKAGES)" sh tools/system_deps.sh

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

# Generate the Python package from shared_proto/*.proto (committed; see proto-check).
proto: install
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

# Fails when the committed generated code is not what `make proto` produces
# (the tool's version stamps aside).
proto-check: install
	@tmp=$$(mktemp -d) && \
	$(PY) -m grpc_tools.protoc -I . --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTOS) && \
	$(PY) tools/compare_generated.py $$tmp/shared_proto shared_proto; rc=$$?; rm -rf $$tmp; exit $$rc

# docs/configuration.md from both services' config schemas (committed; see config-docs-check).
config-docs: install
	$(PY) tools/config_docs.py --write docs/configuration.md

# Fails when the committed reference is not what `make config-docs` writes.
config-docs-check: install
	$(PY) tools/config_docs.py --check docs/configuration.md

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Every test, markers or not (CI): a missing nginx, chromium, docker-compose or kubectl fails here, never skips.
test: system-deps-test install proto lint
	$(PY) -m pytest -q --cov --cov-report=term-missing:skip-covered --cov-fail-under=85

# The quick loop (under 2 minutes on 2 cores): no system tool, no full-size unet328, nothing long by design.
# Markers: pyproject.toml [tool.pytest.ini_options]; docs/development.md.
test-fast: install proto
	$(PY) -m pytest -q -m "not slow and not needs_tools"

models: install
	$(VENV)/bin/lipsync-models --out $(MODELS_DIR)

bench: bench-inference bench-image-libs bench-compositing bench-splice bench-cluster bench-stream bench-hardening bench-batching bench-webrtc

bench-inference: install
	$(PY) -m bench.inference --models-dir $(MODELS_DIR) --out bench/results/inference.json

bench-cluster: system-deps install
	$(PY) -m bench.cluster --models-dir $(MODELS_DIR) --out bench/results/cluster.json

bench-image-libs: install
	$(PY) -m bench.image_libs --models-dir $(MODELS_DIR) --out bench/results/image_libs.json

bench-compositing: install
	$(PY) -m bench.compositing --models-dir $(MODELS_DIR) --out bench/results/compositing.json

bench-splice: install
	$(PY) -m bench.splice_micro --out bench/results/splice_micro.json

bench-batching: install
	$(PY) -m bench.batching --models-dir $(MODELS_DIR) --out bench/results/batching.json

# WebRTC gateway: mouth-to-frame latency, gateway CPU per frame by step, peers per process -> bench/results/webrtc.json
bench-webrtc: system-deps install
	$(PY) -m bench.webrtc --models-dir $(MODELS_DIR) --out bench/results/webrtc.json

bench-hardening: install
	$(PY) -m bench.hardening --models-dir $(MODELS_DIR) --out bench/results/hardening.json

# lipsync-import on the SyncTalk_2D 328 fixture (LIPSYNC_SYNCTALK_FIXTURES, default ../shared/fixtures/synctalk2d):
# time and peak memory; not part of `make bench`, which must run where the fixtures are absent.
bench-import: install
	$(PY) -m bench.import_bench --out bench/results/import.json

bench-stream: install
	$(PY) -m bench.stream --models-dir $(MODELS_DIR) --out bench/results/stream.json

# Chaos soak (not in CI): 10 minutes of rolling restarts, kills and inference outages under load through nginx;
# client-visible failures (0 expected) and RSS per process -> bench/results/soak.json. SOAK_MINUTES=N to change.
SOAK_MINUTES ?= 10
soak: system-deps models
	$(PY) tools/soak.py --models-dir $(MODELS_DIR) --minutes $(SOAK_MINUTES) --out bench/results/soak.json

# Set-up and the main job in one command: system packages, install, models, the local cluster
# (inference, 2 compositing replicas, nginx), speech -> out/demo.mp4 through the load balancer.
demo: system-deps models
	$(PY) tools/demo.py --models-dir $(MODELS_DIR) --out out/demo.mp4

# The same cluster, serving on port 8080 in the foreground until Ctrl-C.
run: system-deps models
	$(VENV)/bin/lipsync-cluster up --models-dir $(MODELS_DIR) --port 8080 --replicas 2

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .coverage
