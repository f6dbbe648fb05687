#!/usr/bin/env python3
"""The block-order model behind kernels/NOTES.md, issue 6 part 7: attention's blocks dealt, in
grid order, to the first free of 132 multiprocessors (one block each), a block taking its number
of tile steps plus a fixed cost. Prints the model's makespans (in tile steps) for the forward's
two grid orders and for the backward's query heads a block, at Llama-3-8B's 32 query and 8 kv
heads, for the benchmark's shapes (documents x positions).

    python3 tests/bench/attention_schedule.py
"""
import heapq

SMS, HQ, HKV = 132, 32, 8
SHAPES = [(1, 8192), (2, 2048), (8, 512)]


def makespan(blocks):
    free = [0.0] * SMS
    end = 0.0
    for w in blocks:
        t = heapq.heappop(free) + w
        end = max(end, t)
        heapq.heappush(free, t)
    return end


def forward(docs, length, heads_outer):
    """128-query tiles, 128-key tiles; a tile of query tile i sees i + 1 key tiles of its document."""
    tiles = [i % (length // 128) + 1 for i in range(docs * length // 128)]
    last_first = list(reversed(tiles))
    if heads_outer:   # grid (query tiles, heads): each head's tiles, last first, head after head
        order = [w for h in range(HQ) for w in last_first]
    else:             # grid (heads, query tiles): the last tile of every head first
        order = [w for w in last_first for h in range(HQ)]
    return makespan([w + 1 for w in order])


def backward(docs, length, hpb, fixed):
    """128-key tiles, 64-query steps: key tile i of a document sees (length - 128 i) / 64 steps."""
    per_doc = length // 128
    steps = [(length - 128 * (i % per_doc)) // 64 for i in range(docs * per_doc)]
    return makespan([hpb * s + fixed for s in steps for b in range(HQ // hpb)])


print("forward (fixed cost 1 step): grid (query tiles, heads) -> (heads, query tiles)")
for docs, length in SHAPES:
    print("  %d x %-5d %6.0f -> %6.0f" % (docs, length, forward(docs, length, True), forward(docs, length, False)))
print("backward: query heads a block 1 / 2 / 4, fixed cost 3 and 6 steps a block")
for docs, length in SHAPES:
    print("  %d x %-5d" % (docs, length),
          "  ".join("%d: %s" % (f, " / ".join("%.0f" % backward(docs, length, h, f) for h in (1, 2, 4)))
                    for f in (3, 6)))
