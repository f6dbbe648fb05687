// alp-fmt: Alpaca-style JSON / JSON Lines in, text records (prompt, response) out.
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "alpaca.h"
#include "cli.h"
#include "input.h"
#include "record.h"

static const char usage[] =
    "usage: alp-fmt [-kpT] [-t template] [-f role=key] ... [file ...]\n"
    "       alp-fmt -S [-t template]\n"
    "Format Alpaca rows (JSON Lines or a JSON array; plain, compressed, or members of tar and zip\n"
    "archives; no file or - is stdin) into text records of a prompt and a response.\n"
    "  -t, --template=NAME|FILE  alpaca (default), unsloth, or an alpaca-lora JSON template file\n"
    "  -f, --field=ROLE=KEY      read ROLE (instruction, input or output) from the field KEY\n"
    "  -p, --prompt-only         prompts with an empty response and no EOS (for generation)\n"
    "  -T, --text                print the formatted examples for humans instead of records\n"
    "  -k, --skip-bad            skip bad rows and report their count by reason at the end\n"
    "  -S, --show-template       print the template in alpaca-lora JSON form and exit\n"
    "  -h, --help                print this help and exit\n";

#define SKIP_REPORT_MAX 10   // skipped rows reported one by one; the rest only counted

typedef struct {
    int prompt_only, text, skip_bad;
    const AlpacaTemplate *tmpl;
    AlpacaBuf prompt;
    uint64_t rows_out, rows_skipped, text_examples;
    // skipped rows by reason ("missing \"output\""), in first-seen order
    struct { char reason[300]; uint64_t count; } *skips;
    size_t nskips;
    // field names reported once as ignored
    char **unknown;
    size_t nunknown;
} Run;

static ssize_t read_input(void *ctx, void *buf, size_t cap, Err *err)
{
    return input_read(ctx, buf, cap, err);
}

// Archive members we format: JSON and JSON Lines by name; others are named and passed over
// (unless asked for by name, "archive.tar:member").
static int is_json_name(const char *name)
{
    const char *dot = strrchr(name, '.');
    const char *slash = strrchr(name, '/');
    if (!dot || (slash && dot < slash))
        return 0;
    return !strcasecmp(dot, ".json") || !strcasecmp(dot, ".jsonl") || !strcasecmp(dot, ".ndjson");
}

static void note_unknown_fields(Run *run, const char *name, const AlpacaRow *row)
{
    for (size_t i = 0; i < row->nunknown; i++) {
        const AlpacaStr *key = &row->unknown[i];
        size_t j = 0;
        while (j < run->nunknown && !(strlen(run->unknown[j]) == key->len && !memcmp(run->unknown[j], key->ptr, key->len)))
            j++;
        if (j < run->nunknown)
            continue;
        char **grown = realloc(run->unknown, (run->nunknown + 1) * sizeof *grown);
        char *copy = strndup(key->ptr, key->len);
        if (!grown || !copy)
            cli_die(EXIT_DATA, "out of memory");
        run->unknown = grown;
        run->unknown[run->nunknown++] = copy;
        cli_error("%s:%llu: ignoring field \"%s\" (not one of the template's fields; reported once)", name,
                  (unsigned long long)row->line, copy);
    }
}

static void count_skip(Run *run, const AlpacaRow *row, const AlpacaFields *fields)
{
    char reason[300];
    const char *key = row->bad_role >= 0 ? fields->name[row->bad_role] : "";
    switch (row->bad) {
    case ALPACA_BAD_MISSING: snprintf(reason, sizeof reason, "missing \"%s\"", key); break;
    case ALPACA_BAD_NOT_STRING: snprintf(reason, sizeof reason, "\"%s\" not a string", key); break;
    case ALPACA_BAD_DUPLICATE: snprintf(reason, sizeof reason, "\"%s\" twice", key); break;
    default: snprintf(reason, sizeof reason, "%s", alpaca_bad_name(row->bad)); break;
    }
    run->rows_skipped++;
    for (size_t i = 0; i < run->nskips; i++)
        if (!strcmp(run->skips[i].reason, reason)) {
            run->skips[i].count++;
            return;
        }
    void *grown = realloc(run->skips, (run->nskips + 1) * sizeof *run->skips);
    if (!grown)
        cli_die(EXIT_DATA, "out of memory");
    run->skips = grown;
    snprintf(run->skips[run->nskips].reason, sizeof run->skips[run->nskips].reason, "%s", reason);
    run->skips[run->nskips++].count = 1;
}

static void emit(Run *run, const char *name, const AlpacaRow *row)
{
    Err err;
    if (alpaca_format_prompt(run->tmpl, row, &run->prompt, &err) < 0)
        cli_die(EXIT_DATA, "%s", err.msg);
    const AlpacaStr *output = &row->field[ALPACA_OUTPUT];
    if (run->text) {
        // A header per example, like head(1) with several files, then the text as the model sees it.
        printf("%s==> %s:%llu <==\n", run->text_examples++ ? "\n" : "", name, (unsigned long long)row->index);
        fwrite(run->prompt.data, 1, run->prompt.len, stdout);
        size_t tail_len = run->prompt_only ? 0 : output->len;
        fwrite(output->ptr, 1, tail_len, stdout);
        const char *last = tail_len ? output->ptr + tail_len - 1 : run->prompt.len ? run->prompt.data + run->prompt.len - 1 : "\n";
        if (*last != '\n')
            putchar('\n');
    } else {
        RecSegment seg[2] = {
            {.flags = 0, .len = run->prompt.len, .text = run->prompt.data},
            run->prompt_only ? (RecSegment){.flags = REC_TRAINED, .len = 0, .text = ""}
                             : (RecSegment){.flags = REC_TRAINED | REC_EOS, .len = output->len, .text = output->ptr},
        };
        Record rec = {.kind = REC_TEXT, .origin_index = row->index, .fingerprint = 0, .origin = name,
                      .origin_len = strlen(name), .nseg = 2, .seg = seg};
        if (rec_write(stdout, &rec, &err) < 0) {
            cli_finish_stdout(EXIT_DATA);   // quiet when the reader went away
            cli_die(EXIT_DATA, "%s:%llu: %s", name, (unsigned long long)row->line, err.msg);
        }
    }
    run->rows_out++;
}

// One stream (a file or an archive member). Returns 0, or -1 after a fatal error was printed.
static int format_stream(Run *run, AlpacaParser *parser, Input *in, const AlpacaFields *fields)
{
    const char *name = input_name(in);
    alpaca_parser_start(parser, read_input, in);
    AlpacaRow row;
    Err err;
    for (;;) {
        int r = alpaca_parser_next(parser, &row, &err);
        if (r == ALPACA_ROW_END)
            return 0;
        // Unknown fields of a row that parsed (even one then refused: "Output" for "output").
        if (r == ALPACA_ROW_OK || (r == ALPACA_ROW_BAD && row.bad != ALPACA_BAD_JSON))
            note_unknown_fields(run, name, &row);
        if (r == ALPACA_ROW_OK) {
            emit(run, name, &row);
            continue;
        }
        char where[64] = "";
        if (alpaca_parser_format(parser) == ALPACA_FORMAT_ARRAY && r == ALPACA_ROW_BAD)
            snprintf(where, sizeof where, "element %llu: ", (unsigned long long)row.index);
        if (r == ALPACA_ROW_BAD && run->skip_bad) {
            count_skip(run, &row, fields);
            if (run->rows_skipped <= SKIP_REPORT_MAX)
                cli_error("%s:%llu: %sskipped: %s", name, (unsigned long long)row.line, where, err.msg);
            else if (run->rows_skipped == SKIP_REPORT_MAX + 1)
                cli_error("further skipped rows are counted, not shown");
            continue;
        }
        if (row.line > 0)
            cli_error("%s:%llu: %s%s", name, (unsigned long long)row.line, where, err.msg);
        else
            cli_error("%s", err.msg);
        if (r == ALPACA_ROW_BAD)
            cli_hint("--skip-bad skips such rows and counts them");
        else if (row.line > 0 && run->skip_bad)
            cli_hint("a broken JSON array cannot be resynchronised; fix it, or convert it to JSON Lines");
        if (row.bad == ALPACA_BAD_JSON && alpaca_parser_format(parser) == ALPACA_FORMAT_JSONL &&
            strstr(err.msg, "end of line"))
            cli_hint("JSON Lines hold one object per line (jq -c . FILE writes them)");
        return -1;
    }
}

// A template argument names a file when it has a '/' or ends in .json, else a built-in.
static int is_template_file(const char *spec)
{
    size_t n = strlen(spec);
    return strchr(spec, '/') || (n >= 5 && !strcasecmp(spec + n - 5, ".json"));
}

int main(int argc, char **argv)
{
    cli_init(argv[0]);
    static const struct option longopts[] = {
        {"template", required_argument, NULL, 't'}, {"field", required_argument, NULL, 'f'},
        {"prompt-only", no_argument, NULL, 'p'},    {"text", no_argument, NULL, 'T'},
        {"skip-bad", no_argument, NULL, 'k'},       {"show-template", no_argument, NULL, 'S'},
        {"help", no_argument, NULL, 'h'},           {NULL, 0, NULL, 0},
    };
    Run run = {0};
    AlpacaFields fields;
    alpaca_fields_default(&fields);
    const char *template_spec = "alpaca";
    int show_template = 0, c;
    Err err;
    while ((c = getopt_long(argc, argv, "t:f:pTkSh", longopts, NULL)) != -1) {
        switch (c) {
        case 't': template_spec = optarg; break;
        case 'f':
            if (alpaca_fields_set(&fields, optarg, &err) < 0)
                cli_usage_error(usage, "%s", err.msg);
            break;
        case 'p': run.prompt_only = 1; break;
        case 'T': run.text = 1; break;
        case 'k': run.skip_bad = 1; break;
        case 'S': show_template = 1; break;
        case 'h': cli_help(usage);
        default: cli_usage_error(usage, "unknown option");
        }
    }
    if (run.prompt_only)
        fields.required[ALPACA_OUTPUT] = 0;   // questions for generation have no answers
    if (show_template && optind < argc)
        cli_usage_error(usage, "--show-template takes no file");
    if (!show_template && !run.text &&
        cli_refuse_tty("pipe the records into tok or `recs dump`, or read them with --text"))
        return EXIT_USAGE;
    AlpacaTemplate *tmpl;
    if (is_template_file(template_spec)) {
        if (!(tmpl = alpaca_template_load(template_spec, &err)))
            cli_die(EXIT_DATA, "%s", err.msg);
    } else if (!(tmpl = alpaca_template_builtin(template_spec, &err))) {
        cli_usage_error(usage, "%s", err.msg);
    }
    run.tmpl = tmpl;
    if (show_template) {
        char *json = alpaca_template_json(tmpl);
        if (!json)
            cli_die(EXIT_DATA, "out of memory");
        puts(json);
        free(json);
        alpaca_template_free(tmpl);
        return cli_finish_stdout(EXIT_OK);
    }
    setvbuf(stdout, NULL, _IOFBF, 1 << 20);

    AlpacaParser *parser = alpaca_parser_new(&fields, &err);
    if (!parser)
        cli_die(EXIT_DATA, "%s", err.msg);
    int status = EXIT_OK, nfiles = argc - optind;
    for (int i = 0; i < (nfiles ? nfiles : 1) && status != -1; i++) {
        const char *path = nfiles ? argv[optind + i] : "-";
        Input *in = input_open(path, &err);
        if (!in) {
            cli_error("%s", err.msg);   // a file that cannot be opened: go on with the others
            status = EXIT_DATA;
            continue;
        }
        int r;
        while ((r = input_next(in, &err)) == 1) {
            const char *member = input_member(in);
            if (member && !input_wanted_member(in) && !is_json_name(member)) {
                cli_error("%s: passing over archive member \"%s\" (not .json, .jsonl or .ndjson)", path, member);
                continue;
            }
            if (format_stream(&run, parser, in, &fields) < 0) {
                r = -2;
                break;
            }
        }
        if (r == -1)
            cli_error("%s", err.msg);
        if (r < 0)
            status = -1;   // a bad row or broken stream ends the run: later rows would be out of place
        input_close(in);
    }
    if (status == -1)
        status = EXIT_DATA;
    if (run.rows_skipped) {
        char summary[4096];
        size_t n = 0;
        for (size_t i = 0; i < run.nskips && n < sizeof summary; i++)
            n += snprintf(summary + n, sizeof summary - n, "%s%llu %s", i ? ", " : "",
                          (unsigned long long)run.skips[i].count, run.skips[i].reason);
        cli_error("skipped %llu of %llu rows: %s", (unsigned long long)run.rows_skipped,
                  (unsigned long long)(run.rows_skipped + run.rows_out), summary);
    }
    alpaca_parser_free(parser);
    alpaca_template_free(tmpl);
    alpaca_buf_free(&run.prompt);
    for (size_t i = 0; i < run.nunknown; i++)
        free(run.unknown[i]);
    free(run.unknown);
    free(run.skips);
    return cli_finish_stdout(status);
}
