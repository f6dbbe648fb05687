// shard: look into a shard set made by pack: header and statistics, checksums, rows as JSON
// lines (man/shard.1; the format is man/shard.5).
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "dataset.h"

static const char usage[] =
    "usage: shard [-j] [-c] [-d] [-r FIRST[-LAST]] [-q] SET\n"
    "Show a shard set (a directory with index.json, one shard file, or a tar/zip archive).\n"
    "  -j, --json          print the settings and statistics as one JSON object\n"
    "  -c, --check         verify every checksum; exit 1 naming the first bad file and row\n"
    "  -d, --dump          print rows as JSON lines (ids, target_ids, doc, pos, trained)\n"
    "  -r, --rows RANGE    rows to dump: N, FIRST-LAST or FIRST- (0-based, inclusive)\n"
    "  -q, --quiet         --check: say nothing when all is well\n"
    "  -h, --help          show this help\n"
    "Without -c or -d, prints the settings and statistics as text.\n";

static void print_info(const char *path, const DatasetInfo *in, int json)
{
    double slots = (double)in->n_rows * in->seq_len;
    double fill = slots ? (double)in->n_tokens / slots : 0;
    double trained = in->n_tokens ? (double)in->n_targets / (double)in->n_tokens : 0;
    if (json) {
        printf("{\"seq_len\":%" PRIu32 ",\"vocab_size\":%" PRIu32 ",\"pad_id\":%" PRIu32
               ",\"fingerprint\":\"%016" PRIx64 "\",\"rows\":%" PRIu64 ",\"shards\":%" PRIu32 ",\"tokens\":%" PRIu64
               ",\"targets\":%" PRIu64 ",\"docs\":%" PRIu64 ",\"pack_mode\":\"%s\",\"long\":\"%s\",\"loss\":\"%s\""
               ",\"seed\":\"%016" PRIx64 "\",\"fill\":%.6f,\"trained_fraction\":%.6f}\n",
               in->seq_len, in->vocab_size, in->pad_id, in->fingerprint, in->n_rows, in->n_shards, in->n_tokens,
               in->n_targets, in->n_docs, shard_mode_name(in->pack_mode), shard_long_name(in->long_policy),
               shard_loss_name(in->loss_policy), in->pack_seed, fill, trained);
        return;
    }
    printf("set:          %s\n", path);
    printf("seq_len:      %" PRIu32 "\n", in->seq_len);
    printf("vocab_size:   %" PRIu32 "\n", in->vocab_size);
    printf("pad_id:       %" PRIu32 "\n", in->pad_id);
    printf("fingerprint:  %016" PRIx64 "\n", in->fingerprint);
    printf("packing:      %s, long documents %s, loss on %s tokens, seed %" PRIu64 "\n",
           shard_mode_name(in->pack_mode), shard_long_name(in->long_policy), shard_loss_name(in->loss_policy),
           in->pack_seed);
    printf("rows:         %" PRIu64 " in %" PRIu32 " shard%s\n", in->n_rows, in->n_shards, in->n_shards == 1 ? "" : "s");
    printf("documents:    %" PRIu64 " (pieces)\n", in->n_docs);
    printf("tokens:       %" PRIu64 " (fill %.1f%%)\n", in->n_tokens, 100 * fill);
    printf("targets:      %" PRIu64 " trained (%.1f%% of tokens)\n", in->n_targets, 100 * trained);
}

static void parse_rows(const char *s, uint64_t *first, uint64_t *last)
{
    char *end;
    errno = 0;
    *first = strtoull(s, &end, 10);
    *last = *first;
    if (*end == '-') {
        const char *rest = end + 1;
        *last = *rest ? strtoull(rest, &end, 10) : UINT64_MAX;
        if (!*rest)
            end = (char *)rest;
    }
    if (errno || end == s || *end || s[0] == '-' || *last < *first)
        cli_usage_error(usage, "--rows: want N, FIRST-LAST or FIRST-: '%s'", s);
}

int main(int argc, char **argv)
{
    cli_init(argv[0]);
    int json = 0, check = 0, dump = 0, quiet = 0, have_rows = 0;
    uint64_t first = 0, last = UINT64_MAX;
    static const struct option longs[] = {
        {"json", no_argument, 0, 'j'}, {"check", no_argument, 0, 'c'}, {"dump", no_argument, 0, 'd'},
        {"rows", required_argument, 0, 'r'}, {"quiet", no_argument, 0, 'q'}, {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "jcdr:qh", longs, NULL)) != -1) {
        switch (c) {
        case 'j': json = 1; break;
        case 'c': check = 1; break;
        case 'd': dump = 1; break;
        case 'r': parse_rows(optarg, &first, &last); have_rows = 1; break;
        case 'q': quiet = 1; break;
        case 'h': cli_help(usage);
        default: cli_usage_error(usage, "unknown option");
        }
    }
    if (optind + 1 != argc)
        cli_usage_error(usage, optind == argc ? "no shard set named" : "one shard set at a time");
    if (have_rows && !dump)
        cli_usage_error(usage, "--rows goes with --dump");
    const char *path = argv[optind];
    Err err;
    Dataset *d = dataset_open(path, &err);
    if (!d)
        cli_die(EXIT_DATA, "%s", err.msg);
    const DatasetInfo *info = dataset_info(d);
    int status = EXIT_OK;
    if (check) {
        if (dataset_verify(d, &err) < 0) {
            cli_error("%s", err.msg);
            status = EXIT_DATA;
        } else if (!quiet) {
            fprintf(stderr, "%s: %s: ok, %" PRIu64 " rows in %" PRIu32 " shard%s verified\n", prog, path, info->n_rows,
                    info->n_shards, info->n_shards == 1 ? "" : "s");
        }
    }
    if (dump && status == EXIT_OK) {
        if (have_rows && first >= info->n_rows) {
            cli_error("%s: row %" PRIu64 " out of range (%" PRIu64 " rows)", path, first, info->n_rows);
            status = EXIT_DATA;
        }
        for (uint64_t i = first; status == EXIT_OK && i <= last && i < info->n_rows; i++) {
            ShardRow row;
            if (dataset_row(d, i, &row, &err) < 0) {
                cli_error("%s", err.msg);
                status = EXIT_DATA;
            } else if (shard_row_write_json(stdout, i, &row) < 0) {
                break;   // cli_finish_stdout reports it
            }
        }
    }
    if (!check && !dump)
        print_info(path, info, json);
    dataset_close(d);
    return cli_finish_stdout(status);
}
