/* The small per-layer operations of a decode step, in float32, each one call.
 *
 * A decode step's layer is two matmul groups and a dozen small torch ops around
 * them: the norms, rotary embedding, the cache write, the attention of one query
 * row against the cache, reshapes between them. On one row each of those ops
 * costs torch's dispatch (5-30 us) for a few microseconds of arithmetic; SmolLM2
 * spends more time there than in its attention arithmetic. Here they are loops.
 *
 *   tpi_rms_norm_f32     rows of x normalised by their root mean square, times w
 *   tpi_attend_one_f32   one token of one sequence: rotary on its q and k heads,
 *                        k and v written to the cache at `pos`, softmax attention of
 *                        every q head over cache positions [0, pos] of its KV head
 *
 * Results equal torch's up to float rounding (sums in another order):
 * tests/test_decode_ops.py holds them to float64 references.
 * Built at first use by tpi/kernels/build.py, as small_matmul.c.
 */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

typedef float v16f __attribute__((vector_size(64)));

static inline float hsum16(v16f v) {
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}

/* sum of a[i] * b[i] for i < n (n a multiple of 16 takes the vector loop only) */
static inline float dot(const float* a, const float* b, int64_t n) {
    v16f acc = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        v16f x, y;
        __builtin_memcpy(&x, a + i, 64);
        __builtin_memcpy(&y, b + i, 64);
        acc += x * y;
    }
    float s = hsum16(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

void tpi_rms_norm_f32(const float* x, int64_t M, int64_t K, const float* w, float eps,
                      float* out) {
    for (int64_t m = 0; m < M; m++) {
        const float* r = x + m * K;
        float* o = out + m * K;
        float inv = 1.0f / sqrtf(dot(r, r, K) / (float)K + eps);
        for (int64_t k = 0; k < K; k++) o[k] = r[k] * inv * w[k];
    }
}

/* Rotate the first `rot` dims of x (rotate-half layout) into out; the rest is copied.
 * ssin holds [-sin, +sin] halves, as tpi.model.rope's tables. */
static void rotary(const float* x, const float* cos_, const float* ssin, int64_t rot, int64_t hd,
                   float* out) {
    int64_t half = rot / 2;
    for (int64_t d = 0; d < half; d++) out[d] = x[d] * cos_[d] + x[d + half] * ssin[d];
    for (int64_t d = half; d < rot; d++) out[d] = x[d] * cos_[d] + x[d - half] * ssin[d];
    for (int64_t d = rot; d < hd; d++) out[d] = x[d];
}

/* qkv: this token's projections, nq query heads then nkv key heads then nkv value
 * heads, hd each. kcache/vcache: this layer's (nkv, cap, hd). out: (nq * hd). */
int tpi_attend_one_f32(const float* qkv, const float* cos_, const float* ssin, int64_t rot,
                       float* kcache, float* vcache, int64_t cap, int64_t pos, int64_t nq,
                       int64_t nkv, int64_t hd, float scale, float* out) {
    const float* q = qkv;
    const float* k = qkv + nq * hd;
    const float* v = qkv + (nq + nkv) * hd;
    for (int64_t g = 0; g < nkv; g++) {
        rotary(k + g * hd, cos_, ssin, rot, hd, kcache + (g * cap + pos) * hd);
        for (int64_t d = 0; d < hd; d++) vcache[(g * cap + pos) * hd + d] = v[g * hd + d];
    }
    int64_t S = pos + 1, group = nq / nkv;
    /* Below ~256K multiply-adds one thread is faster than a fork and join. */
    int T = S * nq * hd > (1 << 18) ? omp_get_max_threads() : 1;
    float* bufs = malloc(sizeof(float) * (S + hd) * T);  /* scores and rotated q, per thread */
    if (!bufs) return -1;
#pragma omp parallel num_threads(T)
    {
        float* buf = bufs + (S + hd) * omp_get_thread_num();
        float* qr = buf + S;
#pragma omp for schedule(static)
        for (int64_t h = 0; h < nq; h++) {
            const float* kh = kcache + (h / group) * cap * hd;
            const float* vh = vcache + (h / group) * cap * hd;
            float* scores = buf;
            rotary(q + h * hd, cos_, ssin, rot, hd, qr);
            float mx = -INFINITY;
            for (int64_t s = 0; s < S; s++) {
                scores[s] = dot(qr, kh + s * hd, hd) * scale;
                if (scores[s] > mx) mx = scores[s];
            }
            float sum = 0.0f;
            for (int64_t s = 0; s < S; s++) {
                scores[s] = expf(scores[s] - mx);
                sum += scores[s];
            }
            float inv = 1.0f / sum;
            float* o = out + h * hd;
            for (int64_t d = 0; d < hd; d++) o[d] = 0.0f;
            for (int64_t s = 0; s < S; s++) {
                float p = scores[s] * inv;
                const float* vs = vh + s * hd;
                for (int64_t d = 0; d < hd; d++) o[d] += p * vs[d];
            }
        }
    }
    free(bufs);
    return 0;
}
