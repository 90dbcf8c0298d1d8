/*
 * selftest.h: the one parameter struct of the emulator's self-test kernels (selftest.cu),
 * which build.rs compiles into the emulator library only, never for the GPU.
 */
#ifndef CCPL_EMU_SELFTEST_H
#define CCPL_EMU_SELFTEST_H

#include <stdint.h>

typedef struct ccpl_emu_selftest_params {
    uint64_t in;  /* input of the test, its type depends on the kernel */
    uint64_t out; /* output, likewise */
    int32_t n;    /* element count */
    int32_t arg;  /* a per-kernel argument (shuffle offset, lane, ...) */
} ccpl_emu_selftest_params;

#endif /* CCPL_EMU_SELFTEST_H */
