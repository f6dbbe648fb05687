#include "alpaca.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* ---------------------------------------------------------------- fields */

static const char *const role_names[ALPACA_NROLES] = {"instruction", "input", "output"};

const char *alpaca_role_name(int role)
{
    return role >= 0 && role < ALPACA_NROLES ? role_names[role] : "?";
}

void alpaca_fields_default(AlpacaFields *f)
{
    for (int r = 0; r < ALPACA_NROLES; r++) {
        snprintf(f->name[r], sizeof f->name[r], "%s", role_names[r]);
        f->required[r] = r != ALPACA_INPUT;
    }
}

int alpaca_fields_set(AlpacaFields *f, const char *spec, Err *err)
{
    const char *eq = strchr(spec, '=');
    if (!eq)
        return err_set(err, "field mapping \"%s\": expected ROLE=KEY, e.g. instruction=question", spec);
    int role = -1;
    for (int r = 0; r < ALPACA_NROLES; r++)
        if ((size_t)(eq - spec) == strlen(role_names[r]) && !memcmp(spec, role_names[r], eq - spec))
            role = r;
    if (role < 0)
        return err_set(err, "field mapping \"%s\": unknown role \"%.*s\" (instruction, input or output)",
                       spec, (int)(eq - spec), spec);
    const char *key = eq + 1;
    if (!*key)
        return err_set(err, "field mapping \"%s\": empty key", spec);
    if (strlen(key) >= sizeof f->name[role])
        return err_set(err, "field mapping \"%s\": key longer than %zu bytes", spec, sizeof f->name[role] - 1);
    snprintf(f->name[role], sizeof f->name[role], "%s", key);
    for (int r = 0; r < ALPACA_NROLES; r++)
        if (r != role && !strcmp(f->name[r], key))
            return err_set(err, "field mapping \"%s\": key \"%s\" already holds the %s", spec, key, role_names[r]);
    return 0;
}

/* ---------------------------------------------------------------- templates */

// A template string compiled into literal pieces and role placeholders.
typedef struct {
    int role;            // -1: literal text
    const char *text;    // (len) bytes, literal pieces only
    size_t len;
} TemplatePart;

typedef struct {
    TemplatePart *part;  // (npart)
    size_t npart;
    size_t literal_len;  // bytes of literal text in total
    char *literals;      // storage for the literal pieces ({{ and }} unescaped)
} CompiledPrompt;

struct AlpacaTemplate {
    char *description;
    char *prompt_input;       // as written (with {instruction}, {input}, {{, }})
    char *prompt_no_input;    // NULL: prompt_input serves every row
    char *response_split;     // NULL when the template has none
    CompiledPrompt with_input, without_input;
};

// Python's str.format grammar as alpaca-lora uses it: "{{" and "}}" are literal braces,
// "{instruction}" and "{input}" are replaced, any other {...} or a lone brace is an error.
static int compile_prompt(const char *what, const char *src, CompiledPrompt *c, Err *err)
{
    size_t n = strlen(src);
    c->part = calloc(n + 1, sizeof *c->part);   // at most one part per byte, plus one
    c->literals = malloc(n + 1);
    if (!c->part || !c->literals)
        return err_set(err, "out of memory");
    char *lit = c->literals;
    const char *lit_start = lit;
    for (size_t i = 0; i < n; ) {
        if (src[i] == '{' && src[i + 1] == '{') {
            *lit++ = '{';
            i += 2;
        } else if (src[i] == '}' && src[i + 1] == '}') {
            *lit++ = '}';
            i += 2;
        } else if (src[i] == '{') {
            const char *close = strchr(src + i, '}');
            if (!close)
                return err_set(err, "%s: unmatched '{' at byte %zu (write {{ for a literal brace)", what, i + 1);
            size_t name_len = close - (src + i + 1);
            int role = -1;
            if (name_len == 11 && !memcmp(src + i + 1, "instruction", 11))
                role = ALPACA_INSTRUCTION;
            else if (name_len == 5 && !memcmp(src + i + 1, "input", 5))
                role = ALPACA_INPUT;
            if (role < 0)
                return err_set(err, "%s: unknown placeholder {%.*s} (only {instruction} and {input}; "
                               "write {{ for a literal brace)", what, (int)name_len, src + i + 1);
            if (lit > lit_start)
                c->part[c->npart++] = (TemplatePart){-1, lit_start, lit - lit_start};
            c->part[c->npart++] = (TemplatePart){role, NULL, 0};
            lit_start = lit;
            i += name_len + 2;
        } else if (src[i] == '}') {
            return err_set(err, "%s: single '}' at byte %zu (write }} for a literal brace)", what, i + 1);
        } else {
            *lit++ = src[i++];
        }
    }
    if (lit > lit_start)
        c->part[c->npart++] = (TemplatePart){-1, lit_start, lit - lit_start};
    c->literal_len = lit - c->literals;
    return 0;
}

void alpaca_template_free(AlpacaTemplate *t)
{
    if (!t)
        return;
    free(t->description);
    free(t->prompt_input);
    free(t->prompt_no_input);
    free(t->response_split);
    free(t->with_input.part);
    free(t->with_input.literals);
    free(t->without_input.part);
    free(t->without_input.literals);
    free(t);
}

static char *dup_or_null(const char *s, int *oom)
{
    if (!s)
        return NULL;
    char *d = strdup(s);
    if (!d)
        *oom = 1;
    return d;
}

// what: the template's name for messages (a file name or "built-in alpaca").
static AlpacaTemplate *template_new(const char *what, const char *description, const char *prompt_input,
                                    const char *prompt_no_input, const char *response_split, Err *err)
{
    AlpacaTemplate *t = calloc(1, sizeof *t);
    int oom = !t;
    if (t) {
        t->description = dup_or_null(description, &oom);
        t->prompt_input = dup_or_null(prompt_input, &oom);
        t->prompt_no_input = dup_or_null(prompt_no_input, &oom);
        t->response_split = dup_or_null(response_split, &oom);
    }
    if (oom) {
        err_set(err, "out of memory");
        alpaca_template_free(t);
        return NULL;
    }
    char where[600];
    snprintf(where, sizeof where, "%s: prompt_input", what);
    if (compile_prompt(where, prompt_input, &t->with_input, err) < 0)
        goto fail;
    snprintf(where, sizeof where, "%s: prompt_no_input", what);
    if (compile_prompt(where, prompt_no_input ? prompt_no_input : prompt_input, &t->without_input, err) < 0)
        goto fail;
    // alpaca-lora splits generated text at response_split: a template whose prompts lack it
    // would make that split find nothing.
    if (response_split) {
        if (!*response_split) {
            err_set(err, "%s: response_split is empty", what);
            goto fail;
        }
        if (!strstr(prompt_input, response_split) || (prompt_no_input && !strstr(prompt_no_input, response_split))) {
            err_set(err, "%s: response_split \"%s\" does not occur in %s", what, response_split,
                    strstr(prompt_input, response_split) ? "prompt_no_input" : "prompt_input");
            goto fail;
        }
    }
    return t;
fail:
    alpaca_template_free(t);
    return NULL;
}

// The alpaca-lora template (templates/alpaca.json of tloen/alpaca-lora), byte for byte.
#define ALPACA_PROMPT_INPUT                                                                        \
    "Below is an instruction that describes a task, paired with an input that provides further "  \
    "context. Write a response that appropriately completes the request.\n\n"                       \
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
#define ALPACA_PROMPT_NO_INPUT                                                                     \
    "Below is an instruction that describes a task. Write a response that appropriately "         \
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"

static const struct {
    const char *name, *description, *prompt_input, *prompt_no_input, *response_split;
} builtin[] = {
    {"alpaca", "Template used by Alpaca-LoRA.", ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, "### Response:"},
    // The seed tutorial's notebook formats every row with the "with input" text, so a row
    // without input gets an empty "### Input:" section.
    {"unsloth", "The Unsloth Alpaca notebook's template: the alpaca-lora \"with input\" text for every row.",
     ALPACA_PROMPT_INPUT, NULL, "### Response:"},
};

const char *alpaca_template_builtin_list(void)
{
    return "alpaca, unsloth";
}

AlpacaTemplate *alpaca_template_builtin(const char *name, Err *err)
{
    for (size_t i = 0; i < sizeof builtin / sizeof builtin[0]; i++)
        if (!strcmp(name, builtin[i].name)) {
            char what[64];
            snprintf(what, sizeof what, "built-in template %s", name);
            return template_new(what, builtin[i].description, builtin[i].prompt_input,
                                builtin[i].prompt_no_input, builtin[i].response_split, err);
        }
    err_set(err, "unknown template \"%s\" (built in: %s; a file name needs a '/' or .json)", name,
            alpaca_template_builtin_list());
    return NULL;
}

AlpacaTemplate *alpaca_template_load(const char *path, Err *err)
{
    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        if (jerr.line > 0)
            err_set(err, "%s:%d: template is not valid JSON: %s", path, jerr.line, jerr.text);
        else
            err_set(err, "%s: %s", path, jerr.text);
        return NULL;
    }
    AlpacaTemplate *t = NULL;
    const char *value[4] = {NULL, NULL, NULL, NULL};
    static const char *const keys[4] = {"description", "prompt_input", "prompt_no_input", "response_split"};
    if (!json_is_object(root)) {
        err_set(err, "%s: a template is a JSON object with prompt_input (and prompt_no_input, "
                "response_split, description)", path);
        goto done;
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        int k = 0;
        while (k < 4 && strcmp(key, keys[k]))
            k++;
        if (k == 4) {
            err_set(err, "%s: unknown template key \"%s\" (description, prompt_input, prompt_no_input, "
                    "response_split)", path, key);
            goto done;
        }
        if (!json_is_string(v)) {
            err_set(err, "%s: template key \"%s\" must be a string", path, key);
            goto done;
        }
        if (strlen(json_string_value(v)) != json_string_length(v)) {
            err_set(err, "%s: template key \"%s\" contains a NUL character", path, key);
            goto done;
        }
        value[k] = json_string_value(v);
    }
    if (!value[1]) {
        err_set(err, "%s: template has no \"prompt_input\"", path);
        goto done;
    }
    t = template_new(path, value[0], value[1], value[2], value[3], err);
done:
    json_decref(root);
    return t;
}

char *alpaca_template_json(const AlpacaTemplate *t)
{
    json_t *o = json_object();
    if (!o)
        return NULL;
    if (t->description)
        json_object_set_new(o, "description", json_string(t->description));
    json_object_set_new(o, "prompt_input", json_string(t->prompt_input));
    if (t->prompt_no_input)
        json_object_set_new(o, "prompt_no_input", json_string(t->prompt_no_input));
    if (t->response_split)
        json_object_set_new(o, "response_split", json_string(t->response_split));
    char *s = json_dumps(o, JSON_INDENT(4) | JSON_PRESERVE_ORDER);
    json_decref(o);
    return s;
}

void alpaca_buf_free(AlpacaBuf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

int alpaca_format_prompt(const AlpacaTemplate *t, const AlpacaRow *row, AlpacaBuf *out, Err *err)
{
    int with_input = row->has[ALPACA_INPUT] && row->field[ALPACA_INPUT].len > 0;
    const CompiledPrompt *c = with_input ? &t->with_input : &t->without_input;
    size_t need = c->literal_len;
    for (size_t i = 0; i < c->npart; i++)
        if (c->part[i].role >= 0)
            need += row->field[c->part[i].role].len;
    if (need + 1 > out->cap) {
        size_t cap = out->cap ? out->cap : 4096;
        while (cap < need + 1)
            cap *= 2;
        char *d = realloc(out->data, cap);
        if (!d)
            return err_set(err, "out of memory for a %zu-byte prompt", need);
        out->data = d;
        out->cap = cap;
    }
    char *dst = out->data;
    for (size_t i = 0; i < c->npart; i++) {
        const TemplatePart *part = &c->part[i];
        if (part->role < 0) {
            memcpy(dst, part->text, part->len);
            dst += part->len;
        } else if (row->has[part->role]) {
            memcpy(dst, row->field[part->role].ptr, row->field[part->role].len);
            dst += row->field[part->role].len;
        }
    }
    out->len = dst - out->data;
    out->data[out->len] = '\0';
    return 0;
}

/* ---------------------------------------------------------------- the JSON scanner */

const char *alpaca_bad_name(AlpacaBad why)
{
    switch (why) {
    case ALPACA_BAD_JSON: return "malformed JSON";
    case ALPACA_BAD_NOT_OBJECT: return "not an object";
    case ALPACA_BAD_MISSING: return "missing field";
    case ALPACA_BAD_NOT_STRING: return "field not a string";
    case ALPACA_BAD_DUPLICATE: return "duplicate field";
    case ALPACA_BAD_UTF8: return "invalid UTF-8";
    }
    return "?";
}

#define MAX_DEPTH 512            // nesting of values we skip (unknown fields)
#define MAX_ROW_BYTES (1u << 28) // a longer JSONL line or array element is refused (as records are)
#define READ_CHUNK (1u << 20)

enum { SCAN_OK, SCAN_MORE, SCAN_SYNTAX };

// One row's scan over bytes [start, end). In JSONL mode end is the line's end; in array mode
// it is the end of the buffered data, and reaching it before the element is complete asks
// for more (SCAN_MORE), after which the whole element is scanned again from its start.
typedef struct {
    const unsigned char *p, *end;
    const unsigned char *row_start;   // where the scan began
    const unsigned char *line_start;  // start of the current line, for columns
    size_t col0;                      // column of row_start in its line (0-based)
    int final;                        // end is the end of the row's bytes: no more will come
    int line_mode;                    // JSONL: messages say "end of line"
    unsigned char *out;               // arena write position (decoded strings)
    uint64_t newlines;                // newlines crossed since the row's start (array mode)
    // the first row-level problem (the scan goes on so the row can be skipped)
    AlpacaBad bad;
    int bad_role;
    uint64_t bad_newlines;
    char bad_msg[300];
    // a syntax error (the scan stops)
    const char *syntax_msg;
    const unsigned char *syntax_at;
} Scan;

// 1-based column of a byte in its line.
static long column(const Scan *s, const unsigned char *at)
{
    return (long)(at - s->line_start) + 1 + (long)(s->line_start == s->row_start ? s->col0 : 0);
}

static int hit_end(Scan *s)
{
    if (!s->final)
        return SCAN_MORE;
    s->syntax_at = s->p;
    s->syntax_msg = s->line_mode ? "unexpected end of line" : "unexpected end of input";
    return SCAN_SYNTAX;
}

static int syntax(Scan *s, const char *msg)
{
    s->syntax_at = s->p;
    s->syntax_msg = msg;
    return SCAN_SYNTAX;
}

static void mark_bad(Scan *s, AlpacaBad why, int role, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void mark_bad(Scan *s, AlpacaBad why, int role, const char *fmt, ...)
{
    if (s->bad)
        return;
    s->bad = why;
    s->bad_role = role;
    s->bad_newlines = s->newlines;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->bad_msg, sizeof s->bad_msg, fmt, ap);
    va_end(ap);
}

#define NEED(s)                                                                                    \
    do {                                                                                           \
        if ((s)->p >= (s)->end)                                                                    \
            return hit_end(s);                                                                     \
    } while (0)

static inline void skip_ws(Scan *s)
{
    const unsigned char *p = s->p, *end = s->end;
    while (p < end) {
        unsigned char c = *p;
        if (c == ' ' || c == '\t' || c == '\r')
            p++;
        else if (c == '\n') {
            s->newlines++;
            s->line_start = ++p;
        } else
            break;
    }
    s->p = p;
}

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c |= 0x20;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

// Reads the 4 hex digits of a \u escape at s->p: the code unit, or -1 (SCAN_* in *status).
static long read_hex4(Scan *s, int *status)
{
    long v = 0;
    for (int i = 0; i < 4; i++) {
        if (s->p + i >= s->end) {
            *status = hit_end(s);
            return -1;
        }
        int h = hexval(s->p[i]);
        if (h < 0) {
            s->p += i;
            *status = syntax(s, "bad \\u escape: expected 4 hex digits");
            return -1;
        }
        v = v * 16 + h;
    }
    s->p += 4;
    return v;
}

// Length of the valid UTF-8 sequence starting with a byte >= 0x80 at p: 2..4; 0 when it is
// invalid (overlong, surrogate, above U+10FFFF, bad continuation); -1 when it is cut off by end.
static int utf8_valid_len(const unsigned char *p, const unsigned char *end)
{
    unsigned char c = p[0];
    int n;
    unsigned char lo = 0x80, hi = 0xBF;   // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF)
        n = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else
        return 0;
    for (int i = 1; i < n; i++) {
        if (p + i >= end)
            return -1;
        unsigned char lim_lo = i == 1 ? lo : 0x80, lim_hi = i == 1 ? hi : 0xBF;
        if (p[i] < lim_lo || p[i] > lim_hi)
            return 0;
    }
    return n;
}

static unsigned char *put_utf8(unsigned char *d, unsigned long cp)
{
    if (cp < 0x80) {
        *d++ = (unsigned char)cp;
    } else if (cp < 0x800) {
        *d++ = 0xC0 | (cp >> 6);
        *d++ = 0x80 | (cp & 0x3F);
    } else if (cp < 0x10000) {
        *d++ = 0xE0 | (cp >> 12);
        *d++ = 0x80 | ((cp >> 6) & 0x3F);
        *d++ = 0x80 | (cp & 0x3F);
    } else {
        *d++ = 0xF0 | (cp >> 18);
        *d++ = 0x80 | ((cp >> 12) & 0x3F);
        *d++ = 0x80 | ((cp >> 6) & 0x3F);
        *d++ = 0x80 | (cp & 0x3F);
    }
    return d;
}

// A string whose opening quote is at s->p, decoded into the arena at s->out. The decoded
// form is never longer than the escaped one, so the arena (as large as the buffer) has room.
static int scan_string(Scan *s, AlpacaStr *str)
{
    const unsigned char *p = s->p + 1, *end = s->end;
    unsigned char *d = s->out;
    for (;;) {
#ifdef __SSE2__
        // 16 bytes at a time while none is a quote, a backslash, a control or a non-ASCII byte
        // (the signed compare below 0x20 catches both of the last two).
        const __m128i quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\'), space = _mm_set1_epi8(' ');
        while (end - p >= 16) {
            __m128i v = _mm_loadu_si128((const __m128i *)p);
            __m128i special = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)),
                                           _mm_cmplt_epi8(v, space));
            _mm_storeu_si128((__m128i *)d, v);
            unsigned mask = (unsigned)_mm_movemask_epi8(special);
            if (mask) {
                unsigned k = (unsigned)__builtin_ctz(mask);
                p += k;
                d += k;
                break;
            }
            p += 16;
            d += 16;
        }
#endif
        if (p >= end) {
            s->p = p;
            return hit_end(s);
        }
        unsigned char c = *p;
        if (c == '"') {
            str->ptr = (const char *)s->out;
            str->len = d - s->out;
            s->out = d;
            s->p = p + 1;
            return SCAN_OK;
        }
        if (c >= 0x20 && c < 0x80 && c != '\\') {
            *d++ = c;
            p++;
            continue;
        }
        if (c >= 0x80) {
            int n = utf8_valid_len(p, end);
            if (n < 0 && !s->final) {
                s->p = p;
                return SCAN_MORE;
            }
            if (n <= 0) {
                s->p = p;
                mark_bad(s, ALPACA_BAD_UTF8, -1, "invalid UTF-8 (byte 0x%02X at column %ld)", c, column(s, p));
                *d++ = c;
                p++;
                continue;
            }
            for (int i = 0; i < n; i++)
                *d++ = p[i];
            p += n;
            continue;
        }
        if (c < 0x20) {
            s->p = p;
            return syntax(s, c == '\n' ? "unescaped newline in a string" : "unescaped control character in a string");
        }
        // a backslash escape
        if (p + 1 >= end) {
            s->p = p;
            return hit_end(s);
        }
        unsigned char e = p[1];
        p += 2;
        switch (e) {
        case '"': *d++ = '"'; break;
        case '\\': *d++ = '\\'; break;
        case '/': *d++ = '/'; break;
        case 'b': *d++ = '\b'; break;
        case 'f': *d++ = '\f'; break;
        case 'n': *d++ = '\n'; break;
        case 'r': *d++ = '\r'; break;
        case 't': *d++ = '\t'; break;
        case 'u': {
            int status = SCAN_OK;
            s->p = p;
            long cu = read_hex4(s, &status);
            if (cu < 0)
                return status;
            p = s->p;
            unsigned long cp = (unsigned long)cu;
            if (cu >= 0xD800 && cu <= 0xDBFF) {
                // a high surrogate must be followed by \u and a low one
                if (end - p >= 2 && p[0] == '\\' && p[1] == 'u') {
                    s->p = p + 2;
                    long lo = read_hex4(s, &status);
                    if (lo < 0)
                        return status;
                    if (lo >= 0xDC00 && lo <= 0xDFFF) {
                        p = s->p;
                        cp = 0x10000 + (((unsigned long)cu - 0xD800) << 10) + ((unsigned long)lo - 0xDC00);
                        d = put_utf8(d, cp);
                        break;
                    }
                    s->p = p;   // p still at the second escape: decode it on its own next
                } else if (end - p < 2 && !s->final) {
                    s->p = p;
                    return SCAN_MORE;
                }
                mark_bad(s, ALPACA_BAD_UTF8, -1, "lone surrogate \\u%04lX at column %ld", (unsigned long)cu,
                         column(s, p - 6));
                break;
            }
            if (cu >= 0xDC00 && cu <= 0xDFFF) {
                mark_bad(s, ALPACA_BAD_UTF8, -1, "lone surrogate \\u%04lX at column %ld", (unsigned long)cu,
                         column(s, p - 6));
                break;
            }
            d = put_utf8(d, cp);
            break;
        }
        default:
            s->p = p - 1;
            return syntax(s, "unknown escape in a string");
        }
    }
}

// A literal true/false/null at s->p.
static int scan_literal(Scan *s, const char *word)
{
    size_t n = strlen(word);
    for (size_t i = 0; i < n; i++) {
        if (s->p >= s->end)
            return hit_end(s);
        if (*s->p != (unsigned char)word[i])
            return syntax(s, "unexpected character (not a JSON value)");
        s->p++;
    }
    return SCAN_OK;
}

static int is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

// -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? at s->p. A number that runs into the end
// of the buffered data may go on: ask for more unless this is the end.
static int scan_number(Scan *s)
{
#define PEEK() (s->p < s->end ? *s->p : (s->final ? 0 : -1))
    int c = PEEK();
    if (c == '-') {
        s->p++;
        c = PEEK();
    }
    if (c < 0)
        return SCAN_MORE;
    if (c == '0')
        s->p++;
    else if (is_digit(c))
        while ((c = PEEK()) > 0 && is_digit(c))
            s->p++;
    else
        return syntax(s, "bad number");
    if ((c = PEEK()) < 0)
        return SCAN_MORE;
    if (c == '.') {
        s->p++;
        if ((c = PEEK()) < 0)
            return SCAN_MORE;
        if (!is_digit(c))
            return syntax(s, "bad number: a digit must follow '.'");
        while ((c = PEEK()) > 0 && is_digit(c))
            s->p++;
        if (c < 0)
            return SCAN_MORE;
    }
    if (c == 'e' || c == 'E') {
        s->p++;
        if ((c = PEEK()) < 0)
            return SCAN_MORE;
        if (c == '+' || c == '-') {
            s->p++;
            if ((c = PEEK()) < 0)
                return SCAN_MORE;
        }
        if (!is_digit(c))
            return syntax(s, "bad number: a digit must follow the exponent");
        while ((c = PEEK()) > 0 && is_digit(c))
            s->p++;
        if (c < 0)
            return SCAN_MORE;
    }
    return SCAN_OK;
#undef PEEK
}

static const char *value_kind(unsigned char c)
{
    switch (c) {
    case '{': return "an object";
    case '[': return "an array";
    case '"': return "a string";
    case 't': case 'f': return "a boolean";
    case 'n': return "null";
    default: return "a number";
    }
}

// An object member's key (at s->p) and its ':', for skip_value: the key is decoded to check
// its UTF-8, then its arena space given back.
static int skip_key(Scan *s, unsigned char *arena_mark)
{
    AlpacaStr scratch;
    int r;
    if (*s->p != '"')
        return syntax(s, "expected a string key");
    if ((r = scan_string(s, &scratch)) != SCAN_OK)
        return r;
    s->out = arena_mark;
    skip_ws(s);
    NEED(s);
    if (*s->p != ':')
        return syntax(s, "expected ':' after a key");
    s->p++;
    return SCAN_OK;
}

// Any JSON value at s->p (after whitespace), checked and passed over. Strings are decoded
// into the arena scratch space (then given back), so their UTF-8 is checked too.
static int skip_value(Scan *s)
{
    char stack[MAX_DEPTH];   // the closing bracket expected at each open level
    int depth = 0, r;
    unsigned char *arena_mark = s->out;
    AlpacaStr scratch;
    for (;;) {
        // a value
        skip_ws(s);
        NEED(s);
        switch (*s->p) {
        case '"':
            if ((r = scan_string(s, &scratch)) != SCAN_OK)
                return r;
            s->out = arena_mark;
            break;
        case 't': if ((r = scan_literal(s, "true")) != SCAN_OK) return r; break;
        case 'f': if ((r = scan_literal(s, "false")) != SCAN_OK) return r; break;
        case 'n': if ((r = scan_literal(s, "null")) != SCAN_OK) return r; break;
        case '{':
        case '[': {
            if (depth == MAX_DEPTH)
                return syntax(s, "nesting deeper than 512 levels");
            char close = *s->p == '{' ? '}' : ']';
            s->p++;
            skip_ws(s);
            NEED(s);
            if (*s->p == close) {
                s->p++;
                break;
            }
            stack[depth++] = close;
            if (close == '}' && (r = skip_key(s, arena_mark)) != SCAN_OK)
                return r;
            continue;   // the first member's value
        }
        default:
            if (*s->p == '-' || is_digit(*s->p)) {
                if ((r = scan_number(s)) != SCAN_OK)
                    return r;
                break;
            }
            return syntax(s, "unexpected character (not a JSON value)");
        }
        // after a value: close levels, or go on to the next member
        for (;;) {
            if (depth == 0)
                return SCAN_OK;
            skip_ws(s);
            NEED(s);
            char close = stack[depth - 1];
            if (*s->p == close) {
                s->p++;
                depth--;
                continue;
            }
            if (*s->p != ',')
                return syntax(s, close == '}' ? "expected ',' or '}'" : "expected ',' or ']'");
            s->p++;
            if (close == '}') {
                skip_ws(s);
                NEED(s);
                if ((r = skip_key(s, arena_mark)) != SCAN_OK)
                    return r;
            }
            break;
        }
    }
}

// One row: an object whose role keys hold strings; any other value is passed over and the
// row marked "not an object".
static int scan_row(Scan *s, const AlpacaFields *fields, const size_t *key_len, AlpacaRow *row)
{
    int r;
    skip_ws(s);
    NEED(s);
    if (*s->p != '{') {
        unsigned char c = *s->p;
        if ((r = skip_value(s)) != SCAN_OK)
            return r;
        mark_bad(s, ALPACA_BAD_NOT_OBJECT, -1, "expected an object, found %s", value_kind(c));
        return SCAN_OK;
    }
    s->p++;
    skip_ws(s);
    NEED(s);
    if (*s->p == '}') {
        s->p++;
        return SCAN_OK;
    }
    for (;;) {
        NEED(s);
        if (*s->p != '"')
            return syntax(s, "expected a string key");
        AlpacaStr key;
        if ((r = scan_string(s, &key)) != SCAN_OK)
            return r;
        skip_ws(s);
        NEED(s);
        if (*s->p != ':')
            return syntax(s, "expected ':' after a key");
        s->p++;
        skip_ws(s);
        NEED(s);
        int role = -1;
        for (int k = 0; k < ALPACA_NROLES; k++)
            if (key.len == key_len[k] && !memcmp(key.ptr, fields->name[k], key.len)) {
                role = k;
                break;
            }
        if (role < 0) {
            if (row->nunknown < ALPACA_MAX_UNKNOWN)
                row->unknown[row->nunknown++] = key;
            if ((r = skip_value(s)) != SCAN_OK)
                return r;
        } else {
            if (row->has[role])
                mark_bad(s, ALPACA_BAD_DUPLICATE, role, "field \"%s\" appears twice", fields->name[role]);
            unsigned char c = *s->p;
            if (c == '"') {
                if ((r = scan_string(s, &row->field[role])) != SCAN_OK)
                    return r;
                row->has[role] = 1;
            } else {
                if ((r = skip_value(s)) != SCAN_OK)
                    return r;
                // a null input is an absent input (as Python's `if input:` treats it)
                if (!(c == 'n' && role == ALPACA_INPUT))
                    mark_bad(s, ALPACA_BAD_NOT_STRING, role, "field \"%s\" is %s, not a string",
                             fields->name[role], value_kind(c));
            }
        }
        skip_ws(s);
        NEED(s);
        if (*s->p == '}') {
            s->p++;
            return SCAN_OK;
        }
        if (*s->p != ',')
            return syntax(s, "expected ',' or '}'");
        s->p++;
        skip_ws(s);
    }
}

/* ---------------------------------------------------------------- the parser */

struct AlpacaParser {
    AlpacaFields fields;
    size_t key_len[ALPACA_NROLES];
    AlpacaReadFn read;
    void *ctx;
    unsigned char *buf;       // (cap) bytes: [pos, len) not yet consumed
    size_t cap, pos, len;
    size_t scan_from;         // JSONL: where the newline search goes on after a refill
    unsigned char *arena;     // (cap + 64) bytes: the current row's decoded strings
    int eof;                  // read returned 0: [pos, len) is all there is
    int format;
    int state;                // array mode, see ARRAY_*
    uint64_t line;            // the line at buf[pos] (array) / lines consumed (JSONL)
    size_t col;               // array: the column of buf[pos] in its line (0-based)
    int bom_checked;
    uint64_t element;         // array elements seen
};

enum { ARRAY_OPEN, ARRAY_FIRST, ARRAY_AFTER, ARRAY_NEXT, ARRAY_CLOSED };

AlpacaParser *alpaca_parser_new(const AlpacaFields *fields, Err *err)
{
    AlpacaParser *p = calloc(1, sizeof *p);
    if (p) {
        p->cap = READ_CHUNK;
        p->buf = malloc(p->cap);
        p->arena = malloc(p->cap + 64);
    }
    if (!p || !p->buf || !p->arena) {
        alpaca_parser_free(p);
        err_set(err, "out of memory");
        return NULL;
    }
    p->fields = *fields;
    for (int k = 0; k < ALPACA_NROLES; k++)
        p->key_len[k] = strlen(fields->name[k]);
    return p;
}

void alpaca_parser_free(AlpacaParser *p)
{
    if (!p)
        return;
    free(p->buf);
    free(p->arena);
    free(p);
}

void alpaca_parser_start(AlpacaParser *p, AlpacaReadFn read, void *ctx)
{
    p->read = read;
    p->ctx = ctx;
    p->pos = p->len = p->scan_from = 0;
    p->eof = 0;
    p->format = ALPACA_FORMAT_UNKNOWN;
    p->state = ARRAY_OPEN;
    p->line = 0;
    p->col = 0;
    p->bom_checked = 0;
    p->element = 0;
}

int alpaca_parser_format(const AlpacaParser *p)
{
    return p->format;
}

// Moves the unconsumed bytes to the front, grows the buffer when they fill it, and reads.
// 0 with more data (or eof set); REFILL_ROW for a row too long (the message wants the row's
// line in front), REFILL_READ for a read error (the message names the input already).
enum { REFILL_ROW = -1, REFILL_READ = -2 };

static int refill(AlpacaParser *p, Err *err)
{
    if (p->pos > 0) {
        memmove(p->buf, p->buf + p->pos, p->len - p->pos);
        p->len -= p->pos;
        p->scan_from -= p->scan_from >= p->pos ? p->pos : p->scan_from;
        p->pos = 0;
    }
    if (p->len == p->cap) {
        if (p->cap >= MAX_ROW_BYTES)
            return err_set(err, "a row longer than %u MiB", MAX_ROW_BYTES >> 20);
        size_t cap = p->cap * 2;
        unsigned char *b = realloc(p->buf, cap);
        if (!b)
            return err_set(err, "out of memory for a row of %zu bytes", p->len);
        p->buf = b;
        unsigned char *a = realloc(p->arena, cap + 64);
        if (!a)
            return err_set(err, "out of memory for a row of %zu bytes", p->len);
        p->arena = a;
        p->cap = cap;
    }
    ssize_t n = p->read(p->ctx, p->buf + p->len, p->cap - p->len, err);
    if (n < 0)
        return REFILL_READ;
    if (n == 0)
        p->eof = 1;
    p->len += (size_t)n;
    return 0;
}

static void row_clear(AlpacaRow *row)
{
    memset(row->has, 0, sizeof row->has);
    for (int k = 0; k < ALPACA_NROLES; k++)
        row->field[k] = (AlpacaStr){"", 0};
    row->nunknown = 0;
    row->bad = 0;
    row->bad_role = -1;
}

// After a completed scan: the row's verdict. line0 is the line the row started on.
static int finish_row(Scan *s, const AlpacaFields *fields, AlpacaRow *row, uint64_t line0, Err *err)
{
    if (!s->bad) {
        for (int k = 0; k < ALPACA_NROLES; k++)
            if (fields->required[k] && !row->has[k]) {
                mark_bad(s, ALPACA_BAD_MISSING, k, "missing field \"%s\"", fields->name[k]);
                s->bad_newlines = 0;   // a missing field is the row's fault, not a place's
            }
    }
    if (!s->bad) {
        row->line = line0;
        return ALPACA_ROW_OK;
    }
    row->bad = s->bad;
    row->bad_role = s->bad_role;
    row->line = line0 + s->bad_newlines;
    err_set(err, "%s", s->bad_msg);
    return ALPACA_ROW_BAD;
}

static void scan_init(Scan *s, AlpacaParser *p, const unsigned char *start, const unsigned char *end, int final)
{
    memset(s, 0, sizeof *s);
    s->p = s->line_start = s->row_start = start;
    s->col0 = p->format == ALPACA_FORMAT_ARRAY ? p->col : 0;
    s->end = end;
    s->final = final;
    s->out = p->arena;
    s->bad_role = -1;
}

static int syntax_error(AlpacaParser *p, Scan *s, AlpacaRow *row, uint64_t line0, Err *err)
{
    row->line = line0 + s->newlines;
    row->bad = ALPACA_BAD_JSON;
    row->bad_role = -1;
    err_set(err, "malformed JSON (column %ld): %s", column(s, s->syntax_at), s->syntax_msg);
    return p->format == ALPACA_FORMAT_JSONL ? ALPACA_ROW_BAD : ALPACA_ROW_FATAL;
}

static int next_jsonl(AlpacaParser *p, AlpacaRow *row, Err *err)
{
    for (;;) {
        unsigned char *nl = memchr(p->buf + p->scan_from, '\n', p->len - p->scan_from);
        if (!nl && !p->eof) {
            p->scan_from = p->len;
            int rc = refill(p, err);
            if (rc < 0) {
                row->line = rc == REFILL_READ ? 0 : p->line + 1;
                return ALPACA_ROW_FATAL;
            }
            continue;
        }
        if (!nl && p->pos == p->len)
            return ALPACA_ROW_END;
        unsigned char *start = p->buf + p->pos, *end = nl ? nl : p->buf + p->len;
        p->pos = (size_t)(end - p->buf) + (nl ? 1 : 0);
        p->scan_from = p->pos;
        uint64_t line = ++p->line;
        row_clear(row);
        row->index = line;
        Scan s;
        scan_init(&s, p, start, end, 1);
        s.line_mode = 1;
        skip_ws(&s);
        if (s.p == end)
            continue;   // a blank line
        int r = scan_row(&s, &p->fields, p->key_len, row);
        if (r == SCAN_OK) {
            skip_ws(&s);
            if (s.p != end)
                r = syntax(&s, "more after the object (JSON Lines hold one object per line)");
        }
        if (r != SCAN_OK)
            return syntax_error(p, &s, row, line, err);
        return finish_row(&s, &p->fields, row, line, err);
    }
}

// Array mode: skips whitespace between elements, reading on as needed.
static int array_ws(AlpacaParser *p, Err *err)
{
    for (;;) {
        while (p->pos < p->len) {
            unsigned char c = p->buf[p->pos];
            if (c == '\n') {
                p->line++;
                p->col = 0;
            } else if (c != ' ' && c != '\t' && c != '\r') {
                return 0;
            } else {
                p->col++;
            }
            p->pos++;
        }
        if (p->eof)
            return 0;
        if (refill(p, err) < 0)
            return -1;
    }
}

static int array_fatal(AlpacaRow *row, uint64_t line, Err *err, const char *msg)
{
    row->line = line;
    row->bad = ALPACA_BAD_JSON;
    err_set(err, "%s", msg);
    return ALPACA_ROW_FATAL;
}

static int next_array(AlpacaParser *p, AlpacaRow *row, Err *err)
{
    for (;;) {
        row_clear(row);
        if (array_ws(p, err) < 0) {
            row->line = 0;
            return ALPACA_ROW_FATAL;
        }
        int at_end = p->pos == p->len;
        unsigned char c = at_end ? 0 : p->buf[p->pos];
        switch (p->state) {
        case ARRAY_OPEN:   // detection saw '['
            p->pos++;
            p->col++;
            p->state = ARRAY_FIRST;
            continue;
        case ARRAY_FIRST:
        case ARRAY_NEXT:
            if (at_end)
                return array_fatal(row, p->line, err, "malformed JSON: the array is not closed (input ends)");
            if (c == ']') {
                if (p->state == ARRAY_NEXT)
                    return array_fatal(row, p->line, err, "malformed JSON: ']' after ',' (a trailing comma)");
                p->pos++;
                p->state = ARRAY_CLOSED;
                continue;
            }
            break;   // an element
        case ARRAY_AFTER:
            if (at_end)
                return array_fatal(row, p->line, err, "malformed JSON: the array is not closed (input ends)");
            if (c == ',') {
                p->pos++;
                p->col++;
                p->state = ARRAY_NEXT;
                continue;
            }
            if (c == ']') {
                p->pos++;
                p->col++;
                p->state = ARRAY_CLOSED;
                continue;
            }
            return array_fatal(row, p->line, err, "malformed JSON: expected ',' or ']' after an array element");
        case ARRAY_CLOSED:
            if (at_end)
                return ALPACA_ROW_END;
            return array_fatal(row, p->line, err, "malformed JSON: more after the array's closing ']'");
        }
        // An element starts at pos; scan it, reading on while it is incomplete.
        for (;;) {
            Scan s;
            scan_init(&s, p, p->buf + p->pos, p->buf + p->len, p->eof);
            row_clear(row);
            row->index = p->element + 1;
            int r = scan_row(&s, &p->fields, p->key_len, row);
            if (r == SCAN_MORE) {
                int rc = refill(p, err);
                if (rc < 0) {
                    row->line = rc == REFILL_READ ? 0 : p->line;
                    return ALPACA_ROW_FATAL;
                }
                continue;
            }
            uint64_t line0 = p->line;
            if (r == SCAN_SYNTAX)
                return syntax_error(p, &s, row, line0, err);
            p->element++;
            p->pos = (size_t)(s.p - p->buf);
            p->line += s.newlines;
            p->col = (size_t)(column(&s, s.p) - 1);
            p->state = ARRAY_AFTER;
            return finish_row(&s, &p->fields, row, line0, err);
        }
    }
}

int alpaca_parser_next(AlpacaParser *p, AlpacaRow *row, Err *err)
{
    if (p->format == ALPACA_FORMAT_UNKNOWN) {
        // Detect from the first byte that is not whitespace (after a UTF-8 byte order mark).
        size_t i = 0;
        for (;;) {
            size_t have = p->len - p->pos;
            if (!p->bom_checked && have < 3 && !p->eof && !memcmp(p->buf + p->pos, "\xEF\xBB\xBF", have)) {
                if (refill(p, err) < 0) {   // too few bytes to tell whether a BOM starts the input
                    row->line = 0;
                    return ALPACA_ROW_FATAL;
                }
                continue;
            }
            if (!p->bom_checked && have >= 3 && !memcmp(p->buf + p->pos, "\xEF\xBB\xBF", 3))
                p->pos += 3;
            p->bom_checked = 1;
            i = p->pos;
            while (i < p->len && (p->buf[i] == ' ' || p->buf[i] == '\t' || p->buf[i] == '\r' || p->buf[i] == '\n'))
                i++;
            if (i < p->len || p->eof)
                break;
            if (refill(p, err) < 0) {
                row->line = 0;
                return ALPACA_ROW_FATAL;
            }
        }
        if (i == p->len)
            return ALPACA_ROW_END;   // empty or only whitespace: no rows
        unsigned char c = p->buf[i];
        if (c == '[') {
            p->format = ALPACA_FORMAT_ARRAY;
            p->line = 1;
        } else if (c == '{' || (c >= 0x20 && c < 0x7F)) {
            p->format = ALPACA_FORMAT_JSONL;   // a bad first line is that line's problem
        } else {
            row->line = 1;
            row->bad = ALPACA_BAD_JSON;
            return err_set(err, "not JSON Lines or a JSON array: starts with byte 0x%02X (binary data?)", c);
        }
    }
    return p->format == ALPACA_FORMAT_JSONL ? next_jsonl(p, row, err) : next_array(p, row, err);
}
