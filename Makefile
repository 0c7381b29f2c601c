# make chat   set everything up (first run only), then chat with the embedded SmolLM2-135M-Instruct
# make test   set up if needed, then run the test suite (what CI runs)
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup chat demo test clean

$(STAMP): requirements.txt setup.py pyproject.toml scripts/setup.sh $(wildcard vmm_allocator/*)
	bash scripts/setup.sh
	touch $@

setup: $(STAMP)

chat: setup
	$(VENV)/bin/glake chat

demo: setup
	$(VENV)/bin/glake inspect-memory

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf build $(VENV) glakeserve/*.so
