// Global gradient norm and the AdamW step. Both memory-bound over the flat buffer of all LoRA
// parameters: the norm reads 4 bytes a parameter, the step reads 16 and writes 12.
#include "adamw.cuh"
#include "cuda_check.cuh"

// Grid-stride partial sums in fp32 per thread (a few hundred terms each), the block's sum
// added to the double total: one atomic per block.
__global__ void grad_norm_squared_kernel(double *norm_sq, const float *grad, size_t n)
{
    float s = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        s += grad[i] * grad[i];
    s = block_sum(s);
    if (threadIdx.x == 0)
        atomicAdd(norm_sq, (double)s);
}

struct AdamWCoefficients {
    float decay;         // 1 - lr * weight_decay
    float one_minus_b1, beta2, one_minus_b2;
    float step_size;     // lr / (1 - beta1^step)
    float bias2_sqrt;    // sqrt(1 - beta2^step)
    float eps;
    float max_norm;      // <= 0: no clipping
};

__global__ void adamw_step_kernel(float *param, const float *grad, float *m, float *v, size_t n,
                                  AdamWCoefficients k, const double *norm_sq)
{
    float grad_scale = 1.0f;
    if (k.max_norm > 0) {
        float coef = (float)(k.max_norm / (sqrt(*norm_sq) + 1e-6));
        grad_scale = coef < 1.0f ? coef : 1.0f;
    }
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float g = grad[i] * grad_scale;
        float mi = m[i] + (g - m[i]) * k.one_minus_b1;
        float vi = v[i] * k.beta2 + k.one_minus_b2 * g * g;
        param[i] = param[i] * k.decay - k.step_size * mi / (sqrtf(vi) / k.bias2_sqrt + k.eps);
        m[i] = mi;
        v[i] = vi;
    }
}

static int grid_for(size_t n, int threads, int *blocks, Err *err)
{
    int device, sms;
    CUDA_CHECK(cudaGetDevice(&device), err);
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), err);
    size_t want = (n + threads - 1) / threads, cap = (size_t)sms * 8;  // 8 blocks of 256 fill an SM
    *blocks = (int)(want < cap ? want : cap);
    return 0;
}

extern "C" int cuda_grad_norm_squared(double *norm_sq, const float *grad, size_t n, GpuStream stream, Err *err)
{
    SHAPE_CHECK(norm_sq && grad, err, "grad norm: NULL pointer");
    if (n == 0)
        return 0;
    int blocks;
    if (grid_for(n, 256, &blocks, err) < 0)
        return -1;
    grad_norm_squared_kernel<<<blocks, 256, 0, (cudaStream_t)stream>>>(norm_sq, grad, n);
    LAUNCH_CHECK(err);
    return 0;
}

extern "C" int cuda_adamw_step(float *param, const float *grad, float *m, float *v, size_t n, const AdamWStep *hp,
                               const double *norm_sq, GpuStream stream, Err *err)
{
    SHAPE_CHECK(param && grad && m && v && hp, err, "adamw: NULL pointer");
    SHAPE_CHECK(hp->step >= 1, err, "adamw: step %ld, must count from 1", hp->step);
    SHAPE_CHECK(hp->max_norm <= 0 || norm_sq, err, "adamw: clipping to %g needs the gradient norm", hp->max_norm);
    if (n == 0)
        return 0;
    AdamWCoefficients k;
    k.decay = (float)(1.0 - hp->lr * hp->weight_decay);
    k.one_minus_b1 = (float)(1.0 - hp->beta1);
    k.beta2 = (float)hp->beta2;
    k.one_minus_b2 = (float)(1.0 - hp->beta2);
    k.step_size = (float)(hp->lr / (1.0 - pow(hp->beta1, (double)hp->step)));
    k.bias2_sqrt = (float)sqrt(1.0 - pow(hp->beta2, (double)hp->step));
    k.eps = (float)hp->eps;
    k.max_norm = hp->max_norm > 0 ? (float)hp->max_norm : 0.0f;
    int blocks;
    if (grid_for(n, 256, &blocks, err) < 0)
        return -1;
    adamw_step_kernel<<<blocks, 256, 0, (cudaStream_t)stream>>>(param, grad, m, v, n, k, norm_sq);
    LAUNCH_CHECK(err);
    return 0;
}
