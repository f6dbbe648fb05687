#include "gen_batch.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef HAVE_CUDA
#include "../kernels/gen_cuda.cuh"
#include "../kernels/sample_cuda.cuh"
#include "cuda_device.h"
#endif

// ---- jobs: submitted prompts, delivered in order ----------------------------------------------

enum { JOB_PENDING, JOB_RUNNING, JOB_DONE };

typedef struct {
    GenBatch *batch;
    void *user;
    uint64_t stream;
    uint32_t *ids;            // (n_ids) the prompt, until it joins a slot
    size_t n_ids;
    int state;
    char *held;               // text produced while an earlier job was still being delivered
    size_t held_len, held_cap;
    GenResult res;            // when DONE and not yet delivered: res.text is owned (a copy)
    char *error;              // when DONE with an error (owned)
} Job;

typedef struct {
    Job *job;                 // NULL when free
    GenSeq *seq;
    size_t n_prompt;
    Generator *gen;           // CPU: this slot's model state
    float *logits;            // CPU: the slot's last logits (into gen)
} Slot;

struct GenBatch {
    GenBatchConfig cfg;
    const Model *model;
    const Tokenizer *tok;
    const GenLimits *lim;
    GenOutput out;
    uint32_t vocab;
    size_t context;

    Job **jobs;               // [first, n_jobs) submitted, not yet delivered, in order
    size_t first, n_jobs, cap_jobs;
    size_t next_pending;      // index into jobs of the first job that has not joined a slot
    Slot *slots;              // (n_slots: cfg.max_batch as asked; cfg.max_batch may shrink to fit)
    int n_slots;

    Sampler *sampler;         // CPU
#ifdef HAVE_CUDA
    CudaGen *gpu;
    CudaSampler *gpu_sampler;
#endif
    // per-step scratch, (max_batch) each
    int *rows_slot;
    uint32_t *ids, *picked;
    uint8_t *active;
    uint64_t *streams, *steps;
    int *cu;
    uint32_t *packed;         // (max_prefill) prompt ids of one prefill
    size_t max_prefill;
    char describe[256];
    GenBatchStats stats;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void gen_batch_stats(const GenBatch *b, GenBatchStats *st) { *st = b->stats; }

static void job_free(Job *j)
{
    if (!j)
        return;
    free(j->ids);
    free(j->held);
    free(j->error);
    if (j->state == JOB_DONE)
        free(j->res.text);
    free(j);
}

void gen_batch_free(GenBatch *b)
{
    if (!b)
        return;
    for (size_t i = b->first; i < b->n_jobs; i++)
        job_free(b->jobs[i]);
    free(b->jobs);
    if (b->slots)
        for (int s = 0; s < b->n_slots; s++) {
            gen_seq_free(b->slots[s].seq);
            generator_free(b->slots[s].gen);
        }
    free(b->slots);
    sampler_free(b->sampler);
#ifdef HAVE_CUDA
    cuda_sampler_free(b->gpu_sampler);
    cuda_gen_free(b->gpu);
#endif
    free(b->rows_slot);
    free(b->ids);
    free(b->picked);
    free(b->active);
    free(b->streams);
    free(b->steps);
    free(b->cu);
    free(b->packed);
    free(b);
}

GenBatch *gen_batch_new(const Model *m, const Adapter *a, const Tokenizer *tok, const SampleParams *sp,
                        const GenLimits *lim, const GenBatchConfig *cfg, const GenOutput *out, Err *err)
{
    const ModelConfig *mc = &m->config;
    if (cfg->max_batch < 1)
        return err_set(err, "batch %d: expected at least 1", cfg->max_batch), (GenBatch *)NULL;
    if (cfg->device != DEVICE_CPU && cfg->device != DEVICE_CUDA)
        return err_set(err, "generation device not resolved"), (GenBatch *)NULL;
    if (sample_params_check(sp, err) < 0)
        return NULL;
    GenBatch *b = calloc(1, sizeof *b);
    if (!b)
        return err_set(err, "out of memory"), (GenBatch *)NULL;
    b->cfg = *cfg;
    b->model = m;
    b->tok = tok;
    b->lim = lim;
    b->out = *out;
    b->vocab = (uint32_t)mc->vocab_size;
    size_t model_ctx = mc->max_seq_len > 0 ? (size_t)mc->max_seq_len : SIZE_MAX;
    b->context = cfg->context > 0 && (size_t)cfg->context < model_ctx ? (size_t)cfg->context : model_ctx;
    int B = cfg->max_batch;
    b->slots = calloc((size_t)B, sizeof *b->slots);
    b->n_slots = B;
    b->rows_slot = calloc((size_t)B, sizeof *b->rows_slot);
    b->ids = calloc((size_t)B, sizeof *b->ids);
    b->picked = calloc((size_t)B, sizeof *b->picked);
    b->active = calloc((size_t)B, sizeof *b->active);
    b->streams = calloc((size_t)B, sizeof *b->streams);
    b->steps = calloc((size_t)B, sizeof *b->steps);
    b->cu = calloc((size_t)B + 1, sizeof *b->cu);
    if (!b->slots || !b->rows_slot || !b->ids || !b->picked || !b->active || !b->streams || !b->steps || !b->cu) {
        err_set(err, "out of memory");
        goto fail;
    }
    for (int s = 0; s < B; s++)
        if (!(b->slots[s].seq = gen_seq_new(tok, lim, err)))
            goto fail;

    if (cfg->device == DEVICE_CPU) {
        for (int s = 0; s < B; s++)
            if (!(b->slots[s].gen = generator_new(m, a, cfg->merge_adapter, err)))
                goto fail;
        if (!(b->sampler = sampler_new(b->vocab, sp, err)))
            goto fail;
        int threads = 1;
#ifdef _OPENMP
        threads = omp_get_max_threads();
#endif
        snprintf(b->describe, sizeof b->describe, "cpu (%d thread%s), batch %d", threads, threads == 1 ? "" : "s", B);
        return b;
    }
#ifdef HAVE_CUDA
    if (b->context == SIZE_MAX || b->context > 1u << 20) {
        err_set(err, "the model's context (%zu) is too long to reserve for every slot: give --context", b->context);
        goto fail;
    }
    b->max_prefill = cfg->max_prefill > 0 ? (size_t)cfg->max_prefill : (b->context > 8192 ? b->context : 8192);
    if (b->max_prefill < b->context)
        b->max_prefill = b->context;
    if (!(b->packed = malloc(b->max_prefill * sizeof *b->packed))) {
        err_set(err, "out of memory");
        goto fail;
    }
    CudaGenConfig gc = {.max_batch = B, .capacity = (int)b->context, .max_prefill = (int)b->max_prefill,
                        .merge_adapter = cfg->merge_adapter, .use_graphs = cfg->use_graphs};
    int asked = B;
    // Every slot reserves its KV cache up front: with shrink_to_fit, fewer slots when they do not fit.
    while (!(b->gpu = cuda_gen_create(m, a, &gc, err))) {
        if (!cfg->shrink_to_fit || gc.max_batch == 1 || !strstr(err->msg, "cannot allocate"))
            goto fail;
        gc.max_batch /= 2;
    }
    B = b->cfg.max_batch = gc.max_batch;
    if (!(b->gpu_sampler = cuda_sampler_create(B, b->vocab, sp, err)))
        goto fail;
    char name[128];
    size_t total = 0;
    cuda_device_info(name, sizeof name, &total, NULL, NULL);
    snprintf(b->describe, sizeof b->describe, "cuda: %s, batch %d x context %zu, %.2f GiB%s", name, B, b->context,
             cuda_gen_device_bytes(b->gpu) / 1073741824.0,
             B < asked ? " (batch lowered to fit the device's memory)" : "");
    return b;
#else
    err_set(err, "generation on the GPU is not available in this build (use --device cpu)");
#endif
fail:
    gen_batch_free(b);
    return NULL;
}

const char *gen_batch_describe(const GenBatch *b) { return b->describe; }
int gen_batch_max_batch(const GenBatch *b) { return b->cfg.max_batch; }
size_t gen_batch_busy(const GenBatch *b) { return b->n_jobs - b->first; }
size_t gen_batch_pending(const GenBatch *b) { return b->n_jobs - b->next_pending; }

int gen_batch_submit(GenBatch *b, const uint32_t *ids, size_t n, uint64_t stream, void *user, Err *err)
{
    if (b->first > 0 && b->first == b->n_jobs) {
        b->first = b->n_jobs = b->next_pending = 0;   // everything delivered: start the array again
    }
    if (b->n_jobs == b->cap_jobs) {
        if (b->first > 0) {   // slide the live jobs down
            size_t live = b->n_jobs - b->first;
            memmove(b->jobs, b->jobs + b->first, live * sizeof *b->jobs);
            b->next_pending -= b->first;
            b->n_jobs = live;
            b->first = 0;
        }
        if (b->n_jobs == b->cap_jobs) {
            size_t cap = b->cap_jobs ? 2 * b->cap_jobs : 64;
            Job **p = realloc(b->jobs, cap * sizeof *p);
            if (!p)
                return err_set(err, "out of memory");
            b->jobs = p;
            b->cap_jobs = cap;
        }
    }
    Job *j = calloc(1, sizeof *j);
    if (!j || !(j->ids = malloc((n ? n : 1) * sizeof *ids))) {
        free(j);
        return err_set(err, "out of memory");
    }
    memcpy(j->ids, ids, n * sizeof *ids);
    j->n_ids = n;
    j->batch = b;
    j->user = user;
    j->stream = stream;
    j->state = JOB_PENDING;
    b->jobs[b->n_jobs++] = j;
    return 0;
}

// ---- delivery in order -------------------------------------------------------------------------

static int is_head(const Job *j) { return j->batch->jobs[j->batch->first] == j; }

// GenEmit for a running job: straight out when it is the earliest undelivered job, else held.
static int emit_job(void *ctx, const char *text, size_t n)
{
    Job *j = ctx;
    GenBatch *b = j->batch;
    if (!b->out.text)
        return 0;
    if (is_head(j))
        return b->out.text(b->out.ctx, j->user, text, n);
    if (j->held_len + n > j->held_cap) {
        size_t cap = j->held_cap ? j->held_cap : 256;
        while (cap < j->held_len + n)
            cap *= 2;
        char *p = realloc(j->held, cap);
        if (!p)
            return -1;
        j->held = p;
        j->held_cap = cap;
    }
    memcpy(j->held + j->held_len, text, n);
    j->held_len += n;
    return 0;
}

// Deliver every job at the front that can be: held text, then the end of those that are done.
static int advance(GenBatch *b, Err *err)
{
    while (b->first < b->n_jobs) {
        Job *j = b->jobs[b->first];
        if (j->held_len > 0) {
            if (b->out.text && b->out.text(b->out.ctx, j->user, j->held, j->held_len) < 0)
                return err_set(err, "output refused");
            j->held_len = 0;
        }
        if (j->state != JOB_DONE)
            break;
        if (b->out.done(b->out.ctx, j->user, j->error ? NULL : &j->res, j->error) < 0)
            return err_set(err, "output refused");
        job_free(j);
        b->jobs[b->first++] = NULL;
    }
    return 0;
}

// A job ends on its own (not a device failure): delivered now when at the front, else kept.
static int job_fail(GenBatch *b, Job *j, const char *msg, Err *err)
{
    j->state = JOB_DONE;
    if (!(j->error = strdup(msg)))
        return err_set(err, "out of memory");
    return advance(b, err);
}

// The output in slot s ended: end its GenSeq, deliver or keep the result, free the slot.
static int slot_finish(GenBatch *b, int s, Err *err)
{
    Slot *sl = &b->slots[s];
    Job *j = sl->job;
    GenResult res;
    if (gen_seq_end(sl->seq, emit_job, j, &res, err) < 0)
        return -1;
    sl->job = NULL;
    j->state = JOB_DONE;
    if (is_head(j)) {
        // Delivered straight from the GenSeq's buffer (res.text is not owned: clear it first).
        if (b->out.done(b->out.ctx, j->user, &res, NULL) < 0)
            return err_set(err, "output refused");
        job_free(j);
        b->jobs[b->first++] = NULL;
        return advance(b, err);
    }
    j->res = res;
    if (!(j->res.text = malloc(res.len + 1)))
        return err_set(err, "out of memory");
    memcpy(j->res.text, res.text, res.len + 1);
    return 0;
}

// Slot s's job took id: push it, and end the output at a stop, the token limit or the context.
static int slot_take(GenBatch *b, int s, uint32_t id, Err *err)
{
    Slot *sl = &b->slots[s];
    int rc = gen_seq_push(sl->seq, id, emit_job, sl->job, err);
    if (rc < 0)
        return -1;
    size_t n_new = gen_seq_new_tokens(sl->seq);
    if (rc == 1 || n_new >= (size_t)b->lim->max_new_tokens || sl->n_prompt + n_new >= b->context)
        return slot_finish(b, s, err);
    return 0;
}

// ---- the two devices ---------------------------------------------------------------------------

// Prefill the prompts of jobs joining slots rows_slot[0..n-1] (the jobs are in the slots), then
// pick each one's first token into b->picked.
static int device_prefill(GenBatch *b, int n, Err *err)
{
    if (b->cfg.device == DEVICE_CPU) {
        for (int i = 0; i < n; i++) {
            Slot *sl = &b->slots[b->rows_slot[i]];
            size_t nh;
            const uint32_t *hist = gen_seq_history(sl->seq, &nh);
            generator_reset(sl->gen);
            if (!(sl->logits = generator_forward(sl->gen, hist, nh, err)))
                return -1;
            b->picked[i] = sampler_pick(b->sampler, sl->logits, hist, nh, sl->job->stream, 0);
        }
        return 0;
    }
#ifdef HAVE_CUDA
    size_t at = 0;
    b->cu[0] = 0;
    for (int i = 0; i < n; i++) {
        Slot *sl = &b->slots[b->rows_slot[i]];
        size_t nh;
        const uint32_t *hist = gen_seq_history(sl->seq, &nh);
        memcpy(b->packed + at, hist, nh * sizeof *hist);
        at += nh;
        b->cu[i + 1] = (int)at;
        b->streams[i] = sl->job->stream;
        b->steps[i] = 0;
        if (cuda_sampler_start(b->gpu_sampler, b->rows_slot[i], hist, nh, cuda_gen_stream(b->gpu), err) < 0)
            return -1;
    }
    if (cuda_gen_prefill(b->gpu, b->rows_slot, b->packed, b->cu, n, err) < 0)
        return -1;
    return cuda_sampler_pick(b->gpu_sampler, cuda_gen_logits(b->gpu), n, b->rows_slot, b->streams, b->steps,
                             b->picked, cuda_gen_stream(b->gpu), err);
#else
    return err_set(err, "no GPU in this build");
#endif
}

// One decode step over slots 0..rows-1 (active[s] for running ones), picks into b->picked[s].
static int device_decode(GenBatch *b, int rows, Err *err)
{
    if (b->cfg.device == DEVICE_CPU) {
        for (int s = 0; s < rows; s++) {
            if (!b->active[s])
                continue;
            Slot *sl = &b->slots[s];
            size_t nh;
            const uint32_t *hist = gen_seq_history(sl->seq, &nh);
            if (!(sl->logits = generator_forward(sl->gen, &hist[nh - 1], 1, err)))
                return -1;
            b->picked[s] = sampler_pick(b->sampler, sl->logits, hist, nh, sl->job->stream, b->steps[s]);
        }
        return 0;
    }
#ifdef HAVE_CUDA
    for (int s = 0; s < rows; s++)
        b->rows_slot[s] = b->active[s] ? s : -1;
    if (cuda_gen_decode(b->gpu, b->ids, b->active, rows, err) < 0)
        return -1;
    return cuda_sampler_pick(b->gpu_sampler, cuda_gen_logits(b->gpu), rows, b->rows_slot, b->streams, b->steps,
                             b->picked, cuda_gen_stream(b->gpu), err);
#else
    return err_set(err, "no GPU in this build");
#endif
}

// ---- the step ----------------------------------------------------------------------------------

// Move queued jobs into free slots (lowest first, so decode steps cover few rows), as many as one
// prefill takes. Jobs that need no model work end here. Returns how many joined (rows_slot).
static int admit(GenBatch *b, Err *err)
{
    int n = 0;
    size_t tokens = 0;
    int s = 0;
    while (b->next_pending < b->n_jobs) {
        Job *j = b->jobs[b->next_pending];
        if (j->n_ids > b->context) {
            char msg[160];
            snprintf(msg, sizeof msg, "prompt of %zu tokens is longer than the %scontext of %zu", j->n_ids,
                     b->context == (size_t)b->model->config.max_seq_len ? "model's " : "", b->context);
            b->next_pending++;
            if (job_fail(b, j, msg, err) < 0)
                return -1;
            continue;
        }
        while (s < b->cfg.max_batch && b->slots[s].job)
            s++;
        if (s == b->cfg.max_batch)
            break;
        if (b->cfg.device == DEVICE_CUDA && n > 0 && tokens + j->n_ids > b->max_prefill)
            break;
        b->next_pending++;
        Slot *sl = &b->slots[s];
        Err e2;
        if (gen_seq_begin(sl->seq, j->ids, j->n_ids, &e2) < 0) {
            if (job_fail(b, j, e2.msg, err) < 0)
                return -1;
            continue;
        }
        sl->job = j;
        sl->n_prompt = j->n_ids;
        j->state = JOB_RUNNING;
        free(j->ids);
        j->ids = NULL;
        if (b->lim->max_new_tokens == 0 || j->n_ids >= b->context) {   // nothing to generate
            if (slot_finish(b, s, err) < 0)
                return -1;
            continue;
        }
        b->rows_slot[n++] = s;
        tokens += sl->n_prompt;
        if (b->cfg.device == DEVICE_CPU)
            break;   // the CPU prefills one prompt a step: running outputs keep streaming
    }
    return n;
}

int gen_batch_step(GenBatch *b, Err *err)
{
    int n = admit(b, err);
    if (n < 0)
        return -1;
    if (n > 0) {
        double t0 = now_s();
        if (device_prefill(b, n, err) < 0)
            return -1;
        double dt = now_s() - t0;
        b->stats.prefill_s += dt;
        if (b->stats.prefills == 0 || dt < b->stats.prefill_min_s)
            b->stats.prefill_min_s = dt;
        b->stats.prefills++;
        b->stats.prompts += n;
        b->stats.new_tokens += n;
        for (int i = 0; i < n; i++)
            b->stats.prompt_tokens += (long)b->slots[b->rows_slot[i]].n_prompt;
        for (int i = 0; i < n; i++)
            if (slot_take(b, b->rows_slot[i], b->picked[i], err) < 0)
                return -1;
        return 0;
    }
    int rows = 0;
    for (int s = 0; s < b->cfg.max_batch; s++) {
        Slot *sl = &b->slots[s];
        b->active[s] = sl->job != NULL;
        if (!sl->job)
            continue;
        rows = s + 1;
        size_t nh;
        const uint32_t *hist = gen_seq_history(sl->seq, &nh);
        b->ids[s] = hist[nh - 1];
        b->streams[s] = sl->job->stream;
        b->steps[s] = gen_seq_new_tokens(sl->seq);
    }
    if (rows == 0)
        return advance(b, err);
    double t0 = now_s();
    if (device_decode(b, rows, err) < 0)
        return -1;
    b->stats.decode_s += now_s() - t0;
    b->stats.steps++;
    for (int s = 0; s < rows; s++)
        b->stats.new_tokens += b->active[s];
    for (int s = 0; s < rows; s++)
        if (b->active[s] && slot_take(b, s, b->picked[s], err) < 0)
            return -1;
    return 0;
}

int gen_batch_finish(GenBatch *b, Err *err)
{
    while (gen_batch_busy(b) > 0)
        if (gen_batch_step(b, err) < 0)
            return -1;
    return 0;
}
