# make demo   -- set up, then run the whole loop on the embedded stack (adaptloop demo)
# make test   -- set up, then run every test tier against real components
ADAPTLOOP_HOME ?= $(HOME)/.cache/adaptloop
VENV := $(ADAPTLOOP_HOME)/venv
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-unit bench clean-stack

install:
	bash deploy/install.sh

demo: install
	$(VENV)/bin/python -m adaptloop.cli demo

# pytest exits 5 when it collected nothing; make treats any non-zero exit as failure.
# -rP prints what passing tests printed: the measured numbers (before/after success, timings).
# -n 2 --dist loadscope: two pytest workers; tests/conftest.py says which tests run together.
test: install
	$(VENV)/bin/python -m pytest tests -n 2 --dist loadscope --no-loadscope-reorder -v -rP --durations=15

test-unit: install
	$(VENV)/bin/python -m pytest tests/unit -v

clean-stack:
	-$(VENV)/bin/python -m adaptloop.cli down
