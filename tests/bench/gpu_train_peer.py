#!/usr/bin/env python3
"""The Python half of tests/bench/gpu_train.sh (issue 6, "Performance").

  gpu_train_peer.py tokens SEQ ROWS VOCAB SEED   JSON lines for `recs load` (recs(1)): ROWS
                                                 token records of SEQ-1 random ids, all trained
  gpu_train_peer.py peer MODEL_DIR RESULTS SHAPES [--tiny] [--device cuda|cpu]
        1. times a bf16 matmul (8192^3 on the GPU) -> {"stage":"matmul","tflops":...}
        2. builds a Llama-3-8B-shaped LlamaForCausalLM with random bf16 weights (normal, std 0.02)
           on the device and writes it to MODEL_DIR as a Hugging Face directory (safetensors)
        3. HF transformers + PEFT LoRA (r 16, alpha 16, q,k,v,o,gate,up,down; SDPA attention,
           gradient checkpointing, fused AdamW, bf16) on each SHAPE "BxS" of the comma list:
           WARMUP untimed steps, then TIMED timed ones -> {"stage":"peer","shape":..,
           "tokens_per_s":..,"peak_bytes":..} or {"stage":"peer","shape":..,"error":"out of memory"}
  gpu_train_peer.py table RESULTS MODEL_DIR     the table from RESULTS (the lines above plus the
                                                 shell's "ours" lines) and the model's config.json
Each result is one JSON line appended to RESULTS as soon as it is known, so a stage killed by
its time limit still leaves the ones before it. --tiny: a 2-layer 64-wide model (CPU smoke test).
"""
import json
import os
import sys
import time

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02,
                 bos_token_id=128000, eos_token_id=128001)
TINY = dict(LLAMA3_8B, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, bos_token_id=1, eos_token_id=2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP, TIMED = 2, 4


def emit(path, obj):
    line = json.dumps(obj)
    print(line, flush=True)
    with open(path, "a") as f:
        f.write(line + "\n")


def tokens(seq, rows, vocab, seed):
    import random
    rng = random.Random(seed)
    out = sys.stdout
    # SEQ ids a record: each fills exactly one packed row of SEQ positions.
    for i in range(rows):
        ids = [rng.randrange(vocab) for _ in range(seq)]
        out.write(json.dumps({"kind": "tokens", "origin": "random", "index": i + 1,
                              "fingerprint": "0000000000000000",
                              "segments": [{"trained": True, "ids": ids}]}, separators=(",", ":")) + "\n")


def matmul_tflops(torch, device):
    n = 8192 if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(torch, device)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(torch, device)
    dt = time.perf_counter() - t0
    return 2.0 * n ** 3 * reps / dt / 1e12, n


def sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


def peer(model_dir, results, shapes, tiny, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model

    tflops, n = matmul_tflops(torch, device)
    emit(results, {"stage": "matmul", "n": n, "tflops": tflops})

    t0 = time.perf_counter()
    torch.manual_seed(0)
    config = LlamaConfig(**(TINY if tiny else LLAMA3_8B), attn_implementation="sdpa")
    config.torch_dtype = torch.bfloat16
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config)   # _init_weights: normal(0, 0.02), norms 1, on the device
    torch.set_default_dtype(torch.float32)
    model.config.use_cache = False
    model.save_pretrained(model_dir, max_shard_size="5GB", safe_serialization=True)
    emit(results, {"stage": "model", "seconds": time.perf_counter() - t0,
                   "params": sum(p.numel() for p in model.parameters())})

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lcfg = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01, fused=(device == "cuda"))
    vocab = config.vocab_size
    for shape in shapes:
        b, s = (int(x) for x in shape.split("x"))
        rec = {"stage": "peer", "shape": shape}
        try:
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            g = torch.Generator(device=device).manual_seed(1)
            for step in range(WARMUP + TIMED):
                if step == WARMUP:
                    sync(torch, device)
                    t_start = time.perf_counter()
                ids = torch.randint(0, vocab, (b, s), device=device, generator=g)
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            loss_value = loss.item()   # syncs
            dt = time.perf_counter() - t_start
            rec.update(tokens_per_s=b * s * TIMED / dt, step_s=dt / TIMED, loss=loss_value)
            if device == "cuda":
                rec["peak_bytes"] = torch.cuda.max_memory_allocated()
        except torch.OutOfMemoryError:
            rec["error"] = "out of memory"
        except Exception as e:   # a failing shape is reported, the next ones still run
            rec["error"] = ("%s: %s" % (type(e).__name__, e))[:120]
        opt.zero_grad(set_to_none=True)
        loss = None
        emit(results, rec)


def flop_per_token(cfg, seq, rank=16):
    """Useful FLOP per trained position, no recomputation: the frozen products run forward and
    backward for the input gradient only (2 + 2 FLOP a weight), attention is causal (average
    context S/2; QK^T and PV forward, twice that backward), LoRA adds 6 r (in + out) a projection."""
    d, f, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    weights = L * (d * d + 2 * d * kv + d * d + 3 * d * f) + d * V
    in_out = L * ((d + d) + 2 * (d + kv) + (d + d) + 3 * (d + f))
    return 4 * weights + 6 * L * seq * d + 6 * rank * in_out, weights


def ours_result(rec):
    """tokens/s of steps WARMUP+1.. from lora-train's metrics, its peak device memory, or why not."""
    out = dict(rec)
    steps = []
    try:
        with open(rec["metrics"]) as f:
            steps = [json.loads(l) for l in f if '"loss"' in l]
    except (OSError, ValueError):
        pass
    err = ""
    try:
        with open(rec["err"], errors="replace") as f:
            err = f.read()
    except OSError:
        pass
    import re
    m = re.search(r"peak device memory ([0-9.]+) GiB", err)
    if m:
        out["peak_bytes"] = float(m.group(1)) * 2 ** 30
    m = re.search(r"weights ([0-9.]+) GiB loaded in ([0-9.]+) s", err)
    if m:
        out["load"] = "weights %s GiB loaded in %s s" % (m.group(1), m.group(2))
    m = re.search(r"; recompute ([a-z]+(?: \([a-z]+ in [0-9]+ of [0-9]+ layers\))?)", err)
    if m and rec.get("recompute") == "peer":
        out["load"] = "plan: %s; %s" % (m.group(1), out.get("load", ""))
    b, s = (int(x) for x in rec["shape"].split("x"))
    if rec.get("rc") == 0 and len(steps) > WARMUP:
        dt = steps[-1]["elapsed_s"] - steps[WARMUP - 1]["elapsed_s"]
        out["tokens_per_s"] = b * s * (len(steps) - WARMUP) / dt
        out["step_s"] = dt / (len(steps) - WARMUP)
    elif rec.get("rc") == 124:
        out["error"] = "time limit (%ss), %d steps done" % (rec.get("limit", "?"), len(steps))
    else:
        lines = [l for l in err.splitlines() if l.strip()]
        low = err.lower()
        if "out of memory" in low or "cudaerrormemoryallocation" in low:
            out["error"] = "out of memory"
        else:
            out["error"] = ("rc %s: %s" % (rec.get("rc"), lines[-1] if lines else "no message"))[:150]
    return out


def table(results, model_dir):
    recs = []
    with open(results) as f:
        for l in f:
            l = l.strip()
            if l:
                recs.append(json.loads(l))
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
    except OSError:
        cfg = LLAMA3_8B
    mm = next((r for r in recs if r["stage"] == "matmul"), None)
    peak_rate = mm["tflops"] if mm else None
    peers = {r["shape"]: r for r in recs if r["stage"] == "peer"}
    # One lora-train row per (shape, recompute mode), in the order run.
    ours = {}
    for r in recs:
        if r["stage"] == "ours":
            ours.setdefault(r["shape"], []).append(ours_result(r))
    shapes = list(dict.fromkeys([r["shape"] for r in recs if r["stage"] in ("peer", "ours")]))
    gib = lambda r: "%.1f GiB" % (r["peak_bytes"] / 2 ** 30) if r and "peak_bytes" in r else "-"
    print("bf16 matmul (%s^3, torch): %s TFLOP/s" % (mm["n"] if mm else "?", "%.0f" % peak_rate if mm else "not measured"))
    _, weights = flop_per_token(cfg, 0)
    print("FLOP model per trained token: 4 P + 6 L S d + 6 r sum(in+out) (P = %.3g weights in products incl. lm_head,"
          " L %d, d %d, r 16, S the sequence length; no recomputation)" % (weights, cfg["num_hidden_layers"], cfg["hidden_size"]))
    head = ["shape", "engine", "tokens/s", "vs peer", "peak GPU mem", "GFLOP/token", "TFLOP/s", "of matmul", "note"]
    rows = []
    for shape in shapes:
        s = int(shape.split("x")[1])
        fpt, _ = flop_per_token(cfg, s)
        runs = [("HF+PEFT", peers.get(shape))]
        label = lambda r: ("lora-train --memory-limit (peer's)" if r["recompute"] == "peer" else
                           "lora-train --recompute %s" % r["recompute"])
        runs += [(label(r) if "recompute" in r else "lora-train", r)
                 for r in ours.get(shape, [])] or [("lora-train", None)]
        for name, r in runs:
            if r is None:
                rows.append([shape, name, "-", "-", "-", "%.1f" % (fpt / 1e9), "-", "-", "not run"])
                continue
            tps = r.get("tokens_per_s")
            p = peers.get(shape, {}).get("tokens_per_s")
            note = r.get("error", "")
            if "smi_mib" in r and r["smi_mib"]:
                note = (note + "; " if note else "") + "nvidia-smi max %.1f GiB" % (r["smi_mib"] / 1024)
            if "load" in r:
                note = (note + "; " if note else "") + r["load"]
            if tps:
                tf = tps * fpt / 1e12
                rows.append([shape, name, "%.0f" % tps, "%.2fx" % (tps / p) if p and name != "HF+PEFT" else "1.00x" if name == "HF+PEFT" else "-",
                             gib(r), "%.1f" % (fpt / 1e9), "%.0f" % tf, "%.0f%%" % (100 * tf / peak_rate) if peak_rate else "-", note])
            else:
                rows.append([shape, name, "-", "-", gib(r), "%.1f" % (fpt / 1e9), "-", "-", note or "failed"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def main(argv):
    if len(argv) == 3 and argv[0] == "table":
        table(argv[1], argv[2])
        return 0
    if len(argv) >= 5 and argv[0] == "tokens":
        tokens(int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]))
        return 0
    if len(argv) >= 4 and argv[0] == "peer":
        rest = argv[4:]
        tiny = "--tiny" in rest
        device = rest[rest.index("--device") + 1] if "--device" in rest else "cuda"
        peer(argv[1], argv[2], argv[3].split(","), tiny, device)
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
