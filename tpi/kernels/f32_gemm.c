/* y = x @ w.T for many float32 rows of x (a prompt's, or a large batch's), with w
 * (N, K) stored by rows as the model holds it: a GEMM written for those shapes.
 *
 * torch's float32 GEMM (oneDNN/MKL) reaches 125-180 GFLOP/s on a prompt's products
 * on the 2-core AVX-512 VM these numbers come from, and ~130-140 on SmolLM2's
 * gate/up matrix, the largest; it also needs its weights in per-thread blocks,
 * whose outputs are then copied into place. This kernel reaches 173-209 GFLOP/s
 * on SmolLM2's and a 7B-shaped layer's products at 64 to 512 rows, against torch's
 * 93-150 with those copies, and 90-128 against 55-74 at 16 rows
 * (benchmarks/results/f32_gemm.json).
 *
 * How: x is repacked once per call, transposed into column blocks xp[k][MB] of MB
 * rows (a prompt's activations are small next to the weights). A tile of NR weight
 * rows times MB rows of x is then NR * MB / 16 vector accumulators held in registers:
 * each step over k loads MB / 16 vectors of xp and broadcasts NR weights, and
 * every vector it loads feeds NR fused multiply-adds. The weights are read in place
 * (no copy of the model's largest operand), each tile once from DRAM for every
 * block of x. Threads split the weight rows, so each output is computed by one
 * thread in one order of k: a row's result is the same bits whatever the number of
 * rows around it and the number of threads (tests/test_f32_gemm.py).
 *
 * Built at first use by tpi/kernels/build.py, as small_matmul.c.
 */

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "vectors.h"

/* Registers: AVX-512 has 32 vectors of 16 floats, 24 accumulators leave room for
 * the loaded x vectors and a broadcast. Narrower vector units hold v16f in two or
 * four registers: a smaller tile there. */
#ifdef __AVX512F__
#define NR 6 /* weight rows per tile */
#define MV 4 /* x vectors (of 16 rows) per tile */
#elif defined(__aarch64__)
/* NEON: 32 registers of 4 floats, a v16f in four: 6 x 1 tiles hold 24 accumulators
 * and the 4 of x (3 x 2 would need 32 for those alone, and spill). */
#define NR 6
#define MV 1
#else
#define NR 3
#define MV 2
#endif
#define MB (16 * MV) /* x rows per block */
#define KC 512       /* k per pass over a tile: its weight rows stay in L1 */

/* Rows [m0, m0 + rows) of x (M, K), columns [k0, k1), into xp[k][MB]; zero beyond `rows`. */
static void pack(const float* x, int64_t K, int64_t m0, int64_t rows, int64_t k0, int64_t k1,
                 float* xp) {
    for (int64_t j = 0; j < MB; j++) {
        if (j < rows) {
            const float* r = x + (m0 + j) * K;
            for (int64_t k = k0; k < k1; k++) xp[k * MB + j] = r[k];
        } else {
            for (int64_t k = k0; k < k1; k++) xp[k * MB + j] = 0.0f;
        }
    }
}

/* t[i][MB] (+)= w rows i < R, columns [0, K) (row stride ws) times xp's first V vectors.
 * `first`: start from zero, else add to t (a later pass over k). */
#define TILE(R, V)                                                                          \
    static void tile_##R##_##V(const float* w, int64_t ws, int64_t K, const float* xp,     \
                               float* t, int first) {                                      \
        v16f acc[R][V];                                                                    \
        for (int i = 0; i < R; i++)                                                        \
            for (int j = 0; j < V; j++) {                                                  \
                if (first) acc[i][j] = (v16f){0};                                          \
                else __builtin_memcpy(&acc[i][j], t + i * MB + 16 * j, 64);                \
            }                                                                              \
        for (int64_t k = 0; k < K; k++) {                                                  \
            v16f xv[V];                                                                    \
            for (int j = 0; j < V; j++) __builtin_memcpy(&xv[j], xp + k * MB + 16 * j, 64); \
            for (int i = 0; i < R; i++) {                                                  \
                const float b = w[i * ws + k];                                             \
                for (int j = 0; j < V; j++) acc[i][j] += b * xv[j];                        \
            }                                                                              \
        }                                                                                  \
        for (int i = 0; i < R; i++)                                                        \
            for (int j = 0; j < V; j++) __builtin_memcpy(t + i * MB + 16 * j, &acc[i][j], 64); \
    }

typedef void (*tile_fn)(const float*, int64_t, int64_t, const float*, float*, int);

#ifdef __AVX512F__
#define TILES(R) TILE(R, 1) TILE(R, 2) TILE(R, 3) TILE(R, 4)
#define FNS(R) {tile_##R##_1, tile_##R##_2, tile_##R##_3, tile_##R##_4}
TILES(1) TILES(2) TILES(3) TILES(4) TILES(5) TILES(6)
static const tile_fn TILE_FNS[NR][MV] = {FNS(1), FNS(2), FNS(3), FNS(4), FNS(5), FNS(6)};
#elif defined(__aarch64__)
#define TILES(R) TILE(R, 1)
#define FNS(R) {tile_##R##_1}
TILES(1) TILES(2) TILES(3) TILES(4) TILES(5) TILES(6)
static const tile_fn TILE_FNS[NR][MV] = {FNS(1), FNS(2), FNS(3), FNS(4), FNS(5), FNS(6)};
#else
#define TILES(R) TILE(R, 1) TILE(R, 2)
#define FNS(R) {tile_##R##_1, tile_##R##_2}
TILES(1) TILES(2) TILES(3)
static const tile_fn TILE_FNS[NR][MV] = {FNS(1), FNS(2), FNS(3)};
#endif

/* Weight rows [n, n + r) against every block of x, into y. */
static void row_tile(const float* w, int64_t n, int r, int64_t M, int64_t K, int64_t N,
                     const float* xp, float* y, float* t) {
    for (int64_t b = 0; b * MB < M; b++) {
        const int64_t m0 = b * MB, rows = M - m0 < MB ? M - m0 : MB;
        const tile_fn f = TILE_FNS[r - 1][(rows + 15) / 16 - 1];
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int64_t kl = K - k0 < KC ? K - k0 : KC;
            f(w + n * K + k0, K, kl, xp + b * K * MB + k0 * MB, t, k0 == 0);
        }
        for (int64_t m = 0; m < rows; m++)
            for (int i = 0; i < r; i++) y[(m0 + m) * N + n + i] = t[i * MB + m];
    }
}

/* x (M, K) @ w.T, w (N, K): y (M, N), all contiguous. Returns -1 without memory
 * for the packed x (y is then untouched), else 0. */
int tpi_gemm_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y) {
    const int64_t blocks = (M + MB - 1) / MB, kparts = (K + 63) / 64;
    float* xp = aligned_alloc(64, sizeof(float) * blocks * MB * K);
    if (!xp) return -1;
    const int64_t tiles = (N + NR - 1) / NR;
    int T = omp_get_max_threads();
    if (T > tiles) T = (int)tiles;
#pragma omp parallel num_threads(T)
    {
        /* x packed by every thread in (block, 64 columns) pieces; the loop's
         * closing barrier orders it before any tile reads it. */
#pragma omp for schedule(static)
        for (int64_t u = 0; u < blocks * kparts; u++) {
            const int64_t b = u / kparts, k0 = (u % kparts) * 64;
            const int64_t k1 = k0 + 64 < K ? k0 + 64 : K;
            const int64_t rows = M - b * MB < MB ? M - b * MB : MB;
            pack(x, K, b * MB, rows, k0, k1, xp + b * MB * K);
        }
        float t[NR * MB] __attribute__((aligned(64)));
        const int nt = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t per = (tiles + nt - 1) / nt;
        const int64_t a = me * per * NR, e = (me + 1) * per * NR < N ? (me + 1) * per * NR : N;
        for (int64_t n = a; n < e; n += NR)
            row_tile(w, n, e - n < NR ? (int)(e - n) : NR, M, K, N, xp, y, t);
    }
    free(xp);
    return 0;
}
