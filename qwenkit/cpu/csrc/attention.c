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
#include "qwenkit.h"
#include "common.h"

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
    for (long b = 0; b < B; b++)
        if (slot[b] < 0 || slot[b] >= S) return 0;
    return 1;
}

/* RoPE of one head: y (D,) = x * cos + rotate_half(x) * sin, rounded to dt after each product and
 * after the sum as PyTorch's ops are. x, cs, sn (D,) of type dt; y of type yt: dt for a key written
 * into the cache, F32 for a query kept for the scores. Sixteen lanes at a time where half a head is
 * a multiple of 16 (each lane's pair is half a head apart: the same roundings), else one lane at a
 * time. */
static ALWAYS_INLINE void rope(const void *x, const void *cs, const void *sn, void *y, long D, enum dtype dt,
                               enum dtype yt) {
    long half = D / 2;
    if (half % 16 == 0)
        for (long d = 0; d < D; d += 16) {
            vf r = d < half ? -vload(x, d + half, dt) : vload(x, d - half, dt);
            vf sum = vround(vload(x, d, dt) * vload(cs, d, dt), dt) + vround(r * vload(sn, d, dt), dt);
            vstore(y, d, yt == F32 ? vround(sum, dt) : sum, yt); /* a store to dt rounds by itself */
        }
    else
        for (long d = 0; d < D; d++) {
            float r = d < half ? -load(x, d + half, dt) : load(x, d - half, dt);
            float sum = round_to(load(x, d, dt) * load(cs, d, dt), dt) + round_to(r * load(sn, d, dt), dt);
            store(y, d, yt == F32 ? round_to(sum, dt) : sum, yt);
        }
}

/* Thread t of nt's share of the (row, kv head) pairs: q (B, H, D), k and v (B, K, D): this step's
 * projections; cos and sin (B, D); kc and vc (B, K, S, D): the layer's cache; slot (B,): where each
 * row's new token goes; valid (B, S): slots holding real tokens; out (B, H, D). Returns nonzero if
 * it ran out of memory. */
static ALWAYS_INLINE int attend(const void *q, const void *k, const void *v, const void *cos, const void *sin,
                                void *kc, void *vc, const int64_t *slot, const uint8_t *valid, void *out, long B,
                                long H, long K, long S, long D, int t, int nt, enum dtype dt) {
    long G = H / K, per = (B * K + nt - 1) / nt;
    long lo = t * per, hi = lo + per < B * K ? lo + per : B * K;
    float scale = 1.0f / sqrtf((float)D);
    int failed = 0;
    for (long bj = lo; bj < hi; bj++) {
        long b = bj / K, j = bj % K, s_new = slot[b];
        const void *cs = at(cos, b * D, dt), *sn = at(sin, b * D, dt);
        void *kr = at(kc, bj * S * D, dt), *vr = at(vc, bj * S * D, dt); /* (S, D) */
        long n = s_new + 1; /* this row's slots, the new one last */
        float *scores = malloc(sizeof(float) * G * (n + 2 * D + 1)); /* (G, n); x, acc (G, D); total (G,) */
        if (!scores) {
            failed = 1;
            continue;
        }
        float *x = scores + G * n, *acc = x + G * D, *total = acc + G * D;
        rope(at(k, bj * D, dt), cs, sn, at(kr, s_new * D, dt), D, dt, dt); /* the new key, into the cache */
        memcpy(at(vr, s_new * D, dt), at(v, bj * D, dt), dtype_size(dt) * D);
        for (long g = 0; g < G; g++) /* the query heads that share kv head j */
            rope(at(q, (b * H + j * G + g) * D, dt), cs, sn, x + g * D, D, dt, F32);
        /* Scores: each cached key is read once for all G heads, 8 heads at a time in registers,
         * sixteen lanes at a time and the lanes as a tree (hsum); one lane at a time where D is
         * not a multiple of 16. */
        for (long s = 0; s < n; s++) {
            const void *ks = at(kr, s * D, dt);
            if (s != s_new && !valid[b * S + s]) {
                for (long g = 0; g < G; g++) scores[g * n + s] = -INFINITY;
                continue;
            }
            if (D % 16) {
                for (long g = 0; g < G; g++) {
                    float dot = 0;
                    for (long d = 0; d < D; d++) dot += x[g * D + d] * load(ks, d, dt);
                    scores[g * n + s] = dot * scale;
                }
                continue;
            }
            for (long g0 = 0; g0 < G; g0 += 8) {
                int m = G - g0 < 8 ? (int)(G - g0) : 8;
                vf sum[8] = {{0}};
                for (long d = 0; d < D; d += 16) {
                    vf kv = vload(ks, d, dt);
                    for (int i = 0; i < m; i++) sum[i] += load_f32(x + (g0 + i) * D + d) * kv;
                }
                for (int i = 0; i < m; i++) scores[(g0 + i) * n + s] = hsum(sum[i]) * scale;
            }
        }
        for (long g = 0; g < G; g++) { /* softmax, then the weighted sum of the values */
            float *sg = scores + g * n, top = -INFINITY;
            for (long s = 0; s < n; s++) top = sg[s] > top ? sg[s] : top;
            total[g] = softmax_weights(sg, n, top);
        }
        memset(acc, 0, sizeof(float) * G * D);
        for (long s = 0; s < n; s++) {
            const void *vs = at(vr, s * D, dt);
            for (long g = 0; g < G; g++) {
                float p = scores[g * n + s], *ag = acc + g * D;
                if (p == 0.0f) continue; /* a masked slot */
                if (D % 16 == 0)
                    for (long d = 0; d < D; d += 16) store_f32(ag + d, load_f32(ag + d) + p * vload(vs, d, dt));
                else
                    for (long d = 0; d < D; d++) ag[d] += p * load(vs, d, dt);
            }
        }
        for (long g = 0; g < G; g++) {
            void *og = at(out, (b * H + j * G + g) * D, dt);
            if (D % 16 == 0)
                for (long d = 0; d < D; d += 16) vstore(og, d, load_f32(acc + g * D + d) / total[g], dt);
            else
                for (long d = 0; d < D; d++) store(og, d, acc[g * D + d] / total[g], dt);
        }
        free(scores);
    }
    return failed;
}

INTERNAL int attention_part(const void *q, const void *k, const void *v, const void *cos, const void *sin, void *kc,
                            void *vc, const int64_t *slot, const uint8_t *valid, void *out, long B, long H, long K,
                            long S, long D, int t, int nt, enum dtype dt) {
    if (dt == F32) return attend(q, k, v, cos, sin, kc, vc, slot, valid, out, B, H, K, S, D, t, nt, F32);
    return attend(q, k, v, cos, sin, kc, vc, slot, valid, out, B, H, K, S, D, t, nt, BF16);
}

/* Checks the sizes (-1 if bad) and runs every thread's share (-2 if one ran out of memory). */
static int attention(const void *q, const void *k, const void *v, const void *cos, const void *sin, void *kc, void *vc,
                     const int64_t *slot, const uint8_t *valid, void *out, long B, long H, long K, long S, long D,
                     int threads, enum dtype dt) {
    if (threads < 1 || !attention_sizes_ok(slot, B, H, K, S, D)) return -1;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    failed |= attention_part(q, k, v, cos, sin, kc, vc, slot, valid, out, B, H, K, S, D, omp_get_thread_num(),
                             omp_get_num_threads(), dt);
    return failed ? -2 : 0;
}

int qwenkit_decode_attention_f32(const float *q, const float *k, const float *v, const float *cos, const float *sin,
                                 float *kc, float *vc, const int64_t *slot, const uint8_t *valid, float *out, long B,
                                 long H, long K, long S, long D, int threads) {
    return attention(q, k, v, cos, sin, kc, vc, slot, valid, out, B, H, K, S, D, threads, F32);
}
int qwenkit_decode_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *cos,
                                  const uint16_t *sin, uint16_t *kc, uint16_t *vc, const int64_t *slot,
                                  const uint8_t *valid, uint16_t *out, long B, long H, long K, long S, long D,
                                  int threads) {
    return attention(q, k, v, cos, sin, kc, vc, slot, valid, out, B, H, K, S, D, threads, BF16);
}
