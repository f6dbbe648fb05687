// defines: cuda_device_info
// Which GPU (if any) the CUDA path would use; lets `--device auto` decide at run time
// on a binary built with CUDA but started on a machine without a GPU.
#include <cuda_runtime.h>
#include <stdio.h>

#include "cuda_device.h"

extern "C" int cuda_device_info(char *name, size_t name_cap, size_t *total_bytes, int *sm_major, int *sm_minor)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        cudaGetLastError();  // clear the sticky "no device" error
        return 0;
    }
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, 0) != cudaSuccess)
        return 0;
    if (name)
        snprintf(name, name_cap, "%s", p.name);
    if (total_bytes)
        *total_bytes = p.totalGlobalMem;
    if (sm_major)
        *sm_major = p.major;
    if (sm_minor)
        *sm_minor = p.minor;
    return n;
}
