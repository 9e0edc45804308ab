# make test | make demo | make bench        (LANE=a1111 by default; LANE=forge or LANE=modern)
LANE ?= a1111
PYTHON ?= python3
VENV := .venv/$(LANE)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Offline tests: nothing reaches a model hub, and torch uses the two cores calmly.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv test demo bench clean
venv: $(STAMP)

# torch first and pinned to the CPU build, so nothing pulls a multi-GB CUDA wheel; then the
# lane's host pins (installed and used as constraints), the extension's needs and the test tools.
$(STAMP): lanes/$(LANE).txt requirements.txt requirements-test.txt
	@test -f lanes/$(LANE).txt || { echo "unknown LANE=$(LANE): see lanes/"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$$(grep '^torch==' lanes/$(LANE).txt)"
	$(PY) -m pip install -q --disable-pip-version-check -c lanes/$(LANE).txt -r lanes/$(LANE).txt -r requirements.txt -r requirements-test.txt
	# open-clip-torch only for its tokenizer vocabulary: without timm and torchvision (see FACTS)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps "$$(grep '^open-clip-torch' lanes/$(LANE).nodeps || echo open-clip-torch)"
	touch $@

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m dreambooth demo

bench: $(STAMP)
	$(PY) -m dreambooth bench --matrix default

clean:
	rm -rf .venv models artifacts
