/* Activations as two int8 digits, for AArch64's int8 dot products (SDOT, SMMLA).
 *
 * Each block of `bs` values of a row of x (the whole row for int8 weights, a
 * weight group for int4) becomes
 *
 *   x ~= s * (a + b / 254),   s = max|x| / 127,  a = round(x / s),  b = round((x / s - a) * 254)
 *
 * with |a|, |b| <= 127: two int8 vectors whose dot products with int8 (or 4-bit)
 * weights are exact integers. The error is at most s / 508, the block's largest value
 * to 15 significant bits (bfloat16, which x86 rounds x to for its dot products,
 * keeps 8 of each value). One product costs two dot instructions, each 16
 * multiply-adds, where converting the weights to float costs ~4 instructions
 * per 4 (tpi/kernels/small_matmul.c's float path). A row's digits depend on the
 * row alone: its results are the same bits in any batch.
 *
 * tpi.kernels.digits computes the same digits in torch (the tests' reference):
 * the steps below are single float32 operations in that order (no fused
 * multiply-add: contraction is off here), rounding ties to even as torch.round.
 */
#ifndef TPI_DIGITS_ARM_H
#define TPI_DIGITS_ARM_H

#include <arm_neon.h>
#include <math.h>
#include <stdint.h>

#define DIGIT_SPLIT 254.0f

/* x (n values, blocks of bs) -> digits a, b (n each) and s (n / bs). */
__attribute__((optimize("fp-contract=off"))) static void to_digits(const float* x, int64_t n,
                                                                     int64_t bs, int8_t* a,
                                                                     int8_t* b, float* s) {
    for (int64_t i0 = 0; i0 < n; i0 += bs) {
        float mx = 0.0f;
        for (int64_t i = i0; i < i0 + bs; i++) mx = fabsf(x[i]) > mx ? fabsf(x[i]) : mx;
        const float inv = mx > 0.0f ? 127.0f / mx : 0.0f;
        s[i0 / bs] = mx / 127.0f;
        for (int64_t i = i0; i < i0 + bs; i++) {
            const float t = x[i] * inv;
            const float r = nearbyintf(t);
            a[i] = (int8_t)r;
            b[i] = (int8_t)nearbyintf((t - r) * DIGIT_SPLIT);
        }
    }
}

/* The four lanes' sums of four vectors: (sum v0, sum v1, sum v2, sum v3). */
static inline int32x4_t sum4_s32(int32x4_t v0, int32x4_t v1, int32x4_t v2, int32x4_t v3) {
    return vpaddq_s32(vpaddq_s32(v0, v1), vpaddq_s32(v2, v3));
}

/* a + b / 254 for integer sums of the two digits' products, per lane: the one
 * formula of every path (a row's result is the same bits whichever path ran it). */
static inline float32x4_t digit_value(int32x4_t a, int32x4_t b) {
    return vfmaq_n_f32(vcvtq_f32_s32(a), vcvtq_f32_s32(b), 1.0f / DIGIT_SPLIT);
}

#endif
