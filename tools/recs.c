// recs: inspect record streams (recs(5)): dump to JSONL, load it back, check, count.
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "record.h"

static const char usage[] =
    "usage: recs dump [file ...]\n"
    "       recs load [file ...]\n"
    "       recs check [-v] [file ...]\n"
    "       recs count [-j] [file ...]\n"
    "Inspect record streams (recs(5)); no file or - reads standard input.\n"
    "  dump           print each record as one line of JSON\n"
    "  load           turn such JSON lines back into records (dump | load gives the same bytes)\n"
    "  check          verify every record; silent when all is well\n"
    "  count          count records, segments, text bytes and tokens, per kind\n"
    "  -v, --verbose  check: print one line per good input\n"
    "  -j, --json     count: print the counts as one JSON object\n"
    "  -h, --help     print this help and exit\n";

enum command { DUMP, LOAD, CHECK, COUNT };

typedef struct {
    enum command command;
    int verbose;
    int json;
    RecStats stats;
} Run;

// Reads one input's records and handles each by the command; returns the exit status.
static int read_records(Run *run, FILE *f, const char *name)
{
    Err err;
    RecReader *r = rec_reader_open(f, name, &err);
    if (!r) {
        cli_error("%s", err.msg);
        return EXIT_DATA;
    }
    Record rec;
    int rc;
    while ((rc = rec_read(r, &rec, &err)) == 1) {
        if (run->command == DUMP && rec_to_json(stdout, &rec, &err) < 0)
            break;
        if (run->command == COUNT)
            rec_stats_add(&run->stats, &rec);
    }
    if (rc >= 0 && run->command == CHECK && run->verbose)
        printf("%s: ok: %" PRIu64 " records, %" PRIu64 " bytes\n", name, rec_reader_index(r), rec_reader_offset(r));
    rec_reader_close(r);
    if (rc == 0)
        return EXIT_OK;
    cli_error("%s", err.msg);  // a bad record, or (dump, rc 1) a failed write
    return EXIT_DATA;
}

// Reads one input of JSON lines and writes their records; stops at the first bad line.
static int load_lines(FILE *f, const char *name)
{
    Err err;
    RecJsonParser *parser = rec_json_parser_new();
    if (!parser)
        cli_die(EXIT_DATA, "out of memory");
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    unsigned long lineno = 0;
    int status = EXIT_OK;
    Record rec;
    while ((len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        if (strspn(line, " \t\r\n") == (size_t)len)
            continue;  // blank lines carry nothing
        if (rec_from_json(parser, line, (size_t)len, &rec, &err) < 0 || rec_write(stdout, &rec, &err) < 0) {
            cli_error("%s:%lu: %s", name, lineno, err.msg);
            status = EXIT_DATA;
            break;
        }
    }
    if (status == EXIT_OK && ferror(f)) {
        cli_error("%s: read error", name);
        status = EXIT_DATA;
    }
    free(line);
    rec_json_parser_free(parser);
    return status;
}

static void print_counts(const RecStats *s, int json)
{
    uint64_t records = s->text_records + s->token_records, segments = s->text_segments + s->token_segments;
    if (json) {
        printf("{\"records\":%" PRIu64 ",\"segments\":%" PRIu64 ",\"text_bytes\":%" PRIu64 ",\"tokens\":%" PRIu64
               ",\"trained_tokens\":%" PRIu64 ",\"by_kind\":{\"text\":{\"records\":%" PRIu64 ",\"segments\":%" PRIu64
               ",\"bytes\":%" PRIu64 ",\"trained_bytes\":%" PRIu64 ",\"eos\":%" PRIu64 "},\"tokens\":{\"records\":%" PRIu64
               ",\"segments\":%" PRIu64 ",\"tokens\":%" PRIu64 ",\"trained_tokens\":%" PRIu64 "}}}\n",
               records, segments, s->text_bytes, s->tokens, s->trained_tokens, s->text_records, s->text_segments,
               s->text_bytes, s->trained_text_bytes, s->eos_segments, s->token_records, s->token_segments, s->tokens,
               s->trained_tokens);
        return;
    }
    printf("%" PRIu64 " records (%" PRIu64 " text, %" PRIu64 " tokens), %" PRIu64 " segments, %" PRIu64
           " text bytes (%" PRIu64 " trained, %" PRIu64 " EOS), %" PRIu64 " tokens (%" PRIu64 " trained)\n",
           records, s->text_records, s->token_records, segments, s->text_bytes, s->trained_text_bytes,
           s->eos_segments, s->tokens, s->trained_tokens);
}

int main(int argc, char **argv)
{
    cli_init(argv[0]);
    static const struct option longopts[] = {
        {"verbose", no_argument, NULL, 'v'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    if (argc < 2)
        cli_usage_error(usage, "missing command (dump, load, check or count)");
    if (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0)
        cli_help(usage);
    static const char *const names[] = {[DUMP] = "dump", [LOAD] = "load", [CHECK] = "check", [COUNT] = "count"};
    Run run = {0};
    size_t c = 0;
    while (c < sizeof names / sizeof *names && strcmp(argv[1], names[c]) != 0)
        c++;
    if (c == sizeof names / sizeof *names)
        cli_usage_error(usage, "unknown command '%s' (dump, load, check or count)", argv[1]);
    run.command = (enum command)c;

    int opt;
    opterr = 0;       // our messages, with our name
    argc--, argv++;  // getopt sees the command as its argv[0]
    while ((opt = getopt_long(argc, argv, "vjh", longopts, NULL)) != -1) {
        switch (opt) {
        case 'v':
            if (run.command != CHECK)
                cli_usage_error(usage, "-v goes with check");
            run.verbose = 1;
            break;
        case 'j':
            if (run.command != COUNT)
                cli_usage_error(usage, "-j goes with count");
            run.json = 1;
            break;
        case 'h':
            cli_help(usage);
        default:
            cli_usage_error(usage, "%s: unknown option %s", names[run.command], argv[optind - 1]);
        }
    }
    if (run.command == LOAD && cli_refuse_tty("pipe it into a tool or a file: recs load x.jsonl > x.rec") < 0)
        return EXIT_USAGE;

    char *stdin_only[] = {"-", NULL};
    char **files = optind < argc ? argv + optind : stdin_only;
    int status = EXIT_OK;
    for (; *files; files++) {
        FILE *f = cli_open_in(*files);
        if (!f) {
            status = EXIT_DATA;
            continue;
        }
        const char *name = f == stdin ? "<stdin>" : *files;
        int st = run.command == LOAD ? load_lines(f, name) : read_records(&run, f, name);
        if (st != EXIT_OK)
            status = st;
        if (f != stdin)
            fclose(f);
    }
    if (run.command == COUNT)
        print_counts(&run.stats, run.json);
    return cli_finish_stdout(status);
}
