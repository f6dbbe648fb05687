#!/usr/bin/env python3
"""Golden outputs for lora-gen: transformers' greedy `generate` on stories260K, alone and with a
small random LoRA adapter, for a few prompts.

    python3 tests/golden/gen_reference.py [--model DIR] [--out DIR] [--check]

Writes into --out (default tests/golden/gen):
    prompts.txt                       one prompt per line (the first is empty: BOS only)
    adapter/adapter_config.json       a PEFT LoRA adapter (r 2, alpha 4, all seven modules) with
    adapter/adapter_model.safetensors random A and B (seeded), saved by PEFT itself
    records.jsonl                     prompts of several lines as text records (`recs load` form)
    records-adapter.txt               their outputs with the adapter, in text mode
    warpers.json                      transformers' logits processors (repetition penalty,
                                      temperature, top-k, top-p, min-p, in generate's order) on
                                      random logits: the processed logits, null where dropped
    base.jsonl, adapter.jsonl         per prompt: {"prompt", "ids", "output", "tokens", "stop"}
    base.txt, adapter.txt             the same outputs as lora-gen prints them in text mode
    eos.jsonl                         the base model from BOS until it emits an EOS id
                                      (each output then a newline, an empty line between two)
The output text of a prompt is decode(prompt + new ids) minus decode(prompt), special tokens
skipped: the text that continues the prompt. "tokens" counts the new ids, the EOS included when
one ended the output; "stop" is "eos" or "length".

--check regenerates in memory and compares with the files instead of writing them (the test
runs this when torch is installed).
"""
import argparse
import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "",
    "Once upon a time",
    "The little dog",
    "Lily and Tom went to the park. They saw",
    "Tim had a red ball and a café",
]
# Prompts of several lines, given to lora-gen as text records (records.jsonl, `recs load` form).
RECORD_PROMPTS = [
    "Below is a story.\n\n### Story:\nOnce upon a time, Tom",
    "Q: What did the cat see?\nA: The cat saw",
]
MAX_NEW_TOKENS = 48
EOS_MAX_NEW_TOKENS = 500
SEED = 1234


def generate_all(model, tok, eos_ids, prompts=PROMPTS, max_new_tokens=MAX_NEW_TOKENS):
    rows = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt")
        ids = enc.input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=enc.attention_mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                                 pad_token_id=eos_ids[0])
        prompt_ids = ids[0].tolist()
        new_ids = out[0, ids.shape[1]:].tolist()
        head = tok.decode(prompt_ids, skip_special_tokens=True)
        full = tok.decode(prompt_ids + new_ids, skip_special_tokens=True)
        assert full.startswith(head), (head, full)
        stop = "eos" if new_ids and new_ids[-1] in eos_ids else "length"
        rows.append({"prompt": prompt, "ids": prompt_ids + new_ids, "output": full[len(head):],
                     "tokens": len(new_ids), "stop": stop})
    return rows


WARPER_CASES = [
    {"temperature": 0.7},
    {"top_k": 5},
    {"top_k": 5, "temperature": 1.5},
    {"top_p": 0.9},
    {"top_p": 0.5, "temperature": 0.8},
    {"min_p": 0.1},
    {"min_p": 0.3, "temperature": 2.0},
    {"repetition_penalty": 1.5},
    {"top_k": 20, "top_p": 0.8, "min_p": 0.05, "temperature": 1.3, "repetition_penalty": 1.2},
]


def warper_cases():
    """transformers' processors, built as generate() builds them, on seeded random logits."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
        TopKLogitsWarper, TopPLogitsWarper)
    gen = torch.Generator().manual_seed(SEED)
    cases = []
    for params in WARPER_CASES:
        logits = (torch.randn(64, generator=gen) * 3).float()
        history = torch.randint(0, 64, (12,), generator=gen)
        procs = []
        if params.get("repetition_penalty", 1.0) != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(params["repetition_penalty"]))
        if params.get("temperature", 1.0) != 1.0:
            procs.append(TemperatureLogitsWarper(params["temperature"]))
        if params.get("top_k", 0):
            procs.append(TopKLogitsWarper(top_k=params["top_k"]))
        if params.get("top_p", 1.0) < 1.0:
            procs.append(TopPLogitsWarper(top_p=params["top_p"]))
        if params.get("min_p", 0.0) > 0.0:
            procs.append(MinPLogitsWarper(min_p=params["min_p"]))
        out = logits[None].clone()
        for proc in procs:
            out = proc(history[None], out)
        cases.append({"params": params, "history": history.tolist(), "logits": logits.tolist(),
                      "processed": [None if x == float("-inf") else x for x in out[0].tolist()]})
    return '{"cases": [\n' + ",\n".join(json.dumps(c) for c in cases) + "\n]}\n"


def as_text(rows):
    return "\n".join(r["output"] + "\n" for r in rows)


def as_jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def random_adapter(base):
    cfg = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"])
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                # Large enough that the adapter changes the greedy text.
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
    return model.eval()


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    testdata = os.environ.get("TESTDATA", os.path.join(here, "..", "..", "..", "shared", "data"))
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(testdata, "stories260K", "hf"))
    ap.add_argument("--out", default=os.path.join(here, "gen"))
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    eos = json.load(open(os.path.join(args.model, "generation_config.json")))["eos_token_id"]
    eos_ids = eos if isinstance(eos, list) else [eos]
    base = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    base_rows = generate_all(base, tok, eos_ids)
    # From BOS the base model ends its story with an EOS id (1) after a few hundred tokens.
    eos_rows = generate_all(base, tok, eos_ids, [""], max_new_tokens=EOS_MAX_NEW_TOKENS)
    assert eos_rows[0]["stop"] == "eos"

    if args.check:
        # The adapter is the stored one: check generation against it, not a regenerated one.
        from peft import PeftModel
        model = PeftModel.from_pretrained(base, os.path.join(args.out, "adapter")).eval()
    else:
        model = random_adapter(base)
    adapter_rows = generate_all(model, tok, eos_ids)
    record_rows = generate_all(model, tok, eos_ids, RECORD_PROMPTS)
    assert [r["output"] for r in adapter_rows] != [r["output"] for r in base_rows], \
        "the adapter does not change the output: make it larger"

    files = {
        "prompts.txt": "".join(p + "\n" for p in PROMPTS),
        "base.jsonl": as_jsonl(base_rows),
        "adapter.jsonl": as_jsonl(adapter_rows),
        "base.txt": as_text(base_rows),
        "eos.jsonl": as_jsonl(eos_rows),
        "adapter.txt": as_text(adapter_rows),
        "records.jsonl": "".join(
            json.dumps({"kind": "text", "origin": "records", "index": i + 1,
                        "segments": [{"trained": False, "text": p}, {"trained": True, "text": ""}]},
                       ensure_ascii=False) + "\n" for i, p in enumerate(RECORD_PROMPTS)),
        "records-adapter.txt": as_text(record_rows),
        "warpers.json": warper_cases(),
    }
    if args.check:
        bad = [n for n, text in files.items()
               if open(os.path.join(args.out, n), encoding="utf-8").read() != text]
        if bad:
            print("differs from transformers: " + ", ".join(bad), file=sys.stderr)
            return 1
        import peft
        import transformers
        print("fixtures agree with transformers %s, peft %s" % (transformers.__version__, peft.__version__))
        return 0
    os.makedirs(args.out, exist_ok=True)
    model.peft_config["default"].base_model_name_or_path = "stories260K"   # not a local path
    model.save_pretrained(os.path.join(args.out, "adapter"))
    readme = os.path.join(args.out, "adapter", "README.md")   # PEFT's model card: noise here
    if os.path.exists(readme):
        os.remove(readme)
    for name, text in files.items():
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            f.write(text)
    print("wrote %s" % args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
