# The README's main job: the whole pipeline on an embedded default, on the CPU.
#   Alpaca rows -> alp-fmt -> tok -> pack -> lora-train (a few steps on stories260K) -> lora-gen
# Run it as `make demo` (top-level Makefile) or `make -f pipelines/demo.mk BIN=bin`.
# Inputs: TESTDATA (default ../shared/data) holds the model and the Alpaca sample; without it the
# rows of pipelines/sample.jsonl are used and the model must be given as MODEL=DIR.

BIN      ?= bin
TESTDATA ?= ../shared/data
MODEL    ?= $(TESTDATA)/stories260K/hf
DATA     ?= $(firstword $(wildcard $(TESTDATA)/alpaca/alpaca_tiny.json) pipelines/sample.jsonl)
OUT      ?= build/demo
STEPS    ?= 30
SEQ      ?= 256

.PHONY: demo check-model
demo: $(OUT)/answers.txt
	@echo "demo: the adapter is in $(OUT)/adapter, the answers in $(OUT)/answers.txt" >&2

check-model:
	@test -f $(MODEL)/config.json || { \
	  echo "demo: no model at $(MODEL)" >&2; \
	  echo "hint: the demo trains stories260K (karpathy/tinyllamas, MIT) as a Hugging Face directory;" >&2; \
	  echo "hint: set TESTDATA to a folder holding stories260K/hf (config.json, model.safetensors," >&2; \
	  echo "hint: tokenizer.json, tokenizer_config.json, generation_config.json), or MODEL=DIR of any Llama model" >&2; \
	  exit 1; }

# Data: formatted with the Alpaca template, tokenized with the model's tokenizer, packed into
# rows of SEQ tokens (responses trained, prompts masked), with a small validation split.
$(OUT)/shards/index.json: $(DATA) | check-model
	@mkdir -p $(OUT)
	$(BIN)/alp-fmt $(DATA) | $(BIN)/tok -m $(MODEL) | \
	  $(BIN)/pack -m $(MODEL) -s $(SEQ) -C 4 -O $(OUT)/val -o $(OUT)/shards

$(OUT)/adapter/adapter_config.json: $(OUT)/shards/index.json
	rm -rf $(OUT)/adapter
	$(BIN)/lora-train -m $(MODEL) -i $(OUT)/shards -o $(OUT)/adapter --eval $(OUT)/val \
	  -r 8 --alpha 16 -b 2 -a 2 -n $(STEPS) --lr 2e-3 --scheduler cosine --warmup-steps 3 \
	  --metrics $(OUT)/metrics.jsonl

$(OUT)/answers.txt: $(OUT)/adapter/adapter_config.json pipelines/questions.jsonl
	$(BIN)/alp-fmt --prompt-only pipelines/questions.jsonl | \
	  $(BIN)/lora-gen -m $(MODEL) -a $(OUT)/adapter -n 60 --separator '----' | tee $@
