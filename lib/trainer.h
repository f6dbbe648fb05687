// defines: TrainOptions, TrainEvent, TrainProgress, TrainResult, train_options_default, trainer_run
// The LoRA training loop behind lora-train, top to bottom in the order it runs:
//   1. load the model, open the shard set(s), check the shards against the model (tokenizer
//      fingerprint, vocabulary) and verify every row checksum;
//   2. create the LoRA parameters: fresh (Rng seeded with seed, A Kaiming-uniform, B zero) or
//      from a checkpoint (--resume: parameters, AdamW moments, step, Rng, data cursor);
//   3. for each optimizer step: `accum` micro-batches of `batch` rows from the shuffled stream
//      (epochs follow one another; a micro-batch never spans two), the engine adds each one's
//      summed loss and gradient; both are divided by the step's total trained tokens (the loss
//      is the mean over all trained tokens of the accumulated batch), gradients clipped to
//      max_grad_norm, lr = lr * schedule factor(step), one AdamW update;
//   4. every eval_every steps (and at the end) the mean loss over every validation row; every
//      save_every steps and after the last (and on a stop request) a checkpoint (lib/checkpoint.h);
//   5. at the end the adapter is written to out_dir (lib/adapter.h).
// The order of data, dropout masks and updates depends only on the options, so resuming from a
// checkpoint gives the same bytes as a run that never stopped.
// The library never prints: progress goes to the caller's callback, metrics to a JSONL file.
#ifndef TRAINER_H
#define TRAINER_H

#include <signal.h>
#include <stdint.h>

#include "err.h"
#include "lora.h"
#include "optim.h"
#include "train_engine.h"

typedef struct {
    const char *model_dir;       // Hugging Face model directory
    const char *train_path;      // shard set (dataset_open)
    const char *eval_path;       // validation shard set, or NULL
    const char *out_dir;         // adapter and checkpoints; created if missing
    const char *resume_dir;      // a checkpoint directory to continue from, or NULL
    const char *metrics_path;    // JSONL, one object per step and per evaluation, or NULL
    LoraConfig lora;
    uint64_t seed;               // LoRA init, dropout, data order
    int batch;                   // rows per micro-batch
    int accum;                   // micro-batches per optimizer step
    long max_steps;              // > 0: optimizer steps to run (wins over epochs)
    double epochs;               // used when max_steps <= 0: passes over the training rows
    long warmup_steps;           // >= 0: warmup steps; < 0: ceil(warmup_ratio * total steps)
    double warmup_ratio;
    double lr;                   // peak learning rate
    Schedule schedule;
    AdamWConfig adamw;
    double max_grad_norm;        // <= 0: no clipping
    long eval_every;             // 0: evaluate only at the end (when eval_path is set)
    long save_every;             // checkpoint every N steps and after the last; 0: only when stopped
    Device device;          // where the steps run (lib/train_engine.h); default CPU
    TrainRecompute recompute;    // activation recomputation on CUDA (lib/train_engine.h); default AUTO
    size_t memory_limit;         // CUDA: device bytes the plan must fit (lib/train_engine.h); 0: none
    volatile sig_atomic_t *stop; // set (by a SIGINT handler): checkpoint at the next step boundary
} TrainOptions;

// Defaults (the Unsloth Alpaca notebook where it says, else PEFT / transformers): r 16, alpha 16,
// dropout 0, all seven targets, no rsLoRA, seed 3407, batch 2, accum 4, 1 epoch, warmup 5 steps,
// lr 2e-4, linear schedule, weight decay 0.01, max grad norm 1, betas 0.9 / 0.999, eps 1e-8,
// device CPU.
void train_options_default(TrainOptions *o);

typedef enum {
    TRAIN_START,        // setup done; total_steps, n_params, rows known
    TRAIN_STEP,         // one optimizer step done
    TRAIN_EVAL,         // an evaluation done
    TRAIN_CHECKPOINT,   // a checkpoint written (path)
    TRAIN_NOTE,         // something worth telling (message)
} TrainEvent;

typedef struct {
    long step, total_steps;      // steps done (1-based after a step), steps planned
    long start_step;             // where this process started (> 0 after a resume)
    double loss;                 // mean over the step's trained tokens
    double lr;                   // the learning rate this step used
    double grad_norm;            // before clipping
    long step_tokens;            // trained targets of this step
    double epoch;                // fractional position in the training data
    double tokens_per_s;         // input positions (batch * seq_len per micro-batch) per second
    double elapsed_s, eta_s;     // since this process started; estimated to the end
    double eval_loss;            // TRAIN_EVAL
    long eval_tokens;
    size_t n_params;             // TRAIN_START
    uint64_t train_rows, eval_rows;
    int seq_len;
    const char *device;          // TRAIN_START: where the steps run ("cpu (N threads)", "cuda: NAME")
    const char *path;            // TRAIN_CHECKPOINT
    const char *message;         // TRAIN_NOTE
} TrainProgress;

typedef void (*TrainCallback)(TrainEvent ev, const TrainProgress *p, void *ctx);

typedef struct {
    long steps_done;             // the step count reached
    long start_step;
    double last_loss;            // NAN when no step ran
    double eval_loss;            // NAN when no evaluation ran
    uint64_t tokens;             // trained targets consumed by this process
    double seconds;
    size_t device_bytes;         // peak device memory of the run's buffers (0 on the CPU)
    int stopped;                 // 1: stopped early by *stop (a checkpoint was written)
    char checkpoint[4096];       // the last checkpoint written ("" none)
} TrainResult;

// Run training as described above. -1 with a message on any error (missing or bad inputs,
// mismatched shards or checkpoint, unwritable output, engine error).
int trainer_run(const TrainOptions *o, TrainCallback cb, void *ctx, TrainResult *result, Err *err);

#endif
