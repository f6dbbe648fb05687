#include "lora.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// ---- Rng: xoshiro256** (Blackman and Vigna), seeded by splitmix64 ----------------------------

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void rng_seed(Rng *r, uint64_t seed)
{
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&seed);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t rng_next(Rng *r)
{
    uint64_t *s = r->s, result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

float rng_uniform(Rng *r) { return (float)(rng_next(r) >> 40) * (1.0f / 16777216.0f); }

// ---- config -----------------------------------------------------------------------------------

float lora_scale(const LoraConfig *c)
{
    return c->use_rslora ? c->alpha / sqrtf((float)c->rank) : c->alpha / (float)c->rank;
}

int lora_parse_targets(const char *list, unsigned *mask, Err *err)
{
    static const char *const short_names[PROJ_COUNT] = {"q", "k", "v", "o", "gate", "up", "down"};
    *mask = 0;
    const char *p = list;
    while (*p) {
        size_t n = strcspn(p, ",");
        if (n == 3 && !strncmp(p, "all", 3)) {
            *mask = (1u << PROJ_COUNT) - 1;
        } else {
            int found = -1;
            for (int i = 0; i < PROJ_COUNT && found < 0; i++)
                if ((strlen(short_names[i]) == n && !strncmp(p, short_names[i], n)) ||
                    (strlen(proj_name(i)) == n && !strncmp(p, proj_name(i), n)))
                    found = i;
            if (found < 0)
                return err_set(err, "unknown LoRA target '%.*s' (q, k, v, o, gate, up, down, all)", (int)n, p);
            *mask |= 1u << found;
        }
        p += n;
        if (*p == ',')
            p++;
    }
    if (!*mask)
        return err_set(err, "no LoRA targets given");
    return 0;
}

// ---- parameters -------------------------------------------------------------------------------

Lora *lora_create(const ModelConfig *mc, const LoraConfig *c, Err *err)
{
    if (c->rank < 1)
        return err_set(err, "LoRA rank %d must be at least 1", c->rank), NULL;
    if (!(c->dropout >= 0 && c->dropout < 1))
        return err_set(err, "LoRA dropout %g must be in [0, 1)", c->dropout), NULL;
    if (!(c->targets & ((1u << PROJ_COUNT) - 1)) || (c->targets >> PROJ_COUNT))
        return err_set(err, "LoRA targets: none or unknown bits set"), NULL;
    Lora *l = calloc(1, sizeof *l);
    if (!l)
        return err_set(err, "out of memory"), NULL;
    l->config = *c;
    l->scale = lora_scale(c);
    l->n_layers = mc->n_layers;
    l->proj = calloc((size_t)mc->n_layers * PROJ_COUNT, sizeof *l->proj);
    size_t n = 0;
    for (int layer = 0; layer < mc->n_layers; layer++)
        for (int p = 0; p < PROJ_COUNT; p++)
            if (c->targets & (1u << p)) {
                int in, out;
                model_proj_dims(mc, p, &in, &out);
                n += (size_t)c->rank * (in + out);
            }
    l->n_params = n;
    l->params = calloc(n, sizeof *l->params);
    l->grads = calloc(n, sizeof *l->grads);
    if (!l->proj || !l->params || !l->grads) {
        lora_free(l);
        return err_set(err, "out of memory for %zu LoRA parameters", n), NULL;
    }
    size_t off = 0;
    for (int layer = 0; layer < mc->n_layers; layer++)
        for (int p = 0; p < PROJ_COUNT; p++) {
            LoraProj *lp = lora_proj(l, layer, p);
            model_proj_dims(mc, p, &lp->in, &lp->out);
            if (!(c->targets & (1u << p)))
                continue;
            lp->A = l->params + off;
            lp->dA = l->grads + off;
            off += (size_t)c->rank * lp->in;
            lp->B = l->params + off;
            lp->dB = l->grads + off;
            off += (size_t)lp->out * c->rank;
        }
    return l;
}

void lora_free(Lora *l)
{
    if (!l)
        return;
    free(l->proj);
    free(l->params);
    free(l->grads);
    free(l);
}

void lora_init(Lora *l, Rng *rng)
{
    int r = l->config.rank;
    for (int layer = 0; layer < l->n_layers; layer++)
        for (int p = 0; p < PROJ_COUNT; p++) {
            LoraProj *lp = lora_proj(l, layer, p);
            if (!lp->A)
                continue;
            // kaiming_uniform_(a=sqrt(5)) on (r, in): gain sqrt(2/(1+5)), bound gain*sqrt(3/in) = 1/sqrt(in)
            float bound = 1.0f / sqrtf((float)lp->in);
            for (size_t i = 0; i < (size_t)r * lp->in; i++)
                lp->A[i] = (2 * rng_uniform(rng) - 1) * bound;
            memset(lp->B, 0, (size_t)lp->out * r * sizeof *lp->B);
        }
}

void lora_zero_grad(Lora *l) { memset(l->grads, 0, l->n_params * sizeof *l->grads); }
