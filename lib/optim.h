// defines: AdamWConfig, AdamW, adamw_init, adamw_free, adamw_step, clip_grad_norm,
//          Schedule, schedule_parse, schedule_lr_factor, warmup_steps_from_ratio
// The optimizer side of training, with the exact semantics of PyTorch and transformers so a
// peer run on the same data gives the same curve:
//   AdamW       torch.optim.AdamW (decoupled weight decay p *= 1 - lr*wd, bias correction,
//               eps added outside the square root), float32 state
//   clipping    torch.nn.utils.clip_grad_norm_: total L2 norm over all gradients, every
//               gradient multiplied by min(1, max_norm / (norm + 1e-6))
//   schedules   transformers get_{linear,cosine,constant}_schedule_with_warmup (LambdaLR): the
//               lr of optimizer step s (0-based) is base_lr * factor(s)
#ifndef OPTIM_H
#define OPTIM_H

#include <stddef.h>

#include "err.h"

typedef struct {
    float beta1, beta2;     // torch defaults 0.9, 0.999
    float eps;              // 1e-8
    float weight_decay;     // decoupled, multiplied by lr
} AdamWConfig;

typedef struct {
    AdamWConfig config;
    size_t n;
    long step;              // updates done so far (torch's state "step")
    float *m;               // (n) exp_avg
    float *v;               // (n) exp_avg_sq
} AdamW;

int adamw_init(AdamW *o, size_t n, const AdamWConfig *c, Err *err);
void adamw_free(AdamW *o);
// One update of params (n) with grads (n) at learning rate lr.
void adamw_step(AdamW *o, float *params, const float *grads, float lr);

// Clip grads (n) in place to total L2 norm max_norm (max_norm <= 0: no clipping) and return
// the norm before clipping (what the trainer logs as grad_norm).
double clip_grad_norm(float *grads, size_t n, double max_norm);

typedef enum { SCHEDULE_LINEAR, SCHEDULE_COSINE, SCHEDULE_CONSTANT } Schedule;

// "linear", "cosine", "constant"; -1 naming the bad value.
int schedule_parse(const char *name, Schedule *s, Err *err);
// The LambdaLR factor for optimizer step `step` (0-based) of total_steps with warmup_steps:
// step / max(1, warmup) during warmup, then
//   linear:   max(0, (total - step) / max(1, total - warmup))
//   cosine:   max(0, 0.5 * (1 + cos(pi * progress))), progress = (step - warmup) / max(1, total - warmup)
//   constant: 1
double schedule_lr_factor(Schedule s, long step, long warmup_steps, long total_steps);
// transformers' TrainingArguments.get_warmup_steps: ceil(ratio * total_steps).
long warmup_steps_from_ratio(double ratio, long total_steps);

#endif
