# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL  ?= models/tiny-moe
STORE  ?= stores/tiny-moe
# the bundled model: 6.3 MiB of backbone + 6.7 MiB of expert cache = a quarter of its 27 MiB of experts
MEMORY ?= 13MiB
PROMPT ?= def fibonacci(n):

export HF_HUB_OFFLINE := 1

.PHONY: run test install clean

# The venv sees system packages so a user's own torch (e.g. a CUDA build) is kept; torch==2.13.0 is
# installed first only when no torch is importable (a local CPU wheel serves it on our machines).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[serve,test]"
	touch $(STAMP)

install: $(STAMP)

$(STORE)/manifest.json: $(MODEL)/model.safetensors | $(STAMP)
	$(BIN)/moe-offload convert --model $(MODEL) --out $(STORE) --overwrite

run: $(STAMP) $(STORE)/manifest.json
	$(BIN)/moe-offload generate --model $(STORE) --memory $(MEMORY) --prefetch lookahead \
		--prompt "$(PROMPT)" --max-new-tokens 64

test: $(STAMP)
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .pytest_cache
