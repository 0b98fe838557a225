# make train: set up .venv (Python >= 3.12) and train the tiny model on the built-in corpus (CPU).
# make test:  set up .venv and run the whole test suite.
# make extend: continue the make train run from 128 to 1,024 positions with YaRN (a few minutes).
# make sft:   fine-tune the make train run on the built-in conversations (a few minutes).
# make grpo:  SFT the make train run on the arithmetic task's format, then GRPO on its rewards
#             (about 20 + 50 minutes on 2 CPU cores).
VENV := .venv
PY := $(VENV)/bin/python
# glibc's malloc backs its large blocks with transparent huge pages (dsv3_jax/host_memory.py: XLA:CPU
# maps each call's temporaries fresh, and 4 KiB pages cost a sixth of a CPU train step in page faults).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
# Two pytest workers: compile time dominates the suite, and XLA compiles on one core.
PYTEST_ARGS ?= -n 2

# Where `make train` writes (checkpoints, metrics, TensorBoard); a second `make train` resumes.
WORKDIR ?= runs/tiny
# Where `make extend` writes; it starts from $(WORKDIR)'s newest checkpoint.
EXTEND_WORKDIR ?= runs/tiny_1k
# Where `make sft` writes; it starts from $(WORKDIR)'s newest checkpoint.
SFT_WORKDIR ?= runs/tiny_sft
# make grpo: the arithmetic SFT data and run, then the GRPO run that starts from it.
ARITH_SFT_DATA ?= runs/arithmetic_sft.jsonl
ARITH_SFT_WORKDIR ?= runs/tiny_arith_sft
RL_WORKDIR ?= runs/tiny_rl

.PHONY: setup train extend sft grpo test clean

setup: $(VENV)/.installed

# Python >= 3.12: python3.12 / python3.13 on PATH, else the newest pyenv-installed 3.12+.
$(VENV)/.installed: setup.py constraints.txt
	@py=""; \
	for c in python3.12 python3.13 python3.14 python3; do \
	  if command -v $$c >/dev/null 2>&1 && $$c -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then \
	    py=$$(command -v $$c); break; fi; \
	done; \
	if [ -z "$$py" ] && command -v pyenv >/dev/null 2>&1; then \
	  v=$$(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9](\.[0-9]+)?$$' | sort -V | head -n 1); \
	  if [ -n "$$v" ]; then py=$$(PYENV_VERSION=$$v pyenv which python3); fi; \
	fi; \
	if [ -z "$$py" ]; then \
	  echo "error: dsv3_jax needs Python >= 3.12, and none was found (tried python3.12, python3.13," \
	       "python3.14, python3 and pyenv). Install one, e.g. 'pyenv install 3.12' or your system's" \
	       "python3.12 package, then run make again." >&2; \
	  exit 1; \
	fi; \
	echo "creating $(VENV) with $$py ($$($$py -V))"; \
	rm -rf $(VENV) && $$py -m venv $(VENV) && \
	$(PY) -m pip install -q --upgrade pip && \
	$(PY) -m pip install -q -c constraints.txt -e '.[test,notebooks,eval,serve]' && \
	touch $@

train: setup
	$(PY) -m dsv3_jax.train --config=configs/tiny.py --workdir=$(WORKDIR)

extend: setup
	$(PY) -m dsv3_jax.train --config=configs/extend.py:tiny --workdir=$(EXTEND_WORKDIR) \
	  --config.train.init_from=$(WORKDIR)

sft: setup
	$(PY) -m dsv3_jax.train --config=configs/sft.py --workdir=$(SFT_WORKDIR) \
	  --config.train.init_from=$(WORKDIR)

grpo: setup
	$(PY) -m dsv3_jax.rl.sft_data --output=$(ARITH_SFT_DATA)
	$(PY) -m dsv3_jax.train --config=configs/sft.py:arithmetic --workdir=$(ARITH_SFT_WORKDIR) \
	  --config.train.init_from=$(WORKDIR) --config.data.corpus=$(ARITH_SFT_DATA)
	$(PY) -m dsv3_jax.rl --config=configs/grpo.py --workdir=$(RL_WORKDIR) \
	  --config.train.init_from=$(ARITH_SFT_WORKDIR)

# The second run gives the mesh tests 8 simulated CPU devices (tests marked multidevice).
# --durations: the slowest tests in the log, to keep the suite's time in view.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS) --durations=15
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest $(PYTEST_ARGS) --durations=5 -m multidevice tests/test_parallel.py tests/test_kernel_shards.py tests/test_expert_exchange.py tests/test_plan.py tests/test_lm_eval.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
