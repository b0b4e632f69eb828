# Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch 2.13.0; set TORCH_SPEC= (empty) to keep a GPU torch already installed.
TORCH_SPEC ?= torch==2.13.0
EXAMPLE ?= examples/nano-elastic-tiny
DEMO_OUT ?= demo-out

.PHONY: install demo test bench clean

$(BIN)/elastic: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(BIN)/elastic

install: $(BIN)/elastic

demo: install
	$(BIN)/elastic inspect $(EXAMPLE)
	$(BIN)/elastic slice $(EXAMPLE) --budget all --output $(DEMO_OUT)/bf16 --overwrite
	$(BIN)/elastic quantize $(EXAMPLE) --format nvfp4 --calib-samples 8 --calib-seq-len 128 --output $(DEMO_OUT)/nvfp4 --overwrite
	$(BIN)/elastic slice $(DEMO_OUT)/nvfp4 --budget all --output $(DEMO_OUT)/nvfp4-children --overwrite
	$(BIN)/elastic verify $(DEMO_OUT)/nvfp4-children/1.1M --parent $(DEMO_OUT)/nvfp4

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/slice_bench.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
