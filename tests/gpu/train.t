#!/bin/sh
# lora-train --device cuda against --device cpu on stories260K: Alpaca rows packed as in
# pipelines/demo.mk, 50 steps with the same seed and dropout 0 on each device; every step's loss
# (--metrics) and the evaluation losses agree within bf16 tolerance (relative 2e-2), the CUDA
# adapter loads back (lora-gen -a), a CPU checkpoint resumes on the GPU with the CPU's curve, and
# --recompute mlp and layer give step 1's loss bit for bit and the curve within tolerance, in less memory,
# and --memory-limit makes auto mix them layer by layer within the limit.
# Skips on a machine without an NVIDIA GPU or without $TESTDATA. Prints the loss agreement and
# the step times of both devices as TAP diagnostics.
cd "$(dirname "$0")/../.." || exit 1
. tests/gpu/tap_gpu.sh   # ROOT, BIN, TESTDATA, the TAP helpers; skips without a GPU
M=$TESTDATA/stories260K/hf
DATA=$TESTDATA/alpaca/alpaca_tiny.json
[ -f "$M/config.json" ] && [ -f "$DATA" ] ||
    skip_all "TESTDATA does not hold stories260K/hf and alpaca/alpaca_tiny.json"
for t in alp-fmt tok pack lora-train lora-gen; do [ -x "$BIN/$t" ] || skip_all "$BIN/$t not built"; done
STEPS=50
TOL=2e-2

"$BIN/alp-fmt" "$DATA" | "$BIN/tok" -m "$M" | "$BIN/pack" -q -m "$M" -s 256 -C 4 -O "$T/val" -o "$T/shards"
if [ ! -f "$T/shards/index.json" ]; then fail "alp-fmt | tok | pack of the Alpaca rows"; done_testing; fi
# train DEVICE OUT ARGS: the demo's settings, dropout 0 (the GPU refuses dropout).
train() {
    _dev=$1 _out=$2; shift 2
    "$BIN/lora-train" -m "$M" -i "$T/shards" -o "$T/$_out" --eval "$T/val" -r 8 --alpha 16 -b 2 -a 2 \
        --lr 2e-3 --scheduler cosine --warmup-steps 3 --dropout 0 -s 3407 --device "$_dev" "$@" 2>"$T/$_out.err"
}
# metric FILE KEY: one line per object holding KEY, its value.
metric() { sed -n "s/.*\"$2\":\([^,}]*\).*/\1/p" "$1"; }
# peak FILE: the summary's peak device memory (GiB) in a run's standard error
peak() { sed -n 's/.*peak device memory \([0-9.]*\) GiB.*/\1/p' "$1"; }
# compare NAME A B: the largest relative difference of two columns of numbers, within TOL.
compare() {
    paste "$2" "$3" | awk -v tol="$TOL" -v name="$1" '
        { n++; d = $1 - $2; if (d < 0) d = -d; r = d / ($1 < 0 ? -$1 : $1); if (r > worst) { worst = r; at = n } }
        END { printf "# %s: %d values, largest relative difference %.3g (value %d)\n", name, n, worst, at;
              exit !(n > 0 && worst <= tol) }'
}

train cpu cpu -n $STEPS --save-every 10 --metrics "$T/cpu.jsonl"
is "$?" 0 "--device cpu trains $STEPS steps"
train cuda cuda -n $STEPS --metrics "$T/cuda.jsonl"
is "$?" 0 "--device cuda trains $STEPS steps"
diag "$(cat "$T/cuda.err")"
ok "the CUDA run says where it ran" grep -q "; on cuda: " "$T/cuda.err"
ok "the summary gives the peak device memory" grep -q "peak device memory [0-9.]* GiB" "$T/cuda.err"

grep '"loss"' "$T/cpu.jsonl" >"$T/cpu.steps"
grep '"loss"' "$T/cuda.jsonl" >"$T/cuda.steps"
is "$(wc -l <"$T/cuda.steps" | tr -d ' ')" "$STEPS" "one metrics line per CUDA step"
metric "$T/cuda.steps" peak_device_bytes | sort -u >"$T/peak"
ok "every CUDA step's metrics give the peak device bytes, the summary's figure" \
    awk -v g="$(peak "$T/cuda.err")" '{ n++; b = $1 } END { d = b / 2^30 - g; exit !(n == 1 && b > 0 && d * d < 1e-6) }' "$T/peak"
ok "CPU metrics give no device bytes" sh -c '! grep -q peak_device_bytes "$1"' sh "$T/cpu.jsonl"
metric "$T/cpu.steps" loss >"$T/a"
metric "$T/cuda.steps" loss >"$T/b"
ok "step losses agree within $TOL" compare "loss per step (cpu vs cuda)" "$T/a" "$T/b"
metric "$T/cpu.steps" grad_norm >"$T/a"
metric "$T/cuda.steps" grad_norm >"$T/b"
compare "grad_norm per step (cpu vs cuda, not tested)" "$T/a" "$T/b"
metric "$T/cpu.jsonl" eval_loss >"$T/a"
metric "$T/cuda.jsonl" eval_loss >"$T/b"
ok "evaluation losses agree within $TOL" compare "eval_loss (cpu vs cuda)" "$T/a" "$T/b"
for d in cpu cuda; do
    metric "$T/$d.steps" elapsed_s | awk -v d=$d -v s=$STEPS '
        { t[NR] = $1 } END { printf "# %s: %.2f ms per step (steps 2-%d), first step %.2f ms\n",
                             d, 1000 * (t[NR] - t[1]) / (NR - 1), s, 1000 * t[1] }'
done

ok "the CUDA adapter has PEFT's files" test -s "$T/cuda/adapter_model.safetensors" -a -s "$T/cuda/adapter_config.json"
printf '%s\n' '{"instruction": "Name a color of the sky.", "input": ""}' | "$BIN/alp-fmt" --prompt-only |
    "$BIN/lora-gen" -m "$M" -a "$T/cuda" -n 20 >"$T/gen" 2>"$T/gen.err"
is "$?" 0 "lora-gen -a loads the CUDA adapter"
ok "lora-gen wrote text" test -s "$T/gen"

# Recomputation: the forward is deterministic, so step 1's loss is the same bit for bit with and
# without it; later steps within rounding (the attention backward's fp32 atomics are unordered).
ok "--recompute auto (the default) keeps every activation when it fits, and says so" \
    grep -q "; recompute none (auto), [0-9.]* GiB of buffers; weights [0-9.]* GiB loaded in [0-9.]* s" "$T/cuda.err"
train cuda none -n 5 --recompute none --metrics "$T/none.jsonl"
is "$?" 0 "--recompute none trains"
grep '"loss"' "$T/none.jsonl" | metric /dev/stdin loss >"$T/b"
for mode in mlp layer; do
    train cuda $mode -n 5 --recompute $mode --metrics "$T/$mode.jsonl"
    is "$?" 0 "--recompute $mode trains"
    ok "--recompute $mode is reported" grep -q "; recompute $mode, " "$T/$mode.err"
    grep '"loss"' "$T/$mode.jsonl" | metric /dev/stdin loss >"$T/a"
    is "$(head -n 1 "$T/a")" "$(head -n 1 "$T/b")" "step 1's loss is the same with recompute $mode and none"
    ok "5 steps with recompute $mode and none agree within $TOL" compare "loss per step ($mode vs none)" "$T/a" "$T/b"
done
diag "peak device memory: recompute none $(peak "$T/none.err") GiB, mlp $(peak "$T/mlp.err") GiB, layer $(peak "$T/layer.err") GiB"
ok "recompute layer needs less device memory than mlp, mlp less than none" \
    awk -v a="$(peak "$T/layer.err")" -v m="$(peak "$T/mlp.err")" -v b="$(peak "$T/none.err")" \
    'BEGIN { exit !(a > 0 && a < m && m < b) }'

# --memory-limit halfway between mlp's and none's bytes: auto mixes the modes layer by layer
# (stories260K's 5 layers: the top 2 keep everything), within the limit, with none's step 1
mlp_bytes=$(metric "$T/mlp.jsonl" peak_device_bytes | head -n 1)
none_bytes=$(metric "$T/none.jsonl" peak_device_bytes | head -n 1)
limit=$(( (mlp_bytes + none_bytes) / 2 ))
train cuda mixed -n 5 --memory-limit "$limit" --metrics "$T/mixed.jsonl"
is "$?" 0 "--memory-limit $limit trains (mlp $mlp_bytes, none $none_bytes bytes)"
ok "--memory-limit: auto mixes the modes, and says so" \
    grep -q "; recompute mlp (none in 2 of 5 layers) (auto), " "$T/mixed.err"
is "$(metric "$T/mixed.jsonl" peak_device_bytes | sort -u | awk -v l="$limit" '{ print ($1 <= l && $1 > 0) }')" 1 \
    "--memory-limit: peak device bytes $(metric "$T/mixed.jsonl" peak_device_bytes | head -n 1) within the limit"
grep '"loss"' "$T/mixed.jsonl" | metric /dev/stdin loss >"$T/a"
is "$(head -n 1 "$T/a")" "$(head -n 1 "$T/b")" "step 1's loss is the same with the mixed plan and none"
train cuda small -n 1 --recompute none --memory-limit "$mlp_bytes"
is "$?" 1 "--recompute none over --memory-limit: exit 1"
ok "--recompute none over --memory-limit: the error says so" \
    grep -q "^lora-train: .*recompute none needs [0-9.]* GiB ([0-9]* bytes), more than the memory limit" "$T/small.err"

train auto auto -n 2
is "$?" 0 "--device auto trains"
ok "--device auto picks the GPU" grep -q "; on cuda: " "$T/auto.err"

# A CPU checkpoint continued on the GPU follows the CPU run's curve.
train cuda resumed -n $STEPS --resume="$T/cpu/checkpoint-10" --metrics "$T/resumed.jsonl"
is "$?" 0 "--device cuda resumes a CPU checkpoint"
grep '"loss"' "$T/resumed.jsonl" | metric /dev/stdin loss >"$T/b"
metric "$T/cpu.steps" loss | tail -n +11 >"$T/a"
ok "resumed losses (steps 11-$STEPS) agree with the CPU run within $TOL" \
    compare "resumed on cuda vs cpu, steps 11-$STEPS" "$T/a" "$T/b"
done_testing
