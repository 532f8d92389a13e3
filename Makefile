# make demo: tiny UMD on the embedded digits.  make test: the test suite (CPU, fake devices).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)

.PHONY: demo test install clean reproduce

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python main.py --config=configs/demo.py --mode=pretrain --workdir=workdirs/demo
	$(VENV)/bin/python main.py --config=configs/demo.py --mode=probe --workdir=workdirs/demo
	$(VENV)/bin/python main.py --config=configs/demo.py:finetune --mode=finetune --workdir=workdirs/demo_finetune
	$(VENV)/bin/python main.py --config=configs/demo.py:finetune --mode=generate --workdir=workdirs/demo_finetune

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf workdirs .pytest_cache

# The paper's ordering at small scale (RESULTS.md): 4 methods x 3 seeds on the digits, ~90 min on 2 cores.
reproduce: $(STAMP)
	$(VENV)/bin/python experiments/reproduce.py
