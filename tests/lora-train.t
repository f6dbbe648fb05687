#!/bin/sh
# lora-train(1): the command line, every rejected input, training output (a PEFT adapter
# directory), determinism, resume bit for bit (from a checkpoint and after SIGINT), evaluation,
# metrics, the man page's EXAMPLES, and PEFT loading our adapter (tests/peft/check_adapter.py,
# when python3 has torch and peft).
# Fixtures: tests/fixtures/lora-train/tiny (a random tiny Llama: GQA, llama3 rope, untied
# embeddings) and token records train.jsonl / val.jsonl, packed here by recs + pack; all made by
# tests/fixtures/lora-train/make_fixtures.py.
. "$(dirname "$0")/tap.sh"
LT=$BIN/lora-train
[ -x "$LT" ] || skip_all "lora-train not built ($LT)"
for t in recs pack; do [ -x "$BIN/$t" ] || skip_all "$t not built: it makes the shards these tests train on"; done
FIX=$TOP/tests/fixtures/lora-train
TINY=$FIX/tiny
PATH=$BIN:$PATH
export PATH
# The tiny model is too small for threads to pay; one thread keeps the suite fast on a busy
# machine (results do not depend on it).
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export OMP_NUM_THREADS

# set_byte FILE OFFSET OCTAL: overwrite one byte in place.
set_byte() { printf "\\$3" | dd of="$1" bs=1 seek="$2" conv=notrunc 2>/dev/null; }
# metrics without the time-dependent fields (elapsed_s, tokens_per_s come last).
losses() { sed 's/,"elapsed_s".*/}/' "$1"; }

recs load "$FIX/train.jsonl" | pack -q -s 16 -V 48 -o "$T/train" &&
    recs load "$FIX/val.jsonl" | pack -q -s 16 -V 48 -o "$T/val"
[ -f "$T/train/index.json" ] || skip_all "cannot pack the fixtures with recs and pack"
# lora-train ARGS: the tiny model on the packed fixtures, quietly.
train() { "$LT" -q -m "$TINY" -i "$T/train" "$@"; }

# --- command line -----------------------------------------------------------------
"$LT" --help >"$T/help" 2>"$T/err"
is "$?:$(head -1 "$T/help" | cut -c1-40):$(wc -c <"$T/err")" "0:usage: lora-train -m MODEL_DIR -i SHARDS:0" \
   "--help: usage on stdout, exit 0"
MANWIDTH=200 mandoc -Tutf8 "$TOP/man/lora-train.1" 2>/dev/null | col -b |
    sed -n '/^SYNOPSIS/,/^[A-Z]/p' | sed '1d;$d' | tr -s ' \t\n' '   ' | sed 's/^ //;s/ $//' >"$T/syn"
sed -n '/^usage:/,/^[^ u]/p' "$T/help" | sed '$d;s/^usage: //' | tr -s ' \n' '  ' | sed 's/^ //;s/ $//' >"$T/use"
ok "man SYNOPSIS matches --help" cmp -s "$T/syn" "$T/use"
ok "man page passes mandoc -Tlint" sh -c "mandoc -Tlint -Wwarning '$TOP/man/lora-train.1' >'$T/lint' 2>&1 && ! test -s '$T/lint'"

O=$T/o
run_case "no arguments" 2 "^lora-train: need -m MODEL_DIR, -i SHARDS and -o OUT_DIR" -- "$LT"
ok "a usage error prints the usage on stderr" grep -q "^usage: lora-train" "$T/err"
run_case "no -o" 2 "need -m MODEL_DIR" -- "$LT" -m "$TINY" -i "$T/train"
run_case "unknown option" 2 "^lora-train: " -- "$LT" --frobnicate
run_case "operand" 2 "unexpected argument 'extra'" -- train -o "$O" extra
run_case "--resume DIR (without =)" 2 "a checkpoint goes as --resume=$T/x" -- train -o "$O" --resume "$T/x"
run_case "rank 0" 2 "^lora-train: --rank: '0' is not a whole number" -- train -o "$O" -r 0
run_case "rank not a number" 2 "^lora-train: --rank: '4x'" -- train -o "$O" --rank 4x
run_case "dropout 1" 2 "^lora-train: --dropout: '1' is not a number in \[0, 1\)" -- train -o "$O" --dropout 1
run_case "negative lr" 2 "^lora-train: --lr: '-1'" -- train -o "$O" --lr -1
run_case "beta2 1" 2 "^lora-train: --adam-beta2" -- train -o "$O" --adam-beta2 1
run_case "unknown target" 2 "^lora-train: --targets: .*lm_head" -- train -o "$O" --targets q,lm_head
run_case "unknown scheduler" 2 "^lora-train: --scheduler: .*warm" -- train -o "$O" --scheduler warm
run_case "steps and epochs" 2 "--max-steps or --epochs, not both" -- train -o "$O" -n 2 -e 1
run_case "two warmups" 2 "--warmup-steps or --warmup-ratio, not both" -- train -o "$O" --warmup-steps 1 --warmup-ratio 0.1
run_case "eval-every without eval" 2 "--eval-every needs --eval" -- train -o "$O" --eval-every 2
run_case "unknown device" 2 "^lora-train: --device: 'gpu'" -- train -o "$O" --device gpu
run_case "unknown recompute mode" 2 "^lora-train: --recompute: 'all' is not none, mlp, layer or auto" -- \
    train -o "$O" --recompute all
run_case "empty recompute mode" 2 "^lora-train: --recompute: '' is not none, mlp, layer or auto" -- \
    train -o "$O" --recompute ''
run_case "recompute without a value" 2 "option '--recompute' requires an argument" -- train -o "$O" --recompute
run_case "a bad memory limit" 2 "^lora-train: --memory-limit: want a positive size like 64M or 22.4G: '12Q'" -- \
    train -o "$O" --memory-limit 12Q
run_case "a zero memory limit" 2 "^lora-train: --memory-limit: want a positive size like 64M or 22.4G: '0'" -- \
    train -o "$O" --memory-limit 0
run_case "dropout on the GPU" 2 "^lora-train: --dropout 0.1 is not supported on the GPU" -- \
    train -o "$O" --device cuda --dropout 0.1
# Without a GPU (or without CUDA in the build) --device cuda is refused and auto trains on the CPU;
# tests/gpu/train.t covers the machine with one.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    skip "--device cuda without a GPU: this machine has one"
    skip "--device auto without a GPU: this machine has one"
else
    run_case "--device cuda without a GPU" 1 \
        "^lora-train: (the CUDA training path is not available in this build|--device cuda: no CUDA device found)" -- \
        train -o "$O" --device cuda
    "$LT" -m "$TINY" -i "$T/train" -o "$T/auto" -n 1 -r 2 --device auto 2>"$T/err" >/dev/null
    ok "--device auto without a GPU trains on the CPU" grep -q "; on cpu (" "$T/err"
fi

# --- bad inputs and outputs ---------------------------------------------------------
run_case "missing model" 1 "^lora-train: .*no-such-model" -- "$LT" -m "$T/no-such-model" -i "$T/train" -o "$O"
run_case "missing shards" 1 "^lora-train: .*no-such-shards" -- train -i "$T/no-such-shards" -o "$O"
cp -r "$T/train" "$T/bad"
shard=$(ls "$T"/bad/*.bin | head -1)
set_byte "$shard" 400 377   # a token id inside a row (header 256 bytes, row header 64)
run_case "corrupt shard: exit 1" 1 "^lora-train: .*row" -- train -i "$T/bad" -o "$O"
ok "corrupt shard: the message names the file" grep -q "shard-00000.bin" "$T/err"
ok "corrupt shard: no output written" test ! -e "$O/adapter_model.safetensors"
: >"$T/file"
run_case "unwritable output" 1 "^lora-train: $T/file/out: " -- train -o "$T/file/out" -n 1
# Shards with a vocabulary larger than the model's.
recs load "$FIX/train.jsonl" | pack -q -s 16 -V 64 -o "$T/wide"
run_case "shards with a larger vocabulary" 1 "ids up to 63, but the model .* has a vocabulary of 48" -- train -i "$T/wide" -o "$O"
run_case "--resume without a checkpoint" 1 "^lora-train: --resume: no checkpoint in" -- train -o "$T/fresh" -n 2 --resume
run_case "--resume of a missing directory" 1 "^lora-train: .*nowhere.*not a complete checkpoint" -- train -o "$O" --resume="$T/nowhere"

# --- training ---------------------------------------------------------------------
"$LT" -m "$TINY" -i "$T/train" -o "$T/a" -n 6 -r 4 --alpha 8 --dropout 0.1 --save-every 3 --metrics "$T/a.jsonl" 2>"$T/a.err"
is "$?" 0 "train 6 steps"
ok "adapter weights written" test -s "$T/a/adapter_model.safetensors"
ok "adapter config says LORA" grep -q '"peft_type": "LORA"' "$T/a/adapter_config.json"
ok "adapter config records r" grep -q '"r": 4,' "$T/a/adapter_config.json"
ok "adapter config records the base model" grep -q "\"base_model_name_or_path\": \"$TINY\"" "$T/a/adapter_config.json"
is "$(grep -c '"loss":' "$T/a.jsonl")" 6 "one metrics line per step"
ok "metrics lines are JSON with step, loss, lr, grad_norm, tokens" \
   grep -q '^{"step":6,"loss":[0-9.]*,"lr":[0-9.e-]*,"grad_norm":[0-9.]*,"tokens":[0-9]*,' "$T/a.jsonl"
ok "progress: a plain line per step when stderr is not a terminal" grep -q "^lora-train: step 6/6 loss [0-9.]* lr" "$T/a.err"
ok "summary at the end" grep -q "^lora-train: done: 6 steps" "$T/a.err"
ok "checkpoints every 3 steps" test -s "$T/a/checkpoint-3/trainer_state.json" -a -s "$T/a/checkpoint-6/optimizer.safetensors"
ok "no temporary directories left" sh -c "! ls -d '$T'/a/*.tmp.* 2>/dev/null"

train -o "$T/a2" -n 6 -r 4 --alpha 8 --dropout 0.1 --metrics "$T/a2.jsonl"
ok "same options, same adapter bytes" cmp -s "$T/a/adapter_model.safetensors" "$T/a2/adapter_model.safetensors"
train -o "$T/s" -n 6 -r 4 --alpha 8 --dropout 0.1 -s 1
ok "another seed, another adapter" sh -c "! cmp -s '$T/a/adapter_model.safetensors' '$T/s/adapter_model.safetensors'"

# Resume: 6 steps straight vs 3 steps, a checkpoint, then 3 more from it.
train -o "$T/r" -n 6 -r 4 --alpha 8 --dropout 0.1 --save-every 3 --metrics "$T/r.jsonl" --resume="$T/a/checkpoint-3"
is "$?" 0 "resume from checkpoint-3"
ok "resumed: the same adapter bytes as the uninterrupted run" cmp -s "$T/a/adapter_model.safetensors" "$T/r/adapter_model.safetensors"
ok "resumed: the same optimizer state at step 6" cmp -s "$T/a/checkpoint-6/optimizer.safetensors" "$T/r/checkpoint-6/optimizer.safetensors"
losses "$T/a.jsonl" | sed -n '4,6p' >"$T/a.tail"
losses "$T/r.jsonl" >"$T/r.all"
ok "resumed: the same losses, lr and grad norms for steps 4-6" cmp -s "$T/a.tail" "$T/r.all"
# N steps, then N more: with a schedule that does not depend on the total (constant, no warmup)
# 3 steps + resume to 6 is 6 steps straight.
train -o "$T/n6" -n 6 -r 4 --dropout 0.1 --scheduler constant --warmup-steps 0 --metrics "$T/n6.jsonl"
train -o "$T/n3" -n 3 -r 4 --dropout 0.1 --scheduler constant --warmup-steps 0 --save-every 100 --metrics "$T/n3.jsonl"
ok "--save-every: a checkpoint after the last step" test -s "$T/n3/checkpoint-3/trainer_state.json"
train -o "$T/n3" -n 6 -r 4 --dropout 0.1 --scheduler constant --warmup-steps 0 --save-every 100 --metrics "$T/n3.jsonl" --resume
ok "3 steps + resume + 3 steps: the same adapter bytes as 6 steps" cmp -s "$T/n6/adapter_model.safetensors" "$T/n3/adapter_model.safetensors"
losses "$T/n6.jsonl" >"$T/n6.l"
losses "$T/n3.jsonl" >"$T/n3.l"
ok "3 steps + resume + 3 steps: the same 6 losses" cmp -s "$T/n6.l" "$T/n3.l"
run_case "resume with another --rank is refused" 1 "made with --rank 4, this run has 8" -- \
    train -o "$T/r2" -n 6 -r 8 --alpha 8 --dropout 0.1 --resume="$T/a/checkpoint-3"
run_case "resume with another --lr is refused" 1 "made with --lr" -- \
    train -o "$T/r2" -n 6 -r 4 --alpha 8 --dropout 0.1 --lr 0.1 --resume="$T/a/checkpoint-3"

# SIGINT: a checkpoint at the next step boundary, exit 130; --resume finishes the run exactly.
"$LT" -m "$TINY" -i "$T/train" -o "$T/i" -n 80 -r 4 --dropout 0.1 --metrics "$T/i.jsonl" 2>"$T/i.err" &
pid=$!
n=0
while [ ! -s "$T/i.jsonl" ] && [ $n -lt 500 ]; do sleep 0.01; n=$((n + 1)); done
kill -INT $pid 2>/dev/null
wait $pid
st=$?
if [ $st -eq 0 ]; then
    skip "SIGINT: the run finished before the signal arrived"
else
    is "$st" 130 "SIGINT: exit 130"
    ok "SIGINT: says where the checkpoint is" grep -q "interrupted at step [0-9]*; checkpoint $T/i/checkpoint-" "$T/i.err"
    ok "SIGINT: no adapter in OUT_DIR yet" test ! -e "$T/i/adapter_model.safetensors"
    train -o "$T/i" -n 80 -r 4 --dropout 0.1 --metrics "$T/i.jsonl" --resume
    is "$?" 0 "SIGINT: --resume finishes"
    train -o "$T/u" -n 80 -r 4 --dropout 0.1 --metrics "$T/u.jsonl"
    ok "SIGINT + resume: the same adapter bytes as an uninterrupted run" cmp -s "$T/i/adapter_model.safetensors" "$T/u/adapter_model.safetensors"
    losses "$T/i.jsonl" >"$T/i.l"
    losses "$T/u.jsonl" >"$T/u.l"
    ok "SIGINT + resume: the same 80 losses (metrics appended on resume)" cmp -s "$T/i.l" "$T/u.l"
fi

# Evaluation, epochs, targets, schedules.
train -o "$T/e" -e 1 -r 2 --eval "$T/val" --eval-every 2 --metrics "$T/e.jsonl"
is "$?" 0 "train one epoch with evaluation"
# 34 rows, batch 2: 17 micro-batches, accum 4: 4 steps per epoch (as transformers counts).
is "$(grep -c '"loss":' "$T/e.jsonl")" 4 "one epoch of 34 rows at batch 2, accum 4 is 4 steps"
is "$(grep -o '"step":[0-9]*,"eval_loss"' "$T/e.jsonl" | tr -d '\n')" '"step":2,"eval_loss""step":4,"eval_loss"' \
   "eval every 2 steps and at the end"
ok "eval loss over every trained token of the validation rows" grep -q '"eval_tokens":47}' "$T/e.jsonl"
train -o "$T/t" -n 1 -r 2 --targets q,v
ok "--targets q,v: target_modules" sh -c "tr -d ' \n' <'$T/t/adapter_config.json' | grep -q '\"target_modules\":\[\"q_proj\",\"v_proj\"\]'"
ok "--targets q,v: no other modules in the weights" sh -c "! grep -aq 'mlp' '$T/t/adapter_model.safetensors'"
train -o "$T/c" -n 4 -r 2 --scheduler cosine --warmup-ratio 0.5 --lr 1e-3 --metrics "$T/c.jsonl"
# warmup ceil(0.5*4) = 2: lr 0, 5e-4, then cosine from 1e-3: 1e-3, 5e-4.
is "$(grep -o '"lr":[0-9.e-]*' "$T/c.jsonl" | tr '\n' ' ')" '"lr":0 "lr":0.0005 "lr":0.001 "lr":0.0005 ' \
   "cosine schedule with warmup ratio"
train -o "$T/d" -n 1 -r 2 --device cpu
is "$?" 0 "--device cpu"
for mode in mlp layer; do
    train -o "$T/d-$mode" -n 1 -r 2 --device cpu --recompute $mode --memory-limit 1k
    ok "--recompute $mode --memory-limit 1k on the CPU: accepted, the same adapter bytes" \
        cmp -s "$T/d/adapter_model.safetensors" "$T/d-$mode/adapter_model.safetensors"
done
if command -v script >/dev/null 2>&1; then
    script -qec "'$LT' -m '$TINY' -i '$T/train' -o '$T/tty' -n 3 -r 2" /dev/null 2>&1 | tr '\r\033' 'RE' >"$T/tty.out"
    ok "progress on a terminal: one line refreshed in place" grep -q 'RE\[Kstep 3/3  loss [0-9.]*  lr .* tok/s  eta' "$T/tty.out"
    ok "progress on a terminal: the summary on a line of its own" grep -q '^lora-train: done: 3 steps' "$T/tty.out"
else
    skip "progress on a terminal: script(1) not found"
fi
"$LT" -q -m "$TINY" -i "$T/train" -o "$T/q" -n 2 -r 2 2>"$T/q.err"
ok "-q: no progress lines" sh -c "! grep -q 'step' '$T/q.err'"

# --- PEFT loads our adapter and agrees with our engine -------------------------------------
# find_spec looks the modules up without importing them (importing torch takes seconds).
if python3 -c 'import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ("torch", "peft", "transformers", "safetensors")))' 2>/dev/null; then
    stories=
    have_testdata stories260K/hf/config.json && stories="--stories $TESTDATA/stories260K/hf"
    # shellcheck disable=SC2086
    python3 "$TOP/tests/peft/check_adapter.py" --bin "$BIN" --work "$T/peft" $stories >"$T/peft.out" 2>"$T/peft.err"
    st=$?
    grep -E '^(ok|FAIL): ' "$T/peft.out" | sed 's/^/# /'
    is "$st" 0 "PEFT: PeftModel.from_pretrained loads our adapter; logits and loss agree (check_adapter.py)"
    [ $st -eq 0 ] || diag "$(tail -5 "$T/peft.err")"
else
    skip "PEFT check: python3 with torch, transformers, peft and safetensors not found"
fi

# --- the EXAMPLES of lora-train(1), on stories260K and the shared Alpaca data --------------
if have_testdata stories260K/hf/config.json && have_testdata alpaca/alpaca_tiny.json &&
    [ -x "$BIN/alp-fmt" ] && [ -x "$BIN/tok" ]; then
    S=$TESTDATA/stories260K/hf
    A=$TESTDATA/alpaca/alpaca_tiny.json
    (
        cd "$T" || exit 1
        alp-fmt "$A" | tok -q -m "$S" | pack -q -m "$S" -s 64 -o shards &&
            lora-train -q -m "$S" -i shards -o adapter -n 3
    ) 2>"$T/ex1.err"
    is "$?" 0 "EXAMPLES: alp-fmt | tok | pack, then 3 steps on stories260K"
    (
        cd "$T" || exit 1
        alp-fmt "$A" | tok -q -m "$S" |
            pack -q -m "$S" -s 64 -F 0.1 -O val -o train
        lora-train -q -m "$S" -i train --eval val --eval-every 2 \
            --save-every 2 --metrics metrics.jsonl -o adapter2 -n 4
    ) 2>"$T/ex2.err"
    is "$?" 0 "EXAMPLES: validation split, evaluation, metrics, checkpoints"
    ok "EXAMPLES: checkpoints at 2 and 4" test -d "$T/adapter2/checkpoint-2" -a -d "$T/adapter2/checkpoint-4"
    is "$(grep -c eval_loss "$T/metrics.jsonl")" 2 "EXAMPLES: evaluations at steps 2 and 4"
    (
        cd "$T" || exit 1
        lora-train -q -m "$S" -i train --eval val --eval-every 2 \
            --save-every 2 --metrics metrics.jsonl -o adapter2 -n 4 --resume
    ) 2>"$T/ex3.err"
    is "$?" 0 "EXAMPLES: --resume of a finished run succeeds"
    # Tokenizer fingerprints: shards from another tokenizer are refused, naming both.
    sed 's/"fingerprint":"0000000000000000"/"fingerprint":"0123456789abcdef"/' "$FIX/train.jsonl" |
        recs load | pack -q -s 16 -V 48 -o "$T/alien"
    "$LT" -q -m "$S" -i "$T/alien" -o "$T/alien-out" -n 1 2>"$T/err"
    st=$?
    if grep -q "cannot check" "$T/err"; then
        skip "tokenizer fingerprint check: $(head -1 "$T/err")"
    else
        is "$st" 1 "shards of another tokenizer: exit 1"
        ok "shards of another tokenizer: both fingerprints and paths named" \
           grep -q "$T/alien: tokenizer fingerprint 0x0123456789abcdef differs from the model's tokenizer $S (0x" "$T/err"
    fi
    if [ -x "$BIN/lora-gen" ]; then
        (cd "$T" && lora-gen -m "$S" -a adapter -p 'Once upon a time' >gen.out)
        is "$?" 0 "EXAMPLES: lora-gen with the adapter"
    else
        skip "EXAMPLES: lora-gen not built"
    fi
else
    skip "EXAMPLES: need stories260K and alpaca_tiny.json in TESTDATA and alp-fmt, tok built"
fi
done_testing
