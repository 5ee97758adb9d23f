/* int8 weights times activations as two int8 digits (digits_arm.h), on AArch64 CPUs
 * with the dot product extension (SDOT: Cortex-A55/A76 and later, the Raspberry Pi
 * 5; not the Pi 4's A72, which takes the float path of small_matmul.c).
 *
 *   y[m, n] = scale[n] * s[m] * (sum_k a[m, k] w[n, k] + sum_k b[m, k] w[n, k] / 254)
 *
 * Both sums are exact int32 (|a w| <= 127 * 127: K up to 130,000), so a row's
 * result does not depend on the order the products were taken in: rows alone,
 * two at a time, or through SMMLA (the int8 matrix extension, I8MM: 2 weight rows
 * times 2 rows of x, 32 multiply-adds an instruction, where SDOT does 16) are the
 * same bits. Weights are read in place (N, K), as on x86.
 *
 * Included by small_matmul.c after its helpers (threads_for, split, PREFETCH).
 */
#if defined(__ARM_FEATURE_DOTPROD)
#define HAVE_INT8_DOT 1

#include <arm_neon.h>

#include "digits_arm.h"

/* Four weight rows' bfloat16 scales as floats. */
static inline float32x4_t scales4(const uint16_t* sc, int64_t n) {
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(sc + n), 16));
}

/* Weight rows n..n+3 against MB rows of digits (a, b: K a row; s: a row's scale). */
#define DOT_FOUR(MB)                                                                        \
    static inline void dot_four##MB(const int8_t* a, const int8_t* b, const float* s,        \
                                    int64_t K, const int8_t* w, int64_t n, float* y,         \
                                    int64_t ldy, const uint16_t* sc) {                       \
        const int8_t *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;             \
        int32x4_t A[MB][4], B[MB][4];                                                       \
        for (int m = 0; m < MB; m++)                                                        \
            for (int r = 0; r < 4; r++) A[m][r] = B[m][r] = vdupq_n_s32(0);                 \
        for (int64_t k = 0; k < K; k += 16) {                                               \
            if (k % 64 == 0) {                                                              \
                PREFETCH(w0 + 4 * K + k);                                                   \
                PREFETCH(w1 + 4 * K + k);                                                   \
                PREFETCH(w2 + 4 * K + k);                                                   \
                PREFETCH(w3 + 4 * K + k);                                                   \
            }                                                                               \
            const int8x16_t u[4] = {vld1q_s8(w0 + k), vld1q_s8(w1 + k), vld1q_s8(w2 + k),   \
                                    vld1q_s8(w3 + k)};                                      \
            for (int m = 0; m < MB; m++) {                                                  \
                const int8x16_t xa = vld1q_s8(a + m * K + k), xb = vld1q_s8(b + m * K + k); \
                for (int r = 0; r < 4; r++) {                                               \
                    A[m][r] = vdotq_s32(A[m][r], u[r], xa);                                 \
                    B[m][r] = vdotq_s32(B[m][r], u[r], xb);                                 \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        const float32x4_t scale = scales4(sc, n);                                           \
        for (int m = 0; m < MB; m++) {                                                      \
            float32x4_t f = digit_value(sum4_s32(A[m][0], A[m][1], A[m][2], A[m][3]),       \
                                        sum4_s32(B[m][0], B[m][1], B[m][2], B[m][3]));      \
            vst1q_f32(y + m * ldy + n, vmulq_f32(vmulq_n_f32(f, s[m]), scale));             \
        }                                                                                   \
    }

DOT_FOUR(1)
DOT_FOUR(2)

/* One weight row (the last N % 4) against one row of digits: the same formula. */
static void dot_one(const int8_t* a, const int8_t* b, float s, int64_t K, const int8_t* w,
                    int64_t n, float* y, const uint16_t* sc) {
    int32x4_t A = vdupq_n_s32(0), B = vdupq_n_s32(0);
    for (int64_t k = 0; k < K; k += 16) {
        const int8x16_t u = vld1q_s8(w + n * K + k);
        A = vdotq_s32(A, u, vld1q_s8(a + k));
        B = vdotq_s32(B, u, vld1q_s8(b + k));
    }
    float32x4_t f = digit_value(vdupq_n_s32(vaddvq_s32(A)), vdupq_n_s32(vaddvq_s32(B)));
    y[n] = vgetq_lane_f32(vmulq_f32(vmulq_n_f32(f, s), vdupq_n_f32(scale_at(sc, n))), 0);
}

#if defined(__ARM_FEATURE_MATMUL_INT8)
#define HAVE_INT8_MMLA 1

static inline int8x16_t low_halves(int8x16_t u, int8x16_t v) {
    return vreinterpretq_s8_s64(vzip1q_s64(vreinterpretq_s64_s8(u), vreinterpretq_s64_s8(v)));
}

static inline int8x16_t high_halves(int8x16_t u, int8x16_t v) {
    return vreinterpretq_s8_s64(vzip2q_s64(vreinterpretq_s64_s8(u), vreinterpretq_s64_s8(v)));
}

/* Weight rows n..n+3 against the pair of x rows m, m + 1, digits interleaved by 8
 * (ap: m's k..k+7, then m + 1's, ...: 2K a pair). SMMLA multiplies a 2x8 block of
 * weights by a 2x8 block of x: lanes (n, m), (n, m + 1), (n + 1, m), (n + 1, m + 1). */
static inline void mmla_four(const int8_t* ap, const int8_t* bp, const float* s, int64_t K,
                             const int8_t* w, int64_t n, float* y, int64_t ldy,
                             const uint16_t* sc) {
    const int8_t *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    int32x4_t a01 = vdupq_n_s32(0), a23 = a01, b01 = a01, b23 = a01;
    for (int64_t k = 0; k < K; k += 16) {
        if (k % 64 == 0) {
            PREFETCH(w0 + 4 * K + k);
            PREFETCH(w1 + 4 * K + k);
            PREFETCH(w2 + 4 * K + k);
            PREFETCH(w3 + 4 * K + k);
        }
        const int8x16_t u0 = vld1q_s8(w0 + k), u1 = vld1q_s8(w1 + k);
        const int8x16_t u2 = vld1q_s8(w2 + k), u3 = vld1q_s8(w3 + k);
        const int8x16_t w01l = low_halves(u0, u1), w01h = high_halves(u0, u1);
        const int8x16_t w23l = low_halves(u2, u3), w23h = high_halves(u2, u3);
        const int8x16_t xal = vld1q_s8(ap + 2 * k), xah = vld1q_s8(ap + 2 * k + 16);
        const int8x16_t xbl = vld1q_s8(bp + 2 * k), xbh = vld1q_s8(bp + 2 * k + 16);
        a01 = vmmlaq_s32(vmmlaq_s32(a01, w01l, xal), w01h, xah);
        a23 = vmmlaq_s32(vmmlaq_s32(a23, w23l, xal), w23h, xah);
        b01 = vmmlaq_s32(vmmlaq_s32(b01, w01l, xbl), w01h, xbh);
        b23 = vmmlaq_s32(vmmlaq_s32(b23, w23l, xbl), w23h, xbh);
    }
    const float32x4_t sx = {s[0], s[1], s[0], s[1]};
    for (int h = 0; h < 2; h++) {
        const int64_t r = n + 2 * h;
        const float32x4_t sw = {scale_at(sc, r), scale_at(sc, r), scale_at(sc, r + 1),
                                scale_at(sc, r + 1)};
        float32x4_t f = h ? digit_value(a23, b23) : digit_value(a01, b01);
        f = vmulq_f32(vmulq_f32(f, sx), sw);
        y[r] = vgetq_lane_f32(f, 0);
        y[ldy + r] = vgetq_lane_f32(f, 1);
        y[r + 1] = vgetq_lane_f32(f, 2);
        y[ldy + r + 1] = vgetq_lane_f32(f, 3);
    }
}

/* Digits of rows m, m + 1 interleaved by 8 values (mmla_four's x operand). */
static void interleave_pair(const int8_t* r0, const int8_t* r1, int64_t K, int8_t* out) {
    for (int64_t k = 0; k < K; k += 8) {
        memcpy(out + 2 * k, r0 + k, 8);
        memcpy(out + 2 * k + 8, r1 + k, 8);
    }
}
#endif

/* Output rows [n0, n1) for every row of x: NBLOCK weight rows at a time, kept in
 * cache while the rows of x pass them (pairs through SMMLA where there is I8MM). */
static void dot_range(const int8_t* a, const int8_t* b, const int8_t* pairs, const float* s,
                      int64_t M, int64_t K, const int8_t* w, int64_t n0, int64_t n1, float* y,
                      const uint16_t* sc, int64_t N) {
    for (int64_t nb = n0; nb < n1; nb += NBLOCK) {
        const int64_t ne = nb + NBLOCK < n1 ? nb + NBLOCK : n1, full = nb + (ne - nb) / 4 * 4;
        int64_t m = 0;
#ifdef HAVE_INT8_MMLA
        for (; m + 2 <= M; m += 2) {
            const int8_t* ap = pairs + m * K; /* pair m / 2, 2K bytes a pair */
            for (int64_t n = nb; n < full; n += 4)
                mmla_four(ap, ap + M / 2 * 2 * K, s + m, K, w, n, y + m * N, N, sc);
        }
#else
        (void)pairs;
        for (; m + 2 <= M; m += 2)
            for (int64_t n = nb; n < full; n += 4)
                dot_four2(a + m * K, b + m * K, s + m, K, w, n, y + m * N, N, sc);
#endif
        for (; m < M; m++)
            for (int64_t n = nb; n < full; n += 4)
                dot_four1(a + m * K, b + m * K, s + m, K, w, n, y + m * N, N, sc);
        for (int64_t n = full; n < ne; n++)
            for (int64_t r = 0; r < M; r++)
                dot_one(a + r * K, b + r * K, s[r], K, w, n, y + r * N, sc);
    }
}

/* tpi_matmul_i8 on digits: -1 without memory for them, else 0. */
static int dot_matmul_i8(const float* x, int64_t M, int64_t K, const int8_t* w,
                         const uint16_t* sc, int64_t N, float* y) {
    const int64_t pairs = M / 2;
    int8_t* d = malloc((size_t)(2 * M * K + 2 * pairs * 2 * K));
    float* s = malloc(sizeof(float) * (size_t)M);
    if (!d || !s) {
        free(d);
        free(s);
        return -1;
    }
    int8_t *a = d, *b = d + M * K, *p = d + 2 * M * K;
    for (int64_t m = 0; m < M; m++) to_digits(x + m * K, K, K, a + m * K, b + m * K, s + m);
#ifdef HAVE_INT8_MMLA
    /* a's pairs first, then b's (dot_range finds b's at pairs * 2K further) */
    for (int64_t q = 0; q < pairs; q++) {
        interleave_pair(a + 2 * q * K, a + (2 * q + 1) * K, K, p + q * 2 * K);
        interleave_pair(b + 2 * q * K, b + (2 * q + 1) * K, K, p + (pairs + q) * 2 * K);
    }
#endif
    int T = threads_for(N);
#pragma omp parallel num_threads(T)
    {
        int64_t lo, hi;
        split(N, WROWS, &lo, &hi);
        if (lo < hi) dot_range(a, b, p, s, M, K, w, lo, hi, y, sc, N);
    }
    free(d);
    free(s);
    return 0;
}
#endif
