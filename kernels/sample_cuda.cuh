// defines: CudaSampler, cuda_sampler_create, cuda_sampler_free, cuda_sampler_start,
//          cuda_sampler_pick, cuda_sample_uniforms (kernels/sample_cuda.cu; CPU twin lib/sample.c)
// lib/sample.h's sampler on the GPU, for batched generation: every row of a (rows, vocab) fp32
// logits array on the device gets the same pipeline as sampler_pick (repetition penalty over
// the ids seen, greedy argmax, or temperature, top-k, top-p, min-p and one draw with the
// documented counter-based uniform), and only the chosen ids come back to the host.
// Greedy picks are identical to the CPU's (first index of the largest value). Sampled picks use
// the same uniform number and the same kept set; the running sum that locates it is summed in a
// different order, so a draw that falls within float rounding of a boundary between two tokens
// may pick the neighbour.
#ifndef SAMPLE_CUDA_CUH
#define SAMPLE_CUDA_CUH

#include "common.cuh"

KERNELS_EXTERN_C_BEGIN
#include "sample.h"

typedef struct CudaSampler CudaSampler;

// For histories of up to n_slots sequences over a vocabulary of vocab ids, with parameters p
// (checked by sample_params_check first).
CudaSampler *cuda_sampler_create(int n_slots, uint32_t vocab, const SampleParams *p, Err *err);
void cuda_sampler_free(CudaSampler *s);

// Start slot's history afresh with ids (the prompt; n may be 0).
int cuda_sampler_start(CudaSampler *s, int slot, const uint32_t *ids, size_t n, GpuStream stream, Err *err);

// For each row i < n of logits (n, vocab; modified in place) with slots[i] >= 0: pick an id with
// slot slots[i]'s history, the sampler stream streams[i] and step steps[i] (the 0-based index of
// the new token), write it to out[i] (host) and add it to the slot's history. Rows with
// slots[i] < 0 are skipped (out[i] untouched). slots, streams, steps, out: host arrays of n.
// Synchronises the stream (the ids come back).
int cuda_sampler_pick(CudaSampler *s, float *logits, int n, const int *slots, const uint64_t *streams,
                      const uint64_t *steps, uint32_t *out, GpuStream stream, Err *err);

// Additions (kernels/sample_cuda.cu):
// Rows of one call should name distinct slots (a slot's history gains its row's id while the
// other rows run). More rows than n_slots are picked n_slots at a time.
// The documented uniform u = sample_uniform(seed, streams[i], steps[i]) for i < n, computed on the
// device (for the tests: it must equal the CPU's bit for bit). Synchronous.
int cuda_sample_uniforms(uint64_t seed, const uint64_t *streams, const uint64_t *steps, int n, float *out, Err *err);
// The path of sampled rows with top-k or top-p: 1 (the default) first narrows the row to the
// candidates near its max (a list in shared memory, in id order) and runs the filters and the
// draw on them, falling back to the whole row when too many survive (top-p near 1 on a flat
// row, a large top-k); 0 always walks the whole row (the first implementation, kept to be timed
// and checked against). Both give the same ids.
void cuda_sampler_set_candidates(CudaSampler *s, int on);
// How many sampled rows went each way since create: [0] the candidate list, [1] the whole row.
// Synchronises the stream.
int cuda_sampler_path_counts(CudaSampler *s, unsigned long long counts[2], GpuStream stream, Err *err);
KERNELS_EXTERN_C_END

#endif
