// lora-gen: generate text from prompts with a Llama model and an optional LoRA adapter.
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "adapter.h"
#include "cli.h"
#include "generate.h"
#include "model.h"
#include "record.h"
#include "sample.h"
#include "tokenizer.h"
#include "utf8_stream.h"

static const char usage[] =
    "usage: lora-gen -m dir [-a dir] [-l] [-p text] [-n count] [-g] [-t temp] [-k count]\n"
    "                [--top-p p] [--min-p p] [--repetition-penalty x] [-s seed] [--stop-id id]\n"
    "                [--stop text] [--bos | --no-bos] [--unmerged] [-j] [--separator text]\n"
    "                [--device cpu|cuda|auto] [file ...]\n"
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
    "      --device cpu|cuda|auto    where to run (default auto: cpu)\n"
    "  -h, --help                    print this help and exit\n";

enum {
    OPT_TOP_P = 256, OPT_MIN_P, OPT_REP, OPT_STOP_ID, OPT_STOP, OPT_BOS, OPT_NO_BOS,
    OPT_UNMERGED, OPT_SEPARATOR, OPT_DEVICE,
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
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
};

// Everything one prompt needs, set up once.
typedef struct {
    const Tokenizer *tok;
    Generator *gen;
    Sampler *sampler;
    GenLimits limits;
    int add_bos;          // 1 / 0
    int64_t bos_id, eos_id;
    int jsonl;
    const char *separator;
    uint64_t n_prompts;   // prompts read so far, good or bad: the sampler's stream number
    uint64_t n_outputs;   // outputs started, for the separator
    int emitted;          // the current output has printed something
    uint32_t *ids;        // the prompt's ids, grown as needed
    size_t ids_cap;
} Run;

// Starts an output in text mode: the separator line when another output came before.
static void start_output(Run *run)
{
    if (!run->emitted && run->n_outputs++ > 0)
        printf("%s\n", run->separator);
    run->emitted = 1;
}

static int emit_stdout(void *ctx, const char *text, size_t n)
{
    start_output(ctx);
    if (fwrite(text, 1, n, stdout) != n || fflush(stdout) != 0)
        return -1;
    return 0;
}

// Generate for one prompt; messages name origin:index. Returns an exit status.
static int run_prompt(Run *run, const char *origin, size_t origin_len, uint64_t index,
                      const PromptPiece *pieces, size_t n_pieces)
{
    Err err;
    uint64_t stream = run->n_prompts++;
    long n = prompt_encode(run->tok, pieces, n_pieces, run->add_bos, run->bos_id, run->eos_id,
                           &run->ids, &run->ids_cap, &err);
    if (n == 0) {
        err_set(&err, "empty prompt and no BOS to start from");
        n = -1;
    }
    if (n < 0) {
        cli_error("%.*s:%llu: %s", (int)origin_len, origin, (unsigned long long)index, err.msg);
        return EXIT_DATA;
    }
    GenResult res;
    run->emitted = 0;
    int rc = generate(run->gen, run->tok, run->sampler, run->ids, (size_t)n, stream, &run->limits,
                      run->jsonl ? NULL : emit_stdout, run, &res, &err);
    if (rc < 0) {
        if (ferror(stdout))
            exit(cli_finish_stdout(EXIT_DATA));
        if (run->emitted)
            putchar('\n');   // end the broken output's line before the message
        cli_error("%.*s:%llu: %s", (int)origin_len, origin, (unsigned long long)index, err.msg);
        return EXIT_DATA;
    }
    if (!run->jsonl) {
        start_output(run);   // an empty output still takes its line
        putchar('\n');
        fflush(stdout);
        return ferror(stdout) ? cli_finish_stdout(EXIT_DATA) : EXIT_OK;
    }
    size_t prompt_len = 0;
    for (size_t i = 0; i < n_pieces; i++)
        prompt_len += pieces[i].len;
    char *prompt = malloc(prompt_len + 1);
    if (!prompt)
        cli_die(EXIT_DATA, "out of memory");
    size_t at = 0;
    for (size_t i = 0; i < n_pieces; i++) {
        memcpy(prompt + at, pieces[i].text, pieces[i].len);
        at += pieces[i].len;
    }
    json_t *obj = json_pack("{s:s%, s:I, s:s%, s:s%, s:I, s:s}", "origin", origin, origin_len,
                            "index", (json_int_t)index, "prompt", prompt, prompt_len, "output",
                            res.text, res.len, "tokens", (json_int_t)res.n_tokens, "stop",
                            gen_stop_name(res.stop));
    free(prompt);
    char *line = obj ? json_dumps(obj, JSON_COMPACT) : NULL;
    json_decref(obj);
    if (!line) {
        cli_error("%.*s:%llu: cannot write the result as JSON (origin not UTF-8?)", (int)origin_len,
                  origin, (unsigned long long)index);
        return EXIT_DATA;
    }
    puts(line);
    free(line);
    fflush(stdout);
    return ferror(stdout) ? cli_finish_stdout(EXIT_DATA) : EXIT_OK;
}

static int read_lines(Run *run, FILE *f, const char *name)
{
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    uint64_t lineno = 0;
    int status = EXIT_OK;
    while ((len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        if (len > 0 && line[len - 1] == '\n')
            len--;
        PromptPiece piece = {line, (size_t)len, 0, 0};
        int st = run_prompt(run, name, strlen(name), lineno, &piece, 1);
        if (st > status)
            status = st;
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
    while ((rc = rec_read(r, &rec, &err)) == 1) {
        long n = prompt_from_record(&rec, &pieces, &pieces_cap, &err);
        if (n < 0) {
            cli_error("%s: record %llu (%.*s:%llu): %s", name, (unsigned long long)rec_reader_index(r),
                      (int)rec.origin_len, rec.origin, (unsigned long long)rec.origin_index, err.msg);
            cli_hint("give it the output of alp-fmt --prompt-only, or plain lines with --lines");
            status = EXIT_DATA;
            continue;
        }
        int st = run_prompt(run, rec.origin, rec.origin_len, rec.origin_index, pieces, (size_t)n);
        if (st > status)
            status = st;
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
    int lines = 0, jsonl = 0, greedy = 0, sampling = 0, bos = -1, unmerged = 0;
    long max_new = 256;
    SampleParams sp = sample_defaults();
    const char **prompts = NULL, **stops = NULL;
    size_t n_prompts = 0, n_stops = 0, n_stop_ids = 0;
    long *stop_ids = NULL;
    int c;
    while ((c = getopt_long(argc, argv, "m:a:lp:n:gt:k:s:jh", long_options, NULL)) != -1) {
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
    if (strcmp(device, "cuda") == 0) {
        cli_error("--device cuda: generation on the GPU is not built yet");
        cli_hint("use --device cpu (or auto)");
        return EXIT_DATA;
    }

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
    Generator *gen = generator_new(model, adapter, !unmerged, &err);
    if (!gen)
        cli_die(EXIT_DATA, "%s%s%s", adapter_dir ? adapter_dir : "", adapter_dir ? ": " : "", err.msg);
    adapter_free(adapter);
    Sampler *sampler = sampler_new((uint32_t)mc->vocab_size, &sp, &err);
    if (!sampler)
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

    Run run = {
        .tok = tok, .gen = gen, .sampler = sampler,
        .limits = {.max_new_tokens = (int)max_new, .stop_ids = all_stop, .n_stop_ids = n_all,
                   .stop_strings = stops, .n_stop_strings = n_stops},
        .add_bos = bos >= 0 ? bos : tokenizer_adds_bos(tok),
        .bos_id = tokenizer_bos_id(tok) >= 0 ? tokenizer_bos_id(tok) : mc->bos_id,
        .eos_id = tokenizer_eos_id(tok),
        .jsonl = jsonl, .separator = separator,
    };
    int status = EXIT_OK;
    if (n_prompts > 0) {
        for (size_t i = 0; i < n_prompts; i++) {
            PromptPiece piece = {prompts[i], strlen(prompts[i]), 0, 0};
            int st = run_prompt(&run, "-p", 2, i + 1, &piece, 1);
            if (st > status)
                status = st;
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
    free(run.ids);
    free(all_stop);
    free(stop_ids);
    free(stops);
    free(prompts);
    sampler_free(sampler);
    generator_free(gen);
    tokenizer_free(tok);
    model_free(model);
    return cli_finish_stdout(status);
}
