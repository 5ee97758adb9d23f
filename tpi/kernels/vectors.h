/* 16-float vectors (GCC/Clang vector extensions) shared by the kernels. The build
 * hashes this file with each kernel's source (tpi/kernels/build.py). */
#ifndef TPI_VECTORS_H
#define TPI_VECTORS_H

typedef float v16f __attribute__((vector_size(64)));

/* The sum of a vector's lanes, as a tree in registers: 16 dependent adds (or the
 * vector stored and read back lane by lane) cost as much as a row's products. */
static inline float hsum(v16f v) {
#if defined(__clang__) || __GNUC__ >= 12
    typedef float v8f __attribute__((vector_size(32)));
    typedef float v4f __attribute__((vector_size(16)));
    v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
            __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
#else /* the same tree in plain arrays: gcc before 12 has no __builtin_shufflevector */
    float t[16], a[8];
    __builtin_memcpy(t, &v, sizeof t);
    for (int i = 0; i < 8; i++) a[i] = t[i] + t[i + 8];
    for (int i = 0; i < 4; i++) a[i] += a[i + 4];
    return (a[0] + a[2]) + (a[1] + a[3]);
#endif
}

#endif
