// defines: CheckpointState, checkpoint_save, checkpoint_load, checkpoint_read_options,
//          checkpoint_latest, checkpoint_name
// A training checkpoint: everything lora-train needs to continue bit for bit as if never
// stopped. One directory OUT/checkpoint-STEP holding
//   adapter_model.safetensors, adapter_config.json   the adapter (a PEFT adapter directory, so a
//                                                    checkpoint also loads as an adapter)
//   optimizer.safetensors    "exp_avg" and "exp_avg_sq", F32 (n_params): AdamW's m and v in the
//                            flat parameter layout of lib/lora.h
//   trainer_state.json       written last: format, version, step, AdamW step count, the RNG
//                            state, the data cursor, tokens seen, and the run's options (an
//                            object the trainer fills and checks on resume)
// The files are written into OUT/checkpoint-STEP.tmp.XXXXXX, each fsynced, then the directory is
// renamed to OUT/checkpoint-STEP and OUT is fsynced: a checkpoint directory is there whole or
// not at all (a crash leaves only a *.tmp.* directory, which is never read). An older directory
// of the same name is replaced.
#ifndef CHECKPOINT_H
#define CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "adapter.h"
#include "dataset.h"
#include "err.h"
#include "lora.h"

#define CHECKPOINT_VERSION 1

typedef struct {
    long step;               // optimizer steps done
    long adam_step;          // AdamW's own update count (torch's state "step")
    Rng rng;                 // dropout generator after `step` steps
    DatasetCursor cursor;    // where the next micro-batch comes from
    uint64_t tokens_seen;    // trained targets consumed so far
} CheckpointState;

// The directory name of step's checkpoint under out_dir, into buf (cap bytes).
void checkpoint_name(char *buf, size_t cap, const char *out_dir, long step);

// Write a checkpoint of adapter (a view of the live parameters), AdamW moments m and v
// (n_params each), the state and options_json (a JSON object's text, stored under "options").
// The directory written is put in saved (cap bytes) when saved is not NULL.
int checkpoint_save(const char *out_dir, const Adapter *adapter, const float *m, const float *v,
                    size_t n_params, const CheckpointState *state, const char *options_json,
                    char *saved, size_t cap, Err *err);

// Read a checkpoint directory: the adapter (caller frees with adapter_free), m and v
// (n_params each, malloc'd, caller frees), the state, and the options object's text
// (malloc'd, caller frees). The optimizer file must hold exactly n_params values.
int checkpoint_load(const char *dir, Adapter **adapter, float **m, float **v, size_t n_params,
                    CheckpointState *state, char **options_json, Err *err);

// Only the options object's text (malloc'd), to compare a run's options before loading tensors.
int checkpoint_read_options(const char *dir, char **options_json, Err *err);

// The complete checkpoint with the highest step under out_dir into buf; 0 found, 1 none, -1 error.
int checkpoint_latest(const char *out_dir, char *buf, size_t cap, Err *err);

#endif
