// pack: token records in, training shards out (man/pack.1, format man/shard.5).
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "packer.h"
#include "record.h"
#include "tokenizer.h"

static const char usage[] =
    "usage: pack -s SEQ_LEN -o OUT [options] [file...]\n"
    "Pack token records (from tok) into shards of SEQ_LEN-token rows for lora-train.\n"
    "  -s, --seq-len N         tokens per row (required)\n"
    "  -o, --output OUT        a directory (shards + index.json); NAME.tar, NAME.tar.gz,\n"
    "                          NAME.tgz or NAME.zip (an archive); - (a tar stream on stdout)\n"
    "  -m, --model DIR         take vocab size and pad id from DIR/config.json and check\n"
    "                          the records' tokenizer fingerprint against DIR's tokenizer\n"
    "  -V, --vocab-size N      reject token ids >= N (without -m)\n"
    "  -P, --pad-id N          id stored at padding (default: the model's pad or EOS id, else 0)\n"
    "  -f, --first-fit         place documents first-fit decreasing (default: best-fit)\n"
    "  -p, --pad               one document per row, no packing\n"
    "  -t, --truncate          cut documents longer than a row to SEQ_LEN tokens\n"
    "  -d, --drop              drop documents longer than a row (default: split them)\n"
    "  -a, --all-tokens        train on every token (default: responses only)\n"
    "  -S, --seed N            shuffle and split seed (default 0)\n"
    "  -n, --no-shuffle        keep rows in placement order\n"
    "  -F, --val-fraction F    put this fraction of the rows (0 < F < 1) into a validation set\n"
    "  -C, --val-count N       put N rows into a validation set\n"
    "  -O, --val-output OUT    where the validation set goes (same forms as -o)\n"
    "  -z, --shard-size BYTES  bytes per shard file, suffix k, M, G or T, as 1.5G (default 256M)\n"
    "  -1, --single            write one shard file named OUT, no index\n"
    "  -q, --quiet             no statistics or progress on stderr\n"
    "  -h, --help              show this help\n";

typedef struct {
    const char *out, *val_out, *model;
    uint32_t seq_len, vocab_size, pad_id;
    int have_pad, single, quiet, shuffle, all_tokens;
    unsigned mode, long_policy;
    uint64_t seed, val_count, shard_bytes;
    double val_fraction;
} Options;

static uint64_t parse_u64(const char *s, const char *what, uint64_t max)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || *end || s[0] == '-' || v > max)
        cli_usage_error(usage, "%s: not a number in 0..%" PRIu64 ": '%s'", what, max, s);
    return v;
}

// vocab size and pad id from a Hugging Face config.json (the model's embedding rows bound
// the ids; Llama configs often have no pad token, so EOS is the usual stand-in).
static void read_model_config(Options *o)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", o->model);
    json_error_t je;
    json_t *cfg = json_load_file(path, 0, &je);
    if (!cfg)
        cli_die(EXIT_DATA, "%s: %s", path, je.text);
    json_t *v = json_object_get(cfg, "vocab_size");
    if (!json_is_integer(v) || json_integer_value(v) <= 0 || json_integer_value(v) > UINT32_MAX)
        cli_die(EXIT_DATA, "%s: no usable vocab_size", path);
    if (!o->vocab_size)
        o->vocab_size = (uint32_t)json_integer_value(v);
    if (!o->have_pad) {
        json_t *pad = json_object_get(cfg, "pad_token_id"), *eos = json_object_get(cfg, "eos_token_id");
        if (json_is_array(eos))
            eos = json_array_get(eos, 0);
        json_t *use = json_is_integer(pad) ? pad : eos;
        if (json_is_integer(use) && json_integer_value(use) >= 0 && json_integer_value(use) < o->vocab_size) {
            o->pad_id = (uint32_t)json_integer_value(use);
            o->have_pad = 1;
        }
    }
    json_decref(cfg);
}

static void progress(const Options *o, const PackInput *in, int last)
{
    if (o->quiet || !isatty(STDERR_FILENO))
        return;
    if (last)
        fputs("\r\033[K", stderr);
    else
        fprintf(stderr, "\r%s: %" PRIu64 " documents, %" PRIu64 " tokens", prog, in->n_docs, in->n_tokens);
}

// A regular file is read through a read-only mapping of it, as a memory stream (fmemopen):
// the records are copied out of the page cache in user space, without the read() system
// calls that copy the whole input through the kernel first (about a tenth of pack's CPU
// time; an unbuffered memory stream is far slower in glibc, hence the 64 KiB buffer).
// Anything else (stdin, a pipe, an empty file, a mapping refused) is read the usual way, in
// 1 MiB reads. The pages read are unmapped as the reading goes on (read_input): the tokens
// are copied out of them. (A file truncated while pack reads it ends pack with SIGBUS, as
// any mmap reader.)
static FILE *open_input(const char *path, void **map, size_t *map_size)
{
    *map = NULL;
    if (path && strcmp(path, "-") != 0) {
        int fd = open(path, O_RDONLY);
        struct stat st;
        if (fd >= 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0) {
            size_t size = (size_t)st.st_size;
            void *m = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
            FILE *f = m != MAP_FAILED ? fmemopen(m, size, "r") : NULL;
            if (f && setvbuf(f, NULL, _IOFBF, 1 << 16) == 0) {
                close(fd);
                *map = m;
                *map_size = size;
                return f;
            }
            if (f)
                fclose(f);
            if (m != MAP_FAILED)
                munmap(m, size);
        }
        if (fd >= 0)
            close(fd);
    }
    FILE *f = cli_open_in(path);   // names the file in its message when it cannot be opened
    if (f)
        setvbuf(f, NULL, _IOFBF, 1 << 20);   // records are read in large pieces, not 4 KiB reads
    return f;
}

static int read_input(const char *path, PackInput *in, const Options *o)
{
    void *map;
    size_t map_size = 0;
    uint64_t map_dropped = 0;   // bytes at the start of the mapping already unmapped
    FILE *f = open_input(path, &map, &map_size);
    if (!f)
        return -1;
    const char *name = path && strcmp(path, "-") ? path : "<stdin>";
    Err err;
    RecReader *r = rec_reader_open(f, name, &err);
    int rc = r ? 0 : -1;
    Record rec;
    int got;
    while (r && (got = rec_read(r, &rec, &err)) == 1) {
        if (pack_input_add(in, &rec, &err) < 0) {
            rc = -1;
            if (rec.kind == REC_TEXT) {
                cli_error("%s", err.msg);
                cli_hint("text records need tokenizing first: alp-fmt data.json | tok -m MODEL | pack ...");
                err.msg[0] = 0;
            }
            break;
        }
        if ((in->n_records & 0xffff) == 0)
            progress(o, in, 0);
        if (map && rec_reader_offset(r) - map_dropped >= (32u << 20)) {
            // the records read are copied out: unmap their pages (the page cache keeps them),
            // so that the mapping does not add the input's size to pack's resident memory
            uint64_t upto = rec_reader_offset(r) & ~(uint64_t)4095;
            madvise((char *)map + map_dropped, upto - map_dropped, MADV_DONTNEED);
            map_dropped = upto;
        }
    }
    if (r && rc == 0 && got < 0)
        rc = -1;
    if (rc < 0 && err.msg[0])
        cli_error("%s", err.msg);
    rec_reader_close(r);
    if (f != stdin)
        fclose(f);
    if (map)
        munmap(map, map_size);
    return rc;
}

static void print_stats(const Options *o, const PackInput *in, const PackPlan *plan, uint64_t n_train, uint64_t n_val)
{
    const PackStats *s = &plan->stats;
    fprintf(stderr, "%s: %" PRIu64 " documents, %" PRIu64 " tokens (%" PRIu64 " empty records skipped)\n", prog,
            s->docs, s->tokens, in->n_empty);
    fprintf(stderr, "%s: longer than %" PRIu32 ": %" PRIu64 " split, %" PRIu64 " truncated (%" PRIu64
            " tokens cut), %" PRIu64 " dropped (%" PRIu64 " tokens)\n",
            prog, o->seq_len, s->split_docs, s->truncated_docs, s->truncated_tokens, s->dropped_long_docs,
            s->dropped_long_tokens);
    if (s->untrained_pieces)
        fprintf(stderr, "%s: %" PRIu64 " documents or pieces have no trained target (all labels -100): dropped, %" PRIu64
                " tokens\n", prog, s->untrained_pieces, s->untrained_tokens);
    double slots = (double)s->rows * o->seq_len;
    fprintf(stderr, "%s: %" PRIu64 " rows of %" PRIu32 " (%s): fill %.1f%%, trained targets %.1f%% of tokens\n", prog,
            s->rows, o->seq_len, shard_mode_name(o->mode), slots ? 100.0 * (double)s->row_tokens / slots : 0.0,
            s->row_tokens ? 100.0 * (double)s->targets / (double)s->row_tokens : 0.0);
    fprintf(stderr, "%s: %" PRIu64 " training rows -> %s", prog, n_train, o->out);
    if (n_val)
        fprintf(stderr, ", %" PRIu64 " validation rows -> %s", n_val, o->val_out);
    fputc('\n', stderr);
}

int main(int argc, char **argv)
{
    cli_init(argv[0]);
    // A file size limit (ulimit -f) then fails a write like a full disk does, and the
    // temporary files are removed, instead of the signal killing us mid-shard.
    signal(SIGXFSZ, SIG_IGN);
    Options o = {.shuffle = 1, .shard_bytes = 256ull << 20, .mode = SHARD_MODE_BEST_FIT};
    int have_fraction = 0, have_count = 0;
    static const struct option longs[] = {
        {"seq-len", required_argument, 0, 's'},    {"output", required_argument, 0, 'o'},
        {"model", required_argument, 0, 'm'},      {"vocab-size", required_argument, 0, 'V'},
        {"pad-id", required_argument, 0, 'P'},     {"first-fit", no_argument, 0, 'f'},
        {"pad", no_argument, 0, 'p'},              {"truncate", no_argument, 0, 't'},
        {"drop", no_argument, 0, 'd'},             {"all-tokens", no_argument, 0, 'a'},
        {"seed", required_argument, 0, 'S'},       {"no-shuffle", no_argument, 0, 'n'},
        {"val-fraction", required_argument, 0, 'F'}, {"val-count", required_argument, 0, 'C'},
        {"val-output", required_argument, 0, 'O'}, {"shard-size", required_argument, 0, 'z'},
        {"single", no_argument, 0, '1'},           {"quiet", no_argument, 0, 'q'},
        {"help", no_argument, 0, 'h'},             {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "s:o:m:V:P:fptdaS:nF:C:O:z:1qh", longs, NULL)) != -1) {
        switch (c) {
        case 's': o.seq_len = (uint32_t)parse_u64(optarg, "--seq-len", SHARD_MAX_SEQ_LEN); break;
        case 'o': o.out = optarg; break;
        case 'm': o.model = optarg; break;
        case 'V': o.vocab_size = (uint32_t)parse_u64(optarg, "--vocab-size", UINT32_MAX); break;
        case 'P': o.pad_id = (uint32_t)parse_u64(optarg, "--pad-id", UINT32_MAX - 1); o.have_pad = 1; break;
        case 'f': o.mode = SHARD_MODE_FIRST_FIT; break;
        case 'p': o.mode = SHARD_MODE_PAD; break;
        case 't': o.long_policy = SHARD_LONG_TRUNCATE; break;
        case 'd': o.long_policy = SHARD_LONG_DROP; break;
        case 'a': o.all_tokens = 1; break;
        case 'S': o.seed = parse_u64(optarg, "--seed", UINT64_MAX); break;
        case 'n': o.shuffle = 0; break;
        case 'F': {
            char *end;
            o.val_fraction = strtod(optarg, &end);
            if (end == optarg || *end || !(o.val_fraction > 0 && o.val_fraction < 1))
                cli_usage_error(usage, "--val-fraction: want a number between 0 and 1: '%s'", optarg);
            have_fraction = 1;
            break;
        }
        case 'C': o.val_count = parse_u64(optarg, "--val-count", UINT64_MAX); have_count = 1; break;
        case 'O': o.val_out = optarg; break;
        case 'z': o.shard_bytes = cli_parse_size(usage, "--shard-size", optarg); break;
        case '1': o.single = 1; break;
        case 'q': o.quiet = 1; break;
        case 'h': cli_help(usage);
        default: cli_usage_error(usage, "unknown option");
        }
    }
    if (!o.seq_len)
        cli_usage_error(usage, "--seq-len is required (and above 0)");
    if (!o.out)
        cli_usage_error(usage, "--output is required");
    if (have_fraction && have_count)
        cli_usage_error(usage, "--val-fraction and --val-count exclude each other");
    if ((have_fraction || (have_count && o.val_count)) && !o.val_out)
        cli_usage_error(usage, "a validation split needs --val-output");
    if (o.val_out && !(have_fraction || have_count))
        cli_usage_error(usage, "--val-output without --val-fraction or --val-count");
    if (o.val_out && strcmp(o.val_out, "-") == 0 && strcmp(o.out, "-") == 0)
        cli_usage_error(usage, "the training and validation sets cannot both go to standard output");
    if (o.single && (strcmp(o.out, "-") == 0 || (o.val_out && strcmp(o.val_out, "-") == 0)))
        cli_usage_error(usage, "--single writes a file: give it a name, not -");
    if (o.model)
        read_model_config(&o);
    if (!o.vocab_size)
        cli_usage_error(usage, "the vocab size is needed: -m MODEL_DIR or --vocab-size N");
    if (o.have_pad && o.vocab_size && o.pad_id >= o.vocab_size)
        cli_usage_error(usage, "--pad-id %" PRIu32 " is not below the vocab size %" PRIu32, o.pad_id, o.vocab_size);
    if ((strcmp(o.out, "-") == 0 || (o.val_out && strcmp(o.val_out, "-") == 0)) &&
        cli_refuse_tty("send the tar stream to a file or a pipe (pack ... -o - | tar -t), or use -o DIR"))
        return EXIT_USAGE;

    PackInput in = {.vocab_size = o.vocab_size, .all_tokens = o.all_tokens};
    int status = EXIT_OK;
    if (optind == argc)
        status = read_input(NULL, &in, &o) < 0 ? EXIT_DATA : EXIT_OK;
    for (int i = optind; i < argc && status == EXIT_OK; i++)
        status = read_input(argv[i], &in, &o) < 0 ? EXIT_DATA : EXIT_OK;
    progress(&o, &in, 1);
    if (status != EXIT_OK) {
        pack_input_free(&in);
        cli_error("nothing written");
        return status;
    }
    if (o.model) {   // the records' tokenizer must be the model's
        Err err;
        Tokenizer *tk = tokenizer_load(o.model, &err);
        if (!tk)
            cli_die(EXIT_DATA, "%s", err.msg);
        uint64_t fp = tokenizer_fingerprint(tk);
        tokenizer_free(tk);
        if (in.n_docs && in.fingerprint != fp) {
            cli_error("records were made by tokenizer %016" PRIx64 ", %s has tokenizer %016" PRIx64, in.fingerprint,
                      o.model, fp);
            cli_hint("tokenize again with tok -m %s", o.model);
            return EXIT_DATA;
        }
    }
    Err err;
    PackPlan plan;
    PackSettings ps = {o.seq_len, o.mode, o.long_policy};
    if (pack_plan(&in, &ps, &plan, &err) < 0)
        cli_die(EXIT_DATA, "%s", err.msg);
    uint64_t n_val = have_count ? o.val_count : (uint64_t)(o.val_fraction * (double)plan.n_rows + 0.5);
    if (have_fraction && n_val == 0 && plan.n_rows > 1)
        n_val = 1;   // a requested split is never silently empty
    if (plan.n_rows == 0 || n_val >= plan.n_rows) {
        if (!o.quiet)
            print_stats(&o, &in, &plan, 0, 0);
        cli_error(plan.n_rows ? "a validation split of %" PRIu64 " rows leaves no training rows"
                              : "no rows to write (%" PRIu64 " rows asked for validation)", n_val);
        if (!plan.n_rows)
            cli_hint("documents with no trained tokens are dropped; --all-tokens trains on prompts too");
        return EXIT_DATA;
    }
    uint64_t *train, *val, n_train;
    if (pack_split(&plan, o.seed, o.shuffle, n_val, &train, &n_train, &val, &err) < 0)
        cli_die(EXIT_DATA, "%s", err.msg);
    ShardHeader settings = {
        .seq_len = o.seq_len, .vocab_size = o.vocab_size, .pad_id = o.pad_id, .fingerprint = in.fingerprint,
        .pack_mode = (uint8_t)o.mode, .long_policy = (uint8_t)o.long_policy,
        .loss_policy = o.all_tokens ? SHARD_LOSS_ALL : SHARD_LOSS_RESPONSE,
        .flags = o.shuffle ? SHARD_FLAG_SHUFFLED : 0, .seed = o.seed,
    };
    uint64_t stride = shard_row_stride(o.seq_len);
    uint64_t per = o.shard_bytes > SHARD_HEADER_SIZE + stride ? (o.shard_bytes - SHARD_HEADER_SIZE) / stride : 1;
    // Rows are built on up to 4 threads (memory-bound copying and hashing: more gain little);
    // the bytes written do not depend on the count.
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    unsigned threads = cpus > 4 ? 4 : cpus > 1 ? (unsigned)cpus : 1;
    PackOutput out = {o.out, o.single, per, threads, 0};
    if (pack_write_set(&in, &plan, train, n_train, &settings, &out, &err) < 0) {
        cli_error("%s", err.msg);
        status = EXIT_DATA;
    } else if (n_val) {
        PackOutput vout = {o.val_out, o.single, per, threads, 0};
        if (pack_write_set(&in, &plan, val, n_val, &settings, &vout, &err) < 0) {
            cli_error("%s", err.msg);
            status = EXIT_DATA;
        }
    }
    if (status == EXIT_OK && !o.quiet)
        print_stats(&o, &in, &plan, n_train, n_val);
    free(train);
    free(val);
    pack_plan_free(&plan);
    pack_input_free(&in);
    return cli_finish_stdout(status);
}
