// defines: SampleParams, sample_defaults, sample_params_check, Sampler, sampler_new,
//          sampler_free, sampler_filter, sampler_pick, sample_repetition_penalty, sample_uniform
// Picking the next token from a row of logits, with Hugging Face `generate` semantics:
//   1. repetition penalty over every distinct token seen (prompt and output so far): a positive
//      logit is divided by the penalty, a negative one multiplied (RepetitionPenaltyLogitsProcessor);
//   2. greedy: the first index of the largest logit (torch.argmax); otherwise
//   3. temperature (logits / T), top-k (keep logits >= the k-th largest, ties kept), top-p (sort
//      ascending, drop tokens whose cumulative probability is <= 1 - p, the last one always kept),
//      min-p (drop tokens whose probability is < min_p * the largest probability), in that order,
//      as transformers' warpers run;
//   4. one draw from the remaining distribution by inverse CDF in ascending id order.
//
// The random numbers are counter-based, so the future GPU sampler (and a batched decoder, where
// prompts join and leave) reproduces them without sharing any state:
//   mix(z)   = splitmix64 finaliser: z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
//                                    z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31
//   G        = 0x9E3779B97F4A7C15
//   h        = mix(mix(mix(seed + G) ^ (stream + G)) ^ (step + G))      (all mod 2^64)
//   u        = (h >> 40) * 2^-24, a float in [0, 1) with 24 exact bits
// where stream is the prompt's 0-based index in the input and step the 0-based index of the new
// token. The token drawn is the first id i (ascending, kept tokens only) whose running sum of
// exp(logit_i - max) (float32, summed in id order) exceeds u * the total; the last kept id when
// rounding leaves none.
#ifndef SAMPLE_H
#define SAMPLE_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef struct {
    int greedy;                // 1: argmax, temperature and the filters are ignored
    float temperature;         // > 0 (sampling only)
    int top_k;                 // 0: off
    float top_p;               // (0, 1]; 1: off
    float min_p;               // [0, 1]; 0: off
    float repetition_penalty;  // > 0; 1: off
    uint64_t seed;
} SampleParams;

// Defaults: greedy off, temperature 1, no filters, no penalty, seed 0.
SampleParams sample_defaults(void);
// Checks the ranges above; -1 with a message naming the parameter.
int sample_params_check(const SampleParams *p, Err *err);

typedef struct Sampler Sampler;
Sampler *sampler_new(uint32_t vocab, const SampleParams *p, Err *err);
void sampler_free(Sampler *s);

// Steps 1 and 3 in place: the penalised, tempered logits, with -inf for every token a filter
// dropped (greedy: the penalty alone). tests/golden/gen/warpers.json holds transformers' results.
void sampler_filter(Sampler *s, float *logits, const uint32_t *history, size_t nhistory);
// Apply the whole pipeline to logits (vocab floats, modified in place) and return the id.
// history: the ids seen so far (prompt then output), for the repetition penalty.
uint32_t sampler_pick(Sampler *s, float *logits, const uint32_t *history, size_t nhistory,
                      uint64_t stream, uint64_t step);

// Step 1 alone. seen: vocab bytes of scratch (zero on entry, zero again on return).
void sample_repetition_penalty(float *logits, uint32_t vocab, const uint32_t *history,
                               size_t nhistory, float penalty, unsigned char *seen);
// The uniform number of the documented generator.
float sample_uniform(uint64_t seed, uint64_t stream, uint64_t step);

#endif
