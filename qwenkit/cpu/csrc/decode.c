/* One decoding step through a whole stack of Qwen2 blocks, in one call and one parallel region.
 *
 * Per block, for B rows of one new token each (x, the residual stream, updated in place):
 *     h = rms_norm(x); q, k, v = h Wq + bq, h Wk + bk, h Wv + bv
 *     a = attention(q, k, v) (RoPE, the cache write; attention.c)
 *     x = x + a Wo; h = rms_norm(x); x = x + (silu(h Wg) * (h Wu)) Wd
 * with gemv.c's products, attention.c's attention and norm.c's norm, so every value is rounded as
 * on the path of one call per kernel, and a batched step equals its rows alone, bit for bit.
 *
 * Decoding reads every weight once per token, so its time should be the weights' bytes over the
 * memory bandwidth. Called op by op from Python, a small model's step spends much of its time
 * between the products (about twelve calls per block, each some microseconds of Python, ctypes
 * and a fork-join of the threads). Here the threads stay in one parallel region and meet at five
 * barriers per block; each does the small steps (norms, residual adds) itself (see step_thread).
 */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "qwenkit.h"
#include "common.h"

#define PRODUCTS 6 /* per block: q, k, v, o, gate and up (together), down */

/* x (n,) += y (n,), rounded to the dtype as PyTorch's add is */
static ALWAYS_INLINE void add(void *x, const void *y, long n, enum dtype dt) {
    for (long i = 0; i < n; i++) store(x, i, load(x, i, dt) + load(y, i, dt), dt);
}

/* act = silu(g) * u for columns [n0, n1) of g, u, act (B, I) (the rows the same thread's gate and
 * up products just wrote); PyTorch's silu, x / (1 + exp(-x)), rounded to the dtype, then the
 * rounded product. Sixteen columns at a time from n0, the last block partial: the lanes are
 * computed apart, so a column's value never depends on the block it falls in. */
static ALWAYS_INLINE void swiglu(void *act, const void *g, const void *u, long B, long I, long n0, long n1,
                                 enum dtype dt) {
    for (long m = 0; m < B; m++)
        for (long n = m * I + n0; n < m * I + n1; n += 16) {
            int width = m * I + n1 - n < 16 ? (int)(m * I + n1 - n) : 16;
            if (width == 16) {
                vf gv = vload(g, n, dt);
                vstore(act, n, vround(gv / (1.0f + exp_vf(-gv)), dt) * vload(u, n, dt), dt);
                continue;
            }
            vf gv = {0};
            for (int i = 0; i < width; i++) gv[i] = load(g, n + i, dt);
            vf silu = gv / (1.0f + exp_vf(-gv));
            for (int i = 0; i < width; i++) store(act, n + i, round_to(silu[i], dt) * load(u, n + i, dt), dt);
        }
}

/* A step's scratch, shared by its threads: q (B, H*D), k and v (B, K*D), a (B, H*D), y (B, C),
 * g, u and act (B, I); own: each thread's copy of the residual stream and of its norm (B, C);
 * qx: each thread's room (qx_stride bytes) for a product's input quantized (quant.c) */
struct scratch {
    void *q, *k, *v, *a, *y, *g, *u, *act, *own;
    char *qx;
    long qx_stride;
};

/* A weight's type: the activations' where the stack has no types (every weight in dt) */
static ALWAYS_INLINE int weight_type(const int32_t *types, long l, int i, enum dtype dt) {
    return types ? types[l * BLOCK_TENSORS + i] : (int)dt;
}
/* Whether a product's input must be quantized first: a block format other than F16 */
static ALWAYS_INLINE int integer_input(int wt, enum dtype dt) { return wt != (int)dt && wt != F16; }

/* y = x w^T (+ b) for one projection, x (M, K) in dt, its rows of output claimed from *next: the
 * weights in dt (gemv.c) or in a block format (quant.c, with qx the input quantized) */
static ALWAYS_INLINE void project(const void *x, const struct qx *qx, const void *w, int wt, const void *b, void *y,
                                  long M, long N, long K, long *next, int nt, enum dtype dt) {
    if (wt == (int)dt)
        gemv_part(x, w, NULL, b, y, M, N, K, next, nt, dt);
    else
        qgemv_part(qx, x, dt, w, wt, b, y, M, N, K, next, nt);
}

/* Thread t of nt's part of the step through L blocks.
 *
 * Each thread keeps its own copy of the residual stream and of its norm (xs, hs): the adds and
 * norms are a few microseconds, so every thread does them all, the same operations in the same
 * order and so the same values, rather than one thread doing them while the others wait at a
 * barrier on each side. Five barriers per block remain, each before a step that reads what
 * every thread wrote: attention (q, k, v), the output projection (a), the add (y), the down
 * projection (act), the add (y). next: L * PRODUCTS counters, each product's next free row (claim).
 * Returns nonzero if attention ran out of memory. */
static ALWAYS_INLINE int step_thread(void *const *p, const int32_t *types, long L, void *x, const void *cos,
                                     const void *sin,
                                     const int64_t *slot, const uint8_t *valid, long B, long C, long H, long K, long S,
                                     long D, long I, float eps, const struct scratch *s, long *next, int t, int nt,
                                     enum dtype dt) {
    long HD = H * D, KD = K * D;
    void *xs = at(s->own, 2 * t * B * C, dt), *hs = at(xs, B * C, dt);
    void *qmem = s->qx + t * s->qx_stride;
    struct qx qx = {0};
    int failed = 0;
    memcpy(xs, x, dtype_size(dt) * B * C);
    for (long l = 0; l < L; l++) {
        void *const *w = p + l * BLOCK_TENSORS;
        long *c = next + l * PRODUCTS, n0, n1;
        int tq = weight_type(types, l, Q_PROJ, dt), tk = weight_type(types, l, K_PROJ, dt);
        int tv = weight_type(types, l, V_PROJ, dt), to = weight_type(types, l, O_PROJ, dt);
        int tg = weight_type(types, l, GATE_PROJ, dt), tu = weight_type(types, l, UP_PROJ, dt);
        int td = weight_type(types, l, DOWN_PROJ, dt);
        /* each thread quantizes a product's input itself, the same values as every other thread
         * (a microsecond or so), rather than meet at a barrier */
        rms_norm(xs, w[INPUT_LAYERNORM], hs, B, C, eps, dt);
        if (integer_input(tq, dt) || integer_input(tk, dt) || integer_input(tv, dt))
            qx = quantize_x(hs, dt, B, C, qmem);
        project(hs, &qx, w[Q_PROJ], tq, w[Q_BIAS], s->q, B, HD, C, c, nt, dt);
        project(hs, &qx, w[K_PROJ], tk, w[K_BIAS], s->k, B, KD, C, c + 1, nt, dt);
        project(hs, &qx, w[V_PROJ], tv, w[V_BIAS], s->v, B, KD, C, c + 2, nt, dt);
#pragma omp barrier
        failed |= attention_part(s->q, s->k, s->v, cos, sin, w[K_CACHE], w[V_CACHE], slot, valid, s->a, B, H, K, S, D,
                                 t, nt, dt);
#pragma omp barrier
        if (integer_input(to, dt)) qx = quantize_x(s->a, dt, B, HD, qmem);
        project(s->a, &qx, w[O_PROJ], to, NULL, s->y, B, C, HD, c + 3, nt, dt);
#pragma omp barrier
        add(xs, s->y, B * C, dt);
        rms_norm(xs, w[POST_ATTENTION_LAYERNORM], hs, B, C, eps, dt);
        /* gate and up rows, then their SwiGLU */
        if (integer_input(tg, dt) || integer_input(tu, dt)) qx = quantize_x(hs, dt, B, C, qmem);
        long gate_bytes = tg == (int)dt ? C * dtype_size(dt) : quant_row_bytes(tg, C);
        while (quant_claim(c + 4, (tg | tu) & PACKED, I, 2 * gate_bytes, nt, &n0, &n1)) {
            if (tg == (int)dt)
                gemv_rows(hs, w[GATE_PROJ], NULL, NULL, s->g, B, I, C, n0, n1, dt);
            else
                qgemv_rows(&qx, hs, dt, w[GATE_PROJ], tg, NULL, s->g, B, I, C, n0, n1);
            if (tu == (int)dt)
                gemv_rows(hs, w[UP_PROJ], NULL, NULL, s->u, B, I, C, n0, n1, dt);
            else
                qgemv_rows(&qx, hs, dt, w[UP_PROJ], tu, NULL, s->u, B, I, C, n0, n1);
            swiglu(s->act, s->g, s->u, B, I, n0, n1, dt);
        }
#pragma omp barrier
        if (integer_input(td, dt)) qx = quantize_x(s->act, dt, B, I, qmem);
        project(s->act, &qx, w[DOWN_PROJ], td, NULL, s->y, B, C, I, c + 5, nt, dt);
#pragma omp barrier
        /* no barrier after this add: y is next written by the output projection, two barriers on */
        add(xs, s->y, B * C, dt);
    }
    if (t == 0) memcpy(x, xs, dtype_size(dt) * B * C);
    return failed;
}

static int decode_layers(void *const *p, const int32_t *types, long L, const void *final_norm, void *x,
                         const void *cos, const void *sin, const int64_t *slot, const uint8_t *valid, long B, long C,
                         long H, long K, long S, long D, long I, float eps, int threads, enum dtype dt) {
    if (L < 1 || B > MAX_ROWS || C < 1 || I < 1 || threads < 1 || !attention_sizes_ok(slot, B, H, K, S, D))
        return -1;
    static const int products[] = {Q_PROJ, K_PROJ, V_PROJ, O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ};
    static const int inputs[] = {0, 0, 0, 1, 0, 0, 2}; /* C, H*D or I: the product's K */
    for (long l = 0; types && l < L; l++)
        for (int i = 0; i < 7; i++) {
            int wt = types[l * BLOCK_TENSORS + products[i]];
            long k = inputs[i] == 0 ? C : inputs[i] == 1 ? H * D : I;
            if (wt != (int)dt && quant_row_bytes(wt, k) == 0) return -1; /* a type or width quant.c does not take */
        }
    long widest = C > I ? C : I;
    widest = widest > H * D ? widest : H * D;
    long qx_stride = (qx_bytes(B, widest) + 63) / 64 * 64;
    char *qx_mem = types ? malloc(qx_stride * threads) : NULL;
    if (types && !qx_mem) return -2;
    long HD = H * D, KD = K * D;
    void *q = malloc(dtype_size(dt) * (B * (2 * HD + 2 * KD + C + 3 * I) + 2 * (long)threads * B * C));
    if (!q) return -2;
    void *k = at(q, B * HD, dt), *v = at(k, B * KD, dt), *a = at(v, B * KD, dt), *y = at(a, B * HD, dt);
    void *g = at(y, B * C, dt), *u = at(g, B * I, dt), *act = at(u, B * I, dt), *own = at(act, B * I, dt);
    struct scratch s = {q, k, v, a, y, g, u, act, own, qx_mem, qx_stride};
    long *next = calloc(L * PRODUCTS, sizeof(long));
    if (!next) {
        free(q);
        free(qx_mem);
        return -2;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        /* OpenMP outlines this region before the compiler has made dt a constant in it: each
         * branch names its constant, so step_thread is specialized all the same */
        if (dt == F32)
            failed |= step_thread(p, types, L, x, cos, sin, slot, valid, B, C, H, K, S, D, I, eps, &s, next, t, nt,
                                  F32);
        else
            failed |= step_thread(p, types, L, x, cos, sin, slot, valid, B, C, H, K, S, D, I, eps, &s, next, t, nt,
                                  BF16);
    }
    if (final_norm) rms_norm(x, final_norm, x, B, C, eps, dt); /* in place: each element is read before it is written */
    free(next);
    free(q);
    free(qx_mem);
    return failed ? -2 : 0;
}

int qwenkit_decode_layers_f32(void *const *p, const int32_t *types, long L, const float *final_norm, float *x,
                              const float *cos, const float *sin, const int64_t *slot, const uint8_t *valid, long B,
                              long C, long H, long K, long S, long D, long I, float eps, int threads) {
    return decode_layers(p, types, L, final_norm, x, cos, sin, slot, valid, B, C, H, K, S, D, I, eps, threads, F32);
}
int qwenkit_decode_layers_bf16(void *const *p, const int32_t *types, long L, const uint16_t *final_norm, uint16_t *x,
                               const uint16_t *cos, const uint16_t *sin, const int64_t *slot, const uint8_t *valid,
                               long B, long C, long H, long K, long S, long D, long I, float eps, int threads) {
    return decode_layers(p, types, L, final_norm, x, cos, sin, slot, valid, B, C, H, K, S, D, I, eps, threads, BF16);
}
