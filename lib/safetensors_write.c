#include "safetensors_write.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "atomic.h"

// Width in bytes of each dtype name the format defines.
static int dtype_width(const char *dtype)
{
    static const struct { const char *name; int width; } table[] = {
        {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2},
        {"I8", 1}, {"U64", 8}, {"U32", 4}, {"U16", 2}, {"U8", 1}, {"BOOL", 1},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (strcmp(table[i].name, dtype) == 0)
            return table[i].width;
    return 0;
}

static int check_tensor(const char *path, const StTensorOut *t, json_t *seen, Err *err)
{
    if (!t->name || !*t->name)
        return err_set(err, "%s: tensor with an empty name", path);
    if (strcmp(t->name, "__metadata__") == 0)
        return err_set(err, "%s: tensor name __metadata__ is reserved", path);
    if (json_object_get(seen, t->name))
        return err_set(err, "%s: tensor %s: duplicate name", path, t->name);
    int width = t->dtype ? dtype_width(t->dtype) : 0;
    if (!width)
        return err_set(err, "%s: tensor %s: unknown dtype %s", path, t->name, t->dtype ? t->dtype : "(null)");
    if (t->ndim < 0 || t->ndim > ST_MAX_DIMS)
        return err_set(err, "%s: tensor %s: %d dimensions (at most %d)", path, t->name, t->ndim, ST_MAX_DIMS);
    uint64_t count = 1;
    for (int d = 0; d < t->ndim; d++) {
        if (t->shape[d] < 0)
            return err_set(err, "%s: tensor %s: negative dimension", path, t->name);
        count *= (uint64_t)t->shape[d];
    }
    if (count * (uint64_t)width != t->nbytes)
        return err_set(err, "%s: tensor %s: %zu bytes for %llu elements of %s", path, t->name,
                       t->nbytes, (unsigned long long)count, t->dtype);
    if (t->nbytes && !t->data)
        return err_set(err, "%s: tensor %s: no data", path, t->name);
    return 0;
}

// The JSON header, without padding; NULL on error.
static char *build_header(const char *path, const StTensorOut *t, size_t n, const char *const *meta,
                          size_t n_meta, Err *err)
{
    json_t *root = json_object();
    if (!root) {
        err_set(err, "%s: out of memory", path);
        return NULL;
    }
    if (n_meta) {
        json_t *m = json_object();
        json_object_set_new(root, "__metadata__", m);
        for (size_t i = 0; i < n_meta; i++)
            json_object_set_new(m, meta[2 * i], json_string(meta[2 * i + 1]));
    }
    uint64_t offset = 0;
    for (size_t i = 0; i < n; i++) {
        if (check_tensor(path, &t[i], root, err) < 0) {
            json_decref(root);
            return NULL;
        }
        json_t *shape = json_array();
        for (int d = 0; d < t[i].ndim; d++)
            json_array_append_new(shape, json_integer(t[i].shape[d]));
        json_t *offsets = json_pack("[II]", (json_int_t)offset, (json_int_t)(offset + t[i].nbytes));
        json_object_set_new(root, t[i].name,
                            json_pack("{s:s, s:o, s:o}", "dtype", t[i].dtype, "shape", shape,
                                      "data_offsets", offsets));
        offset += t[i].nbytes;
    }
    char *text = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (!text)
        err_set(err, "%s: out of memory", path);
    return text;
}

int safetensors_write(FILE *f, const char *path, const StTensorOut *t, size_t n,
                      const char *const *meta, size_t n_meta, Err *err)
{
    char *header = build_header(path, t, n, meta, n_meta, err);
    if (!header)
        return -1;
    size_t len = strlen(header);
    size_t padded = (len + 7) / 8 * 8;   // 8 + padded stays a multiple of 8
    unsigned char size_le[8];
    for (int i = 0; i < 8; i++)
        size_le[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    fwrite(size_le, 1, 8, f);
    fwrite(header, 1, len, f);
    for (size_t i = len; i < padded; i++)
        fputc(' ', f);
    free(header);
    for (size_t i = 0; i < n; i++)
        if (t[i].nbytes)
            fwrite(t[i].data, 1, t[i].nbytes, f);
    if (ferror(f))
        return err_set(err, "%s: write failed", path);
    return 0;
}

int safetensors_write_file(const char *path, const StTensorOut *t, size_t n,
                           const char *const *meta, size_t n_meta, Err *err)
{
    AtomicFile af;
    if (atomic_open(&af, path, err) < 0)
        return -1;
    if (safetensors_write(af.f, path, t, n, meta, n_meta, err) < 0) {
        atomic_abort(&af);
        return -1;
    }
    return atomic_commit(&af, err);
}
