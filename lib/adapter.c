#include "adapter.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "atomic.h"
#include "safetensors.h"
#include "safetensors_write.h"

#define CONFIG_NAME "adapter_config.json"
#define WEIGHTS_NAME "adapter_model.safetensors"
#define PREFIX "base_model.model.model.layers."

static const struct {
    const char *short_name, *peft_name, *parent;
} modules[ADAPTER_NMODULES] = {
    [ADAPTER_Q] = {"q", "q_proj", "self_attn"},
    [ADAPTER_K] = {"k", "k_proj", "self_attn"},
    [ADAPTER_V] = {"v", "v_proj", "self_attn"},
    [ADAPTER_O] = {"o", "o_proj", "self_attn"},
    [ADAPTER_GATE] = {"gate", "gate_proj", "mlp"},
    [ADAPTER_UP] = {"up", "up_proj", "mlp"},
    [ADAPTER_DOWN] = {"down", "down_proj", "mlp"},
};

const char *adapter_module_short(AdapterModule m) { return modules[m].short_name; }
const char *adapter_module_peft(AdapterModule m) { return modules[m].peft_name; }
const char *adapter_module_parent(AdapterModule m) { return modules[m].parent; }

static int module_by_name(const char *s, size_t len)
{
    for (int m = 0; m < ADAPTER_NMODULES; m++) {
        if ((strlen(modules[m].short_name) == len && memcmp(s, modules[m].short_name, len) == 0) ||
            (strlen(modules[m].peft_name) == len && memcmp(s, modules[m].peft_name, len) == 0))
            return m;
    }
    return -1;
}

int adapter_modules_parse(const char *list, unsigned *mask, Err *err)
{
    unsigned got = 0;
    const char *p = list;
    while (*p) {
        size_t len = strcspn(p, ",");
        if (len == 3 && memcmp(p, "all", 3) == 0) {
            got |= (1u << ADAPTER_NMODULES) - 1;
        } else {
            int m = module_by_name(p, len);
            if (m < 0)
                return err_set(err, "unknown target module '%.*s' (want q, k, v, o, gate, up, down or all)",
                               (int)len, p);
            got |= 1u << m;
        }
        p += len;
        if (*p == ',')
            p++;
    }
    if (!got)
        return err_set(err, "empty list of target modules");
    *mask = got;
    return 0;
}

float adapter_scale(const AdapterConfig *cfg)
{
    return cfg->use_rslora ? (float)(cfg->alpha / sqrt((double)cfg->rank))
                           : (float)(cfg->alpha / cfg->rank);
}

static int check_layout(const AdapterConfig *cfg, int n_layers, const int in_dim[], const int out_dim[], Err *err)
{
    if (cfg->rank < 1)
        return err_set(err, "adapter rank %d (must be at least 1)", cfg->rank);
    if (!cfg->modules || cfg->modules >= 1u << ADAPTER_NMODULES)
        return err_set(err, "adapter targets no valid module");
    if (n_layers < 1)
        return err_set(err, "adapter with %d layers", n_layers);
    for (int m = 0; m < ADAPTER_NMODULES; m++)
        if ((cfg->modules >> m & 1) && (in_dim[m] < 1 || out_dim[m] < 1))
            return err_set(err, "module %s: dims %d -> %d", modules[m].peft_name, in_dim[m], out_dim[m]);
    return 0;
}

int adapter_view_init(Adapter *a, const AdapterConfig *cfg, int n_layers, const int in_dim[ADAPTER_NMODULES],
                      const int out_dim[ADAPTER_NMODULES], Err *err)
{
    memset(a, 0, sizeof *a);
    if (check_layout(cfg, n_layers, in_dim, out_dim, err) < 0)
        return -1;
    a->cfg = *cfg;
    a->n_layers = n_layers;
    for (int m = 0; m < ADAPTER_NMODULES; m++) {
        a->in_dim[m] = (cfg->modules >> m & 1) ? in_dim[m] : 0;
        a->out_dim[m] = (cfg->modules >> m & 1) ? out_dim[m] : 0;
    }
    size_t slots = (size_t)n_layers * ADAPTER_NMODULES;
    a->A = calloc(slots, sizeof *a->A);
    a->B = calloc(slots, sizeof *a->B);
    if (!a->A || !a->B) {
        adapter_view_release(a);
        return err_set(err, "out of memory");
    }
    return 0;
}

void adapter_view_release(Adapter *a)
{
    free(a->A);
    free(a->B);
    a->A = a->B = NULL;
}

Adapter *adapter_alloc(const AdapterConfig *cfg, int n_layers, const int in_dim[ADAPTER_NMODULES],
                       const int out_dim[ADAPTER_NMODULES], Err *err)
{
    Adapter *a = calloc(1, sizeof *a);
    if (!a) {
        err_set(err, "out of memory");
        return NULL;
    }
    if (adapter_view_init(a, cfg, n_layers, in_dim, out_dim, err) < 0) {
        free(a);
        return NULL;
    }
    size_t per_layer = 0;   // floats of one layer's A and B tensors
    for (int m = 0; m < ADAPTER_NMODULES; m++)
        per_layer += (size_t)cfg->rank * (a->in_dim[m] + a->out_dim[m]);
    float *p = calloc(per_layer * n_layers, sizeof *p);
    if (!p) {
        adapter_free(a);
        err_set(err, "out of memory for the adapter (%zu floats)", per_layer * n_layers);
        return NULL;
    }
    a->storage = p;
    for (int l = 0; l < n_layers; l++)
        for (int m = 0; m < ADAPTER_NMODULES; m++) {
            if (!(cfg->modules >> m & 1))
                continue;
            a->A[(size_t)l * ADAPTER_NMODULES + m] = p;
            p += (size_t)cfg->rank * a->in_dim[m];
            a->B[(size_t)l * ADAPTER_NMODULES + m] = p;
            p += (size_t)a->out_dim[m] * cfg->rank;
        }
    return a;
}

void adapter_free(Adapter *a)
{
    if (!a)
        return;
    free(a->storage);
    adapter_view_release(a);
    free(a);
}

int adapter_check_shapes(const Adapter *a, int n_layers, const int in_dim[ADAPTER_NMODULES],
                         const int out_dim[ADAPTER_NMODULES], Err *err)
{
    if (a->n_layers != n_layers)
        return err_set(err, "adapter has %d layers, the model %d", a->n_layers, n_layers);
    for (int m = 0; m < ADAPTER_NMODULES; m++) {
        if (!(a->cfg.modules >> m & 1))
            continue;
        if (a->in_dim[m] != in_dim[m])
            return err_set(err, "%s.lora_A: shape [%d, %d], the model's %s takes %d inputs", modules[m].peft_name,
                           a->cfg.rank, a->in_dim[m], modules[m].peft_name, in_dim[m]);
        if (a->out_dim[m] != out_dim[m])
            return err_set(err, "%s.lora_B: shape [%d, %d], the model's %s gives %d outputs", modules[m].peft_name,
                           a->out_dim[m], a->cfg.rank, modules[m].peft_name, out_dim[m]);
    }
    return 0;
}

// ---- writing -------------------------------------------------------------------------------

static char *join_path(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static void tensor_name(char *buf, size_t cap, int layer, int m, char which)
{
    snprintf(buf, cap, PREFIX "%d.%s.%s.lora_%c.weight", layer, modules[m].parent, modules[m].peft_name, which);
}

// The keys PEFT has written for a long time, sorted as save_pretrained sorts them; newer PEFT
// versions fill the ones they add with defaults, older ones would reject keys they do not know.
static json_t *config_json(const AdapterConfig *c)
{
    json_t *targets = json_array();
    for (int m = 0; m < ADAPTER_NMODULES; m++)
        if (c->modules >> m & 1)
            json_array_append_new(targets, json_string(modules[m].peft_name));
    json_t *j = json_object();
    json_object_set_new(j, "alpha_pattern", json_object());
    json_object_set_new(j, "auto_mapping", json_null());
    json_object_set_new(j, "base_model_name_or_path", c->base_model[0] ? json_string(c->base_model) : json_null());
    json_object_set_new(j, "bias", json_string("none"));
    json_object_set_new(j, "fan_in_fan_out", json_false());
    json_object_set_new(j, "inference_mode", json_true());
    json_object_set_new(j, "init_lora_weights", json_true());
    json_object_set_new(j, "layers_pattern", json_null());
    json_object_set_new(j, "layers_to_transform", json_null());
    json_object_set_new(j, "loftq_config", json_object());
    // Whole numbers stay integers, as PEFT users write them (lora_alpha=16).
    json_object_set_new(j, "lora_alpha", c->alpha == floor(c->alpha) && fabs(c->alpha) < 1e15
                                             ? json_integer((json_int_t)c->alpha) : json_real(c->alpha));
    json_object_set_new(j, "lora_dropout", json_real(c->dropout));
    json_object_set_new(j, "megatron_config", json_null());
    json_object_set_new(j, "megatron_core", json_string("megatron.core"));
    json_object_set_new(j, "modules_to_save", json_null());
    json_object_set_new(j, "peft_type", json_string("LORA"));
    json_object_set_new(j, "r", json_integer(c->rank));
    json_object_set_new(j, "rank_pattern", json_object());
    json_object_set_new(j, "revision", json_null());
    json_object_set_new(j, "target_modules", targets);
    json_object_set_new(j, "task_type", json_string("CAUSAL_LM"));
    json_object_set_new(j, "use_dora", json_false());
    json_object_set_new(j, "use_rslora", c->use_rslora ? json_true() : json_false());
    return j;
}

// Significant digits that give x back exactly (0.1 needs 1, not the 17 of %.17g).
static int round_trip_digits(double x)
{
    char buf[40];
    for (int digits = 1; digits < 17; digits++) {
        snprintf(buf, sizeof buf, "%.*g", digits, x);
        if (strtod(buf, NULL) == x)
            return digits;
    }
    return 17;
}

static int write_config(const AdapterConfig *c, const char *path, Err *err)
{
    json_t *j = config_json(c);
    int digits = round_trip_digits(c->alpha);
    if (round_trip_digits(c->dropout) > digits)
        digits = round_trip_digits(c->dropout);
    char *text = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(digits));
    json_decref(j);
    if (!text)
        return err_set(err, "%s: out of memory", path);
    AtomicFile af;
    if (atomic_open(&af, path, err) < 0) {
        free(text);
        return -1;
    }
    fputs(text, af.f);
    fputc('\n', af.f);
    free(text);
    return atomic_commit(&af, err);
}

int adapter_save(const Adapter *a, const char *dir, Err *err)
{
    if (mkdir(dir, 0777) != 0 && errno != EEXIST)
        return err_set(err, "%s: cannot create directory: %s", dir, strerror(errno));
    size_t n_tensors = 0;
    for (int m = 0; m < ADAPTER_NMODULES; m++)
        n_tensors += (a->cfg.modules >> m & 1) ? 2 * (size_t)a->n_layers : 0;
    StTensorOut *t = calloc(n_tensors ? n_tensors : 1, sizeof *t);
    char (*names)[160] = calloc(n_tensors ? n_tensors : 1, sizeof *names);
    char *weights = join_path(dir, WEIGHTS_NAME), *config = join_path(dir, CONFIG_NAME);
    int rc = -1;
    if (!t || !names || !weights || !config) {
        err_set(err, "out of memory");
        goto out;
    }
    // Readers look tensors up by name, so any order loads; ours is layers ascending, modules by
    // name within a layer (as Python's safetensors sorts them), fixed so the bytes are stable.
    static const int peft_order[ADAPTER_NMODULES] = {ADAPTER_DOWN, ADAPTER_GATE, ADAPTER_UP, ADAPTER_K,
                                                     ADAPTER_O, ADAPTER_Q, ADAPTER_V};
    size_t k = 0;
    for (int l = 0; l < a->n_layers; l++)
        for (int i = 0; i < ADAPTER_NMODULES; i++) {
            int m = peft_order[i];
            if (!(a->cfg.modules >> m & 1))
                continue;
            for (int which = 0; which < 2; which++) {
                float *data = which ? adapter_B(a, l, m) : adapter_A(a, l, m);
                if (!data) {
                    err_set(err, "adapter layer %d %s: no lora_%c tensor", l, modules[m].peft_name, "AB"[which]);
                    goto out;
                }
                tensor_name(names[k], sizeof names[k], l, m, "AB"[which]);
                t[k].name = names[k];
                t[k].dtype = "F32";
                t[k].ndim = 2;
                t[k].shape[0] = which ? a->out_dim[m] : a->cfg.rank;
                t[k].shape[1] = which ? a->cfg.rank : a->in_dim[m];
                t[k].data = data;
                t[k].nbytes = (size_t)t[k].shape[0] * t[k].shape[1] * sizeof(float);
                k++;
            }
        }
    static const char *const meta[] = {"format", "pt"};
    if (safetensors_write_file(weights, t, k, meta, 1, err) < 0)
        goto out;
    rc = write_config(&a->cfg, config, err);
out:
    free(t);
    free(names);
    free(weights);
    free(config);
    return rc;
}

// ---- reading -------------------------------------------------------------------------------

// A config field that must be absent, null, false, empty or equal to `allowed` (a string).
static int refuse_unless_default(json_t *cfg, const char *key, const char *allowed, const char *path, Err *err)
{
    json_t *v = json_object_get(cfg, key);
    if (!v || json_is_null(v) || json_is_false(v))
        return 0;
    if ((json_is_object(v) && json_object_size(v) == 0) || (json_is_array(v) && json_array_size(v) == 0))
        return 0;
    if (allowed && json_is_string(v) && strcmp(json_string_value(v), allowed) == 0)
        return 0;
    char *text = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
    if (allowed)
        err_set(err, "%s: %s = %.200s is not supported (only \"%s\")", path, key, text ? text : "?", allowed);
    else
        err_set(err, "%s: %s = %.200s is not supported", path, key, text ? text : "?");
    free(text);
    return -1;
}

static int parse_config(const char *path, AdapterConfig *c, Err *err)
{
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    if (!j) {
        if (errno == ENOENT || strstr(jerr.text, "unable to open"))
            return err_set(err, "%s: %s", path, jerr.text);
        return err_set(err, "%s:%d: %s", path, jerr.line, jerr.text);
    }
    int rc = -1;
    memset(c, 0, sizeof *c);
    json_t *v;
    if (!json_is_object(j)) {
        err_set(err, "%s: not a JSON object", path);
        goto out;
    }
    v = json_object_get(j, "peft_type");
    if (!json_is_string(v) || strcmp(json_string_value(v), "LORA") != 0) {
        err_set(err, "%s: peft_type is %s, not \"LORA\"", path, json_is_string(v) ? json_string_value(v) : "missing");
        goto out;
    }
    v = json_object_get(j, "r");
    if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > 1 << 16) {
        err_set(err, "%s: r must be a positive integer", path);
        goto out;
    }
    c->rank = (int)json_integer_value(v);
    v = json_object_get(j, "lora_alpha");
    if (!json_is_number(v)) {
        err_set(err, "%s: lora_alpha must be a number", path);
        goto out;
    }
    c->alpha = json_number_value(v);
    v = json_object_get(j, "lora_dropout");
    c->dropout = json_is_number(v) ? json_number_value(v) : 0.0;
    v = json_object_get(j, "use_rslora");
    c->use_rslora = json_is_true(v);
    v = json_object_get(j, "base_model_name_or_path");
    if (json_is_string(v))
        snprintf(c->base_model, sizeof c->base_model, "%s", json_string_value(v));
    static const char *const must_be_default[] = {
        "use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform",
        "trainable_token_indices", "target_parameters", "alora_invocation_tokens", "lora_bias",
        "fan_in_fan_out", "layer_replication", "use_qalora", "use_bdlora",
    };
    for (size_t i = 0; i < sizeof must_be_default / sizeof must_be_default[0]; i++)
        if (refuse_unless_default(j, must_be_default[i], NULL, path, err) < 0)
            goto out;
    if (refuse_unless_default(j, "bias", "none", path, err) < 0)
        goto out;
    rc = 0;
out:
    json_decref(j);
    return rc;
}

// "base_model.model.model.layers.{i}.{parent}.{module}.lora_{A,B}.weight" -> layer, module,
// which (0 A, 1 B); -1 for any other name.
static int parse_tensor_name(const char *name, int *layer, int *module, int *which)
{
    size_t plen = strlen(PREFIX);
    if (strncmp(name, PREFIX, plen) != 0)
        return -1;
    const char *p = name + plen;
    char *end;
    errno = 0;
    long l = strtol(p, &end, 10);
    if (end == p || *end != '.' || l < 0 || l > 100000 || errno)
        return -1;
    p = end + 1;
    for (int m = 0; m < ADAPTER_NMODULES; m++) {
        char want[96];
        for (int w = 0; w < 2; w++) {
            snprintf(want, sizeof want, "%s.%s.lora_%c.weight", modules[m].parent, modules[m].peft_name, "AB"[w]);
            if (strcmp(p, want) == 0) {
                *layer = (int)l;
                *module = m;
                *which = w;
                return 0;
            }
        }
    }
    return -1;
}

Adapter *adapter_load(const char *path, Err *err)
{
    char *dir = strdup(path);
    if (!dir) {
        err_set(err, "out of memory");
        return NULL;
    }
    size_t n = strlen(dir), cn = strlen(CONFIG_NAME);
    if (n >= cn && strcmp(dir + n - cn, CONFIG_NAME) == 0 && (n == cn || dir[n - cn - 1] == '/'))
        dir[n == cn ? 0 : n - cn - 1] = 0;
    if (!*dir) {
        free(dir);
        dir = strdup(".");
    }
    char *config = join_path(dir, CONFIG_NAME), *weights = join_path(dir, WEIGHTS_NAME);
    SafeTensors *st = NULL;
    Adapter *a = NULL;
    const SafeTensorEntry **slot = NULL;   // [layer * NMODULES + module][which]
    AdapterConfig cfg;
    struct stat sb;
    if (!config || !weights) {
        err_set(err, "out of memory");
        goto fail;
    }
    if (stat(dir, &sb) != 0) {
        err_set(err, "%s: %s", dir, strerror(errno));
        goto fail;
    }
    if (!S_ISDIR(sb.st_mode)) {
        err_set(err, "%s: not an adapter directory (want a directory holding %s and %s)", dir, CONFIG_NAME, WEIGHTS_NAME);
        goto fail;
    }
    if (parse_config(config, &cfg, err) < 0)
        goto fail;
    if (stat(weights, &sb) != 0) {
        char *bin = join_path(dir, "adapter_model.bin");
        int has_bin = bin && stat(bin, &sb) == 0;
        free(bin);
        if (has_bin)
            err_set(err, "%s: missing; adapter_model.bin (a pickle) is not read: save the adapter with "
                    "safe_serialization=True", weights);
        else
            err_set(err, "%s: %s", weights, strerror(errno));
        goto fail;
    }
    st = safetensors_open(weights, err);
    if (!st)
        goto fail;
    // First pass: every name must be one of ours; find the layer count and the modules.
    int n_layers = 0;
    unsigned mask = 0;
    for (int i = 0; i < st->n_tensors; i++) {
        int l, m, w;
        if (parse_tensor_name(st->tensors[i].name, &l, &m, &w) < 0) {
            err_set(err, "%s: tensor %s: not a LoRA weight of a Llama attention or MLP projection", weights,
                    st->tensors[i].name);
            goto fail;
        }
        if (l + 1 > n_layers)
            n_layers = l + 1;
        mask |= 1u << m;
    }
    if (!mask) {
        err_set(err, "%s: no LoRA tensors", weights);
        goto fail;
    }
    cfg.modules = mask;
    slot = calloc((size_t)n_layers * ADAPTER_NMODULES * 2, sizeof *slot);
    if (!slot) {
        err_set(err, "out of memory");
        goto fail;
    }
    int in_dim[ADAPTER_NMODULES] = {0}, out_dim[ADAPTER_NMODULES] = {0};
    for (int i = 0; i < st->n_tensors; i++) {
        const SafeTensorEntry *e = &st->tensors[i];
        int l, m, w;
        parse_tensor_name(e->name, &l, &m, &w);
        const Tensor *t = &e->tensor;
        if (t->dtype == DTYPE_OTHER) {
            err_set(err, "%s: tensor %s: dtype %s (want F32, F16 or BF16)", weights, e->name, e->dtype_str);
            goto fail;
        }
        if (t->ndim != 2 || t->shape[w ? 1 : 0] != cfg.rank || t->shape[w ? 0 : 1] < 1 ||
            t->shape[w ? 0 : 1] > INT32_MAX) {
            err_set(err, "%s: tensor %s: shape %s, want %s with r = %d", weights, e->name,
                    t->ndim == 2 ? "[rows, cols]" : "not 2-D", w ? "[out, r]" : "[r, in]", cfg.rank);
            goto fail;
        }
        int dim = (int)t->shape[w ? 0 : 1];
        int *want = w ? &out_dim[m] : &in_dim[m];
        if (*want && *want != dim) {
            err_set(err, "%s: tensor %s: %d %s features, other layers have %d", weights, e->name, dim,
                    w ? "output" : "input", *want);
            goto fail;
        }
        *want = dim;
        slot[((size_t)l * ADAPTER_NMODULES + m) * 2 + w] = e;
    }
    for (int l = 0; l < n_layers; l++)
        for (int m = 0; m < ADAPTER_NMODULES; m++)
            for (int w = 0; w < 2 && (mask >> m & 1); w++)
                if (!slot[((size_t)l * ADAPTER_NMODULES + m) * 2 + w]) {
                    char name[160];
                    tensor_name(name, sizeof name, l, m, "AB"[w]);
                    err_set(err, "%s: tensor %s is missing (every layer must adapt the same modules)", weights, name);
                    goto fail;
                }
    a = adapter_alloc(&cfg, n_layers, in_dim, out_dim, err);
    if (!a)
        goto fail;
    for (int l = 0; l < n_layers; l++)
        for (int m = 0; m < ADAPTER_NMODULES; m++)
            for (int w = 0; w < 2 && (mask >> m & 1); w++) {
                const Tensor *t = &slot[((size_t)l * ADAPTER_NMODULES + m) * 2 + w]->tensor;
                tensor_to_f32(t, 0, tensor_numel(t), w ? adapter_B(a, l, m) : adapter_A(a, l, m));
            }
    safetensors_close(st);
    free(slot);
    free(config);
    free(weights);
    free(dir);
    return a;
fail:
    adapter_free(a);
    if (st)
        safetensors_close(st);
    free(slot);
    free(config);
    free(weights);
    free(dir);
    return NULL;
}
