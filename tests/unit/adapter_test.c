// PEFT adapter directories (lib/adapter.c), the safetensors writer (lib/safetensors_write.c)
// and training checkpoints (lib/checkpoint.c): bytes laid out as the formats say, save -> load
// round trips bit for bit, and one case per thing the readers refuse, each checking the message.
// (That PEFT itself loads what we write is tests/peft/check_adapter.py, run by tests/lora-train.t.)
#include "adapter.h"
#include "checkpoint.h"
#include "safetensors.h"
#include "safetensors_write.h"
#include "tap.h"

#include <jansson.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

static char tmpdir[] = "/tmp/adapter_test.XXXXXX";

static char *path_in(const char *name)
{
    static char buf[8][512];
    static int next;
    char *p = buf[next++ % 8];
    snprintf(p, sizeof buf[0], "%s/%s", tmpdir, name);
    return p;
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

static unsigned char *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc(*len + 1);
    if (fread(b, 1, *len, f) != *len)
        *len = 0;
    fclose(f);
    b[*len] = 0;
    return b;
}

// Dims of a small GQA model: dim 8, 4 heads of 2 (q, o: 8), 2 kv heads (k, v: 4), MLP 12.
static const int in_dim[ADAPTER_NMODULES] = {8, 8, 8, 8, 8, 8, 12};
static const int out_dim[ADAPTER_NMODULES] = {8, 4, 4, 8, 12, 12, 8};

static Adapter *sample_adapter(unsigned modules, int use_rslora)
{
    AdapterConfig cfg = {.rank = 2, .alpha = 5, .dropout = 0.05, .use_rslora = use_rslora, .modules = modules};
    snprintf(cfg.base_model, sizeof cfg.base_model, "models/tiny");
    Adapter *a = adapter_alloc(&cfg, 3, in_dim, out_dim, NULL);
    // Values that are distinct and not round in decimal, so a lossy path would show.
    float x = 0.1f;
    for (int l = 0; l < 3; l++)
        for (int m = 0; m < ADAPTER_NMODULES; m++) {
            if (!(modules >> m & 1))
                continue;
            for (int i = 0; i < 2 * in_dim[m]; i++)
                adapter_A(a, l, m)[i] = (x = x * 1.37f - 0.29f);
            for (int i = 0; i < 2 * out_dim[m]; i++)
                adapter_B(a, l, m)[i] = (x = x * -0.71f + 0.13f);
        }
    return a;
}

static int same_adapter(const Adapter *a, const Adapter *b)
{
    if (a->n_layers != b->n_layers || a->cfg.modules != b->cfg.modules || a->cfg.rank != b->cfg.rank)
        return 0;
    for (int l = 0; l < a->n_layers; l++)
        for (int m = 0; m < ADAPTER_NMODULES; m++) {
            if (!(a->cfg.modules >> m & 1))
                continue;
            if (a->in_dim[m] != b->in_dim[m] || a->out_dim[m] != b->out_dim[m] ||
                memcmp(adapter_A(a, l, m), adapter_A(b, l, m), sizeof(float) * a->cfg.rank * a->in_dim[m]) ||
                memcmp(adapter_B(a, l, m), adapter_B(b, l, m), sizeof(float) * a->cfg.rank * a->out_dim[m]))
                return 0;
        }
    return 1;
}

static void test_modules(void)
{
    unsigned mask = 0;
    Err err;
    ok(adapter_modules_parse("q,v", &mask, &err) == 0 && mask == (1u << ADAPTER_Q | 1u << ADAPTER_V),
       "targets q,v");
    ok(adapter_modules_parse("gate_proj,down", &mask, &err) == 0 &&
       mask == (1u << ADAPTER_GATE | 1u << ADAPTER_DOWN), "targets mix PEFT names and short names");
    ok(adapter_modules_parse("all", &mask, &err) == 0 && mask == 0x7f, "targets all = the seven");
    ok(adapter_modules_parse("q,lm_head", &mask, &err) < 0 && strstr(err.msg, "'lm_head'"),
       "an unknown target is refused by name: %s", err.msg);
    ok(adapter_modules_parse("", &mask, &err) < 0, "an empty target list is refused");
    AdapterConfig c = {.rank = 16, .alpha = 16};
    ok(adapter_scale(&c) == 1.0f, "scale alpha/r");
    c.use_rslora = 1;
    ok(adapter_scale(&c) == 4.0f, "rsLoRA scale alpha/sqrt(r)");
}

static void test_save_layout(void)
{
    Err err;
    Adapter *a = sample_adapter(1u << ADAPTER_Q | 1u << ADAPTER_K | 1u << ADAPTER_DOWN, 0);
    const char *dir = path_in("one");
    ok(adapter_save(a, dir, &err) == 0, "save an adapter (%s)", err.msg);
    size_t len;
    unsigned char *b = read_all(path_in("one/adapter_model.safetensors"), &len);
    uint64_t n = 0;
    for (int i = 0; i < 8; i++)
        n |= (uint64_t)b[i] << (8 * i);
    ok((8 + n) % 8 == 0, "the data section starts 8-byte aligned (header %llu bytes)", (unsigned long long)n);
    json_error_t jerr;
    json_t *h = json_loadb((const char *)b + 8, n, 0, &jerr);
    ok(h != NULL, "the header is JSON (trailing spaces allowed)");
    is_str(json_string_value(json_object_get(json_object_get(h, "__metadata__"), "format")), "pt",
           "metadata format pt, as PEFT writes it");
    json_t *t = json_object_get(h, "base_model.model.model.layers.2.mlp.down_proj.lora_B.weight");
    ok(t && json_integer_value(json_array_get(json_object_get(t, "shape"), 0)) == 8 &&
       json_integer_value(json_array_get(json_object_get(t, "shape"), 1)) == 2,
       "lora_B of down_proj in layer 2 is (out 8, r 2)");
    t = json_object_get(h, "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight");
    ok(t && json_integer_value(json_array_get(json_object_get(t, "shape"), 0)) == 2 &&
       json_integer_value(json_array_get(json_object_get(t, "shape"), 1)) == 8 &&
       strcmp(json_string_value(json_object_get(t, "dtype")), "F32") == 0, "lora_A of k_proj is F32 (r 2, in 8)");
    is_int(json_object_size(h), 1 + 3 * 3 * 2, "one entry per layer, module and A/B, plus metadata");
    // The offsets tile the data section exactly.
    uint64_t total = 0;
    const char *key;
    json_t *v;
    json_object_foreach(h, key, v) {
        if (strcmp(key, "__metadata__") == 0)
            continue;
        json_t *o = json_object_get(v, "data_offsets");
        total += (uint64_t)(json_integer_value(json_array_get(o, 1)) - json_integer_value(json_array_get(o, 0)));
    }
    is_int(total, len - 8 - n, "tensor byte ranges add up to the data section");
    json_decref(h);
    free(b);

    b = read_all(path_in("one/adapter_config.json"), &len);
    json_t *c = json_loadb((const char *)b, len, 0, &jerr);
    is_str(json_string_value(json_object_get(c, "peft_type")), "LORA", "config peft_type LORA");
    is_str(json_string_value(json_object_get(c, "task_type")), "CAUSAL_LM", "config task_type CAUSAL_LM");
    is_str(json_string_value(json_object_get(c, "bias")), "none", "config bias none");
    is_int(json_integer_value(json_object_get(c, "r")), 2, "config r");
    is_int(json_integer_value(json_object_get(c, "lora_alpha")), 5, "config lora_alpha (an integer stays one)");
    ok(json_real_value(json_object_get(c, "lora_dropout")) == 0.05, "config lora_dropout");
    ok(json_is_false(json_object_get(c, "use_rslora")), "config use_rslora false");
    is_str(json_string_value(json_object_get(c, "base_model_name_or_path")), "models/tiny", "config base model");
    json_t *tm = json_object_get(c, "target_modules");
    ok(json_array_size(tm) == 3 && strcmp(json_string_value(json_array_get(tm, 0)), "q_proj") == 0 &&
       strcmp(json_string_value(json_array_get(tm, 2)), "down_proj") == 0, "config target_modules PEFT names");
    json_decref(c);
    free(b);

    // Loading gives back every value bit for bit, through the engine's safetensors reader.
    Adapter *back = adapter_load(dir, &err);
    ok(back && same_adapter(a, back), "load gives back the same adapter (%s)", back ? "" : err.msg);
    ok(back && back->cfg.alpha == 5 && back->cfg.dropout == 0.05 && !back->cfg.use_rslora &&
       strcmp(back->cfg.base_model, "models/tiny") == 0, "load gives back the config");
    Adapter *via_config = adapter_load(path_in("one/adapter_config.json"), &err);
    ok(via_config && same_adapter(a, via_config), "load also takes the path of adapter_config.json");
    ok(back && adapter_check_shapes(back, 3, in_dim, out_dim, &err) == 0, "shapes fit the model they came from");
    int other_in[ADAPTER_NMODULES];
    memcpy(other_in, in_dim, sizeof other_in);
    other_in[ADAPTER_K] = 16;
    ok(back && adapter_check_shapes(back, 3, other_in, out_dim, &err) < 0 && strstr(err.msg, "k_proj.lora_A"),
       "a model with other dims is refused naming the tensor: %s", err.msg);
    ok(back && adapter_check_shapes(back, 4, in_dim, out_dim, &err) < 0 && strstr(err.msg, "3 layers"),
       "a model with more layers is refused: %s", err.msg);

    // Same adapter, same bytes (a resumed run compares bytes).
    ok(adapter_save(a, path_in("two"), &err) == 0, "save again elsewhere");
    size_t l1, l2;
    unsigned char *b1 = read_all(path_in("one/adapter_model.safetensors"), &l1);
    unsigned char *b2 = read_all(path_in("two/adapter_model.safetensors"), &l2);
    ok(l1 == l2 && memcmp(b1, b2, l1) == 0, "saving is deterministic");
    free(b1);
    free(b2);
    adapter_free(via_config);
    adapter_free(back);
    adapter_free(a);
}

// A directory with a given config and tensors, for the refusals.
static const char *make_dir(const char *name, const char *config, const StTensorOut *t, size_t n)
{
    const char *dir = path_in(name);
    mkdir(dir, 0777);
    char p[600];
    snprintf(p, sizeof p, "%s/adapter_config.json", dir);
    write_file(p, config);
    if (t) {
        snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
        safetensors_write_file(p, t, n, NULL, 0, NULL);
    }
    return dir;
}

#define CONFIG(extra) "{\"peft_type\":\"LORA\",\"r\":2,\"lora_alpha\":4,\"target_modules\":[\"q_proj\"]" extra "}"

static void test_load_refusals(void)
{
    Err err;
    float a[2 * 8], b[8 * 2];
    for (int i = 0; i < 16; i++)
        a[i] = b[i] = (float)i / 16;
    StTensorOut good[2] = {
        {.name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", .dtype = "F32", .ndim = 2,
         .shape = {2, 8}, .data = a, .nbytes = sizeof a},
        {.name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", .dtype = "F32", .ndim = 2,
         .shape = {8, 2}, .data = b, .nbytes = sizeof b},
    };
    Adapter *ad = adapter_load(make_dir("minimal", CONFIG(""), good, 2), &err);
    ok(ad && ad->n_layers == 1 && ad->cfg.modules == 1u << ADAPTER_Q && adapter_B(ad, 0, ADAPTER_Q)[15] == b[15],
       "a minimal PEFT config with absent optional keys loads (%s)", ad ? "" : err.msg);
    adapter_free(ad);

    // BF16 tensors (adapters saved from bf16 models) are widened to float32 exactly.
    uint16_t a16[16], b16[16];
    for (int i = 0; i < 16; i++) {
        float f = (float)i / 16;   // exact in bfloat16
        uint32_t u;
        memcpy(&u, &f, 4);
        a16[i] = b16[i] = (uint16_t)(u >> 16);
    }
    StTensorOut bf16[2] = {good[0], good[1]};
    bf16[0].dtype = bf16[1].dtype = "BF16";
    bf16[0].data = a16;
    bf16[1].data = b16;
    bf16[0].nbytes = bf16[1].nbytes = sizeof a16;
    ad = adapter_load(make_dir("bf16", CONFIG(""), bf16, 2), &err);
    ok(ad && adapter_A(ad, 0, ADAPTER_Q)[5] == 5.0f / 16, "BF16 tensors load as float32 (%s)", ad ? "" : err.msg);
    adapter_free(ad);

    static const struct { const char *name, *config, *want; } bad_configs[] = {
        {"dora", CONFIG(",\"use_dora\":true"), "use_dora"},
        {"ia3", "{\"peft_type\":\"IA3\",\"r\":2,\"lora_alpha\":4}", "peft_type"},
        {"bias", CONFIG(",\"bias\":\"all\""), "bias"},
        {"save", CONFIG(",\"modules_to_save\":[\"lm_head\"]"), "modules_to_save"},
        {"pattern", CONFIG(",\"rank_pattern\":{\"q_proj\":4}"), "rank_pattern"},
        {"layers", CONFIG(",\"layers_to_transform\":[0]"), "layers_to_transform"},
        {"rank", "{\"peft_type\":\"LORA\",\"r\":0,\"lora_alpha\":4}", "r must be"},
        {"alpha", "{\"peft_type\":\"LORA\",\"r\":2}", "lora_alpha"},
        {"json", "{\"peft_type\":", "adapter_config.json:1"},
    };
    for (size_t i = 0; i < sizeof bad_configs / sizeof bad_configs[0]; i++) {
        ad = adapter_load(make_dir(bad_configs[i].name, bad_configs[i].config, good, 2), &err);
        ok(!ad && strstr(err.msg, bad_configs[i].want) && strstr(err.msg, "adapter_config.json"),
           "refused: %s: %s", bad_configs[i].name, ad ? "(loaded)" : err.msg);
        adapter_free(ad);
    }

    StTensorOut odd[3] = {good[0], good[1], good[0]};
    odd[2].name = "base_model.model.lm_head.lora_A.weight";
    ad = adapter_load(make_dir("odd", CONFIG(""), odd, 3), &err);
    ok(!ad && strstr(err.msg, "lm_head.lora_A"), "an unknown tensor is refused by name: %s", err.msg);
    StTensorOut gap[3] = {good[0], good[1], good[0]};
    gap[2].name = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";
    ad = adapter_load(make_dir("gap", CONFIG(""), gap, 3), &err);
    ok(!ad && strstr(err.msg, "layers.1.self_attn.q_proj.lora_B.weight is missing"),
       "a module missing in one layer is refused: %s", err.msg);
    StTensorOut shape[2] = {good[0], good[1]};
    shape[0].shape[0] = 4;
    shape[0].shape[1] = 4;
    ad = adapter_load(make_dir("shape", CONFIG(""), shape, 2), &err);
    ok(!ad && strstr(err.msg, "q_proj.lora_A.weight") && strstr(err.msg, "r = 2"),
       "lora_A whose rows are not r is refused: %s", err.msg);
    ad = adapter_load(make_dir("pickle", CONFIG(""), NULL, 0), &err);
    ok(!ad && strstr(err.msg, "adapter_model.safetensors"), "a missing weights file is named: %s", err.msg);
    write_file(path_in("pickle/adapter_model.bin"), "not read");
    ad = adapter_load(path_in("pickle"), &err);
    ok(!ad && strstr(err.msg, "safe_serialization"), "adapter_model.bin gets a hint: %s", err.msg);
    ad = adapter_load(path_in("no-such-dir"), &err);
    ok(!ad && strstr(err.msg, "no-such-dir"), "a missing directory is named: %s", err.msg);
}

static void test_writer_refusals(void)
{
    Err err;
    float x[4] = {0};
    StTensorOut t[2] = {
        {.name = "a", .dtype = "F32", .ndim = 1, .shape = {4}, .data = x, .nbytes = sizeof x},
        {.name = "a", .dtype = "F32", .ndim = 1, .shape = {4}, .data = x, .nbytes = sizeof x},
    };
    ok(safetensors_write_file(path_in("dup.safetensors"), t, 2, NULL, 0, &err) < 0 && strstr(err.msg, "duplicate"),
       "writer: duplicate names refused: %s", err.msg);
    t[0].nbytes = 12;
    ok(safetensors_write_file(path_in("size.safetensors"), t, 1, NULL, 0, &err) < 0 && strstr(err.msg, "12 bytes"),
       "writer: size that does not match the shape refused: %s", err.msg);
    t[0].nbytes = sizeof x;
    t[0].dtype = "F8";
    ok(safetensors_write_file(path_in("dtype.safetensors"), t, 1, NULL, 0, &err) < 0 && strstr(err.msg, "F8"),
       "writer: unknown dtype refused: %s", err.msg);
    ok(access(path_in("dtype.safetensors"), F_OK) != 0, "writer: nothing left behind after a refusal");
    ok(safetensors_write_file("/nonexistent-dir/x.safetensors", t, 0, NULL, 0, &err) < 0 &&
       strstr(err.msg, "/nonexistent-dir/x.safetensors"), "writer: an unwritable path is named: %s", err.msg);
    // An empty file (no tensors) is still a valid safetensors file.
    ok(safetensors_write_file(path_in("empty.safetensors"), t, 0, NULL, 0, &err) == 0, "writer: no tensors");
    SafeTensors *st = safetensors_open(path_in("empty.safetensors"), &err);
    ok(st && st->n_tensors == 0, "reader takes the empty file (%s)", st ? "" : err.msg);
    if (st)
        safetensors_close(st);
}

static void test_checkpoint(void)
{
    Err err;
    Adapter *a = sample_adapter(1u << ADAPTER_V | 1u << ADAPTER_UP, 1);
    const char *out = path_in("run");
    mkdir(out, 0777);
    float m[5] = {1e-3f, -2, 3.5f, 0, 7}, v[5] = {1e-8f, 2, 3, 4, 5};
    CheckpointState st = {.step = 12, .adam_step = 12, .rng = {{1, 0xfedcba9876543210ull, 3, UINT64_MAX}},
                          .cursor = {.seed = 3407, .epoch = 2, .position = 6, .rank = 0, .n_ranks = 1, .shuffle = 1},
                          .tokens_seen = 12345};
    char saved[4096];
    ok(checkpoint_save(out, a, m, v, 5, &st, "{\"rank\":2}", saved, sizeof saved, &err) == 0,
       "checkpoint saved (%s)", err.msg);
    is_str(saved, path_in("run/checkpoint-12"), "checkpoint directory named by its step");
    st.step = 4;
    ok(checkpoint_save(out, a, m, v, 5, &st, "{}", NULL, 0, &err) == 0, "an earlier checkpoint saved too");
    char latest[4096];
    mkdir(path_in("run/checkpoint-99"), 0777);   // incomplete: no trainer_state.json
    ok(checkpoint_latest(out, latest, sizeof latest, &err) == 0, "latest found");
    is_str(latest, path_in("run/checkpoint-12"), "latest is the highest complete step");
    Adapter *back = NULL;
    float *m2, *v2;
    char *opts;
    CheckpointState st2;
    ok(checkpoint_load(saved, &back, &m2, &v2, 5, &st2, &opts, &err) == 0, "checkpoint loads (%s)", err.msg);
    if (back) {
        ok(same_adapter(a, back) && back->cfg.use_rslora, "checkpoint adapter round trip");
        ok(memcmp(m, m2, sizeof m) == 0 && memcmp(v, v2, sizeof v) == 0, "AdamW moments round trip");
        ok(st2.step == 12 && st2.adam_step == 12 && memcmp(&st2.rng, &(Rng){{1, 0xfedcba9876543210ull, 3, UINT64_MAX}},
                                                           sizeof st2.rng) == 0,
           "step and generator state round trip");
        ok(st2.cursor.seed == 3407 && st2.cursor.epoch == 2 && st2.cursor.position == 6 && st2.cursor.shuffle == 1 &&
           st2.tokens_seen == 12345, "data cursor and token count round trip");
        is_str(opts, "{\"rank\":2}", "options round trip");
        free(m2);
        free(v2);
        free(opts);
        adapter_free(back);
    }
    ok(checkpoint_load(saved, &back, &m2, &v2, 6, &st2, &opts, &err) < 0 && strstr(err.msg, "5 LoRA parameters"),
       "a checkpoint of another parameter count is refused: %s", err.msg);
    ok(checkpoint_load(path_in("run/checkpoint-99"), &back, &m2, &v2, 5, &st2, &opts, &err) < 0 &&
       strstr(err.msg, "not a complete checkpoint"), "an incomplete checkpoint is refused: %s", err.msg);
    // Saving step 12 again replaces the directory whole.
    st.step = 12;
    m[0] = 42;
    ok(checkpoint_save(out, a, m, v, 5, &st, "{}", NULL, 0, &err) == 0, "a checkpoint of the same step replaced");
    ok(checkpoint_load(saved, &back, &m2, &v2, 5, &st2, &opts, &err) == 0 && m2[0] == 42, "the new one is read");
    if (back) {
        free(m2);
        free(v2);
        free(opts);
        adapter_free(back);
    }
    adapter_free(a);
}

int main(void)
{
    if (!mkdtemp(tmpdir)) {
        printf("1..0 # SKIP cannot create a temporary directory\n");
        return 0;
    }
    test_modules();
    test_save_layout();
    test_load_refusals();
    test_writer_refusals();
    test_checkpoint();
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0)
        printf("# could not remove %s\n", tmpdir);
    return done_testing();
}
