// defines: GemvLora, GemvTuning, cuda_gemv, cuda_gemv_tuned, cuda_gemv_ex, cuda_gemv_row,
//          cuda_gemv_workspace_bytes
//          (kernels/gemv.cu; CPU twin cpu_gemv)
// The decode-time products y = x W^T for a few rows of x (batch 1 to 64 per pass; more rows
// are done 64 at a time): W (out, in) bf16 row-major as safetensors stores a Linear's weight,
// x (batch, in) bf16, y (batch, out) bf16 or fp32, fp32 accumulation. Bandwidth-bound: every
// byte of W is read once per call, so time ~ out * in * 2 bytes / memory bandwidth.
// With a GemvLora, an unmerged PEFT adapter is added: y += scale * (x A^T) B^T.
#ifndef GEMV_CUH
#define GEMV_CUH

#include "common.cuh"

KERNELS_EXTERN_C_BEGIN
typedef struct {
    const bf16_t *A;  // (rank, in): lora_A.weight
    const bf16_t *B;  // (out, rank): lora_B.weight
    int rank;         // 1..256
    float scale;      // alpha / rank (alpha / sqrt(rank) with rsLoRA)
} GemvLora;

// Bytes of workspace cuda_gemv needs for these sizes (lora_rank 0 without an adapter). The
// workspace must be zeroed once after allocation (cudaMemset): its first 16 KiB hold the
// split-K counters, which every call leaves at zero again. One workspace serves one stream at a time; a workspace
// sized for the largest (batch, out, in, rank) of a model serves all its products.
size_t cuda_gemv_workspace_bytes(int batch, int out, int in, int lora_rank);

// y (batch, out) = x (batch, in) W^T [+ lora->scale * (x A^T) B^T]. Exactly one of y (bf16)
// and y_f32 (fp32, e.g. logits for the sampler) is non-NULL. in must be a multiple of 8 and
// x, W, lora->A 16-byte aligned (16-byte loads; true of every Llama shape and of cudaMalloc'd
// or safetensors-mapped tensors of such rows). y must not overlap x. Results do not depend on
// the stream or on timing (split-K partials are summed in a fixed order).
int cuda_gemv(bf16_t *y, float *y_f32, const bf16_t *x, const bf16_t *W, int batch, int out, int in,
              const GemvLora *lora, void *workspace, size_t workspace_bytes, GpuStream stream, Err *err);

// For benchmarks: the same product with the launch shape forced (0 = the default choice).
// warps_per_block 4 or 8; unroll (16-byte loads of each of a lane's two rows in flight) 1, 2, 4
// or 8 for batch <= 8, at most 4 for batch 9..16, at most 2 above; ksplit 1..32 blocks per
// 16-row tile (the workspace must then hold ksplit partials: an error says when it does not).
typedef struct {
    int warps_per_block, unroll, ksplit;
    int l2_prefetch;  // 1: weight loads ask L2 for 256-byte blocks (ld ... .L2::256B); 0: not
} GemvTuning;
int cuda_gemv_tuned(bf16_t *y, float *y_f32, const bf16_t *x, const bf16_t *W, int batch, int out, int in,
                    const GemvLora *lora, void *workspace, size_t workspace_bytes, const GemvTuning *tuning,
                    GpuStream stream, Err *err);

// The same product with two decode-step extras (kernels/gen_cuda.cu): residual (batch, out) bf16,
// or NULL, is added before the one rounding (it may be y itself: y += x W^T, the residual add
// fused into the epilogue); pdl 1 makes it a programmatic dependent launch: the kernel may start
// while the previous one in the stream finishes, prefetching its first weights into L2 before it
// waits for that kernel (griddepcontrol.wait). tuning as cuda_gemv_tuned's (NULL: the defaults).
int cuda_gemv_ex(bf16_t *y, float *y_f32, const bf16_t *residual, const bf16_t *x, const bf16_t *W, int batch,
                 int out, int in, const GemvLora *lora, void *workspace, size_t workspace_bytes,
                 const GemvTuning *tuning, int pdl, GpuStream stream, Err *err);

// One row of x (a decode step of one sequence) with the kernels around a product folded in:
//   y (out) = n(x) W^T [+ residual]
// where n(x) is x (in), or with norm_weight (in) its RMSNorm (eps), rounded to bf16 as
// cuda_rmsnorm_forward's output is. With swiglu, W has 2 out rows [gate | up] (the stacked
// gate|up product) and y (out) = silu(g) * u, g and u the two products rounded to bf16, as the
// separate SwiGLU kernel computes it. Exactly one of y (bf16; residual (out) or NULL is added
// before its one rounding and may be y itself) and y_f32 (fp32, no residual, no swiglu). in a
// multiple of 8; x, W, norm_weight 16-byte aligned. No workspace; results do not depend on timing
// or on the launch shape. pdl 1: a programmatic dependent launch, reading x only once the previous
// kernel in the stream is done (only for streams whose kernels allow it: kernels/gen_cuda.cu).
int cuda_gemv_row(bf16_t *y, float *y_f32, const bf16_t *residual, const bf16_t *x, const bf16_t *W, int out, int in,
                  const bf16_t *norm_weight, float eps, int swiglu, int pdl, GpuStream stream, Err *err);
KERNELS_EXTERN_C_END

#endif
