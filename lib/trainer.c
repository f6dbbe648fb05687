#include "trainer.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "adapter.h"
#include "checkpoint.h"
#include "dataset.h"
#include "engine.h"
#include "train_engine.h"
#include "model.h"
#include "tokenizer.h"

_Static_assert((int)ADAPTER_Q == (int)PROJ_Q && (int)ADAPTER_DOWN == (int)PROJ_DOWN &&
               (int)ADAPTER_NMODULES == (int)PROJ_COUNT, "AdapterModule and Proj share one order");

void train_options_default(TrainOptions *o)
{
    memset(o, 0, sizeof *o);
    o->lora = (LoraConfig){.rank = 16, .alpha = 16, .dropout = 0, .use_rslora = 0,
                           .targets = (1u << PROJ_COUNT) - 1};
    o->seed = 3407;
    o->batch = 2;
    o->accum = 4;
    o->epochs = 1;
    o->warmup_steps = 5;
    o->lr = 2e-4;
    o->schedule = SCHEDULE_LINEAR;
    o->adamw = (AdamWConfig){.beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.01f};
    o->max_grad_norm = 1.0;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void note(TrainCallback cb, void *ctx, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void note(TrainCallback cb, void *ctx, const char *fmt, ...)
{
    if (!cb)
        return;
    char msg[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    TrainProgress p = {.message = msg};
    cb(TRAIN_NOTE, &p, ctx);
}

static const char *schedule_name(Schedule s)
{
    return s == SCHEDULE_COSINE ? "cosine" : s == SCHEDULE_CONSTANT ? "constant" : "linear";
}

static void targets_string(unsigned mask, char *buf, size_t cap)
{
    buf[0] = 0;
    for (int p = 0; p < PROJ_COUNT; p++)
        if (mask >> p & 1) {
            size_t n = strlen(buf);
            snprintf(buf + n, cap - n, "%s%s", n ? "," : "", adapter_module_short((AdapterModule)p));
        }
}

// A float option as the double of its shortest decimal spelling (0.1f -> 0.1, not
// 0.10000000149011612), for JSON that people and PEFT read.
static double short_double(float f)
{
    char buf[32];
    for (int digits = 6; digits <= 9; digits++) {
        snprintf(buf, sizeof buf, "%.*g", digits, f);
        if ((float)strtod(buf, NULL) == f)
            break;
    }
    return strtod(buf, NULL);
}

static json_t *float_json(float f)
{
    return json_real(short_double(f));
}

// The options that shape the run, by their command-line names: a resumed run must give the
// same ones, or it would not continue the run it claims to (the step count may change).
static json_t *options_json(const TrainOptions *o, const DatasetInfo *train)
{
    char targets[64], seed[24], fingerprint[24];
    targets_string(o->lora.targets, targets, sizeof targets);
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)o->seed);
    snprintf(fingerprint, sizeof fingerprint, "0x%016llx", (unsigned long long)train->fingerprint);
    json_t *j = json_object();
    json_object_set_new(j, "rank", json_integer(o->lora.rank));
    json_object_set_new(j, "alpha", float_json(o->lora.alpha));
    json_object_set_new(j, "dropout", float_json(o->lora.dropout));
    json_object_set_new(j, "rslora", json_boolean(o->lora.use_rslora));
    json_object_set_new(j, "targets", json_string(targets));
    json_object_set_new(j, "seed", json_string(seed));
    json_object_set_new(j, "batch", json_integer(o->batch));
    json_object_set_new(j, "accum", json_integer(o->accum));
    json_object_set_new(j, "lr", json_real(o->lr));
    json_object_set_new(j, "scheduler", json_string(schedule_name(o->schedule)));
    json_object_set_new(j, "warmup-steps", json_integer(o->warmup_steps));
    json_object_set_new(j, "warmup-ratio", json_real(o->warmup_ratio));
    json_object_set_new(j, "weight-decay", float_json(o->adamw.weight_decay));
    json_object_set_new(j, "adam-beta1", float_json(o->adamw.beta1));
    json_object_set_new(j, "adam-beta2", float_json(o->adamw.beta2));
    json_object_set_new(j, "adam-eps", float_json(o->adamw.eps));
    json_object_set_new(j, "max-grad-norm", json_real(o->max_grad_norm));
    json_object_set_new(j, "training rows", json_integer((json_int_t)train->n_rows));
    json_object_set_new(j, "training seq_len", json_integer(train->seq_len));
    json_object_set_new(j, "training tokenizer", json_string(fingerprint));
    return j;
}

static int check_resume_options(const char *dir, const char *saved_text, json_t *now, Err *err)
{
    json_error_t jerr;
    json_t *saved = json_loads(saved_text, 0, &jerr);
    if (!saved)
        return err_set(err, "%s: options: %s", dir, jerr.text);
    const char *key;
    json_t *value;
    int rc = 0;
    json_object_foreach(now, key, value) {
        json_t *was = json_object_get(saved, key);
        if (was && json_equal(was, value))
            continue;
        char *a = was ? json_dumps(was, JSON_ENCODE_ANY) : NULL, *b = json_dumps(value, JSON_ENCODE_ANY);
        int is_option = !strchr(key, ' ');
        rc = err_set(err, "%s: made with %s%s %s, this run has %s (resume with the options of the run it continues)",
                     dir, is_option ? "--" : "", key, a ? a : "(none)", b ? b : "?");
        free(a);
        free(b);
        break;
    }
    json_decref(saved);
    return rc;
}

// Shards made by another tokenizer would train the model on the wrong ids.
static int check_shards(const char *model_dir, const Model *model, const char *path, const DatasetInfo *info,
                        TrainCallback cb, void *ctx, Err *err)
{
    if (info->vocab_size > (uint32_t)model->config.vocab_size)
        return err_set(err, "%s: ids up to %u, but the model %s has a vocabulary of %d", path, info->vocab_size - 1,
                       model_dir, model->config.vocab_size);
    if (info->n_rows == 0)
        return err_set(err, "%s: no rows", path);
    if (info->fingerprint == 0) {
        note(cb, ctx, "%s: the shards carry no tokenizer fingerprint; cannot check they match %s", path, model_dir);
        return 0;
    }
    Err terr;
    Tokenizer *tok = tokenizer_load(model_dir, &terr);
    if (!tok) {
        note(cb, ctx, "cannot check the shards' tokenizer against the model's: %s", terr.msg);
        return 0;
    }
    uint64_t want = tokenizer_fingerprint(tok);
    tokenizer_free(tok);
    if (want != info->fingerprint)
        return err_set(err, "%s: tokenizer fingerprint 0x%016llx differs from the model's tokenizer %s "
                       "(0x%016llx): tokenize the data with the model's tokenizer (tok -m %s)",
                       path, (unsigned long long)info->fingerprint, model_dir, (unsigned long long)want, model_dir);
    return 0;
}

static Dataset *open_shards(const char *model_dir, const Model *model, const char *path, TrainCallback cb,
                            void *ctx, Err *err)
{
    Dataset *d = dataset_open(path, err);
    if (!d)
        return NULL;
    if (check_shards(model_dir, model, path, dataset_info(d), cb, ctx, err) < 0 || dataset_verify(d, err) < 0) {
        dataset_close(d);
        return NULL;
    }
    return d;
}

// Create out_dir if missing and prove we can write there now, not after hours of training.
static int prepare_out_dir(const char *dir, Err *err)
{
    if (mkdir(dir, 0777) != 0 && errno != EEXIST)
        return err_set(err, "%s: cannot create directory: %s", dir, strerror(errno));
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return err_set(err, "%s: not a directory", dir);
    char probe[PATH_MAX];
    snprintf(probe, sizeof probe, "%s/.lora-train.XXXXXX", dir);
    int fd = mkstemp(probe);
    if (fd < 0)
        return err_set(err, "%s: cannot write: %s", dir, strerror(errno));
    close(fd);
    unlink(probe);
    return 0;
}

// An Adapter view over the live LoRA parameters (for saving).
static int lora_view(const Lora *lora, const ModelConfig *mc, const char *model_dir, Adapter *a, Err *err)
{
    AdapterConfig cfg = {.rank = lora->config.rank, .alpha = short_double(lora->config.alpha),
                         .dropout = short_double(lora->config.dropout),
                         .use_rslora = lora->config.use_rslora, .modules = lora->config.targets};
    snprintf(cfg.base_model, sizeof cfg.base_model, "%s", model_dir);
    int in[ADAPTER_NMODULES], out[ADAPTER_NMODULES];
    for (int p = 0; p < PROJ_COUNT; p++)
        model_proj_dims(mc, (Proj)p, &in[p], &out[p]);
    if (adapter_view_init(a, &cfg, lora->n_layers, in, out, err) < 0)
        return -1;
    for (int l = 0; l < lora->n_layers; l++)
        for (int p = 0; p < PROJ_COUNT; p++) {
            LoraProj *lp = lora_proj(lora, l, (Proj)p);
            a->A[(size_t)l * ADAPTER_NMODULES + p] = lp->A;
            a->B[(size_t)l * ADAPTER_NMODULES + p] = lp->B;
        }
    return 0;
}

static EngineBatch engine_batch(const DatasetBatch *b)
{
    return (EngineBatch){.B = b->B, .T = b->T, .tokens = b->tokens, .targets = b->targets,
                         .positions = b->positions, .cu_seqlens = b->cu_seqlens, .n_seqs = b->n_seqs};
}

// Mean loss over every trained target of the set, rows in stored order.
static int evaluate(TrainEngine *eng, const Lora *lora, Dataset *d, DatasetBatch *mb, double *loss, long *n, Err *err)
{
    DatasetCursor c;
    dataset_cursor_init(&c, 0, 0, 0, 1);
    double sum = 0;
    *n = 0;
    while (c.epoch == 0) {
        if (dataset_next_batch(d, &c, mb, err) < 0)
            return -1;
        EngineBatch eb = engine_batch(mb);
        double s;
        long k;
        if (train_engine_eval_micro_batch(eng, lora, &eb, &s, &k, err) < 0)
            return -1;
        sum += s;
        *n += k;
    }
    *loss = *n ? sum / *n : NAN;
    return 0;
}

// JSON has no NaN: a value that is not finite is written as null.
static void put_num(FILE *f, const char *key, double x)
{
    if (isfinite(x))
        fprintf(f, ",\"%s\":%.9g", key, x);
    else
        fprintf(f, ",\"%s\":null", key);
}

typedef struct {
    const TrainOptions *o;
    TrainCallback cb;
    void *ctx;
    Model *model;
    Dataset *train, *eval;
    TrainEngine *engine;
    Lora *lora;
    AdamW opt;
    int opt_ready;
    DatasetBatch mb;
    Adapter view;
    FILE *metrics;
    char *options_text;
    CheckpointState st;
} Run;

static int save_checkpoint(Run *r, TrainResult *res, Err *err)
{
    r->st.adam_step = r->opt.step;
    if (train_engine_download(r->engine, r->lora, &r->opt, err) < 0)
        return -1;
    if (checkpoint_save(r->o->out_dir, &r->view, r->opt.m, r->opt.v, r->lora->n_params, &r->st, r->options_text,
                        res->checkpoint, sizeof res->checkpoint, err) < 0)
        return -1;
    if (r->cb) {
        TrainProgress p = {.step = r->st.step, .path = res->checkpoint};
        r->cb(TRAIN_CHECKPOINT, &p, r->ctx);
    }
    return 0;
}

static int run_eval(Run *r, TrainResult *res, Err *err)
{
    double loss;
    long n;
    if (evaluate(r->engine, r->lora, r->eval, &r->mb, &loss, &n, err) < 0)
        return -1;
    res->eval_loss = loss;
    if (r->metrics) {
        fprintf(r->metrics, "{\"step\":%ld", r->st.step);
        put_num(r->metrics, "eval_loss", loss);
        fprintf(r->metrics, ",\"eval_tokens\":%ld}\n", n);
        fflush(r->metrics);
    }
    if (r->cb) {
        TrainProgress p = {.step = r->st.step, .eval_loss = loss, .eval_tokens = n};
        r->cb(TRAIN_EVAL, &p, r->ctx);
    }
    return 0;
}

static int resume(Run *r, json_t *now, Err *err)
{
    const TrainOptions *o = r->o;
    Adapter *saved = NULL;
    float *m = NULL, *v = NULL;
    char *saved_options = NULL;
    // Options first: "made with --rank 8" says more than a parameter count that differs.
    if (checkpoint_read_options(o->resume_dir, &saved_options, err) < 0)
        return -1;
    int rc = check_resume_options(o->resume_dir, saved_options, now, err);
    free(saved_options);
    saved_options = NULL;
    if (rc < 0)
        return -1;
    if (checkpoint_load(o->resume_dir, &saved, &m, &v, r->lora->n_params, &r->st, &saved_options, err) < 0)
        return -1;
    rc = adapter_check_shapes(saved, r->view.n_layers, r->view.in_dim, r->view.out_dim, err);
    if (rc == 0 && saved->cfg.modules != r->view.cfg.modules)
        rc = err_set(err, "%s: the checkpoint adapts other modules than --targets", o->resume_dir);
    if (rc == 0) {
        for (int l = 0; l < saved->n_layers; l++)
            for (int p = 0; p < PROJ_COUNT; p++) {
                if (!(saved->cfg.modules >> p & 1))
                    continue;
                LoraProj *lp = lora_proj(r->lora, l, (Proj)p);
                memcpy(lp->A, adapter_A(saved, l, p), sizeof(float) * lp->in * saved->cfg.rank);
                memcpy(lp->B, adapter_B(saved, l, p), sizeof(float) * lp->out * saved->cfg.rank);
            }
        memcpy(r->opt.m, m, sizeof(float) * r->lora->n_params);
        memcpy(r->opt.v, v, sizeof(float) * r->lora->n_params);
        r->opt.step = r->st.adam_step;
    }
    adapter_free(saved);
    free(m);
    free(v);
    free(saved_options);
    return rc;
}

static int setup(Run *r, Err *err)
{
    const TrainOptions *o = r->o;
    if (o->batch < 1 || o->accum < 1)
        return err_set(err, "batch and accum must be at least 1");
    if (!(o->lr >= 0) || !(o->max_steps > 0 || o->epochs > 0))
        return err_set(err, "need a non-negative learning rate and a positive number of steps or epochs");
    r->model = model_load(o->model_dir, err);
    if (!r->model)
        return -1;
    r->train = open_shards(o->model_dir, r->model, o->train_path, r->cb, r->ctx, err);
    if (!r->train)
        return -1;
    const DatasetInfo *ti = dataset_info(r->train);
    if (o->eval_path) {
        r->eval = open_shards(o->model_dir, r->model, o->eval_path, r->cb, r->ctx, err);
        if (!r->eval)
            return -1;
        if (dataset_info(r->eval)->seq_len != ti->seq_len)
            return err_set(err, "%s: seq_len %u, the training shards %s have %u", o->eval_path,
                           dataset_info(r->eval)->seq_len, o->train_path, ti->seq_len);
    }
    if (prepare_out_dir(o->out_dir, err) < 0)
        return -1;
    r->lora = lora_create(&r->model->config, &o->lora, err);
    if (!r->lora)
        return -1;
    if (adamw_init(&r->opt, r->lora->n_params, &o->adamw, err) < 0)
        return -1;
    r->opt_ready = 1;
    if (lora_view(r->lora, &r->model->config, o->model_dir, &r->view, err) < 0)
        return -1;
    json_t *now = options_json(o, ti);
    r->options_text = json_dumps(now, JSON_COMPACT | JSON_PRESERVE_ORDER);
    int rc = 0;
    if (!r->options_text)
        rc = err_set(err, "out of memory");
    else if (o->resume_dir)
        rc = resume(r, now, err);
    else {
        memset(&r->st, 0, sizeof r->st);
        rng_seed(&r->st.rng, o->seed);
        lora_init(r->lora, &r->st.rng);
        dataset_cursor_init(&r->st.cursor, o->seed, 1, 0, 1);
    }
    json_decref(now);
    if (rc < 0)
        return -1;
    r->engine = train_engine_create(device_resolve(o->device), r->model, &o->lora, o->batch,
                                    (int)ti->seq_len, o->recompute, o->memory_limit, err);
    if (!r->engine || train_engine_upload(r->engine, r->lora, &r->opt, err) < 0)
        return -1;
    if (dataset_batch_alloc(&r->mb, o->batch, (int)ti->seq_len, err) < 0)
        return -1;
    if (o->metrics_path) {
        // A resumed run continues the metrics of the run it continues.
        r->metrics = fopen(o->metrics_path, o->resume_dir ? "a" : "w");
        if (!r->metrics)
            return err_set(err, "%s: %s", o->metrics_path, strerror(errno));
    }
    return 0;
}

// Optimizer steps the options ask for: max_steps, else as transformers counts them,
// ceil(epochs * max(1, micro-batches per epoch / accum)).
static long planned_steps(const TrainOptions *o, uint64_t rows)
{
    if (o->max_steps > 0)
        return o->max_steps;
    uint64_t micro = (rows + o->batch - 1) / o->batch;
    uint64_t per_epoch = micro / o->accum ? micro / o->accum : 1;
    return (long)ceil(o->epochs * (double)per_epoch);
}

static int train_loop(Run *r, TrainResult *res, Err *err)
{
    const TrainOptions *o = r->o;
    const DatasetInfo *ti = dataset_info(r->train);
    long total = planned_steps(o, ti->n_rows);
    long warmup = o->warmup_steps >= 0 ? o->warmup_steps : warmup_steps_from_ratio(o->warmup_ratio, total);
    uint64_t rows_per_epoch = dataset_rank_rows(r->train, 0, 1);
    res->start_step = r->st.step;
    if (r->cb) {
        TrainProgress p = {.step = r->st.step, .start_step = r->st.step, .total_steps = total,
                           .n_params = r->lora->n_params, .train_rows = ti->n_rows,
                           .eval_rows = r->eval ? dataset_info(r->eval)->n_rows : 0, .seq_len = (int)ti->seq_len,
                           .device = train_engine_describe(r->engine)};
        r->cb(TRAIN_START, &p, r->ctx);
    }
    double t0 = now_s();
    uint64_t positions = 0;   // input positions processed by this process (for tokens/s)
    int saved_now = 0;
    while (r->st.step < total) {
        if (train_engine_zero_grad(r->engine, r->lora, err) < 0)
            return -1;
        double loss_sum = 0;
        long n_trained = 0;
        for (int k = 0; k < o->accum; k++) {
            if (dataset_next_batch(r->train, &r->st.cursor, &r->mb, err) < 0)
                return -1;
            EngineBatch eb = engine_batch(&r->mb);
            double s;
            long n;
            if (train_engine_micro_batch(r->engine, r->lora, &eb, &r->st.rng, &s, &n, err) < 0)
                return -1;
            loss_sum += s;
            n_trained += n;
            positions += (uint64_t)r->mb.n_rows * r->mb.T;
        }
        double loss = n_trained ? loss_sum / n_trained : NAN;
        double lr = o->lr * schedule_lr_factor(o->schedule, r->st.step, warmup, total);
        double grad_norm;
        if (train_engine_step(r->engine, r->lora, &r->opt, n_trained, o->max_grad_norm, (float)lr, &grad_norm, err) < 0)
            return -1;
        r->st.step++;
        r->st.tokens_seen += (uint64_t)n_trained;
        res->tokens += (uint64_t)n_trained;
        res->last_loss = loss;
        res->steps_done = r->st.step;

        double elapsed = now_s() - t0;
        long done_here = r->st.step - res->start_step;
        TrainProgress p = {.step = r->st.step, .total_steps = total, .start_step = res->start_step, .loss = loss,
                           .lr = lr, .grad_norm = grad_norm, .step_tokens = n_trained,
                           .epoch = r->st.cursor.epoch + (double)r->st.cursor.position / (double)rows_per_epoch,
                           .tokens_per_s = elapsed > 0 ? positions / elapsed : 0, .elapsed_s = elapsed,
                           .eta_s = elapsed / done_here * (total - r->st.step)};
        if (r->metrics) {
            fprintf(r->metrics, "{\"step\":%ld", p.step);
            put_num(r->metrics, "loss", loss);
            put_num(r->metrics, "lr", lr);
            put_num(r->metrics, "grad_norm", grad_norm);
            fprintf(r->metrics, ",\"tokens\":%ld", n_trained);
            put_num(r->metrics, "epoch", p.epoch);
            size_t device_bytes = train_engine_device_bytes(r->engine);   // planned at start: the peak
            if (device_bytes)
                fprintf(r->metrics, ",\"peak_device_bytes\":%zu", device_bytes);
            put_num(r->metrics, "elapsed_s", elapsed);   // time-dependent fields last
            put_num(r->metrics, "tokens_per_s", p.tokens_per_s);
            fputs("}\n", r->metrics);
            fflush(r->metrics);
        }
        if (r->cb)
            r->cb(TRAIN_STEP, &p, r->ctx);
        if (r->eval && o->eval_every > 0 && r->st.step % o->eval_every == 0 && r->st.step < total &&
            run_eval(r, res, err) < 0)
            return -1;
        saved_now = 0;
        if (o->save_every > 0 && r->st.step % o->save_every == 0) {
            if (save_checkpoint(r, res, err) < 0)
                return -1;
            saved_now = 1;
        }
        if (o->stop && *o->stop && r->st.step < total) {
            if (!saved_now && save_checkpoint(r, res, err) < 0)
                return -1;
            res->stopped = 1;
            break;
        }
    }
    res->seconds = now_s() - t0;
    res->device_bytes = train_engine_device_bytes(r->engine);
    if (res->stopped)
        return 0;
    // As transformers does with a save strategy: the last step is checkpointed too, so that a
    // later run with more steps can --resume from it.
    if (o->save_every > 0 && !saved_now && r->st.step > res->start_step && save_checkpoint(r, res, err) < 0)
        return -1;
    if (r->eval && run_eval(r, res, err) < 0)
        return -1;
    if (r->metrics && (fflush(r->metrics) != 0 || ferror(r->metrics)))
        return err_set(err, "%s: write failed", o->metrics_path);
    if (train_engine_download(r->engine, r->lora, &r->opt, err) < 0)
        return -1;
    return adapter_save(&r->view, o->out_dir, err);
}

int trainer_run(const TrainOptions *o, TrainCallback cb, void *ctx, TrainResult *res, Err *err)
{
    memset(res, 0, sizeof *res);
    res->last_loss = res->eval_loss = NAN;
    Run r = {.o = o, .cb = cb, .ctx = ctx};
    int rc = setup(&r, err);
    if (rc == 0)
        rc = train_loop(&r, res, err);
    if (r.metrics && fclose(r.metrics) != 0 && rc == 0)
        rc = err_set(err, "%s: write failed: %s", o->metrics_path, strerror(errno));
    free(r.options_text);
    dataset_batch_free(&r.mb);
    adapter_view_release(&r.view);
    if (r.opt_ready)
        adamw_free(&r.opt);
    train_engine_free(r.engine);
    if (r.lora)
        lora_free(r.lora);
    if (r.eval)
        dataset_close(r.eval);
    if (r.train)
        dataset_close(r.train);
    if (r.model)
        model_free(r.model);
    return rc;
}
