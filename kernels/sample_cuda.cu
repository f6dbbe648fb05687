// The GPU sampler (kernels/sample_cuda.cuh): one 1024-thread block per row of logits, the whole
// pipeline of lib/sample.c in one launch, only the ids copied back.
//
// How each row is done (n = vocab; "pass" = one walk over the row, which stays in L2):
//   A   repetition penalty from the slot's bitmap of seen ids, temperature (in place), and the
//       block argmax (largest value, smallest id): the greedy answer, and the max for sampling;
//   top-k: radix select of the k-th largest value on an order-preserving uint32 key of the float
//       (11 + 11 + 10 bits, one histogram pass each): keep key >= that key (ties kept, as the CPU);
//   top-p: the CPU sorts (value desc, id asc), walks from the bottom and drops while the running
//       probability is <= 1 - p. Its dropped set is therefore: every value below some value v*, and
//       the m largest ids of v*'s tie group. v* is the largest value whose mass below is <= 1 - p;
//       a radix select on the same key with mass histograms finds it (its first pass sees every
//       id, so it gives the total too), then m follows by division. Masses are fixed-point
//       integers (exp(l - max) * 2^frac, summed in uint64), so the sums are exact and independent
//       of the order the threads add them in;
//   min-p: keep exp(l - max) >= min_p;
//   draw: thread t owns the contiguous ids [t*C, (t+1)*C): it sums its kept masses, a block scan
//       gives every chunk its start, the chunk holding target = floor(u * total) walks its ids to
//       the first whose running sum exceeds the target (all in the same integers).
// Passes: greedy 1; sampling 2 (A, draw) + 3 for top-k + 3 for top-p (+ 1 when top-p cuts a tie
// group). A row's arguments travel with the launch; one 4-byte id a row comes back.
// exp is CUDA's expf (within 2 ulp of glibc's): a kept set or a draw can differ from the CPU's
// only where the CPU's own float sums sit within rounding of a boundary. min-p, a hard threshold
// on one value, recomputes exp in double near the threshold so that it decides as glibc's expf.
#include "cuda_check.cuh"
#include "sample_cuda.cuh"

#include <math.h>
#include <stdlib.h>
#include <string.h>

namespace {

constexpr int THREADS = 1024;           // one block per row; the scans assume exactly 32 warps
constexpr int MAX_BUCKETS = 2048;       // radix passes of 11, 11 and 10 bits
constexpr unsigned FULL = 0xffffffffu;

struct RowArgs {  // what the host sends per row
    int32_t slot; // < 0: skip the row
    uint32_t unused;
    uint64_t stream, step;
};

// Rows of one launch, passed by value with the kernel's arguments (24 * 64 bytes, within the
// 4 KB limit): no host-to-device copy before the launch.
constexpr int LAUNCH_ROWS = 64;
struct LaunchRows {
    RowArgs row[LAUNCH_ROWS];
};

struct KernelArgs {
    SampleParams p;
    uint32_t vocab;
    uint32_t words;  // bitmap words per slot: ceil(vocab / 32)
    float fx_scale;  // 2^frac: a mass e in [0, 1] becomes the integer e * fx_scale
};

__device__ __forceinline__ uint64_t mix64(uint64_t z)
{
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The top 24 bits of lib/sample.h's hash: u = bits * 2^-24.
__device__ __forceinline__ uint32_t uniform_bits(uint64_t seed, uint64_t stream, uint64_t step)
{
    const uint64_t G = 0x9E3779B97F4A7C15ull;
    uint64_t h = mix64(mix64(mix64(seed + G) ^ (stream + G)) ^ (step + G));
    return (uint32_t)(h >> 40);
}

// Increasing with the float's value; -0 and +0 share a key as they compare equal.
__device__ __forceinline__ uint32_t order_key(float x)
{
    uint32_t u = __float_as_uint(x == 0.0f ? 0.0f : x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned long long to_fixed(float e, float scale)
{
    return __float2ull_rn(e * scale);  // exact product: scale is a power of two
}

template <typename T> __device__ __forceinline__ T warp_inclusive_scan(T v)
{
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        T t = __shfl_up_sync(FULL, v, o);
        if (lane >= o)
            v += t;
    }
    return v;
}

// Exclusive prefix sum over the block in thread order; *total gets the block's sum.
template <typename T> __device__ T block_exclusive_scan(T v, T *total)
{
    __shared__ T warp_sums[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    T inclusive = warp_inclusive_scan(v);
    __syncthreads();  // an earlier call may still read warp_sums
    if (lane == 31)
        warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0)
        warp_sums[lane] = warp_inclusive_scan(warp_sums[lane]);
    __syncthreads();
    *total = warp_sums[31];
    return (warp ? warp_sums[warp - 1] : T(0)) + inclusive - v;
}

__device__ __forceinline__ void keep_better(float &v, uint32_t &i, float v2, uint32_t i2)
{
    if (v2 > v || (v2 == v && i2 < i)) {
        v = v2;
        i = i2;
    }
}

// The largest value and the smallest id holding it, to every thread.
__device__ void block_argmax(float &v, uint32_t &i)
{
    __shared__ float sv[32];
    __shared__ uint32_t si[32];
    for (int o = 16; o > 0; o >>= 1)
        keep_better(v, i, __shfl_xor_sync(FULL, v, o), __shfl_xor_sync(FULL, i, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0)
        sv[warp] = v, si[warp] = i;
    __syncthreads();
    v = sv[lane];
    i = si[lane];
    for (int o = 16; o > 0; o >>= 1)
        keep_better(v, i, __shfl_xor_sync(FULL, v, o), __shfl_xor_sync(FULL, i, o));
}

// The block's shared state of a radix select.
struct Select {
    uint32_t prefix, mask;       // the key bits fixed so far
    uint32_t above;              // top-k: how many keys lie above the prefix's range
    unsigned long long below;    // top-p: the mass below the prefix's range
    uint32_t group_count;        // top-p: after the last pass, how many hold the key
    unsigned long long group_mass;
    unsigned long long limit;    // top-p: floor((1 - p) * the row's total mass)
};

// One histogram pass: every element whose key has the selected prefix counts into bucket
// (key >> shift) & (nb - 1), and adds its mass when MASS. A warp whose elements all fall in one
// bucket (a flat row, long ties) adds once: 32 lanes on one shared address would serialise.
// key_of(x) gives an element's key, mass_of(x) its fixed-point mass (< 2^46).
template <bool MASS, typename KeyOf, typename MassOf>
__device__ void histogram_pass(const float *row, uint32_t n, uint32_t prefix, uint32_t mask, int shift,
                               int nb, KeyOf key_of, MassOf mass_of, unsigned *hcount, unsigned long long *hmass)
{
    for (int b = threadIdx.x; b < nb; b += THREADS) {
        hcount[b] = 0;
        if (MASS)
            hmass[b] = 0;
    }
    __syncthreads();
    uint32_t n_round = (n + THREADS - 1) / THREADS * THREADS;  // whole warps stay in the loop
    int lane = threadIdx.x & 31;
    for (uint32_t i = threadIdx.x; i < n_round; i += THREADS) {
        float x = 0.0f;
        bool in = false;
        if (i < n) {
            x = row[i];
            in = (key_of(x) & mask) == prefix;
        }
        unsigned ins = __ballot_sync(FULL, in);
        if (!ins)
            continue;
        uint32_t bucket = (key_of(x) >> shift) & (uint32_t)(nb - 1);
        unsigned long long fx = MASS && in ? mass_of(x) : 0ull;
        uint32_t first_bucket = __shfl_sync(FULL, bucket, __ffs(ins) - 1);
        if (__all_sync(FULL, !in || bucket == first_bucket)) {
            unsigned long long sum = 0;
            if (MASS) {  // fx < 2^46: 24 low bits and the rest, each summed over 32 lanes in 32 bits
                unsigned lo = __reduce_add_sync(FULL, (unsigned)(fx & 0xffffffu));
                unsigned hi = __reduce_add_sync(FULL, (unsigned)(fx >> 24));
                sum = ((unsigned long long)hi << 24) + lo;
            }
            if (lane == __ffs(ins) - 1) {
                atomicAdd(&hcount[bucket], (unsigned)__popc(ins));
                if (MASS)
                    atomicAdd(&hmass[bucket], sum);
            }
        } else if (in) {
            atomicAdd(&hcount[bucket], 1u);
            if (MASS)
                atomicAdd(&hmass[bucket], fx);
        }
    }
    __syncthreads();
}

// Top-k: the key of the k-th largest element (counting ties), by three histogram passes.
template <typename KeyOf>
__device__ uint32_t select_kth_key(const float *row, uint32_t n, uint32_t k, KeyOf key_of, Select *st,
                                   unsigned *hcount, unsigned long long *hmass)
{
    __syncthreads();  // st may hold an earlier row's result still being read
    if (threadIdx.x == 0)
        st->prefix = 0, st->mask = 0, st->above = 0;
    __syncthreads();
#pragma unroll
    for (int pass = 0; pass < 3; pass++) {
        int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;  // key bits 31..21, 20..10, 9..0
        int nb = pass < 2 ? 2048 : 1024, per = nb / THREADS;
        histogram_pass<false>(row, n, st->prefix, st->mask, shift, nb, key_of, key_of, hcount, hmass);
        uint32_t prefix = st->prefix, mask = st->mask, above = st->above;
        // Thread t owns buckets nb-1-t*per down to nb-per-t*per: scanning in thread order walks
        // the buckets from the top.
        unsigned mine = 0;
        for (int j = 0; j < per; j++)
            mine += hcount[nb - 1 - (threadIdx.x * per + j)];
        unsigned total;
        unsigned run = above + block_exclusive_scan(mine, &total);
        for (int j = 0; j < per; j++) {
            int b = nb - 1 - (threadIdx.x * per + j);
            unsigned c = hcount[b];
            if (c && run < k && k <= run + c) {  // exactly one bucket holds the k-th
                st->above = run;
                st->prefix = prefix | ((uint32_t)b << shift);
                st->mask = mask | ((uint32_t)(nb - 1) << shift);
            }
            run += c;
        }
        __syncthreads();
    }
    return st->prefix;
}

// Top-p: the largest key whose mass below is <= limit = floor(drop * total), with that mass and the
// key's tie group. The first pass sees every element: its histogram gives the total too.
template <typename KeyOf, typename MassOf>
__device__ void select_top_p_key(const float *row, uint32_t n, double drop, KeyOf key_of, MassOf mass_of,
                                 Select *st, unsigned *hcount, unsigned long long *hmass)
{
    __shared__ int chosen;
    unsigned long long limit = 0;
    __syncthreads();  // every thread has read st's last result (select_kth_key's)
    if (threadIdx.x == 0)
        st->prefix = 0, st->mask = 0, st->below = 0;
    __syncthreads();
#pragma unroll
    for (int pass = 0; pass < 3; pass++) {
        int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;  // key bits 31..21, 20..10, 9..0
        int nb = pass < 2 ? 2048 : 1024, per = nb / THREADS;
        histogram_pass<true>(row, n, st->prefix, st->mask, shift, nb, key_of, mass_of, hcount, hmass);
        uint32_t prefix = st->prefix, mask = st->mask;
        unsigned long long below = st->below;
        if (threadIdx.x == 0)
            chosen = -1;
        unsigned long long mine = 0;
        for (int j = 0; j < per; j++)
            mine += hmass[threadIdx.x * per + j];
        unsigned long long total;
        unsigned long long start = below + block_exclusive_scan(mine, &total);  // syncs: chosen is -1
        if (pass == 0) {
            double limit_d = floor(drop * (double)total);
            limit = limit_d > 0.0 ? (unsigned long long)limit_d : 0ull;
        }
        unsigned long long run = start;
        // Every key in bucket b has at least the mass below b's start; the smallest present one
        // has exactly that. So the largest non-empty bucket whose start is <= limit holds it.
        for (int j = 0; j < per; j++) {
            int b = threadIdx.x * per + j;
            if (hcount[b] && run <= limit)
                atomicMax(&chosen, b);
            run += hmass[b];
        }
        __syncthreads();
        int b = chosen;  // >= 0: the lowest non-empty bucket starts at below <= limit
        if (b >= 0 && b / per == (int)threadIdx.x) {
            run = start;
            for (int j = threadIdx.x * per; j < b; j++)
                run += hmass[j];
            st->below = run;
            st->prefix = prefix | ((uint32_t)b << shift);
            st->mask = mask | ((uint32_t)(nb - 1) << shift);
            st->group_count = hcount[b];
            st->group_mass = hmass[b];
            st->limit = limit;
        }
        __syncthreads();
    }
}

__global__ void __launch_bounds__(THREADS) sample_kernel(float *logits, const LaunchRows rows, uint32_t *ids,
                                                         uint32_t *seen_all, KernelArgs a)
{
    const RowArgs r = rows.row[blockIdx.x];
    if (r.slot < 0)
        return;
    const SampleParams &p = a.p;
    const uint32_t n = a.vocab;
    float *row = logits + (size_t)blockIdx.x * n;
    uint32_t *seen = seen_all + (size_t)r.slot * a.words;

    __shared__ unsigned hcount[MAX_BUCKETS];
    __shared__ unsigned long long hmass[MAX_BUCKETS];
    __shared__ Select st;
    __shared__ uint32_t picked;

    // A: penalty, temperature, argmax.
    const bool penalise = p.repetition_penalty != 1.0f;
    const bool temper = !p.greedy && p.temperature != 1.0f;
    float best = -INFINITY;
    uint32_t best_id = 0xffffffffu;
    for (uint32_t i = threadIdx.x; i < n; i += THREADS) {
        float x = row[i];
        bool changed = false;
        if (penalise && (seen[i >> 5] >> (i & 31) & 1u)) {
            x = x < 0.0f ? x * p.repetition_penalty : x / p.repetition_penalty;
            changed = true;
        }
        if (temper) {
            x = x / p.temperature;
            changed = true;
        }
        if (changed)
            row[i] = x;
        keep_better(best, best_id, x, i);
    }
    block_argmax(best, best_id);
    if (best_id >= n)  // every value NaN
        best_id = 0;

    if (!p.greedy) {
        const float mx = best;
        const float scale = a.fx_scale;
        const bool top_k = p.top_k > 0 && (uint32_t)p.top_k < n;
        const bool top_p = p.top_p < 1.0f;
        const bool min_p = p.min_p > 0.0f;
        const uint32_t minus_inf_key = order_key(-INFINITY);

        uint32_t kth_key = 0;  // keep key >= kth_key
        if (top_k) {
            auto plain_key = [](float x) { return order_key(x); };
            kth_key = select_kth_key(row, n, (uint32_t)p.top_k, plain_key, &st, hcount, hmass);
        }
        // The row as the CPU's top-p sees it: top-k's drops are -inf, with no mass.
        auto key_of = [=](float x) {
            uint32_t k = order_key(x);
            return k < kth_key ? minus_inf_key : k;
        };
        auto mass_of = [=](float x) {
            return order_key(x) < kth_key ? 0ull : to_fixed(expf(x - mx), scale);
        };

        uint32_t cut_key = 0, group_count = 0, group_drop = 0;  // top-p: keep key > cut_key, and
        if (top_p) {  // in cut_key's group all but the group_drop largest ids
            select_top_p_key(row, n, 1.0 - (double)p.top_p, key_of, mass_of, &st, hcount, hmass);
            cut_key = st.prefix;
            group_count = st.group_count;
            unsigned long long each = group_count ? st.group_mass / group_count : 0;
            unsigned long long room = st.limit - st.below;  // below <= limit by construction
            unsigned long long m = each ? room / each : group_count;
            if (m > group_count)
                m = group_count;
            if (cut_key == order_key(mx) && m >= group_count)  // the top token always stays
                m = group_count - 1;
            group_drop = (uint32_t)m;
        }

        // The draw, over contiguous chunks.
        const uint32_t chunk = (n + THREADS - 1) / THREADS;
        const uint32_t begin = min(n, threadIdx.x * chunk), end = min(n, begin + chunk);
        uint32_t group_rank = 0;  // this chunk's first member of cut_key's group, counted in id order
        if (group_drop > 0) {
            uint32_t members = 0, total;
            for (uint32_t i = begin; i < end; i++)
                members += key_of(row[i]) == cut_key;
            group_rank = block_exclusive_scan(members, &total);
        }
        const uint32_t group_keep = group_count - group_drop;
        unsigned long long mine = 0;
        for (uint32_t i = begin; i < end; i++) {
            float x = row[i];
            uint32_t key = order_key(x);
            bool keep = key >= kth_key;
            if (!keep)
                key = minus_inf_key;  // as key_of, so that the group ranks agree with the count
            if (top_p) {
                if (key < cut_key)
                    keep = false;
                else if (key == cut_key && group_drop > 0)
                    keep = keep && group_rank++ < group_keep;
            }
            float e = 0.0f;
            if (keep) {
                e = expf(x - mx);
                if (min_p) {
                    float ce = e;
                    if (fabsf(e - p.min_p) <= 1e-5f * p.min_p)  // decide as glibc's expf would
                        ce = (float)exp((double)(x - mx));
                    if (!(ce >= p.min_p))
                        e = 0.0f;
                }
            }
            row[i] = e;  // the kept masses, 0 for dropped ids: the walk below reads them back
            mine += to_fixed(e, scale);
        }
        unsigned long long total;
        unsigned long long start = block_exclusive_scan(mine, &total);
        // target = floor(u * total) with u = bits * 2^-24; the first id whose running sum exceeds
        // it is the one whose running sum exceeds u * total (the sums are integers).
        unsigned long long u = uniform_bits(p.seed, r.stream, r.step);
        unsigned long long target = (__umul64hi(u, total) << 40) | ((u * total) >> 24);
        if (threadIdx.x == 0)
            picked = best_id;  // nothing kept with mass: the CPU returns the argmax too
        __syncthreads();
        if (start <= target && target < start + mine) {
            unsigned long long run = start;
            for (uint32_t i = begin; i < end; i++) {
                run += to_fixed(row[i], scale);
                if (run > target) {
                    picked = i;
                    break;
                }
            }
        }
        __syncthreads();
        best_id = picked;
    }
    if (threadIdx.x == 0) {
        ids[blockIdx.x] = best_id;
        atomicOr(&seen[best_id >> 5], 1u << (best_id & 31));
    }
}

__global__ void uniform_kernel(float *out, const uint64_t *streams, const uint64_t *steps, int n, uint64_t seed)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        out[i] = (float)uniform_bits(seed, streams[i], steps[i]) * (1.0f / 16777216.0f);
}

}  // namespace

struct CudaSampler {
    SampleParams p;
    int n_slots;
    uint32_t vocab, words;
    float fx_scale;
    uint32_t *seen;       // device (n_slots, words): bit i of a slot's row: id i was seen
    uint32_t *seen_host;  // (words) scratch for cuda_sampler_start
    uint32_t *ids_host;   // pinned (n_slots)
    uint32_t *ids_dev;
};

void cuda_sampler_free(CudaSampler *s)
{
    if (!s)
        return;
    cudaFree(s->seen);
    free(s->seen_host);
    cudaFreeHost(s->ids_host);
    cudaFree(s->ids_dev);
    free(s);
}

static int sampler_buffers(CudaSampler *s, Err *err)
{
    size_t seen_bytes = (size_t)s->n_slots * s->words * sizeof(uint32_t);
    CUDA_CHECK(cudaMalloc(&s->seen, seen_bytes), err);
    CUDA_CHECK(cudaMemset(s->seen, 0, seen_bytes), err);
    CUDA_CHECK(cudaMallocHost(&s->ids_host, s->n_slots * sizeof(uint32_t)), err);
    CUDA_CHECK(cudaMalloc(&s->ids_dev, s->n_slots * sizeof(uint32_t)), err);
    s->seen_host = (uint32_t *)calloc(s->words, sizeof(uint32_t));
    SHAPE_CHECK(s->seen_host, err, "sampler: out of memory");
    return 0;
}

CudaSampler *cuda_sampler_create(int n_slots, uint32_t vocab, const SampleParams *p, Err *err)
{
    if (sample_params_check(p, err) < 0)
        return NULL;
    if (n_slots < 1 || vocab == 0) {
        err_set(err, "%s:%d: sampler: need at least one slot and one id (got %d slots, vocab %u)", __FILE__,
                __LINE__, n_slots, vocab);
        return NULL;
    }
    CudaSampler *s = (CudaSampler *)calloc(1, sizeof *s);
    if (!s) {
        err_set(err, "sampler: out of memory");
        return NULL;
    }
    s->p = *p;
    s->n_slots = n_slots;
    s->vocab = vocab;
    s->words = (vocab + 31) / 32;
    // Masses e in [0, 1] as integers e * 2^frac: a row's total stays below 2^63 (and a mass
    // below 2^46, as histogram_pass's split needs).
    int vocab_bits = 0;
    while (vocab_bits < 32 && (1ull << vocab_bits) < vocab)
        vocab_bits++;
    int frac = 62 - vocab_bits < 45 ? 62 - vocab_bits : 45;
    s->fx_scale = ldexpf(1.0f, frac);
    if (sampler_buffers(s, err) < 0) {
        cuda_sampler_free(s);
        return NULL;
    }
    return s;
}

int cuda_sampler_start(CudaSampler *s, int slot, const uint32_t *ids, size_t n, GpuStream stream, Err *err)
{
    SHAPE_CHECK(slot >= 0 && slot < s->n_slots, err, "sampler: slot %d out of range [0, %d)", slot, s->n_slots);
    SHAPE_CHECK(n == 0 || ids, err, "sampler: %zu ids but no array", n);
    memset(s->seen_host, 0, s->words * sizeof(uint32_t));
    for (size_t i = 0; i < n; i++)
        if (ids[i] < s->vocab)  // as the CPU: ids outside the vocabulary are ignored
            s->seen_host[ids[i] >> 5] |= 1u << (ids[i] & 31);
    // From pageable memory: the call returns once seen_host is staged, so it may be reused.
    CUDA_CHECK(cudaMemcpyAsync(s->seen + (size_t)slot * s->words, s->seen_host, s->words * sizeof(uint32_t),
                               cudaMemcpyHostToDevice, (cudaStream_t)stream),
               err);
    return 0;
}

int cuda_sampler_pick(CudaSampler *s, float *logits, int n, const int *slots, const uint64_t *streams,
                      const uint64_t *steps, uint32_t *out, GpuStream stream, Err *err)
{
    SHAPE_CHECK(n >= 0, err, "sampler: %d rows", n);
    SHAPE_CHECK(n == 0 || (logits && slots && streams && steps && out), err, "sampler: missing array");
    cudaStream_t st = (cudaStream_t)stream;
    KernelArgs a = {s->p, s->vocab, s->words, s->fx_scale};
    for (int first = 0; first < n; first += s->n_slots) {  // n_slots rows, then one copy back
        int rows = n - first < s->n_slots ? n - first : s->n_slots;
        int any = 0;
        for (int i = 0; i < rows; i++) {
            int slot = slots[first + i];
            SHAPE_CHECK(slot < s->n_slots, err, "sampler: row %d: slot %d out of range [0, %d)", first + i, slot,
                        s->n_slots);
            any |= slot >= 0;
        }
        if (!any)
            continue;
        for (int done = 0; done < rows; done += LAUNCH_ROWS) {
            int count = rows - done < LAUNCH_ROWS ? rows - done : LAUNCH_ROWS;
            LaunchRows lr;
            memset(&lr, 0, sizeof lr);
            for (int i = 0; i < count; i++) {
                int row = first + done + i;
                lr.row[i].slot = slots[row] < 0 ? -1 : slots[row];
                lr.row[i].stream = streams[row];
                lr.row[i].step = steps[row];
            }
            sample_kernel<<<count, THREADS, 0, st>>>(logits + (size_t)(first + done) * s->vocab, lr, s->ids_dev + done,
                                                     s->seen, a);
            LAUNCH_CHECK(err);
        }
        CUDA_CHECK(cudaMemcpyAsync(s->ids_host, s->ids_dev, rows * sizeof(uint32_t), cudaMemcpyDeviceToHost, st),
                   err);
        CUDA_CHECK(cudaStreamSynchronize(st), err);
        for (int i = 0; i < rows; i++)
            if (slots[first + i] >= 0)
                out[first + i] = s->ids_host[i];
    }
    return 0;
}

int cuda_sample_uniforms(uint64_t seed, const uint64_t *streams, const uint64_t *steps, int n, float *out,
                         Err *err)
{
    SHAPE_CHECK(n > 0 && streams && steps && out, err, "sample_uniforms: %d values", n);
    uint64_t *d_streams = NULL, *d_steps = NULL;
    float *d_out = NULL;
    int rc = -1;
    if (cudaMalloc(&d_streams, n * sizeof(uint64_t)) == cudaSuccess &&
        cudaMalloc(&d_steps, n * sizeof(uint64_t)) == cudaSuccess && cudaMalloc(&d_out, n * sizeof(float)) == cudaSuccess &&
        cudaMemcpy(d_streams, streams, n * sizeof(uint64_t), cudaMemcpyHostToDevice) == cudaSuccess &&
        cudaMemcpy(d_steps, steps, n * sizeof(uint64_t), cudaMemcpyHostToDevice) == cudaSuccess) {
        uniform_kernel<<<ceil_div(n, 256), 256>>>(d_out, d_streams, d_steps, n, seed);
        if (cudaGetLastError() == cudaSuccess &&
            cudaMemcpy(out, d_out, n * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess)
            rc = 0;
    }
    if (rc < 0)
        err_set(err, "%s:%d: sample_uniforms: %s", __FILE__, __LINE__, cudaGetErrorString(cudaGetLastError()));
    cudaFree(d_streams);
    cudaFree(d_steps);
    cudaFree(d_out);
    return rc;
}
