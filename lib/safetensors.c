#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define HEADER_MAX (100u << 20)   // 100 MB, as the reference reader limits it

const char *dtype_name(DType d)
{
    switch (d) {
    case DTYPE_F32: return "F32";
    case DTYPE_F16: return "F16";
    case DTYPE_BF16: return "BF16";
    default: return "other";
    }
}

size_t dtype_size(DType d)
{
    switch (d) {
    case DTYPE_F32: return 4;
    case DTYPE_F16: case DTYPE_BF16: return 2;
    default: return 0;
    }
}

int64_t tensor_numel(const Tensor *t)
{
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++)
        n *= t->shape[i];
    return n;
}

// IEEE half to float, exactly (subnormals, infinities and NaN included).
static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {   // subnormal: normalise
        int e = -1;
        do {
            e++;
            mant <<= 1;
        } while (!(mant & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

void tensor_to_f32(const Tensor *t, int64_t first, int64_t n, float *out)
{
    const unsigned char *p = (const unsigned char *)t->data + first * (int64_t)dtype_size(t->dtype);
    switch (t->dtype) {
    case DTYPE_F32:
        memcpy(out, p, (size_t)n * 4);   // memcpy: the map need not be 4-byte aligned
        break;
    case DTYPE_F16:
        for (int64_t i = 0; i < n; i++)
            out[i] = half_to_float((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
        break;
    case DTYPE_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint32_t bits = (uint32_t)(p[2 * i] | p[2 * i + 1] << 8) << 16;
            memcpy(&out[i], &bits, 4);
        }
        break;
    default:
        break;
    }
}

static DType dtype_parse(const char *s)
{
    if (!strcmp(s, "F32")) return DTYPE_F32;
    if (!strcmp(s, "F16")) return DTYPE_F16;
    if (!strcmp(s, "BF16")) return DTYPE_BF16;
    return DTYPE_OTHER;
}

// Element widths of the other dtypes the format defines, so that their sizes are checked too.
static size_t dtype_str_size(const char *s)
{
    static const struct { const char *name; size_t size; } known[] = {
        {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2},
        {"I8", 1}, {"U64", 8}, {"U32", 4}, {"U16", 2}, {"U8", 1}, {"BOOL", 1},
        {"F8_E4M3", 1}, {"F8_E5M2", 1},
    };
    for (size_t i = 0; i < sizeof known / sizeof *known; i++)
        if (!strcmp(s, known[i].name))
            return known[i].size;
    return 0;
}

void safetensors_close(SafeTensors *st)
{
    if (!st)
        return;
    if (st->map && st->map != MAP_FAILED)
        munmap(st->map, st->map_size);
    for (int i = 0; i < st->n_tensors; i++)
        free(st->tensors[i].name);
    free(st->tensors);
    free(st->path);
    free(st);
}

static int by_begin(const void *a, const void *b)
{
    const SafeTensorEntry *x = *(const SafeTensorEntry *const *)a, *y = *(const SafeTensorEntry *const *)b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

// Fill e from the header's entry for name; -1 with a message naming file and tensor.
static int parse_entry(const SafeTensors *st, const char *name, json_t *v, uint64_t data_size,
                       const unsigned char *data, SafeTensorEntry *e, Err *err)
{
    const char *path = st->path;
    if (!json_is_object(v))
        return err_set(err, "%s: tensor '%s': header entry is not an object", path, name);
    json_t *jd = json_object_get(v, "dtype"), *js = json_object_get(v, "shape"),
           *jo = json_object_get(v, "data_offsets");
    if (!json_is_string(jd))
        return err_set(err, "%s: tensor '%s': missing or non-string \"dtype\"", path, name);
    const char *ds = json_string_value(jd);
    size_t width = dtype_str_size(ds);
    if (!width)
        return err_set(err, "%s: tensor '%s': unknown dtype \"%s\"", path, name, ds);
    if (!json_is_array(js))
        return err_set(err, "%s: tensor '%s': missing or non-array \"shape\"", path, name);
    if (json_array_size(js) > TENSOR_MAX_DIMS)
        return err_set(err, "%s: tensor '%s': %zu dimensions (at most %d supported)", path, name,
                       json_array_size(js), TENSOR_MAX_DIMS);
    if (!json_is_array(jo) || json_array_size(jo) != 2 || !json_is_integer(json_array_get(jo, 0)) ||
        !json_is_integer(json_array_get(jo, 1)))
        return err_set(err, "%s: tensor '%s': \"data_offsets\" must be [begin, end]", path, name);
    memset(e, 0, sizeof *e);
    snprintf(e->dtype_str, sizeof e->dtype_str, "%s", ds);
    e->tensor.dtype = dtype_parse(ds);
    e->tensor.ndim = (int)json_array_size(js);
    uint64_t numel = 1;
    for (int i = 0; i < e->tensor.ndim; i++) {
        json_t *d = json_array_get(js, i);
        if (!json_is_integer(d) || json_integer_value(d) < 0)
            return err_set(err, "%s: tensor '%s': shape[%d] is not a non-negative integer", path, name, i);
        e->tensor.shape[i] = json_integer_value(d);
        if (e->tensor.shape[i] && numel > (UINT64_MAX >> 4) / (uint64_t)e->tensor.shape[i])
            return err_set(err, "%s: tensor '%s': shape too large", path, name);
        numel *= (uint64_t)e->tensor.shape[i];
    }
    json_int_t b = json_integer_value(json_array_get(jo, 0)), en = json_integer_value(json_array_get(jo, 1));
    if (b < 0 || en < b)
        return err_set(err, "%s: tensor '%s': data_offsets [%lld, %lld] are not an increasing pair",
                       path, name, (long long)b, (long long)en);
    if ((uint64_t)en > data_size)
        return err_set(err, "%s: tensor '%s': data_offsets [%lld, %lld] out of bounds (data section is %llu bytes)",
                       path, name, (long long)b, (long long)en, (unsigned long long)data_size);
    if ((uint64_t)(en - b) != numel * width)
        return err_set(err, "%s: tensor '%s': %lld bytes for %llu elements of %s (want %llu)", path,
                       name, (long long)(en - b), (unsigned long long)numel, ds,
                       (unsigned long long)(numel * width));
    e->begin = (uint64_t)b;
    e->end = (uint64_t)en;
    e->tensor.data = data + b;
    return 0;
}

SafeTensors *safetensors_open(const char *path, Err *err)
{
    SafeTensors *st = calloc(1, sizeof *st);
    json_t *root = NULL;
    SafeTensorEntry **order = NULL;
    if (!st || !(st->path = strdup(path))) {
        err_set(err, "%s: out of memory", path);
        goto fail;
    }
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        err_set(err, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    struct stat sb;
    if (fstat(fd, &sb) < 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        err_set(err, "%s: not a regular file", path);
        goto fail;
    }
    if (sb.st_size < 8) {
        close(fd);
        err_set(err, "%s: truncated: %lld bytes, shorter than the 8-byte header length", path,
                (long long)sb.st_size);
        goto fail;
    }
    st->map_size = (size_t)sb.st_size;
    st->map = mmap(NULL, st->map_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (st->map == MAP_FAILED) {
        st->map = NULL;
        err_set(err, "%s: cannot map: %s", path, strerror(errno));
        goto fail;
    }
    const unsigned char *bytes = st->map;
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | bytes[i];
    if (n < 2 || n > HEADER_MAX) {
        err_set(err, "%s: header length %llu is not in [2, %u]", path, (unsigned long long)n, HEADER_MAX);
        goto fail;
    }
    if (n > st->map_size - 8) {
        err_set(err, "%s: truncated: header of %llu bytes but only %zu bytes follow", path,
                (unsigned long long)n, st->map_size - 8);
        goto fail;
    }
    json_error_t je;
    root = json_loadb((const char *)bytes + 8, n, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        err_set(err, "%s: header is not valid JSON: %s (at byte %d of the header)", path, je.text, je.position);
        goto fail;
    }
    if (!json_is_object(root)) {
        err_set(err, "%s: header is not a JSON object", path);
        goto fail;
    }
    uint64_t data_size = st->map_size - 8 - n;
    const unsigned char *data = bytes + 8 + n;
    st->tensors = calloc(json_object_size(root) + 1, sizeof *st->tensors);
    if (!st->tensors) {
        err_set(err, "%s: out of memory", path);
        goto fail;
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (!strcmp(key, "__metadata__")) {
            if (!json_is_object(v)) {
                err_set(err, "%s: \"__metadata__\" is not an object", path);
                goto fail;
            }
            continue;
        }
        SafeTensorEntry *e = &st->tensors[st->n_tensors];
        if (parse_entry(st, key, v, data_size, data, e, err) < 0)
            goto fail;
        if (!(e->name = strdup(key))) {
            err_set(err, "%s: out of memory", path);
            goto fail;
        }
        st->n_tensors++;
    }
    // No two byte ranges may overlap: sort by begin and compare neighbours.
    order = malloc((st->n_tensors + 1) * sizeof *order);
    if (!order) {
        err_set(err, "%s: out of memory", path);
        goto fail;
    }
    int n_nonempty = 0;   // empty tensors occupy no bytes and overlap nothing
    for (int i = 0; i < st->n_tensors; i++)
        if (st->tensors[i].end > st->tensors[i].begin)
            order[n_nonempty++] = &st->tensors[i];
    qsort(order, n_nonempty, sizeof *order, by_begin);
    for (int i = 1; i < n_nonempty; i++)
        if (order[i]->begin < order[i - 1]->end) {
            err_set(err, "%s: tensors '%s' [%llu, %llu) and '%s' [%llu, %llu) overlap", path,
                    order[i - 1]->name, (unsigned long long)order[i - 1]->begin,
                    (unsigned long long)order[i - 1]->end, order[i]->name,
                    (unsigned long long)order[i]->begin, (unsigned long long)order[i]->end);
            goto fail;
        }
    free(order);
    json_decref(root);
    return st;
fail:
    free(order);
    json_decref(root);
    safetensors_close(st);
    return NULL;
}

const SafeTensorEntry *safetensors_find(const SafeTensors *st, const char *name)
{
    for (int i = 0; i < st->n_tensors; i++)
        if (!strcmp(st->tensors[i].name, name))
            return &st->tensors[i];
    return NULL;
}
