/* Products of a few activation rows with a 4-bit weight in torch's packed CPU layout
 * (x86; AArch64 reads the split's own layout, int4_arm.h).
 *
 *   y[m, n] = sum_k x[m, k] * ((q[n, k] - 8) * scale[k / g, n] + zero[k / g, n])
 *
 * The weight is read as torch's int4 kernel stores it on an AVX-512 machine
 * (tpi.quant.int4_pack, layout "b64h"): rows in blocks of 64, each block K-major,
 * 32 bytes per k, byte j holding row j (low nibble) and row j + 32 (high nibble);
 * scale_zero (K / g, N, 2) bfloat16. torch's kernel takes bfloat16 activations
 * only, so each call costs two conversions around it besides (a SmolLM2 int4
 * token: 4.2-4.4 ms in its products, 5.2 ms with the conversions).
 *
 * Here the nibbles of two consecutive k of 16 rows become one vector of bfloat16
 * pairs in a single byte permutation (VBMI), as 128 + q: bfloat16 holds 128..143
 * exactly with the exponent byte a constant 0x43. One BF16 dot product then does
 * 32 multiply-adds against the pair (x[k], x[k+1]) of x rounded to bfloat16 (as
 * torch rounds it), and the offset comes out with the group's sum of those x:
 *
 *   sum_k x (q - 8) s + x z  =  s * sum_k x (128 + q)  +  (z - 136 s) * sum_k x
 *
 * The sum of x is taken over the very bfloat16 values the products used, so the
 * 128 cancels to float32 rounding (~1e-6 of the result; torch's bfloat16 kernel:
 * ~3e-3). Rows of x are independent: a row's result is the same in any batch.
 *
 * Needs AVX512-BF16 and AVX512-VBMI (tpi_int4_supported); built at first use by
 * tpi/kernels/build.py, as small_matmul.c.
 */

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#define HAVE_INT4 1
#elif defined(__aarch64__)
#include "int4_arm.h" /* the split's own layout, on every AArch64 CPU */
#define HAVE_INT4_ARM 1
#endif

#define BLOCK 64  /* weight rows per block of the packed layout */
#define XROWS 4   /* rows of x per pass over a block (more are looped) */

int tpi_int4_supported(void) {
#if defined(HAVE_INT4) || defined(HAVE_INT4_ARM)
    return 1;
#else
    return 0;
#endif
}

/* A split's int4 weights ("rows": row n's K / 2 bytes, k = 2j in byte j's low nibble)
 * in one of torch's block layouts (tpi.quant.int4_pack): rows in blocks of B, each
 * block K-major, two rows a byte: row j with j + B / 2 in a full block when `half`,
 * else neighbours (a last, partial block always). What a machine makes at load; torch
 * ops doing the same gather bytes across strided views (a 7B-shaped matrix of 22.5 MB:
 * 80-200 ms), this in about two copies' time (30 ms, a copy 14 ms). out: N * K / 2 bytes. */
void tpi_int4_pack_blocks(const uint8_t* rows, int64_t N, int64_t K, int64_t B, int half,
                          uint8_t* out) {
    const int64_t hk = K / 2;
    const uint64_t low = 0x0F0F0F0F0F0F0F0FULL;
#pragma omp parallel for schedule(static)
    for (int64_t b0 = 0; b0 < N; b0 += B) {
        const int64_t nb = N - b0 < B ? N - b0 : B, pairs = nb / 2;
        const int h = half && nb == B;
        const uint8_t* r = rows + b0 * hk;
        uint8_t* o = out + b0 * hk; /* K rows of `pairs` bytes */
        int64_t byte = 0;
        /* 8 bytes (16 k) of a pair of rows at once, as 64-bit words: the even k's
         * output bytes in one word, the odd k's in another, then stored byte by byte
         * into their 16 output rows (byte i of a word is its i-th in memory: x86 and
         * AArch64 are little-endian). */
        for (; byte + 8 <= hk; byte += 8)
            for (int64_t j = 0; j < pairs; j++) {
                uint64_t a, c;
                memcpy(&a, r + (h ? j : 2 * j) * hk + byte, 8);
                memcpy(&c, r + (h ? j + pairs : 2 * j + 1) * hk + byte, 8);
                const uint64_t even = (a & low) | ((c & low) << 4);
                const uint64_t odd = ((a >> 4) & low) | (c & ~low);
                for (int i = 0; i < 8; i++) {
                    o[(2 * (byte + i)) * pairs + j] = (uint8_t)(even >> (8 * i));
                    o[(2 * (byte + i) + 1) * pairs + j] = (uint8_t)(odd >> (8 * i));
                }
            }
        for (; byte < hk; byte++) /* the last K / 2 % 8 bytes */
            for (int64_t j = 0; j < pairs; j++) {
                const uint8_t a = r[(h ? j : 2 * j) * hk + byte];
                const uint8_t c = r[(h ? j + pairs : 2 * j + 1) * hk + byte];
                o[(2 * byte) * pairs + j] = (uint8_t)((a & 0x0F) | (c << 4));
                o[(2 * byte + 1) * pairs + j] = (uint8_t)((a >> 4) | (c & 0xF0));
            }
    }
}

/* How tpi_matmul_i4 takes x: 0 as it is (float32), 1 rounded to bfloat16 (x86), 2 as
 * two int8 digits per weight group (AArch64 with dot products, digits_arm.h). */
int tpi_int4_activations(void) {
#if defined(HAVE_INT4)
    return 1;
#elif defined(HAVE_INT4_ARM) && defined(__ARM_FEATURE_DOTPROD)
    return 2;
#else
    return 0;
#endif
}

/* The layout tpi_matmul_i4 reads (tpi.quant.int4_pack): 2 * rows per block + 1 for
 * rows paired half a block apart (x86: "b64h", 129), 0 for "rows" (AArch64), -1 none. */
int tpi_int4_layout(void) {
#if defined(HAVE_INT4)
    return 2 * BLOCK + 1;
#elif defined(HAVE_INT4_ARM)
    return 0;
#else
    return -1;
#endif
}

#ifdef HAVE_INT4
/* Byte indices that turn 64 bytes of nibbles (k: bytes 0-31, k + 1: bytes 32-63)
 * into 16 rows' bfloat16 pairs, rows `first`..first + 15: per 32-bit lane, byte 0
 * from k and byte 2 from k + 1; bytes 1 and 3 keep 0x43 (mask). */
static inline __m512i pair_index(int first) {
    uint8_t idx[64];
    for (int r = 0; r < 16; r++) {
        idx[4 * r] = (uint8_t)(first + r);
        idx[4 * r + 1] = 0;
        idx[4 * r + 2] = (uint8_t)(32 + first + r);
        idx[4 * r + 3] = 0;
    }
    return _mm512_loadu_si512(idx);
}

/* A block's 64 rows against MB rows of x (bfloat16 pairs xp, K / 2 a row; group
 * sums xs, K / g a row): accumulates into y (MB rows, ldy apart). */
static inline void block_rows(const uint32_t* xp, const float* xs, int MB, int64_t K, int64_t G,
                              int64_t gs, const uint8_t* p, const uint16_t* sz, int64_t N,
                              int64_t n0, float* y, int64_t ldy) {
    const __mmask64 even = 0x5555555555555555ULL;
    const __m512i high = _mm512_set1_epi16(0x4300), low4 = _mm512_set1_epi8(0x0F);
    const __m512i i0 = pair_index(0), i1 = pair_index(16);
    __m512 tot[XROWS][4];
    for (int m = 0; m < MB; m++)
        for (int j = 0; j < 4; j++) tot[m][j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512 acc[XROWS][4];
        for (int m = 0; m < MB; m++)
            for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 2) {
            const uint8_t* b = p + k * 32;
            __builtin_prefetch(b + 4096, 0, 1); /* into L2, as small_matmul.c */
            __m512i v = _mm512_loadu_si512(b);
            __m512i lo = _mm512_and_si512(v, low4);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            __m512bh w0 = (__m512bh)_mm512_mask_permutexvar_epi8(high, even, i0, lo);
            __m512bh w1 = (__m512bh)_mm512_mask_permutexvar_epi8(high, even, i1, lo);
            __m512bh w2 = (__m512bh)_mm512_mask_permutexvar_epi8(high, even, i0, hi);
            __m512bh w3 = (__m512bh)_mm512_mask_permutexvar_epi8(high, even, i1, hi);
            for (int m = 0; m < MB; m++) {
                __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xp[m * (K / 2) + k / 2]);
                acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xv);
                acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xv);
                acc[m][2] = _mm512_dpbf16_ps(acc[m][2], w2, xv);
                acc[m][3] = _mm512_dpbf16_ps(acc[m][3], w3, xv);
            }
        }
        /* rows 16 j.. of the block: their (scale, zero) pairs, a float each */
        const uint16_t* s = sz + (g * N + n0) * 2;
        for (int j = 0; j < 4; j++) {
            __m512i pr = _mm512_loadu_si512((const void*)(s + 32 * j));
            __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(pr, 16));
            __m512 ze = _mm512_castsi512_ps(_mm512_and_si512(pr, _mm512_set1_epi32((int)0xFFFF0000)));
            __m512 off = _mm512_fnmadd_ps(sc, _mm512_set1_ps(136.0f), ze); /* z - 136 s */
            for (int m = 0; m < MB; m++)
                tot[m][j] = _mm512_fmadd_ps(off, _mm512_set1_ps(xs[m * G + g]),
                                            _mm512_fmadd_ps(sc, acc[m][j], tot[m][j]));
        }
    }
    for (int m = 0; m < MB; m++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(y + m * ldy + n0 + 16 * j, tot[m][j]);
}
#endif

/* x (M, K) float32; packed: N * K / 2 bytes (layout above; on AArch64 int4_arm.h's);
 * scale_zero: (K / gs, N, 2) bfloat16; y (M, N). N a multiple of 64, gs even, K a
 * multiple of gs (AArch64: N of 4, gs and K of 32). Returns 0, -1 when out of
 * memory, -2 when this build cannot (x86 without AVX512-BF16/VBMI, or the shape). */
int tpi_matmul_i4(const float* x, int64_t M, int64_t K, const uint8_t* packed,
                  const uint16_t* scale_zero, int64_t gs, int64_t N, float* y) {
#ifdef HAVE_INT4
    const int64_t G = K / gs, half = K / 2, blocks = N / BLOCK;
    /* x as bfloat16 pairs (k, k + 1) in one 32-bit word, and each group's sum of them */
    uint32_t* xp = malloc(sizeof(uint32_t) * (size_t)(M * half));
    float* xs = malloc(sizeof(float) * (size_t)(M * G));
    if (!xp || !xs) {
        free(xp);
        free(xs);
        return -1;
    }
    for (int64_t m = 0; m < M; m++) {
        for (int64_t i = 0; i < half; i += 16) {
            __m512 a = _mm512_loadu_ps(x + m * K + 2 * i), b = _mm512_loadu_ps(x + m * K + 2 * i + 16);
            _mm512_storeu_si512(xp + m * half + i, (__m512i)_mm512_cvtne2ps_pbh(b, a));
        }
        for (int64_t g = 0; g < G; g++) {
            float t = 0.0f;
            for (int64_t i = g * gs / 2; i < (g + 1) * gs / 2; i++) {
                uint32_t w = xp[m * half + i], lo = w << 16, hi = w & 0xFFFF0000u;
                float a, b;
                memcpy(&a, &lo, 4);
                memcpy(&b, &hi, 4);
                t += a + b;
            }
            xs[m * G + g] = t;
        }
    }
    int T = omp_get_max_threads();
    if (T > blocks) T = (int)blocks;
#pragma omp parallel for num_threads(T) schedule(static)
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t m = 0; m < M; m += XROWS)
            block_rows(xp + m * half, xs + m * G, M - m < XROWS ? (int)(M - m) : XROWS, K, G, gs,
                       packed + b * BLOCK * half, scale_zero, N, b * BLOCK, y + m * N, N);
    free(xp);
    free(xs);
    return 0;
#elif defined(HAVE_INT4_ARM)
    /* rows in tiles of 4, x by groups of 32 */
    if (K % 32 || gs % 32 || K % gs || N % 4) return -2;
    return arm_matmul_i4(x, M, K, packed, scale_zero, gs, N, y);
#else
    (void)x, (void)M, (void)K, (void)packed, (void)scale_zero, (void)gs, (void)N, (void)y;
    return -2;
#endif
}
