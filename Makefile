# make test | make demo | make bench        (LANE=a1111 by default; LANE=forge, neo, classic or modern)
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
# the browser tests drive the page of this lane's WebUI
export DREAMBOOTH_LANE := $(LANE)

.PHONY: venv test demo bench clean
venv: $(STAMP)

# torch first and pinned to the CPU build, so nothing pulls a multi-GB CUDA wheel; then the
# lane's host pins (installed and used as constraints), the extension's needs and the test tools.
$(STAMP): lanes/$(LANE).txt requirements.txt requirements-test.txt $(wildcard lanes/$(LANE).first lanes/$(LANE).skip lanes/$(LANE).nodeps)
	@test -f lanes/$(LANE).txt || { echo "unknown LANE=$(LANE): see lanes/"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$$(grep '^torch==' lanes/$(LANE).txt)"
	# lanes/LANE.first: what the host's launcher installs before its pins (Neo: gradio 4.40.0,
	# whose Pillow<11 the pins then override, as in Neo)
	if [ -f lanes/$(LANE).first ]; then $(PY) -m pip install -q --disable-pip-version-check -r lanes/$(LANE).first; fi
	# lanes/LANE.skip: what that host does not have and the lane leaves out (Neo: bitsandbytes)
	cat requirements.txt requirements-test.txt | { if [ -f lanes/$(LANE).skip ]; then grep -v -w -f lanes/$(LANE).skip; else cat; fi; } > $(VENV)/wanted.txt
	$(PY) -m pip install -q --disable-pip-version-check -c lanes/$(LANE).txt -r lanes/$(LANE).txt -r $(VENV)/wanted.txt
	# lanes/LANE.nodeps, installed without their dependencies: open-clip-torch only for its
	# tokenizer vocabulary, without timm and torchvision (see FACTS); A1111's onnx for the tests
	# (its protobuf 3.20.0 is one patch below what onnx asks for, and works)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $$(grep -v '^#' lanes/$(LANE).nodeps)
	touch $@

# TESTS: the test files to run (default: all). CI gives the forge and classic lanes their
# host-specific subsets with TESTS="$$(cat lanes/<lane>.tests)" (README, Tests).
TESTS ?=
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) $(TESTS)

demo: $(STAMP)
	$(PY) -m dreambooth demo

bench: $(STAMP)
	$(PY) -m dreambooth bench --matrix default

clean:
	rm -rf .venv models artifacts
