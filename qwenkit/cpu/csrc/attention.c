/* One decoding step of attention: one new token per row, against the static KV cache.
 *
 * For each row b and kv head j: rotate the new key (RoPE, rotate-half layout), write it and the
 * new value into the cache at the row's slot, rotate the query heads that share kv head j, and
 * attend over the row's visible slots (slot s < the row's new slot where valid[b, s], and the new
 * slot itself). Scores, softmax and the weighted sum are fp32; each cached key and value is read
 * once for all the heads of its group, not once per head.
 *
 * RoPE rounds as PyTorch's `x * cos + rotate_half(x) * sin` does in the model's dtype (a
 * rounding after each product and after the sum), so the cache holds the same keys either way;
 * so this file turns off the contraction of a * b + c into one fused multiply-add (gemv.c keeps it,
 * which its fp32 speed needs). It replaces about thirty small PyTorch ops per layer and step.
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

static inline float f32_load(const float *p, long i) { return p[i]; }
static inline float f32_round(float f) { return f; }
static inline void f32_store(float *p, long i, float f) { p[i] = f; }
static inline float bf16_load(const uint16_t *p, long i) { return bf16_to_f32(p[i]); }
static inline float bf16_round(float f) { return bf16_to_f32(f32_to_bf16(f)); }
static inline void bf16_store(uint16_t *p, long i, float f) { p[i] = f32_to_bf16(f); }

/* scores[0:n] (-inf where masked) -> e^(score - top), 0 where masked; returns their sum */
static float softmax_weights(float *scores, long n, float top) {
    vf sum = {0};
    for (long s = 0; s < n; s += 16) {
        int w = n - s < 16 ? (int)(n - s) : 16;
        vf x = {0}, e;
        memcpy(&x, scores + s, sizeof(float) * w);
        e = exp_vf(x - top);
        for (int i = 0; i < 16; i++) e[i] = i < w && x[i] != -INFINITY ? e[i] : 0.0f;
        memcpy(scores + s, &e, sizeof(float) * w);
        sum += e;
    }
    return hsum(sum);
}

/* Whether the sizes and slots are ones the kernel handles (decode.c checks with it too). */
INTERNAL int attention_sizes_ok(const int64_t *slot, long B, long H, long K, long S, long D) {
    if (B < 1 || K < 1 || H % K || D % 2 || D > 512) return 0;
    for (long b = 0; b < B; b++) if (slot[b] < 0 || slot[b] >= S) return 0;
    return 1;
}

/* q (B, H, D), k and v (B, K, D): this step's projections; cos and sin (B, D); kc and vc
 * (B, K, S, D): the layer's cache; slot (B,): where each row's new token goes; valid (B, S):
 * slots holding real tokens; out (B, H, D). NAME##_part does thread t's share of the (row, kv
 * head) pairs, for callers inside a parallel region (decode.c), and returns nonzero if it ran out
 * of memory; NAME checks the sizes (-1 if bad) and runs every share (-2 if out of memory). */
#define ATTEND(NAME, T, LOAD, VLOAD, ROUND, VROUND, STORE, VSTORE) \
INTERNAL int NAME##_part(const T *q, const T *k, const T *v, const T *cos, const T *sin, T *kc, T *vc, \
                const int64_t *slot, const uint8_t *valid, T *out, long B, long H, long K, long S, long D, \
                int t, int nt) { \
    long G = H / K, half = D / 2, per = (B * K + nt - 1) / nt; \
    long lo = t * per, hi = lo + per < B * K ? lo + per : B * K; \
    float scale = 1.0f / sqrtf((float)D); \
    int failed = 0; \
    for (long bj = lo; bj < hi; bj++) { \
        long b = bj / K, j = bj % K, s_new = slot[b]; \
        const T *cs = cos + b * D, *sn = sin + b * D; \
        T *kr = kc + (bj * S) * D, *vr = vc + (bj * S) * D; \
        long n = s_new + 1; /* this row's slots, the new one last */ \
        float *scores = malloc(sizeof(float) * G * (n + 2 * D + 1)); /* (G, n); x, acc (G, D); total (G,) */ \
        if (!scores) { failed = 1; continue; } \
        float *x = scores + G * n, *acc = x + G * D, *total = acc + G * D; \
        const T *kn = k + bj * D; /* rotate the new key into the cache; copy the value */ \
        if (half % 16 == 0) /* sixteen lanes at a time, each half apart: the same roundings */ \
            for (long d = 0; d < D; d += 16) { \
                vf r = d < half ? -VLOAD(kn + d + half) : VLOAD(kn + d - half); \
                VSTORE(kr + s_new * D + d, VROUND(VLOAD(kn + d) * VLOAD(cs + d)) + VROUND(r * VLOAD(sn + d))); \
            } \
        else \
            for (long d = 0; d < D; d++) { \
                float r = d < half ? -LOAD(kn, d + half) : LOAD(kn, d - half); \
                STORE(kr, s_new * D + d, ROUND(ROUND(LOAD(kn, d) * LOAD(cs, d)) + ROUND(r * LOAD(sn, d)))); \
            } \
        memcpy(vr + s_new * D, v + bj * D, sizeof(T) * D); \
        for (long g = 0; g < G; g++) { /* rotate the query heads that share kv head j */ \
            const T *qh = q + (b * H + j * G + g) * D; \
            float *xg = x + g * D; \
            if (half % 16 == 0) \
                for (long d = 0; d < D; d += 16) { \
                    vf r = d < half ? -VLOAD(qh + d + half) : VLOAD(qh + d - half); \
                    store_f32(xg + d, VROUND(VROUND(VLOAD(qh + d) * VLOAD(cs + d)) + VROUND(r * VLOAD(sn + d)))); \
                } \
            else \
                for (long d = 0; d < D; d++) { \
                    float r = d < half ? -LOAD(qh, d + half) : LOAD(qh, d - half); \
                    xg[d] = ROUND(ROUND(LOAD(qh, d) * LOAD(cs, d)) + ROUND(r * LOAD(sn, d))); \
                } \
        } \
        /* Scores: each cached key is read once for all G heads, 8 heads at a time in registers, \
         * sixteen lanes at a time and the lanes as a tree (hsum); one lane at a time where D is \
         * not a multiple of 16. */ \
        for (long s = 0; s < n; s++) { \
            const T *ks = kr + s * D; \
            if (s != s_new && !valid[b * S + s]) { \
                for (long g = 0; g < G; g++) scores[g * n + s] = -INFINITY; \
                continue; \
            } \
            if (D % 16) { \
                for (long g = 0; g < G; g++) { \
                    float dot = 0; \
                    for (long d = 0; d < D; d++) dot += x[g * D + d] * LOAD(ks, d); \
                    scores[g * n + s] = dot * scale; \
                } \
                continue; \
            } \
            for (long g0 = 0; g0 < G; g0 += 8) { \
                int m = G - g0 < 8 ? (int)(G - g0) : 8; \
                vf sum[8] = {{0}}; \
                for (long d = 0; d < D; d += 16) { \
                    vf kv = VLOAD(ks + d); \
                    for (int i = 0; i < m; i++) sum[i] += load_f32(x + (g0 + i) * D + d) * kv; \
                } \
                for (int i = 0; i < m; i++) scores[(g0 + i) * n + s] = hsum(sum[i]) * scale; \
            } \
        } \
        for (long g = 0; g < G; g++) { /* softmax, then the weighted sum of the values */ \
            float *sg = scores + g * n, top = -INFINITY; \
            for (long s = 0; s < n; s++) top = sg[s] > top ? sg[s] : top; \
            total[g] = softmax_weights(sg, n, top); \
        } \
        memset(acc, 0, sizeof(float) * G * D); \
        for (long s = 0; s < n; s++) { \
            const T *vs = vr + s * D; \
            for (long g = 0; g < G; g++) { \
                float p = scores[g * n + s], *ag = acc + g * D; \
                if (p == 0.0f) continue; /* a masked slot */ \
                if (D % 16 == 0) \
                    for (long d = 0; d < D; d += 16) store_f32(ag + d, load_f32(ag + d) + p * VLOAD(vs + d)); \
                else \
                    for (long d = 0; d < D; d++) ag[d] += p * LOAD(vs, d); \
            } \
        } \
        for (long g = 0; g < G; g++) { \
            T *og = out + (b * H + j * G + g) * D; \
            if (D % 16 == 0) \
                for (long d = 0; d < D; d += 16) VSTORE(og + d, load_f32(acc + g * D + d) / total[g]); \
            else \
                for (long d = 0; d < D; d++) STORE(og, d, acc[g * D + d] / total[g]); \
        } \
        free(scores); \
    } \
    return failed; \
} \
int NAME(const T *q, const T *k, const T *v, const T *cos, const T *sin, T *kc, T *vc, \
         const int64_t *slot, const uint8_t *valid, T *out, long B, long H, long K, long S, long D, int threads) { \
    if (threads < 1 || !attention_sizes_ok(slot, B, H, K, S, D)) return -1; \
    int failed = 0; \
    _Pragma("omp parallel num_threads(threads) reduction(|:failed)") \
    failed |= NAME##_part(q, k, v, cos, sin, kc, vc, slot, valid, out, B, H, K, S, D, \
                          omp_get_thread_num(), omp_get_num_threads()); \
    return failed ? -2 : 0; \
}

ATTEND(qwenkit_decode_attention_f32, float, f32_load, load_f32, f32_round, round_f32, f32_store, store_f32)
ATTEND(qwenkit_decode_attention_bf16, uint16_t, bf16_load, load_bf16, bf16_round, round_bf16, bf16_store, store_bf16)
