# The seed tutorial (Unsloth's Alpaca notebook) as a pipeline: Llama 3 8B, LoRA r 16, alpha 16 on
# all seven projections, micro-batch 2, accumulation 4, 60 steps, lr 2e-4 (the notebook's
# comment suggests 2e-5 for longer runs: LR=2e-5), linear schedule, 5 warmup steps, weight decay
# 0.01, seed 3407, sequences of 2048, on the GPU when there is one.
#   make -f pipelines/seed.mk MODEL=/path/to/Meta-Llama-3-8B DATA=alpaca_data.json
# DATA may be JSON or JSONL, compressed or inside a tar/zip (alp-fmt reads it through libarchive).

BIN    ?= bin
MODEL  ?= $(error set MODEL=DIR, a Hugging Face Llama model directory)
DATA   ?= $(error set DATA=FILE, Alpaca rows: JSON array or JSONL)
OUT    ?= build/seed
SEQ    ?= 2048
LR     ?= 2e-4
STEPS  ?= 60
DEVICE ?= auto

.PHONY: train
train: $(OUT)/adapter/adapter_config.json

$(OUT)/shards/index.json: $(DATA)
	@mkdir -p $(OUT)
	$(BIN)/alp-fmt -t unsloth $(DATA) | $(BIN)/tok -m $(MODEL) | \
	  $(BIN)/pack -m $(MODEL) -s $(SEQ) -S 3407 -o $(OUT)/shards

$(OUT)/adapter/adapter_config.json: $(OUT)/shards/index.json
	$(BIN)/lora-train -m $(MODEL) -i $(OUT)/shards -o $(OUT)/adapter --device $(DEVICE) \
	  -r 16 --alpha 16 --dropout 0 --targets all -b 2 -a 4 -n $(STEPS) --warmup-steps 5 \
	  --lr $(LR) --scheduler linear --weight-decay 0.01 -s 3407 --metrics $(OUT)/metrics.jsonl
