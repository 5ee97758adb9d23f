/* The small per-layer operations of a decode step, in float32, each one call (and
 * two of them for a prompt's rows: the activation, and the attention).
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
 *   tpi_silu_mul_f32     silu(gate) * up, row by row
 *   tpi_attend_rows_f32  the same attention for each row of a prompt (its rotary and
 *                        cache write already done), causal: what a decode step at
 *                        each row's position would compute
 *
 * Results equal torch's up to float rounding (sums in another order):
 * tests/test_decode_ops.py holds them to float64 references.
 * Built at first use by tpi/kernels/build.py, as small_matmul.c.
 */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "vectors.h"

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
    float s = hsum(acc);
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

/* v[i] = exp(v[i] - shift) for v[i] - shift <= 87 (softmax: shift >= every v[i];
 * silu_mul: shift 0), in a loop the compiler vectorizes: libm's scalar expf, one
 * call per cached position and head, took most of a SmolLM2 attention call.
 * Cephes' expf: n = round(x / ln 2), exp(x) = 2^n * p(r) with r = x - n ln 2 in two
 * parts and a degree-7 polynomial; within 2 ulp of expf. */
static void exp_shifted(float* v, int64_t n, float shift) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    for (int64_t i = 0; i < n; i++) {
        float x = v[i] - shift;
        x = x < -87.0f ? -87.0f : x; /* below, 2^n leaves the normal range (exp ~ 0) */
        float t = x * 1.44269504088896341f + magic;
        float fn = t - magic;
        float r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        p = p * r * r + r + 1.0f;
        int32_t bits;
        __builtin_memcpy(&bits, &t, 4);
        bits = (bits - 0x4B400000 + 127) << 23; /* 2^n as a float's bits */
        float scale;
        __builtin_memcpy(&scale, &bits, 4);
        v[i] = p * scale;
    }
}

/* silu(g) * u, silu(g) = g / (1 + exp(-g)) with exp_shifted (a loop the compiler
 * vectorizes; libm's expf, one call per column, cost more than the down product's
 * conversions). -g is clamped where exp(-g) would overflow: the quotient is then 0
 * (to float precision) either way. */
static void silu_mul(const float* g, const float* u, int64_t n, float* out) {
    for (int64_t i = 0; i < n; i++) out[i] = g[i] < -87.0f ? 87.0f : -g[i];
    exp_shifted(out, n, 0.0f);
    for (int64_t i = 0; i < n; i++) out[i] = g[i] / (1.0f + out[i]) * u[i];
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

/* exp(scores - max) in place; returns the max and sets *sum to their sum. */
static inline float exp_in_place(float* scores, int64_t n, float* sum) {
    float mx = -INFINITY;
    for (int64_t s = 0; s < n; s++) mx = scores[s] > mx ? scores[s] : mx;
    exp_shifted(scores, n, mx);
    float t = 0.0f;
    for (int64_t s = 0; s < n; s++) t += scores[s];
    *sum = t;
    return mx;
}

/* One chunk of cached positions [s0, s1) for some query heads: per head, the
 * largest score, the sum of exp(score - largest) and those weights times V
 * (unnormalised). Chunks of every head are merged by `merge`. */
typedef struct {
    float* acc; /* (heads, hd) */
    float* mx;  /* (heads) */
    float* sum; /* (heads) */
} Partial;

/* One head against its KV head's positions [s0, s1). */
static void head_any(const float* q, const float* kh, const float* vh, int64_t s0, int64_t s1,
                     int64_t hd, float scale, float* scores, Partial p, int64_t t) {
    const int64_t n = s1 - s0;
    for (int64_t s = 0; s < n; s++) scores[s] = dot(q, kh + (s0 + s) * hd, hd) * scale;
    p.mx[t] = exp_in_place(scores, n, &p.sum[t]);
    float* out = p.acc + t * hd;
    for (int64_t d = 0; d < hd; d++) out[d] = 0.0f;
    for (int64_t s = 0; s < n; s++)
        for (int64_t d = 0; d < hd; d++) out[d] += scores[s] * vh[(s0 + s) * hd + d];
}

/* The heads of one KV head at a head size known here: each key and value row is
 * read once for all of them (at SmolLM2's sizes re-reading them per head made the
 * call bound by the L2 cache), and their dot products run side by side. */
#define MAX_GROUP 8
#define GROUP_FIXED(HD)                                                                    \
    static void group##HD(const float* q, int64_t r, const float* kh, const float* vh,    \
                          int64_t s0, int64_t s1, float scale, float* scores, Partial p) { \
        enum { V = HD / 16 };                                                              \
        const int64_t n = s1 - s0;                                                         \
        v16f qv[MAX_GROUP][V];                                                             \
        for (int64_t t = 0; t < r; t++)                                                    \
            for (int j = 0; j < V; j++) __builtin_memcpy(&qv[t][j], q + t * HD + 16 * j, 64); \
        for (int64_t s = 0; s < n; s++) {                                                  \
            v16f k[V];                                                                     \
            for (int j = 0; j < V; j++)                                                    \
                __builtin_memcpy(&k[j], kh + (s0 + s) * HD + 16 * j, 64);                  \
            for (int64_t t = 0; t < r; t++) {                                              \
                v16f a = qv[t][0] * k[0];                                                  \
                for (int j = 1; j < V; j++) a += qv[t][j] * k[j];                          \
                scores[t * n + s] = hsum(a) * scale;                                       \
            }                                                                              \
        }                                                                                  \
        for (int64_t t = 0; t < r; t++) p.mx[t] = exp_in_place(scores + t * n, n, &p.sum[t]); \
        v16f acc[MAX_GROUP][V];                                                            \
        for (int64_t t = 0; t < r; t++)                                                    \
            for (int j = 0; j < V; j++) acc[t][j] = (v16f){0};                             \
        for (int64_t s = 0; s < n; s++) {                                                  \
            v16f x[V];                                                                     \
            for (int j = 0; j < V; j++)                                                    \
                __builtin_memcpy(&x[j], vh + (s0 + s) * HD + 16 * j, 64);                  \
            for (int64_t t = 0; t < r; t++) {                                              \
                const float w = scores[t * n + s];                                         \
                for (int j = 0; j < V; j++) acc[t][j] += w * x[j];                         \
            }                                                                              \
        }                                                                                  \
        for (int64_t t = 0; t < r; t++)                                                    \
            for (int j = 0; j < V; j++)                                                    \
                __builtin_memcpy(p.acc + t * HD + 16 * j, &acc[t][j], 64);                 \
    }

GROUP_FIXED(64)
GROUP_FIXED(128)

/* out = the softmax-weighted sum over all chunks: each chunk's weights rescaled
 * from its own largest score to the overall largest (flash-decoding's merge). */
static void merge(const float* acc, const float* mx, const float* sum, int64_t chunks,
                  int64_t heads, int64_t hd, float* out) {
    for (int64_t t = 0; t < heads; t++) {
        float m = -INFINITY;
        for (int64_t c = 0; c < chunks; c++) m = mx[c * heads + t] > m ? mx[c * heads + t] : m;
        float total = 0.0f;
        for (int64_t d = 0; d < hd; d++) out[t * hd + d] = 0.0f;
        for (int64_t c = 0; c < chunks; c++) {
            const float w = expf(mx[c * heads + t] - m);
            total += w * sum[c * heads + t];
            const float* a = acc + (c * heads + t) * hd;
            for (int64_t d = 0; d < hd; d++) out[t * hd + d] += w * a[d];
        }
        const float inv = 1.0f / total;
        for (int64_t d = 0; d < hd; d++) out[t * hd + d] *= inv;
    }
}

/* Cached positions per unit of work. A fixed size, not one per thread: a token's
 * result is then the same whatever the number of threads. */
#define CHUNK_POSITIONS 64

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
    const int64_t S = pos + 1, group = nq / nkv;
    const int64_t chunks = (S + CHUNK_POSITIONS - 1) / CHUNK_POSITIONS, units = nkv * chunks;
    /* The cache rows come from DRAM (a token's weights stream through the caches
     * between two reads of a layer's cache), so a second thread pays once they
     * pass ~64 KB: SmolLM2 at 200 positions, 300 KB a layer, took 33 us on one. */
    int T = S * nkv * hd >= (1 << 13) ? omp_get_max_threads() : 1;
    if (T > units) T = (int)units;
    /* per thread: a group's scores and its rotated queries; per unit: a Partial */
    const int64_t per = (CHUNK_POSITIONS + hd) * group;
    float* bufs = malloc(sizeof(float) * (per * T + units * group * (hd + 2)));
    if (!bufs) return -1;
    float* accs = bufs + per * T;
    float* mxs = accs + units * group * hd;
    float* sums = mxs + units * group;
    const int fixed = (hd == 64 || hd == 128) && group <= MAX_GROUP;
#pragma omp parallel num_threads(T)
    {
        float* scores = bufs + per * omp_get_thread_num();
        float* qr = scores + CHUNK_POSITIONS * group;
        int64_t rotated = -1; /* the KV head whose queries qr holds */
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; u++) {
            const int64_t g = u / chunks, c = u % chunks;
            const int64_t s0 = c * CHUNK_POSITIONS;
            const int64_t s1 = s0 + CHUNK_POSITIONS < S ? s0 + CHUNK_POSITIONS : S;
            const float* kh = kcache + g * cap * hd;
            const float* vh = vcache + g * cap * hd;
            if (rotated != g) {
                for (int64_t t = 0; t < group; t++)
                    rotary(q + (g * group + t) * hd, cos_, ssin, rot, hd, qr + t * hd);
                rotated = g;
            }
            /* chunk-major within a KV head: merge reads (chunk, head) */
            Partial p = {accs + (g * chunks + c) * group * hd, mxs + (g * chunks + c) * group,
                         sums + (g * chunks + c) * group};
            if (fixed && hd == 64) group64(qr, group, kh, vh, s0, s1, scale, scores, p);
            else if (fixed) group128(qr, group, kh, vh, s0, s1, scale, scores, p);
            else
                for (int64_t t = 0; t < group; t++)
                    head_any(qr + t * hd, kh, vh, s0, s1, hd, scale, scores, p, t);
        }
    }
    for (int64_t g = 0; g < nkv; g++)
        merge(accs + g * chunks * group * hd, mxs + g * chunks * group, sums + g * chunks * group,
              chunks, group, hd, out + g * group * hd);
    free(bufs);
    return 0;
}

/* The rows of a prompt (or of a sequence's rows in a batch), already rotated, each
 * against the cache as a decode step would see it: row t at position pos + t
 * attends to positions [0, pos + t]. q: (T, nq * hd) with row stride qstride;
 * kcache/vcache: (nkv, cap, hd), holding positions [0, pos + T); out: (T, nq * hd).
 *
 * torch's fused attention took ~0.4 ms a SmolLM2 layer at 128 rows, for ~20 MFLOP:
 * at these sizes its blocking and the mask's conversion to a float bias cost more
 * than the arithmetic, and it computes the masked half too. Here each (KV head,
 * row) is one unit of the decode kernel's work, over the positions the row sees. */
int tpi_attend_rows_f32(const float* q, int64_t qstride, int64_t T, const float* kcache,
                        const float* vcache, int64_t cap, int64_t pos, int64_t nq, int64_t nkv,
                        int64_t hd, float scale, float* out) {
    const int64_t group = nq / nkv, units = nkv * T;
    const int64_t most = (pos + T + CHUNK_POSITIONS - 1) / CHUNK_POSITIONS;
    const int fixed = (hd == 64 || hd == 128) && group <= MAX_GROUP;
    /* per thread: a chunk's scores, and every chunk's partial of one row */
    const int64_t per = CHUNK_POSITIONS * group + most * group * (hd + 2);
    int T_ = omp_get_max_threads();
    if (T_ > units) T_ = (int)units;
    float* bufs = malloc(sizeof(float) * per * T_);
    if (!bufs) return -1;
#pragma omp parallel num_threads(T_)
    {
        float* scores = bufs + per * omp_get_thread_num();
        float* accs = scores + CHUNK_POSITIONS * group;
        float* mxs = accs + most * group * hd;
        float* sums = mxs + most * group;
        /* Row t costs pos + t positions: rows dealt round-robin balance the threads. */
#pragma omp for schedule(static, 1)
        for (int64_t u = 0; u < units; u++) {
            const int64_t t = u / nkv, g = u % nkv, S = pos + t + 1;
            const int64_t chunks = (S + CHUNK_POSITIONS - 1) / CHUNK_POSITIONS;
            const float* qg = q + t * qstride + g * group * hd;
            const float* kh = kcache + g * cap * hd;
            const float* vh = vcache + g * cap * hd;
            for (int64_t c = 0; c < chunks; c++) {
                const int64_t s0 = c * CHUNK_POSITIONS;
                const int64_t s1 = s0 + CHUNK_POSITIONS < S ? s0 + CHUNK_POSITIONS : S;
                Partial p = {accs + c * group * hd, mxs + c * group, sums + c * group};
                if (fixed && hd == 64) group64(qg, group, kh, vh, s0, s1, scale, scores, p);
                else if (fixed) group128(qg, group, kh, vh, s0, s1, scale, scores, p);
                else
                    for (int64_t h = 0; h < group; h++)
                        head_any(qg + h * hd, kh, vh, s0, s1, hd, scale, scores, p, h);
            }
            merge(accs, mxs, sums, chunks, group, hd, out + t * nq * hd + g * group * hd);
        }
    }
    free(bufs);
    return 0;
}

/* silu(gate) * up for T rows: gate and up rows of n at the same row stride (the two
 * halves of a fused gate/up product), out (T, n). torch takes two passes and a
 * temporary for it: 2.7 + 1.7 ms of a 128-token SmolLM2 prompt. */
void tpi_silu_mul_f32(const float* g, const float* u, int64_t stride, int64_t T, int64_t n,
                      float* out) {
    const int T_ = T * n >= (1 << 15) ? omp_get_max_threads() : 1;
#pragma omp parallel for num_threads(T_) schedule(static)
    for (int64_t t = 0; t < T; t++) silu_mul(g + t * stride, u + t * stride, n, out + t * n);
}
