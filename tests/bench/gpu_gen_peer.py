#!/usr/bin/env python3
"""The Python half of tests/bench/gpu_gen.sh (issue 7, "Performance").

  gpu_gen_peer.py model MODEL_DIR ADAPTER_DIR TOKENIZER_DIR [--tiny]
        a Llama-3-8B-shaped LlamaForCausalLM with random bf16 weights (normal, std 0.02) written
        to MODEL_DIR with the Llama 3 tokenizer files of TOKENIZER_DIR, and a random PEFT LoRA
        adapter (r 16, alpha 16, the seven projections, B ~ N(0, 1e-3)) written to ADAPTER_DIR
  gpu_gen_peer.py prompts MODEL_DIR LENGTH COUNT
        COUNT lines of text, each exactly LENGTH tokens with the model's tokenizer (BOS included)
  gpu_gen_peer.py peer MODEL_DIR ADAPTER_DIR RESULTS PROMPTS_128 PROMPT_2048 [--tiny]
        transformers' generate (greedy, SDPA, bf16, KV cache) on the same prompts: decode
        tokens/s at batch 1 (prompt 128, 256 new tokens) with the adapter merged and unmerged,
        time to first token of the 2048-token prompt (adapter merged), aggregate tokens/s at
        batch 64 (64 prompts of 128, 256 new tokens, merged). One JSON line per result, appended
        to RESULTS as soon as it is known.
  gpu_gen_peer.py ours MEASURE STDERR_FILE RESULTS
        the summary line of `lora-gen -v` (its standard error) as a result
  gpu_gen_peer.py table RESULTS MODEL_DIR
        the table: each measure for HF and for lora-gen, the ratio, and lora-gen's achieved
        memory bandwidth at batch 1 against the device copy rate measured in the same run.
"""
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_train_peer import LLAMA3_8B, TINY, TARGETS, emit  # noqa: E402

NEW = 256


def build(model_dir, adapter_dir, tok_dir, tiny):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    torch.manual_seed(0)
    config = LlamaConfig(**(TINY if tiny else LLAMA3_8B), attn_implementation="sdpa")
    config.torch_dtype = torch.bfloat16
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(model_dir, max_shard_size="5GB", safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(model_dir, name))
    lcfg = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 1e-3)
    peft_model.save_pretrained(adapter_dir)
    print(json.dumps({"stage": "model", "seconds": time.perf_counter() - t0}), flush=True)


def prompts(model_dir, length, count):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "looked", "at", "sky"]
    for i in range(count):
        # About one token a word (Llama 3 never merges across a space-led word); the count of
        # words is then adjusted until the encoding, specials included, is exactly LENGTH.
        def text_of(k):
            return " ".join(words[(i + j) % len(words)] for j in range(k))
        k = length
        for _ in range(64):
            n = len(tok.encode(text_of(k)).ids)
            if n == length:
                break
            k += length - n
        text = text_of(k)
        if len(tok.encode(text).ids) != length:
            sys.exit("gpu_gen_peer.py: no prompt of exactly %d tokens" % length)
        print(text)


def sync(torch):
    torch.cuda.synchronize()


def peer(model_dir, adapter_dir, results, p128, p2048, tiny):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    from peft import PeftModel

    # The device's copy rate, for the bandwidth column.
    x = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(torch)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(torch)
    emit(results, {"stage": "copy", "gb_per_s": 2 * x.numel() * 10 / (time.perf_counter() - t0) / 1e9})
    del x, y

    tok = AutoTokenizer.from_pretrained(model_dir)
    lines = open(p128).read().splitlines()
    long_line = open(p2048).read().splitlines()[0]
    ids1 = tok(lines[:1], return_tensors="pt").input_ids.cuda()
    ids64 = tok(lines[:64], return_tensors="pt").input_ids.cuda()
    ids2048 = tok([long_line], return_tensors="pt").input_ids.cuda()
    base = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    base.generation_config.pad_token_id = base.config.eos_token_id

    def gen(model, ids, new):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False)
        return out.shape[1] - ids.shape[1]

    def timed(name, model, ids, new, reps=1):
        rec = {"stage": "peer", "measure": name}
        try:
            gen(model, ids[:, :16], 4)   # warm-up
            best = None
            for _ in range(reps):
                sync(torch)
                t0 = time.perf_counter()
                n = gen(model, ids, new)
                sync(torch)
                dt = time.perf_counter() - t0
                best = dt if best is None or dt < best else best
            rec.update(seconds=best, new_tokens=n * ids.shape[0])
        except torch.OutOfMemoryError:
            rec["error"] = "out of memory"
        except Exception as e:
            rec["error"] = ("%s: %s" % (type(e).__name__, e))[:120]
        emit(results, rec)

    unmerged = PeftModel.from_pretrained(base, adapter_dir).eval()
    timed("decode_b1_unmerged", unmerged, ids1, NEW)
    merged = unmerged.merge_and_unload().eval()
    timed("decode_b1", merged, ids1, NEW)
    timed("ttft_2048", merged, ids2048, 1, reps=3)
    timed("prefill_128_b1", merged, ids1, 1, reps=3)
    timed("decode_b64", merged, ids64, NEW)


def ours(measure, err_file, results):
    """One lora-gen run's -v summary line (standard error) as a result."""
    import re
    text = open(err_file, errors="replace").read()
    m = re.search(r"(\d+) prompts, (\d+) prompt tokens in (\d+) prefills, ([\d.]+) s \([\d.]+ tokens/s, "
                  r"fastest ([\d.]+) s\); (\d+) new tokens, (\d+) decode steps, ([\d.]+) s", text)
    rec = {"stage": "ours", "measure": measure}
    if m:
        rec.update(prompts=int(m.group(1)), prompt_tokens=int(m.group(2)), prefills=int(m.group(3)),
                   prefill_s=float(m.group(4)), prefill_min_s=float(m.group(5)), new_tokens=int(m.group(6)),
                   steps=int(m.group(7)), decode_s=float(m.group(8)))
        ready = re.search(r"ready in ([\d.]+) s", text)
        if ready:
            rec["ready_s"] = float(ready.group(1))
    else:
        lines = [l for l in text.splitlines() if l.strip()]
        rec["error"] = (lines[-1] if lines else "no summary")[:120]
    emit(results, rec)


def table(results, model_dir):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    D, F, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = D // H
    # Bytes a decode step reads at batch 1: every weight but the embedding table, bf16.
    weights = 2 * (L * (D * (H * hd) * 2 + D * (KV * hd) * 2 + 3 * D * F + 2 * D) + D + V * D)
    kv_per_token = 2 * 2 * L * KV * hd
    recs = [json.loads(l) for l in open(results) if l.strip()]
    peer = {r["measure"]: r for r in recs if r.get("stage") == "peer"}
    our = {r["measure"]: r for r in recs if r.get("stage") == "ours"}
    copy = next((r["gb_per_s"] for r in recs if r.get("stage") == "copy"), None)

    def peer_value(m):
        r = peer.get(m)
        if not r or "error" in r:
            return None, (r or {}).get("error", "not run")
        if m.startswith("ttft") or m.startswith("prefill"):
            return r["seconds"] * 1e3, None
        if m == "decode_b64":
            return r["new_tokens"] / r["seconds"], None
        # batch 1: the first token is the prefill's; the rest are decode steps
        return (r["new_tokens"] - 1) / r["seconds"], None

    def ours_value(m):
        r = our.get(m)
        if not r or "error" in r:
            return None, (r or {}).get("error", "not run")
        if m.startswith("ttft") or m.startswith("prefill"):
            return r["prefill_min_s"] * 1e3, None
        if m.startswith("decode_b64"):
            return r["new_tokens"] / (r["prefill_s"] + r["decode_s"]), None
        return (r["new_tokens"] - r["prompts"]) / r["decode_s"], None

    rows = [("decode_b1", "batch 1 decode, adapter merged", "tokens/s", True),
            ("decode_b1_unmerged", "batch 1 decode, adapter unmerged", "tokens/s", True),
            ("decode_b1_nographs", "batch 1 decode, merged, no CUDA graphs", "tokens/s", True),
            ("ttft_2048", "time to first token, 2048-token prompt", "ms", False),
            ("decode_b64", "batch 64 aggregate (prefill included)", "tokens/s", True)]
    print("| measure | unit | HF transformers | lora-gen | ratio | lora-gen bandwidth |")
    print("|---|---|---|---|---|---|")
    for key, label, unit, higher in rows:
        pv, perr = peer_value("decode_b1" if key == "decode_b1_nographs" else key)
        ov, oerr = ours_value(key)
        ratio = ""
        if pv and ov:
            ratio = "%.2fx" % (ov / pv if higher else pv / ov)
        bw = ""
        if ov and key.startswith("decode_b1"):
            ctx = 128 + NEW / 2
            gbs = ov * (weights + kv_per_token * ctx) / 1e9
            bw = "%.0f GB/s" % gbs + (" (%.0f%% of copy)" % (100 * gbs / copy) if copy else "")
        fmt = (lambda v: "%.1f" % v) if unit == "ms" else (lambda v: "%.0f" % v)
        print("| %s | %s | %s | %s | %s | %s |" % (label, unit, fmt(pv) if pv else perr, fmt(ov) if ov else oerr,
                                                  ratio, bw))
    print("\nweights read per batch-1 step: %.2f GB (all but the embedding table); copy rate %s" %
          (weights / 1e9, "%.0f GB/s" % copy if copy else "not measured"))
    if copy:
        print("bandwidth floor at batch 1: %.0f tokens/s (weights / copy rate)" % (copy * 1e9 / weights))


def main(argv):
    tiny = "--tiny" in argv
    argv = [a for a in argv if a != "--tiny"]
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "model" and len(argv) == 5:
        build(argv[2], argv[3], argv[4], tiny)
    elif cmd == "prompts" and len(argv) == 5:
        prompts(argv[2], int(argv[3]), int(argv[4]))
    elif cmd == "peer" and len(argv) == 7:
        peer(argv[2], argv[3], argv[4], argv[5], argv[6], tiny)
    elif cmd == "ours" and len(argv) == 5:
        ours(argv[2], argv[3], argv[4])
    elif cmd == "table" and len(argv) == 4:
        table(argv[2], argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
