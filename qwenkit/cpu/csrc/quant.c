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
 *
 * qwenkit's layers multiply these file-layout rows only for F16: every other format is repacked
 * at load into tiles whose vector lanes are rows ("Packed tiles" and "Packed K-quant tiles"
 * below), which the products read two to three times faster.
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
#define PACK_AHEAD 32768 /* the packed products' (more bytes in flight: they read faster) */

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
/* The K-quants: super-blocks of 256 */
static inline int is_k(int wt) { return wt == Q4_K || wt == Q5_K || wt == Q6_K; }
static long block_size(int wt) { return wt == F16 ? 1 : is_k(wt) ? 256 : 32; }

/* Formats with a packed layout (see "Packed tiles" below): blocks of 32 */
static int packable(int wt) { return wt != F16 && block_bytes(wt) > 0; }

/* The bytes of a row of K weights, or 0 where the format does not take K (packed: the same bytes,
 * in tiles of PACK_ROWS rows) */
INTERNAL long quant_row_bytes(int wt, long K) {
    if (wt & PACKED) return packable(wt & ~PACKED) ? quant_row_bytes(wt & ~PACKED, K) : 0;
    long bb = block_bytes(wt), bs = block_size(wt);
    return bb && K > 0 && K % bs == 0 ? K / bs * bb : 0;
}

/* ------------------------------------------------------------------------------------------ */
/* The activations, quantized: for each row of K (padded with zeros to Kp, a multiple of GROUP),
 * q (Kp,) int8; lane (Kp / 4,), the scale of each 4 values' block (repeated 8 times per block of
 * 32, so that it multiplies a vector of 16 lanes as it is); sum16 (Kp / 16,), the dequantized
 * sum of each 16 values, for the weights' biases. */
static long qx_padded(long K) { return (K + GROUP - 1) / GROUP * GROUP; }
/* q (Kp bytes), lane (Kp / 4 floats), sum16 and qsum16 (Kp / 16 each), d, qsum and dsum (Kp / 32
 * each) per row, and room to align */
INTERNAL long qx_bytes(long M, long K) { return M * (2 * qx_padded(K) + 7 * qx_padded(K) / 8) + 64; }

/* Quantizes one block of 32 values of x (type xt) from element i, n of them real (the rest 0):
 * q = round(v * 127 / absmax) to nearest even (adding and taking away 1.5 * 2^23 rounds an fp32
 * below 2^22 so, in vectors; nearbyintf is a call per value), d = absmax / 127 returned */
static ALWAYS_INLINE float quantize_block(const void *x, long i, int n, enum dtype xt, int8_t *q) {
    vf v[2];
    if (n == 32) {
        v[0] = vload(x, i, xt);
        v[1] = vload(x, i + 16, xt);
    } else {
        v[0] = v[1] = (vf){0};
        for (int j = 0; j < n; j++) v[j / 16][j % 16] = load(x, i + j, xt);
    }
    vu a0 = (vu)v[0] & 0x7fffffff, a1 = (vu)v[1] & 0x7fffffff, first = (vu)(a0 > a1);
    vu absbits = (a0 & first) | (a1 & ~first);
    uint32_t top = 0; /* the absmax's bits: non-negative floats order as their bits do */
    for (int j = 0; j < 16; j++) top = absbits[j] > top ? absbits[j] : top;
    float amax;
    memcpy(&amax, &top, 4);
    float d = amax / 127.0f, id = d > 0 ? 127.0f / amax : 0.0f;
    for (int h = 0; h < 2; h++) {
        vf r = (v[h] * id + 12582912.0f) - 12582912.0f;
        vi32 qi = __builtin_convertvector(r, vi32), over = qi > 127, under = qi < -127;
        qi = (qi & ~over & ~under) | (127 & over) | (-127 & under);
        vi8 b = __builtin_convertvector(qi, vi8);
        memcpy(q + 16 * h, &b, 16);
    }
    return d;
}

/* The layout of M rows of K in `mem` (qx_bytes(M, K) bytes), not yet filled */
INTERNAL struct qx qx_layout(long M, long K, void *mem) {
    struct qx out;
    out.Kp = qx_padded(K);
    out.lane = (float *)(((uintptr_t)mem + 63) & ~(uintptr_t)63);
    out.sum16 = out.lane + M * out.Kp / 4;
    out.d = out.sum16 + M * out.Kp / 16;
    out.qsum = (int32_t *)(out.d + M * out.Kp / 32);
    out.qsum16 = out.qsum + M * out.Kp / 32;
    out.dsum = (float *)(out.qsum16 + M * out.Kp / 16);
    out.q = (int8_t *)(out.dsum + M * out.Kp / 32);
    return out;
}

/* Rows [m0, m1) of x (M, K) of type xt quantized into qx */
INTERNAL void quantize_rows(const struct qx *out, const void *x, enum dtype xt, long K, long m0, long m1) {
    for (long m = m0; m < m1; m++) {
        int8_t *q = out->q + m * out->Kp;
        float *lane = out->lane + m * out->Kp / 4, *sum16 = out->sum16 + m * out->Kp / 16;
        float *d32 = out->d + m * out->Kp / 32, *dsum = out->dsum + m * out->Kp / 32;
        int32_t *qsum = out->qsum + m * out->Kp / 32, *qsum16 = out->qsum16 + m * out->Kp / 16;
        for (long b = 0; b < out->Kp / 32; b++) {
            long i = b * 32;
            int n = i >= K ? 0 : K - i < 32 ? (int)(K - i) : 32;
            float d = quantize_block(x, m * K + i, n, xt, q + i);
            for (int j = 0; j < 8; j++) lane[b * 8 + j] = d;
            d32[b] = d;
            qsum[b] = 0;
            for (int h = 0; h < 2; h++) {
                int s = 0;
                for (int j = 0; j < 16; j++) s += q[i + 16 * h + j];
                sum16[b * 2 + h] = d * (float)s;
                qsum16[b * 2 + h] = s;
                qsum[b] += s;
            }
            dsum[b] = d * (float)qsum[b];
        }
    }
}

/* x (M, K) of type xt into qx, whose buffers are in `mem` (qx_bytes(M, K) bytes) */
INTERNAL struct qx quantize_x(const void *x, enum dtype xt, long M, long K, void *mem) {
    struct qx out = qx_layout(M, K, mem);
    quantize_rows(&out, x, xt, K, 0, M);
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
    if (is_k(wt))
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


/* ------------------------------------------------------------------------------------------ */
/* Packed tiles: the blocks-of-32 formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) repacked at load so that
 * the lanes of a vector are rows, not positions along K, as llama.cpp's repacked Q4_0 is.
 *
 * A product above reads a row at a time: per 64 weights one integer dot, its conversion to fp32,
 * the scales' product and a multiply-add, and per group the unpacking of eight fp16 scales; that
 * is compute-bound at about half the memory's speed. Here a tile holds PACK_ROWS (16) rows, and
 * lane r of every vector is row r: an int32 lane sums a whole block of 32 of its row (8 dots of
 * 4 weights with 4 of x, broadcast), so per block of 16 rows there is one conversion, one
 * multiply-add and one load of 16 fp16 scales, and no sum across lanes at the end.
 *
 * A tile of rows [16t, 16t + 16) (rows past N are zeros) is, for nb = K / 32 blocks, in order:
 *   quants: nb blocks of V vectors of 64 bytes; byte 4r + i of vector j is row r's quant byte
 *     4j + i: for 4-bit formats (V = 4) its low nibble is weight 4j + i and its high nibble
 *     weight 16 + 4j + i (the file's own nibble order); for Q8_0 (V = 8) byte 4j + i is weight
 *     4j + i, stored plus 128 (w ^ 0x80) as vpdpbusd takes unsigned bytes;
 *   Q5_0 and Q5_1: nb blocks of 8 masks of 64 bits, the fifth bits: bit 4r + i of mask j is
 *     row r's weight 4j + i's (so vector j's low nibbles and vector j - 4's high ones: after
 *     the nibbles are split, the eight vectors j of 64 bytes each hold weights 4j .. 4j + 3);
 *   d: nb blocks of 16 fp16 scales, one per row; Q4_1 and Q5_1: m, the same for the mins.
 * That is PACK_ROWS times the bytes of a row of blocks. A weight is d * (u + offset) (Q4_0: -8,
 * Q5_0: -16, Q8_0: -128) or d * u + m, u the unsigned quant; the offset is added to the block's
 * integer sum as offset * sum(q), so the block's sum stays exact in int32 and the product equals
 * the dequantized one up to fp32 summation order. */

static ALWAYS_INLINE int pack_vectors(int wt) { return wt == Q8_0 ? 8 : 4; }
static ALWAYS_INLINE int has_fifth(int wt) { return wt == Q5_0 || wt == Q5_1; }
static ALWAYS_INLINE int has_min(int wt) { return wt == Q4_1 || wt == Q5_1; }
static ALWAYS_INLINE int pack_offset(int wt) { return wt == Q4_0 ? -8 : wt == Q5_0 ? -16 : wt == Q8_0 ? -128 : 0; }
/* Where the quants' bytes start in a block of the file's layout, and the fifth bits' (qh) */
static ALWAYS_INLINE int quants_at(int wt) { return wt == Q8_0 || wt == Q4_0 ? 2 : wt == Q4_1 ? 4 : wt == Q5_0 ? 6 : 8; }
static ALWAYS_INLINE int qh_at(int wt) { return wt == Q5_0 ? 2 : 4; }

/* Offsets of a tile's parts, per block: quants, fifth bits, d, m (bytes from the tile's start) */
struct tile_parts {
    long quants, fifth, d, m, bytes;
};
static ALWAYS_INLINE struct tile_parts tile_parts(int wt, long K) {
    long nb = K / 32;
    struct tile_parts t;
    t.quants = 0;
    t.fifth = nb * pack_vectors(wt) * 64;
    t.d = t.fifth + (has_fifth(wt) ? nb * 64 : 0);
    t.m = t.d + nb * 32;
    t.bytes = t.m + (has_min(wt) ? nb * 32 : 0);
    return t;
}

/* Rows [16t, 16t + 16) of w (N, row bytes) into a tile */
static void pack_tile(const uint8_t *w, int wt, long N, long K, long t, uint8_t *tile) {
    long rb = quant_row_bytes(wt, K), bb = block_bytes(wt), nb = K / 32;
    struct tile_parts parts = tile_parts(wt, K);
    int V = pack_vectors(wt);
    memset(tile, 0, parts.bytes);
    for (int r = 0; r < PACK_ROWS; r++) {
        long n = t * PACK_ROWS + r;
        if (n >= N) break;
        for (long b = 0; b < nb; b++) {
            const uint8_t *blk = w + n * rb + b * bb;
            uint8_t *quants = tile + parts.quants + b * V * 64;
            for (int j = 0; j < V; j++)
                for (int i = 0; i < 4; i++) {
                    uint8_t byte = blk[quants_at(wt) + 4 * j + i];
                    quants[64 * j + 4 * r + i] = wt == Q8_0 ? byte ^ 0x80 : byte;
                }
            if (has_fifth(wt)) {
                uint32_t qh;
                memcpy(&qh, blk + qh_at(wt), 4); /* little-endian, as the file */
                uint64_t masks[8];
                memcpy(masks, tile + parts.fifth + b * 64, 64);
                for (int j = 0; j < 8; j++) masks[j] |= (uint64_t)((qh >> (4 * j)) & 15) << (4 * r);
                memcpy(tile + parts.fifth + b * 64, masks, 64);
            }
            memcpy(tile + parts.d + b * 32 + 2 * r, blk, 2);
            if (has_min(wt)) memcpy(tile + parts.m + b * 32 + 2 * r, blk + 2, 2);
        }
    }
}

/* 16 fp16 (little-endian) as fp32 */
static ALWAYS_INLINE vf halves16(const uint8_t *p) {
#if defined(__AVX512F__)
    __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    vf v;
    memcpy(&v, &f, 64);
    return v;
#else
    vf v;
    for (int i = 0; i < 16; i++) v[i] = half_at(p + 2 * i);
    return v;
#endif
}
/* 16 at each byte whose bit is set in m: the fifth bits of a vector of 64 quants */
static ALWAYS_INLINE vu8 fifth_bytes(const uint8_t *p) {
#if defined(__AVX512BW__)
    uint64_t m;
    memcpy(&m, p, 8);
    __m512i v = _mm512_maskz_mov_epi8((__mmask64)m, _mm512_set1_epi8(16));
    vu8 out;
    memcpy(&out, &v, 64);
    return out;
#else
    vu8q eight;
    memcpy(&eight, p, 8); /* the other 8 bytes are not used */
    vu8 rep = __builtin_shufflevector(eight, eight, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2,
                                      2, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6,
                                      6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7);
    const vu8 bit = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32,
                     64, 128, 1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8,
                     16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    return (vu8)((rep & bit) != 0) & 16;
#endif
}

/* acc + the dot of u's bytes (unsigned, below 128 unless `wide`) with q's, 4 pairs per lane. Wide
 * bytes (Q8_0's w + 128) are exact in vpdpbusd and plain C; AVX2's vpmaddubsw would saturate
 * them, so there the signed w = u ^ 0x80 meets q by the sign trick, and the caller adds the
 * offset it then does not need (see pack_offset_used). */
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__) || !defined(__AVX2__)
#define WIDE_EXACT 1
#else
#define WIDE_EXACT 0
#endif
static ALWAYS_INLINE vi32 dot_acc(vi32 acc, vu8 u, vs8 q, int wide) {
#if defined(__AVX512VNNI__)
    (void)wide;
    return (vi32)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)u, (__m512i)q);
#elif defined(__AVX2__)
    __m256i uh[2], qh[2], a[2];
    memcpy(uh, &u, 64);
    memcpy(qh, &q, 64);
    memcpy(a, &acc, 64);
    for (int i = 0; i < 2; i++) {
#if defined(__AVXVNNI__)
        (void)wide;
        a[i] = _mm256_dpbusd_avx_epi32(a[i], uh[i], qh[i]);
#else
        __m256i w = uh[i], x = qh[i];
        if (wide) { /* w = u ^ 0x80 signed; |w| . sign(x, w) */
            w = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80));
            x = _mm256_sign_epi8(x, w);
            w = _mm256_sign_epi8(w, w);
        }
        a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
    }
    vi32 out;
    memcpy(&out, a, 64);
    return out;
#else
    (void)wide;
    return acc + dot_c(u, q, 0);
#endif
}
/* The offset a packed format's block sum takes: none for Q8_0 where dot_acc took w signed */
static ALWAYS_INLINE int pack_offset_used(int wt) { return wt == Q8_0 && !WIDE_EXACT ? 0 : pack_offset(wt); }

static ALWAYS_INLINE vi32 broadcast4(const int8_t *q) {
    int32_t four;
    memcpy(&four, q, 4);
    return (vi32){0} + four;
}

/* out[m][r] += the dot of row 16t + r with x[m] over blocks [b0, b1) of 32, for a tile and M rows
 * of quantized x (M a constant) */
static ALWAYS_INLINE void ptile_rows(const struct qx *x, const uint8_t *tile, long K, long b0, long b1, vf *out, int M,
                                     int wt) {
    struct tile_parts parts = tile_parts(wt, K);
    int V = pack_vectors(wt);
    vf acc[MAX_ROWS];
    for (int m = 0; m < M; m++) acc[m] = out[m]; /* the sums so far, added to in the same order as in one pass */
    for (long b = b0; b < b1; b++) {
        const uint8_t *quants = tile + parts.quants + b * V * 64;
        /* the tiles lie one after another: sweep them AHEAD bytes ahead at the rate they are read,
         * a block's share (16 blocks' bytes) per block, so every line is fetched before use */
        for (long o = b * 16 * block_bytes(wt); o < (b + 1) * 16 * block_bytes(wt); o += 64)
            __builtin_prefetch(tile + PACK_AHEAD + o, 0, 3);
        vu8 u[8];
        for (int j = 0; j < V; j++) memcpy(&u[j], quants + 64 * j, 64);
        if (V == 4) { /* nibbles: weights 4j + i low, 16 + 4j + i high */
            for (int j = 0; j < 4; j++) {
                u[4 + j] = u[j] >> 4;
                u[j] &= 15;
            }
            if (has_fifth(wt))
                for (int j = 0; j < 8; j++) u[j] |= fifth_bytes(tile + parts.fifth + b * 64 + 8 * j);
        }
        vf d = halves16(tile + parts.d + b * 32), mn = {0};
        if (has_min(wt)) mn = halves16(tile + parts.m + b * 32);
        for (int m = 0; m < M; m++) {
            long at = m * x->Kp / 32 + b;
            const int8_t *q = x->q + at * 32;
            /* weight vector j meets x's 4 values 4j..4j+3 (Q8_0), or for nibbles j < 4 the low
             * ones 4j.. and j >= 4 the high ones 16 + 4(j - 4).. : the same 4j for both */
            vi32 s0 = (vi32){0} + pack_offset_used(wt) * x->qsum[at], s1 = {0};
            for (int j = 0; j < 8; j += 2) {
                s0 = dot_acc(s0, u[j], (vs8)broadcast4(q + 4 * j), wt == Q8_0);
                s1 = dot_acc(s1, u[j + 1], (vs8)broadcast4(q + 4 * j + 4), wt == Q8_0);
            }
            float dx = x->d[at];
            acc[m] += d * (__builtin_convertvector(s0 + s1, vf) * dx);
            if (has_min(wt)) acc[m] += mn * x->dsum[at];
        }
    }
    for (int m = 0; m < M; m++) out[m] = acc[m];
}


/* ------------------------------------------------------------------------------------------ */
/* Packed K-quant tiles (Q4_K, Q5_K, Q6_K): the same idea, lane r of every vector row r, laid out
 * super-block by super-block, each in PACK_ROWS times the bytes of the file's super-block (so a
 * tile is 16 times a row's bytes, as for the formats above). The quants of each sub-block of 32
 * are in the blocks-of-32 layout above: 4 vectors of nibbles (weights 4j + i low, 16 + 4j + i
 * high), then, per format, for a super-block's 16 rows:
 *   Q4_K, Q5_K: (Q5_K: 8 sub-blocks of 8 fifth-bit masks, as Q5_0's;) the 6-bit scales sc and
 *     mins m of the 8 sub-blocks in 192 bytes: lo, 128 bytes, byte 64(b / 4) + 16(b % 4) + r
 *     holds sub-block b's low 4 bits of sc (low nibble) and m (high nibble); hi, 64 bytes, byte
 *     16(b % 4) + r holds their top 2 bits, at bit 4(b / 4) for sc and 4(b / 4) + 2 for m (so a
 *     super-block's 128 scales and mins come out of three vectors with a few byte operations);
 *     then d and dmin, 16 fp16 each. Weight = d * sc * u - dmin * m.
 *   Q6_K: 8 sub-blocks of 2 vectors of top 2 bits: bits 2s, 2s + 1 of byte 4r + i of vector k
 *     are those of weight 4(4k + s) + i (the nibbles' vector 4k + s); the 16 int8 scales, one
 *     per 16 weights, byte 16k + r scale k of row r; d, 16 fp16. Weight = d * sc * (u - 32).
 * A sub-block's integer sum with x (Q6_K: each 16's, less 32 times x's sum of them, exact in
 * int32) meets d * sc in fp32, itself exact (d has 11 significant bits, sc 6, Q6_K's 8), times
 * x's block scale; the mins, dmin * m, meet x's block sums (qx's dsum). */

/* Offsets in a packed super-block of 16 rows: the fifth bits (Q5_K) or the top bits (Q6_K) after
 * the 8 sub-blocks' 256 bytes of nibbles, then the scales, then d (and dmin) */
static ALWAYS_INLINE long k_bits_at(void) { return 8 * 256; }
static ALWAYS_INLINE long k_scales_at(int wt) { return k_bits_at() + (wt == Q5_K ? 8 * 64 : wt == Q6_K ? 8 * 128 : 0); }
static ALWAYS_INLINE long k_d_at(int wt) { return k_scales_at(wt) + (wt == Q6_K ? 256 : 192); }

/* Rows [16t, 16t + 16) of w (N, row bytes), K-quants, into a tile */
static ALWAYS_INLINE void pack_ktile(const uint8_t *w, int wt, long N, long K, long t, uint8_t *tile) {
    long rb = quant_row_bytes(wt, K), bb = block_bytes(wt), sbytes = PACK_ROWS * bb;
    memset(tile, 0, K / 256 * sbytes);
    for (int r = 0; r < PACK_ROWS && t * PACK_ROWS + r < N; r++)
        for (long s = 0; s < K / 256; s++) {
            const uint8_t *blk = w + (t * PACK_ROWS + r) * rb + s * bb;
            uint8_t *st = tile + s * sbytes, *bits = st + k_bits_at(), *scales = st + k_scales_at(wt);
            vu8 chunks[4]; /* the super-block's unsigned quants as the products above unpack them */
            vf scale[4], bias;
            unpack_k(blk, chunks, scale, &bias, wt);
            uint8_t quants[256];
            memcpy(quants, chunks, 256);
            for (int b = 0; b < 8; b++) {
                const uint8_t *u = quants + 32 * b;
                for (int l = 0; l < 16; l++) /* vector l / 4, byte 4r + l % 4: weights l and 16 + l */
                    st[256 * b + 64 * (l / 4) + 4 * r + l % 4] = (uint8_t)((u[l] & 15) | (u[l + 16] & 15) << 4);
                for (int l = 0; l < 32; l++) {
                    int lane = 4 * r + l % 4; /* the weight's byte in its vector of the nibbles */
                    if (wt == Q5_K) bits[64 * b + 8 * (l / 4) + lane / 8] |= (uint8_t)(u[l] >> 4 << lane % 8);
                    if (wt == Q6_K) bits[128 * b + 64 * (l / 16) + lane] |= (uint8_t)(u[l] >> 4 << 2 * (l % 16 / 4));
                }
                if (wt == Q6_K) {
                    scales[16 * (2 * b) + r] = blk[192 + 2 * b];
                    scales[16 * (2 * b + 1) + r] = blk[192 + 2 * b + 1];
                } else {
                    int sc, mn;
                    scale_min_k4(b, blk + 4, &sc, &mn);
                    scales[64 * (b / 4) + 16 * (b % 4) + r] = (uint8_t)((sc & 15) | (mn & 15) << 4);
                    scales[128 + 16 * (b % 4) + r] |= (uint8_t)((sc >> 4 | (mn >> 4) << 2) << 4 * (b / 4));
                }
            }
            memcpy(st + k_d_at(wt) + 2 * r, blk + (wt == Q6_K ? 208 : 0), 2);
            if (wt != Q6_K) memcpy(st + k_d_at(wt) + 32 + 2 * r, blk + 2, 2);
        }
}

/* The 16 bytes at 16i of v, widened to 16 int32 lanes */
static ALWAYS_INLINE vi32 quarter_u8(vu8 v, int i) {
    vu8q q;
    switch (i) {
    case 0: q = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); break;
    case 1: q = __builtin_shufflevector(v, v, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31); break;
    case 2: q = __builtin_shufflevector(v, v, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47); break;
    default: q = __builtin_shufflevector(v, v, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63);
    }
    return __builtin_convertvector(q, vi32);
}
static ALWAYS_INLINE vi32 int8s(const uint8_t *p) {
    vs8q q;
    memcpy(&q, p, 16);
    return __builtin_convertvector(q, vi32);
}

/* Q6_K's top 2 bits of the weights of nibble vector 4k + s, at bits 4 and 5 of each byte */
static ALWAYS_INLINE vu8 top_bits(vu8 top, int s) {
    switch (s) { /* (top >> 2s & 3) << 4, one shift each */
    case 0: return (top << 4) & 0x30;
    case 1: return (top << 2) & 0x30;
    case 2: return top & 0x30;
    default: return (top >> 2) & 0x30;
    }
}

/* out[m][r] += the dot of row 16t + r with x[m] over super-blocks [s0, s1), for a K-quant tile and M
 * rows of quantized x (M a constant).
 * Each sub-block's scale d * sc (and min dmin * m) is made once for the M rows, in fp32: exact,
 * as d has 11 significant bits and sc 6 (Q6_K's 8). */
static ALWAYS_INLINE void kptile_rows(const struct qx *x, const uint8_t *tile, long s0, long s1, vf *out, int M,
                                      int wt) {
    long sbytes = PACK_ROWS * block_bytes(wt);
    vf acc[MAX_ROWS];
    for (int m = 0; m < M; m++) acc[m] = out[m];
    for (long s = s0; s < s1; s++) {
        const uint8_t *st = tile + s * sbytes, *scales = st + k_scales_at(wt);
        vf d = halves16(st + k_d_at(wt)), dmin = wt == Q6_K ? (vf){0} : halves16(st + k_d_at(wt) + 32);
        vu8 sc[2] = {{0}}, mn[2] = {{0}};
        if (wt != Q6_K) {
            vu8 lo[2], hi;
            memcpy(lo, scales, 128);
            memcpy(&hi, scales + 128, 64);
            for (int h = 0; h < 2; h++) {
                sc[h] = (lo[h] & 15) | ((hi >> (4 * h)) & 3) << 4;
                mn[h] = (lo[h] >> 4) | ((hi >> (4 * h + 2)) & 3) << 4;
            }
        }
        for (int b = 0; b < 8; b++) {
            for (long o = b * sbytes / 8; o < (b + 1) * sbytes / 8; o += 64)
                __builtin_prefetch(st + PACK_AHEAD + o, 0, 3);
            vu8 u[8];
            memcpy(u, st + 256 * b, 256);
            for (int j = 0; j < 4; j++) {
                u[4 + j] = u[j] >> 4;
                u[j] &= 15;
            }
            if (wt == Q5_K)
                for (int j = 0; j < 8; j++) u[j] |= fifth_bytes(st + k_bits_at() + 64 * b + 8 * j);
            if (wt == Q6_K) {
                vu8 top[2];
                memcpy(top, st + k_bits_at() + 128 * b, 128);
                for (int j = 0; j < 8; j++) u[j] |= top_bits(top[j / 4], j % 4);
            }
            /* Q6_K: the scales of weights 0-15 and 16-31; the others: the sub-block's, and its min */
            vi32 first = wt == Q6_K ? int8s(scales + 32 * b) : quarter_u8(sc[b / 4], b % 4);
            vf sc0 = d * __builtin_convertvector(first, vf);
            vf sc1 = wt == Q6_K ? d * __builtin_convertvector(int8s(scales + 32 * b + 16), vf)
                               : dmin * __builtin_convertvector(quarter_u8(mn[b / 4], b % 4), vf);
            for (int m = 0; m < M; m++) {
                long at = m * x->Kp / 32 + s * 8 + b;
                const int8_t *q = x->q + at * 32;
                float dx = x->d[at];
                vi32 lo = {0}, hi = {0};
                if (wt == Q6_K) { /* weights 0-15 and 16-31, each less 32 * their sum of x */
                    lo += -32 * x->qsum16[2 * at];
                    hi += -32 * x->qsum16[2 * at + 1];
                    for (int j = 0; j < 4; j++) {
                        lo = dot_acc(lo, u[j], (vs8)broadcast4(q + 4 * j), 0);
                        hi = dot_acc(hi, u[j + 4], (vs8)broadcast4(q + 4 * j + 16), 0);
                    }
                    acc[m] += __builtin_convertvector(lo, vf) * (sc0 * dx);
                    acc[m] += __builtin_convertvector(hi, vf) * (sc1 * dx);
                } else { /* two chains, even and odd j */
                    for (int j = 0; j < 8; j += 2) {
                        lo = dot_acc(lo, u[j], (vs8)broadcast4(q + 4 * j), 0);
                        hi = dot_acc(hi, u[j + 1], (vs8)broadcast4(q + 4 * j + 4), 0);
                    }
                    acc[m] += __builtin_convertvector(lo + hi, vf) * (sc0 * dx) - sc1 * x->dsum[at];
                }
            }
        }
    }
    for (int m = 0; m < M; m++) out[m] = acc[m];
}

/* Output rows [n0, n1) (whole tiles, the last may pass N) of packed w against M rows of x.
 * Prefill's many rows of x meet a tile CHUNK weights at a time, so that the chunk of the tile
 * stays in L1 while each group of rows reads it; and the rows meet the tiles a block of rows at
 * a time (their sums in `acc`), as many as keep about X_CACHE bytes of x, which each tile reads
 * again, in L2. Against a whole tile per group of rows and all of x per tile, 64 rows of x
 * against 512 rows of weights are 6% (Q4_0, K = 3584) to 12% (Q6_K, K = 18944) faster. */
enum { CHUNK = 1024, ROWS_AT_ONCE = 128, X_CACHE = 1 << 19 };
static ALWAYS_INLINE void ptile_product(const struct qx *qx, const uint8_t *w, int wt, const void *b, void *y,
                                        enum dtype xt, long M, long N, long K, long n0, long n1) {
    long tb = PACK_ROWS * quant_row_bytes(wt, K), unit = is_k(wt) ? 256 : 32, units = K / unit;
    long rows = X_CACHE / qx->Kp / 8 * 8;
    rows = rows < 8 ? 8 : rows > ROWS_AT_ONCE ? ROWS_AT_ONCE : rows;
    vf acc[ROWS_AT_ONCE];
    for (long m0 = 0; m0 < M; m0 += rows) {
        long mc = M - m0 < rows ? M - m0 : rows;
        for (long t = n0 / PACK_ROWS; t * PACK_ROWS < n1; t++) {
            const uint8_t *tile = w + t * tb;
            for (long m = 0; m < mc; m++) acc[m] = (vf){0};
            for (long c0 = 0; c0 < units; c0 += CHUNK / unit) {
                long c1 = c0 + CHUNK / unit < units ? c0 + CHUNK / unit : units;
                for (long m = m0; m < m0 + mc;) {
                    /* K-quants also have a copy for 8 rows of x, their unpacking being dearer:
                     * prefill 15-20% faster; blocks of 32 gain nothing from it */
                    int n = is_k(wt) && m0 + mc - m >= 8 ? 8 : m0 + mc - m >= 4 ? 4 : 1;
                    struct qx part = *qx;
                    part.q = qx->q + m * qx->Kp;
                    part.d = qx->d + m * qx->Kp / 32;
                    part.qsum = qx->qsum + m * qx->Kp / 32;
                    part.qsum16 = qx->qsum16 + m * qx->Kp / 16;
                    part.dsum = qx->dsum + m * qx->Kp / 32;
                    vf *o = acc + (m - m0);
                    if (is_k(wt) && n == 8)
                        kptile_rows(&part, tile, c0, c1, o, 8, wt);
                    else if (is_k(wt) && n == 4)
                        kptile_rows(&part, tile, c0, c1, o, 4, wt);
                    else if (is_k(wt))
                        kptile_rows(&part, tile, c0, c1, o, 1, wt);
                    else if (n == 4)
                        ptile_rows(&part, tile, K, c0, c1, o, 4, wt);
                    else
                        ptile_rows(&part, tile, K, c0, c1, o, 1, wt);
                    m += n;
                }
            }
            for (long m = 0; m < mc; m++) {
                float lanes[16];
                memcpy(lanes, &acc[m], 64);
                for (int r = 0; r < PACK_ROWS && t * PACK_ROWS + r < N; r++) {
                    long row = t * PACK_ROWS + r;
                    float v = lanes[r];
                    if (b) v += xt == F32 ? ((const float *)b)[row] : bf16_to_f32(((const uint16_t *)b)[row]);
                    if (xt == F32)
                        ((float *)y)[(m0 + m) * N + row] = v;
                    else
                        ((uint16_t *)y)[(m0 + m) * N + row] = f32_to_bf16(v);
                }
            }
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
    case Q8_0 | PACKED: ptile_product(qx, w, Q8_0, b, y, xt, M, N, K, n0, n1); break;
    case Q4_0 | PACKED: ptile_product(qx, w, Q4_0, b, y, xt, M, N, K, n0, n1); break;
    case Q4_1 | PACKED: ptile_product(qx, w, Q4_1, b, y, xt, M, N, K, n0, n1); break;
    case Q5_0 | PACKED: ptile_product(qx, w, Q5_0, b, y, xt, M, N, K, n0, n1); break;
    case Q5_1 | PACKED: ptile_product(qx, w, Q5_1, b, y, xt, M, N, K, n0, n1); break;
    case Q4_K | PACKED: ptile_product(qx, w, Q4_K, b, y, xt, M, N, K, n0, n1); break;
    case Q5_K | PACKED: ptile_product(qx, w, Q5_K, b, y, xt, M, N, K, n0, n1); break;
    case Q6_K | PACKED: ptile_product(qx, w, Q6_K, b, y, xt, M, N, K, n0, n1); break;
    }
}

/* claim for weights of row_bytes per row; where wt is packed, in whole tiles (n1 at most N) */
INTERNAL int quant_claim(long *next, int wt, long N, long row_bytes, int nt, long *n0, long *n1) {
    long least = least_rows(row_bytes);
    if (!(wt & PACKED)) return claim(next, N, least, nt, n0, n1);
    long tiles = (N + PACK_ROWS - 1) / PACK_ROWS, t0, t1;
    if (!claim(next, tiles, least / PACK_ROWS > 1 ? least / PACK_ROWS : 1, nt, &t0, &t1)) return 0;
    *n0 = t0 * PACK_ROWS;
    *n1 = t1 * PACK_ROWS < N ? t1 * PACK_ROWS : N;
    return 1;
}

/* Products of blocks of output rows taken from *next (common.h's claim) until none is left */
INTERNAL void qgemv_part(const struct qx *qx, const void *x, enum dtype xt, const void *w, int wt, const void *b,
                         void *y, long M, long N, long K, long *next, int nt) {
    long n0, n1, rb = quant_row_bytes(wt, K);
    while (quant_claim(next, wt, N, rb, nt, &n0, &n1)) qgemv_rows(qx, x, xt, w, wt, b, y, M, N, K, n0, n1);
}

INTERNAL int quant_sizes_ok(int wt, long M, long N, long K) {
    return M >= 1 && (M <= MAX_ROWS || wt & PACKED) && N >= 1 && quant_row_bytes(wt, K) > 0;
}

int qwenkit_qgemv(const float *x, const void *w, int wtype, const float *b, float *y, long M, long N, long K,
                  int threads) {
    if (!quant_sizes_ok(wtype, M, N, K) || threads < 1) return -1;
    void *mem = wtype == F16 ? NULL : malloc(qx_bytes(M, K));
    if (wtype != F16 && !mem) return -2;
    struct qx qx = {0};
    if (mem) qx = qx_layout(M, K, mem);
    long next = 0;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        if (mem) { /* each thread its share of x's rows (prefill's are hundreds) */
            quantize_rows(&qx, x, F32, K, M * t / nt, M * (t + 1) / nt);
#pragma omp barrier
        }
        qgemv_part(&qx, x, F32, w, wtype, b, y, M, N, K, &next, nt);
    }
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

int qwenkit_pack(const void *w, int wtype, long N, long K, void *out, int threads) {
    if (!packable(wtype) || N < 1 || quant_row_bytes(wtype, K) == 0 || threads < 1) return -1;
    long tiles = (N + PACK_ROWS - 1) / PACK_ROWS, tb = PACK_ROWS * quant_row_bytes(wtype, K);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < tiles; t++) {
        uint8_t *tile = (uint8_t *)out + t * tb;
        switch (wtype) { /* the K-quants' with the format a constant */
        case Q4_K: pack_ktile(w, Q4_K, N, K, t, tile); break;
        case Q5_K: pack_ktile(w, Q5_K, N, K, t, tile); break;
        case Q6_K: pack_ktile(w, Q6_K, N, K, t, tile); break;
        default: pack_tile(w, wtype, N, K, t, tile);
        }
    }
    return 0;
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
