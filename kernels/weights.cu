// Model tensors to the device as bf16 (kernels/weights.cuh): one at a time (synchronous copies
// from the map), or a whole model through the pinned, overlapped pipeline at the end.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <string.h>

#include <thread>
#include <vector>

#include "cuda_check.cuh"
#include "weights.cuh"

static uint16_t host_bf16_bits(float f)  // round to nearest even, as __float2bfloat16
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

int cuda_upload_tensor_bf16(bf16_t *dst, const Tensor *t, GpuStream stream, Err *err)
{
    cudaStream_t s = (cudaStream_t)stream;
    int64_t n = tensor_numel(t);
    if (t->dtype == DTYPE_BF16) {
        CUDA_CHECK(cudaMemcpyAsync(dst, t->data, (size_t)n * 2, cudaMemcpyHostToDevice, s), err);
        CUDA_CHECK(cudaStreamSynchronize(s), err);
        return 0;
    }
    const int64_t chunk = 1 << 20;
    std::vector<float> f32((size_t)(n < chunk ? n : chunk));
    std::vector<uint16_t> bits(f32.size());
    for (int64_t first = 0; first < n; first += chunk) {
        int64_t cnt = n - first < chunk ? n - first : chunk;
        tensor_to_f32(t, first, cnt, f32.data());
        for (int64_t i = 0; i < cnt; i++)
            bits[i] = host_bf16_bits(f32[i]);
        CUDA_CHECK(cudaMemcpyAsync(dst + first, bits.data(), (size_t)cnt * 2, cudaMemcpyHostToDevice, s), err);
        CUDA_CHECK(cudaStreamSynchronize(s), err);
    }
    return 0;
}

__global__ void f32_to_bf16_kernel(__nv_bfloat16 *out, const float *in, size_t n)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        out[i] = __float2bfloat16(in[i]);
}

int cuda_f32_to_bf16(bf16_t *out, const float *in, size_t n, GpuStream stream, Err *err)
{
    if (n == 0)
        return 0;
    f32_to_bf16_kernel<<<ceil_div(n, 256), 256, 0, (cudaStream_t)stream>>>(out, in, n);
    LAUNCH_CHECK(err);
    return 0;
}

// ---- the batched pipeline ----------------------------------------------------------------------

#define STAGE_SLOTS 4
#define STAGE_BYTES ((size_t)64 << 20)
#define FILL_THREADS 4

__global__ void f16_to_bf16_kernel(__nv_bfloat16 *out, const __half *in, size_t n)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        out[i] = __float2bfloat16(__half2float(in[i]));
}

static size_t element_bytes(DType d) { return d == DTYPE_F32 ? 4 : d == DTYPE_F16 || d == DTYPE_BF16 ? 2 : 0; }

// memcpy split over up to FILL_THREADS threads (page-aligned parts): the source is a memory map,
// and one thread faulting its pages in is the bottleneck.
static void parallel_copy(void *dst, const void *src, size_t bytes)
{
    if (bytes < ((size_t)4 << 20)) {
        memcpy(dst, src, bytes);
        return;
    }
    size_t part = (bytes / FILL_THREADS + 4095) & ~(size_t)4095;
    std::thread helpers[FILL_THREADS - 1];
    for (int i = 1; i < FILL_THREADS; i++) {
        size_t start = (size_t)i * part;
        if (start < bytes)
            helpers[i - 1] = std::thread(memcpy, (char *)dst + start, (const char *)src + start,
                                         bytes - start < part ? bytes - start : part);
    }
    memcpy(dst, src, bytes < part ? bytes : part);
    for (auto &t : helpers)
        if (t.joinable())
            t.join();
}

// One staged piece: bytes [src_off, src_off + bytes) of job's source at stage_off in a slot.
struct StagePiece {
    int job;
    size_t src_off, bytes, stage_off;
};

struct StagePipeline {
    void *host[STAGE_SLOTS] = {};     // pinned
    void *raw[STAGE_SLOTS] = {};      // device, for F32/F16 before conversion
    cudaEvent_t done[STAGE_SLOTS] = {};
    ~StagePipeline()
    {
        for (int s = 0; s < STAGE_SLOTS; s++) {
            if (done[s])
                cudaEventSynchronize(done[s]), cudaEventDestroy(done[s]);
            if (host[s])
                cudaFreeHost(host[s]);
            if (raw[s])
                cudaFree(raw[s]);
        }
    }
};

// Queue slot's pieces: copy to the device (straight into dst for BF16, else into raw then a
// conversion kernel), then record the slot's event.
static int flush_slot(StagePipeline *pl, int slot, const std::vector<StagePiece> &pieces,
                      const CudaTensorUpload *jobs, cudaStream_t s, Err *err)
{
    for (const StagePiece &pc : pieces) {
        const CudaTensorUpload *j = &jobs[pc.job];
        const char *staged = (const char *)pl->host[slot] + pc.stage_off;
        size_t eb = element_bytes(j->src->dtype), first = pc.src_off / eb, n = pc.bytes / eb;
        if (j->src->dtype == DTYPE_BF16) {
            CUDA_CHECK(cudaMemcpyAsync(j->dst + first, staged, pc.bytes, cudaMemcpyHostToDevice, s), err);
            continue;
        }
        char *raw = (char *)pl->raw[slot] + pc.stage_off;
        CUDA_CHECK(cudaMemcpyAsync(raw, staged, pc.bytes, cudaMemcpyHostToDevice, s), err);
        if (j->src->dtype == DTYPE_F32)
            f32_to_bf16_kernel<<<ceil_div(n, 256), 256, 0, s>>>(j->dst + first, (const float *)raw, n);
        else
            f16_to_bf16_kernel<<<ceil_div(n, 256), 256, 0, s>>>(j->dst + first, (const __half *)raw, n);
        LAUNCH_CHECK(err);
    }
    CUDA_CHECK(cudaEventRecord(pl->done[slot], s), err);
    return 0;
}

int cuda_upload_tensors_bf16(const CudaTensorUpload *jobs, int n_jobs, GpuStream stream, Err *err)
{
    cudaStream_t s = (cudaStream_t)stream;
    bool need_raw = false;
    for (int i = 0; i < n_jobs; i++) {
        if (!element_bytes(jobs[i].src->dtype))
            return err_set(err, "weights: tensor %d has dtype %s, not F32, F16 or BF16", i,
                           dtype_name(jobs[i].src->dtype));
        need_raw = need_raw || jobs[i].src->dtype != DTYPE_BF16;
    }
    StagePipeline pl;
    for (int slot = 0; slot < STAGE_SLOTS; slot++)
        if (cudaHostAlloc(&pl.host[slot], STAGE_BYTES, cudaHostAllocDefault) != cudaSuccess) {
            cudaGetLastError();
            pl.host[slot] = NULL;
            for (int i = 0; i < n_jobs; i++)   // no pinned memory: one tensor at a time
                if (cuda_upload_tensor_bf16(jobs[i].dst, jobs[i].src, stream, err) < 0)
                    return -1;
            return 0;
        }
    for (int slot = 0; slot < STAGE_SLOTS; slot++) {
        CUDA_CHECK(cudaEventCreateWithFlags(&pl.done[slot], cudaEventDisableTiming), err);
        if (need_raw)
            CUDA_CHECK(cudaMalloc(&pl.raw[slot], STAGE_BYTES), err);
    }
    std::vector<StagePiece> pieces;
    int slot = 0;
    size_t fill = 0;
    for (int i = 0; i < n_jobs; i++) {
        const Tensor *t = jobs[i].src;
        size_t eb = element_bytes(t->dtype), total = (size_t)tensor_numel(t) * eb;
        for (size_t off = 0; off < total;) {
            fill = (fill + 15) & ~(size_t)15;   // 16-byte aligned pieces (float reads, fast copies)
            size_t room = fill < STAGE_BYTES ? (STAGE_BYTES - fill) / eb * eb : 0;
            size_t take = total - off < room ? total - off : room;
            if (take == 0) {
                // Slot full: send it, move to the next slot once its previous transfer is done.
                if (flush_slot(&pl, slot, pieces, jobs, s, err) < 0)
                    return -1;
                pieces.clear();
                slot = (slot + 1) % STAGE_SLOTS;
                fill = 0;
                CUDA_CHECK(cudaEventSynchronize(pl.done[slot]), err);
                continue;
            }
            parallel_copy((char *)pl.host[slot] + fill, (const char *)t->data + off, take);
            StagePiece pc = {i, off, take, fill};
            pieces.push_back(pc);
            fill += take;
            off += take;
        }
    }
    if (!pieces.empty() && flush_slot(&pl, slot, pieces, jobs, s, err) < 0)
        return -1;
    CUDA_CHECK(cudaStreamSynchronize(s), err);
    return 0;
}
