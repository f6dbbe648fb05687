// tokdrv: a small driver over lib/tokenizer.h for tests/tokenizer/compare.py and tests/bench/tok.sh.
//   tokdrv TOKENIZER [-s] [-o] < texts.jsonl   one line per {"text": ...}: the ids, space-separated
//                                            (-s: special-token names become ids; -o: "id@offset")
//   tokdrv TOKENIZER -b FILE [-r N]          single-thread MB/s of encoding FILE's JSONL texts
//                                            (no specials): median of N timed passes after one
//                                            untimed pass; prints "MB/s bytes tokens"
//   tokdrv TOKENIZER -l                      time to load, in ms
// Times are CPU time of the process (CLOCK_PROCESS_CPUTIME_ID), not wall time.
// Built by those scripts: cc -O2 -Ilib tests/tokenizer/tokdrv.c build/obj/libalp.a -l...
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tokenizer.h"

// Seconds of CPU time used by this process: the benchmark machines are shared, and wall time
// there measures the neighbours as much as us.
static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    int special = 0, with_offsets = 0, runs = 5, load_only = 0, opt;
    const char *bench = NULL;
    while ((opt = getopt(argc, argv, "sob:r:l")) != -1) {
        if (opt == 's') special = 1;
        else if (opt == 'o') with_offsets = 1;
        else if (opt == 'b') bench = optarg;
        else if (opt == 'r') runs = atoi(optarg);
        else if (opt == 'l') load_only = 1;
        else return 2;
    }
    if (optind + 1 != argc) {
        fprintf(stderr, "usage: tokdrv TOKENIZER [-s] [-o] [-b FILE [-r N]] [-l]\n");
        return 2;
    }
    Err err = {{0}};
    double t0 = now();
    Tokenizer *t = tokenizer_load(argv[optind], &err);
    double load_ms = (now() - t0) * 1e3;
    if (!t) {
        fprintf(stderr, "tokdrv: %s\n", err.msg);
        return 1;
    }
    if (load_only) {
        printf("%.1f\n", load_ms);
        tokenizer_free(t);
        return 0;
    }
    uint32_t *ids = NULL, *offsets = NULL;
    size_t cap = 0;
    char *line = NULL;
    size_t line_cap = 0;
    FILE *in = stdin;
    if (bench && !(in = fopen(bench, "r"))) {
        perror(bench);
        return 1;
    }
    // Texts of the JSONL input, kept for the benchmark.
    char **texts = NULL;
    size_t *lens = NULL, n_texts = 0, total = 0;
    ssize_t got;
    while ((got = getline(&line, &line_cap, in)) > 0) {
        json_error_t je;
        json_t *o = json_loadb(line, (size_t)got, JSON_ALLOW_NUL, &je);
        json_t *v = json_object_get(o, "text");
        if (!json_is_string(v)) {
            fprintf(stderr, "tokdrv: line %zu: want {\"text\": ...}\n", n_texts + 1);
            return 1;
        }
        const char *s = json_string_value(v);
        size_t len = json_string_length(v);
        if (bench) {
            texts = realloc(texts, (n_texts + 1) * sizeof *texts);
            lens = realloc(lens, (n_texts + 1) * sizeof *lens);
            texts[n_texts] = malloc(len + 1);
            memcpy(texts[n_texts], s, len);
            lens[n_texts] = len;
            total += len;
        } else {
            long n = tokenizer_encode(t, s, len, special, &ids, &cap, 0, with_offsets ? &offsets : NULL, &err);
            if (n < 0) {
                printf("error: %s\n", err.msg);
            } else {
                for (long i = 0; i < n; i++) {
                    if (with_offsets) printf(i ? " %u@%u" : "%u@%u", ids[i], offsets[i]);
                    else printf(i ? " %u" : "%u", ids[i]);
                }
                printf("\n");
            }
        }
        n_texts++;
        json_decref(o);
    }
    if (bench) {
        // One untimed pass first: steady state, as over a real data set (per-thread caches warm).
        double *rate = calloc((size_t)runs + 1, sizeof *rate);
        double cold = 0;  // the first pass, caches empty: what one pass over a fresh corpus sees
        size_t tokens = 0;
        for (int r = -1; r < runs; r++) {
            double start = now();
            tokens = 0;
            for (size_t i = 0; i < n_texts; i++) {
                long n = tokenizer_encode(t, texts[i], lens[i], 0, &ids, &cap, 0, NULL, &err);
                if (n < 0) {
                    fprintf(stderr, "tokdrv: %s\n", err.msg);
                    return 1;
                }
                tokens += (size_t)n;
            }
            double mbs = total / (now() - start) / 1e6;
            if (r >= 0)
                rate[r] = mbs;
            else
                cold = mbs;
        }
        qsort(rate, (size_t)runs, sizeof *rate, cmp_double);
        printf("%.2f %zu %zu %.2f\n", rate[runs / 2], total, tokens, cold);
        for (size_t i = 0; i < n_texts; i++) free(texts[i]);
        free(texts);
        free(lens);
        free(rate);
        fclose(in);
    }
    free(line);
    free(ids);
    free(offsets);
    tokenizer_free(t);
    return fflush(stdout) || ferror(stdout);
}
