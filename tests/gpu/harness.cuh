// defines: HOST_CUDA, LAUNCHED, E, harness_start, harness_prog, uniform, normal, bf16_bits,
//          bf16_float, Bf16Tensor, dev_alloc, download_bf16, download_f32, rel_l2, check,
//          TOL_BF16, Timer, median_us
// What every GPU test program (tests/gpu/*_test.cu) shares: fatal checks of harness calls,
// seeded random inputs, bf16 tensors kept both on the device and as exact floats for the CPU
// twin, NaN-poisoned device buffers, the relative-L2 comparison, CUDA-event timings. Each program
// includes it once (everything here is static to that program).
#ifndef GPU_TEST_HARNESS_CUH
#define GPU_TEST_HARNESS_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <vector>

#include "common.cuh"
#include "tap.h"

// The program's name in its error messages: argv[0]'s last component, set by harness_start.
static const char *harness_prog = "gpu_test";

// Test-harness failures (allocation, copies) end the program: a kernel's own errors are tested.
#define HOST_CUDA(call)                                                                           \
    do {                                                                                          \
        cudaError_t status_ = (call);                                                             \
        if (status_ != cudaSuccess) {                                                             \
            fprintf(stderr, "%s: %s:%d: %s: %s\n", harness_prog, __FILE__, __LINE__, #call,       \
                    cudaGetErrorString(status_));                                                 \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)
#define LAUNCHED(call)                                                                            \
    do {                                                                                          \
        Err err_;                                                                                 \
        if ((call) < 0) {                                                                         \
            fprintf(stderr, "%s: %s:%d: %s\n", harness_prog, __FILE__, __LINE__, err_.msg);       \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)
// LAUNCHED's calls name the Err `&err_`
#define E (&err_)

static uint64_t rng_state;
static inline double uniform(void)  // splitmix64, [0, 1)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return (double)((z ^ (z >> 31)) >> 11) / 9007199254740992.0;
}
static inline float normal(void)
{
    double u = uniform() + 1e-12, v = uniform();
    return (float)(sqrt(-2 * log(u)) * cos(6.283185307179586 * v));
}

enum HarnessMode { HARNESS_SKIP, HARNESS_TESTS, HARNESS_BENCH };

// Names the program, seeds the generator from GPU_TEST_SEED (else the clock), and says what to
// run: HARNESS_SKIP after printing the TAP skip line when there is no CUDA device, HARNESS_BENCH
// for `--bench`, else HARNESS_TESTS after printing the seed (so that a failing run can be
// repeated).
static inline HarnessMode harness_start(int argc, char **argv)
{
    if (argc > 0 && argv[0]) {
        const char *slash = strrchr(argv[0], '/');
        harness_prog = slash ? slash + 1 : argv[0];
    }
    const char *seed_env = getenv("GPU_TEST_SEED");
    uint64_t seed = seed_env ? strtoull(seed_env, NULL, 10) : (uint64_t)time(NULL);
    rng_state = seed;
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        printf("1..0 # SKIP no CUDA device\n");
        return HARNESS_SKIP;
    }
    if (argc > 1 && !strcmp(argv[1], "--bench"))
        return HARNESS_BENCH;
    printf("# GPU_TEST_SEED=%llu\n", (unsigned long long)seed);
    return HARNESS_TESTS;
}

static inline uint16_t bf16_bits(float f)  // round to nearest even, as __float2bfloat16
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}
static inline float bf16_float(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// A random tensor, offset + scale * N(0, 1), kept twice: bf16 for the device, its exact float
// value for the CPU twin. After editing `bits` (value is left as it was), upload() copies them
// to the device again.
struct Bf16Tensor {
    std::vector<uint16_t> bits;
    std::vector<float> value;
    bf16_t *dev = NULL;
    explicit Bf16Tensor(size_t n, float scale = 1.0f, float offset = 0.0f) : bits(n), value(n)
    {
        for (size_t i = 0; i < n; i++) {
            bits[i] = bf16_bits(offset + scale * normal());
            value[i] = bf16_float(bits[i]);
        }
        upload();
    }
    void upload()
    {
        if (!dev)  // 16 bytes of slack: a kernel's 16-byte loads may run past the last element
            HOST_CUDA(cudaMalloc(&dev, bits.size() * 2 + 16));
        HOST_CUDA(cudaMemcpy(dev, bits.data(), bits.size() * 2, cudaMemcpyHostToDevice));
    }
    ~Bf16Tensor() { cudaFree(dev); }
    Bf16Tensor(const Bf16Tensor &) = delete;
    Bf16Tensor &operator=(const Bf16Tensor &) = delete;
};

// n elements of T on the device, every byte 0xff (NaN in bf16 and fp32: an unwritten one shows).
template <typename T> static T *dev_alloc(size_t n)
{
    T *p;
    HOST_CUDA(cudaMalloc(&p, n * sizeof(T) + 16));
    HOST_CUDA(cudaMemset(p, 0xff, n * sizeof(T)));
    return p;
}
// Copies after the device has finished all work (the launches under test are asynchronous).
static inline std::vector<float> download_bf16(const bf16_t *dev, size_t n)
{
    std::vector<uint16_t> bits(n);
    HOST_CUDA(cudaDeviceSynchronize());
    HOST_CUDA(cudaMemcpy(bits.data(), dev, n * 2, cudaMemcpyDeviceToHost));
    std::vector<float> out(n);
    for (size_t i = 0; i < n; i++)
        out[i] = bf16_float(bits[i]);
    return out;
}
static inline std::vector<float> download_f32(const float *dev, size_t n)
{
    std::vector<float> out(n);
    HOST_CUDA(cudaDeviceSynchronize());
    HOST_CUDA(cudaMemcpy(out.data(), dev, n * 4, cudaMemcpyDeviceToHost));
    return out;
}

// ||got - want|| / ||want||, or +inf when got holds a NaN or an infinity.
static inline double rel_l2(const float *got, const float *want, size_t n)
{
    double diff = 0, ref = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i]))
            return INFINITY;
        double d = (double)got[i] - want[i];
        diff += d * d;
        ref += (double)want[i] * want[i];
    }
    return sqrt(diff / (ref > 0 ? ref : 1e-300));
}
// One TAP test: got within relative L2 error tol of want (got as long as want), no NaN; returns
// the error.
static inline double check(const char *what, const std::vector<float> &got, const std::vector<float> &want,
                           double tol)
{
    double e = rel_l2(got.data(), want.data(), want.size());
    ok(e <= tol, "%s: relative L2 error %.2e <= %.0e, no NaN (%zu values)", what, e, tol, want.size());
    return e;
}

// bf16 outputs: one rounding of a value computed in fp32 gives ~2^-9 relative per element.
static const double TOL_BF16 = 8e-3;

// A pair of CUDA events for timing.
struct Timer {
    cudaEvent_t start, stop;
    Timer()
    {
        HOST_CUDA(cudaEventCreate(&start));
        HOST_CUDA(cudaEventCreate(&stop));
    }
    ~Timer() { cudaEventDestroy(start), cudaEventDestroy(stop); }
    Timer(const Timer &) = delete;
    Timer &operator=(const Timer &) = delete;
};

// Median over `reps` timed calls of fn() (after 3 warm-ups), in microseconds.
template <typename F> static double median_us(F fn, int reps)
{
    Timer tm;
    for (int i = 0; i < 3; i++)
        fn();
    std::vector<float> ms(reps);
    for (int i = 0; i < reps; i++) {
        HOST_CUDA(cudaEventRecord(tm.start));
        fn();
        HOST_CUDA(cudaEventRecord(tm.stop));
        HOST_CUDA(cudaEventSynchronize(tm.stop));
        HOST_CUDA(cudaEventElapsedTime(&ms[i], tm.start, tm.stop));
    }
    std::sort(ms.begin(), ms.end());
    return ms[reps / 2] * 1000.0;
}

#endif
