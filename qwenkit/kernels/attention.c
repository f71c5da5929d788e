/* One decoding step of attention: one new token per row, against the static KV cache.
 *
 * For each row b and kv head j: rotate the new key (RoPE, rotate-half layout), write it and the
 * new value into the cache at the row's slot, then for each query head that shares kv head j,
 * rotate the query and attend over the row's visible slots (slot s < the row's new slot where
 * valid[b, s], and the new slot itself). Scores, softmax and the weighted sum are fp32.
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

/* dot(x, y[0:D]) in fp32, sixteen lanes at a time where D allows */
#define DOT(NAME, T, LOAD, TO_F32) \
static inline float NAME(const float *x, const T *y, long D) { \
    float s = 0; \
    if (D % 16 == 0) { \
        vf a = {0}; \
        for (long d = 0; d < D; d += 16) a += load_f32(x + d) * LOAD(y + d); \
        return hsum(a); \
    } \
    for (long d = 0; d < D; d++) s += x[d] * TO_F32(y[d]); \
    return s; \
}
DOT(dot_f32, float, load_f32, SAME)
DOT(dot_bf16, uint16_t, load_bf16, bf16_to_f32)

static inline float f32_load(const float *p, long i) { return p[i]; }
static inline float f32_round(float f) { return f; }
static inline void f32_store(float *p, long i, float f) { p[i] = f; }
static inline float bf16_load(const uint16_t *p, long i) { return bf16_to_f32(p[i]); }
static inline float bf16_round(float f) { return bf16_to_f32(f32_to_bf16(f)); }
static inline void bf16_store(uint16_t *p, long i, float f) { p[i] = f32_to_bf16(f); }

/* q (B, H, D), k and v (B, K, D): this step's projections; cos and sin (B, D); kc and vc
 * (B, K, S, D): the layer's cache; slot (B,): where each row's new token goes; valid (B, S):
 * slots holding real tokens; out (B, H, D). Returns -1 on bad sizes. */
#define ATTEND(NAME, T, LOAD, ROUND, STORE, DOT) \
int NAME(const T *q, const T *k, const T *v, const T *cos, const T *sin, T *kc, T *vc, \
         const int64_t *slot, const uint8_t *valid, T *out, long B, long H, long K, long S, long D, int threads) { \
    if (B < 1 || K < 1 || H % K || D % 2 || D > 512 || threads < 1) return -1; \
    for (long b = 0; b < B; b++) if (slot[b] < 0 || slot[b] >= S) return -1; \
    long G = H / K, half = D / 2; \
    float scale = 1.0f / sqrtf((float)D); \
    int failed = 0; \
    _Pragma("omp parallel for num_threads(threads) schedule(static)") \
    for (long bj = 0; bj < B * K; bj++) { \
        long b = bj / K, j = bj % K, s_new = slot[b]; \
        const T *cs = cos + b * D, *sn = sin + b * D; \
        T *kr = kc + (bj * S) * D, *vr = vc + (bj * S) * D; \
        float *scores = malloc(sizeof(float) * (s_new + 1)); \
        float x[512], acc[512]; \
        if (!scores) { failed = 1; continue; } \
        for (long d = 0; d < D; d++) { /* rotate the new key into the cache; copy the value */ \
            float r = d < half ? -LOAD(k, bj * D + d + half) : LOAD(k, bj * D + d - half); \
            STORE(kr, s_new * D + d, ROUND(ROUND(LOAD(k, bj * D + d) * LOAD(cs, d)) + ROUND(r * LOAD(sn, d)))); \
            vr[s_new * D + d] = v[bj * D + d]; \
        } \
        for (long g = 0; g < G; g++) { \
            long h = j * G + g; \
            const T *qh = q + (b * H + h) * D; \
            for (long d = 0; d < D; d++) { \
                float r = d < half ? -LOAD(qh, d + half) : LOAD(qh, d - half); \
                x[d] = ROUND(ROUND(LOAD(qh, d) * LOAD(cs, d)) + ROUND(r * LOAD(sn, d))); \
            } \
            float top = -INFINITY; \
            for (long s = 0; s <= s_new; s++) { \
                if (s != s_new && !valid[b * S + s]) { scores[s] = -INFINITY; continue; } \
                scores[s] = DOT(x, kr + s * D, D) * scale; \
                if (scores[s] > top) top = scores[s]; \
            } \
            float total = 0; \
            for (long d = 0; d < D; d++) acc[d] = 0; \
            for (long s = 0; s <= s_new; s++) { \
                if (scores[s] == -INFINITY) continue; \
                float p = expf(scores[s] - top); \
                total += p; \
                for (long d = 0; d < D; d++) acc[d] += p * LOAD(vr, s * D + d); \
            } \
            for (long d = 0; d < D; d++) STORE(out, (b * H + h) * D + d, acc[d] / total); \
        } \
        free(scores); \
    } \
    return failed ? -2 : 0; \
}

ATTEND(qwenkit_decode_attention_f32, float, f32_load, f32_round, f32_store, dot_f32)
ATTEND(qwenkit_decode_attention_bf16, uint16_t, bf16_load, bf16_round, bf16_store, dot_bf16)
