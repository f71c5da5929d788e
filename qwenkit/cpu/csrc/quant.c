/* Products with weights in llama.cpp's block formats, read straight from a GGUF file's layout:
 * Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (blocks of 32 weights), Q4_K, Q5_K (super-blocks of 256 with
 * sub-blocks of 32), Q6_K (256, sub-blocks of 16), and F16.
 *
 * Every format is read the same way: `unpack` turns 256 weights of a row (a "group") into four
 * 64-byte vectors of small unsigned integers u (Q8_0: signed, see below), a scale for each 4
 * weights and a bias for each 16, so that weight = scale * u + bias exactly as ggml dequantizes
 * it. The activations are quantized once per product to int8 in blocks of 32 (one fp32 scale
 * each, absmax / 127, round to nearest), so that a product is integer dot products of u with
 * the activations' int8, 4 pairs per 32-bit lane (vpdpbusd on AVX-512 VNNI or AVX-VNNI;
 * vpmaddubsw + vpmaddwd on AVX2; plain C elsewhere: the choice is made at build time), scaled
 * by the weights' and the activations' scales in fp32; the biases meet the activations' sums
 * of 16, one fused multiply-add per group. So the result equals the fp32 product of the
 * dequantized weights with the dequantized activations, up to fp32 summation order.
 *
 * Q8_0's weights are signed: vpdpbusd multiplies unsigned by signed bytes, so its |w| meets
 * sign(w) * x (llama.cpp's trick); in plain C the signed bytes multiply directly.
 *
 * F16 weights take the fp32 activations as they are (no integer path). `dequantize` uses the
 * same unpacking, for prefill (tiles into a matmul) and for embedding rows.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
#include "qwenkit.h"
#include "common.h"

#define GROUP 256 /* weights per group: a K-quant super-block, or 8 blocks of 32 */
#define AHEAD 8192 /* bytes of prefetch ahead of the reads, as gemv.c */

typedef uint8_t vu8 __attribute__((vector_size(64)));
typedef int8_t vs8 __attribute__((vector_size(64)));
typedef uint8_t vu8h __attribute__((vector_size(32)));
typedef uint8_t vu8q __attribute__((vector_size(16)));
typedef int8_t vs8q __attribute__((vector_size(16)));

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        float f = ldexpf((float)mant, -24); /* zero or subnormal */
        return sign ? -f : f;
    }
    bits = exp == 31 ? sign | 0x7f800000 | mant << 13 : sign | (exp + 112) << 23 | mant << 13;
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}
static inline uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline float half_at(const uint8_t *p) { return f16_to_f32(le16(p)); }

/* Bytes per block and weights per block of each format; 0 for a type not handled here */
static long block_bytes(int wt) {
    switch (wt) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q5_0: return 22;
    case Q5_1: return 24;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q5_K: return 176;
    case Q6_K: return 210;
    case F16: return 2;
    default: return 0;
    }
}
static long block_size(int wt) { return wt == F16 ? 1 : wt == Q4_K || wt == Q5_K || wt == Q6_K ? 256 : 32; }

/* The bytes of a row of K weights, or 0 where the format does not take K */
INTERNAL long quant_row_bytes(int wt, long K) {
    long bb = block_bytes(wt), bs = block_size(wt);
    return bb && K > 0 && K % bs == 0 ? K / bs * bb : 0;
}

/* ------------------------------------------------------------------------------------------ */
/* The activations, quantized: for each row of K (padded with zeros to Kp, a multiple of GROUP),
 * q (Kp,) int8; lane (Kp / 4,), the scale of each 4 values' block (repeated 8 times per block of
 * 32, so that it multiplies a vector of 16 lanes as it is); sum16 (Kp / 16,), the dequantized
 * sum of each 16 values, for the weights' biases. */
static long qx_padded(long K) { return (K + GROUP - 1) / GROUP * GROUP; }
/* q (Kp bytes), lane (Kp / 4 floats) and sum16 (Kp / 16 floats) per row, and room to align */
INTERNAL long qx_bytes(long M, long K) { return M * (2 * qx_padded(K) + qx_padded(K) / 4) + 64; }

/* Quantizes one block of 32 values of x (type xt) from element i, n of them real (the rest 0) */
static ALWAYS_INLINE float quantize_block(const void *x, long i, int n, enum dtype xt, int8_t *q) {
    float v[32], amax = 0;
    for (int j = 0; j < 32; j++) {
        v[j] = j < n ? load(x, i + j, xt) : 0.0f;
        float a = fabsf(v[j]);
        amax = a > amax ? a : amax;
    }
    float d = amax / 127.0f, id = d > 0 ? 127.0f / amax : 0.0f;
    for (int j = 0; j < 32; j++) {
        float r = nearbyintf(v[j] * id);
        q[j] = (int8_t)(r > 127 ? 127 : r < -127 ? -127 : r);
    }
    return d;
}

/* x (M, K) of type xt into qx, whose buffers are in `mem` (qx_bytes(M, K) bytes) */
INTERNAL struct qx quantize_x(const void *x, enum dtype xt, long M, long K, void *mem) {
    struct qx out;
    out.Kp = qx_padded(K);
    out.lane = (float *)(((uintptr_t)mem + 63) & ~(uintptr_t)63);
    out.sum16 = out.lane + M * out.Kp / 4;
    out.q = (int8_t *)(out.sum16 + M * out.Kp / 16);
    for (long m = 0; m < M; m++) {
        int8_t *q = out.q + m * out.Kp;
        float *lane = out.lane + m * out.Kp / 4, *sum16 = out.sum16 + m * out.Kp / 16;
        for (long b = 0; b < out.Kp / 32; b++) {
            long i = b * 32;
            int n = i >= K ? 0 : K - i < 32 ? (int)(K - i) : 32;
            float d = quantize_block(x, m * K + i, n, xt, q + i);
            for (int j = 0; j < 8; j++) lane[b * 8 + j] = d;
            for (int h = 0; h < 2; h++) {
                int s = 0;
                for (int j = 0; j < 16; j++) s += q[i + 16 * h + j];
                sum16[b * 2 + h] = d * (float)s;
            }
        }
    }
    return out;
}

/* ------------------------------------------------------------------------------------------ */
/* Unpacking 256 weights of a row: u[c] for chunks c < nc of 64 weights, scale[c] for each of
 * their 16 lanes of 4, bias for each 16 of the group. `row` is the row's start, `g` the group. */

/* Two vectors side by side, in registers (a copy through memory would stall on store forwarding) */
static ALWAYS_INLINE vu8 concat(vu8h lo, vu8h hi) {
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
                                   21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41,
                                   42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62,
                                   63);
}
static ALWAYS_INLINE vu8h load32(const uint8_t *p) {
    vu8h v;
    memcpy(&v, p, 32);
    return v;
}
static ALWAYS_INLINE vu8q load16(const uint8_t *p) {
    vu8q v;
    memcpy(&v, p, 16);
    return v;
}
static ALWAYS_INLINE vu8h concat16(vu8q lo, vu8q hi) {
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
                                   21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
}
/* 32 weights of a block of 32 with 4-bit quants (Q4_0, Q4_1): elements 0-15 in the low nibbles */
static ALWAYS_INLINE vu8h nibbles32(const uint8_t *qs) {
    vu8q v = load16(qs);
    return concat16(v & 15, v >> 4);
}
/* The fifth bits of a block of 32 (Q5_0, Q5_1): bit j of the 32-bit qh is element j's, as 16 */
static ALWAYS_INLINE vu8h fifth_bits(const uint8_t *qh) {
    vu8q four;
    memcpy(&four, qh, 4); /* the other 12 bytes are not used */
    vu8h rep = __builtin_shufflevector(four, four, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2,
                                       2, 3, 3, 3, 3, 3, 3, 3, 3);
    const vu8h bit = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128,
                      1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    return (vu8h)((rep & bit) != 0) & 16;
}
/* n <= 8 halves, each at p + i * stride, as fp32 in lanes 0 to n - 1 (the others 0): a row's last
 * group reads only the blocks the row has, so never past the end of the tensor */
static ALWAYS_INLINE vf halves8(const uint8_t *p, long stride, int n) {
    uint16_t h[8] = {0};
    for (int i = 0; i < n; i++) h[i] = le16(p + i * stride);
#if defined(__F16C__)
    __m128i v;
    memcpy(&v, h, 16);
    __m256 f = _mm256_cvtph_ps(v);
    float out[8];
    memcpy(out, &f, 32);
    return (vf){out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7]};
#else
    vf out = {0};
    for (int i = 0; i < 8; i++) out[i] = f16_to_f32(h[i]);
    return out;
#endif
}
static ALWAYS_INLINE vf two_scales(float a, float b) { return (vf){a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b}; }
/* Q4_K's and Q5_K's 6-bit scale and min of sub-block j, packed in 12 bytes (ggml's
 * get_scale_min_k4) */
static ALWAYS_INLINE void scale_min_k4(int j, const uint8_t *q, int *sc, int *mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Lanes i / 4 + 4c of v, four each: a chunk's 16 lanes of 4 weights from 16 values per 16 */
static ALWAYS_INLINE vf per16(vf v, int c) {
    switch (c) {
    case 0: return __builtin_shufflevector(v, v, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    case 1: return __builtin_shufflevector(v, v, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7);
    case 2: return __builtin_shufflevector(v, v, 8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11);
    default: return __builtin_shufflevector(v, v, 12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15);
    }
}
/* Lanes 2c and 2c + 1 of v, eight each: a chunk's 16 lanes from 8 values per 32 */
static ALWAYS_INLINE vf per32(vf v, int c) {
    switch (c) {
    case 0: return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    case 1: return __builtin_shufflevector(v, v, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    case 2: return __builtin_shufflevector(v, v, 4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5);
    default: return __builtin_shufflevector(v, v, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7);
    }
}

/* Blocks of 32 (legacy formats): chunk c holds blocks 2c and 2c + 1 of the group, where the row
 * has them (nb of the 8): a missing block's weights, scale and bias are zero, and never read. */
static ALWAYS_INLINE void unpack_legacy(const uint8_t *row, long g, int nb, vu8 *u, vf *scale, vf *bias, int wt) {
    long bb = block_bytes(wt);
    const uint8_t *first = row + g * 8 * bb;
    vf d = halves8(first, bb, nb), b;
    switch (wt) {
    case Q4_0: b = d * -8.0f; break;
    case Q5_0: b = d * -16.0f; break;
    case Q4_1:
    case Q5_1: b = halves8(first + 2, bb, nb); break;
    default: b = (vf){0};
    }
    for (int c = 0; c < 4; c++) {
        vu8h half[2] = {{0}, {0}};
        for (int h = 0; h < 2; h++) {
            int k = 2 * c + h; /* block within the group */
            if (k >= nb) continue;
            const uint8_t *blk = first + k * bb;
            switch (wt) {
            case Q8_0: half[h] = load32(blk + 2); break;
            case Q4_0: half[h] = nibbles32(blk + 2); break;
            case Q4_1: half[h] = nibbles32(blk + 4); break;
            case Q5_0: half[h] = nibbles32(blk + 6) | fifth_bits(blk + 2); break;
            case Q5_1: half[h] = nibbles32(blk + 8) | fifth_bits(blk + 4); break;
            }
        }
        u[c] = concat(half[0], half[1]);
        scale[c] = per32(d, c);
    }
    *bias = __builtin_shufflevector(b, b, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
}

static ALWAYS_INLINE void unpack_k(const uint8_t *blk, vu8 *u, vf *scale, vf *bias, int wt) {
    if (wt == Q6_K) { /* ql[128], qh[64], scales[16] (int8, one per 16 weights), d */
        const uint8_t *ql = blk, *qh = blk + 128;
        vs8q sc;
        memcpy(&sc, blk + 192, 16);
        vf s16 = __builtin_convertvector(sc, vf) * half_at(blk + 208);
        for (int c = 0; c < 4; c++) {
            int h = c >> 1;
            vu8h a = load32(ql + 64 * h), b2 = load32(ql + 64 * h + 32), hb = load32(qh + 32 * h), lo, hi;
            if ((c & 1) == 0) {
                lo = (a & 15) | ((hb & 3) << 4);
                hi = (b2 & 15) | (((hb >> 2) & 3) << 4);
            } else {
                lo = (a >> 4) | (((hb >> 4) & 3) << 4);
                hi = (b2 >> 4) | (((hb >> 6) & 3) << 4);
            }
            u[c] = concat(lo, hi);
            scale[c] = per16(s16, c);
        }
        *bias = s16 * -32.0f;
        return;
    }
    /* Q4_K, Q5_K: d, dmin, 12 bytes of 6-bit scales and mins, (qh[32],) qs[128]. The scales and
     * mins unpacked as ggml does, to bytes sc0..sc7 then m0..m7. */
    uint32_t t[4];
    memcpy(t, blk + 4, 12);
    t[3] = ((t[2] >> 4) & 0x0f0f0f0f) | (((t[1] >> 6) & 0x03030303) << 4);
    uint32_t mins_lo = t[1] & 0x3f3f3f3f;
    t[1] = (t[2] & 0x0f0f0f0f) | (((t[0] >> 6) & 0x03030303) << 4);
    t[2] = mins_lo;
    t[0] &= 0x3f3f3f3f;
    vu8q bytes;
    memcpy(&bytes, t, 16);
    float d = half_at(blk), dmin = half_at(blk + 2);
    /* d * sc0..sc7, then -dmin * m0..m7 */
    vf sm = __builtin_convertvector(bytes, vf) * (vf){d, d, d, d, d, d, d, d, -dmin, -dmin, -dmin, -dmin, -dmin,
                                                      -dmin, -dmin, -dmin};
    const uint8_t *qh = blk + 16, *qs = blk + (wt == Q5_K ? 48 : 16);
    for (int c = 0; c < 4; c++) {
        vu8h raw = load32(qs + 32 * c), lo = raw & 15, hi = raw >> 4;
        if (wt == Q5_K) {
            vu8h bits = load32(qh);
            lo |= ((bits >> (2 * c)) & 1) << 4;
            hi |= ((bits >> (2 * c + 1)) & 1) << 4;
        }
        u[c] = concat(lo, hi);
        scale[c] = per32(sm, c);
    }
    *bias = __builtin_shufflevector(sm, sm, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
}

/* Group g of a row of K weights: the chunks of 64 it has (nc), and their blocks of 32 (nb) */
static ALWAYS_INLINE int group_blocks(long K, long g) {
    long left = K - g * GROUP;
    return left >= GROUP ? 8 : (int)(left / 32);
}
/* A row's last group, where it has fewer than 8 blocks of 32: once per row, so not inlined */
static __attribute__((noinline)) void unpack_tail(const uint8_t *row, long g, int nb, vu8 *u, vf *scale, vf *bias,
                                                   int wt) {
    switch (wt) {
    case Q8_0: unpack_legacy(row, g, nb, u, scale, bias, Q8_0); break;
    case Q4_0: unpack_legacy(row, g, nb, u, scale, bias, Q4_0); break;
    case Q4_1: unpack_legacy(row, g, nb, u, scale, bias, Q4_1); break;
    case Q5_0: unpack_legacy(row, g, nb, u, scale, bias, Q5_0); break;
    default: unpack_legacy(row, g, nb, u, scale, bias, Q5_1);
    }
}
static ALWAYS_INLINE void unpack(const uint8_t *row, long g, int nb, vu8 *u, vf *scale, vf *bias, int wt) {
    if (wt == Q4_K || wt == Q5_K || wt == Q6_K)
        unpack_k(row + g * block_bytes(wt), u, scale, bias, wt);
    else if (nb == 8)
        unpack_legacy(row, g, 8, u, scale, bias, wt);
    else
        unpack_tail(row, g, nb, u, scale, bias, wt);
}

/* ------------------------------------------------------------------------------------------ */
/* The integer dot products: lane i of the result is the sum of products 4i .. 4i + 3 */

#if !defined(__AVX2__)
/* The plain-C dot of w's bytes (unsigned, or signed as Q8_0's) with q's, through arrays: GCC
 * lowers element access to a vector wider than the machine's slowly */
static ALWAYS_INLINE vi32 dot_c(vu8 w, vs8 q, int is_signed) {
    uint8_t wa[64];
    int8_t qa[64];
    int32_t r[16];
    memcpy(wa, &w, 64);
    memcpy(qa, &q, 64);
    for (int i = 0; i < 16; i++) {
        r[i] = 0;
        for (int j = 0; j < 4; j++) {
            int k = 4 * i + j;
            r[i] += (is_signed ? (int)(int8_t)wa[k] : (int)wa[k]) * (int)qa[k];
        }
    }
    vi32 out;
    memcpy(&out, r, 64);
    return out;
}
#endif

static ALWAYS_INLINE vi32 dot_u8s8(vu8 u, vs8 q) {
#if defined(__AVX512VNNI__)
    return (vi32)_mm512_dpbusd_epi32(_mm512_setzero_si512(), (__m512i)u, (__m512i)q);
#elif defined(__AVX2__)
    __m256i uh[2], qh[2], r[2];
    memcpy(uh, &u, 64);
    memcpy(qh, &q, 64);
    for (int i = 0; i < 2; i++) {
#if defined(__AVXVNNI__)
        r[i] = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), uh[i], qh[i]);
#else /* pairs to 16 bits (no overflow: u < 64 here, or |w| <= 128 for Q8_0), then quads to 32 */
        r[i] = _mm256_madd_epi16(_mm256_maddubs_epi16(uh[i], qh[i]), _mm256_set1_epi16(1));
#endif
    }
    vi32 out;
    memcpy(&out, r, 64);
    return out;
#else
    return dot_c(u, q, 0);
#endif
}

/* w (signed, as Q8_0's) . q */
static ALWAYS_INLINE vi32 dot_s8s8(vu8 w, vs8 q) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    __m512i wi = (__m512i)w, qi = (__m512i)q;
    __mmask64 neg = _mm512_movepi8_mask(wi);
    __m512i qs = _mm512_mask_sub_epi8(qi, neg, _mm512_setzero_si512(), qi);
    return (vi32)_mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(wi), qs);
#elif defined(__AVX2__)
    __m256i wh[2], qh[2];
    memcpy(wh, &w, 64);
    memcpy(qh, &q, 64);
    vu8 a;
    vs8 s;
    for (int i = 0; i < 2; i++) {
        __m256i abs = _mm256_sign_epi8(wh[i], wh[i]), sq = _mm256_sign_epi8(qh[i], wh[i]);
        memcpy((char *)&a + 32 * i, &abs, 32);
        memcpy((char *)&s + 32 * i, &sq, 32);
    }
    return dot_u8s8(a, s);
#else
    return dot_c(w, q, 1);
#endif
}

/* out[m] = dot(row, x[m]) for M rows of quantized x; M a constant in each copy. Each row sums
 * into A accumulators (chunk c into c % A), so that the additions do not wait on each other's
 * latency: one chain of four per group would be the bound. */
static ALWAYS_INLINE void qdot_rows(const struct qx *x, const uint8_t *row, long K, float *out, int M, int wt) {
    enum { A = 4 };
    vf acc[MAX_ROWS][A];
    for (int m = 0; m < M; m++)
        for (int a = 0; a < A; a++) acc[m][a] = (vf){0};
    long groups = (K + GROUP - 1) / GROUP, gbytes = GROUP / block_size(wt) * block_bytes(wt);
    for (long g = 0; g < groups; g++) {
        for (long o = 0; o < gbytes; o += 64) __builtin_prefetch(row + g * gbytes + AHEAD + o, 0, 3);
        int nb = group_blocks(K, g), nc = (nb + 1) / 2;
        vu8 u[4];
        vf scale[4], bias;
        unpack(row, g, nb, u, scale, &bias, wt);
        for (int m = 0; m < M; m++) {
            long at = m * x->Kp + g * GROUP;
            const int8_t *q = x->q + at;
            const float *lane = x->lane + at / 4;
            acc[m][A - 1] += bias * load_f32(x->sum16 + at / 16);
            for (int c = 0; c < nc; c++) {
                vs8 qv;
                memcpy(&qv, q + 64 * c, 64);
                vi32 p = wt == Q8_0 ? dot_s8s8(u[c], qv) : dot_u8s8(u[c], qv);
                acc[m][c % A] += __builtin_convertvector(p, vf) * (scale[c] * load_f32(lane + 16 * c));
            }
        }
    }
    for (int m = 0; m < M; m++) {
        vf a = acc[m][0];
        for (int i = 1; i < A; i++) a += acc[m][i];
        out[m] = hsum(a);
    }
}

/* out[m] = dot(row, x[m]) for F16 weights and fp32 (or bf16) x */
static ALWAYS_INLINE void f16dot_rows(const void *x, enum dtype xt, const uint16_t *row, long K, float *out, int M) {
    vf acc[MAX_ROWS];
    for (int m = 0; m < M; m++) acc[m] = (vf){0};
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        __builtin_prefetch((const char *)(row + k) + AHEAD, 0, 3);
        vf w;
#if defined(__AVX512F__)
        __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + k)));
        memcpy(&w, &f, 64);
#else
        for (int i = 0; i < 16; i++) w[i] = f16_to_f32(row[k + i]);
#endif
        for (int m = 0; m < M; m++) acc[m] += w * vload(x, m * K + k, xt);
    }
    for (int m = 0; m < M; m++) {
        float s = hsum(acc[m]);
        for (long j = k; j < K; j++) s += f16_to_f32(row[j]) * load(x, m * K + j, xt);
        out[m] = s;
    }
}

/* One row of w against M rows of x, for a format wt that is a constant. The integer path has
 * copies for 1 and 4 rows (each keeps its sums in registers; more copies cost seconds of build);
 * other counts run as a sum of those, the row's weights then read again from L1. */
static ALWAYS_INLINE void qdot_format(const struct qx *qx, const void *x, enum dtype xt, const uint8_t *row, long K,
                                      float *o, int M, int wt) {
    if (wt == F16) {
        for (int m = 0; m < M; m++) f16dot_rows(at(x, m * K, xt), xt, (const uint16_t *)row, K, o + m, 1);
        return;
    }
    struct qx part = *qx;
    for (int m = 0; m < M;) {
        int n = M - m >= 4 ? 4 : 1;
        part.q = qx->q + m * qx->Kp;
        part.lane = qx->lane + m * qx->Kp / 4;
        part.sum16 = qx->sum16 + m * qx->Kp / 16;
        if (n == 4)
            qdot_rows(&part, row, K, o + m, 4, wt);
        else
            qdot_rows(&part, row, K, o + m, 1, wt);
        m += n;
    }
}

/* y[m, n] = dot(x[m], w[n]) (+ b[n]) for output rows [n0, n1): x (M, K) of type xt (F32 or BF16)
 * and qx its quantized copy (unused for F16 weights), w (N, row bytes) of format wt, b and y (M, N)
 * of type xt. */
static ALWAYS_INLINE void qproduct_rows(const struct qx *qx, const void *x, enum dtype xt, const uint8_t *w, int wt,
                                        const void *b, void *y, long M, long N, long K, long n0, long n1) {
    long rb = quant_row_bytes(wt, K);
    float o[MAX_ROWS];
    for (long n = n0; n < n1; n++) {
        qdot_format(qx, x, xt, w + n * rb, K, o, (int)M, wt);
        for (long m = 0; m < M; m++) {
            float v = b ? o[m] + (xt == F32 ? ((const float *)b)[n] : bf16_to_f32(((const uint16_t *)b)[n])) : o[m];
            if (xt == F32)
                ((float *)y)[m * N + n] = v;
            else
                ((uint16_t *)y)[m * N + n] = f32_to_bf16(v);
        }
    }
}

/* One copy per format, with the format a constant in it */
INTERNAL void qgemv_rows(const struct qx *qx, const void *x, enum dtype xt, const void *w, int wt, const void *b,
                         void *y, long M, long N, long K, long n0, long n1) {
    switch (wt) {
    case Q8_0: qproduct_rows(qx, x, xt, w, Q8_0, b, y, M, N, K, n0, n1); break;
    case Q4_0: qproduct_rows(qx, x, xt, w, Q4_0, b, y, M, N, K, n0, n1); break;
    case Q4_1: qproduct_rows(qx, x, xt, w, Q4_1, b, y, M, N, K, n0, n1); break;
    case Q5_0: qproduct_rows(qx, x, xt, w, Q5_0, b, y, M, N, K, n0, n1); break;
    case Q5_1: qproduct_rows(qx, x, xt, w, Q5_1, b, y, M, N, K, n0, n1); break;
    case Q4_K: qproduct_rows(qx, x, xt, w, Q4_K, b, y, M, N, K, n0, n1); break;
    case Q5_K: qproduct_rows(qx, x, xt, w, Q5_K, b, y, M, N, K, n0, n1); break;
    case Q6_K: qproduct_rows(qx, x, xt, w, Q6_K, b, y, M, N, K, n0, n1); break;
    case F16: qproduct_rows(qx, x, xt, w, F16, b, y, M, N, K, n0, n1); break;
    }
}

/* Products of blocks of output rows taken from *next (common.h's claim) until none is left */
INTERNAL void qgemv_part(const struct qx *qx, const void *x, enum dtype xt, const void *w, int wt, const void *b,
                         void *y, long M, long N, long K, long *next, int nt) {
    long n0, n1, least = least_rows(quant_row_bytes(wt, K));
    while (claim(next, N, least, nt, &n0, &n1)) qgemv_rows(qx, x, xt, w, wt, b, y, M, N, K, n0, n1);
}

INTERNAL int quant_sizes_ok(int wt, long M, long N, long K) {
    return M >= 1 && M <= MAX_ROWS && N >= 1 && quant_row_bytes(wt, K) > 0;
}

int qwenkit_qgemv(const float *x, const void *w, int wtype, const float *b, float *y, long M, long N, long K,
                  int threads) {
    if (!quant_sizes_ok(wtype, M, N, K) || threads < 1) return -1;
    void *mem = wtype == F16 ? NULL : malloc(qx_bytes(M, K));
    if (wtype != F16 && !mem) return -2;
    struct qx qx = {0};
    if (mem) qx = quantize_x(x, F32, M, K, mem);
    long next = 0;
#pragma omp parallel num_threads(threads)
    qgemv_part(&qx, x, F32, w, wtype, b, y, M, N, K, &next, omp_get_num_threads());
    free(mem);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */

static ALWAYS_INLINE void dequantize_row(const uint8_t *row, long K, float *out, int wt) {
    if (wt == F16) {
        for (long k = 0; k < K; k++) out[k] = f16_to_f32(le16(row + 2 * k));
        return;
    }
    for (long g = 0; g < (K + GROUP - 1) / GROUP; g++) {
        int nb = group_blocks(K, g);
        vu8 u[4];
        vf scale[4], bias;
        unpack(row, g, nb, u, scale, &bias, wt);
        uint8_t ua[256];
        float sa[64], ba[16];
        memcpy(ua, u, sizeof ua);
        memcpy(sa, scale, sizeof sa);
        memcpy(ba, &bias, sizeof ba);
        for (long e = 0; e < nb * 32; e++) {
            float q = wt == Q8_0 ? (float)(int8_t)ua[e] : (float)ua[e];
            out[g * GROUP + e] = sa[e / 4] * q + ba[e / 16];
        }
    }
}

int qwenkit_dequantize(const void *w, int wtype, long rows, long K, float *out, int threads) {
    long rb = quant_row_bytes(wtype, K);
    if (rb == 0 || rows < 0 || threads < 1) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) {
        const uint8_t *row = (const uint8_t *)w + r * rb;
        switch (wtype) {
        case Q8_0: dequantize_row(row, K, out + r * K, Q8_0); break;
        case Q4_0: dequantize_row(row, K, out + r * K, Q4_0); break;
        case Q4_1: dequantize_row(row, K, out + r * K, Q4_1); break;
        case Q5_0: dequantize_row(row, K, out + r * K, Q5_0); break;
        case Q5_1: dequantize_row(row, K, out + r * K, Q5_1); break;
        case Q4_K: dequantize_row(row, K, out + r * K, Q4_K); break;
        case Q5_K: dequantize_row(row, K, out + r * K, Q5_K); break;
        case Q6_K: dequantize_row(row, K, out + r * K, Q6_K); break;
        default: dequantize_row(row, K, out + r * K, F16);
        }
    }
    return 0;
}

int qwenkit_quantize_activations(const float *x, long M, long K, int8_t *q, float *d) {
    if (M < 1 || K < 1 || K % 32) return -1;
    for (long m = 0; m < M; m++)
        for (long b = 0; b < K / 32; b++) d[m * (K / 32) + b] = quantize_block(x, m * K + b * 32, 32, F32, q + m * K + b * 32);
    return 0;
}
