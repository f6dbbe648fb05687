#!/bin/sh
# The adapter lora-train --device cuda writes, read by PEFT (issue 6's correctness list):
# tests/peft/check_adapter.py --device cuda trains a random tiny Llama (GQA, llama3 RoPE
# scaling, untied, rsLoRA, all seven targets) and stories260K (when $TESTDATA holds it) a few
# steps on the GPU, then loads the output with PeftModel.from_pretrained unchanged: the config
# reads back, PEFT's logits equal the base model's with B A merged by hand from the file, the
# adapter moves them, and PEFT's validation loss equals the GPU run's eval_loss within bf16
# tolerance (2e-2); lora-gen on the CPU then generates with it what PEFT does, token for token.
# Skips without an NVIDIA GPU or without python3's torch, transformers, peft and safetensors.
cd "$(dirname "$0")/../.." || exit 1
. tests/gpu/tap_gpu.sh   # ROOT, BIN, TESTDATA, the TAP helpers; skips without a GPU
python3 -c 'import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ("torch", "peft", "transformers", "safetensors")))' 2>/dev/null ||
    skip_all "python3 with torch, transformers, peft and safetensors not found"
for t in recs pack lora-train lora-gen; do [ -x "$BIN/$t" ] || skip_all "$BIN/$t not built"; done
stories=
[ -f "$TESTDATA/stories260K/hf/config.json" ] && stories="--stories $TESTDATA/stories260K/hf"
# shellcheck disable=SC2086
python3 "$ROOT/tests/peft/check_adapter.py" --bin "$BIN" --work "$T" --device cuda $stories >"$T/out" 2>"$T/err"
st=$?
grep -E '^(ok|FAIL): ' "$T/out" | sed 's/^/# /'
is "$st" 0 "PEFT reads the adapter lora-train --device cuda wrote: logits, loss and lora-gen agree"
[ $st -eq 0 ] || diag "$(tail -5 "$T/err")"
ok "the GPU runs trained on the GPU" sh -c '! grep -q "^FAIL" "$1" && grep -q "lora-train --device cuda eval_loss" "$1"' \
    sh "$T/out"
done_testing
