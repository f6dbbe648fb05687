// The Alpaca parser and templates: rows must come out the same however the input is cut into
// reads (a row straddling buffer refills is rescanned from its start), and the templates
// follow alpaca-lora's str.format rules.
#include "alpaca.h"

#include <stdlib.h>
#include <string.h>

#include "tap.h"

// Hands out a memory buffer `chunk` bytes at a time (0: all at once).
typedef struct {
    const char *data;
    size_t len, pos, chunk;
} Feed;

static ssize_t feed_read(void *ctx, void *buf, size_t cap, Err *err)
{
    (void)err;
    Feed *f = ctx;
    size_t n = f->len - f->pos;
    if (f->chunk && n > f->chunk)
        n = f->chunk;
    if (n > cap)
        n = cap;
    memcpy(buf, f->data + f->pos, n);
    f->pos += n;
    return (ssize_t)n;
}

// Parses everything and renders "index:line:status:instruction|input|output;" per row.
static char *render(const char *data, size_t chunk)
{
    AlpacaFields fields;
    alpaca_fields_default(&fields);
    Err err;
    AlpacaParser *p = alpaca_parser_new(&fields, &err);
    Feed feed = {data, strlen(data), 0, chunk};
    alpaca_parser_start(p, feed_read, &feed);
    size_t cap = 1 << 16, len = 0;
    char *out = malloc(cap);
    out[0] = '\0';
    AlpacaRow row;
    for (;;) {
        int r = alpaca_parser_next(p, &row, &err);
        if (r == ALPACA_ROW_END)
            break;
        char line[600];
        int n = snprintf(line, sizeof line, "%llu:%llu:%d:%.*s|%.*s|%.*s;", (unsigned long long)row.index,
                         (unsigned long long)row.line, r, (int)row.field[0].len, row.field[0].ptr,
                         (int)row.field[1].len, row.field[1].ptr, (int)row.field[2].len, row.field[2].ptr);
        if (r != ALPACA_ROW_OK)
            n = snprintf(line, sizeof line, "%llu:%llu:%d:%s;", (unsigned long long)row.index,
                         (unsigned long long)row.line, r, err.msg);
        while (len + (size_t)n + 1 > cap)
            out = realloc(out, cap *= 2);
        memcpy(out + len, line, (size_t)n + 1);
        len += (size_t)n;
        if (r == ALPACA_ROW_FATAL)
            break;
    }
    alpaca_parser_free(p);
    return out;
}

static void same_for_all_chunkings(const char *name, const char *data, const char *want)
{
    char *whole = render(data, 0);
    is_str(whole, want, "%s: whole input", name);
    int same = 1;
    for (size_t chunk = 1; chunk <= 17; chunk++) {
        char *got = render(data, chunk);
        if (strcmp(got, whole)) {
            same = 0;
            printf("# chunk %zu: %s\n", chunk, got);
        }
        free(got);
    }
    ok(same, "%s: the same rows with reads of 1..17 bytes", name);
    free(whole);
}

static char *prompt_for(const AlpacaTemplate *t, const char *instruction, const char *input)
{
    AlpacaRow row = {0};
    row.field[ALPACA_INSTRUCTION] = (AlpacaStr){instruction, strlen(instruction)};
    row.has[ALPACA_INSTRUCTION] = 1;
    if (input) {
        row.field[ALPACA_INPUT] = (AlpacaStr){input, strlen(input)};
        row.has[ALPACA_INPUT] = 1;
    }
    AlpacaBuf buf = {0};
    Err err;
    alpaca_format_prompt(t, &row, &buf, &err);
    return buf.data;
}

static AlpacaTemplate *template_from(const char *json, Err *err)
{
    char path[] = "/tmp/alpaca_test_XXXXXX";
    int fd = mkstemp(path);
    FILE *f = fdopen(fd, "w");
    fputs(json, f);
    fclose(f);
    AlpacaTemplate *t = alpaca_template_load(path, err);
    remove(path);
    return t;
}

int main(void)
{
    same_for_all_chunkings("JSON Lines",
        "{\"instruction\":\"a\\u00e9\\ud83d\\ude00\",\"output\":\"b\"}\n"
        "\n"
        "{\"instruction\":\"x\",\"input\":\"y\",\"output\":\"z\",\"n\":[1.5e3,{\"k\":null}]}\r\n"
        "{\"instruction\":\"x\"}\n"
        "{\"instruction\":\"x\",\"output\":\"z\"\n"
        "{\"instruction\":\"\xc3\xa9\",\"input\":null,\"output\":\"\"}",
        "1:1:1:a\xc3\xa9\xf0\x9f\x98\x80||b;"
        "3:3:1:x|y|z;"
        "4:4:2:missing field \"output\";"
        "5:5:2:malformed JSON (column 32): unexpected end of line;"
        "6:6:1:\xc3\xa9||;");

    same_for_all_chunkings("JSON array",
        "\xef\xbb\xbf [\n  {\"instruction\": \"a\", \"output\": \"b\"},\n"
        "  {\"output\": \"b\", \"x\": [true, false, -0.5],\n   \"instruction\": \"long enough to cross reads\"},\n"
        "  {\"instruction\": \"a\", \"output\": 7}\n]\n",
        "1:2:1:a||b;"
        "2:3:1:long enough to cross reads||b;"
        "3:5:2:field \"output\" is a number, not a string;");

    same_for_all_chunkings("broken JSON array",
        "[{\"instruction\": \"a\", \"output\": \"b\"},\n {\"instruction\": \"a\" \"output\": \"b\"}]",
        "1:1:1:a||b;"
        "2:2:-1:malformed JSON (column 22): expected ',' or '}';");

    same_for_all_chunkings("empty input", "  \n", "");
    same_for_all_chunkings("empty array", "[ ]", "");

    // Field remapping
    AlpacaFields fields;
    Err err;
    alpaca_fields_default(&fields);
    ok(alpaca_fields_set(&fields, "instruction=question", &err) == 0 && !strcmp(fields.name[0], "question"),
       "--field instruction=question");
    ok(alpaca_fields_set(&fields, "prompt=x", &err) < 0 && strstr(err.msg, "unknown role"), "unknown role refused");
    ok(alpaca_fields_set(&fields, "output=question", &err) < 0 && strstr(err.msg, "already"),
       "two roles on one key refused");
    ok(alpaca_fields_set(&fields, "output", &err) < 0, "a mapping without '=' refused");

    // Templates: built-ins, str.format braces, and the errors of template files
    AlpacaTemplate *t = alpaca_template_builtin("unsloth", &err);
    char *s = prompt_for(t, "I", NULL);
    ok(strstr(s, "### Instruction:\nI\n\n### Input:\n\n\n### Response:\n") != NULL,
       "unsloth: an empty Input section for a row without input");
    free(s);
    alpaca_template_free(t);
    ok(alpaca_template_builtin("vicuna", &err) == NULL && strstr(err.msg, "alpaca, unsloth"),
       "unknown built-in names the built-ins");

    t = template_from("{\"prompt_input\": \"{{x}} {instruction}/{input}}}\"}", &err);
    ok(t != NULL, "a template with only prompt_input loads");
    if (t) {
        s = prompt_for(t, "I", NULL);
        is_str(s, "{x} I/}", "{{ and }} are literal braces; prompt_input serves rows without input");
        free(s);
        alpaca_template_free(t);
    }
    struct { const char *json, *msg; } bad[] = {
        {"{\"prompt_input\": \"{output}\"}", "unknown placeholder {output}"},
        {"{\"prompt_input\": \"{instruction\"}", "unmatched '{'"},
        {"{\"prompt_input\": \"a } b\"}", "single '}'"},
        {"{\"prompt_no_input\": \"x\"}", "no \"prompt_input\""},
        {"{\"prompt_input\": \"x\", \"promt_no_input\": \"y\"}", "unknown template key"},
        {"{\"prompt_input\": 3}", "must be a string"},
        {"{\"prompt_input\": \"x\", \"response_split\": \"### R\"}", "does not occur"},
        {"[1]", "a template is a JSON object"},
        {"{\"prompt_input\": ", "not valid JSON"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        t = template_from(bad[i].json, &err);
        ok(t == NULL && strstr(err.msg, bad[i].msg), "template %s refused: %s", bad[i].json, bad[i].msg);
        if (!t == 0) {
            alpaca_template_free(t);
        } else if (!strstr(err.msg, bad[i].msg)) {
            printf("#   message: %s\n", err.msg);
        }
    }
    return done_testing();
}
