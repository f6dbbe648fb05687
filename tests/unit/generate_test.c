// lib/generate.h on stories260K: prompts from records and their ids (BOS policy, EOS flags);
// the forward pass with the fixture adapter: prefill and step-by-step decoding agree, the
// merged and unmerged adapter agree, and every position's logits equal the training engine's
// (lib/engine.h, itself checked against PyTorch).
#include <math.h>
#include <stdint.h>

#include "adapter.h"
#include "engine.h"
#include "generate.h"
#include "lora.h"
#include "model.h"
#include "tap.h"
#include "tokenizer.h"

#define T 24

static double max_rel(const float *a, const float *b, int n)
{
    double worst = 0, scale = 0;
    for (int i = 0; i < n; i++)
        if (fabs(b[i]) > scale)
            scale = fabs(b[i]);
    for (int i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]) / (scale > 0 ? scale : 1);
        if (d > worst)
            worst = d;
    }
    return worst;
}

// The trainer's Lora holding the adapter's A and B.
static Lora *lora_from_adapter(const Model *m, const Adapter *a, Err *err)
{
    LoraConfig c = {.rank = a->cfg.rank, .alpha = (float)a->cfg.alpha, .dropout = 0.0f,
                    .use_rslora = a->cfg.use_rslora, .targets = a->cfg.modules};
    Lora *l = lora_create(&m->config, &c, err);
    if (!l)
        return NULL;
    for (int layer = 0; layer < m->config.n_layers; layer++)
        for (int p = 0; p < PROJ_COUNT; p++) {
            LoraProj *lp = lora_proj(l, layer, (Proj)p);
            if (!lp->A)
                continue;
            memcpy(lp->A, adapter_A(a, layer, (AdapterModule)p), (size_t)c.rank * lp->in * sizeof(float));
            memcpy(lp->B, adapter_B(a, layer, (AdapterModule)p), (size_t)lp->out * c.rank * sizeof(float));
        }
    return l;
}

static int same_ids(const uint32_t *a, long na, const uint32_t *b, long nb)
{
    return na == nb && na >= 0 && memcmp(a, b, (size_t)na * sizeof *a) == 0;
}

static void test_prompts(const char *dir)
{
    Err err;
    Tokenizer *tok = tokenizer_load(dir, &err);
    ok(tok != NULL, "the tokenizer loads");
    if (!tok)
        return;
    int64_t bos = tokenizer_bos_id(tok), eos = tokenizer_eos_id(tok);
    uint32_t *want = NULL, *got = NULL;
    size_t want_cap = 0, got_cap = 0;
    long nw = tokenizer_encode(tok, "Once upon", 9, 0, &want, &want_cap, 0, NULL, &err);
    PromptPiece plain = {"Once upon", 9, 0, 0};
    long ng = prompt_encode(tok, &plain, 1, 0, bos, eos, &got, &got_cap, &err);
    ok(same_ids(got, ng, want, nw), "without BOS: the text's tokens");
    ng = prompt_encode(tok, &plain, 1, 1, bos, eos, &got, &got_cap, &err);
    ok(ng == nw + 1 && got[0] == (uint32_t)bos && same_ids(got + 1, ng - 1, want, nw),
       "with BOS: BOS then the text's tokens");
    long n_bos = ng;
    uint32_t *with_bos = malloc((size_t)ng * sizeof *with_bos);
    memcpy(with_bos, got, (size_t)ng * sizeof *with_bos);
    PromptPiece special = {"<s>Once upon", 12, 1, 0};
    ng = prompt_encode(tok, &special, 1, 1, bos, eos, &got, &got_cap, &err);
    ok(same_ids(got, ng, with_bos, n_bos), "a BOS spelled in a special piece is not doubled");
    PromptPiece two[] = {{"Once upon", 9, 0, 1}, {"", 0, 0, 0}};
    ng = prompt_encode(tok, two, 2, 1, bos, eos, &got, &got_cap, &err);
    ok(ng == n_bos + 1 && got[ng - 1] == (uint32_t)eos, "a piece with eos_after is followed by EOS");
    ng = prompt_encode(tok, (PromptPiece[]){{"\xff", 1, 0, 0}}, 1, 1, bos, eos, &got, &got_cap, &err);
    ok(ng < 0, "invalid UTF-8 is refused (%s)", err.msg);
    free(with_bos);
    free(want);
    free(got);
    tokenizer_free(tok);

    // Records: the trailing trained segments go, earlier turns stay.
    RecSegment seg[] = {{0, 6, "Hello ", NULL}, {REC_TRAINED | REC_EOS, 3, "Hi.", NULL},
                        {REC_SPECIAL, 4, "More", NULL}, {REC_TRAINED, 0, "", NULL}};
    Record rec = {.kind = REC_TEXT, .nseg = 4, .seg = seg};
    PromptPiece *pieces = NULL;
    size_t cap = 0;
    long n = prompt_from_record(&rec, &pieces, &cap, &err);
    ok(n == 3 && pieces[1].eos_after && !pieces[0].eos_after && pieces[2].special &&
           pieces[2].len == 4 && memcmp(pieces[2].text, "More", 4) == 0,
       "a record's prompt: all but the trailing trained segments, flags kept");
    rec.nseg = 2;
    n = prompt_from_record(&rec, &pieces, &cap, &err);
    is_int(n, 1, "a prompt and its answer: the prompt alone");
    rec.kind = REC_TOKENS;
    ok(prompt_from_record(&rec, &pieces, &cap, &err) < 0, "a tokens record is refused");
    free(pieces);
}

int main(void)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/stories260K/hf", tap_testdata());
    Err err;
    Model *m = model_load(dir, &err);
    if (!m) {
        printf("1..0 # SKIP stories260K not loaded (%s)\n", err.msg);
        return 0;
    }
    test_prompts(dir);
    Adapter *a = adapter_load("tests/golden/gen/adapter", &err);
    ok(a != NULL, "the fixture adapter loads (%s)", a ? "ok" : err.msg);
    if (!a)
        return done_testing();
    int V = m->config.vocab_size;

    uint32_t ids[T];
    int32_t ids32[T];
    uint64_t x = 0x2545F4914F6CDD1Dull;
    ids[0] = 1;   // BOS
    for (int t = 1; t < T; t++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        ids[t] = 3 + (uint32_t)(x % (uint64_t)(V - 3));
    }
    for (int t = 0; t < T; t++)
        ids32[t] = (int32_t)ids[t];

    float *step = malloc((size_t)T * V * sizeof(float));   // (T, V) logits, one decode step each
    float *prefill = malloc((size_t)V * sizeof(float));
    float *unmerged = malloc((size_t)V * sizeof(float));
    float *engine = malloc((size_t)T * V * sizeof(float));

    Generator *g = generator_new(m, a, 1, &err);
    ok(g != NULL, "a generator with the adapter merged");
    float *l = generator_forward(g, ids, T, &err);
    memcpy(prefill, l, (size_t)V * sizeof(float));
    is_int(generator_position(g), T, "prefill advances the position by the prompt length");
    generator_reset(g);
    for (int t = 0; t < T; t++) {
        l = generator_forward(g, &ids[t], 1, &err);
        memcpy(step + (size_t)t * V, l, (size_t)V * sizeof(float));
    }
    double d = max_rel(prefill, step + (size_t)(T - 1) * V, V);
    ok(d < 1e-5, "prefill and step-by-step decoding agree (max rel diff %.2g)", d);
    ok(generator_forward(g, (uint32_t[]){(uint32_t)V}, 1, &err) == NULL && strstr(err.msg, "out of the vocabulary"),
       "an id out of the vocabulary is refused");
    generator_free(g);

    g = generator_new(m, a, 0, &err);
    ok(g != NULL, "a generator with the adapter unmerged");
    memcpy(unmerged, generator_forward(g, ids, T, &err), (size_t)V * sizeof(float));
    d = max_rel(unmerged, prefill, V);
    ok(d < 1e-5, "merged and unmerged adapters agree (max rel diff %.2g)", d);
    generator_free(g);

    Engine *e = engine_cpu_create(m, 1, T, &err);
    Lora *lora = e ? lora_from_adapter(m, a, &err) : NULL;
    if (!e || !lora || engine_logits(e, lora, ids32, T, engine, &err) < 0) {
        ok(0, "the training engine's logits (%s)", err.msg);
    } else {
        d = max_rel(step, engine, T * V);
        ok(d < 1e-4, "every position's logits equal the training engine's (max rel diff %.2g)", d);
    }
    lora_free(lora);

    // The base model alone, against the engine without LoRA.
    g = generator_new(m, NULL, 1, &err);
    memcpy(prefill, generator_forward(g, ids, T, &err), (size_t)V * sizeof(float));
    if (e && engine_logits(e, NULL, ids32, T, engine, &err) == 0) {
        d = max_rel(prefill, engine + (size_t)(T - 1) * V, V);
        ok(d < 1e-4, "the base model's logits equal the training engine's (max rel diff %.2g)", d);
    } else {
        ok(0, "the training engine's base logits (%s)", err.msg);
    }
    d = max_rel(prefill, unmerged, V);
    ok(d > 1e-3, "the adapter changes the logits (rel diff %.2g)", d);
    generator_free(g);
    engine_free(e);

    // An adapter shaped for another model is refused, naming the tensor.
    Adapter *wrong = a;
    int saved = wrong->in_dim[ADAPTER_Q];
    wrong->in_dim[ADAPTER_Q] = saved / 2;
    ok(generator_new(m, wrong, 1, &err) == NULL && strstr(err.msg, "q_proj"),
       "an adapter of other shapes is refused, naming the module (%s)", err.msg);
    wrong->in_dim[ADAPTER_Q] = saved;

    free(step);
    free(prefill);
    free(unmerged);
    free(engine);
    adapter_free(a);
    model_free(m);
    return done_testing();
}
