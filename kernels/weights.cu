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

// Elements first .. first + n - 1 of a dense (rows, cols) tensor, raw F32 or F16 in `in`, rounded
// into dst's rows ld apart (ld = cols: dense).
template <typename T>
__global__ void raw_to_bf16_kernel(__nv_bfloat16 *dst, const T *in, size_t first, size_t n, size_t cols, size_t ld)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    size_t e = first + i, row = e / cols;
    dst[row * ld + (e - row * cols)] = __float2bfloat16((float)in[i]);
}

// Job j's row length and destination row stride in elements (cols = ld = numel when dense).
static void job_rows(const CudaTensorUpload *j, size_t *cols, size_t *ld)
{
    bool pitched = j->ld > 0 && j->ld != j->cols;
    *cols = pitched ? (size_t)j->cols : (size_t)tensor_numel(j->src);
    *ld = pitched ? (size_t)j->ld : *cols;
}

// bf16 elements first .. first + n - 1 of a dense (rows, cols) tensor, at src (host, pinned),
// into dst's rows ld apart: partial rows one copy each, whole rows one 2D copy.
static int copy_rows(bf16_t *dst, size_t cols, size_t ld, size_t first, size_t n, const char *src, cudaStream_t s,
                     Err *err)
{
    for (size_t e = first, end = first + n; e < end;) {
        size_t row = e / cols, col = e - row * cols;
        if (col != 0 || end - e < cols) {
            size_t take = cols - col < end - e ? cols - col : end - e;
            CUDA_CHECK(cudaMemcpyAsync(dst + row * ld + col, src, take * 2, cudaMemcpyHostToDevice, s), err);
            e += take, src += take * 2;
        } else {
            size_t rows = (end - e) / cols;
            CUDA_CHECK(cudaMemcpy2DAsync(dst + row * ld, ld * 2, src, cols * 2, cols * 2, rows,
                                         cudaMemcpyHostToDevice, s), err);
            e += rows * cols, src += rows * cols * 2;
        }
    }
    return 0;
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
        size_t eb = element_bytes(j->src->dtype), first = pc.src_off / eb, n = pc.bytes / eb, cols, ld;
        job_rows(j, &cols, &ld);
        if (j->src->dtype == DTYPE_BF16) {
            if (copy_rows(j->dst, cols, ld, first, n, staged, s, err) < 0)
                return -1;
            continue;
        }
        char *raw = (char *)pl->raw[slot] + pc.stage_off;
        CUDA_CHECK(cudaMemcpyAsync(raw, staged, pc.bytes, cudaMemcpyHostToDevice, s), err);
        if (j->src->dtype == DTYPE_F32)
            raw_to_bf16_kernel<<<ceil_div(n, 256), 256, 0, s>>>(j->dst, (const float *)raw, first, n, cols, ld);
        else
            raw_to_bf16_kernel<<<ceil_div(n, 256), 256, 0, s>>>(j->dst, (const __half *)raw, first, n, cols, ld);
        LAUNCH_CHECK(err);
    }
    CUDA_CHECK(cudaEventRecord(pl->done[slot], s), err);
    return 0;
}

// One job without the pipeline; a pitched one goes through a dense device copy.
static int upload_one(const CudaTensorUpload *j, cudaStream_t s, Err *err)
{
    size_t cols, ld;
    job_rows(j, &cols, &ld);
    if (ld == cols)
        return cuda_upload_tensor_bf16(j->dst, j->src, s, err);
    size_t n = (size_t)tensor_numel(j->src);
    bf16_t *dense = NULL;
    CUDA_CHECK(cudaMalloc(&dense, n * 2), err);
    int rc = cuda_upload_tensor_bf16(dense, j->src, s, err);
    if (rc == 0 && cudaMemcpy2DAsync(j->dst, ld * 2, dense, cols * 2, cols * 2, n / cols, cudaMemcpyDeviceToDevice,
                                     s) != cudaSuccess)
        rc = err_set(err, "weights: copying a tensor into rows %zu apart failed", ld);
    if (rc == 0 && cudaStreamSynchronize(s) != cudaSuccess)
        rc = err_set(err, "weights: copying a tensor into rows %zu apart failed", ld);
    cudaFree(dense);
    return rc;
}

int cuda_upload_tensors_bf16(const CudaTensorUpload *jobs, int n_jobs, GpuStream stream, Err *err)
{
    cudaStream_t s = (cudaStream_t)stream;
    bool need_raw = false;
    for (int i = 0; i < n_jobs; i++) {
        if (!element_bytes(jobs[i].src->dtype))
            return err_set(err, "weights: tensor %d has dtype %s, not F32, F16 or BF16", i,
                           dtype_name(jobs[i].src->dtype));
        if (jobs[i].ld > 0 && (jobs[i].cols < 1 || jobs[i].ld < jobs[i].cols || tensor_numel(jobs[i].src) % jobs[i].cols))
            return err_set(err, "weights: tensor %d of %lld elements in rows of %lld, %lld apart", i,
                           (long long)tensor_numel(jobs[i].src), (long long)jobs[i].cols, (long long)jobs[i].ld);
        need_raw = need_raw || jobs[i].src->dtype != DTYPE_BF16;
    }
    StagePipeline pl;
    for (int slot = 0; slot < STAGE_SLOTS; slot++)
        if (cudaHostAlloc(&pl.host[slot], STAGE_BYTES, cudaHostAllocDefault) != cudaSuccess) {
            cudaGetLastError();
            pl.host[slot] = NULL;
            for (int i = 0; i < n_jobs; i++)   // no pinned memory: one tensor at a time
                if (upload_one(&jobs[i], s, err) < 0)
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
