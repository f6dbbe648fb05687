// lora-gen: generate text from prompts with a Llama model and an optional LoRA adapter.
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "adapter.h"
#include "cli.h"
#include "gen_batch.h"
#include "generate.h"
#include "model.h"
#include "record.h"
#include "sample.h"
#include "tokenizer.h"
#include "utf8_stream.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

// On the GPU every slot reserves its context's KV cache up front.
#define GPU_DEFAULT_BATCH 64
#define GPU_DEFAULT_CONTEXT 4096

static const char usage[] =
    "usage: lora-gen -m dir [-a dir] [-l] [-p text] [-n count] [-g] [-t temp] [-k count]\n"
    "                [--top-p p] [--min-p p] [--repetition-penalty x] [-s seed] [--stop-id id]\n"
    "                [--stop text] [--bos | --no-bos] [--unmerged] [-j] [--separator text]\n"
    "                [--device cpu|cuda|auto] [-b count] [-c tokens] [--no-graphs] [-v]\n"
    "                [file ...]\n"
    "Generate text for each prompt and stream it to standard output. Prompts are text records\n"
    "(alp-fmt --prompt-only), plain lines (-l) or -p arguments; no file or - reads standard input.\n"
    "  -m, --model dir               Hugging Face model directory (required)\n"
    "  -a, --adapter dir             PEFT LoRA adapter directory (default: the base model alone)\n"
    "  -l, --lines                   inputs are plain text, one prompt per line\n"
    "  -p, --prompt text             generate for text (repeatable); no input is read\n"
    "  -n, --max-new-tokens count    at most count new tokens per prompt (default 256)\n"
    "  -g, --greedy                  always the most likely token (the default unless a sampling\n"
    "                                option is given)\n"
    "  -t, --temperature temp        sample at this temperature (0: greedy)\n"
    "  -k, --top-k count             sample among the count most likely tokens\n"
    "      --top-p p                 sample among the most likely tokens holding mass p\n"
    "      --min-p p                 drop tokens less likely than p times the most likely one\n"
    "      --repetition-penalty x    penalise tokens already seen (HF semantics; 1: off)\n"
    "  -s, --seed seed               random seed for sampling (default 0)\n"
    "      --stop-id id              also stop at this token id (repeatable; the model's EOS ids\n"
    "                                always stop)\n"
    "      --stop text               stop before this text (repeatable)\n"
    "      --bos, --no-bos           put a BOS token before each prompt, or not (default: the\n"
    "                                tokenizer's policy)\n"
    "      --unmerged                apply the adapter beside the weights instead of merging it\n"
    "  -j, --jsonl                   one JSON object per prompt instead of streamed text\n"
    "      --separator text          the line between two outputs in text mode (default empty)\n"
    "      --device cpu|cuda|auto    where to run (default auto: the GPU when there is one)\n"
    "  -b, --batch count             prompts generated at once (default 64 on the GPU, 1 on\n"
    "                                the CPU); outputs still come out in input order\n"
    "  -c, --context tokens          room for prompt + output per prompt (default: the model's\n"
    "                                context; on the GPU at most 4096)\n"
    "      --no-graphs               GPU: launch each decode step's kernels instead of replaying\n"
    "                                a captured CUDA graph (for timing; same results)\n"
    "  -v, --verbose                 say on standard error where it runs, how long loading took,\n"
    "                                and the prefill and decode rates at the end\n"
    "  -h, --help                    print this help and exit\n";

enum {
    OPT_TOP_P = 256, OPT_MIN_P, OPT_REP, OPT_STOP_ID, OPT_STOP, OPT_BOS, OPT_NO_BOS,
    OPT_UNMERGED, OPT_SEPARATOR, OPT_DEVICE, OPT_NO_GRAPHS,
};

static const struct option long_options[] = {
    {"model", required_argument, NULL, 'm'},
    {"adapter", required_argument, NULL, 'a'},
    {"lines", no_argument, NULL, 'l'},
    {"prompt", required_argument, NULL, 'p'},
    {"max-new-tokens", required_argument, NULL, 'n'},
    {"greedy", no_argument, NULL, 'g'},
    {"temperature", required_argument, NULL, 't'},
    {"top-k", required_argument, NULL, 'k'},
    {"top-p", required_argument, NULL, OPT_TOP_P},
    {"min-p", required_argument, NULL, OPT_MIN_P},
    {"repetition-penalty", required_argument, NULL, OPT_REP},
    {"seed", required_argument, NULL, 's'},
    {"stop-id", required_argument, NULL, OPT_STOP_ID},
    {"stop", required_argument, NULL, OPT_STOP},
    {"bos", no_argument, NULL, OPT_BOS},
    {"no-bos", no_argument, NULL, OPT_NO_BOS},
    {"unmerged", no_argument, NULL, OPT_UNMERGED},
    {"jsonl", no_argument, NULL, 'j'},
    {"separator", required_argument, NULL, OPT_SEPARATOR},
    {"device", required_argument, NULL, OPT_DEVICE},
    {"batch", required_argument, NULL, 'b'},
    {"context", required_argument, NULL, 'c'},
    {"no-graphs", no_argument, NULL, OPT_NO_GRAPHS},
    {"verbose", no_argument, NULL, 'v'},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
};

// Everything the prompts share, set up once.
typedef struct {
    const Tokenizer *tok;
    GenBatch *batch;
    int max_batch;
    int add_bos;          // 1 / 0
    int64_t bos_id, eos_id;
    int jsonl;
    const char *separator;
    uint64_t n_prompts;   // prompts read so far, good or bad: the sampler's stream number
    uint64_t n_outputs;   // outputs started, for the separator
    int status;           // the exit status so far
    uint32_t *ids;        // a prompt's ids, grown as needed
    size_t ids_cap;
} Run;

// One submitted prompt, until its output has been written.
typedef struct {
    Run *run;
    char *origin;
    size_t origin_len;
    uint64_t index;
    char *prompt;         // (prompt_len) the prompt's text, for --jsonl
    size_t prompt_len;
    int emitted;          // its output has printed something
} Job;

// Starts an output in text mode: the separator line when another output came before.
static void start_output(Job *job)
{
    if (!job->emitted && job->run->n_outputs++ > 0)
        printf("%s\n", job->run->separator);
    job->emitted = 1;
}

static int on_text(void *ctx, void *user, const char *text, size_t n)
{
    (void)ctx;
    start_output(user);
    if (fwrite(text, 1, n, stdout) != n || fflush(stdout) != 0)
        return -1;
    return 0;
}

static void job_free(Job *job)
{
    free(job->origin);
    free(job->prompt);
    free(job);
}

static int on_done(void *ctx, void *user, const GenResult *res, const char *error)
{
    Run *run = ctx;
    Job *job = user;
    int rc = 0;
    if (error) {
        cli_error("%.*s:%llu: %s", (int)job->origin_len, job->origin, (unsigned long long)job->index, error);
        run->status = EXIT_DATA;
    } else if (!run->jsonl) {
        start_output(job);   // an empty output still takes its line
        putchar('\n');
        rc = fflush(stdout) != 0 ? -1 : 0;
    } else {
        json_t *obj = json_pack("{s:s%, s:I, s:s%, s:s%, s:I, s:s}", "origin", job->origin, job->origin_len,
                                "index", (json_int_t)job->index, "prompt", job->prompt, job->prompt_len, "output",
                                res->text, res->len, "tokens", (json_int_t)res->n_tokens, "stop",
                                gen_stop_name(res->stop));
        char *line = obj ? json_dumps(obj, JSON_COMPACT) : NULL;
        json_decref(obj);
        if (!line) {
            cli_error("%.*s:%llu: cannot write the result as JSON (origin not UTF-8?)", (int)job->origin_len,
                      job->origin, (unsigned long long)job->index);
            run->status = EXIT_DATA;
        } else {
            puts(line);
            free(line);
            rc = fflush(stdout) != 0 ? -1 : 0;
        }
    }
    job_free(job);
    return rc;
}

// A step of the batch; a device failure or a write error ends the program.
static void step(Run *run)
{
    Err err;
    if (gen_batch_step(run->batch, &err) < 0) {
        if (ferror(stdout))
            exit(cli_finish_stdout(EXIT_DATA));
        cli_die(EXIT_DATA, "%s", err.msg);
    }
}

// Whether more input can be read without waiting (glibc's buffer, then the descriptor).
static int input_ready(FILE *f)
{
#ifdef __GLIBC__
    if (f->_IO_read_ptr < f->_IO_read_end)
        return 1;
#endif
    struct pollfd p = {.fd = fileno(f), .events = POLLIN};
    return poll(&p, 1, 0) != 0;
}

// Before reading the next prompt: keep at most a batch of prompts queued, and while the input
// has nothing to give, generate rather than wait (so a prompt typed at a terminal is answered).
// f NULL: the prompts are all at hand (-p).
static void pump(Run *run, FILE *f)
{
    while (gen_batch_pending(run->batch) >= (size_t)run->max_batch)
        step(run);
    while (f && gen_batch_busy(run->batch) > 0 && !input_ready(f))
        step(run);
}

// Encode one prompt and queue it; messages name origin:index.
static void submit(Run *run, const char *origin, size_t origin_len, uint64_t index, const PromptPiece *pieces,
                   size_t n_pieces)
{
    Err err;
    uint64_t stream = run->n_prompts++;
    long n = prompt_encode(run->tok, pieces, n_pieces, run->add_bos, run->bos_id, run->eos_id, &run->ids,
                           &run->ids_cap, &err);
    if (n == 0) {
        err_set(&err, "empty prompt and no BOS to start from");
        n = -1;
    }
    if (n < 0) {
        cli_error("%.*s:%llu: %s", (int)origin_len, origin, (unsigned long long)index, err.msg);
        run->status = EXIT_DATA;
        return;
    }
    Job *job = calloc(1, sizeof *job);
    if (!job || !(job->origin = malloc(origin_len + 1)))
        cli_die(EXIT_DATA, "out of memory");
    memcpy(job->origin, origin, origin_len);
    job->origin[origin_len] = '\0';
    job->origin_len = origin_len;
    job->index = index;
    job->run = run;
    if (run->jsonl) {
        for (size_t i = 0; i < n_pieces; i++)
            job->prompt_len += pieces[i].len;
        if (!(job->prompt = malloc(job->prompt_len + 1)))
            cli_die(EXIT_DATA, "out of memory");
        size_t at = 0;
        for (size_t i = 0; i < n_pieces; i++) {
            memcpy(job->prompt + at, pieces[i].text, pieces[i].len);
            at += pieces[i].len;
        }
    }
    if (gen_batch_submit(run->batch, run->ids, (size_t)n, stream, job, &err) < 0)
        cli_die(EXIT_DATA, "%s", err.msg);
}

static int read_lines(Run *run, FILE *f, const char *name)
{
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    uint64_t lineno = 0;
    int status = EXIT_OK;
    for (;;) {
        pump(run, f);
        if ((len = getline(&line, &cap, f)) < 0)
            break;
        lineno++;
        if (len > 0 && line[len - 1] == '\n')
            len--;
        PromptPiece piece = {line, (size_t)len, 0, 0};
        submit(run, name, strlen(name), lineno, &piece, 1);
    }
    if (ferror(f)) {
        cli_error("%s: %s", name, strerror(errno));
        status = EXIT_DATA;
    }
    free(line);
    return status;
}

// Each text record is one prompt (prompt_from_record says which segments).
static int read_records(Run *run, FILE *f, const char *name)
{
    Err err;
    RecReader *r = rec_reader_open(f, name, &err);
    if (!r) {
        cli_error("%s", err.msg);
        return EXIT_DATA;
    }
    PromptPiece *pieces = NULL;
    size_t pieces_cap = 0;
    int status = EXIT_OK, rc;
    Record rec;
    for (;;) {
        pump(run, f);
        if ((rc = rec_read(r, &rec, &err)) != 1)
            break;
        long n = prompt_from_record(&rec, &pieces, &pieces_cap, &err);
        if (n < 0) {
            cli_error("%s: record %llu (%.*s:%llu): %s", name, (unsigned long long)rec_reader_index(r),
                      (int)rec.origin_len, rec.origin, (unsigned long long)rec.origin_index, err.msg);
            cli_hint("give it the output of alp-fmt --prompt-only, or plain lines with --lines");
            status = EXIT_DATA;
            continue;
        }
        submit(run, rec.origin, rec.origin_len, rec.origin_index, pieces, (size_t)n);
    }
    if (rc < 0) {
        cli_error("%s", err.msg);
        if (rec_reader_index(r) == 0)
            cli_hint("lora-gen reads text records (alp-fmt --prompt-only); for plain text use --lines");
        status = EXIT_DATA;
    }
    rec_reader_close(r);
    free(pieces);
    return status;
}

int main(int argc, char **argv)
{
    cli_init(argv[0]);
    const char *model_dir = NULL, *adapter_dir = NULL, *separator = "", *device = "auto";
    int lines = 0, jsonl = 0, greedy = 0, sampling = 0, bos = -1, unmerged = 0, graphs = 1;
    long batch = 0, context = 0;
    int verbose = 0;
    long max_new = 256;
    SampleParams sp = sample_defaults();
    const char **prompts = NULL, **stops = NULL;
    size_t n_prompts = 0, n_stops = 0, n_stop_ids = 0;
    long *stop_ids = NULL;
    int c;
    while ((c = getopt_long(argc, argv, "m:a:lp:n:gt:k:s:jb:c:vh", long_options, NULL)) != -1) {
        switch (c) {
        case 'm': model_dir = optarg; break;
        case 'a': adapter_dir = optarg; break;
        case 'l': lines = 1; break;
        case 'p':
            prompts = realloc(prompts, (n_prompts + 1) * sizeof *prompts);
            if (!prompts)
                cli_die(EXIT_DATA, "out of memory");
            prompts[n_prompts++] = optarg;
            break;
        case 'n': max_new = cli_parse_long(usage, "--max-new-tokens", optarg, 0, INT_MAX); break;
        case 'g': greedy = 1; break;
        case 't':
            sp.temperature = (float)cli_parse_double(usage, "--temperature", optarg, 0, 1e30, 0);
            if (sp.temperature == 0.0f)
                greedy = 1;
            else
                sampling = 1;
            break;
        case 'k': sp.top_k = (int)cli_parse_long(usage, "--top-k", optarg, 0, INT_MAX); sampling = 1; break;
        case OPT_TOP_P: sp.top_p = (float)cli_parse_double(usage, "--top-p", optarg, 0, 1e30, 0); sampling = 1; break;
        case OPT_MIN_P: sp.min_p = (float)cli_parse_double(usage, "--min-p", optarg, 0, 1e30, 0); sampling = 1; break;
        case OPT_REP: sp.repetition_penalty = (float)cli_parse_double(usage, "--repetition-penalty", optarg, 0, 1e30, 0); break;
        case 's': {
            char *end;
            errno = 0;
            sp.seed = strtoull(optarg, &end, 10);
            if (errno || end == optarg || *end || optarg[0] == '-')
                cli_usage_error(usage, "--seed: expected a non-negative integer, got '%s'", optarg);
            break;
        }
        case OPT_STOP_ID:
            stop_ids = realloc(stop_ids, (n_stop_ids + 1) * sizeof *stop_ids);
            if (!stop_ids)
                cli_die(EXIT_DATA, "out of memory");
            stop_ids[n_stop_ids++] = cli_parse_long(usage, "--stop-id", optarg, 0, UINT32_MAX);
            break;
        case OPT_STOP:
            if (!*optarg)
                cli_usage_error(usage, "--stop: the text must not be empty");
            if (utf8_valid(optarg, strlen(optarg)) == 0)
                cli_usage_error(usage, "--stop: the text is not valid UTF-8");
            stops = realloc(stops, (n_stops + 1) * sizeof *stops);
            if (!stops)
                cli_die(EXIT_DATA, "out of memory");
            stops[n_stops++] = optarg;
            break;
        case OPT_BOS: bos = 1; break;
        case OPT_NO_BOS: bos = 0; break;
        case OPT_UNMERGED: unmerged = 1; break;
        case 'j': jsonl = 1; break;
        case OPT_SEPARATOR: separator = optarg; break;
        case OPT_DEVICE: device = optarg; break;
        case 'b': batch = cli_parse_long(usage, "--batch", optarg, 1, 4096); break;
        case 'c': context = cli_parse_long(usage, "--context", optarg, 1, INT_MAX); break;
        case OPT_NO_GRAPHS: graphs = 0; break;
        case 'v': verbose = 1; break;
        case 'h': cli_help(usage);
        default: cli_usage_error(usage, "unknown option (see --help)");
        }
    }
    if (!model_dir)
        cli_usage_error(usage, "a model directory is required (-m dir)");
    if (strcmp(device, "cpu") != 0 && strcmp(device, "cuda") != 0 && strcmp(device, "auto") != 0)
        cli_usage_error(usage, "--device: expected cpu, cuda or auto, got '%s'", device);
    if (n_prompts > 0 && (optind < argc || lines))
        cli_usage_error(usage, "-p gives the prompts: no input files and no --lines");
    sp.greedy = greedy || !sampling;
    Err err;
    if (sample_params_check(&sp, &err) < 0)
        cli_usage_error(usage, "%s", err.msg);
    double t_start = now_s();
    Device dev;
    if (device_parse(device, &dev, &err) < 0)
        cli_usage_error(usage, "--device: %s", err.msg);
    dev = device_resolve(dev);
    if (device_check(dev, "generation", &err) < 0)
        cli_die(EXIT_DATA, "%s", err.msg);

    Model *model = model_load(model_dir, &err);
    if (!model)
        cli_die(EXIT_DATA, "%s", err.msg);
    const ModelConfig *mc = &model->config;
    Tokenizer *tok = tokenizer_load(model_dir, &err);
    if (!tok)
        cli_die(EXIT_DATA, "%s", err.msg);
    if (tokenizer_vocab_size(tok) > (uint32_t)mc->vocab_size)
        cli_die(EXIT_DATA, "%s: the tokenizer has %u tokens but the model only %d", model_dir,
                tokenizer_vocab_size(tok), mc->vocab_size);
    Adapter *adapter = NULL;
    if (adapter_dir && !(adapter = adapter_load(adapter_dir, &err)))
        cli_die(EXIT_DATA, "%s", err.msg);

    // Stop ids: every EOS id of config.json and generation_config.json, then --stop-id.
    uint32_t *all_stop = malloc((size_t)(mc->n_eos + n_stop_ids + 1) * sizeof *all_stop);
    if (!all_stop)
        cli_die(EXIT_DATA, "out of memory");
    size_t n_all = 0;
    for (int i = 0; i < mc->n_eos; i++)
        all_stop[n_all++] = (uint32_t)mc->eos_ids[i];
    for (size_t i = 0; i < n_stop_ids; i++) {
        if (stop_ids[i] >= mc->vocab_size)
            cli_usage_error(usage, "--stop-id %ld: the vocabulary has %d tokens", stop_ids[i],
                            mc->vocab_size);
        all_stop[n_all++] = (uint32_t)stop_ids[i];
    }

    GenLimits limits = {.max_new_tokens = (int)max_new, .stop_ids = all_stop, .n_stop_ids = n_all,
                        .stop_strings = stops, .n_stop_strings = n_stops};
    if (dev == DEVICE_CUDA && context == 0)
        context = mc->max_seq_len > 0 && mc->max_seq_len < GPU_DEFAULT_CONTEXT ? mc->max_seq_len : GPU_DEFAULT_CONTEXT;
    GenBatchConfig cfg = {
        .device = dev, .max_batch = batch > 0 ? (int)batch : dev == DEVICE_CUDA ? GPU_DEFAULT_BATCH : 1,
        .context = (int)context, .merge_adapter = !unmerged, .use_graphs = graphs,
        .shrink_to_fit = batch == 0,
    };
    Run run = {
        .tok = tok, .max_batch = cfg.max_batch,
        .add_bos = bos >= 0 ? bos : tokenizer_adds_bos(tok),
        .bos_id = tokenizer_bos_id(tok) >= 0 ? tokenizer_bos_id(tok) : mc->bos_id,
        .eos_id = tokenizer_eos_id(tok),
        .jsonl = jsonl, .separator = separator, .status = EXIT_OK,
    };
    GenOutput out = {.text = jsonl ? NULL : on_text, .done = on_done, .ctx = &run};
    run.batch = gen_batch_new(model, adapter, tok, &sp, &limits, &cfg, &out, &err);
    if (!run.batch)
        cli_die(EXIT_DATA, "%s%s%s", adapter_dir ? adapter_dir : "", adapter_dir ? ": " : "", err.msg);
    adapter_free(adapter);
    run.max_batch = gen_batch_max_batch(run.batch);
    if (verbose)
        fprintf(stderr, "%s: %s; ready in %.2f s\n", prog, gen_batch_describe(run.batch), now_s() - t_start);

    int status = EXIT_OK;
    if (n_prompts > 0) {
        for (size_t i = 0; i < n_prompts; i++) {
            pump(&run, NULL);
            PromptPiece piece = {prompts[i], strlen(prompts[i]), 0, 0};
            submit(&run, "-p", 2, i + 1, &piece, 1);
        }
    } else {
        int nfiles = optind < argc ? argc - optind : 1;
        for (int i = 0; i < nfiles; i++) {
            const char *path = optind < argc ? argv[optind + i] : "-";
            const char *name = strcmp(path, "-") == 0 ? "<stdin>" : path;
            FILE *f = cli_open_in(path);
            if (!f) {
                status = EXIT_DATA;
                continue;
            }
            int st = lines ? read_lines(&run, f, name) : read_records(&run, f, name);
            if (st > status)
                status = st;
            if (f != stdin)
                fclose(f);
        }
    }
    if (gen_batch_finish(run.batch, &err) < 0) {
        if (ferror(stdout))
            return cli_finish_stdout(EXIT_DATA);
        cli_die(EXIT_DATA, "%s", err.msg);
    }
    if (run.status > status)
        status = run.status;
    if (verbose) {
        GenBatchStats st;
        gen_batch_stats(run.batch, &st);
        long decoded = st.new_tokens - st.prompts;
        fprintf(stderr,
                "%s: %ld prompts, %ld prompt tokens in %ld prefills, %.3f s (%.0f tokens/s, fastest %.4f s); "
                "%ld new tokens, %ld decode steps, %.3f s (%.1f tokens/s, %.2f ms a step)\n",
                prog, st.prompts, st.prompt_tokens, st.prefills, st.prefill_s,
                st.prefill_s > 0 ? st.prompt_tokens / st.prefill_s : 0.0, st.prefill_min_s, st.new_tokens, st.steps, st.decode_s,
                st.decode_s > 0 ? decoded / st.decode_s : 0.0, st.steps > 0 ? 1e3 * st.decode_s / st.steps : 0.0);
    }
    free(run.ids);
    free(all_stop);
    free(stop_ids);
    free(stops);
    free(prompts);
    gen_batch_free(run.batch);
    tokenizer_free(tok);
    model_free(model);
    return cli_finish_stdout(status);
}
