# make demo   set everything up (first run only) and show the allocator on a demo workload
# make test   set up if needed, then run the test suite (what CI runs)
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test gpu-suite clean

$(STAMP): requirements.txt setup.py pyproject.toml scripts/setup.sh $(wildcard vmm_allocator/*)
	bash scripts/setup.sh
	touch $@

setup: $(STAMP)

demo: setup
	$(VENV)/bin/glake inspect-memory

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf build $(VENV) glakeserve/*.so
