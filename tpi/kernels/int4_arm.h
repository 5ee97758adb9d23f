/* 4-bit weights on AArch64, read as a split stores them (tpi.quant.int4_pack's "rows"
 * layout: row n's K / 2 bytes in order, byte j holding k = 2j in its low nibble and
 * k = 2j + 1 in its high one), so nothing is repacked at load.
 *
 *   y[m, n] = sum_g s[g, n] * sum_{k in g} x[m, k] q[n, k]  +  (z[g, n] - 8 s[g, n]) * sum_{k in g} x[m, k]
 *
 * (torch's int4 semantics, w = (q - 8) s + z.) 16 bytes of a row hold 32 weights:
 * their low nibbles are the even k, the high ones the odd k, so x is laid out per
 * 32 values as its 16 even then its 16 odd ones. With the dot product extension,
 * x is two int8 digits per weight group (digits_arm.h) and each 16 bytes take four
 * SDOTs (two nibble halves, two digits), exact integers until the group's
 * scale; without it (a Cortex-A72, the Raspberry Pi 4) the nibbles are converted
 * to float and x taken as it is. Four weight rows at a time: their group sums
 * come out as one vector of four, scaled by four (scale, zero) pairs at once.
 *
 * Included by int4_matmul.c on AArch64.
 */
#include <arm_neon.h>

#define I4_ROWS 4   /* weight rows per tile */
#define I4_CHUNK 32 /* weights per 16 bytes of a row */

/* Four rows' (scale, zero) pairs of one group as floats; returns the scales. */
static inline float32x4_t group_pairs(const uint16_t* p, float32x4_t* zero) {
    const uint16x4x2_t v = vld2_u16(p);
    *zero = vreinterpretq_f32_u32(vshll_n_u16(v.val[1], 16));
    return vreinterpretq_f32_u32(vshll_n_u16(v.val[0], 16));
}

#if defined(__ARM_FEATURE_DOTPROD)
#include "digits_arm.h"

typedef struct {
    const int8_t* a; /* K digits of the row, per 32: even k then odd k */
    const int8_t* b;
    const float* s;   /* per group: the digits' scale */
    const float* sum; /* per group: the sum of x as its digits give it */
} RowX;

/* One row of x from its values: digits per group, reordered per 32 (buf: 2K + 2K). */
static void row_x(const float* x, int64_t K, int64_t gs, int8_t* buf, float* s, float* sum) {
    int8_t *a = buf, *b = buf + K, *ra = buf + 2 * K, *rb = buf + 3 * K;
    to_digits(x, K, gs, a, b, s);
    for (int64_t c = 0; c < K; c += I4_CHUNK)
        for (int64_t i = 0; i < I4_CHUNK / 2; i++) {
            ra[c + i] = a[c + 2 * i];
            ra[c + 16 + i] = a[c + 2 * i + 1];
            rb[c + i] = b[c + 2 * i];
            rb[c + 16 + i] = b[c + 2 * i + 1];
        }
    for (int64_t g = 0; g < K / gs; g++) {
        int32_t ta = 0, tb = 0;
        for (int64_t k = g * gs; k < (g + 1) * gs; k++) ta += a[k], tb += b[k];
        sum[g] = vgetq_lane_f32(digit_value(vdupq_n_s32(ta), vdupq_n_s32(tb)), 0) * s[g];
    }
}

/* Rows n..n+3 of the weight (p: K / 2 bytes a row) against one row of x: y[n..n+3]. */
static void i4_four(const uint8_t* p, int64_t K, int64_t gs, RowX x, const uint16_t* sz,
                    int64_t N, int64_t n, float* y) {
    const int64_t half = K / 2;
    const uint8_t* r[I4_ROWS] = {p + n * half, p + (n + 1) * half, p + (n + 2) * half,
                                 p + (n + 3) * half};
    const uint8x16_t low4 = vdupq_n_u8(0x0F);
    float32x4_t tot = vdupq_n_f32(0.0f);
    for (int64_t g = 0; g < K / gs; g++) {
        int32x4_t A[I4_ROWS], B[I4_ROWS];
        for (int i = 0; i < I4_ROWS; i++) A[i] = B[i] = vdupq_n_s32(0);
        for (int64_t c = g * gs; c < (g + 1) * gs; c += I4_CHUNK) {
            const int8x16_t ae = vld1q_s8(x.a + c), ao = vld1q_s8(x.a + c + 16);
            const int8x16_t be = vld1q_s8(x.b + c), bo = vld1q_s8(x.b + c + 16);
            for (int i = 0; i < I4_ROWS; i++) {
                __builtin_prefetch(r[i] + I4_ROWS * half + c / 2, 0, 1); /* the next tile */
                const uint8x16_t v = vld1q_u8(r[i] + c / 2);
                const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, low4));
                const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
                A[i] = vdotq_s32(vdotq_s32(A[i], lo, ae), hi, ao);
                B[i] = vdotq_s32(vdotq_s32(B[i], lo, be), hi, bo);
            }
        }
        float32x4_t zero, scale = group_pairs(sz + (g * N + n) * 2, &zero);
        const float32x4_t f = digit_value(sum4_s32(A[0], A[1], A[2], A[3]),
                                          sum4_s32(B[0], B[1], B[2], B[3]));
        tot = vfmaq_f32(tot, vmulq_n_f32(scale, x.s[g]), f);
        tot = vfmaq_n_f32(tot, vfmsq_n_f32(zero, scale, 8.0f), x.sum[g]);
    }
    vst1q_f32(y + n, tot);
}

static int arm_matmul_i4(const float* x, int64_t M, int64_t K, const uint8_t* packed,
                         const uint16_t* sz, int64_t gs, int64_t N, float* y) {
    const int64_t G = K / gs;
    int8_t* d = malloc((size_t)(M * 4 * K));
    float* f = malloc(sizeof(float) * (size_t)(2 * M * G));
    if (!d || !f) {
        free(d);
        free(f);
        return -1;
    }
    for (int64_t m = 0; m < M; m++) row_x(x + m * K, K, gs, d + m * 4 * K, f + m * G, f + (M + m) * G);
    const int64_t tiles = N / I4_ROWS;
    int T = omp_get_max_threads();
    if (T > tiles) T = (int)tiles;
#pragma omp parallel for num_threads(T) schedule(static)
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t m = 0; m < M; m++) {
            const RowX r = {d + m * 4 * K + 2 * K, d + m * 4 * K + 3 * K, f + m * G,
                            f + (M + m) * G};
            i4_four(packed, K, gs, r, sz, N, t * I4_ROWS, y + m * N);
        }
    free(d);
    free(f);
    return 0;
}

#else /* plain NEON: nibbles to float, x as it is */

/* 16 nibbles (u8) as four float vectors. */
static inline void nibbles_f32(uint8x16_t v, float32x4_t out[4]) {
    const uint16x8_t l = vmovl_u8(vget_low_u8(v)), h = vmovl_high_u8(v);
    out[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(l)));
    out[1] = vcvtq_f32_u32(vmovl_high_u16(l));
    out[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(h)));
    out[3] = vcvtq_f32_u32(vmovl_high_u16(h));
}

/* Rows n..n+3 against one row of x (xr: per 32, its 16 even then 16 odd values;
 * xs: per group, the sum of x). */
static void i4_four(const uint8_t* p, int64_t K, int64_t gs, const float* xr, const float* xs,
                    const uint16_t* sz, int64_t N, int64_t n, float* y) {
    const int64_t half = K / 2;
    const uint8x16_t low4 = vdupq_n_u8(0x0F);
    float32x4_t tot = vdupq_n_f32(0.0f);
    for (int64_t g = 0; g < K / gs; g++) {
        float32x4_t acc[I4_ROWS][2];
        for (int i = 0; i < I4_ROWS; i++) acc[i][0] = acc[i][1] = vdupq_n_f32(0.0f);
        for (int64_t c = g * gs; c < (g + 1) * gs; c += I4_CHUNK) {
            float32x4_t xv[8];
            for (int j = 0; j < 8; j++) xv[j] = vld1q_f32(xr + c + 4 * j);
            for (int i = 0; i < I4_ROWS; i++) {
                const uint8_t* row = p + (n + i) * half;
                __builtin_prefetch(row + I4_ROWS * half + c / 2, 0, 1);
                const uint8x16_t v = vld1q_u8(row + c / 2);
                float32x4_t e[4], o[4];
                nibbles_f32(vandq_u8(v, low4), e);
                nibbles_f32(vshrq_n_u8(v, 4), o);
                for (int j = 0; j < 4; j++) {
                    acc[i][0] = vfmaq_f32(acc[i][0], e[j], xv[j]);
                    acc[i][1] = vfmaq_f32(acc[i][1], o[j], xv[4 + j]);
                }
            }
        }
        float32x4_t s[I4_ROWS];
        for (int i = 0; i < I4_ROWS; i++) s[i] = vaddq_f32(acc[i][0], acc[i][1]);
        const float32x4_t qx = vpaddq_f32(vpaddq_f32(s[0], s[1]), vpaddq_f32(s[2], s[3]));
        float32x4_t zero, scale = group_pairs(sz + (g * N + n) * 2, &zero);
        tot = vfmaq_f32(tot, scale, qx);
        tot = vfmaq_n_f32(tot, vfmsq_n_f32(zero, scale, 8.0f), xs[g]);
    }
    vst1q_f32(y + n, tot);
}

static int arm_matmul_i4(const float* x, int64_t M, int64_t K, const uint8_t* packed,
                         const uint16_t* sz, int64_t gs, int64_t N, float* y) {
    const int64_t G = K / gs;
    float* xr = malloc(sizeof(float) * (size_t)(M * (K + G)));
    if (!xr) return -1;
    float* xs = xr + M * K;
    for (int64_t m = 0; m < M; m++) {
        const float* r = x + m * K;
        for (int64_t c = 0; c < K; c += I4_CHUNK)
            for (int64_t i = 0; i < I4_CHUNK / 2; i++) {
                xr[m * K + c + i] = r[c + 2 * i];
                xr[m * K + c + 16 + i] = r[c + 2 * i + 1];
            }
        for (int64_t g = 0; g < G; g++) {
            float t = 0.0f;
            for (int64_t k = g * gs; k < (g + 1) * gs; k++) t += r[k];
            xs[m * G + g] = t;
        }
    }
    const int64_t tiles = N / I4_ROWS;
    int T = omp_get_max_threads();
    if (T > tiles) T = (int)tiles;
#pragma omp parallel for num_threads(T) schedule(static)
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t m = 0; m < M; m++)
            i4_four(packed, K, gs, xr + m * K, xs + m * G, sz, N, t * I4_ROWS, y + m * N);
    free(xr);
    return 0;
}
#endif
