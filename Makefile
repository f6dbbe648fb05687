# One Makefile for the toolkit. `make` builds every tool into bin/.
#   make test        CPU test suite (TAP, run by prove)
#   make san         the same suite under AddressSanitizer + UBSan (build/san/)
#   make test-gpu    GPU tests (needs an NVIDIA GPU)
#   make bench       benchmarks (ratios against peers measured in the same run)
#   make install PREFIX=/usr/local MANDIR=$(PREFIX)/share/man
#   make deps        install missing Debian packages (no-op when all are present)

CC      ?= cc
OPT     ?= -O2 -g
WARN     = -Wall -Wextra -Werror
CFLAGS  += $(OPT) $(WARN) -std=gnu11 -fopenmp -pthread
CPPFLAGS += -Ilib -Itools
LDLIBS  += -ljansson -larchive -lxxhash -lz -lm -fopenmp -pthread
PREFIX  ?= /usr/local
MANDIR  ?= $(PREFIX)/share/man
TESTDATA ?= $(abspath ../shared/data)
export TESTDATA

# SAN=1: AddressSanitizer + UndefinedBehaviorSanitizer build in its own tree.
ifeq ($(SAN),1)
BUILD   ?= build/san
BIN     ?= build/san/bin
OPT      = -O1 -g
CFLAGS  += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
LDFLAGS += -fsanitize=address,undefined
else
BUILD   ?= build/obj
BIN     ?= bin
endif

# CUDA: built when nvcc is found (it compiles and links without a GPU).
NVCC    ?= $(shell command -v nvcc 2>/dev/null)
CUDA_HOME ?= $(if $(NVCC),$(abspath $(dir $(NVCC))/..))
NVFLAGS ?= -O3 -arch=sm_90 -std=c++17 -Xcompiler -Wall,-Wextra -Ilib -Ikernels
CUDA_SRC := $(wildcard kernels/*.cu)
ifneq ($(NVCC),)
CUDA_OBJ := $(CUDA_SRC:kernels/%.cu=$(BUILD)/kernels/%.o)
CUDA_LIB := $(BUILD)/libkernels.a
CUDA_LDLIBS := -Wl,--as-needed -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublasLt -lcublas -lcudart -lstdc++
CPPFLAGS += -DHAVE_CUDA
$(info cuda: $(NVCC) (sm_90))
else
$(info cuda: nvcc not found; building the CPU tools only (set NVCC=/path/to/nvcc))
endif

# GPU test programs (tests/gpu/*.cu, run by tests/gpu/*.t): kernels against their CPU twins. They
# need only CUDA, kernels/ and lib/cpu_ops.c (its own unsanitised object), so they also build on
# a GPU machine that lacks the other libraries' headers.
ifneq ($(NVCC),)
GPU_TEST_BIN := $(patsubst tests/gpu/%.cu,$(BUILD)/test-gpu/%,$(wildcard tests/gpu/*.cu))
endif

LIB_SRC  := $(wildcard lib/*.c)
LIB_OBJ  := $(LIB_SRC:lib/%.c=$(BUILD)/lib/%.o)
TOOLS    := $(basename $(notdir $(wildcard tools/*.c)))
TOOL_BIN := $(TOOLS:%=$(BIN)/%)
UNIT_SRC := $(wildcard tests/unit/*.c)
UNIT_BIN := $(UNIT_SRC:tests/unit/%.c=$(BUILD)/test/%.t)
MAN      := $(wildcard man/*.[1-9])

.PHONY: all test san test-gpu bench install clean deps lint-man demo
.SECONDARY:
all: $(TOOL_BIN) $(CUDA_LIB) $(GPU_TEST_BIN)

$(BUILD)/lib/%.o: lib/%.c $(wildcard lib/*.h)
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c -o $@ $<
$(BUILD)/tools/%.o: tools/%.c $(wildcard lib/*.h tools/*.h)
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c -o $@ $<
$(BUILD)/libalp.a: $(LIB_OBJ)
	$(AR) rcs $@ $^
# attention.cu's version 4 forward is made of wgmma, which exists only for the sm_90a target: that
# file is built for sm_90a, and as compute_90 PTX (without that kernel) for newer GPUs to compile
NVFLAGS_attention = $(filter-out -arch=sm_90,$(NVFLAGS)) -gencode=arch=compute_90a,code=sm_90a \
	-gencode=arch=compute_90,code=compute_90
$(BUILD)/kernels/%.o: kernels/%.cu $(wildcard kernels/*.cuh lib/*.h)
	@mkdir -p $(@D)
	$(NVCC) $(or $(NVFLAGS_$*),$(NVFLAGS)) -c -o $@ $<
$(BUILD)/libkernels.a: $(CUDA_OBJ)
	$(AR) rcs $@ $^
$(BIN)/%: $(BUILD)/tools/%.o $(BUILD)/libalp.a $(CUDA_LIB)
	@mkdir -p $(@D)
	$(CC) $(LDFLAGS) -o $@ $< $(BUILD)/libalp.a $(CUDA_LIB) $(LDLIBS) $(CUDA_LDLIBS)
$(BUILD)/test/%.t: tests/unit/%.c tests/unit/tap.h $(BUILD)/libalp.a $(CUDA_LIB)
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) -Itests/unit $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/libalp.a $(CUDA_LIB) $(LDLIBS) $(CUDA_LDLIBS)

$(BUILD)/test-gpu/cpu_ops.o: lib/cpu_ops.c lib/cpu_ops.h
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(OPT) $(WARN) -std=gnu11 -c -o $@ $<
$(BUILD)/test-gpu/%: tests/gpu/%.cu tests/gpu/harness.cuh $(BUILD)/test-gpu/cpu_ops.o $(CUDA_LIB) tests/unit/tap.h \
		$(wildcard kernels/*.cuh)
	$(NVCC) $(NVFLAGS) -Itests/unit -o $@ $< $(BUILD)/test-gpu/cpu_ops.o $(CUDA_LIB) -lcublas
# GPU tests that also need lib/ (models, LoRA, the CPU engine, the sampler): nvcc compiles them,
# $(CC) links them with libalp.a and the runtime libraries, so a GPU machine without their -dev
# headers runs the binaries built here.
GPU_LIB_TESTS := engine_test gen_test sample_test
$(GPU_LIB_TESTS:%=$(BUILD)/test-gpu/%.o): $(BUILD)/test-gpu/%.o: tests/gpu/%.cu $(wildcard tests/gpu/*.cuh) tests/unit/tap.h \
		$(wildcard kernels/*.cuh lib/*.h)
	@mkdir -p $(@D)
	$(NVCC) $(NVFLAGS) -Itests/unit -c -o $@ $<
$(GPU_LIB_TESTS:%=$(BUILD)/test-gpu/%): $(BUILD)/test-gpu/%: $(BUILD)/test-gpu/%.o $(CUDA_LIB) $(BUILD)/libalp.a
	$(CC) $(LDFLAGS) -o $@ $< $(CUDA_LIB) $(BUILD)/libalp.a $(CUDA_LIB) $(LDLIBS) $(CUDA_LDLIBS)

# Tests read BIN (the tools under test) and TESTDATA (shared real inputs; skipped when absent).
test: all $(UNIT_BIN)
	BIN=$(abspath $(BIN)) prove $(PROVEFLAGS) $(UNIT_BIN:%=./%) $(wildcard tests/*.t)

san:
	$(MAKE) SAN=1 test

# only the GPU test programs: `all` needs the -dev headers a GPU machine may lack
test-gpu: $(GPU_TEST_BIN)
	GPU_TESTS=$(abspath $(BUILD)/test-gpu) BIN=$(abspath $(BIN)) prove $(PROVEFLAGS) $(wildcard tests/gpu/*.t)

bench: all
	BIN=$(abspath $(BIN)) sh tests/bench/run.sh

lint-man:
	mandoc -Tlint -Wwarning $(MAN)

demo: all
	$(MAKE) -f pipelines/demo.mk BIN=$(abspath $(BIN))

deps:
	sh scripts/deps.sh

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man5
	install -m 755 $(TOOL_BIN) $(DESTDIR)$(PREFIX)/bin
	for m in $(MAN); do s=$${m##*.}; install -m 644 $$m $(DESTDIR)$(MANDIR)/man$$s; done

clean:
	rm -rf build bin
