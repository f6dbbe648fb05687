#!/usr/bin/env python3
"""Write the PyTorch goldens that the CPU engine is checked against (tests/unit/engine_test.c).

Needs torch, transformers and peft (pip install torch transformers peft safetensors). Run from
the repository root:

    python3 tests/golden/make_goldens.py [--testdata ../shared/data]

It writes into tests/fixtures/golden/:
  tiny/                 a random tiny Llama (GQA, head_dim != hidden/heads, llama3 rope scaling,
                        untied embeddings), weights stored as BF16; generated here, committed
  tiny.safetensors      the case's tensors (below) and tiny.json its scalars
  stories260k.*         the same for $TESTDATA/stories260K/hf (its weights are NOT copied here;
                        the C test skips that case when TESTDATA is absent)

Each case (.safetensors + .json) holds:
  batch.tokens/targets/positions (B, T) I32 and batch.cu_seqlens (n_seqs + 1) I32: a micro-batch
      of packed documents; targets are -100 where the loss does not train
  logits (B, T, V) F32: each sequence run on its own (positions restarting at 0), which is what
      per-document attention over a packed row means
  lora.{layer}.{proj}.A (r, in), .B (out, r): the LoRA values used (B nonzero so that A's
      gradients are not trivially zero)
  grad.{layer}.{proj}.A/.B: gradients of the SUMMED loss over trained targets (JSON loss_sum,
      n_trained)
  train.{i}.tokens/targets/positions/cu_seqlens: 2 * steps micro-batches; steps of AdamW with
      accumulation 2 (loss = mean over the trained tokens of both micro-batches), gradient
      clipping, a cosine schedule with warmup, weight decay, dropout 0; JSON losses, grad_norms,
      lrs per step; final.{layer}.{proj}.A/.B the parameters after the last step
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import peft
import transformers
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, get_cosine_schedule_with_warmup)

PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "golden")


def make_tiny_model(path, kind="llama"):
    """A random tiny Llama, weights rounded to bf16 and saved as BF16 (the C loader converts);
    or (kind "mistral") a tiny Mistral with a sliding window shorter than the sequences, tied
    embeddings, linear RoPE scaling and F16 weights."""
    if kind == "mistral":
        cfg = MistralConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, vocab_size=128, max_position_embeddings=64, rms_norm_eps=1e-6,
            rope_theta=1000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
            sliding_window=5, tie_word_embeddings=True, bos_token_id=1,
            eos_token_id=2)
        torch.manual_seed(99)
        model = MistralForCausalLM(cfg)
        store = torch.float16
    else:
        store = torch.bfloat16
        cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, vocab_size=300, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        bos_token_id=1, eos_token_id=2)
        torch.manual_seed(1234)
        model = LlamaForCausalLM(cfg)
    state = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                v = 1.0 + 0.2 * torch.randn_like(p)
            else:   # large enough that attention and the MLP are far from linear
                v = torch.randn_like(p) * (0.5 / math.sqrt(p.shape[-1]) if p.dim() == 2 else 0.1)
                if "embed_tokens" in name:   # tied: also the output layer, keep logits moderate
                    v = torch.randn_like(p) * (0.3 if cfg.tie_word_embeddings else 1.0)
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            state[name] = v.to(store).contiguous()
    os.makedirs(path, exist_ok=True)
    cfg.save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [2, 3]}, f)
        f.write("\n")
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def random_batch(gen, B, T, V, max_docs):
    """Rows of packed documents (the last piece of a row may be short); some positions untrained
    (a prompt prefix per document), padding at some row ends. Returns tokens, targets,
    positions (B, T) and cu_seqlens over B*T."""
    tokens = torch.randint(3, V, (B, T), generator=gen, dtype=torch.int32)
    targets = torch.full((B, T), -100, dtype=torch.int32)
    positions = torch.zeros((B, T), dtype=torch.int32)
    cu = [0]
    for b in range(B):
        n_docs = max_docs if b == 0 else int(torch.randint(1, max_docs + 1, (1,), generator=gen))
        pad = int(torch.randint(0, T // 4, (1,), generator=gen)) if b % 2 else 0
        end = T - pad
        cuts = sorted(set(int(x) for x in torch.randint(2, end - 1, (n_docs - 1,), generator=gen)))
        bounds = [0] + cuts + [end]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            positions[b, lo:hi] = torch.arange(hi - lo, dtype=torch.int32)
            prompt = int(torch.randint(0, max(1, (hi - lo) // 2), (1,), generator=gen))
            for p in range(lo, hi - 1):
                if p + 1 - lo > prompt:   # the next token is in the "response"
                    targets[b, p] = tokens[b, p + 1]
            cu.append(b * T + hi)
        if pad:
            tokens[b, end:] = 0
            positions[b, end:] = torch.arange(pad, dtype=torch.int32)
            cu.append(b * T + T)
    return tokens, targets, positions, torch.tensor(cu, dtype=torch.int32)


def forward_packed(model, tokens, cu):
    """Logits (B, T, V): each sequence of cu_seqlens run alone, positions from 0."""
    B, T = tokens.shape
    flat = tokens.reshape(-1).long()
    out = []
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ids = flat[lo:hi][None]
        pos = torch.arange(hi - lo)[None]
        out.append(model(input_ids=ids, position_ids=pos).logits[0])
    return torch.cat(out).reshape(B, T, -1)


def loss_sum(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).long(),
                           ignore_index=-100, reduction="sum")


def lora_params(model, n_layers):
    """[(layer, proj, A, B)] in our flat order (layer, then q,k,v,o,gate,up,down)."""
    mods = dict(model.named_modules())
    out = []
    for layer in range(n_layers):
        for proj in PROJS:
            parent = "self_attn" if proj in PROJS[:4] else "mlp"
            key = f"base_model.model.model.layers.{layer}.{parent}.{proj}"
            if key in mods and hasattr(mods[key], "lora_A"):
                m = mods[key]
                out.append((layer, proj, m.lora_A["default"].weight, m.lora_B["default"].weight))
    return out


def make_case(name, model_dir, lora_cfg, B, T, max_docs, steps, lr, warmup, weight_decay,
              max_grad_norm, seed):
    torch.manual_seed(seed)
    # Computed in float64 from float32-representable inputs, so the goldens are the exact
    # answer to ~1e-15 and what the test measures is the float32 engine's own error (float32
    # PyTorch would add its own error of the same size).
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    base.eval()   # dropout is 0 anyway; eval keeps it so
    cfg = base.config
    model = get_peft_model(base, LoraConfig(
        r=lora_cfg["rank"], lora_alpha=lora_cfg["alpha"], lora_dropout=0.0,
        target_modules=lora_cfg["targets"], use_rslora=lora_cfg["use_rslora"], bias="none",
        task_type="CAUSAL_LM"))
    model.double()
    params = lora_params(model, cfg.num_hidden_layers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # B nonzero (PEFT starts it at 0) so that A gets gradients
        for _, _, A, Bw in params:
            A.copy_(A.float().double())
            Bw.copy_((torch.randn(Bw.shape, generator=gen) * 0.1).float().double())
    tensors = {}
    for layer, proj, A, Bw in params:
        tensors[f"lora.{layer}.{proj}.A"] = A.detach().clone()
        tensors[f"lora.{layer}.{proj}.B"] = Bw.detach().clone()

    # One micro-batch: logits, summed loss, gradients of the summed loss.
    tokens, targets, positions, cu = random_batch(gen, B, T, cfg.vocab_size, max_docs)
    model.zero_grad()
    logits = forward_packed(model, tokens, cu)
    loss = loss_sum(logits, targets)
    loss.backward()
    tensors.update({"batch.tokens": tokens, "batch.targets": targets, "batch.positions": positions,
                    "batch.cu_seqlens": cu, "logits": logits.detach()})
    for layer, proj, A, Bw in params:
        tensors[f"grad.{layer}.{proj}.A"] = A.grad.detach().clone()
        tensors[f"grad.{layer}.{proj}.B"] = Bw.grad.detach().clone()
    info = {"model": "stories260K/hf" if name == "stories260k" else os.path.relpath(model_dir, OUT),
            "lora": lora_cfg, "loss_sum": loss.item(), "n_trained": int((targets != -100).sum()),
            "batch": [B, T]}

    # Training: steps of AdamW, accumulation 2, clipping, cosine schedule with warmup.
    trainable = [p for _, _, A, Bw in params for p in (A, Bw)]
    opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=steps)
    losses, norms, lrs = [], [], []
    micro = []
    for i in range(2 * steps):
        mb = random_batch(gen, B, T, cfg.vocab_size, max_docs)
        micro.append(mb)
        for key, v in zip(("tokens", "targets", "positions", "cu_seqlens"), mb):
            tensors[f"train.{i}.{key}"] = v
    for step in range(steps):
        opt.zero_grad()
        pair = micro[2 * step: 2 * step + 2]
        total = sum(int((mb[1] != -100).sum()) for mb in pair)
        acc = 0.0
        for tk, tg, _, c in pair:
            ls = loss_sum(forward_packed(model, tk, c), tg)
            (ls / total).backward()
            acc += ls.item()
        losses.append(acc / total)
        lrs.append(sched.get_last_lr()[0])
        norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)))
        opt.step()
        sched.step()
    for layer, proj, A, Bw in params:
        tensors[f"final.{layer}.{proj}.A"] = A.detach().clone()
        tensors[f"final.{layer}.{proj}.B"] = Bw.detach().clone()
    info.update({"train": {"steps": steps, "accumulation": 2, "lr": lr, "warmup_steps": warmup,
                           "schedule": "cosine", "weight_decay": weight_decay, "betas": [0.9, 0.999],
                           "eps": 1e-8, "max_grad_norm": max_grad_norm},
                 "losses": losses, "grad_norms": norms, "lrs": lrs,
                 "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                              "peft": peft.__version__}})
    tensors = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(OUT, name + ".safetensors"))
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    clipped = sum(n > max_grad_norm for n in norms)
    print(f"{name}: loss_sum {loss.item():.6f} over {info['n_trained']} targets; "
          f"losses {losses[0]:.4f} .. {losses[-1]:.4f}; {clipped}/{steps} steps clipped", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--testdata", default=os.environ.get("TESTDATA", os.path.join(OUT, "..", "..", "..", "..", "shared", "data")))
    args = ap.parse_args()
    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    tiny = os.path.join(OUT, "tiny")
    make_tiny_model(tiny)
    make_case("tiny", tiny, {"rank": 4, "alpha": 8.0, "use_rslora": False, "targets": PROJS},
              B=2, T=24, max_docs=2, steps=10, lr=1e-2, warmup=3, weight_decay=0.1,
              max_grad_norm=0.18, seed=5)
    mistral = os.path.join(OUT, "mistral")
    make_tiny_model(mistral, "mistral")
    make_case("mistral", mistral, {"rank": 2, "alpha": 4.0, "use_rslora": False, "targets": ["k_proj", "v_proj", "up_proj"]},
              B=2, T=16, max_docs=2, steps=4, lr=1e-2, warmup=1, weight_decay=0.0,
              max_grad_norm=1.0, seed=11)
    stories = os.path.join(args.testdata, "stories260K", "hf")
    if os.path.isdir(stories):
        make_case("stories260k", stories,
                  {"rank": 8, "alpha": 16.0, "use_rslora": True, "targets": ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]},
                  B=1, T=64, max_docs=2, steps=10, lr=5e-3, warmup=2, weight_decay=0.01,
                  max_grad_norm=20.0, seed=7)
    else:
        print(f"{stories}: not found, stories260k goldens not written", file=sys.stderr)


if __name__ == "__main__":
    main()
