/* Products of a few activation rows with a weight matrix read once from memory.
 *
 *   y[m * ldy + n] = scale[n] * sum_k x[m * K + k] * w[n * K + k],   m < M, n < N
 *
 * A decode step (one row per sequence of a batch) is bound by the bytes of
 * weights read: these kernels stream every weight once for all M rows, the
 * weight's rows split between the OpenMP threads torch itself uses (built with
 * gcc, the library needs libgomp.so.1, which is torch's own, already loaded; a
 * compiler with another OpenMP runtime, clang's libomp, gives it a pool of its own). While a block of rows is
 * multiplied, the next block is prefetched: one core alone has too few misses in
 * flight to stream from DRAM at its speed while it also computes (measured, a
 * 7B-shaped int8 layer of 4 rows: 12.0-12.8 ms without, 10.1-10.7 ms with).
 * torch's own kernels re-read the weights per block of rows or convert them on
 * the way, which costs more than the read once M > 1 (tpi/kernels/small_matmul.py).
 *
 * int8 weights (per-row scale, bfloat16) are converted in registers. Where the CPU
 * has AVX512-BF16, to bfloat16, against activations rounded to bfloat16 (as
 * torch's int8 kernel rounds them): one instruction then does 32 products, and 4
 * rows cost what one does (a 7B-shaped layer: 7.6 against 7.3 ms; converted to
 * float32 and multiplied by FMAs, 4 rows took 10.1 ms, bound by the FMA units).
 * Elsewhere they are converted to float32 and the activations taken as they are.
 * (VNNI dot products on activations cut in two int8 digits were measured too:
 * no faster than the float path here; on activations quantized to int8 per 32,
 * as llama.cpp's Q8_0 does, 8-10% faster at SmolLM2's width and none at 7B's,
 * for 3.5 times the error of bfloat16 activations: not taken.)
 *
 * From PANEL_MIN_ROWS rows of x (a prefill) a block of weight rows is converted to
 * bfloat16 once, into a buffer kept in L2, and every row of x passes it there.
 *
 * Built at first use by tpi/kernels/build.py with the machine's C compiler.
 */

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "vectors.h"

typedef int8_t v16b __attribute__((vector_size(16)));

#define WROWS 4    /* weight rows per block (float kernels) */
#define XROWS 4    /* activation rows per block */
#define NBLOCK 64  /* weight rows kept in cache while every group of x rows passes */

/* Weights are read once per token: fetched into L2, not L1 (prefetcht2), where they
 * would evict the activations and the sums. Measured on SmolLM2's int8 layers, one
 * row, 2 threads: 4.7-5.2 ms against 6.6-6.9 ms into L1 (prefetcht0), 22 against
 * 16 GB/s; a 7B-shaped int8 layer 6.7 against 7.9 ms; float32 weights unchanged. */
#define PREFETCH(p) __builtin_prefetch((p), 0, 1)

/* At the start of each cache line of weights WT (column k of rows w0..w3, K apart): a
 * line of each of the next block's rows, WROWS rows further. */
#define PREFETCH_NEXT_ROWS(WT, w0, w1, w2, w3, K, k)                                        \
    do {                                                                                    \
        if (((k) * (int64_t)sizeof(WT)) % 64 == 0) {                                        \
            PREFETCH((w0) + WROWS * (K) + (k));                                             \
            PREFETCH((w1) + WROWS * (K) + (k));                                             \
            PREFETCH((w2) + WROWS * (K) + (k));                                             \
            PREFETCH((w3) + WROWS * (K) + (k));                                             \
        }                                                                                   \
    } while (0)

static inline v16f load_f32(const float* p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline v16f load_i8(const int8_t* p) {
#if defined(__AVX512F__)
    return (v16f)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
    __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
    __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))));
    v16f v;
    memcpy(&v, &lo, 32);
    memcpy((char*)&v + 32, &hi, 32);
    return v;
#else
    v16b b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, v16f);
#endif
}

/* A weight row's scale (bfloat16), 1 for float weights (no scales). */
static inline float scale_at(const uint16_t* s, int64_t i) {
    if (!s) return 1.0f;
    uint32_t bits = (uint32_t)s[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Four consecutive outputs of one row of y: the sums of weight rows n..n+3, scaled. */
static inline void store_four(float* o, const uint16_t* sc, int64_t n, float t0, float t1,
                              float t2, float t3) {
    o[0] = scale_at(sc, n) * t0;
    o[1] = scale_at(sc, n + 1) * t1;
    o[2] = scale_at(sc, n + 2) * t2;
    o[3] = scale_at(sc, n + 3) * t3;
}

/* Output rows [n0, n1) against MB rows of x: WROWS weight rows at a time, then the
 * rest one by one (the same split whatever the kernel: a row's sums keep their order). */
#define ROWS(NAME, XT, WT, MB)                                                              \
    static void NAME##_rows##MB(const XT* x, int64_t K, const WT* w, int64_t n0, int64_t n1, \
                                float* y, int64_t ldy, const uint16_t* sc) {                \
        int64_t n = n0;                                                                     \
        for (; n + WROWS <= n1; n += WROWS) NAME##_four##MB(x, K, w, n, y, ldy, sc);        \
        for (; n < n1; n++) NAME##_one##MB(x, K, w, n, y, ldy, sc);                         \
    }

/* Output rows [n0, n1): NBLOCK weight rows at a time, kept in cache while every
 * group of XROWS activation rows (XT, XSTRIDE elements apart) passes them. */
#define ROW_RANGE(NAME, XT, WT, XSTRIDE)                                                    \
    static void NAME##_range(const XT* x, int64_t M, int64_t K, const WT* w, int64_t n0,    \
                             int64_t n1, float* y, int64_t ldy, const uint16_t* sc) {      \
        for (int64_t nb = n0; nb < n1; nb += NBLOCK) {                                     \
            int64_t ne = nb + NBLOCK < n1 ? nb + NBLOCK : n1;                              \
            for (int64_t m = 0; m < M; m += XROWS) {                                       \
                const XT* xm = x + m * (XSTRIDE);                                          \
                float* ym = y + m * ldy;                                                   \
                switch (M - m < XROWS ? M - m : XROWS) {                                   \
                    case 1: NAME##_rows1(xm, K, w, nb, ne, ym, ldy, sc); break;            \
                    case 2: NAME##_rows2(xm, K, w, nb, ne, ym, ldy, sc); break;            \
                    case 3: NAME##_rows3(xm, K, w, nb, ne, ym, ldy, sc); break;            \
                    default: NAME##_rows4(xm, K, w, nb, ne, ym, ldy, sc); break;           \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
    }

/* Float accumulation: WROWS weight rows (or one) against MB rows of x. */
#define FLOAT_BLOCKS(NAME, WT, LOADW, MB)                                                  \
    static inline void NAME##_four##MB(const float* x, int64_t K, const WT* w, int64_t n,   \
                                       float* y, int64_t ldy, const uint16_t* sc) {        \
        v16f a0[MB], a1[MB], a2[MB], a3[MB];                                               \
        for (int m = 0; m < MB; m++) a0[m] = a1[m] = a2[m] = a3[m] = (v16f){0};           \
        const WT *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;                \
        for (int64_t k = 0; k < K; k += 16) {                                              \
            PREFETCH_NEXT_ROWS(WT, w0, w1, w2, w3, K, k);                                 \
            v16f u0 = LOADW(w0 + k), u1 = LOADW(w1 + k), u2 = LOADW(w2 + k),               \
                 u3 = LOADW(w3 + k);                                                       \
            for (int m = 0; m < MB; m++) {                                                 \
                v16f xv = load_f32(x + m * K + k);                                         \
                a0[m] += u0 * xv;                                                          \
                a1[m] += u1 * xv;                                                          \
                a2[m] += u2 * xv;                                                          \
                a3[m] += u3 * xv;                                                          \
            }                                                                              \
        }                                                                                  \
        for (int m = 0; m < MB; m++)                                                       \
            store_four(y + m * ldy + n, sc, n, hsum(a0[m]), hsum(a1[m]), hsum(a2[m]),      \
                       hsum(a3[m]));                                                       \
    }                                                                                      \
    static inline void NAME##_one##MB(const float* x, int64_t K, const WT* w, int64_t n,    \
                                      float* y, int64_t ldy, const uint16_t* sc) {         \
        v16f a[MB];                                                                        \
        for (int m = 0; m < MB; m++) a[m] = (v16f){0};                                     \
        const WT* w0 = w + n * K;                                                          \
        for (int64_t k = 0; k < K; k += 16) {                                              \
            v16f u = LOADW(w0 + k);                                                        \
            for (int m = 0; m < MB; m++) a[m] += u * load_f32(x + m * K + k);              \
        }                                                                                  \
        float s = scale_at(sc, n);                                                         \
        for (int m = 0; m < MB; m++) y[m * ldy + n] = s * hsum(a[m]);                      \
    }

/* Kernel NAME of weights WT read by LOADW: BLOCKS (FLOAT_BLOCKS or BF16_BLOCKS) and their
 * rows for 1 to XROWS rows of x (XT, XSTRIDE of them a row), and the range over them. */
#define KERNEL(BLOCKS, NAME, XT, WT, LOADW, XSTRIDE)                                        \
    BLOCKS(NAME, WT, LOADW, 1) ROWS(NAME, XT, WT, 1)                                        \
    BLOCKS(NAME, WT, LOADW, 2) ROWS(NAME, XT, WT, 2)                                        \
    BLOCKS(NAME, WT, LOADW, 3) ROWS(NAME, XT, WT, 3)                                        \
    BLOCKS(NAME, WT, LOADW, 4) ROWS(NAME, XT, WT, 4)                                        \
    ROW_RANGE(NAME, XT, WT, XSTRIDE)

KERNEL(FLOAT_BLOCKS, f32w, float, float, load_f32, K)
KERNEL(FLOAT_BLOCKS, i8w, float, int8_t, load_i8, K)

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define HAVE_BF16_DOT 1

/* 32 int8 weights as bfloat16, in order (exact: |w| <= 128 has 8 significant bits). */
static inline __m512bh load_i8_bf16(const int8_t* p) {
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
    return _mm512_cvtne2ps_pbh(hi, lo);
}

/* 32 bfloat16 weights (a panel converted by panel_bf16). */
static inline __m512bh load_bf16(const uint16_t* p) {
    return (__m512bh)_mm512_loadu_si512((const void*)p);
}

/* The lane sums of four vectors, in one: (sum a, sum b, sum c, sum d). A tree of
 * shuffles shared by the four (13 instructions where four separate reductions
 * take ~36: at SmolLM2's width of 576 those cost a third of a prefill's products). */
static inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512 s = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* WROWS weight rows (or one) against MB rows of bfloat16 x (K / 32 vectors a row).
 * NAME##_..: weights WT, 32 of them read as bfloat16 by LOADW. The int8 and the
 * panel kernels do the same arithmetic in the same order: a row's result does not
 * depend on which of them ran it. */
#define BF16_BLOCKS(NAME, WT, LOADW, MB)                                                    \
    static inline void NAME##_four##MB(const __m512bh* x, int64_t K, const WT* w,            \
                                       int64_t n, float* y, int64_t ldy, const uint16_t* sc) { \
        __m512 a0[MB], a1[MB], a2[MB], a3[MB];                                              \
        for (int m = 0; m < MB; m++) a0[m] = a1[m] = a2[m] = a3[m] = _mm512_setzero_ps();  \
        const WT *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;                 \
        const int64_t kv = K / 32;                                                          \
        for (int64_t j = 0; j < kv; j++) {                                                  \
            const int64_t k = 32 * j;                                                       \
            PREFETCH_NEXT_ROWS(WT, w0, w1, w2, w3, K, k);                                  \
            __m512bh u0 = LOADW(w0 + k), u1 = LOADW(w1 + k), u2 = LOADW(w2 + k),            \
                     u3 = LOADW(w3 + k);                                                    \
            for (int m = 0; m < MB; m++) {                                                  \
                __m512bh xv = x[m * kv + j];                                                \
                a0[m] = _mm512_dpbf16_ps(a0[m], u0, xv);                                    \
                a1[m] = _mm512_dpbf16_ps(a1[m], u1, xv);                                    \
                a2[m] = _mm512_dpbf16_ps(a2[m], u2, xv);                                    \
                a3[m] = _mm512_dpbf16_ps(a3[m], u3, xv);                                    \
            }                                                                               \
        }                                                                                   \
        for (int m = 0; m < MB; m++) {                                                      \
            float t[4];                                                                     \
            _mm_storeu_ps(t, hsum4(a0[m], a1[m], a2[m], a3[m]));                            \
            store_four(y + m * ldy + n, sc, n, t[0], t[1], t[2], t[3]);                     \
        }                                                                                   \
    }                                                                                       \
    static inline void NAME##_one##MB(const __m512bh* x, int64_t K, const WT* w,             \
                                      int64_t n, float* y, int64_t ldy, const uint16_t* sc) { \
        __m512 a[MB];                                                                       \
        for (int m = 0; m < MB; m++) a[m] = _mm512_setzero_ps();                            \
        const int64_t kv = K / 32;                                                          \
        for (int64_t j = 0; j < kv; j++) {                                                  \
            __m512bh u = LOADW(w + n * K + 32 * j);                                         \
            for (int m = 0; m < MB; m++) a[m] = _mm512_dpbf16_ps(a[m], u, x[m * kv + j]);   \
        }                                                                                   \
        float s = scale_at(sc, n);                                                          \
        for (int m = 0; m < MB; m++) y[m * ldy + n] = s * _mm512_reduce_add_ps(a[m]);       \
    }

KERNEL(BF16_BLOCKS, bf16, __m512bh, int8_t, load_i8_bf16, K / 32)
KERNEL(BF16_BLOCKS, panel, __m512bh, uint16_t, load_bf16, K / 32)

/* Many rows of x (a prefill): each block of weight rows is converted to bfloat16
 * once, into a buffer that stays in L2, and every row of x passes it there; the
 * int8 kernel converts each weight once per group of XROWS rows of x. */
#define PANEL_MIN_ROWS 8
#define PANEL_BYTES (128 << 10)

static int converted_range(const __m512bh* xb, int64_t M, int64_t K, const int8_t* w,
                           int64_t n0, int64_t n1, float* y, int64_t ldy, const uint16_t* sc) {
    int64_t rows = PANEL_BYTES / (2 * K) / WROWS * WROWS;
    if (rows < WROWS) rows = WROWS;
    uint16_t* buf = aligned_alloc(64, (size_t)(rows * K) * sizeof(uint16_t));
    if (!buf) return -1;
    for (int64_t nb = n0; nb < n1; nb += rows) {
        int64_t ne = nb + rows < n1 ? nb + rows : n1;
        for (int64_t r = 0; r < ne - nb; r++)
            for (int64_t k = 0; k < K; k += 32) {
                if (k % 64 == 0) PREFETCH(w + (nb + r + WROWS) * K + k);
                _mm512_storeu_si512((void*)(buf + r * K + k),
                                    (__m512i)load_i8_bf16(w + (nb + r) * K + k));
            }
        panel_range(xb, M, K, buf, 0, ne - nb, y + nb, ldy, sc + nb);
    }
    free(buf);
    return 0;
}
#endif

static int threads_for(int64_t N) {
    int t = omp_get_max_threads();
    /* Below ~32 rows per thread the fork and join cost more than they save. */
    return (int64_t)t * 32 > N ? 1 : t;
}

static void split(int64_t N, int64_t align, int64_t* a, int64_t* b) {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t per = ((N + nt - 1) / nt + align - 1) / align * align;
    *a = t * per < N ? t * per : N;
    *b = *a + per < N ? *a + per : N;
}

/* K must be a multiple of 16. */
void tpi_matmul_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y) {
    int T = threads_for(N);
#pragma omp parallel num_threads(T)
    {
        int64_t a, b;
        split(N, WROWS, &a, &b);
        if (a < b) f32w_range(x, M, K, w, a, b, y, N, NULL);
    }
}

/* Whether tpi_matmul_i8 rounds x to bfloat16 for this K (the BF16 dot-product path). */
int tpi_int8_rounds_to_bf16(int64_t K) {
#ifdef HAVE_BF16_DOT
    return K % 32 == 0;
#else
    (void)K;
    return 0;
#endif
}

/* K must be a multiple of 16; scale: N bfloat16 values. Returns -1 when out of
 * memory (for x in bfloat16), 0 otherwise. */
int tpi_matmul_i8(const float* x, int64_t M, int64_t K, const int8_t* w, const uint16_t* scale,
                  int64_t N, float* y) {
    int T = threads_for(N);
#ifdef HAVE_BF16_DOT
    if (tpi_int8_rounds_to_bf16(K)) {
        const int64_t kv = K / 32;
        __m512bh* xb = aligned_alloc(64, (size_t)(M * kv) * sizeof(__m512bh));
        if (!xb) return -1;
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < kv; j++) {
                const float* p = x + m * K + 32 * j;
                xb[m * kv + j] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 16), _mm512_loadu_ps(p));
            }
        int failed = 0;
#pragma omp parallel num_threads(T) reduction(| : failed)
        {
            int64_t a, b;
            split(N, WROWS, &a, &b);
            if (a < b && M >= PANEL_MIN_ROWS) failed = converted_range(xb, M, K, w, a, b, y, N, scale);
            else if (a < b) bf16_range(xb, M, K, w, a, b, y, N, scale);
        }
        free(xb);
        return failed ? -1 : 0;
    }
#endif
#pragma omp parallel num_threads(T)
    {
        int64_t a, b;
        split(N, WROWS, &a, &b);
        if (a < b) i8w_range(x, M, K, w, a, b, y, N, scale);
    }
    return 0;
}

/* A float weight held transposed in S column blocks (S, K, Nb) (an LM head, see
 * FloatT): y (M, S * Nb). Each unit of work is CHUNK columns of one block, whose
 * sums stay in L1 while the block's K rows stream past (a register tile would
 * walk K rows a few cache lines at a time, too many streams to prefetch). */
#define CHUNK 512

#define COLUMN_CHUNK(MB)                                                                    \
    static void chunk##MB(const float* x, int64_t K, const float* w, int64_t ldw, int64_t nc, \
                          float* y, int64_t ldy) {                                           \
        float acc[MB][CHUNK] __attribute__((aligned(64)));                                   \
        memset(acc, 0, sizeof acc);                                                          \
        for (int64_t k = 0; k < K; k++) {                                                    \
            const float* row = w + k * ldw;                                                  \
            v16f xs[MB];                                                                     \
            for (int m = 0; m < MB; m++) xs[m] = (v16f){0} + x[m * K + k];                   \
            for (int64_t c = 0; c < nc; c += 16) {                                           \
                v16f u = load_f32(row + c);                                                  \
                for (int m = 0; m < MB; m++) {                                               \
                    v16f a = load_f32(&acc[m][c]) + u * xs[m];                               \
                    memcpy(&acc[m][c], &a, sizeof a);                                        \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        for (int m = 0; m < MB; m++) memcpy(y + m * ldy, acc[m], (size_t)nc * sizeof(float)); \
    }

COLUMN_CHUNK(1)
COLUMN_CHUNK(2)
COLUMN_CHUNK(3)
COLUMN_CHUNK(4)

/* Nb must be a multiple of 16. */
void tpi_matmul_f32_cols(const float* x, int64_t M, int64_t K, const float* blocks, int64_t S,
                         int64_t Nb, float* y) {
    int64_t per = (Nb + CHUNK - 1) / CHUNK, units = S * per, ldy = S * Nb;
    int T = omp_get_max_threads();
    if (units < T) T = (int)units;
#pragma omp parallel for num_threads(T) schedule(static)
    for (int64_t u = 0; u < units; u++) {
        int64_t s = u / per, c0 = (u % per) * CHUNK;
        int64_t nc = Nb - c0 < CHUNK ? Nb - c0 : CHUNK;
        const float* w = blocks + s * K * Nb + c0;
        for (int64_t m = 0; m < M; m += XROWS) {
            const float* xm = x + m * K;
            float* ym = y + m * ldy + s * Nb + c0;
            switch (M - m < XROWS ? M - m : XROWS) {
                case 1: chunk1(xm, K, w, Nb, nc, ym, ldy); break;
                case 2: chunk2(xm, K, w, Nb, nc, ym, ldy); break;
                case 3: chunk3(xm, K, w, Nb, nc, ym, ldy); break;
                default: chunk4(xm, K, w, Nb, nc, ym, ldy); break;
            }
        }
    }
}
