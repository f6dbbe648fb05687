#!/usr/bin/env python3
"""Compare our byte-level BPE encoder with the references, and write the fixtures CI checks.

References: tiktoken (Encoding over $TESTDATA/llama3/tokenizer.model with the Llama 3 pattern)
and Hugging Face tokenizers ($TESTDATA/llama3/tokenizer.json). Ours: lib/tokenizer.c through the
small driver tests/tokenizer/tokdrv.c, loaded both from the directory (tokenizer.json) and from
tokenizer.model. Each corpus is encoded four ways and all must agree:
  ordinary text   tiktoken encode_ordinary == HF (encode_special_tokens) == ours (json, model)
  special tokens  tiktoken encode(allowed_special="all") == HF encode == ours with -s
Corpora: every record of $TESTDATA/alpaca/*.json (instruction, input, output, text and the
formatted alpaca-lora prompt + "<|end_of_text|>"), generated adversarial text, and a few MB of
random Unicode (seeded).

Usage: tests/tokenizer/compare.py [--write-fixtures] [--random-mb N]
  --write-fixtures  rewrite tests/fixtures/tok/ from the references' ids:
                    adversarial.jsonl.gz, random-unicode.jsonl.gz (a sample of the random text)
                    {"text", "ids", "ids_special"}, and alpaca-ids.txt.gz: one line per Alpaca
                    row, "file row count fnv1a64" over the ids of its texts (see tokenizer_test.c).
Exit status 0 when everything agrees.
"""
import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import time

TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TESTDATA = os.environ.get("TESTDATA", os.path.join(TOP, "..", "shared", "data"))
FIXTURES = os.path.join(TOP, "tests", "fixtures", "tok")
LLAMA3 = os.path.join(TESTDATA, "llama3")
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}<|end_of_text|>")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}"
                          "<|end_of_text|>")


def build_driver():
    """make libalp.a, then the driver beside it (the Makefile does not know tests/tokenizer/).
    $TOKDRV names a driver built elsewhere instead."""
    if os.environ.get("TOKDRV"):
        return os.environ["TOKDRV"]
    subprocess.run(["make", "-s", "build/obj/libalp.a"], cwd=TOP, check=True)
    exe = os.path.join(TOP, "build", "obj", "test", "tokdrv")
    os.makedirs(os.path.dirname(exe), exist_ok=True)
    subprocess.run(["cc", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-Ilib",
                    "tests/tokenizer/tokdrv.c", "build/obj/libalp.a", "-ljansson", "-larchive", "-lxxhash",
                    "-lz", "-lm", "-fopenmp", "-pthread", "-o", exe], cwd=TOP, check=True)
    return exe


def ours(exe, tokenizer, texts, special):
    """Our ids for each text (one driver run for the whole list)."""
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    out = subprocess.run([exe, tokenizer] + (["-s"] if special else []), input=data, capture_output=True,
                         check=True).stdout.decode().split("\n")
    return [[int(x) for x in line.split()] if not line.startswith("error") else line for line in out[:len(texts)]]


def references():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tokenizers import Tokenizer
    config = json.load(open(os.path.join(LLAMA3, "tokenizer_config.json")))
    specials = {v["content"]: int(k) for k, v in config["added_tokens_decoder"].items()}
    tt = tiktoken.Encoding("llama3", pat_str=PATTERN,
                           mergeable_ranks=load_tiktoken_bpe(os.path.join(LLAMA3, "tokenizer.model")),
                           special_tokens=specials)
    hf = Tokenizer.from_file(os.path.join(LLAMA3, "tokenizer.json"))
    hf_plain = Tokenizer.from_file(os.path.join(LLAMA3, "tokenizer.json"))
    hf_plain.encode_special_tokens = True
    return tt, hf, hf_plain


def adversarial_texts(rng):
    """Hand-picked hard cases, then generated runs and mixtures."""
    texts = [
        "", " ", "  ", "\n", " \n", "\n\n\n", "\r\n", " \r\n ", "\t", "\t\t\tx", "a  b", "a   \n  b",
        "DON'T", "don't", "I'M", "WE'RE", "THEY'VE", "YOU'LL", "HE'D", "'S", "'s'S't'T're'RE've'VE'm'M'll'LL'd'D",
        "x'ſa", "'Ll'lL", "'", "''", "'''s", " 's", "\n's", "ʼs", "’s", "It’s",
        "123", "1234567", "12,345.678", "१२३४५", "٣٤٥٦", "Ⅻ", "½¼", "①②③④",
        "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>hi", "a<|start_header_id|>user<|end_header_id|>\n\nb",
        "<|reserved_special_token_0|>", "<|reserved_special_token_250|>", "<|reserved_special_token_251|>",
        "<|eom_id|>", "<|python_tag|>", "<|begin_of_text", "<|", "|>", "<<|eot_id|>>", "<|eot_id|><|eot_id|>",
        "👨‍👩‍👧‍👦", "🏳️‍🌈", "👍🏽", "🦙🦙🦙", "e\u0301\u0301\u0301", "\u0301abc", "a\u200db", "\u200d\u200d",
        "\ufeffBOM", "\ufdd0\ufdef\ufffe\uffff", "\U0010ffff\U0010fffe", "\ue000\uf8ff\U000f0000",
        "\ud7ff\ue000", "\u00a0x\u00a0 y", "\u3000全角\u3000", "\u2028\u2029", "\u0085x", "\x0b\x0c",
        "\x00\x01\x02", "\x7f", "日本語のテキスト。中文文本，混合English", "Ελληνικά кириллица עברית العربية",
        "हिन्दी தமிழ் ภาษาไทย", "ǅǈǋ", "ℌℍℎ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ﬁﬂ", "Kelvin\u212a", "ſtraße", "İstanbul",
    ]
    for ch in [" ", "\n", "\t", "1", "a", "\r\n", " \n", "é", "日", "🦙", "'s", ".", "!?", "\u3000", "\u00a0"]:
        for n in [2, 3, 4, 7, 16, 100, 1000]:
            texts.append(ch * n)
            texts.append("x" + ch * n + "y")
    pool = ["the", " The", "DON'T", "'ll", "  ", "\n", "\t", "123", "4567", "日本", "🦙", "\u200d", "👩",
            "\u0301", ".", ",", "!!", " (", ")", "\r\n", "<|eot_id|>", "<|", "é", "ß", "\u00a0", "١٢٣", "x"]
    for _ in range(400):
        texts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 40))))
    return texts


def random_unicode_texts(rng, total_bytes):
    """Random scalar values, weighted: ASCII, Latin, combining marks, CJK, emoji + joiners,
    white space of all kinds, and uniform over all planes (noncharacters and private use too)."""
    ranges = [(0x20, 0x7e, 30), (0x09, 0x0d, 4), (0xa0, 0x24f, 8), (0x300, 0x36f, 3), (0x370, 0x52f, 5),
              (0x591, 0x6ff, 3), (0x900, 0xdff, 4), (0x2000, 0x206f, 4), (0x3000, 0x30ff, 4),
              (0x4e00, 0x9fff, 8), (0xac00, 0xd7a3, 3), (0x1f300, 0x1faff, 5), (0x200d, 0x200d, 2),
              (0xfe00, 0xfe0f, 1), (0xe000, 0xf8ff, 1), (0xfdd0, 0xfdef, 1), (0x0, 0x10ffff, 6)]
    weights = [w for _, _, w in ranges]
    texts, size = [], 0
    while size < total_bytes:
        chars = []
        for _ in range(rng.randint(1, 300)):
            lo, hi, _ = rng.choices(ranges, weights)[0]
            cp = rng.randint(lo, hi)
            if 0xd800 <= cp <= 0xdfff:
                cp = 0xfffd
            chars.append(chr(cp))
        t = "".join(chars)
        texts.append(t)
        size += len(t.encode())
    return texts


def alpaca_texts():
    """(file, row, [texts]) for every row of every Alpaca file."""
    rows = []
    for name in sorted(os.listdir(os.path.join(TESTDATA, "alpaca"))):
        if not name.endswith(".json"):
            continue
        for i, r in enumerate(json.load(open(os.path.join(TESTDATA, "alpaca", name)))):
            texts = [r.get(k, "") for k in ("instruction", "input", "output")]
            if "text" in r:
                texts.append(r["text"])
            template = ALPACA_PROMPT if r.get("input") else ALPACA_PROMPT_NO_INPUT
            texts.append(template.format(instruction=r.get("instruction", ""), input=r.get("input", ""),
                                         output=r.get("output", "")))
            rows.append((name, i, texts))
    return rows


def fnv1a64(ids):
    h = 0xcbf29ce484222325
    for i in ids:
        for k in range(4):
            h ^= (i >> (8 * k)) & 0xff
            h = (h * 0x100000001b3) & 0xffffffffffffffff
    return h


def compare(name, texts, refs, exe, with_model=True):
    tt, hf, hf_plain = refs
    t0 = time.time()
    want_plain = [tt.encode_ordinary(t) for t in texts]
    want_special = [tt.encode(t, allowed_special="all") for t in texts]
    hf_p = [e.ids for e in hf_plain.encode_batch(texts, add_special_tokens=False)]
    hf_s = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    bad = 0
    for label, got_lists in [("tokenizers (ordinary)", hf_p), ("tokenizers (special)", hf_s)]:
        want = want_plain if "ordinary" in label else want_special
        diff = [i for i in range(len(texts)) if got_lists[i] != want[i]]
        if diff:
            print(f"  note: {name}: tiktoken and {label} disagree on {len(diff)} texts, e.g. {texts[diff[0]]!r}")
    tokenizers = [LLAMA3] + ([os.path.join(LLAMA3, "tokenizer.model")] if with_model else [])
    for tok in tokenizers:
        for special, want, hf_want in [(False, want_plain, hf_p), (True, want_special, hf_s)]:
            got = ours(exe, tok, texts, special)
            diff = [i for i in range(len(texts)) if got[i] != want[i] or got[i] != hf_want[i]]
            what = f"{os.path.basename(tok)} {'special' if special else 'ordinary'}"
            if diff:
                bad += len(diff)
                i = diff[0]
                print(f"FAIL {name} [{what}]: {len(diff)}/{len(texts)} differ; first {texts[i][:80]!r}\n"
                      f"  ours     {got[i][:30] if isinstance(got[i], list) else got[i]}\n"
                      f"  tiktoken {want[i][:30]}\n  hf       {hf_want[i][:30]}")
    nbytes = sum(len(t.encode()) for t in texts)
    print(f"{'ok  ' if not bad else 'FAIL'} {name}: {len(texts)} texts, {nbytes} bytes, "
          f"{sum(map(len, want_plain))} tokens, {len(tokenizers) * 2} ways ({time.time() - t0:.1f} s)")
    return bad, want_plain, want_special


def write_jsonl_gz(path, texts, plain, special):
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        for t, p, s in zip(texts, plain, special):
            rec = {"text": t, "ids": p}
            if s != p:
                rec["ids_special"] = s
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write-fixtures", action="store_true")
    ap.add_argument("--random-mb", type=float, default=3.0)
    args = ap.parse_args()
    if not os.path.exists(os.path.join(LLAMA3, "tokenizer.json")):
        sys.exit(f"compare.py: shared test data not found: {LLAMA3} (set TESTDATA)")
    exe = build_driver()
    refs = references()
    rng = random.Random(20261130)
    bad = 0

    adversarial = adversarial_texts(rng)
    b, adv_plain, adv_special = compare("adversarial", adversarial, refs, exe)
    bad += b

    rows = alpaca_texts()
    flat = [t for _, _, ts in rows for t in ts]
    b, alp_plain, _ = compare("alpaca", flat, refs, exe)
    bad += b

    rand = random_unicode_texts(rng, int(args.random_mb * 1e6))
    b, rnd_plain, rnd_special = compare("random-unicode", rand, refs, exe)
    bad += b

    if args.write_fixtures and not bad:
        os.makedirs(FIXTURES, exist_ok=True)
        write_jsonl_gz(os.path.join(FIXTURES, "adversarial.jsonl.gz"), adversarial, adv_plain, adv_special)
        sample = []
        size = 0
        for i, t in enumerate(rand):
            if size > 60_000:
                break
            sample.append(i)
            size += len(t.encode())
        write_jsonl_gz(os.path.join(FIXTURES, "random-unicode.jsonl.gz"), [rand[i] for i in sample],
                       [rnd_plain[i] for i in sample], [rnd_special[i] for i in sample])
        # Alpaca: ids of each row's texts (ordinary, then the prompt with "<|end_of_text|>" parsed
        # as special, as tok does with the EOS text alp-fmt writes) hashed per row.
        tt = refs[0]
        k = 0
        with gzip.open(os.path.join(FIXTURES, "alpaca-ids.txt.gz"), "wt", compresslevel=9) as f:
            for name, i, texts in rows:
                ids = []
                for j, t in enumerate(texts):
                    ids += tt.encode(t, allowed_special="all") if j == len(texts) - 1 else alp_plain[k]
                    k += 1
                f.write(f"{name} {i} {len(ids)} {fnv1a64(ids):016x}\n")
        print(f"wrote {FIXTURES}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
