// Tokenizer loading and dispatch: which file, which kind (byte-level BPE in lib/bpe_bytelevel.c,
// SentencePiece-style BPE in lib/bpe_spm.c), and the BOS/EOS policy from the model directory.
//
// Files, in order of preference for a directory: tokenizer.json, then tokenizer.model (tiktoken
// rank lines, or a SentencePiece protobuf). A file path names the tokenizer itself; its directory
// still supplies tokenizer_config.json and generation_config.json when they are there.
// Policy (tokenizer_config.json wins over generation_config.json, which wins over the file):
//   BOS: bos_token; bos_token_id; the post-processor's template; "<|begin_of_text|>".
//   EOS: eos_token; eos_token_id (the first when a list); the kind's own; "<|end_of_text|>".
//   adds_bos: add_bos_token; else the post-processor (a TemplateProcessing with a leading special
//   token); a bare tiktoken tokenizer.model adds BOS, as Meta's reference code always does.
// Special tokens of a tiktoken tokenizer.model: added_tokens_decoder of tokenizer_config.json,
// else, for a 128000-rank vocabulary, the Llama 3.1 table.
#include "tokenizer.h"

#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bpe_bytelevel.h"
#include "bpe_spm.h"

struct Tokenizer {
    ByteLevelBpe *bytelevel;     // exactly one of these two is set
    SpmTokenizer *spm;
    int64_t bos_id, eos_id;
    int adds_bos;
    uint64_t fingerprint;        // computed once at load: hashing the vocabulary costs milliseconds
};

static int is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int is_file(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

// dir + "/" + name in buf ("" dir means the current one); "" when it does not fit.
static const char *join(char *buf, size_t size, const char *dir, const char *name)
{
    int n = snprintf(buf, size, "%s%s%s", dir, *dir ? "/" : "", name);
    if (n < 0 || (size_t)n >= size) buf[0] = 0;
    return buf;
}

// A JSON file of the model directory, or NULL when absent. -1 in *bad when present but broken.
static json_t *load_json_beside(const char *dir, const char *name, int *bad, Err *err)
{
    char path[4096];
    join(path, sizeof path, dir, name);
    *bad = 0;
    if (!is_file(path)) return NULL;
    json_error_t je;
    // Integers as reals: configs hold values like model_max_length 1e30 that overflow json_int_t.
    json_t *root = json_load_file(path, JSON_DECODE_INT_AS_REAL, &je);
    if (!root) {
        *bad = 1;
        err_set(err, "%s:%d: %s", path, je.line, je.text);
    }
    return root;
}

// "bos_token": "<s>" or {"content": "<s>", ...}
static const char *token_name(const json_t *v)
{
    if (json_is_string(v)) return json_string_value(v);
    return json_string_value(json_object_get(v, "content"));
}

static int64_t first_id(const json_t *v)
{
    if (json_is_array(v)) v = json_array_get(v, 0);
    double d = json_number_value(v);
    return json_is_number(v) && d >= 0 && d < 4294967296.0 && d == (double)(int64_t)d ? (int64_t)d : -1;
}

// Special tokens of a tiktoken file from tokenizer_config.json's added_tokens_decoder.
static int add_config_tokens(ByteLevelBpe *b, const json_t *config, const char *model_path, Err *err)
{
    const json_t *decoder = json_object_get(config, "added_tokens_decoder");
    if (!json_is_object(decoder) || !json_object_size(decoder)) {
        if (bytelevel_vocab_size(b) == 128000) return bytelevel_add_llama3_specials(b, err);
        return 0;
    }
    const char *key;
    json_t *entry;
    json_object_foreach((json_t *)decoder, key, entry) {
        char *end;
        errno = 0;
        long id = strtol(key, &end, 10);
        const char *content = json_string_value(json_object_get(entry, "content"));
        if (*end || errno || id < 0 || id >= (1L << 30) || !content)
            return err_set(err, "tokenizer_config.json: added_tokens_decoder[\"%.40s\"] is not an id with a content "
                                "(for %s)", key, model_path);
        const json_t *special = json_object_get(entry, "special");
        if (bytelevel_add_token(b, (uint32_t)id, content, strlen(content), !special || json_is_true(special), err) < 0)
            return -1;
    }
    return 0;
}

// The whole file, mapped read-only (a 9 MB tokenizer.json is not copied), or NULL with a
// message. An empty file gives a page of zeros; unmap with munmap(text, *len ? *len : 1).
static char *map_whole_file(const char *path, size_t *len, Err *err)
{
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        err_set(err, "%s: %s", path, strerror(errno));
        if (fd >= 0) close(fd);
        return NULL;
    }
    *len = (size_t)st.st_size;
    void *p = *len ? mmap(NULL, *len, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0)
                   : mmap(NULL, 1, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int saved = errno;
    close(fd);
    if (p == MAP_FAILED) {
        err_set(err, "%s: %s", path, strerror(saved));
        return NULL;
    }
    return p;
}

static int load_tokenizer_json(Tokenizer *t, const char *path, Err *err)
{
    size_t len;
    char *text = map_whole_file(path, &len, err);
    if (!text) return -1;
    size_t map_len = len ? len : 1;
    const char *name = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    // Byte-level BPE files (Llama 3's is 9 MB) first without a full jansson tree; anything
    // else, or anything unusual, through jansson.
    int fallback;
    t->bytelevel = bytelevel_load_json_text(text, len, name, &fallback, err);
    if (t->bytelevel || !fallback) {
        munmap(text, map_len);
        return t->bytelevel ? 0 : -1;
    }
    json_error_t je;
    json_t *root = json_loadb(text, len, 0, &je);
    munmap(text, map_len);
    if (!root) return err_set(err, "%s:%d: %s", path, je.line, je.text);
    if (bytelevel_json_is_bytelevel(root))
        t->bytelevel = bytelevel_load_json(root, name, err);
    else if (spm_json_is_sentencepiece(root))
        t->spm = spm_load_json(root, name, err);
    else {
        const json_t *model = json_object_get(root, "model");
        const char *model_type = json_string_value(json_object_get(model, "type"));
        const json_t *pre = json_object_get(root, "pre_tokenizer");
        const char *pre_type = json_string_value(json_object_get(pre, "type"));
        if (!model_type || strcmp(model_type, "BPE") != 0)
            err_set(err, "%s: model.type %s is not supported (only BPE)", name, model_type ? model_type : "(none)");
        else
            err_set(err, "%s: pre_tokenizer type %s is not supported (byte-level BPE needs ByteLevel; "
                         "SentencePiece-style BPE needs Metaspace, a Prepend normalizer or byte_fallback)",
                    name, pre_type ? pre_type : "(none)");
    }
    json_decref(root);
    return t->bytelevel || t->spm ? 0 : -1;
}

static int load_tokenizer_model(Tokenizer *t, const char *path, const json_t *config, Err *err)
{
    unsigned char head[16];
    FILE *f = fopen(path, "rb");
    if (!f) return err_set(err, "%s: %s", path, strerror(errno));
    size_t n = fread(head, 1, sizeof head, f);
    fclose(f);
    if (spm_is_protobuf(head, n)) {
        t->spm = spm_load_model(path, err);
        return t->spm ? 0 : -1;
    }
    t->bytelevel = bytelevel_load_tiktoken(path, err);
    if (!t->bytelevel) return -1;
    t->adds_bos = 1;
    return add_config_tokens(t->bytelevel, config, path, err);
}

Tokenizer *tokenizer_load(const char *path, Err *err)
{
    char dir[4096], file[4096];
    if (is_dir(path)) {
        if (snprintf(dir, sizeof dir, "%s", path) >= (int)sizeof dir) {
            err_set(err, "%.100s...: path too long", path);
            return NULL;
        }
        if (!is_file(join(file, sizeof file, dir, "tokenizer.json")) &&
            !is_file(join(file, sizeof file, dir, "tokenizer.model"))) {
            err_set(err, "%s: no tokenizer.json or tokenizer.model in this directory", path);
            return NULL;
        }
    } else if (is_file(path)) {
        if (snprintf(file, sizeof file, "%s", path) >= (int)sizeof file ||
            snprintf(dir, sizeof dir, "%s", path) >= (int)sizeof dir) {
            err_set(err, "%.100s...: path too long", path);
            return NULL;
        }
        char *slash = strrchr(dir, '/');
        if (slash) *slash = 0;
        else dir[0] = 0;
    } else {
        err_set(err, "%s: %s", path, errno ? strerror(errno) : "not a file or directory");
        return NULL;
    }
    Tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        err_set(err, "out of memory");
        return NULL;
    }
    int bad_config = 0, bad_generation = 0;
    json_t *config = load_json_beside(dir, "tokenizer_config.json", &bad_config, err);
    json_t *generation = bad_config ? NULL : load_json_beside(dir, "generation_config.json", &bad_generation, err);
    if (bad_config || bad_generation) goto fail;

    // tokenizer.json, or a file that starts as JSON does, is a Hugging Face tokenizer.
    size_t flen = strlen(file);
    int json_file = flen >= 5 && !strcmp(file + flen - 5, ".json");
    if (json_file ? load_tokenizer_json(t, file, err) : load_tokenizer_model(t, file, config, err)) goto fail;

    if (t->spm) {
        t->bos_id = spm_bos_id(t->spm);
        t->eos_id = spm_eos_id(t->spm);
        t->adds_bos = spm_adds_bos(t->spm);
    } else {
        int64_t template_bos;
        if (json_file) t->adds_bos = bytelevel_adds_bos_template(t->bytelevel, &template_bos);
        else template_bos = -1;
        t->bos_id = template_bos >= 0 ? template_bos : tokenizer_token_id(t, "<|begin_of_text|>", 17);
        t->eos_id = tokenizer_token_id(t, "<|end_of_text|>", 15);
    }
    int64_t id;
    if ((id = first_id(json_object_get(generation, "bos_token_id"))) >= 0) t->bos_id = id;
    if ((id = first_id(json_object_get(generation, "eos_token_id"))) >= 0) t->eos_id = id;
    const char *name;
    if ((name = token_name(json_object_get(config, "bos_token"))) && (id = tokenizer_token_id(t, name, strlen(name))) >= 0)
        t->bos_id = id;
    if ((name = token_name(json_object_get(config, "eos_token"))) && (id = tokenizer_token_id(t, name, strlen(name))) >= 0)
        t->eos_id = id;
    const json_t *add_bos = json_object_get(config, "add_bos_token");
    if (json_is_boolean(add_bos)) t->adds_bos = json_is_true(add_bos);
    if (t->bos_id < 0) t->adds_bos = 0;
    json_decref(config);
    json_decref(generation);
    t->fingerprint = t->spm ? spm_fingerprint(t->spm) : bytelevel_fingerprint(t->bytelevel);
    return t;
fail:
    json_decref(config);
    json_decref(generation);
    tokenizer_free(t);
    return NULL;
}

void tokenizer_free(Tokenizer *t)
{
    if (!t) return;
    bytelevel_free(t->bytelevel);
    spm_free(t->spm);
    free(t);
}

long tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int parse_special,
                      uint32_t **ids, size_t *cap, size_t n, uint32_t **offsets, Err *err)
{
    if (t->spm) return spm_encode(t->spm, text, len, parse_special, ids, cap, n, offsets, err);
    return bytelevel_encode(t->bytelevel, text, len, parse_special, ids, cap, n, offsets, err);
}

const char *tokenizer_token_bytes(const Tokenizer *t, uint32_t id, size_t *len)
{
    return t->spm ? spm_token_bytes(t->spm, id, len) : bytelevel_token_bytes(t->bytelevel, id, len);
}

int tokenizer_is_special(const Tokenizer *t, uint32_t id)
{
    return t->spm ? spm_is_special(t->spm, id) : bytelevel_is_special(t->bytelevel, id);
}

long tokenizer_decode(const Tokenizer *t, const uint32_t *ids, size_t n, int skip_special,
                      char **out, size_t *cap, size_t len, Err *err)
{
    if (t->spm) return spm_decode(t->spm, ids, n, skip_special, out, cap, len, err);
    return bytelevel_decode(t->bytelevel, ids, n, skip_special, out, cap, len, err);
}

uint32_t tokenizer_vocab_size(const Tokenizer *t)
{
    return t->spm ? spm_vocab_size(t->spm) : bytelevel_vocab_size(t->bytelevel);
}

int64_t tokenizer_bos_id(const Tokenizer *t) { return t->bos_id; }
int64_t tokenizer_eos_id(const Tokenizer *t) { return t->eos_id; }
int tokenizer_adds_bos(const Tokenizer *t) { return t->adds_bos; }

int64_t tokenizer_token_id(const Tokenizer *t, const char *s, size_t len)
{
    return t->spm ? spm_token_id(t->spm, s, len) : bytelevel_token_id(t->bytelevel, s, len);
}

uint64_t tokenizer_fingerprint(const Tokenizer *t)
{
    return t->fingerprint;
}

const char *tokenizer_kind(const Tokenizer *t)
{
    return t->spm ? "bpe-sentencepiece" : "bpe-bytelevel";
}
