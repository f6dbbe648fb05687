// defines: GenBatchConfig, GenOutput, GenBatch,
//          gen_batch_new, gen_batch_free, gen_batch_submit, gen_batch_step, gen_batch_busy,
//          gen_batch_pending, gen_batch_finish, gen_batch_describe, gen_batch_max_batch, GenBatchStats,
//          gen_batch_stats
// Generation for a stream of prompts, many at a time: prompts join a batch of slots as slots
// free up, one decode step advances every running prompt by a token, and a prompt leaves as soon
// as it ends, so a file of questions keeps the device busy. Each output is still delivered in
// the order the prompts were submitted, streamed: the earliest unfinished prompt's text goes out
// as it is decoded, a later prompt's text is held until every earlier one has ended.
//
// Devices: the CPU (lib/generate.h's float32 Generator, one per slot; one slot by default) or
// the GPU (kernels/gen_cuda.cuh: bf16 weights, prefill with the flash kernels, decode with GEMV
// kernels and CUDA graphs; sampling on the device, kernels/sample_cuda.cuh). Both follow
// lib/sample.h's semantics with the prompt's index as its stream, so an output does not depend on
// which other prompts share its batch (on the GPU up to bf16 rounding).
#ifndef GEN_BATCH_H
#define GEN_BATCH_H

#include <stddef.h>
#include <stdint.h>

#include "adapter.h"
#include "device.h"
#include "err.h"
#include "generate.h"
#include "model.h"
#include "sample.h"
#include "tokenizer.h"

typedef struct {
    Device device;      // CPU or CUDA (resolved)
    int max_batch;         // prompts generated at once, >= 1
    int context;           // tokens per prompt, prompt + output (0: the model's context; on the
                           // GPU each slot reserves this much KV cache)
    int max_prefill;       // most prompt tokens prefilled in one pass (0: max(context, 8192))
    int merge_adapter;     // 1: merge the adapter into the weights (fast); 0: apply it beside them
    int use_graphs;        // GPU: replay decode steps as CUDA graphs
    int shrink_to_fit;     // GPU: when max_batch slots do not fit in device memory, halve it
                           // until they do (down to 1); gen_batch_max_batch says what was kept
} GenBatchConfig;

// Where outputs go, in submission order. text (may be NULL: the text is only wanted whole) gets
// each piece of a job's output as it may be shown (valid UTF-8); done gets the end of a job:
// error NULL and res describing the whole output, or error set (res NULL) when the job failed
// on its own (a prompt too long for the context, say). Return -1 to stop everything (a write
// error); the call that delivered it then fails with "output refused".
typedef struct {
    int (*text)(void *ctx, void *job, const char *text, size_t n);
    int (*done)(void *ctx, void *job, const GenResult *res, const char *error);
    void *ctx;
} GenOutput;

typedef struct GenBatch GenBatch;

// m, tok, lim and out must outlive the batch; a (may be NULL) is copied or merged. sp: the
// sampling parameters (checked).
GenBatch *gen_batch_new(const Model *m, const Adapter *a, const Tokenizer *tok, const SampleParams *sp,
                        const GenLimits *lim, const GenBatchConfig *cfg, const GenOutput *out, Err *err);
void gen_batch_free(GenBatch *b);

// Queue a prompt (ids copied; BOS already applied) with its sampler stream number; job is the
// caller's handle, given back to the callbacks. Runs no model work. -1: out of memory.
int gen_batch_submit(GenBatch *b, const uint32_t *ids, size_t n, uint64_t stream, void *job, Err *err);
// One step: queued prompts join free slots (prefill) or, when none can, every running prompt
// gets one more token. Outputs that end are delivered. -1 on a device error or a refused output
// (the batch is then unusable).
int gen_batch_step(GenBatch *b, Err *err);
// Jobs submitted and not yet delivered.
size_t gen_batch_busy(const GenBatch *b);
// Jobs queued that have not joined a slot yet.
size_t gen_batch_pending(const GenBatch *b);
// Step until every submitted job has been delivered.
int gen_batch_finish(GenBatch *b, Err *err);
// The batch in use (cfg->max_batch, or less after shrink_to_fit).
int gen_batch_max_batch(const GenBatch *b);
// "cpu (N threads), batch B" or "cuda: NAME, batch B x context C, G GiB"
const char *gen_batch_describe(const GenBatch *b);

// What the batch has done so far (wall-clock seconds of the device work, samplers included).
typedef struct {
    long prompts;          // prompts that ran (joined a slot)
    long prefills;         // prefill passes
    long prompt_tokens;    // tokens prefilled
    double prefill_s;      // time in prefill passes, each prompt's first token included
    double prefill_min_s;  // the fastest prefill pass (a warm one: the time to first token)
    long steps;            // decode steps
    long new_tokens;       // tokens generated, first tokens included
    double decode_s;       // time in decode steps
} GenBatchStats;
void gen_batch_stats(const GenBatch *b, GenBatchStats *st);

#endif
