/* One decode token's half-layer in one call: the attention half (RMSNorm, the QKV
 * product, rotary + cache write + attention, the output product) or the MLP half
 * (RMSNorm, the gate/up product, silu(gate) * up, the down product), for one row.
 *
 * Each step is the kernel of its own file (included here: one library, no calls
 * between libraries), run in the same order as the op-by-op path of
 * tpi/model/layers.py. What this saves is everything between them: a SmolLM2
 * layer took ~80 us of Python and torch dispatch around its five kernels (norms,
 * views, slicing, output allocations, the activation, ctypes argument checks),
 * 2.4 ms of a 9 ms int8 token.
 *
 * A product's weight is described by a Mat (kind, pointers, shape); the caller
 * (tpi/model/fused_decode.py) makes them from its weight formats.
 */

#include "decode_ops.c"
#include "int4_matmul.c"
#include "small_matmul.c"

enum { MAT_F32 = 1, MAT_INT8 = 2, MAT_INT4 = 3 };

typedef struct {
    int64_t kind;
    const void* w;      /* float32 (N, K); int8 (N, K); int4 packed (N, K / 2) */
    const void* scale;  /* int8: N bfloat16 scales; int4: scale_zero (K / g, N, 2) */
    const float* bias;  /* N, or NULL */
    int64_t n, k, group;
} Mat;

/* y (n) = x (k) @ w.T (+ bias); 0 when done. */
static int mat_apply(const Mat* m, const float* x, float* y) {
    int rc = 0;
    if (m->kind == MAT_F32)
        tpi_matmul_f32(x, 1, m->k, (const float*)m->w, m->n, y);
    else if (m->kind == MAT_INT8)
        rc = tpi_matmul_i8(x, 1, m->k, (const int8_t*)m->w, (const uint16_t*)m->scale, m->n, y);
    else if (m->kind == MAT_INT4)
        rc = tpi_matmul_i4(x, 1, m->k, (const uint8_t*)m->w, (const uint16_t*)m->scale, m->group,
                           m->n, y);
    else
        rc = -2;
    if (rc == 0 && m->bias)
        for (int64_t i = 0; i < m->n; i++) y[i] += m->bias[i];
    return rc;
}

/* out (hidden) = this rank's attention output for the token h (hidden) at `pos`. */
int tpi_attention_half(const float* h, int64_t hidden, const float* norm, float eps,
                       const Mat* qkv, const Mat* o, const float* cos_, const float* ssin,
                       int64_t rot, float* kcache, float* vcache, int64_t cap, int64_t pos,
                       int64_t nq, int64_t nkv, int64_t hd, float scale, float* out) {
    float* x = malloc(sizeof(float) * (size_t)(hidden + qkv->n + nq * hd));
    if (!x) return -1;
    float* q = x + hidden;
    float* att = q + qkv->n;
    tpi_rms_norm_f32(h, 1, hidden, norm, eps, x);
    int rc = mat_apply(qkv, x, q);
    if (rc == 0)
        rc = tpi_attend_one_f32(q, cos_, ssin, rot, kcache, vcache, cap, pos, nq, nkv, hd, scale,
                                att);
    if (rc == 0) rc = mat_apply(o, att, out);
    free(x);
    return rc;
}

/* out (hidden) = this rank's MLP output for the token h (hidden): gate rows first
 * in gu (2 * columns rows). */
int tpi_mlp_half(const float* h, int64_t hidden, const float* norm, float eps, const Mat* gu,
                 const Mat* down, float* out) {
    const int64_t f = gu->n / 2;
    float* x = malloc(sizeof(float) * (size_t)(hidden + gu->n + f));
    if (!x) return -1;
    float* g = x + hidden;
    float* a = g + gu->n;
    tpi_rms_norm_f32(h, 1, hidden, norm, eps, x);
    int rc = mat_apply(gu, x, g);
    if (rc == 0) {
        silu_mul(g, g + f, f, a);
        rc = mat_apply(down, a, out);
    }
    free(x);
    return rc;
}
