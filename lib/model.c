#include "model.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const proj_names[PROJ_COUNT] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                   "gate_proj", "up_proj", "down_proj"};
static const char *const proj_paths[PROJ_COUNT] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};

const char *proj_name(Proj p) { return proj_names[p]; }
const char *proj_module_path(Proj p) { return proj_paths[p]; }

void model_proj_dims(const ModelConfig *c, Proj p, int *in, int *out)
{
    int q = c->n_heads * c->head_dim, kv = c->n_kv_heads * c->head_dim;
    switch (p) {
    case PROJ_Q: *in = c->dim; *out = q; break;
    case PROJ_K: case PROJ_V: *in = c->dim; *out = kv; break;
    case PROJ_O: *in = q; *out = c->dim; break;
    case PROJ_GATE: case PROJ_UP: *in = c->dim; *out = c->hidden_dim; break;
    default: *in = c->hidden_dim; *out = c->dim; break;
    }
}

// ---- config.json -------------------------------------------------------------------------

// An integer field: absent or null gives def (or an error when required).
static int get_int(json_t *o, const char *key, int def, int required, int *out, const char *name, Err *err)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        if (required)
            return err_set(err, "%s: missing \"%s\"", name, key);
        *out = def;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > (1 << 30))
        return err_set(err, "%s: \"%s\" must be a non-negative integer", name, key);
    *out = (int)json_integer_value(v);
    return 0;
}

static int get_num(json_t *o, const char *key, double def, double *out, const char *name, Err *err)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return 0;
    }
    if (!json_is_number(v))
        return err_set(err, "%s: \"%s\" must be a number", name, key);
    *out = json_number_value(v);
    return 0;
}

// Append the ids of an eos_token_id value (int, list of ints or null), skipping duplicates.
static int add_eos(ModelConfig *c, json_t *v, const char *name, Err *err)
{
    if (!v || json_is_null(v))
        return 0;
    size_t n = json_is_array(v) ? json_array_size(v) : 1;
    for (size_t i = 0; i < n; i++) {
        json_t *x = json_is_array(v) ? json_array_get(v, i) : v;
        if (!json_is_integer(x) || json_integer_value(x) < 0)
            return err_set(err, "%s: \"eos_token_id\" must be an integer or a list of integers", name);
        int64_t id = json_integer_value(x);
        int seen = 0;
        for (int k = 0; k < c->n_eos; k++)
            seen |= c->eos_ids[k] == id;
        if (seen)
            continue;
        if (c->n_eos == MODEL_MAX_EOS)
            return err_set(err, "%s: more than %d EOS ids", name, MODEL_MAX_EOS);
        c->eos_ids[c->n_eos++] = id;
    }
    return 0;
}

// rope_scaling (older spelling, may be null) or rope_parameters (transformers >= 5, may also
// hold rope_theta). Only default, linear and llama3 are computed the same way as transformers.
static int parse_rope(json_t *root, ModelConfig *c, const char *name, Err *err)
{
    double theta = 0;
    if (get_num(root, "rope_theta", 10000.0, &theta, name, err) < 0)
        return -1;
    c->rope_type = ROPE_DEFAULT;
    c->rope_factor = 1;
    const char *field = "rope_parameters";
    json_t *r = json_object_get(root, field);
    if (!r || json_is_null(r)) {
        field = "rope_scaling";
        r = json_object_get(root, field);
    }
    if (r && !json_is_null(r)) {
        if (!json_is_object(r))
            return err_set(err, "%s: \"%s\" must be an object or null", name, field);
        if (get_num(r, "rope_theta", theta, &theta, name, err) < 0)
            return -1;
        json_t *t = json_object_get(r, "rope_type");
        if (!t)
            t = json_object_get(r, "type");
        const char *type = json_is_string(t) ? json_string_value(t) : "default";
        double prf = 1;
        if (get_num(r, "partial_rotary_factor", 1.0, &prf, name, err) < 0)
            return -1;
        if (prf != 1.0)
            return err_set(err, "%s: \"%s.partial_rotary_factor\" %g is not supported (only 1)", name, field, prf);
        double factor = 0, lo = 0, hi = 0;
        int orig = 0;
        if (!strcmp(type, "default")) {
            c->rope_type = ROPE_DEFAULT;
        } else if (!strcmp(type, "linear")) {
            c->rope_type = ROPE_LINEAR;
            if (get_num(r, "factor", 0, &factor, name, err) < 0)
                return -1;
            if (!(factor >= 1))
                return err_set(err, "%s: \"%s.factor\" must be a number >= 1", name, field);
            c->rope_factor = (float)factor;
        } else if (!strcmp(type, "llama3")) {
            c->rope_type = ROPE_LLAMA3;
            if (get_num(r, "factor", 0, &factor, name, err) < 0 ||
                get_num(r, "low_freq_factor", 0, &lo, name, err) < 0 ||
                get_num(r, "high_freq_factor", 0, &hi, name, err) < 0 ||
                get_int(r, "original_max_position_embeddings", c->max_seq_len, 0, &orig, name, err) < 0)
                return -1;
            if (!(factor > 0) || !(lo > 0) || !(hi > lo) || orig <= 0)
                return err_set(err, "%s: \"%s\" of type llama3 needs factor > 0, 0 < low_freq_factor < "
                               "high_freq_factor and original_max_position_embeddings > 0", name, field);
            c->rope_factor = (float)factor;
            c->rope_low_freq_factor = (float)lo;
            c->rope_high_freq_factor = (float)hi;
            c->rope_original_max_pos = orig;
        } else {
            return err_set(err, "%s: \"%s.rope_type\" \"%s\" is not supported (default, linear, llama3)",
                           name, field, type);
        }
    }
    if (!(theta > 0))
        return err_set(err, "%s: \"rope_theta\" must be positive", name);
    c->rope_theta = (float)theta;
    return 0;
}

static int parse_config(json_t *root, json_t *gen, const char *name, ModelConfig *c, Err *err)
{
    memset(c, 0, sizeof *c);
    if (!json_is_object(root))
        return err_set(err, "%s: not a JSON object", name);
    json_t *mt = json_object_get(root, "model_type");
    if (!json_is_string(mt))
        return err_set(err, "%s: missing \"model_type\" (llama or mistral)", name);
    const char *type = json_string_value(mt);
    if (strcmp(type, "llama") && strcmp(type, "mistral"))
        return err_set(err, "%s: \"model_type\" \"%s\" is not supported (llama, mistral)", name, type);
    snprintf(c->model_type, sizeof c->model_type, "%s", type);
    // Fields whose other values change the computation in ways we do not implement.
    json_t *v = json_object_get(root, "quantization_config");
    if (v && !json_is_null(v))
        return err_set(err, "%s: \"quantization_config\" (a pre-quantized checkpoint) is not supported yet", name);
    v = json_object_get(root, "hidden_act");
    if (v && !(json_is_string(v) && !strcmp(json_string_value(v), "silu")))
        return err_set(err, "%s: \"hidden_act\" %s is not supported (only \"silu\")", name,
                       json_is_string(v) ? json_string_value(v) : "(not a string)");
    static const char *const no_bias[] = {"attention_bias", "mlp_bias"};
    for (int i = 0; i < 2; i++) {
        v = json_object_get(root, no_bias[i]);
        if (v && !json_is_null(v) && !json_is_false(v))
            return err_set(err, "%s: \"%s\" true is not supported (no biases)", name, no_bias[i]);
    }
    if (get_int(root, "hidden_size", 0, 1, &c->dim, name, err) < 0 ||
        get_int(root, "intermediate_size", 0, 1, &c->hidden_dim, name, err) < 0 ||
        get_int(root, "num_hidden_layers", 0, 1, &c->n_layers, name, err) < 0 ||
        get_int(root, "num_attention_heads", 0, 1, &c->n_heads, name, err) < 0 ||
        get_int(root, "num_key_value_heads", c->n_heads, 0, &c->n_kv_heads, name, err) < 0 ||
        get_int(root, "vocab_size", 0, 1, &c->vocab_size, name, err) < 0 ||
        get_int(root, "max_position_embeddings", 2048, 0, &c->max_seq_len, name, err) < 0)
        return -1;
    if (c->dim <= 0 || c->hidden_dim <= 0 || c->n_layers <= 0 || c->n_heads <= 0 ||
        c->n_kv_heads <= 0 || c->vocab_size <= 0)
        return err_set(err, "%s: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, "
                       "num_key_value_heads and vocab_size must be positive", name);
    if (c->n_heads % c->n_kv_heads)
        return err_set(err, "%s: \"num_attention_heads\" %d is not a multiple of \"num_key_value_heads\" %d",
                       name, c->n_heads, c->n_kv_heads);
    if (get_int(root, "head_dim", c->dim / c->n_heads, 0, &c->head_dim, name, err) < 0)
        return -1;
    if (c->head_dim <= 0 || c->head_dim % 2)
        return err_set(err, "%s: \"head_dim\" %d must be positive and even", name, c->head_dim);
    // Products of these index buffers as int; refuse sizes no model has rather than overflow.
    if ((int64_t)c->n_heads * c->head_dim > (1 << 24) || c->dim > (1 << 24) || c->hidden_dim > (1 << 24) ||
        c->n_layers > 4096 || c->vocab_size > (1 << 24))
        return err_set(err, "%s: dimensions too large (hidden_size, intermediate_size, heads * head_dim "
                       "and vocab_size at most 2^24, layers at most 4096)", name);
    double prf = 1;
    if (get_num(root, "partial_rotary_factor", 1.0, &prf, name, err) < 0)
        return -1;
    if (prf != 1.0)
        return err_set(err, "%s: \"partial_rotary_factor\" %g is not supported (only 1)", name, prf);
    double eps = 0;
    if (get_num(root, "rms_norm_eps", 1e-6, &eps, name, err) < 0)
        return -1;
    if (!(eps > 0))
        return err_set(err, "%s: \"rms_norm_eps\" must be positive", name);
    c->norm_eps = (float)eps;
    if (parse_rope(root, c, name, err) < 0)
        return -1;
    c->sliding_window = 0;
    if (!strcmp(type, "mistral") && get_int(root, "sliding_window", 0, 0, &c->sliding_window, name, err) < 0)
        return -1;
    v = json_object_get(root, "tie_word_embeddings");
    if (v && !json_is_boolean(v))
        return err_set(err, "%s: \"tie_word_embeddings\" must be true or false", name);
    c->tie_embeddings = v && json_is_true(v);
    c->bos_id = -1;
    v = json_object_get(root, "bos_token_id");
    if (v && !json_is_null(v)) {
        if (!json_is_integer(v) || json_integer_value(v) < 0)
            return err_set(err, "%s: \"bos_token_id\" must be an integer", name);
        c->bos_id = json_integer_value(v);
    }
    if (add_eos(c, json_object_get(root, "eos_token_id"), name, err) < 0)
        return -1;
    if (gen && add_eos(c, json_object_get(gen, "eos_token_id"), "generation_config.json", err) < 0)
        return -1;
    for (int i = 0; i < c->n_eos; i++)
        if (c->eos_ids[i] >= c->vocab_size)
            return err_set(err, "%s: EOS id %lld is not below vocab_size %d", name,
                           (long long)c->eos_ids[i], c->vocab_size);
    return 0;
}

int model_config_parse(const char *config_json, const char *generation_json, const char *name,
                       ModelConfig *c, Err *err)
{
    json_error_t je;
    json_t *root = json_loads(config_json, 0, &je), *gen = NULL;
    if (!root)
        return err_set(err, "%s:%d: invalid JSON: %s", name, je.line, je.text);
    if (generation_json && !(gen = json_loads(generation_json, 0, &je))) {
        json_decref(root);
        return err_set(err, "generation_config.json:%d: invalid JSON: %s", je.line, je.text);
    }
    int rc = parse_config(root, gen, name, c, err);
    json_decref(root);
    json_decref(gen);
    return rc;
}

// Whole file as a NUL-terminated string; NULL (errno kept) when it cannot be read.
static char *read_text(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = NULL;
    size_t len = 0, cap = 0, n;
    do {
        if (len + 4096 + 1 > cap) {
            cap = cap ? cap * 2 : 8192;
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                errno = ENOMEM;
                return NULL;
            }
            buf = nb;
        }
        n = fread(buf + len, 1, 4096, f);
        len += n;
    } while (n > 0);
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        errno = EIO;
        return NULL;
    }
    buf[len] = 0;
    return buf;
}

static char *join(const char *dir, const char *file)
{
    size_t n = strlen(dir) + strlen(file) + 2;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", dir, file);
    return p;
}

int model_config_load(const char *dir, ModelConfig *c, Err *err)
{
    char *cpath = join(dir, "config.json"), *gpath = join(dir, "generation_config.json");
    char *ctext = cpath ? read_text(cpath) : NULL;
    int rc = -1;
    if (!ctext) {
        err_set(err, "%s: cannot read: %s", cpath ? cpath : dir, strerror(errno));
    } else {
        char *gtext = gpath ? read_text(gpath) : NULL;   // optional
        rc = model_config_parse(ctext, gtext, cpath, c, err);
        free(gtext);
    }
    free(ctext);
    free(cpath);
    free(gpath);
    return rc;
}

// ---- weights -------------------------------------------------------------------------------

void model_free(Model *m)
{
    if (!m)
        return;
    for (int i = 0; i < m->n_files; i++)
        safetensors_close(m->files[i]);
    free(m->files);
    free(m->weights.layers);
    free(m->dir);
    free(m);
}

// Where each tensor lives: with an index, the file the weight_map names; else the one file.
typedef struct {
    json_t *weight_map;      // borrowed from the index JSON, or NULL (single file)
    char **file_names;       // (n_files) as named in the index
} Placement;

static SafeTensors *file_of(Model *m, const Placement *pl, const char *tensor, Err *err)
{
    if (!pl->weight_map)
        return m->files[0];
    json_t *f = json_object_get(pl->weight_map, tensor);
    if (!json_is_string(f)) {
        err_set(err, "%s/model.safetensors.index.json: no file for tensor '%s'", m->dir, tensor);
        return NULL;
    }
    for (int i = 0; i < m->n_files; i++)
        if (!strcmp(pl->file_names[i], json_string_value(f)))
            return m->files[i];
    return NULL;   // not reached: every weight_map file was opened
}

// Bind one weight: present, F32/F16/BF16, shape (d0) or (d0, d1). Marks it used.
static int bind(Model *m, const Placement *pl, unsigned char **used, const char *tensor,
                int ndim, int64_t d0, int64_t d1, Tensor *out, Err *err)
{
    SafeTensors *st = file_of(m, pl, tensor, err);
    if (!st)
        return -1;
    const SafeTensorEntry *e = safetensors_find(st, tensor);
    if (!e)
        return err_set(err, "%s: missing tensor '%s'", st->path, tensor);
    if (e->tensor.dtype == DTYPE_OTHER)
        return err_set(err, "%s: tensor '%s': dtype %s is not supported (F32, F16, BF16)", st->path,
                       tensor, e->dtype_str);
    int64_t want[2] = {d0, d1};
    int ok = e->tensor.ndim == ndim;
    for (int i = 0; ok && i < ndim; i++)
        ok = e->tensor.shape[i] == want[i];
    if (!ok) {
        char got[96] = "", w[64];
        for (int i = 0; i < e->tensor.ndim; i++)
            snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", i ? ", " : "",
                     (long long)e->tensor.shape[i]);
        if (ndim == 1)
            snprintf(w, sizeof w, "%lld", (long long)d0);
        else
            snprintf(w, sizeof w, "%lld, %lld", (long long)d0, (long long)d1);
        return err_set(err, "%s: tensor '%s' has shape [%s], config.json says [%s]", st->path, tensor, got, w);
    }
    *out = e->tensor;
    for (int i = 0; i < m->n_files; i++)
        if (m->files[i] == st)
            used[i][e - st->tensors] = 1;
    return 0;
}

static int open_files(Model *m, Placement *pl, json_t **index_root, Err *err)
{
    char *ipath = join(m->dir, "model.safetensors.index.json");
    char *itext = ipath ? read_text(ipath) : NULL;
    if (!itext) {   // a single file
        free(ipath);
        char *p = join(m->dir, "model.safetensors");
        m->files = calloc(1, sizeof *m->files);
        if (!p || !m->files) {
            free(p);
            return err_set(err, "out of memory");
        }
        m->files[0] = safetensors_open(p, err);
        free(p);
        if (!m->files[0])
            return -1;
        m->n_files = 1;
        return 0;
    }
    json_error_t je;
    json_t *root = *index_root = json_loads(itext, 0, &je);
    free(itext);
    if (!root) {
        err_set(err, "%s:%d: invalid JSON: %s", ipath, je.line, je.text);
        free(ipath);
        return -1;
    }
    pl->weight_map = json_object_get(root, "weight_map");
    if (!json_is_object(pl->weight_map)) {
        err_set(err, "%s: missing \"weight_map\" object", ipath);
        free(ipath);
        return -1;
    }
    size_t cap = json_object_size(pl->weight_map);
    m->files = calloc(cap + 1, sizeof *m->files);
    pl->file_names = calloc(cap + 1, sizeof *pl->file_names);
    if (!m->files || !pl->file_names) {
        free(ipath);
        return err_set(err, "out of memory");
    }
    const char *key;
    json_t *v;
    json_object_foreach(pl->weight_map, key, v) {
        if (!json_is_string(v) || strchr(json_string_value(v), '/') || !strcmp(json_string_value(v), "..")) {
            err_set(err, "%s: tensor '%s': file must be a plain file name", ipath, key);
            free(ipath);
            return -1;
        }
        const char *f = json_string_value(v);
        int seen = 0;
        for (int i = 0; i < m->n_files && !seen; i++)
            seen = !strcmp(pl->file_names[i], f);
        if (seen)
            continue;
        char *p = join(m->dir, f);
        pl->file_names[m->n_files] = (char *)f;
        m->files[m->n_files] = p ? safetensors_open(p, err) : NULL;
        free(p);
        if (!m->files[m->n_files]) {
            free(ipath);
            return -1;
        }
        m->n_files++;
    }
    free(ipath);
    return 0;
}

Model *model_load(const char *dir, Err *err)
{
    Model *m = calloc(1, sizeof *m);
    Placement pl = {0};
    json_t *index_root = NULL;
    unsigned char **used = NULL;
    char name[256];
    int ok = 1;
    if (!m || !(m->dir = strdup(dir))) {
        err_set(err, "out of memory");
        goto fail;
    }
    if (model_config_load(dir, &m->config, err) < 0 || open_files(m, &pl, &index_root, err) < 0)
        goto fail;
    const ModelConfig *c = &m->config;
    used = calloc(m->n_files, sizeof *used);
    if (!used)
        goto oom;
    for (int i = 0; i < m->n_files; i++)
        if (!(used[i] = calloc(m->files[i]->n_tensors + 1, 1)))
            goto oom;
    if (!(m->weights.layers = calloc(c->n_layers, sizeof *m->weights.layers)))
        goto oom;
    ModelWeights *w = &m->weights;
    if (bind(m, &pl, used, "model.embed_tokens.weight", 2, c->vocab_size, c->dim, &w->embed, err) < 0 ||
        bind(m, &pl, used, "model.norm.weight", 1, c->dim, 0, &w->final_norm, err) < 0)
        goto fail;
    for (int l = 0; l < c->n_layers; l++) {
        LayerWeights *L = &w->layers[l];
        snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", l);
        if (bind(m, &pl, used, name, 1, c->dim, 0, &L->attn_norm, err) < 0)
            goto fail;
        snprintf(name, sizeof name, "model.layers.%d.post_attention_layernorm.weight", l);
        if (bind(m, &pl, used, name, 1, c->dim, 0, &L->ffn_norm, err) < 0)
            goto fail;
        for (int p = 0; p < PROJ_COUNT; p++) {
            int in, out;
            model_proj_dims(c, p, &in, &out);
            snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, proj_paths[p]);
            if (bind(m, &pl, used, name, 2, out, in, &L->proj[p], err) < 0)
                goto fail;
        }
    }
    if (c->tie_embeddings) {
        w->lm_head = w->embed;
        // Some tied checkpoints also store lm_head.weight; it is the same matrix, unused.
        for (int i = 0; i < m->n_files; i++) {
            const SafeTensorEntry *e = safetensors_find(m->files[i], "lm_head.weight");
            if (e)
                used[i][e - m->files[i]->tensors] = 1;
        }
    } else if (bind(m, &pl, used, "lm_head.weight", 2, c->vocab_size, c->dim, &w->lm_head, err) < 0) {
        goto fail;
    }
    // Anything left over is a tensor we would silently ignore: refuse it (old checkpoints'
    // rotary_emb.inv_freq buffers excepted, transformers recomputes those too).
    for (int i = 0; i < m->n_files; i++)
        for (int t = 0; t < m->files[i]->n_tensors; t++)
            if (!used[i][t] && !strstr(m->files[i]->tensors[t].name, "rotary_emb.inv_freq")) {
                err_set(err, "%s: unexpected tensor '%s' (not part of a %s model)", m->files[i]->path,
                        m->files[i]->tensors[t].name, c->model_type);
                goto fail;
            }
    goto done;
oom:
    err_set(err, "out of memory");
fail:
    ok = 0;
done:
    if (used)
        for (int i = 0; i < m->n_files; i++)
            free(used[i]);
    free(used);
    free(pl.file_names);
    json_decref(index_root);
    if (!ok) {
        model_free(m);
        m = NULL;
    }
    return m;
}

// ---- RoPE ----------------------------------------------------------------------------------

void rope_inv_freq(const ModelConfig *c, float *inv_freq)
{
    int half = c->head_dim / 2;
    for (int i = 0; i < half; i++) {
        // float32 as transformers: 1 / theta ** (arange(0, d, 2).float() / d)
        float e = (float)(2 * i) / (float)c->head_dim;
        float f = 1.0f / (float)pow((double)c->rope_theta, (double)e);
        if (c->rope_type == ROPE_LINEAR) {
            f = f / c->rope_factor;
        } else if (c->rope_type == ROPE_LLAMA3) {
            float factor = c->rope_factor, lo = c->rope_low_freq_factor, hi = c->rope_high_freq_factor;
            float old_len = (float)c->rope_original_max_pos;
            float low_freq_wavelen = old_len / lo, high_freq_wavelen = old_len / hi;
            float wavelen = (float)(2 * M_PI) / f;
            float scaled = wavelen > low_freq_wavelen ? f / factor : f;
            if (!(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen)) {
                float smooth = (old_len / wavelen - lo) / (hi - lo);
                scaled = (1 - smooth) * scaled / factor + smooth * scaled;
            }
            f = scaled;
        }
        inv_freq[i] = f;
    }
}
