/* What the kernels share: 16-lane fp32 vectors (GCC/Clang vector extensions, compiled to the
 * machine's own SIMD), bf16 <-> fp32 conversion as PyTorch rounds, and vector loads. */
#ifndef QWENKIT_KERNELS_COMMON_H
#define QWENKIT_KERNELS_COMMON_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float vf __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(64)));

#define SAME(v) (v)

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as PyTorch does */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline vf load_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store_f32(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf round_f32(vf v) { return v; }
static inline vf load_bf16(const uint16_t *p) { /* 16 bf16 -> 16 fp32, exact */
    vh h; memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f; memcpy(&f, &u, sizeof f); return f;
}
/* 16 fp32 -> 16 bf16 as f32_to_bf16 rounds each, and the fp32 value of that rounding */
static inline vu bf16_bits(vf f) {
    vu u;
    memcpy(&u, &f, sizeof u);
    vu nan = (vu)((u & 0x7fffffff) > 0x7f800000);
    return (((u >> 16) | 0x40) & nan) | (((u + 0x7fff + ((u >> 16) & 1)) >> 16) & ~nan);
}
static inline void store_bf16(uint16_t *p, vf f) {
    vh h = __builtin_convertvector(bf16_bits(f), vh);
    memcpy(p, &h, sizeof h);
}
static inline vf round_bf16(vf f) {
    vu u = bf16_bits(f) << 16;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The sum of the lanes as a tree (8 pairs, then 4, 2, 1): four dependent additions, not fifteen,
 * so a row's sum does not hold up the stream; the same order on every machine. */
static inline float hsum(vf v) {
#if defined(__AVX512F__) /* the same tree in four shuffles */
    __m512 m;
    memcpy(&m, &v, sizeof m);
    return _mm512_reduce_add_ps(m);
#else
    for (int w = 8; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) v[i] += v[i + w];
    return v[0];
#endif
}

/* e^x in 16 lanes, within 2 ulp of expf, for softmax and SiLU: Cephes' expf (a degree-5 polynomial
 * on [-ln2/2, ln2/2] after taking out the power of two). x is clamped to [-87.3, 88.3], so that the
 * power of two stays normal: e^x of a lower x comes out as 1e-38, not 0, which neither a softmax
 * over maxima-shifted scores nor x / (1 + e^-x) can tell apart. */
typedef int32_t vi32 __attribute__((vector_size(64)));
static inline vf exp_vf(vf x) {
    vf n;
#if defined(__AVX512F__) /* GCC leaves the loop below as sixteen scalar roundings */
    __m512 m;
    memcpy(&m, &x, sizeof m);
    /* the constant first: vmaxps and vminps return their second operand where either is NaN */
    m = _mm512_min_ps(_mm512_set1_ps(88.3762f), _mm512_max_ps(_mm512_set1_ps(-87.3365f), m));
    memcpy(&x, &m, sizeof x);
    vf t = x * 1.44269504088896341f + 0.5f;
    memcpy(&m, &t, sizeof m);
    m = _mm512_roundscale_ps(m, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    memcpy(&n, &m, sizeof n);
#else
    for (int i = 0; i < 16; i++) {
        float c = x[i] < -87.3365f ? -87.3365f : x[i] > 88.3762f ? 88.3762f : x[i];
        x[i] = c;
        n[i] = __builtin_floorf(c * 1.44269504088896341f + 0.5f);
    }
#endif
    vf r = x - n * 0.693359375f - n * -2.12194440e-4f; /* x - n ln2, ln2 in two parts */
    vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi32 e = (__builtin_convertvector(n, vi32) + 127) << 23; /* 2^n */
    vf two_n;
    memcpy(&two_n, &e, sizeof two_n);
    return p * two_n;
}

#define MAX_ROWS 8 /* rows of x per call (qwenkit.kernels.MAX_ROWS) */

/* The next block [n0, n1) of N output rows for the calling thread, or 0 when all are taken. The
 * threads share `*next` (0 at the start) and take blocks as they go, 1/nt of what is left but at
 * least `least` rows: a thread that streams faster takes more, so the threads finish within one
 * small block of each other, where fixed halves could leave one waiting on the other for several
 * percent of the time. Each new block costs its thread a restart of the stream: with 1/(2 nt) of
 * what is left (2.4 times the blocks), bf16 products at batch 1 read 57-59 GB/s against 65-66
 * here for 896 x 896 weights, 69-71 against 74-76 for 896 x 4864, 78-79 against 84 for the
 * 151936 x 896 head (alternating builds, a reduction reading 77-79 GB/s). */
static inline int claim(long *next, long N, long least, int nt, long *n0, long *n1) {
    long left = N - __atomic_load_n(next, __ATOMIC_RELAXED);
    long size = left / nt > least ? left / nt : least;
    long start = __atomic_fetch_add(next, size, __ATOMIC_RELAXED);
    if (start >= N) return 0;
    *n0 = start;
    *n1 = start + size < N ? start + size : N;
    return 1;
}

/* rows of a block: about 64 KB of weights, 4 to 32 rows */
static inline long least_rows(long row_bytes) {
    long rows = 65536 / (row_bytes > 0 ? row_bytes : 1);
    return rows < 4 ? 4 : rows > 32 ? 32 : rows;
}

/* What decode.c runs inside its own parallel region: gemv.c's products of rows [n0, n1), or of
 * blocks claimed from *next, attention.c's attention for thread t, and norm.c's norm (one
 * thread). Internal to the library. */
#define INTERNAL __attribute__((visibility("hidden")))
INTERNAL void qwenkit_gemv_f32_rows(const float *x, const float *w, const void *scale, const float *b, float *y,
                                    long M, long N, long K, long n0, long n1);
INTERNAL void qwenkit_gemv_bf16_rows(const uint16_t *x, const uint16_t *w, const void *scale, const uint16_t *b,
                                     uint16_t *y, long M, long N, long K, long n0, long n1);
INTERNAL void qwenkit_gemv_f32_part(const float *x, const float *w, const void *scale, const float *b, float *y,
                                    long M, long N, long K, long *next, int nt);
INTERNAL void qwenkit_gemv_bf16_part(const uint16_t *x, const uint16_t *w, const void *scale, const uint16_t *b,
                                     uint16_t *y, long M, long N, long K, long *next, int nt);
INTERNAL int qwenkit_decode_attention_f32_part(const float *q, const float *k, const float *v, const float *cos,
                                               const float *sin, float *kc, float *vc, const int64_t *slot,
                                               const uint8_t *valid, float *out, long B, long H, long K, long S,
                                               long D, int t, int nt);
INTERNAL int qwenkit_decode_attention_bf16_part(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                                                const uint16_t *cos, const uint16_t *sin, uint16_t *kc, uint16_t *vc,
                                                const int64_t *slot, const uint8_t *valid, uint16_t *out, long B,
                                                long H, long K, long S, long D, int t, int nt);
INTERNAL int attention_sizes_ok(const int64_t *slot, long B, long H, long K, long S, long D);
int qwenkit_rms_norm_f32(const float *x, const float *w, float *y, long rows, long C, float eps);
int qwenkit_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, long rows, long C, float eps);

#endif
