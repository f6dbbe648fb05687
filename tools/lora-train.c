// lora-train: train a LoRA adapter on packed shards; write a PEFT adapter directory.
// The loop is lib/trainer.c; this file holds the command line and the progress display.
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "checkpoint.h"
#include "cli.h"
#include "trainer.h"

static const char usage[] =
    "usage: lora-train -m MODEL_DIR -i SHARDS -o OUT_DIR [-q] [-r N] [--alpha X] [--dropout P]\n"
    "                  [--targets LIST] [--rslora] [-s N] [-b N] [-a N] [-n N | -e X]\n"
    "                  [--warmup-steps N | --warmup-ratio X] [--lr X] [--scheduler NAME]\n"
    "                  [--weight-decay X] [--max-grad-norm X] [--adam-beta1 X] [--adam-beta2 X]\n"
    "                  [--adam-eps X] [--eval SHARDS] [--eval-every N] [--save-every N]\n"
    "                  [--resume[=DIR]] [--metrics FILE] [--device NAME] [--recompute MODE]\n"
    "                  [--memory-limit SIZE]\n"
    "Train a LoRA adapter of the model on packed shards (pack(1)); write a PEFT adapter\n"
    "directory (adapter_model.safetensors, adapter_config.json) to OUT_DIR.\n"
    "  -m, --model DIR         Hugging Face model directory\n"
    "  -i, --input SHARDS      training shard set: a directory, shard file or archive from pack\n"
    "  -o, --output DIR        adapter directory (created); checkpoints go to DIR/checkpoint-STEP\n"
    "  -r, --rank N            LoRA rank r (16)\n"
    "      --alpha X           lora_alpha; the update is scaled by alpha/r (16)\n"
    "      --dropout P         dropout on the LoRA input while training (0)\n"
    "      --targets LIST      modules to adapt: q,k,v,o,gate,up,down or all (all)\n"
    "      --rslora            scale by alpha/sqrt(r) (rank-stabilized LoRA)\n"
    "  -s, --seed N            seed of LoRA init, dropout and data order (3407)\n"
    "  -b, --batch N           rows per micro-batch (2)\n"
    "  -a, --accum N           micro-batches per optimizer step (4)\n"
    "  -n, --max-steps N       optimizer steps to run (default: --epochs)\n"
    "  -e, --epochs X          passes over the training rows, without --max-steps (1)\n"
    "      --warmup-steps N    steps of linear warmup (5)\n"
    "      --warmup-ratio X    warmup of ceil(X * steps) steps instead\n"
    "      --lr X              peak learning rate (2e-4)\n"
    "      --scheduler NAME    linear, cosine or constant, after warmup (linear)\n"
    "      --weight-decay X    AdamW decoupled weight decay (0.01)\n"
    "      --max-grad-norm X   clip the gradients' total L2 norm; 0 turns it off (1)\n"
    "      --adam-beta1 X      (0.9)\n"
    "      --adam-beta2 X      (0.999)\n"
    "      --adam-eps X        (1e-8)\n"
    "      --eval SHARDS       validation shard set: its mean loss every --eval-every steps and at the end\n"
    "      --eval-every N      steps between evaluations (0: only at the end)\n"
    "      --save-every N      steps between checkpoints, and one after the last (0: only when interrupted)\n"
    "      --resume[=DIR]      continue from checkpoint DIR (default: the latest in OUT_DIR)\n"
    "      --metrics FILE      write one JSON object per step and evaluation to FILE\n"
    "      --device NAME       cpu, cuda or auto: the GPU when there is one, else the CPU (auto)\n"
    "      --recompute MODE    none, mlp, layer or auto: recompute activations in the backward to\n"
    "                          save GPU memory: each layer's MLP half, or whole layers; auto: the\n"
    "                          fastest plan that fits, mixing them layer by layer (auto)\n"
    "      --memory-limit SIZE GPU memory the run's buffers may take, like 22G or 22.4G (GiB):\n"
    "                          auto plans within it; a mode that needs more is an error\n"
    "  -q, --quiet             no progress and no summary, only errors\n"
    "  -h, --help              print this help and exit\n";

enum {
    OPT_ALPHA = 256, OPT_DROPOUT, OPT_TARGETS, OPT_RSLORA, OPT_WARMUP_STEPS, OPT_WARMUP_RATIO, OPT_LR,
    OPT_SCHEDULER, OPT_WEIGHT_DECAY, OPT_MAX_GRAD_NORM, OPT_BETA1, OPT_BETA2, OPT_EPS, OPT_EVAL,
    OPT_EVAL_EVERY, OPT_SAVE_EVERY, OPT_RESUME, OPT_METRICS, OPT_DEVICE, OPT_RECOMPUTE, OPT_MEMORY_LIMIT,
};

static const struct option long_options[] = {
    {"model", required_argument, NULL, 'm'},
    {"input", required_argument, NULL, 'i'},
    {"output", required_argument, NULL, 'o'},
    {"rank", required_argument, NULL, 'r'},
    {"alpha", required_argument, NULL, OPT_ALPHA},
    {"dropout", required_argument, NULL, OPT_DROPOUT},
    {"targets", required_argument, NULL, OPT_TARGETS},
    {"rslora", no_argument, NULL, OPT_RSLORA},
    {"seed", required_argument, NULL, 's'},
    {"batch", required_argument, NULL, 'b'},
    {"accum", required_argument, NULL, 'a'},
    {"max-steps", required_argument, NULL, 'n'},
    {"epochs", required_argument, NULL, 'e'},
    {"warmup-steps", required_argument, NULL, OPT_WARMUP_STEPS},
    {"warmup-ratio", required_argument, NULL, OPT_WARMUP_RATIO},
    {"lr", required_argument, NULL, OPT_LR},
    {"scheduler", required_argument, NULL, OPT_SCHEDULER},
    {"weight-decay", required_argument, NULL, OPT_WEIGHT_DECAY},
    {"max-grad-norm", required_argument, NULL, OPT_MAX_GRAD_NORM},
    {"adam-beta1", required_argument, NULL, OPT_BETA1},
    {"adam-beta2", required_argument, NULL, OPT_BETA2},
    {"adam-eps", required_argument, NULL, OPT_EPS},
    {"eval", required_argument, NULL, OPT_EVAL},
    {"eval-every", required_argument, NULL, OPT_EVAL_EVERY},
    {"save-every", required_argument, NULL, OPT_SAVE_EVERY},
    {"resume", optional_argument, NULL, OPT_RESUME},
    {"metrics", required_argument, NULL, OPT_METRICS},
    {"device", required_argument, NULL, OPT_DEVICE},
    {"recompute", required_argument, NULL, OPT_RECOMPUTE},
    {"memory-limit", required_argument, NULL, OPT_MEMORY_LIMIT},
    {"quiet", no_argument, NULL, 'q'},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
};

static volatile sig_atomic_t stop_requested;

// The first Ctrl-C asks for a checkpoint at the next step boundary; a second one kills.
static void on_sigint(int sig)
{
    stop_requested = 1;
    signal(sig, SIG_DFL);
}

typedef struct {
    int quiet;
    int live;           // stderr is a terminal: one line refreshed in place
    int line_open;      // a live line is on screen (end it before other output)
} Display;

static void format_duration(char *buf, size_t cap, double s)
{
    if (!isfinite(s) || s < 0)
        s = 0;
    long t = (long)(s + 0.5);
    if (t >= 3600)
        snprintf(buf, cap, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    else
        snprintf(buf, cap, "%ld:%02ld", t / 60, t % 60);
}

static void end_live_line(Display *d)
{
    if (d->line_open) {
        fputc('\n', stderr);
        d->line_open = 0;
    }
}

static void on_progress(TrainEvent ev, const TrainProgress *p, void *ctx)
{
    Display *d = ctx;
    if (d->quiet && ev != TRAIN_NOTE)
        return;
    char eta[32];
    switch (ev) {
    case TRAIN_START:
        fprintf(stderr, "%s: %zu LoRA parameters; %llu training rows of %d tokens", prog, p->n_params,
                (unsigned long long)p->train_rows, p->seq_len);
        if (p->eval_rows)
            fprintf(stderr, "; %llu validation rows", (unsigned long long)p->eval_rows);
        fprintf(stderr, "; on %s", p->device);
        if (p->start_step)
            fprintf(stderr, "; resuming after step %ld of %ld\n", p->start_step, p->total_steps);
        else
            fprintf(stderr, "; %ld steps\n", p->total_steps);
        break;
    case TRAIN_STEP:
        format_duration(eta, sizeof eta, p->eta_s);
        if (d->live)
            fprintf(stderr, "\r\033[Kstep %ld/%ld  loss %.4f  lr %.3g  grad norm %.3g  %.0f tok/s  eta %s", p->step,
                    p->total_steps, p->loss, p->lr, p->grad_norm, p->tokens_per_s, eta);
        else
            fprintf(stderr, "%s: step %ld/%ld loss %.4f lr %.3g grad_norm %.3g tokens/s %.0f eta %s\n", prog, p->step,
                    p->total_steps, p->loss, p->lr, p->grad_norm, p->tokens_per_s, eta);
        d->line_open = d->live;
        break;
    case TRAIN_EVAL:
        end_live_line(d);
        fprintf(stderr, "%s: step %ld eval_loss %.4f over %ld tokens\n", prog, p->step, p->eval_loss, p->eval_tokens);
        break;
    case TRAIN_CHECKPOINT:
        end_live_line(d);
        fprintf(stderr, "%s: step %ld: checkpoint %s\n", prog, p->step, p->path);
        break;
    case TRAIN_NOTE:
        end_live_line(d);
        fprintf(stderr, "%s: %s\n", prog, p->message);
        break;
    }
    fflush(stderr);
}

int main(int argc, char **argv)
{
    cli_init(argv[0]);
    TrainOptions o;
    train_options_default(&o);
    const char *device = "auto";
    int resume = 0, quiet = 0, have_warmup_steps = 0, have_warmup_ratio = 0, have_steps = 0, have_epochs = 0;
    const char *resume_dir = NULL;
    Err err;
    // getopt takes an optional argument only joined by '=': "--resume DIR" leaves DIR as an
    // operand (moved to the end), which gets a hint below.
    const char *after_resume = NULL;
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--resume") == 0)
            after_resume = argv[i + 1];
    int c;
    while ((c = getopt_long(argc, argv, "m:i:o:r:s:b:a:n:e:qh", long_options, NULL)) != -1) {
        switch (c) {
        case 'm': o.model_dir = optarg; break;
        case 'i': o.train_path = optarg; break;
        case 'o': o.out_dir = optarg; break;
        case 'r': o.lora.rank = (int)cli_parse_long(usage, "--rank", optarg, 1, 65536); break;
        case OPT_ALPHA: o.lora.alpha = (float)cli_parse_double(usage, "--alpha", optarg, 0, 1e6, 0); break;
        case OPT_DROPOUT: o.lora.dropout = (float)cli_parse_double(usage, "--dropout", optarg, 0, 1, 1); break;
        case OPT_TARGETS:
            if (lora_parse_targets(optarg, &o.lora.targets, &err) < 0)
                cli_usage_error(usage, "--targets: %s", err.msg);
            break;
        case OPT_RSLORA: o.lora.use_rslora = 1; break;
        case 's': o.seed = (uint64_t)cli_parse_long(usage, "--seed", optarg, 0, LONG_MAX); break;
        case 'b': o.batch = (int)cli_parse_long(usage, "--batch", optarg, 1, 1 << 16); break;
        case 'a': o.accum = (int)cli_parse_long(usage, "--accum", optarg, 1, 1 << 20); break;
        case 'n': o.max_steps = cli_parse_long(usage, "--max-steps", optarg, 1, LONG_MAX / 2); have_steps = 1; break;
        case 'e': o.epochs = cli_parse_double(usage, "--epochs", optarg, 1e-9, 1e6, 0); have_epochs = 1; break;
        case OPT_WARMUP_STEPS:
            o.warmup_steps = cli_parse_long(usage, "--warmup-steps", optarg, 0, LONG_MAX / 2);
            have_warmup_steps = 1;
            break;
        case OPT_WARMUP_RATIO:
            o.warmup_ratio = cli_parse_double(usage, "--warmup-ratio", optarg, 0, 1, 0);
            o.warmup_steps = -1;
            have_warmup_ratio = 1;
            break;
        case OPT_LR: o.lr = cli_parse_double(usage, "--lr", optarg, 0, 1e3, 0); break;
        case OPT_SCHEDULER:
            if (schedule_parse(optarg, &o.schedule, &err) < 0)
                cli_usage_error(usage, "--scheduler: %s", err.msg);
            break;
        case OPT_WEIGHT_DECAY: o.adamw.weight_decay = (float)cli_parse_double(usage, "--weight-decay", optarg, 0, 1e3, 0); break;
        case OPT_MAX_GRAD_NORM: o.max_grad_norm = cli_parse_double(usage, "--max-grad-norm", optarg, 0, 1e30, 0); break;
        case OPT_BETA1: o.adamw.beta1 = (float)cli_parse_double(usage, "--adam-beta1", optarg, 0, 1, 1); break;
        case OPT_BETA2: o.adamw.beta2 = (float)cli_parse_double(usage, "--adam-beta2", optarg, 0, 1, 1); break;
        case OPT_EPS: o.adamw.eps = (float)cli_parse_double(usage, "--adam-eps", optarg, 0, 1, 0); break;
        case OPT_EVAL: o.eval_path = optarg; break;
        case OPT_EVAL_EVERY: o.eval_every = cli_parse_long(usage, "--eval-every", optarg, 0, LONG_MAX / 2); break;
        case OPT_SAVE_EVERY: o.save_every = cli_parse_long(usage, "--save-every", optarg, 0, LONG_MAX / 2); break;
        case OPT_RESUME: resume = 1; resume_dir = optarg; break;
        case OPT_METRICS: o.metrics_path = optarg; break;
        case OPT_DEVICE: device = optarg; break;
        case OPT_RECOMPUTE:
            if (train_recompute_parse(optarg, &o.recompute, &err) < 0)
                cli_usage_error(usage, "--recompute: %s", err.msg);
            break;
        case OPT_MEMORY_LIMIT: o.memory_limit = (size_t)cli_parse_size(usage, "--memory-limit", optarg); break;
        case 'q': quiet = 1; break;
        case 'h': cli_help(usage);
        default: cli_usage_error(usage, "unknown option");
        }
    }
    if (optind < argc) {
        if (argv[optind] == after_resume)
            cli_usage_error(usage, "unexpected argument '%s' (a checkpoint goes as --resume=%s)", argv[optind],
                            argv[optind]);
        cli_usage_error(usage, "unexpected argument '%s'", argv[optind]);
    }
    if (!o.model_dir || !o.train_path || !o.out_dir)
        cli_usage_error(usage, "need -m MODEL_DIR, -i SHARDS and -o OUT_DIR");
    if (have_steps && have_epochs)
        cli_usage_error(usage, "give --max-steps or --epochs, not both");
    if (have_warmup_steps && have_warmup_ratio)
        cli_usage_error(usage, "give --warmup-steps or --warmup-ratio, not both");
    if (o.eval_every && !o.eval_path)
        cli_usage_error(usage, "--eval-every needs --eval SHARDS");
    Device dev;
    if (device_parse(device, &dev, &err) < 0)
        cli_usage_error(usage, "--device: %s", err.msg);
    o.device = device_resolve(dev);
    // The GPU would need the CPU's dropout masks (drawn from the run's Rng) to train the same run.
    if (o.device == DEVICE_CUDA && o.lora.dropout > 0)
        cli_usage_error(usage, "--dropout %g is not supported on the GPU yet (use --dropout 0, or --device cpu%s)",
                        o.lora.dropout, dev == DEVICE_AUTO ? "; --device auto picked cuda" : "");
    if (device_check(o.device, "training", &err) < 0)
        cli_die(EXIT_DATA, "%s", err.msg);

    char latest[4096];
    if (resume && !resume_dir) {
        int found = checkpoint_latest(o.out_dir, latest, sizeof latest, &err);
        if (found < 0)
            cli_die(EXIT_DATA, "--resume: %s", err.msg);
        if (found > 0)
            cli_die(EXIT_DATA, "--resume: no checkpoint in %s (checkpoints are OUT_DIR/checkpoint-STEP)", o.out_dir);
        resume_dir = latest;
    }
    o.resume_dir = resume_dir;
    o.stop = &stop_requested;
    signal(SIGINT, on_sigint);

    Display display = {.quiet = quiet, .live = !quiet && isatty(STDERR_FILENO)};
    TrainResult res;
    int rc = trainer_run(&o, on_progress, &display, &res, &err);
    end_live_line(&display);
    if (rc < 0) {
        cli_error("%s", err.msg);
        return EXIT_DATA;
    }
    if (res.stopped) {
        cli_error("interrupted at step %ld; checkpoint %s", res.steps_done, res.checkpoint);
        cli_hint("continue with the same options and --resume");
        return 128 + SIGINT;
    }
    if (!quiet) {
        char took[32];
        format_duration(took, sizeof took, res.seconds);
        fprintf(stderr, "%s: done: %ld steps (%ld in this run) in %s, %llu trained tokens, last loss %.4f", prog,
                res.steps_done, res.steps_done - res.start_step, took, (unsigned long long)res.tokens, res.last_loss);
        if (!isnan(res.eval_loss))
            fprintf(stderr, ", eval_loss %.4f", res.eval_loss);
        if (res.device_bytes)
            fprintf(stderr, ", peak device memory %.3f GiB", res.device_bytes / 1073741824.0);
        fprintf(stderr, "; adapter in %s\n", o.out_dir);
    }
    return EXIT_OK;
}
