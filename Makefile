# make demo: tiny UMD on the embedded digits.  make test: the test suite (CPU, fake devices).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)
TEST_STAMP := $(VENV)/.installed-test-$(shell cksum < requirements-test.txt | cut -d' ' -f1)

.PHONY: demo demo-video test test-fast install clean reproduce

# The pinned requirements, then the package itself (editable: `umd_jax`, `configs` and the `umd-jax` command).
install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	$(VENV)/bin/python -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-[0-9]*
	touch $(STAMP)

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(VENV)/bin/python -m pip install -q -r requirements-test.txt
	rm -f $(VENV)/.installed-test-*
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(VENV)/bin/python main.py --config=configs/demo.py --mode=pretrain --workdir=workdirs/demo
	$(VENV)/bin/python main.py --config=configs/demo.py --mode=probe --workdir=workdirs/demo
	$(VENV)/bin/python main.py --config=configs/demo.py:finetune --mode=finetune --workdir=workdirs/demo_finetune
	$(VENV)/bin/python main.py --config=configs/demo.py:finetune --mode=generate --workdir=workdirs/demo_finetune
	$(VENV)/bin/python main.py --config=configs/demo.py:classify --mode=classify --workdir=workdirs/demo_classify

# The video demo (README, Video): moving digits -- pre-train, probe, predict the future frames,
# fine-tune class-conditionally and sample clips, fine-tune for the motion label (~10 min, 2 cores).
demo-video: $(STAMP)
	$(VENV)/bin/python main.py --config=configs/demo.py:video --mode=pretrain --workdir=workdirs/demo_video
	$(VENV)/bin/python main.py --config=configs/demo.py:video --mode=probe --workdir=workdirs/demo_video
	$(VENV)/bin/python main.py --config=configs/demo.py:video --mode=generate --workdir=workdirs/demo_video
	$(VENV)/bin/python main.py --config=configs/demo.py:video,finetune --mode=finetune --workdir=workdirs/demo_video_finetune
	$(VENV)/bin/python main.py --config=configs/demo.py:video,finetune --mode=generate --workdir=workdirs/demo_video_finetune
	$(VENV)/bin/python main.py --config=configs/demo.py:video,classify --mode=classify --workdir=workdirs/demo_video_classify

# The suite on TEST_WORKERS pytest processes (pytest-xdist), a test module to a worker, the longest
# modules first (tests/conftest.py). 2 workers fit CI's 2 cores and keep the machine under 8 GB
# (README, Tests: a worker peaked at 4.3 GB). TEST_WORKERS=0: one process; more for more cores.
TEST_WORKERS ?= 2
PYTEST := $(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(TEST_STAMP)
	$(PYTEST) tests

# The edit loop: the unit tests only (tests/conftest.py marks the process, multi-process and
# end-to-end tests `slow`); `make test` runs everything.
test-fast: $(TEST_STAMP)
	$(PYTEST) -m "not slow" tests

clean:
	rm -rf workdirs .pytest_cache

# The paper's ordering at small scale (RESULTS.md): 4 methods x 3 seeds on the digits, ~90 min on 2 cores.
reproduce: $(STAMP)
	$(VENV)/bin/python experiments/reproduce.py
