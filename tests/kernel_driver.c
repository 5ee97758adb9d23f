/* Runs the kernels of a compiled library on buffers sent to it, for the tests of a
 * build this machine cannot load (AArch64 libraries, run under qemu-user):
 *
 *   kernel_driver LIB... < requests > replies
 *
 * A request: "call F L T NBUF NARG\n" (function F of library L, T OpenMP threads),
 * NBUF buffers as "SIZE\n" and SIZE bytes each, then NARG arguments, one a line:
 * "b I" (buffer I), "i V" (an integer), "f V" (a float), "m KIND W S B N K G" (a
 * pointer to a decode_layer.c Mat over buffers W, S, B, -1 for none). The reply:
 * the result as 8 bytes, then every buffer as it is after the call.
 *
 * Every kernel takes at most 16 integer or pointer arguments and 8 floats, so one
 * prototype calls them all: AArch64 (and x86-64) pass integers and floats in
 * separate registers in order, the integers past the eighth on the stack.
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t (*any_fn)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                          int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                          float, float, float, float, float, float, float, float);

typedef struct {
    int64_t kind;
    const void *w, *scale, *bias;
    int64_t n, k, group;
} Mat;

static void fail(const char* what) {
    fprintf(stderr, "kernel_driver: %s\n", what);
    exit(2);
}

static void* buffer_at(char** bufs, int nbuf, long i) {
    if (i < 0) return NULL;
    if (i >= nbuf) fail("no such buffer");
    return bufs[i];
}

int main(int argc, char** argv) {
    void* libs[8];
    if (argc < 2 || argc > 9) fail("usage: kernel_driver LIB...");
    for (int i = 1; i < argc; i++)
        if (!(libs[i - 1] = dlopen(argv[i], RTLD_NOW))) fail(dlerror());
    void (*set_threads)(int) = (void (*)(int))dlsym(RTLD_DEFAULT, "omp_set_num_threads");
    char line[256], name[128];
    int lib, threads, nbuf, narg;
    while (fgets(line, sizeof line, stdin)) {
        if (sscanf(line, "call %127s %d %d %d %d", name, &lib, &threads, &nbuf, &narg) != 5)
            fail("bad request");
        if (lib < 0 || lib >= argc - 1 || nbuf > 32 || narg > 24) fail("bad request");
        any_fn f = (any_fn)dlsym(libs[lib], name);
        if (!f) fail(name);
        char* bufs[32];
        size_t sizes[32];
        for (int i = 0; i < nbuf; i++) {
            if (!fgets(line, sizeof line, stdin) || sscanf(line, "%zu", &sizes[i]) != 1)
                fail("bad buffer");
            bufs[i] = aligned_alloc(64, (sizes[i] + 64) / 64 * 64);
            if (!bufs[i] || fread(bufs[i], 1, sizes[i], stdin) != sizes[i]) fail("short buffer");
        }
        int64_t ints[16] = {0};
        float floats[8] = {0};
        Mat mats[4];
        int ni = 0, nf = 0, nm = 0;
        for (int a = 0; a < narg; a++) {
            if (!fgets(line, sizeof line, stdin)) fail("short arguments");
            long v[7];
            double d;
            if (ni >= 16 || nf >= 8) fail("too many arguments");
            if (sscanf(line, "b %ld", &v[0]) == 1) {
                ints[ni++] = (int64_t)(intptr_t)buffer_at(bufs, nbuf, v[0]);
            } else if (sscanf(line, "i %ld", &v[0]) == 1) {
                ints[ni++] = v[0];
            } else if (sscanf(line, "f %lf", &d) == 1) {
                floats[nf++] = (float)d;
            } else if (sscanf(line, "m %ld %ld %ld %ld %ld %ld %ld", &v[0], &v[1], &v[2], &v[3],
                              &v[4], &v[5], &v[6]) == 7) {
                if (nm >= 4) fail("too many matrices");
                mats[nm] = (Mat){v[0], buffer_at(bufs, nbuf, v[1]), buffer_at(bufs, nbuf, v[2]),
                                 buffer_at(bufs, nbuf, v[3]), v[4], v[5], v[6]};
                ints[ni++] = (int64_t)(intptr_t)&mats[nm++];
            } else {
                fail("bad argument");
            }
        }
        if (set_threads) set_threads(threads);
        int64_t rc = f(ints[0], ints[1], ints[2], ints[3], ints[4], ints[5], ints[6], ints[7],
                       ints[8], ints[9], ints[10], ints[11], ints[12], ints[13], ints[14],
                       ints[15], floats[0], floats[1], floats[2], floats[3], floats[4],
                       floats[5], floats[6], floats[7]);
        rc = (int64_t)(int32_t)rc; /* the kernels return int or nothing */
        fwrite(&rc, sizeof rc, 1, stdout);
        for (int i = 0; i < nbuf; i++) {
            fwrite(bufs[i], 1, sizes[i], stdout);
            free(bufs[i]);
        }
        fflush(stdout);
    }
    return 0;
}
