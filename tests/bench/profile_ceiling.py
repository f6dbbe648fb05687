#!/usr/bin/env python3
"""What a training step would take if only its products, attention and loss cost anything.

Reads the output of `ENGINE_TEST_PROFILE=32 engine_test --bench` (tests/gpu/session.sh
profile-engine writes it to profile-engine.txt) and prints, for each profiled case, the step and
the part of it spent in the base products (W, rerun ones included), attention (rerun included)
and lm_head + loss: the time the step could not go below if every LoRA pass and every
elementwise kernel (norms, SwiGLU, RoPE, embedding) were free, i.e. fused into the products at no
cost. With --peer SHAPE=TOKENS_PER_S (tests/bench/gpu_train.sh's HF + PEFT figures of the same
run or machine kind), also the ratio to the peer each would give.

    python3 tests/bench/profile_ceiling.py profile-engine.txt --peer 2x2048=6267 --peer 1x8192=5763

--smi profile-engine-smi.csv (the nvidia-smi samples session.sh takes meanwhile) adds the clock
and power under load (samples drawing over 300 W) and how many of them the power cap throttled.
"""
import argparse
import re
import sys

CORE = re.compile(r"^(recompute )?(W |attn |lm_head)")


def cases(lines):
    """Each profiled case: name, shape, tokens, step (ms), ops {label: ms} (the by-operation list)."""
    case, in_ops = None, False
    for line in lines:
        m = re.match(r"^# (.+? (\d+) x (\d+) recompute \w+.*)$", line)
        if m:
            case, in_ops = {"name": m.group(1), "shape": f"{m.group(2)}x{m.group(3)}",
                            "tokens": int(m.group(2)) * int(m.group(3)), "ops": {}}, False
            yield case
            continue
        m = re.match(r"^# profile: ([\d.]+) ms a step", line)
        if case and m:
            case["step"] = float(m.group(1))
        elif case and line.startswith("# by operation"):
            in_ops = True
        elif case and in_ops:
            m = re.match(r"^#   (.+?)\s+([\d.]+) ms\s+[\d.]+%$", line)
            if m:
                case["ops"][m.group(1)] = float(m.group(2))
            else:
                in_ops = False


def smi_summary(path):
    """Mean SM clock and power over the samples under load, and the share throttled by the power cap."""
    clocks, watts, capped = [], [], 0
    with open(path) as f:
        for line in f:
            cols = [c.strip() for c in line.split(",")]
            if len(cols) < 5 or not cols[1].endswith("MHz") or not cols[2].endswith("W"):
                continue   # the header, or a line nvidia-smi cut short
            w = float(cols[2].split()[0])
            if w <= 300:
                continue
            clocks.append(float(cols[1].split()[0]))
            watts.append(w)
            capped += int(cols[4], 16) & 0x4 != 0   # SW power cap
    if not clocks:
        return f"{path}: no samples above 300 W"
    return (f"under load ({len(clocks)} samples over 300 W): SM clock {sum(clocks) / len(clocks):.0f} MHz on average, "
            f"power {sum(watts) / len(watts):.0f} W on average ({max(watts):.0f} max), "
            f"the power cap throttling in {100 * capped / len(clocks):.0f}% of them")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile")
    ap.add_argument("--peer", action="append", default=[], help="SHAPE=TOKENS_PER_S")
    ap.add_argument("--smi", help="profile-engine-smi.csv")
    a = ap.parse_args()
    peer = dict((k, float(v)) for k, v in (p.split("=", 1) for p in a.peer))
    with open(a.profile) as f:
        found = [c for c in list(cases(f)) if c["ops"] and "step" in c]
    if not found:
        sys.exit(f"profile_ceiling.py: no profiled case in {a.profile}")
    print(f"{'case':<50} {'step ms':>8} {'products+attention+loss':>24} {'the rest':>9}"
          f" {'tokens/s':>9} {'ceiling':>9}{'  vs peer: step, ceiling' if peer else ''}")
    for c in found:
        core = sum(ms for op, ms in c["ops"].items() if CORE.match(op))
        rest = c["step"] - core
        row = (f"{c['name']:<50} {c['step']:8.1f} {core:24.1f} {rest:9.1f}"
               f" {c['tokens'] / c['step'] * 1e3:9.0f} {c['tokens'] / core * 1e3:9.0f}")
        if c["shape"] in peer:
            p = peer[c["shape"]]
            row += f"  {c['tokens'] / c['step'] * 1e3 / p:5.2f}x {c['tokens'] / core * 1e3 / p:5.2f}x"
        print(row)
    if a.smi:
        print(smi_summary(a.smi))


if __name__ == "__main__":
    main()
