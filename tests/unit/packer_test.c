// Packing invariants on random inputs (every mode and long-document policy): no token lost or
// duplicated, no row over seq_len, pieces in document order with their masks, document starts
// and padding marked, the any-fit property of the packers; the seeded permutation and split;
// the input checks (record kind, fingerprint, vocab).
#include <stdint.h>

#include "packer.h"
#include "tap.h"

static uint64_t rng_state = 12345;
static uint32_t rnd(uint32_t n)   // uniform-ish in [0, n)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state % n);
}

// A document with a prompt segment and a response segment; ids are a global counter, so every
// token is unique and its id says where it came from.
static int add_doc(PackInput *in, uint32_t *next_id, uint32_t prompt, uint32_t response)
{
    static uint32_t ids[4096];
    for (uint32_t i = 0; i < prompt + response; i++)
        ids[i] = (*next_id)++;
    RecSegment seg[2] = {{0, prompt, NULL, ids}, {REC_TRAINED, response, NULL, ids + prompt}};
    Record rec = {REC_TOKENS, 1, 0xab, "test", 4, 2, seg};
    Err err;
    int rc = pack_input_add(in, &rec, &err);
    if (rc < 0)
        printf("# %s\n", err.msg);
    return rc;
}

// Check a plan against its input; returns 1 when every invariant holds.
static int check_plan(const PackInput *in, const PackPlan *plan, const PackSettings *s, const char *what)
{
    uint32_t T = s->seq_len;
    uint8_t *seen = calloc(in->n_tokens, 1);
    uint32_t *ids = malloc(T * 4), *load = calloc(plan->n_rows + 1, 4);
    uint8_t *flags = malloc(T);
    int good = 1;
    uint64_t placed = 0, targets = 0;
    for (uint64_t r = 0; r < plan->n_rows && good; r++) {
        pack_row_fill(in, plan, r, T, 7, ids, flags);
        uint32_t t = 0;
        for (uint64_t k = plan->row_first[r]; k < plan->row_first[r + 1]; k++) {
            const PackPiece *p = &plan->pieces[k];
            load[r] += p->len;
            if (p->len == 0 || t + p->len > T) {
                good = ok(0, "%s: row %lu over seq_len", what, (unsigned long)r);
                break;
            }
            for (uint32_t j = 0; j < p->len; j++, t++) {
                uint32_t id = ids[t];
                if (id != in->ids[p->start + j] || id != p->start + j || seen[id]++ ||
                    ((flags[t] & SHARD_TOK_TRAINED) != 0) != in->trained[id] ||
                    ((flags[t] & SHARD_TOK_DOC_START) != 0) != (j == 0) || (flags[t] & SHARD_TOK_PAD)) {
                    good = ok(0, "%s: row %lu position %u: wrong token or flags", what, (unsigned long)r, t);
                    break;
                }
                targets += j > 0 && in->trained[id];
            }
            placed += p->len;
        }
        for (; good && t < T; t++)
            if (ids[t] != 7 || flags[t] != SHARD_TOK_PAD)
                good = ok(0, "%s: row %lu: padding not marked at %u", what, (unsigned long)r, t);
        if (good && load[r] == 0)
            good = ok(0, "%s: row %lu empty", what, (unsigned long)r);
    }
    // every token either placed exactly once or accounted for as cut, dropped or untrained
    const PackStats *st = &plan->stats;
    if (good && (placed != st->row_tokens || targets != st->targets ||
                 placed + st->truncated_tokens + st->dropped_long_tokens + st->untrained_tokens != in->n_tokens))
        good = ok(0, "%s: token accounting: placed %lu + cut %lu + dropped %lu + untrained %lu != %lu", what,
                  (unsigned long)placed, (unsigned long)st->truncated_tokens, (unsigned long)st->dropped_long_tokens,
                  (unsigned long)st->untrained_tokens, (unsigned long)in->n_tokens);
    // each document's kept tokens are a prefix (truncate/drop) or all of it (split), in order
    for (uint64_t d = 0; good && d < in->n_docs; d++) {
        uint64_t a = in->doc_start[d], b = in->doc_start[d + 1];
        for (uint64_t i = a; i < b; i++) {
            if (s->long_policy == SHARD_LONG_TRUNCATE && i - a >= T && seen[i])
                good = ok(0, "%s: doc %lu: token past seq_len kept", what, (unsigned long)d);
            if (s->long_policy == SHARD_LONG_DROP && b - a > T && seen[i])
                good = ok(0, "%s: doc %lu: long doc kept", what, (unsigned long)d);
            if (!good)
                break;
        }
    }
    // any-fit: a row was opened only when its first piece fitted no earlier row, so no two
    // rows together hold T tokens or fewer
    if (good && s->mode != SHARD_MODE_PAD)
        for (uint64_t i = 0; i < plan->n_rows && good; i++)
            for (uint64_t j = i + 1; j < plan->n_rows && good; j++)
                if (load[i] + load[j] <= T)
                    good = ok(0, "%s: rows %lu and %lu could share (%u + %u <= %u)", what, (unsigned long)i,
                              (unsigned long)j, load[i], load[j], T);
    if (good && s->mode == SHARD_MODE_PAD)
        for (uint64_t r = 0; r < plan->n_rows && good; r++)
            if (plan->row_first[r + 1] - plan->row_first[r] != 1)
                good = ok(0, "%s: pad mode row %lu holds %lu pieces", what, (unsigned long)r,
                          (unsigned long)(plan->row_first[r + 1] - plan->row_first[r]));
    free(seen);
    free(ids);
    free(load);
    free(flags);
    return good;
}

static void test_random_plans(void)
{
    static const unsigned modes[] = {SHARD_MODE_BEST_FIT, SHARD_MODE_FIRST_FIT, SHARD_MODE_PAD};
    static const unsigned longs[] = {SHARD_LONG_SPLIT, SHARD_LONG_TRUNCATE, SHARD_LONG_DROP};
    for (int trial = 0; trial < 6; trial++) {
        uint32_t T = 16 + rnd(200);
        PackInput in = {.vocab_size = 0};
        uint32_t next_id = 0;
        int n_docs = 50 + (int)rnd(400);
        for (int d = 0; d < n_docs; d++) {
            uint32_t len = 1 + (rnd(10) == 0 ? rnd(3 * T) : rnd(T / 2 + 1));
            uint32_t prompt = rnd(len + 1);
            if (rnd(20) == 0)
                prompt = len;   // a document with nothing to train on
            add_doc(&in, &next_id, prompt, len - prompt);
        }
        for (int m = 0; m < 3; m++)
            for (int l = 0; l < 3; l++) {
                PackSettings s = {T, modes[m], longs[l]};
                PackPlan plan;
                Err err;
                char what[96];
                snprintf(what, sizeof what, "trial %d (T=%u, %d docs) %s/%s", trial, T, n_docs, shard_mode_name(modes[m]),
                         shard_long_name(longs[l]));
                if (pack_plan(&in, &s, &plan, &err) < 0) {
                    ok(0, "%s: %s", what, err.msg);
                    continue;
                }
                if (check_plan(&in, &plan, &s, what))
                    ok(1, "%s: %lu rows, invariants hold", what, (unsigned long)plan.n_rows);
                pack_plan_free(&plan);
            }
        pack_input_free(&in);
    }
}

static void test_all_tokens_and_untrained(void)
{
    PackInput in = {0};
    uint32_t id = 0;
    add_doc(&in, &id, 5, 0);   // prompt only: no trained target
    add_doc(&in, &id, 3, 2);
    PackSettings s = {16, SHARD_MODE_BEST_FIT, SHARD_LONG_SPLIT};
    PackPlan plan;
    Err err;
    pack_plan(&in, &s, &plan, &err);
    is_int(plan.stats.untrained_pieces, 1, "a prompt-only document is dropped and counted");
    is_int(plan.stats.targets, 2, "response-only: the two response tokens are the targets");
    pack_plan_free(&plan);
    pack_input_free(&in);

    PackInput all = {.all_tokens = 1};
    id = 0;
    add_doc(&all, &id, 5, 0);
    add_doc(&all, &id, 3, 2);
    pack_plan(&all, &s, &plan, &err);
    is_int(plan.stats.untrained_pieces, 0, "--all-tokens keeps the prompt-only document");
    is_int(plan.stats.targets, 4 + 4, "--all-tokens: every token but each document's first is a target");
    is_int(plan.n_rows, 1, "both fit one row of 16");
    pack_plan_free(&plan);
    pack_input_free(&all);
}

static void test_input_checks(void)
{
    PackInput in = {.vocab_size = 100};
    uint32_t ids[3] = {1, 2, 150};
    RecSegment seg = {REC_TRAINED, 3, NULL, ids};
    Record rec = {REC_TOKENS, 9, 0xab, "data.json", 9, 1, &seg};
    Err err;
    ok(pack_input_add(&in, &rec, &err) < 0 && strstr(err.msg, "data.json:9: token id 150 >= vocab size 100"),
       "an id above the vocab is rejected with its origin: %s", err.msg);
    ids[2] = 3;
    ok(pack_input_add(&in, &rec, &err) == 0, "the same record with ids in range is accepted");
    rec.fingerprint = 0xcd;
    ok(pack_input_add(&in, &rec, &err) < 0 && strstr(err.msg, "fingerprint 00000000000000cd differs"),
       "a second tokenizer fingerprint is rejected: %s", err.msg);
    RecSegment text = {REC_TRAINED, 2, "hi", NULL};
    Record trec = {REC_TEXT, 4, 0, "data.json", 9, 1, &text};
    ok(pack_input_add(&in, &trec, &err) < 0 && strstr(err.msg, "text record"), "a text record is rejected: %s",
       err.msg);
    RecSegment none = {REC_TRAINED, 0, NULL, ids};
    Record empty = {REC_TOKENS, 5, 0xab, "data.json", 9, 1, &none};
    ok(pack_input_add(&in, &empty, &err) == 0 && in.n_empty == 1 && in.n_docs == 1, "an empty record is counted, not a document");
    pack_input_free(&in);
}

static void test_permutation_and_split(void)
{
    enum { N = 1000 };
    uint64_t a[N], b[N], c[N];
    pack_permutation(a, N, 42);
    pack_permutation(b, N, 42);
    pack_permutation(c, N, 43);
    uint8_t hit[N] = {0};
    int perm_ok = 1, moved = 0;
    for (int i = 0; i < N; i++) {
        perm_ok &= a[i] < N && !hit[a[i]]++;
        moved += a[i] != (uint64_t)i;
    }
    ok(perm_ok, "pack_permutation is a permutation");
    ok(memcmp(a, b, sizeof a) == 0, "the same seed gives the same order");
    ok(memcmp(a, c, sizeof a) != 0, "another seed gives another order");
    ok(moved > N / 2, "it shuffles (%d of %d moved)", moved, N);

    PackPlan plan = {.n_rows = N};
    uint64_t *train, *val, n_train;
    Err err;
    ok(pack_split(&plan, 7, 0, 100, &train, &n_train, &val, &err) == 0, "split 100 of 1000 rows");
    memset(hit, 0, sizeof hit);
    int disjoint = 1, sorted = 1;
    for (uint64_t i = 0; i < n_train; i++)
        disjoint &= !hit[train[i]]++, sorted &= i == 0 || train[i - 1] < train[i];
    for (uint64_t i = 0; i < 100; i++)
        disjoint &= !hit[val[i]]++, sorted &= i == 0 || val[i - 1] < val[i];
    ok(disjoint && n_train == 900, "train and validation rows are disjoint and complete");
    ok(sorted, "--no-shuffle keeps each set in row order");
    free(train);
    free(val);
    ok(pack_split(&plan, 7, 1, N + 1, &train, &n_train, &val, &err) < 0, "a split larger than the rows is refused");
}

int main(void)
{
    test_random_plans();
    test_all_tokens_and_untrained();
    test_input_checks();
    test_permutation_and_split();
    return done_testing();
}
