#include "device.h"

#include <string.h>

#ifdef HAVE_CUDA
#include "cuda_device.h"
#endif

int device_parse(const char *name, Device *d, Err *err)
{
    if (!strcmp(name, "cpu"))
        *d = DEVICE_CPU;
    else if (!strcmp(name, "cuda"))
        *d = DEVICE_CUDA;
    else if (!strcmp(name, "auto"))
        *d = DEVICE_AUTO;
    else
        return err_set(err, "'%s' is not cpu, cuda or auto", name);
    return 0;
}

Device device_resolve(Device d)
{
    if (d != DEVICE_AUTO)
        return d;
#ifdef HAVE_CUDA
    if (cuda_device_info(NULL, 0, NULL, NULL, NULL) > 0)
        return DEVICE_CUDA;
#endif
    return DEVICE_CPU;
}

int device_check(Device d, const char *what, Err *err)
{
    if (d != DEVICE_CUDA)
        return 0;
#ifdef HAVE_CUDA
    (void)what;
    if (cuda_device_info(NULL, 0, NULL, NULL, NULL) <= 0)
        return err_set(err, "--device cuda: no CUDA device found (use --device cpu or auto)");
    return 0;
#else
    return err_set(err, "the CUDA %s path is not available in this build (use --device cpu)", what);
#endif
}
