// defines: PromptPiece, prompt_from_record, prompt_encode, Generator, generator_new,
//          generator_free, generator_reset, generator_forward, generator_position, GenLimits,
//          GenStop, GenResult, GenEmit, gen_stop_name, GenSeq, gen_seq_new, gen_seq_free,
//          gen_seq_begin, gen_seq_push, gen_seq_end, gen_seq_history, gen_seq_new_tokens, generate
// Text generation on the CPU: float32, plain loops (OpenMP over output features, dynamic teams
// unless OMP_DYNAMIC says otherwise, so a busy machine does not stall it), a KV cache,
// prefill of the whole prompt in one forward pass, then one token per decode step.
//
// The model is the Llama block of lib/model.h: RMSNorm, q/k/v/o with RoPE (rotate-half, the
// angles of rope_inv_freq) and GQA, causal softmax attention (Mistral's sliding window when the
// config sets one), SwiGLU MLP, final RMSNorm, lm_head. An optional LoRA adapter (lib/adapter.h)
// is applied either merged (W' = W + scale * B A, computed once into float32 copies: fast) or
// unmerged (y = W x + scale * B (A x) at every step: the weights stay as mapped); the two agree
// within float32 rounding.
//
// generate() runs one prompt: it feeds the ids, picks each new token with lib/sample.h, and
// hands the decoded text to a callback as it arrives, every piece valid UTF-8 (lib/utf8_stream.h)
// and never a byte of a stop string. The text of the new tokens is what the tokenizer's decoder
// gives for prompt + output minus what it gives for the prompt alone (so a SentencePiece model's
// leading space is dropped only when the output starts the text); special tokens print nothing.
#ifndef GENERATE_H
#define GENERATE_H

#include <stddef.h>
#include <stdint.h>

#include "adapter.h"
#include "err.h"
#include "model.h"
#include "record.h"
#include "sample.h"
#include "tokenizer.h"

// ---- prompts ----
// A prompt is a list of text pieces, each tokenized whole.
typedef struct {
    const char *text;   // (len) UTF-8 bytes, not NUL-terminated
    size_t len;
    int special;        // special-token names in it become control tokens
    int eos_after;      // the EOS id follows it
} PromptPiece;

// The prompt of a text record: every segment but the trailing trained ones (the response to
// generate, empty in `alp-fmt --prompt-only` output; earlier responses are context), with the
// segments' special and EOS flags. The pieces point into the record. Grows *pieces (realloc);
// returns their count, or -1 (a tokens record, out of memory).
long prompt_from_record(const Record *rec, PromptPiece **pieces, size_t *cap, Err *err);

// The ids of a prompt: bos_id first when add_bos (and bos_id >= 0), never twice (a BOS that a
// special piece spells replaces it), then each piece's tokens, eos_id after the pieces that ask
// for it. Writes *ids from index 0, growing it (realloc); returns the count or -1 (invalid UTF-8,
// out of memory).
long prompt_encode(const Tokenizer *tok, const PromptPiece *pieces, size_t n_pieces, int add_bos,
                   int64_t bos_id, int64_t eos_id, uint32_t **ids, size_t *cap, Err *err);

// ---- the model ----
typedef struct Generator Generator;

// An engine for model m (which must outlive it) with adapter a (may be NULL; it is copied or
// merged, so it may be freed afterwards). The adapter must fit the model: layers and every
// targeted module's shapes are checked, naming the tensor on a mismatch.
Generator *generator_new(const Model *m, const Adapter *a, int merge_adapter, Err *err);
void generator_free(Generator *g);
// Forget the cached keys and values: the next forward starts at position 0.
void generator_reset(Generator *g);
// Run n tokens at the next n positions (prefill when n > 1, a decode step when n == 1),
// appending their keys and values to the cache. Returns the logits of the last one (vocab
// floats, valid until the next call), or NULL (an id out of range, out of memory).
float *generator_forward(Generator *g, const uint32_t *ids, size_t n, Err *err);
// Positions used so far.
size_t generator_position(const Generator *g);

// ---- the generation loop ----
typedef struct {
    int max_new_tokens;               // >= 0
    const uint32_t *stop_ids;         // (n_stop_ids) ids that end the output (EOS and others)
    size_t n_stop_ids;
    const char *const *stop_strings;  // (n_stop_strings) non-empty, NUL-terminated
    size_t n_stop_strings;
} GenLimits;

typedef enum { GEN_STOP_EOS, GEN_STOP_LENGTH, GEN_STOP_STRING } GenStop;
const char *gen_stop_name(GenStop s);   // "eos", "length", "stop-string"

typedef struct {
    GenStop stop;
    size_t n_tokens;   // new tokens generated, the stop id included when one ended the output
    char *text;        // (len) the whole output, NUL-terminated; valid until its GenSeq begins again
    size_t len;
} GenResult;

// A piece of output text (valid UTF-8, n > 0). Return -1 to stop (say, a write error).
typedef int (*GenEmit)(void *ctx, const char *text, size_t n);

// One output being generated: the history (prompt then new ids) for the sampler, and the text
// of the new tokens as it may be shown: every piece valid UTF-8 and never a byte of a stop
// string. The same object serves the CPU loop below and the batched loop (lib/gen_batch.h).
typedef struct GenSeq GenSeq;
// tok and lim must outlive the GenSeq.
GenSeq *gen_seq_new(const Tokenizer *tok, const GenLimits *lim, Err *err);
void gen_seq_free(GenSeq *s);
// Start an output after prompt (n >= 1 ids, BOS already applied). -1: empty, invalid.
int gen_seq_begin(GenSeq *s, const uint32_t *prompt, size_t n, Err *err);
// Take the id just picked: 1 when it ended the output (a stop id, or a stop string in the
// text), 0 when more may follow, -1 on an error or when emit returned -1. New text goes to emit
// (which may be NULL).
int gen_seq_push(GenSeq *s, uint32_t id, GenEmit emit, void *ctx, Err *err);
// End the output (GEN_STOP_LENGTH unless a push ended it): what was held back goes to emit, and
// *res describes the output (res->text valid until the next gen_seq_begin).
int gen_seq_end(GenSeq *s, GenEmit emit, void *ctx, GenResult *res, Err *err);
const uint32_t *gen_seq_history(const GenSeq *s, size_t *n);
size_t gen_seq_new_tokens(const GenSeq *s);

// Generate from prompt (n_prompt >= 1 ids, BOS already applied) on the CPU, one prompt at a
// time, with stream as the sampler's stream number (the prompt's index) and seq's limits. The
// output also stops with GEN_STOP_LENGTH when the context reaches the model's
// max_position_embeddings. -1 on error or when emit returned -1.
int generate(Generator *g, GenSeq *seq, Sampler *s, const uint32_t *prompt, size_t n_prompt, uint64_t stream,
             GenEmit emit, void *ctx, GenResult *res, Err *err);

#endif
