#include "sample.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct Sampler {
    SampleParams p;
    uint32_t vocab;
    unsigned char *seen;   // (vocab) scratch for the repetition penalty, kept all zero
    uint32_t *order;       // (vocab) ids sorted by logit, for top-k and top-p
    float *key;            // (vocab) the logits the comparator reads
};

SampleParams sample_defaults(void)
{
    SampleParams p = {.greedy = 0, .temperature = 1.0f, .top_k = 0, .top_p = 1.0f,
                      .min_p = 0.0f, .repetition_penalty = 1.0f, .seed = 0};
    return p;
}

int sample_params_check(const SampleParams *p, Err *err)
{
    if (!(p->temperature > 0.0f) || !isfinite(p->temperature))
        return err_set(err, "temperature must be a positive number (got %g); use greedy for 0", p->temperature);
    if (p->top_k < 0)
        return err_set(err, "top-k must be 0 (off) or positive (got %d)", p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return err_set(err, "top-p must be in (0, 1] (got %g)", p->top_p);
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return err_set(err, "min-p must be in [0, 1] (got %g)", p->min_p);
    if (!(p->repetition_penalty > 0.0f) || !isfinite(p->repetition_penalty))
        return err_set(err, "repetition penalty must be a positive number (got %g)", p->repetition_penalty);
    return 0;
}

Sampler *sampler_new(uint32_t vocab, const SampleParams *p, Err *err)
{
    if (sample_params_check(p, err) < 0)
        return NULL;
    if (vocab == 0) {
        err_set(err, "sampler: empty vocabulary");
        return NULL;
    }
    Sampler *s = calloc(1, sizeof *s);
    if (s) {
        s->p = *p;
        s->vocab = vocab;
        s->seen = calloc(vocab, 1);
        s->order = malloc(vocab * sizeof *s->order);
        s->key = malloc(vocab * sizeof *s->key);
    }
    if (!s || !s->seen || !s->order || !s->key) {
        sampler_free(s);
        err_set(err, "sampler: out of memory");
        return NULL;
    }
    return s;
}

void sampler_free(Sampler *s)
{
    if (!s)
        return;
    free(s->seen);
    free(s->order);
    free(s->key);
    free(s);
}

void sample_repetition_penalty(float *logits, uint32_t vocab, const uint32_t *history,
                               size_t nhistory, float penalty, unsigned char *seen)
{
    if (penalty == 1.0f)
        return;
    // Each distinct id once, as HF's gather/scatter does.
    for (size_t i = 0; i < nhistory; i++) {
        uint32_t id = history[i];
        if (id >= vocab || seen[id])
            continue;
        seen[id] = 1;
        float x = logits[id];
        logits[id] = x < 0.0f ? x * penalty : x / penalty;
    }
    for (size_t i = 0; i < nhistory; i++)
        if (history[i] < vocab)
            seen[history[i]] = 0;
}

static uint64_t mix64(uint64_t z)
{
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

float sample_uniform(uint64_t seed, uint64_t stream, uint64_t step)
{
    const uint64_t G = 0x9E3779B97F4A7C15ull;
    uint64_t h = mix64(mix64(mix64(seed + G) ^ (stream + G)) ^ (step + G));
    return (float)(h >> 40) * (1.0f / 16777216.0f);
}

static uint32_t argmax(const float *x, uint32_t n)
{
    uint32_t best = 0;
    for (uint32_t i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

// qsort has no context argument; the key array is reached through a thread-local pointer.
static _Thread_local const float *sort_key;

// Descending logit, ascending id among equals.
static int by_logit_desc(const void *a, const void *b)
{
    uint32_t i = *(const uint32_t *)a, j = *(const uint32_t *)b;
    float x = sort_key[i], y = sort_key[j];
    if (x != y)
        return x > y ? -1 : 1;
    return (i > j) - (i < j);
}

static void sort_desc(Sampler *s, const float *logits)
{
    memcpy(s->key, logits, s->vocab * sizeof *s->key);
    for (uint32_t i = 0; i < s->vocab; i++)
        s->order[i] = i;
    sort_key = s->key;
    qsort(s->order, s->vocab, sizeof *s->order, by_logit_desc);
}

void sampler_filter(Sampler *s, float *logits, const uint32_t *history, size_t nhistory)
{
    const SampleParams *p = &s->p;
    uint32_t n = s->vocab;
    sample_repetition_penalty(logits, n, history, nhistory, p->repetition_penalty, s->seen);
    if (p->greedy)
        return;

    if (p->temperature != 1.0f)
        for (uint32_t i = 0; i < n; i++)
            logits[i] /= p->temperature;

    if (p->top_k > 0 && (uint32_t)p->top_k < n) {
        sort_desc(s, logits);
        float kth = logits[s->order[p->top_k - 1]];
        for (uint32_t i = 0; i < n; i++)
            if (logits[i] < kth)
                logits[i] = -INFINITY;
    }

    if (p->top_p < 1.0f) {
        // HF: ascending cumulative softmax; drop while cum <= 1 - top_p; the top token stays.
        // The masses are summed unnormalised in double, where sums of float masses of nearby
        // sizes are exact: a cut that falls exactly on the boundary (k equal masses making
        // exactly 1 - top_p of the row) drops them, as the GPU's integer masses do; normalised
        // sums drift past it (all-equal logits, vocab 128256, top-p 0.5 kept 64129, not 64128).
        sort_desc(s, logits);
        float max = logits[s->order[0]];
        double total = 0.0;
        for (uint32_t i = 0; i < n; i++)
            total += expf(logits[i] - max);
        double cum = 0.0, limit = (1.0 - p->top_p) * total;
        for (uint32_t r = n; r-- > 1;) {   // from the smallest up; rank 0 always kept
            uint32_t id = s->order[r];
            cum += expf(logits[id] - max);
            if (cum <= limit)
                logits[id] = -INFINITY;
            else
                break;
        }
    }

    if (p->min_p > 0.0f) {
        // probs < min_p * top_prob  <=>  exp(l - max) < min_p  (the shared denominator cancels).
        uint32_t top = argmax(logits, n);
        float max = logits[top];
        for (uint32_t i = 0; i < n; i++)
            if (i != top && expf(logits[i] - max) < p->min_p)
                logits[i] = -INFINITY;
    }
}

uint32_t sampler_pick(Sampler *s, float *logits, const uint32_t *history, size_t nhistory,
                      uint64_t stream, uint64_t step)
{
    uint32_t n = s->vocab;
    sampler_filter(s, logits, history, nhistory);
    uint32_t top = argmax(logits, n);
    if (s->p.greedy)
        return top;
    float max = logits[top];
    float total = 0.0f;
    for (uint32_t i = 0; i < n; i++) {
        logits[i] = expf(logits[i] - max);   // now unnormalised probabilities; -inf gives 0
        total += logits[i];
    }
    float target = sample_uniform(s->p.seed, stream, step) * total;
    float run = 0.0f;
    uint32_t last = top;
    for (uint32_t i = 0; i < n; i++) {
        if (logits[i] == 0.0f)
            continue;
        run += logits[i];
        last = i;
        if (run > target)
            return i;
    }
    return last;
}
