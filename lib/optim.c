#include "optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int adamw_init(AdamW *o, size_t n, const AdamWConfig *c, Err *err)
{
    memset(o, 0, sizeof *o);
    if (!(c->beta1 >= 0 && c->beta1 < 1) || !(c->beta2 >= 0 && c->beta2 < 1))
        return err_set(err, "AdamW betas (%g, %g) must be in [0, 1)", c->beta1, c->beta2);
    if (!(c->eps >= 0) || !(c->weight_decay >= 0))
        return err_set(err, "AdamW eps and weight decay must be non-negative");
    o->config = *c;
    o->n = n;
    o->m = calloc(n ? n : 1, sizeof *o->m);
    o->v = calloc(n ? n : 1, sizeof *o->v);
    if (!o->m || !o->v) {
        adamw_free(o);
        return err_set(err, "out of memory for optimizer state (%zu parameters)", n);
    }
    return 0;
}

void adamw_free(AdamW *o)
{
    free(o->m);
    free(o->v);
    o->m = o->v = NULL;
}

// torch.optim.AdamW (_single_tensor_adamw, no amsgrad, not maximize), in the same order of
// float32 operations:
//   p *= 1 - lr*wd;  m = lerp(m, g, 1-b1);  v = b2*v + (1-b2)*g*g
//   p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
void adamw_step(AdamW *o, float *params, const float *grads, float lr)
{
    const AdamWConfig *c = &o->config;
    o->step++;
    double bc1 = 1.0 - pow(c->beta1, (double)o->step), bc2 = 1.0 - pow(c->beta2, (double)o->step);
    float step_size = (float)(lr / bc1), bc2_sqrt = (float)sqrt(bc2);
    float decay = 1.0f - lr * c->weight_decay, w1 = 1.0f - c->beta1, w2 = 1.0f - c->beta2;
    #pragma omp parallel for if (o->n > 65536)
    for (size_t i = 0; i < o->n; i++) {
        float g = grads[i];
        params[i] *= decay;
        o->m[i] += w1 * (g - o->m[i]);
        o->v[i] = o->v[i] * c->beta2 + w2 * g * g;
        float denom = sqrtf(o->v[i]) / bc2_sqrt + c->eps;
        params[i] -= step_size * (o->m[i] / denom);
    }
}

double clip_grad_norm(float *grads, size_t n, double max_norm)
{
    double sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += (double)grads[i] * grads[i];
    double norm = sqrt(sum);
    if (max_norm > 0) {
        double coef = max_norm / (norm + 1e-6);
        if (coef < 1) {
            float f = (float)coef;
            for (size_t i = 0; i < n; i++)
                grads[i] *= f;
        }
    }
    return norm;
}

int schedule_parse(const char *name, Schedule *s, Err *err)
{
    if (!strcmp(name, "linear"))
        *s = SCHEDULE_LINEAR;
    else if (!strcmp(name, "cosine"))
        *s = SCHEDULE_COSINE;
    else if (!strcmp(name, "constant"))
        *s = SCHEDULE_CONSTANT;
    else
        return err_set(err, "unknown schedule '%s' (linear, cosine, constant)", name);
    return 0;
}

double schedule_lr_factor(Schedule s, long step, long warmup_steps, long total_steps)
{
    if (step < warmup_steps)
        return (double)step / (double)(warmup_steps > 1 ? warmup_steps : 1);
    long span = total_steps - warmup_steps > 1 ? total_steps - warmup_steps : 1;
    double progress = (double)(step - warmup_steps) / (double)span, f;
    switch (s) {
    case SCHEDULE_LINEAR:
        f = (double)(total_steps - step) / (double)span;
        return f > 0 ? f : 0;
    case SCHEDULE_COSINE:
        f = 0.5 * (1.0 + cos(M_PI * progress));   // num_cycles 0.5: cos(pi * 2 * 0.5 * progress)
        return f > 0 ? f : 0;
    default:
        return 1.0;
    }
}

long warmup_steps_from_ratio(double ratio, long total_steps)
{
    return (long)ceil(ratio * (double)total_steps);
}
