#!/usr/bin/env python3
"""Prove that the adapter lora-train writes is a PEFT adapter that PEFT reads as we mean it.

For each model (a random tiny Llama made here with GQA, llama3 rope scaling and untied
embeddings; stories260K when its directory is given):
  1. make token records (a prompt segment, then a trained response ending in EOS) and pack them
     with our tools: recs load | pack  (training and validation sets);
  2. train a few steps with lora-train (all seven targets, a large learning rate so that B moves
     far from zero) with --eval on the validation set;
  3. load the output with PeftModel.from_pretrained on the same base, unchanged, and check
     a. the config reads back (r, lora_alpha, target_modules, use_rslora);
     b. PEFT's logits equal the base model's with W + scale * B @ A merged by hand from the
        safetensors file (names, shapes and the scale mean what we say);
     c. the adapter changes the logits (B is not zero);
     d. PEFT's mean loss over the validation documents (each document alone: packing restricts
        attention to a document and restarts positions, so it must not matter) equals the
        eval_loss lora-train computed on the packed shards (relative 1e-4 with --device cpu, our
        fp32 engine; 2e-2 with --device cuda, the bf16 GPU engine, which then trains too);
     e. (stories260K, when lora-gen is built) lora-gen's greedy output with the adapter, merged
        and unmerged, equals PEFT's greedy generate: the same logits' argmax at every step;
  f. (stories260K, lora-gen) the other direction: an adapter saved by PEFT itself (bf16,
     rsLoRA, random non-zero B) read by our loader generates in lora-gen what it does in PEFT.
lora-gen runs on the CPU (--device cpu): greedy equality is a property of the fp32 engine; the GPU's
generation is compared with PEFT in tests/gpu/gen.t.
Prints one line per check; exit 0 when all pass. --record FILE appends a summary.

usage: check_adapter.py --bin BIN_DIR --work DIR [--stories DIR] [--device cpu|cuda] [--record FILE]
"""
import argparse
import json
import math
import os
import random
import subprocess
import sys
import time

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

failures = 0
summary = []


def check(name, cond, detail):
    global failures
    line = f"{'ok' if cond else 'FAIL'}: {name}: {detail}"
    print(line, flush=True)
    summary.append(line)
    if not cond:
        failures += 1


def run(cmd, **kw):
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"check_adapter: command failed ({r.returncode}): {cmd}\n{r.stderr}")
    return r


def make_tiny(path):
    torch.manual_seed(7)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    m.save_pretrained(path, safe_serialization=True)


def tiny_docs(n, seed, vocab=96):
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(3, 12))]
        response = [rng.randrange(3, vocab) for _ in range(rng.randrange(3, 14))] + [2]
        docs.append((prompt, response))
    return docs


def stories_docs(model_dir, n, offset, max_len):
    """Alpaca-style prompt/response pairs tokenized with the model's tokenizer."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    words = ("once upon a time there was a little girl named lily she liked to play with her "
             "ball in the park one day she saw a big dog the dog was happy and they played").split()
    rng = random.Random(offset)
    docs = []
    for _ in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randrange(3, 8)))
        a = " ".join(rng.choice(words) for _ in range(rng.randrange(4, 12)))
        prompt = [1] + tok.encode(f"Question: {q}\nAnswer:", add_special_tokens=False).ids
        response = tok.encode(" " + a, add_special_tokens=False).ids + [2]
        docs.append((prompt[: max_len // 2], response[: max_len // 2]))
    return docs


def write_records(path, docs):
    with open(path, "w") as f:
        for i, (prompt, response) in enumerate(docs):
            f.write(json.dumps({"kind": "tokens", "origin": os.path.basename(path), "index": i + 1,
                                "fingerprint": "0000000000000000",
                                "segments": [{"trained": False, "ids": prompt},
                                             {"trained": True, "ids": response}]}) + "\n")


def peft_loss(model, docs):
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, response in docs:
            ids = torch.tensor([prompt + response])
            logits = model(input_ids=ids).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(len(prompt) - 1, len(prompt) + len(response) - 1):
                total -= logp[t, ids[0, t + 1]].item()
                count += 1
    return total / count, count


def check_model(label, model_dir, docs_train, docs_val, seq_len, vocab, bin_dir, work, extra, device,
                gen_prompt=None):
    os.makedirs(work, exist_ok=True)
    tr, va = os.path.join(work, "train.jsonl"), os.path.join(work, "val.jsonl")
    write_records(tr, docs_train)
    write_records(va, docs_val)
    for src, dst in ((tr, "train"), (va, "val")):
        run(f"'{bin_dir}/recs' load '{src}' | '{bin_dir}/pack' -q -s {seq_len} -V {vocab} -o '{work}/{dst}'")
    out, metrics = os.path.join(work, "adapter"), os.path.join(work, "metrics.jsonl")
    t0 = time.time()
    run(f"'{bin_dir}/lora-train' -q -m '{model_dir}' -i '{work}/train' -o '{out}' --eval '{work}/val' "
        f"--metrics '{metrics}' -n 4 -b 2 -a 2 --lr 0.02 --warmup-steps 1 -r 4 --alpha 8 "
        f"--device {device} {extra}")
    train_s = time.time() - t0
    eval_loss = [json.loads(l) for l in open(metrics) if "eval_loss" in l][-1]["eval_loss"]

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([docs_val[0][0] + docs_val[0][1]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    # b. the merge by hand, from the file's tensors
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
    tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for name, a in tensors.items():
            if ".lora_A." not in name:
                continue
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            target = name.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
            params[target] += scale * (b @ a)
        merged_logits = merged(input_ids=ids).logits

    peft_model = PeftModel.from_pretrained(base, out).eval()
    pc = peft_model.peft_config["default"]
    check(f"{label}: config", pc.r == cfg["r"] and pc.lora_alpha == cfg["lora_alpha"]
          and sorted(pc.target_modules) == sorted(cfg["target_modules"]),
          f"r={pc.r} lora_alpha={pc.lora_alpha} use_rslora={pc.use_rslora} targets={sorted(pc.target_modules)}")
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits
    diff = (peft_logits - merged_logits).abs().max().item()
    rel = diff / merged_logits.abs().max().item()
    check(f"{label}: PEFT logits = base with B@A*scale merged by hand", rel < 1e-5, f"max rel diff {rel:.2e}")
    moved = (peft_logits - base_logits).abs().max().item()
    check(f"{label}: the adapter changes the logits", moved > 1e-3, f"max |delta logits| {moved:.3g}")
    if gen_prompt and os.access(os.path.join(bin_dir, "lora-gen"), os.X_OK):
        # e. greedy generation: lora-gen with our adapter (merged and beside the weights) and
        #    PEFT's generate pick the same tokens, which needs the same logits at every step.
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model_dir)
        prompt_ids = tok(gen_prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = peft_model.generate(input_ids=prompt_ids, max_new_tokens=40, do_sample=False)
        want = tok.decode(gen[0], skip_special_tokens=True)
        for mode in ("", "--unmerged"):
            r = run(f"'{bin_dir}/lora-gen' --device cpu -m '{model_dir}' -a '{out}' -n 40 -j {mode} "
                    f"-p '{gen_prompt}'")
            got = json.loads(r.stdout)
            text = got["prompt"] + got["output"]
            check(f"{label}: lora-gen {mode or '(merged)'} greedy = PEFT generate greedy", text == want,
                  f"{got['tokens']} tokens: {got['output'][:60]!r}" + ("" if text == want else f" vs {want!r}"))
    loss, count = peft_loss(peft_model, docs_val)
    rel_loss = abs(loss - eval_loss) / abs(loss)
    tol = 1e-4 if device == "cpu" else 2e-2
    check(f"{label}: PEFT loss on the validation documents = lora-train --device {device} eval_loss", rel_loss < tol,
          f"peft {loss:.7f} ours {eval_loss:.7f} over {count} targets, rel err {rel_loss:.1e} < {tol:.0e} "
          f"(4 training steps took {train_s:.1f}s)")


def check_peft_written(model_dir, bin_dir, work, prompt):
    """f. The other direction: an adapter PEFT itself saves (random non-zero B, in bfloat16,
    with every key PEFT writes) is read by our loader, and lora-gen generates what PEFT does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer
    if not os.access(os.path.join(bin_dir, "lora-gen"), os.X_OK):
        return
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["k_proj", "o_proj", "up_proj"],
                     task_type="CAUSAL_LM", bias="none", use_rslora=True)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:   # bfloat16-exact values, so the bf16 file holds them exactly
                p.copy_((torch.randn_like(p) * 0.3).to(torch.bfloat16).float())
    out = os.path.join(work, "peft-written")
    model.save_pretrained(out)
    from safetensors.torch import save_file
    tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, os.path.join(out, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        want = tok.decode(model.generate(input_ids=ids, max_new_tokens=40, do_sample=False)[0],
                          skip_special_tokens=True)
    r = run(f"'{bin_dir}/lora-gen' --device cpu -m '{model_dir}' -a '{out}' -n 40 -j -p '{prompt}'")
    got = json.loads(r.stdout)
    check("stories260K: an adapter saved by PEFT (bf16, rsLoRA, k,o,up) in lora-gen = PEFT generate",
          got["prompt"] + got["output"] == want, f"{got['output'][:60]!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--stories")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where lora-train trains")
    ap.add_argument("--record")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tiny = os.path.join(args.work, "tiny-model")
    make_tiny(tiny)
    check_model("tiny random Llama (GQA, llama3 rope, untied, rsLoRA, all targets)", tiny,
                tiny_docs(24, 1), tiny_docs(6, 2), 32, 96, args.bin, os.path.join(args.work, "tiny"),
                "--rslora --targets all", args.device)
    if args.stories:
        check_model("stories260K (q,v,gate,down)", args.stories, stories_docs(args.stories, 24, 1, 48),
                    stories_docs(args.stories, 6, 2, 48), 48, 512, args.bin,
                    os.path.join(args.work, "stories"), "--targets q,v,gate,down", args.device, "Once upon a time")
        check_peft_written(args.stories, args.bin, args.work, "Once upon a time")
    if args.record:
        import peft
        import transformers
        with open(args.record, "a") as f:
            f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} peft {peft.__version__} "
                    f"transformers {transformers.__version__} torch {torch.__version__}\n")
            f.write("\n".join(summary) + "\n")
    print(f"check_adapter: {failures} failure(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
