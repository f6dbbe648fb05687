// defines: cuda_embedding_forward (kernels/embedding.cu; CPU twin cpu_embedding_forward)
#ifndef EMBEDDING_CUH
#define EMBEDDING_CUH

#include "common.cuh"

KERNELS_EXTERN_C_BEGIN
// out (T, C) bf16 = table[ids[t]] for table (V, C) bf16, ids (T) int32 on the device.
// An id outside [0, V) gives a row of zeros and sets *bad_id (a device int, may be NULL) to 1:
// checking ids on the host would cost a synchronisation per step.
int cuda_embedding_forward(bf16_t *out, const int32_t *ids, const bf16_t *table, int T, int C, int V,
                           int *bad_id, GpuStream stream, Err *err);
KERNELS_EXTERN_C_END

#endif
