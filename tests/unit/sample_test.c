// The sampler (lib/sample.h): each stage against its definition, and the draw against the
// distribution it is meant to follow.
#include <jansson.h>
#include <math.h>
#include <stdint.h>

#include "sample.h"
#include "tap.h"

#define V 6

// Logits whose softmax is probs (up to a constant).
static void logits_of(const double *probs, float *logits, int n)
{
    for (int i = 0; i < n; i++)
        logits[i] = probs[i] > 0 ? (float)log(probs[i]) : -INFINITY;
}

// Draw `draws` tokens (steps 0..draws-1 of stream 0) from logits under p; counts per id.
static void histogram(const SampleParams *p, const float *logits, int n, int draws, int *counts)
{
    Err err;
    Sampler *s = sampler_new((uint32_t)n, p, &err);
    float work[64];
    for (int i = 0; i < n; i++)
        counts[i] = 0;
    for (int d = 0; d < draws; d++) {
        for (int i = 0; i < n; i++)
            work[i] = logits[i];
        counts[sampler_pick(s, work, NULL, 0, 0, (uint64_t)d)]++;
    }
    sampler_free(s);
}

static void test_uniform(void)
{
    // The documented formula, spelled out again.
    const uint64_t G = 0x9E3779B97F4A7C15ull;
    uint64_t seed = 42, stream = 3, step = 17, h;
    uint64_t z = seed + G;
    for (int round = 0; round < 3; round++) {
        z ^= z >> 30; z *= 0xBF58476D1CE4E5B9ull; z ^= z >> 27; z *= 0x94D049BB133111EBull; z ^= z >> 31;
        if (round == 0) z ^= stream + G;
        if (round == 1) z ^= step + G;
    }
    h = z;
    ok(sample_uniform(seed, stream, step) == (float)(h >> 40) / 16777216.0f,
       "sample_uniform follows the documented formula");
    ok(sample_uniform(1, 0, 0) != sample_uniform(2, 0, 0), "the seed changes the numbers");
    ok(sample_uniform(1, 0, 0) != sample_uniform(1, 1, 0), "the stream changes the numbers");
    ok(sample_uniform(1, 0, 0) != sample_uniform(1, 0, 1), "the step changes the numbers");
    double sum = 0;
    int in_range = 1;
    for (int i = 0; i < 100000; i++) {
        float u = sample_uniform(7, 0, (uint64_t)i);
        in_range &= u >= 0.0f && u < 1.0f;
        sum += u;
    }
    ok(in_range, "uniform numbers lie in [0, 1)");
    ok(fabs(sum / 100000 - 0.5) < 0.005, "their mean is 0.5 (got %.4f)", sum / 100000);
}

static void test_repetition_penalty(void)
{
    float logits[V] = {2.0f, -2.0f, 1.0f, -1.0f, 0.5f, 3.0f};
    float before[V];
    for (int i = 0; i < V; i++)
        before[i] = logits[i];
    uint32_t history[] = {0, 1, 0, 1, 4};   // repeated ids are penalised once
    unsigned char seen[V] = {0};
    sample_repetition_penalty(logits, V, history, 5, 2.0f, seen);
    ok(logits[0] == before[0] / 2.0f, "a positive logit seen is divided by the penalty");
    ok(logits[1] == before[1] * 2.0f, "a negative logit seen is multiplied by the penalty");
    ok(logits[4] == before[4] / 2.0f, "a token seen once is penalised too");
    ok(logits[2] == before[2] && logits[3] == before[3] && logits[5] == before[5],
       "tokens not seen are left alone");
    int clean = 1;
    for (int i = 0; i < V; i++)
        clean &= seen[i] == 0;
    ok(clean, "the scratch is zero again afterwards");
}

static void test_greedy(void)
{
    Err err;
    SampleParams p = sample_defaults();
    p.greedy = 1;
    Sampler *s = sampler_new(V, &p, &err);
    float a[V] = {0.1f, 3.0f, -1.0f, 3.0f, 2.0f, 0.0f};
    is_int(sampler_pick(s, a, NULL, 0, 0, 0), 1, "greedy takes the first of equal maxima");
    sampler_free(s);

    // With a penalty, greedy picks from the penalised logits (HF applies processors first).
    p.repetition_penalty = 4.0f;
    s = sampler_new(V, &p, &err);
    float b[V] = {0.1f, 3.0f, -1.0f, 1.0f, 2.0f, 0.0f};
    uint32_t seen[] = {1};
    is_int(sampler_pick(s, b, seen, 1, 0, 0), 4, "greedy after the repetition penalty");
    sampler_free(s);
}

static void test_distribution(void)
{
    double probs[V] = {0.05, 0.30, 0.10, 0.40, 0.15, 0.0};
    float logits[V];
    logits_of(probs, logits, V);
    int counts[V];
    int draws = 40000;
    SampleParams p = sample_defaults();
    p.seed = 5;
    histogram(&p, logits, V, draws, counts);
    double worst = 0;
    for (int i = 0; i < V; i++) {
        double d = fabs((double)counts[i] / draws - probs[i]);
        if (d > worst)
            worst = d;
    }
    ok(worst < 0.01, "draw frequencies follow softmax (worst gap %.4f)", worst);
    is_int(counts[5], 0, "a token of probability 0 is never drawn");

    // Same seed, stream and step: the same token; the draw does not depend on earlier calls.
    Err err;
    Sampler *s1 = sampler_new(V, &p, &err), *s2 = sampler_new(V, &p, &err);
    float w1[V], w2[V];
    int same = 1;
    for (int step = 0; step < 50; step++) {
        for (int i = 0; i < V; i++)
            w1[i] = w2[i] = logits[i];
        uint32_t a = sampler_pick(s1, w1, NULL, 0, 9, (uint64_t)step);
        uint32_t b = sampler_pick(s2, w2, NULL, 0, 9, (uint64_t)step);
        same &= a == b;
    }
    ok(same, "the same seed, stream and step give the same token");
    sampler_free(s1);
    sampler_free(s2);

    // Temperature: T -> 0 is greedy, a large T flattens the distribution.
    p.temperature = 0.01f;
    histogram(&p, logits, V, 2000, counts);
    is_int(counts[3], 2000, "a tiny temperature always takes the most likely token");
    p.temperature = 1000.0f;
    histogram(&p, logits, 5, draws, counts);   // the five tokens of non-zero probability
    worst = 0;
    for (int i = 0; i < 5; i++) {
        double d = fabs((double)counts[i] / draws - 0.2);
        if (d > worst)
            worst = d;
    }
    ok(worst < 0.01, "a huge temperature is nearly uniform (worst gap %.4f)", worst);
}

static void test_filters(void)
{
    double probs[V] = {0.05, 0.30, 0.10, 0.40, 0.15, 0.0};
    float logits[V];
    logits_of(probs, logits, V);
    int counts[V], draws = 20000;
    SampleParams p = sample_defaults();

    p.top_k = 2;
    histogram(&p, logits, V, draws, counts);
    ok(counts[0] == 0 && counts[2] == 0 && counts[4] == 0, "top-k 2 keeps only the two most likely");
    double want = 0.40 / 0.70;
    ok(fabs((double)counts[3] / draws - want) < 0.01,
       "top-k renormalises over the kept tokens (%.3f vs %.3f)", (double)counts[3] / draws, want);

    p = sample_defaults();
    p.top_k = 1;
    histogram(&p, logits, V, 500, counts);
    is_int(counts[3], 500, "top-k 1 is greedy");

    // top-p 0.8: ascending cumulative 0.05, 0.15, 0.30, 0.60, 1.00 over ids 0, 2, 4, 1, 3; HF
    // drops those with cumulative <= 0.2: ids 0 and 2. id 4 (0.30 > 0.2) stays.
    p = sample_defaults();
    p.top_p = 0.8f;
    histogram(&p, logits, V, draws, counts);
    ok(counts[0] == 0 && counts[2] == 0, "top-p drops the tail whose mass is at most 1 - p");
    ok(counts[4] > 0 && counts[1] > 0 && counts[3] > 0, "top-p keeps the rest");

    p.top_p = 0.01f;
    histogram(&p, logits, V, 500, counts);
    is_int(counts[3], 500, "a tiny top-p still keeps the most likely token");

    // A cut exactly on the boundary: 128256 equal logits, top-p 0.5. The lower 64128 make exactly
    // half the mass (<= 1 - p): dropped, as the GPU's integer masses drop them. (Summing
    // normalised probabilities in double drifted past 0.5 and kept 64129.)
    {
        uint32_t n = 128256;
        p = sample_defaults();
        p.top_p = 0.5f;
        Err err;
        Sampler *s = sampler_new(n, &p, &err);
        float *row = calloc(n, sizeof *row);
        uint32_t kept = 0, first_dropped = n;
        if (s && row) {
            sampler_filter(s, row, NULL, 0);
            for (uint32_t i = 0; i < n; i++) {
                kept += isfinite(row[i]);
                if (!isfinite(row[i]) && first_dropped == n)
                    first_dropped = i;
            }
        }
        is_int(kept, 64128, "top-p 0.5 over 128256 equal logits keeps exactly half");
        is_int(first_dropped, 64128, "the kept half is the lower ids (ties in id order)");
        free(row);
        sampler_free(s);
    }

    // min-p 0.3: threshold 0.3 * 0.40 = 0.12 drops ids 0 (0.05) and 2 (0.10), keeps 4 (0.15).
    p = sample_defaults();
    p.min_p = 0.3f;
    histogram(&p, logits, V, draws, counts);
    ok(counts[0] == 0 && counts[2] == 0 && counts[4] > 0, "min-p drops tokens below min_p * top");

    // Stages compose: top-k 3 then min-p 0.5 (threshold 0.20 of the top 0.40) leaves ids 1, 3.
    p = sample_defaults();
    p.top_k = 3;
    p.min_p = 0.5f;
    histogram(&p, logits, V, draws, counts);
    ok(counts[1] > 0 && counts[3] > 0 && counts[0] + counts[2] + counts[4] + counts[5] == 0,
       "top-k then min-p");
}

static void test_params(void)
{
    Err err;
    SampleParams p = sample_defaults();
    is_int(sample_params_check(&p, &err), 0, "the defaults are valid");
    p.temperature = 0.0f;
    ok(sample_params_check(&p, &err) < 0 && strstr(err.msg, "temperature"), "temperature 0 is refused");
    p = sample_defaults();
    p.top_p = 1.5f;
    ok(sample_params_check(&p, &err) < 0 && strstr(err.msg, "top-p"), "top-p above 1 is refused");
    p = sample_defaults();
    p.top_p = 0.0f;
    ok(sample_params_check(&p, &err) < 0, "top-p 0 is refused");
    p = sample_defaults();
    p.min_p = -0.1f;
    ok(sample_params_check(&p, &err) < 0 && strstr(err.msg, "min-p"), "negative min-p is refused");
    p = sample_defaults();
    p.top_k = -1;
    ok(sample_params_check(&p, &err) < 0 && strstr(err.msg, "top-k"), "negative top-k is refused");
    p = sample_defaults();
    p.repetition_penalty = 0.0f;
    ok(sample_params_check(&p, &err) < 0 && strstr(err.msg, "repetition"), "penalty 0 is refused");
    p = sample_defaults();
    ok(sampler_new(0, &p, &err) == NULL, "an empty vocabulary is refused");
}

// transformers' processors on the same logits (tests/golden/gen/warpers.json, written by
// tests/golden/gen_reference.py): the same tokens dropped, the same values kept.
static void test_against_transformers(void)
{
    const char *path = "tests/golden/gen/warpers.json";
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root) {
        printf("ok %d # SKIP %s: %s\n", ++tap_n, path, jerr.text);
        return;
    }
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(root, "cases"), i, c) {
        json_t *params = json_object_get(c, "params"), *v;
        SampleParams p = sample_defaults();
        if ((v = json_object_get(params, "temperature")))
            p.temperature = (float)json_number_value(v);
        if ((v = json_object_get(params, "top_k")))
            p.top_k = (int)json_integer_value(v);
        if ((v = json_object_get(params, "top_p")))
            p.top_p = (float)json_number_value(v);
        if ((v = json_object_get(params, "min_p")))
            p.min_p = (float)json_number_value(v);
        if ((v = json_object_get(params, "repetition_penalty")))
            p.repetition_penalty = (float)json_number_value(v);
        json_t *logits = json_object_get(c, "logits"), *want = json_object_get(c, "processed");
        json_t *history = json_object_get(c, "history");
        size_t n = json_array_size(logits), nh = json_array_size(history);
        float x[256];
        uint32_t h[64];
        for (size_t k = 0; k < n && k < 256; k++)
            x[k] = (float)json_number_value(json_array_get(logits, k));
        for (size_t k = 0; k < nh && k < 64; k++)
            h[k] = (uint32_t)json_integer_value(json_array_get(history, k));
        Err err;
        Sampler *s = sampler_new((uint32_t)n, &p, &err);
        sampler_filter(s, x, h, nh);
        sampler_free(s);
        int same_set = 1;
        double worst = 0;
        for (size_t k = 0; k < n; k++) {
            json_t *w = json_array_get(want, k);
            if (json_is_null(w) != (x[k] == -INFINITY)) {
                same_set = 0;
                continue;
            }
            if (!json_is_null(w) && fabs(x[k] - json_number_value(w)) > worst)
                worst = fabs(x[k] - json_number_value(w));
        }
        char *desc = json_dumps(params, JSON_COMPACT | JSON_REAL_PRECISION(6));
        ok(same_set && worst < 1e-5, "as transformers: %s (max diff %.1g)", desc, worst);
        free(desc);
    }
    json_decref(root);
}

int main(void)
{
    test_uniform();
    test_repetition_penalty();
    test_greedy();
    test_distribution();
    test_filters();
    test_params();
    test_against_transformers();
    return done_testing();
}
