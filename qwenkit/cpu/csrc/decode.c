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
 * memory bandwidth. Called op by op from Python, a small model's step spends a fifth of its time
 * between the products (about twelve calls per block, each some microseconds of Python, ctypes
 * and a fork-join of the threads). Here the threads stay in one parallel region and meet at five
 * barriers per block; each does the small steps (norms, residual adds) itself (see DECODE).
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
#include "common.h"

/* The tensors of one block, in this order, PER_LAYER pointers per block (bias pointers may be NULL). */
enum { LN1, WQ, BQ, WK, BK, WV, BV, WO, LN2, WG, WU, WD, KC, VC, PER_LAYER };

/* x (B, C) += y (B, C), rounded to the dtype as PyTorch's add is */
#define ADD(LOAD, STORE) \
    for (long i = 0; i < B * C; i++) x[i] = STORE(LOAD(x[i]) + LOAD(y[i]));

/* act = silu(g) * u for columns [n0, n1) (the rows the same thread's gate and up products just
 * wrote); PyTorch's silu, x / (1 + exp(-x)), rounded to the dtype, then the rounded product.
 * Sixteen columns at a time from n0, the last block partial: the lanes are computed apart, so
 * a column's value never depends on the block it falls in. VLOAD, VSTORE and VROUND are the
 * vector forms of LOAD, STORE and LOAD(STORE()), with the same roundings. */
#define SWIGLU(LOAD, STORE, VLOAD, VSTORE, VROUND) \
    for (long m = 0; m < B; m++) \
        for (long n = m * I + n0; n < m * I + n1; n += 16) { \
            int width = m * I + n1 - n < 16 ? (int)(m * I + n1 - n) : 16; \
            if (width == 16) { \
                vf gv = VLOAD(g + n); \
                VSTORE(act + n, VROUND(gv / (1.0f + exp_vf(-gv))) * VLOAD(u + n)); \
                continue; \
            } \
            vf gv = {0}; \
            for (int i = 0; i < width; i++) gv[i] = LOAD(g[n + i]); \
            vf silu = gv / (1.0f + exp_vf(-gv)); \
            for (int i = 0; i < width; i++) act[n + i] = STORE(LOAD(STORE(silu[i])) * LOAD(u[n + i])); \
        }

/* p: L * PER_LAYER pointers; final_norm: the model's last norm's weight (C,), or NULL for none;
 * x (B, C), updated in place; cos, sin (B, D): this step's rotary tables; slot (B,), valid
 * (B, S): as attention.c's. Caches (B, K, S, D); weights (out, in).
 * Returns -1 on bad sizes, -2 out of memory.
 *
 * Each thread keeps its own copy of the residual stream and of its norm (xs, hs): the adds and
 * norms are a few microseconds, so every thread does them all, the same operations in the same
 * order and so the same values, rather than one thread doing them while the others wait at a
 * barrier on each side. Five barriers per block remain, each before a step that reads what
 * every thread wrote: attention (q, k, v), the output projection (a), the add (y), the down
 * projection (act), the add (y). */
#define DECODE(NAME, T, GEMV, ROWS, ATTEND, NORM, LOAD, STORE, VLOAD, VSTORE, VROUND) \
int NAME(void *const *p, long L, const T *final_norm, T *x, const T *cos, const T *sin, const int64_t *slot, \
         const uint8_t *valid, long B, long C, long H, long K, long S, long D, long I, float eps, int threads) { \
    if (L < 1 || B > MAX_ROWS || C < 1 || I < 1 || threads < 1 || !attention_sizes_ok(slot, B, H, K, S, D)) \
        return -1; \
    long HD = H * D, KD = K * D; \
    T *q = malloc(sizeof(T) * (B * (2 * HD + 2 * KD + C + 3 * I) + 2 * (long)threads * B * C)); \
    if (!q) return -2; \
    T *k = q + B * HD, *v = k + B * KD, *a = v + B * KD, *y = a + B * HD; \
    T *g = y + B * C, *u = g + B * I, *act = u + B * I, *own = act + B * I; \
    long *next = calloc(L * 6, sizeof(long)); /* each product's next free row (claim) */ \
    if (!next) { free(q); return -2; } \
    int failed = 0; \
    _Pragma("omp parallel num_threads(threads) reduction(|:failed)") \
    { \
        int t = omp_get_thread_num(), nt = omp_get_num_threads(); \
        T *xs = own + 2 * t * B * C, *hs = xs + B * C; \
        memcpy(xs, x, sizeof(T) * B * C); \
        for (long l = 0; l < L; l++) { \
            void *const *w = p + l * PER_LAYER; \
            long *c = next + l * 6, n0, n1; \
            NORM(xs, w[LN1], hs, B, C, eps); \
            GEMV(hs, w[WQ], NULL, w[BQ], q, B, HD, C, c, nt); \
            GEMV(hs, w[WK], NULL, w[BK], k, B, KD, C, c + 1, nt); \
            GEMV(hs, w[WV], NULL, w[BV], v, B, KD, C, c + 2, nt); \
            _Pragma("omp barrier") \
            failed |= ATTEND(q, k, v, cos, sin, w[KC], w[VC], slot, valid, a, B, H, K, S, D, t, nt); \
            _Pragma("omp barrier") \
            GEMV(a, w[WO], NULL, NULL, y, B, C, HD, c + 3, nt); \
            _Pragma("omp barrier") \
            { T *x = xs; ADD(LOAD, STORE) } \
            NORM(xs, w[LN2], hs, B, C, eps); \
            while (claim(c + 4, I, least_rows(2 * C * (long)sizeof(T)), nt, &n0, &n1)) { /* gate and up rows, \
                                                                                   then their SwiGLU */ \
                ROWS(hs, w[WG], NULL, NULL, g, B, I, C, n0, n1); \
                ROWS(hs, w[WU], NULL, NULL, u, B, I, C, n0, n1); \
                SWIGLU(LOAD, STORE, VLOAD, VSTORE, VROUND) \
            } \
            _Pragma("omp barrier") \
            GEMV(act, w[WD], NULL, NULL, y, B, C, I, c + 5, nt); \
            _Pragma("omp barrier") \
            /* no barrier after this add: y is next written by the output projection, two barriers on */ \
            { T *x = xs; ADD(LOAD, STORE) } \
        } \
        if (t == 0) memcpy(x, xs, sizeof(T) * B * C); \
    } \
    if (final_norm) NORM(x, final_norm, x, B, C, eps); /* in place: each element is read before it is written */ \
    free(next); \
    free(q); \
    return failed ? -2 : 0; \
}

DECODE(qwenkit_decode_layers_f32, float, qwenkit_gemv_f32_part, qwenkit_gemv_f32_rows, qwenkit_decode_attention_f32_part,
       qwenkit_rms_norm_f32, SAME, SAME, load_f32, store_f32, round_f32)
DECODE(qwenkit_decode_layers_bf16, uint16_t, qwenkit_gemv_bf16_part, qwenkit_gemv_bf16_rows,
       qwenkit_decode_attention_bf16_part,
       qwenkit_rms_norm_bf16, bf16_to_f32, f32_to_bf16, load_bf16, store_bf16, round_bf16)
