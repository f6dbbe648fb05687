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
// That was the first implementation, and it was slow (H200, vocab 128256, batch 1: greedy 30 us,
// T 0.7 + top-p 0.9 539 us): one load in flight a thread, and the first radix pass of each select
// sends nearly every element of the row to a few dozen buckets (the top 11 bits of the key are
// sign, exponent and 2 mantissa bits): 128k shared atomics on a few addresses, serialised. It is
// still there, as "the whole row" (KernelArgs.candidates = 0, cuda_sampler_set_candidates), to be
// timed and checked against. The default path (sample_candidates, below) keeps its arithmetic
// but runs the selects and the draw on a short list: the candidates near the max, found by two
// passes whose atomics go to 2048 bins of distance from the max (1/64 of a logit wide; the
// elements more than 32 below the max, with no mass, add none), copied to shared memory and
// sorted by id. Pass A and the candidate passes load 4 float4s a thread at a time. A row whose
// candidates do not fit (a flat row, top-p near 1 at a high temperature, top-k > ~2000) takes the
// whole-row path; the ids are the same either way.
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
    int candidates;  // 1: top-k and top-p go through the candidate list (sample_candidates)
    unsigned *path_counts;  // device (2): sampled rows done [0] on the list, [1] over the whole row
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
// outside: the mass of the row's elements not in row[0, n) (the candidate list's path), all below
// every element of it (0 when row is the whole row).
template <typename KeyOf, typename MassOf>
__device__ void select_top_p_key(const float *row, uint32_t n, double drop, unsigned long long outside, KeyOf key_of,
                                 MassOf mass_of, Select *st, unsigned *hcount, unsigned long long *hmass)
{
    __shared__ int chosen;
    unsigned long long limit = 0;
    __syncthreads();  // every thread has read st's last result (select_kth_key's)
    if (threadIdx.x == 0)
        st->prefix = 0, st->mask = 0, st->below = outside;
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
        if (pass == 0) {  // below is outside: the row's total is below + total
            double limit_d = floor(drop * (double)(below + total));
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

// The sampling tail of a row, after the penalty, the temperature and the max: top-k (when top_k),
// top-p, min-p and the draw, over vals[0, n) with ids ids[j] (ascending), or j when ids is null
// (the whole row). outside: the mass of the row's elements not in vals, all of them below vals'
// and dropped by top-k or top-p, or of no mass (0 for the whole row). vals is overwritten with
// the kept masses. Returns the id drawn, to every thread.
__device__ uint32_t finish_sampling(float *vals, const uint32_t *ids, uint32_t n, bool top_k,
                                    unsigned long long outside, float mx, uint32_t best_id, const SampleParams &p,
                                    const RowArgs &r, float scale, Select *st, unsigned *hcount,
                                    unsigned long long *hmass)
{
    __shared__ uint32_t picked;
    const bool top_p = p.top_p < 1.0f;
    const bool min_p = p.min_p > 0.0f;
    const uint32_t minus_inf_key = order_key(-INFINITY);

    uint32_t kth_key = 0;  // keep key >= kth_key
    if (top_k) {
        auto plain_key = [](float x) { return order_key(x); };
        kth_key = select_kth_key(vals, n, (uint32_t)p.top_k, plain_key, st, hcount, hmass);
    }
    // The row as the CPU's top-p sees it: top-k's drops are -inf, with no mass.
    auto key_of = [=](float x) {
        uint32_t k = order_key(x);
        return k < kth_key ? minus_inf_key : k;
    };
    auto mass_of = [=](float x) { return order_key(x) < kth_key ? 0ull : to_fixed(expf(x - mx), scale); };

    uint32_t cut_key = 0, group_count = 0, group_drop = 0;  // top-p: keep key > cut_key, and
    if (top_p) {  // in cut_key's group all but the group_drop largest ids
        select_top_p_key(vals, n, 1.0 - (double)p.top_p, outside, key_of, mass_of, st, hcount, hmass);
        cut_key = st->prefix;
        group_count = st->group_count;
        unsigned long long each = group_count ? st->group_mass / group_count : 0;
        unsigned long long room = st->limit - st->below;  // below <= limit by construction
        unsigned long long m = each ? room / each : group_count;
        if (m > group_count)
            m = group_count;
        if (cut_key == order_key(mx) && m >= group_count)  // the top token always stays
            m = group_count - 1;
        group_drop = (uint32_t)m;
    }

    // The draw, over contiguous chunks (in id order).
    const uint32_t chunk = (n + THREADS - 1) / THREADS;
    const uint32_t begin = min(n, threadIdx.x * chunk), end = min(n, begin + chunk);
    uint32_t group_rank = 0;  // this chunk's first member of cut_key's group, counted in id order
    if (group_drop > 0) {
        uint32_t members = 0, total;
        for (uint32_t i = begin; i < end; i++)
            members += key_of(vals[i]) == cut_key;
        group_rank = block_exclusive_scan(members, &total);
    }
    const uint32_t group_keep = group_count - group_drop;
    unsigned long long mine = 0;
    for (uint32_t i = begin; i < end; i++) {
        float x = vals[i];
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
        vals[i] = e;  // the kept masses, 0 for dropped ids: the walk below reads them back
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
            run += to_fixed(vals[i], scale);
            if (run > target) {
                picked = ids ? ids[i] : i;
                break;
            }
        }
    }
    __syncthreads();
    uint32_t id = picked;
    __syncthreads();  // picked is read before a later call writes it
    return id;
}

// Calls f(x, id, ok) for every element of row[0, n) (ok: x = row[id] is one; the calls with ok
// false fill the last round): in rounds of VISIT_VEC float4 loads a thread when row is 16-byte
// aligned (then the n % 4 last ones, scalar), all loads of a round issued before the calls. Every
// thread of the block makes the same number of calls, so f may use warp-wide votes.
constexpr int VISIT_VEC = 4;
template <typename F> __device__ __forceinline__ void visit_row(const float *row, uint32_t n, F f)
{
    const uint32_t n4 = ((uintptr_t)row & 15) == 0 ? n / 4 : 0;
    const float4 *row4 = reinterpret_cast<const float4 *>(row);
    for (uint32_t q0 = 0; q0 < n4; q0 += VISIT_VEC * THREADS) {
        float4 v[VISIT_VEC];
#pragma unroll
        for (int u = 0; u < VISIT_VEC; u++) {
            uint32_t q = q0 + u * THREADS + threadIdx.x;
            v[u] = q < n4 ? row4[q] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int u = 0; u < VISIT_VEC; u++) {
            uint32_t q = q0 + u * THREADS + threadIdx.x;
            bool in = q < n4;
            f(v[u].x, 4 * q, in);
            f(v[u].y, 4 * q + 1, in);
            f(v[u].z, 4 * q + 2, in);
            f(v[u].w, 4 * q + 3, in);
        }
    }
    const uint32_t done = 4 * n4, rest = n - done;
    for (uint32_t j0 = 0; j0 < rest; j0 += 4 * VISIT_VEC * THREADS) {
        float x[4 * VISIT_VEC];
#pragma unroll
        for (int k = 0; k < 4 * VISIT_VEC; k++) {
            uint32_t j = j0 + k * THREADS + threadIdx.x;
            x[k] = j < rest ? row[done + j] : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < 4 * VISIT_VEC; k++) {
            uint32_t j = j0 + k * THREADS + threadIdx.x;
            f(x[k], done + j, j < rest);
        }
    }
}

// The candidate list (the default path for top-k and top-p). Every element of a row falls in a
// bin of its distance d = max - x below the row's max: bin floor(d * 64) for d < 32, else "far"
// (as its mass exp(-d) < 2^-46 is at most 1 in the fixed point, which has at most 45 fraction
// bits). Bins are monotone in x, so the elements of bins 0..B are the largest values of the row,
// ties together. One pass counts the bins (the far elements add no atomics; top-p alone also sums
// the row's total mass exactly); the smallest B that holds the k-th largest (top-k), or whose
// elements leave at most top-p's limit of mass below them (bounded by the bins' counts here,
// checked exactly below), picks the candidates; a second pass copies them to shared memory
// (LIST_CAP at most), a bitonic sort puts them in id order, and finish_sampling runs on them:
// its radix passes and draw walk the list instead of the row. What falls outside has no say:
// top-k or top-p drops it, as the whole-row path would (top-p's cut lies in the list because the
// mass below the list is <= its limit). Same arithmetic, so the same id as the whole-row path.
// A top-k larger than the near elements (a dominant token, a low temperature) keeps them all and
// some far ones, whose masses are 0: the list is then every near element, and top-k has nothing
// left to do on it.
constexpr int LIST_CAP = 2048;
constexpr uint32_t NEAR_BINS = 2048;  // 32 * 64: the hcount array holds them

__device__ __forceinline__ uint32_t near_bin(float x, float mx)
{
    float d = mx - x;  // >= 0 (mx is the max); NaN and +inf (x = -inf) are far
    return d < 32.0f ? (uint32_t)fmaxf(d * 64.0f, 0.0f) : NEAR_BINS;
}

// Tries the candidate list; false (every thread) when it does not apply to this row: too many
// candidates, or top-p's cut may lie among the far elements. Then nothing was written but shared
// memory, and the caller walks the whole row.
__device__ bool sample_candidates(const float *row, uint32_t n, float mx, uint32_t best_id, const SampleParams &p,
                                  const RowArgs &r, float scale, Select *st, unsigned *hcount,
                                  unsigned long long *hmass, float *list_v, uint32_t *list_i, uint32_t *out)
{
    __shared__ uint32_t chosen_bin, list_n;
    __shared__ int fits;
    const bool top_k = p.top_k > 0 && (uint32_t)p.top_k < n;
    const bool by_mass = !top_k;  // top-p alone: the bins must leave <= limit of mass outside
    // With top-k, the far elements have no mass after it, so outside is 0.
    const int lane = threadIdx.x & 31;

    __syncthreads();  // the caller's last reads of shared state are done
    for (uint32_t b = threadIdx.x; b < NEAR_BINS; b += THREADS)
        hcount[b] = 0;
    if (threadIdx.x == 0)
        chosen_bin = NEAR_BINS, list_n = 0, fits = 0;
    __syncthreads();
    uint32_t far = 0;
    unsigned long long mass = 0;
    visit_row(row, n, [&](float x, uint32_t, bool ok) {
        if (!ok)
            return;
        uint32_t b = near_bin(x, mx);
        if (b < NEAR_BINS) {
            atomicAdd(&hcount[b], 1u);
            if (by_mass)  // a far element's mass is 0
                mass += to_fixed(expf(x - mx), scale);
        } else {
            far++;
        }
    });
    __syncthreads();
    // Thread t owns bins 2t and 2t + 1. Bounds on the mass of a bin: each element of bin b has
    // d >= b / 64, so a mass <= exp(-b / 64) * scale (+ rounding); a far one has 0 (counted as 2:
    // the bounds need only be near, the list's mass is checked exactly below).
    const uint32_t b0 = 2 * threadIdx.x;
    const unsigned c0 = hcount[b0], c1 = hcount[b0 + 1];
    auto bound = [&](uint32_t b, unsigned c) { return c * (exp(-(double)b / 64.0) * scale * (1.0 + 1e-6) + 1.0); };
    const double w0 = bound(b0, c0), w1 = bound(b0 + 1, c1);
    unsigned count_all, far_all;
    const unsigned count_before = block_exclusive_scan(c0 + c1, &count_all);
    block_exclusive_scan(far, &far_all);
    double w_all;
    const double w_before = block_exclusive_scan(w0 + w1, &w_all);
    unsigned long long total_all = 0, limit = 0;
    if (by_mass) {
        block_exclusive_scan(mass, &total_all);
        double limit_d = floor((1.0 - (double)p.top_p) * (double)total_all);  // as select_top_p_key
        limit = limit_d > 0.0 ? (unsigned long long)limit_d : 0ull;
    }
    const double far_bound = far_all * 2.0;
    const bool kth_near = top_k && count_all >= (unsigned)p.top_k;  // else: every near element
    for (int j = 0; j < 2; j++) {
        uint32_t b = b0 + j;
        unsigned count_through = count_before + c0 + (j ? c1 : 0);
        double w_through = w_before + w0 + (j ? w1 : 0.0);
        bool enough = kth_near ? count_through >= (unsigned)p.top_k
                      : top_k  ? b == NEAR_BINS - 1
                               : far_bound + (w_all - w_through) <= (double)limit * (1.0 - 1e-9);
        if (enough)
            atomicMin(&chosen_bin, b);
    }
    __syncthreads();
    const uint32_t B = chosen_bin;
    if (B == NEAR_BINS)
        return false;  // top-p's cut may be far: every thread returns here
    if (B / 2 == threadIdx.x)
        fits = count_before + c0 + (B & 1 ? c1 : 0) <= (unsigned)LIST_CAP;
    __syncthreads();
    if (!fits)
        return false;

    // The copy, in any order: a warp takes its slots with one atomic per element round that has any.
    unsigned long long list_mass = 0;
    visit_row(row, n, [&](float x, uint32_t id, bool ok) {
        bool take = ok && near_bin(x, mx) <= B;
        unsigned takers = __ballot_sync(FULL, take);
        if (!takers)
            return;
        uint32_t base = 0;
        if (lane == __ffs(takers) - 1)
            base = atomicAdd(&list_n, (uint32_t)__popc(takers));
        base = __shfl_sync(FULL, base, __ffs(takers) - 1);
        if (take) {
            uint32_t pos = base + __popc(takers & ((1u << lane) - 1u));
            if (pos < (uint32_t)LIST_CAP) {
                list_v[pos] = x;
                list_i[pos] = id;
            }
            if (by_mass)
                list_mass += to_fixed(expf(x - mx), scale);
        }
    });
    __syncthreads();
    const uint32_t count = list_n;
    unsigned long long list_total = 0;
    if (by_mass)
        block_exclusive_scan(list_mass, &list_total);
    if (count > (uint32_t)LIST_CAP)  // cannot be: the bins counted the same elements
        return false;
    const unsigned long long outside = by_mass ? total_all - list_total : 0ull;
    if (by_mass && outside > limit)  // the bound above let through too much mass: every thread
        return false;

    // Bitonic sort of (id, value) by id over the next power of two, padded with id ~0.
    uint32_t size = 1;
    while (size < count)
        size <<= 1;
    for (uint32_t i = count + threadIdx.x; i < size; i += THREADS) {
        list_i[i] = 0xffffffffu;
        list_v[i] = 0.0f;
    }
    __syncthreads();
    for (uint32_t k = 2; k <= size; k <<= 1)
        for (uint32_t j = k >> 1; j > 0; j >>= 1) {
            for (uint32_t i = threadIdx.x; i < size; i += THREADS) {
                uint32_t l = i ^ j;
                if (l > i) {
                    uint32_t a = list_i[i], c = list_i[l];
                    if ((a > c) == ((i & k) == 0)) {
                        float t = list_v[i];
                        list_i[i] = c;
                        list_i[l] = a;
                        list_v[i] = list_v[l];
                        list_v[l] = t;
                    }
                }
            }
            __syncthreads();
        }
    *out = finish_sampling(list_v, list_i, count, kth_near, outside, mx, best_id, p, r, scale, st, hcount, hmass);
    return true;
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
    __shared__ float list_v[LIST_CAP];
    __shared__ uint32_t list_i[LIST_CAP];
    __shared__ Select st;

    // A: penalty, temperature, argmax.
    const bool penalise = p.repetition_penalty != 1.0f;
    const bool temper = !p.greedy && p.temperature != 1.0f;
    float best = -INFINITY;
    uint32_t best_id = 0xffffffffu;
    auto pass_a = [&](float x, uint32_t i, bool ok) {
        if (!ok)
            return;
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
    };
    if (a.candidates)
        visit_row(row, n, pass_a);
    else  // the first implementation's loop, one load in flight a thread
        for (uint32_t i = threadIdx.x; i < n; i += THREADS)
            pass_a(row[i], i, true);
    block_argmax(best, best_id);
    if (best_id >= n)  // every value NaN
        best_id = 0;

    if (!p.greedy) {
        const bool narrows = (p.top_k > 0 && (uint32_t)p.top_k < n) || p.top_p < 1.0f;
        uint32_t id = best_id;
        bool listed = a.candidates && narrows && isfinite(best) &&
                      sample_candidates(row, n, best, best_id, p, r, a.fx_scale, &st, hcount, hmass, list_v, list_i,
                                        &id);
        if (!listed)
            id = finish_sampling(row, nullptr, n, p.top_k > 0 && (uint32_t)p.top_k < n, 0ull, best, best_id, p, r,
                                 a.fx_scale, &st, hcount, hmass);
        best_id = id;
        if (threadIdx.x == 0 && a.path_counts)
            atomicAdd(&a.path_counts[listed ? 0 : 1], 1u);
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
    int candidates;       // KernelArgs.candidates
    unsigned *path_counts;  // device (2): KernelArgs.path_counts
};

void cuda_sampler_free(CudaSampler *s)
{
    if (!s)
        return;
    cudaFree(s->seen);
    free(s->seen_host);
    cudaFreeHost(s->ids_host);
    cudaFree(s->ids_dev);
    cudaFree(s->path_counts);
    free(s);
}

static int sampler_buffers(CudaSampler *s, Err *err)
{
    size_t seen_bytes = (size_t)s->n_slots * s->words * sizeof(uint32_t);
    CUDA_CHECK(cudaMalloc(&s->seen, seen_bytes), err);
    CUDA_CHECK(cudaMemset(s->seen, 0, seen_bytes), err);
    CUDA_CHECK(cudaMallocHost(&s->ids_host, s->n_slots * sizeof(uint32_t)), err);
    CUDA_CHECK(cudaMalloc(&s->ids_dev, s->n_slots * sizeof(uint32_t)), err);
    CUDA_CHECK(cudaMalloc(&s->path_counts, 2 * sizeof(unsigned)), err);
    CUDA_CHECK(cudaMemset(s->path_counts, 0, 2 * sizeof(unsigned)), err);
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
    s->candidates = 1;
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
    KernelArgs a = {s->p, s->vocab, s->words, s->fx_scale, s->candidates, s->path_counts};
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

void cuda_sampler_set_candidates(CudaSampler *s, int on) { s->candidates = on != 0; }

int cuda_sampler_path_counts(CudaSampler *s, unsigned long long counts[2], GpuStream stream, Err *err)
{
    unsigned c[2];
    CUDA_CHECK(cudaMemcpyAsync(c, s->path_counts, sizeof c, cudaMemcpyDeviceToHost, (cudaStream_t)stream), err);
    CUDA_CHECK(cudaStreamSynchronize((cudaStream_t)stream), err);
    counts[0] = c[0];
    counts[1] = c[1];
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
