#include "checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "atomic.h"
#include "safetensors.h"
#include "safetensors_write.h"

#define STATE_NAME "trainer_state.json"
#define OPTIMIZER_NAME "optimizer.safetensors"
#define FORMAT_NAME "lora-train checkpoint"

void checkpoint_name(char *buf, size_t cap, const char *out_dir, long step)
{
    snprintf(buf, cap, "%s/checkpoint-%ld", out_dir, step);
}

static void sync_path(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

// Remove a flat directory (a checkpoint holds plain files only).
static void remove_flat_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        char path[2 * PATH_MAX];
        while ((e = readdir(d))) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            unlink(path);
        }
        closedir(d);
    }
    rmdir(dir);
}

// Seeds and generator state go to JSON as hex strings (JSON integers in jansson are signed
// 64-bit); counts stay integers. The reader takes either.
static json_t *u64_json(uint64_t x)
{
    char buf[24];
    snprintf(buf, sizeof buf, "0x%016" PRIx64, x);
    return json_string(buf);
}

static int u64_from_json(json_t *v, uint64_t *x)
{
    if (json_is_integer(v) && json_integer_value(v) >= 0) {
        *x = (uint64_t)json_integer_value(v);
        return 0;
    }
    if (!json_is_string(v))
        return -1;
    const char *s = json_string_value(v);
    char *end;
    errno = 0;
    *x = strtoull(s, &end, 0);
    return (end == s || *end || errno) ? -1 : 0;
}

static json_t *state_json(const CheckpointState *s, size_t n_params, json_t *options)
{
    json_t *rng = json_array();
    for (int i = 0; i < 4; i++)
        json_array_append_new(rng, u64_json(s->rng.s[i]));
    const DatasetCursor *c = &s->cursor;
    json_t *cursor = json_pack("{s:o, s:I, s:I, s:i, s:i, s:i}", "seed", u64_json(c->seed), "epoch",
                               (json_int_t)c->epoch, "position", (json_int_t)c->position, "rank", (int)c->rank,
                               "n_ranks", (int)c->n_ranks, "shuffle", (int)c->shuffle);
    return json_pack("{s:s, s:i, s:I, s:I, s:o, s:o, s:I, s:I, s:o}", "format", FORMAT_NAME, "version",
                     CHECKPOINT_VERSION, "step", (json_int_t)s->step, "adam_step", (json_int_t)s->adam_step,
                     "rng", rng, "cursor", cursor, "tokens_seen", (json_int_t)s->tokens_seen, "n_params",
                     (json_int_t)n_params, "options", options);
}

static int write_text_file(const char *path, const char *text, Err *err)
{
    AtomicFile af;
    if (atomic_open(&af, path, err) < 0)
        return -1;
    fputs(text, af.f);
    fputc('\n', af.f);
    return atomic_commit(&af, err);
}

int checkpoint_save(const char *out_dir, const Adapter *adapter, const float *m, const float *v,
                    size_t n_params, const CheckpointState *state, const char *options_json,
                    char *saved, size_t cap, Err *err)
{
    // Sized so that the suffixes below always fit behind a name that fits in PATH_MAX.
    char final[PATH_MAX], tmp[PATH_MAX + 32], path[PATH_MAX + 64], old[PATH_MAX + 32] = "";
    if (strlen(out_dir) > PATH_MAX - 64)
        return err_set(err, "%.100s...: output directory name too long", out_dir);
    checkpoint_name(final, sizeof final, out_dir, state->step);
    snprintf(tmp, sizeof tmp, "%s.tmp.XXXXXX", final);
    if (!mkdtemp(tmp))
        return err_set(err, "%s: cannot create: %s", tmp, strerror(errno));
    json_error_t jerr;
    json_t *options = json_loads(options_json ? options_json : "{}", 0, &jerr);
    char *text = NULL;
    if (!options || !json_is_object(options)) {
        json_decref(options);
        err_set(err, "checkpoint options: not a JSON object");
        goto fail;
    }
    if (adapter_save(adapter, tmp, err) < 0)
        goto fail;
    int64_t shape = (int64_t)n_params;
    StTensorOut moments[2] = {
        {.name = "exp_avg", .dtype = "F32", .ndim = 1, .shape = {shape}, .data = m, .nbytes = n_params * sizeof(float)},
        {.name = "exp_avg_sq", .dtype = "F32", .ndim = 1, .shape = {shape}, .data = v, .nbytes = n_params * sizeof(float)},
    };
    snprintf(path, sizeof path, "%s/%s", tmp, OPTIMIZER_NAME);
    if (safetensors_write_file(path, moments, 2, NULL, 0, err) < 0) {
        json_decref(options);
        goto fail;
    }
    json_t *j = state_json(state, n_params, options);   // takes options
    text = j ? json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
    json_decref(j);
    if (!text) {
        err_set(err, "%s: out of memory", tmp);
        goto fail;
    }
    // The manifest last: a directory with trainer_state.json holds everything else.
    snprintf(path, sizeof path, "%s/%s", tmp, STATE_NAME);
    if (write_text_file(path, text, err) < 0)
        goto fail;
    free(text);
    text = NULL;
    sync_path(tmp);
    struct stat sb;
    if (stat(final, &sb) == 0) {   // an older checkpoint of this step: move it aside first
        snprintf(old, sizeof old, "%s.old.XXXXXX", final);
        if (!mkdtemp(old) || rename(final, old) != 0) {
            err_set(err, "%s: cannot replace: %s", final, strerror(errno));
            if (old[0])
                rmdir(old);
            goto fail;
        }
    }
    if (rename(tmp, final) != 0) {
        err_set(err, "%s: cannot rename into place: %s", final, strerror(errno));
        goto fail;
    }
    sync_path(out_dir);
    if (old[0])
        remove_flat_dir(old);
    if (saved)
        snprintf(saved, cap, "%s", final);
    return 0;
fail:
    free(text);
    remove_flat_dir(tmp);
    return -1;
}

static int load_moment(const SafeTensors *st, const char *name, size_t n_params, float **out, Err *err)
{
    const SafeTensorEntry *e = safetensors_find(st, name);
    if (!e)
        return err_set(err, "%s: no tensor %s", st->path, name);
    const Tensor *t = &e->tensor;
    if (t->dtype != DTYPE_F32 || t->ndim != 1 || (uint64_t)t->shape[0] != n_params)
        return err_set(err, "%s: tensor %s: want F32 [%zu] (the model and LoRA options of this run), found %s with "
                       "%lld values", st->path, name, n_params, e->dtype_str, (long long)tensor_numel(t));
    *out = malloc((n_params ? n_params : 1) * sizeof **out);
    if (!*out)
        return err_set(err, "out of memory");
    tensor_to_f32(t, 0, (int64_t)n_params, *out);
    return 0;
}

static int parse_state(const char *path, json_t *j, CheckpointState *s, char **options, Err *err)
{
    memset(s, 0, sizeof *s);
    json_t *f = json_object_get(j, "format"), *version = json_object_get(j, "version");
    if (!json_is_string(f) || strcmp(json_string_value(f), FORMAT_NAME) != 0)
        return err_set(err, "%s: not a lora-train checkpoint (format is not \"%s\")", path, FORMAT_NAME);
    if (!json_is_integer(version) || json_integer_value(version) != CHECKPOINT_VERSION)
        return err_set(err, "%s: checkpoint version %lld (this lora-train reads version %d)", path,
                       json_is_integer(version) ? (long long)json_integer_value(version) : -1LL, CHECKPOINT_VERSION);
    json_t *step = json_object_get(j, "step"), *adam = json_object_get(j, "adam_step");
    json_t *rng = json_object_get(j, "rng"), *cursor = json_object_get(j, "cursor");
    json_t *opts = json_object_get(j, "options");
    if (!json_is_integer(step) || json_integer_value(step) < 0 || !json_is_integer(adam) ||
        json_integer_value(adam) < 0)
        return err_set(err, "%s: step and adam_step must be non-negative integers", path);
    s->step = (long)json_integer_value(step);
    s->adam_step = (long)json_integer_value(adam);
    if (!json_is_array(rng) || json_array_size(rng) != 4)
        return err_set(err, "%s: rng must be 4 values", path);
    for (int i = 0; i < 4; i++)
        if (u64_from_json(json_array_get(rng, i), &s->rng.s[i]) < 0)
            return err_set(err, "%s: rng[%d]: not a 64-bit value", path, i);
    if (u64_from_json(json_object_get(j, "tokens_seen"), &s->tokens_seen) < 0)
        return err_set(err, "%s: tokens_seen: not a 64-bit value", path);
    if (!json_is_object(cursor))
        return err_set(err, "%s: cursor missing", path);
    DatasetCursor *c = &s->cursor;
    json_t *rank = json_object_get(cursor, "rank"), *n_ranks = json_object_get(cursor, "n_ranks");
    json_t *shuffle = json_object_get(cursor, "shuffle");
    if (u64_from_json(json_object_get(cursor, "seed"), &c->seed) < 0 ||
        u64_from_json(json_object_get(cursor, "epoch"), &c->epoch) < 0 ||
        u64_from_json(json_object_get(cursor, "position"), &c->position) < 0 || !json_is_integer(rank) ||
        !json_is_integer(n_ranks) || !json_is_integer(shuffle) || json_integer_value(n_ranks) < 1 ||
        json_integer_value(rank) < 0 || json_integer_value(rank) >= json_integer_value(n_ranks))
        return err_set(err, "%s: cursor: want seed, epoch, position, rank < n_ranks, shuffle", path);
    c->rank = (uint32_t)json_integer_value(rank);
    c->n_ranks = (uint32_t)json_integer_value(n_ranks);
    c->shuffle = json_integer_value(shuffle) != 0;
    *options = json_dumps(json_is_object(opts) ? opts : json_object(), JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!*options)
        return err_set(err, "out of memory");
    return 0;
}

// The checkpoint's trainer_state.json, parsed; its path goes to path. NULL with a message.
static json_t *load_state_json(const char *dir, char *path, size_t path_cap, Err *err)
{
    snprintf(path, path_cap, "%s/%s", dir, STATE_NAME);
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    if (!j) {
        struct stat sb;
        if (stat(path, &sb) != 0)
            err_set(err, "%s: not a complete checkpoint (no %s): %s", dir, STATE_NAME, strerror(errno));
        else
            err_set(err, "%s:%d: %s", path, jerr.line, jerr.text);
    }
    return j;
}

int checkpoint_read_options(const char *dir, char **options_json, Err *err)
{
    char path[PATH_MAX + 64];
    *options_json = NULL;
    json_t *j = load_state_json(dir, path, sizeof path, err);
    if (!j)
        return -1;
    CheckpointState st;
    int rc = parse_state(path, j, &st, options_json, err);
    json_decref(j);
    return rc;
}

int checkpoint_load(const char *dir, Adapter **adapter, float **m, float **v, size_t n_params,
                    CheckpointState *state, char **options_json, Err *err)
{
    char path[PATH_MAX + 64];
    *adapter = NULL;
    *m = *v = NULL;
    *options_json = NULL;
    json_t *j = load_state_json(dir, path, sizeof path, err);
    if (!j)
        return -1;
    int rc = parse_state(path, j, state, options_json, err);
    json_t *np = json_object_get(j, "n_params");
    if (rc == 0 && (!json_is_integer(np) || (uint64_t)json_integer_value(np) != n_params))
        rc = err_set(err, "%s: %lld LoRA parameters, this run has %zu (use the same model, --rank and --targets)",
                     path, json_is_integer(np) ? (long long)json_integer_value(np) : -1LL, n_params);
    json_decref(j);
    if (rc < 0)
        goto fail;
    snprintf(path, sizeof path, "%s/%s", dir, OPTIMIZER_NAME);
    SafeTensors *st = safetensors_open(path, err);
    if (!st)
        goto fail;
    rc = load_moment(st, "exp_avg", n_params, m, err);
    if (rc == 0)
        rc = load_moment(st, "exp_avg_sq", n_params, v, err);
    safetensors_close(st);
    if (rc < 0)
        goto fail;
    *adapter = adapter_load(dir, err);
    if (!*adapter)
        goto fail;
    return 0;
fail:
    free(*m);
    free(*v);
    free(*options_json);
    *m = *v = NULL;
    *options_json = NULL;
    return -1;
}

int checkpoint_latest(const char *out_dir, char *buf, size_t cap, Err *err)
{
    DIR *d = opendir(out_dir);
    if (!d && errno == ENOENT)
        return 1;   // no directory yet: no checkpoint either
    if (!d)
        return err_set(err, "%s: %s", out_dir, strerror(errno));
    long best = -1;
    struct dirent *e;
    char path[2 * PATH_MAX];
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, "checkpoint-", 11) != 0)
            continue;
        char *end;
        errno = 0;
        long step = strtol(e->d_name + 11, &end, 10);
        if (end == e->d_name + 11 || *end || errno || step < 0 || step <= best)
            continue;
        struct stat sb;
        snprintf(path, sizeof path, "%s/%s/%s", out_dir, e->d_name, STATE_NAME);
        if (stat(path, &sb) == 0)
            best = step;
    }
    closedir(d);
    if (best < 0)
        return 1;
    checkpoint_name(buf, cap, out_dir, best);
    return 0;
}
