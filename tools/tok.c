// tok: text records to token records with a model's tokenizer, and back (man/tok.1).
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "tok_records.h"
#include "tokenizer.h"

static const char usage[] =
    "usage: tok -m MODEL [-bBq] [-e ID] [-j N] [file ...]\n"
    "       tok -d -m MODEL [-stq] [-j N] [file ...]\n"
    "Turn text records into token records with a model's tokenizer, or back with -d;\n"
    "no file or - reads standard input.\n"
    "  -m, --model=DIR|FILE  Hugging Face model directory, or its tokenizer.json or tokenizer.model\n"
    "  -j, --jobs=N          threads (default: the number of cores); the output is the same for any N\n"
    "  -b, --bos             begin every record with BOS (default: as the model does)\n"
    "  -B, --no-bos          add no BOS (a BOS already in the text stays)\n"
    "  -e, --eos-id=ID       the id appended after segments marked eos (default: the model's EOS)\n"
    "  -d, --decode          token records back to text records\n"
    "  -s, --skip-special    decode: leave special tokens out\n"
    "  -t, --text            decode: print plain text, one line per record, instead of records\n"
    "  -q, --quiet           no statistics on stderr\n"
    "  -h, --help            print this help and exit\n";

static void warn_line(const char *msg) { cli_error("%s", msg); }

int main(int argc, char **argv)
{
    cli_init(argv[0]);
    static const struct option longopts[] = {
        { "model", required_argument, NULL, 'm' }, { "jobs", required_argument, NULL, 'j' },
        { "bos", no_argument, NULL, 'b' },          { "no-bos", no_argument, NULL, 'B' },
        { "eos-id", required_argument, NULL, 'e' }, { "decode", no_argument, NULL, 'd' },
        { "skip-special", no_argument, NULL, 's' }, { "text", no_argument, NULL, 't' },
        { "quiet", no_argument, NULL, 'q' },        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    TokOptions o = { .bos = -1, .eos_id = -1, .threads = 0 };
    const char *model = NULL;
    int quiet = 0, c;
    opterr = 0;   // our own message, with the program's short name
    while ((c = getopt_long(argc, argv, ":m:j:bBe:dstqh", longopts, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case 'j': o.threads = (int)cli_parse_long(usage, "--jobs", optarg, 1, 1024); break;
        case 'b': o.bos = 1; break;
        case 'B': o.bos = 0; break;
        case 'e': o.eos_id = cli_parse_long(usage, "--eos-id", optarg, 0, UINT32_MAX); break;
        case 'd': o.decode = 1; break;
        case 's': o.skip_special = 1; break;
        case 't': o.plain_text = 1; break;
        case 'q': quiet = 1; break;
        case 'h': cli_help(usage);
        case ':': cli_usage_error(usage, "option %s needs an argument", argv[optind - 1]);
        default: cli_usage_error(usage, "unknown option %s", argv[optind - 1]);
        }
    }
    if (!model) cli_usage_error(usage, "-m MODEL is required");
    if (!o.decode && (o.skip_special || o.plain_text))
        cli_usage_error(usage, "-%c is for decoding (-d)", o.skip_special ? 's' : 't');
    if (o.decode && o.bos != -1) cli_usage_error(usage, "-%c is for encoding, not -d", o.bos ? 'b' : 'B');
    if (o.threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        o.threads = n > 0 ? (int)n : 1;
    }
    if (!(o.decode && o.plain_text) && cli_refuse_tty("pipe into a file, pack, or `recs dump`"))
        return EXIT_USAGE;

    Err err;
    omp_set_num_threads(o.threads);   // -j bounds the load's threads too
    Tokenizer *t = tokenizer_load(model, &err);
    if (!t) {
        cli_error("%s", err.msg);
        cli_hint("-m takes a model directory with tokenizer.json or tokenizer.model, or one of those files");
        return EXIT_DATA;
    }
    if (o.bos == 1 && tokenizer_bos_id(t) < 0) cli_die(EXIT_DATA, "%s: the tokenizer has no BOS token", model);
    if (o.eos_id >= (int64_t)tokenizer_vocab_size(t))
        cli_die(EXIT_USAGE, "--eos-id %" PRId64 " is outside the vocabulary (%u)", o.eos_id, tokenizer_vocab_size(t));

    TokStats st = { 0 };
    int status = EXIT_OK;
    for (int i = optind; i < argc || i == optind; i++) {
        const char *path = i < argc ? argv[i] : "-";
        FILE *f = cli_open_in(path);
        if (!f) {
            status = EXIT_DATA;
            continue;
        }
        const char *name = strcmp(path, "-") ? path : "<stdin>";
        int rc = tok_stream(t, &o, f, name, stdout, &st, warn_line, &err);
        if (rc < 0) cli_error("%s", err.msg);
        if (rc != 0) status = EXIT_DATA;
        if (f != stdin) fclose(f);
        if (rc < 0 && strstr(err.msg, "write error")) break;
        if (i + 1 >= argc) break;
    }
    if (!quiet) {
        if (o.decode)
            fprintf(stderr, "%s: %" PRIu64 " records, %" PRIu64 " tokens decoded\n", prog, st.records, st.tokens);
        else
            fprintf(stderr,
                    "%s: %" PRIu64 " records, %" PRIu64 " tokens (%" PRIu64 " trained), %" PRIu64
                    " straddling a segment boundary (kept in the segment where they start)\n",
                    prog, st.records, st.tokens, st.trained_tokens, st.straddles);
    }
    if (st.bad_records) cli_error("%" PRIu64 " bad records skipped", st.bad_records);
    tokenizer_free(t);
    return cli_finish_stdout(status);
}
