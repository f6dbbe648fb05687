// defines: Device, device_parse, device_resolve, device_check (lib/device.c)
// Where a tool computes: --device cpu|cuda|auto, for lora-train and lora-gen alike. AUTO means
// the GPU when this build has CUDA and a GPU is present, else the CPU.
#ifndef DEVICE_H
#define DEVICE_H

#include "err.h"

typedef enum { DEVICE_CPU, DEVICE_CUDA, DEVICE_AUTO } Device;

// "cpu", "cuda", "auto"; -1 naming the bad value.
int device_parse(const char *name, Device *d, Err *err);
// AUTO -> CUDA or CPU as above; CPU and CUDA unchanged.
Device device_resolve(Device d);
// -1 with a clear message when d is CUDA and this build has no CUDA or no GPU is present (so a
// tool can refuse before loading anything). what: the path's name in the message ("training").
int device_check(Device d, const char *what, Err *err);

#endif
