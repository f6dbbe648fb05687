// defines: cuda_device_info (kernels/device.cu; present when built with HAVE_CUDA)
#ifndef CUDA_DEVICE_H
#define CUDA_DEVICE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif
// Number of CUDA devices (0 when none or no driver); fills the first one's name,
// memory and compute capability when the pointers are not NULL.
int cuda_device_info(char *name, size_t name_cap, size_t *total_bytes, int *sm_major, int *sm_minor);
#ifdef __cplusplus
}
#endif

#endif
