/* What the kernels share: the element types and how to load, round and store them, one at a time
 * and as 16-lane fp32 vectors (GCC/Clang vector extensions, compiled to the machine's own SIMD);
 * bf16 <-> fp32 conversion as PyTorch rounds; the lanes' sum, e^x, and how threads share out rows.
 *
 * Each kernel is written once, over `void *` data and an `enum dtype`: its body is an always-inline
 * function, and each caller passes the type as a constant, so the compiler builds one copy of the
 * body per type with every branch on the type folded away. The one place where the type is not a
 * constant is inside an OpenMP parallel region: the compiler outlines the region into a function of
 * its own before it propagates constants, so code there branches on the type once (gemv_rows,
 * attention_part, decode_layers' region) and calls a body with a constant in each branch.
 */
#ifndef QWENKIT_KERNELS_COMMON_H
#define QWENKIT_KERNELS_COMMON_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define ALWAYS_INLINE inline __attribute__((always_inline))
/* Functions that one source defines for another's use, not exported from the library */
#define INTERNAL __attribute__((visibility("hidden")))

#define MAX_ROWS 8 /* rows of x per call (qwenkit.kernels.MAX_ROWS) */

/* The element types: fp32; bf16, as the uint16_t bit pattern; int8 (gemv's weights only); and the
 * weight formats of quant.c, each numbered as ggml numbers it (GGUF's tensor types, which
 * qwenkit.cpu.ops passes as they are). */
enum dtype { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14,
             INT8 = 24, BF16 = 30 };
/* A block format's number plus PACKED: its rows repacked in tiles of PACK_ROWS (quant.c's pack) */
#define PACKED 64
#define PACK_ROWS 16

typedef float vf __attribute__((vector_size(64)));     /* 16 fp32 lanes */
typedef uint16_t vh __attribute__((vector_size(32)));  /* 16 bf16 bit patterns */
typedef uint32_t vu __attribute__((vector_size(64)));  /* 16 fp32 bit patterns */
typedef int32_t vi32 __attribute__((vector_size(64))); /* 16 int32 lanes */
typedef int8_t vi8 __attribute__((vector_size(16)));   /* 16 int8 lanes */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as PyTorch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline vf load_f32(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void store_f32(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf load_bf16(const uint16_t *p) { /* 16 bf16 -> 16 fp32, exact */
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
}
/* 16 fp32 -> 16 bf16 as f32_to_bf16 rounds each, in the low half of each lane */
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
static inline vf round_bf16(vf f) { /* the fp32 value of store_bf16's rounding */
    vu u = bf16_bits(f) << 16;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline vf load_i8(const int8_t *p) { /* 16 int8 -> 16 fp32, exact */
#if defined(__AVX512F__) /* GCC turns the generic conversion below into byte-by-byte code */
    __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    vf v;
    memcpy(&v, &f, sizeof v);
    return v;
#else
    vi8 b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(__builtin_convertvector(b, vi32), vf);
#endif
}

/* The same over any type: element i of p (or 16 from i) as fp32, exactly; stored rounded to the
 * type (to nearest even, as PyTorch); and the fp32 value of that rounding. Stores take F32 or BF16. */
static ALWAYS_INLINE long dtype_size(enum dtype dt) { return dt == F32 ? 4 : dt == BF16 || dt == F16 ? 2 : 1; }
static ALWAYS_INLINE void *at(const void *p, long i, enum dtype dt) { /* the address of element i */
    return (char *)p + i * dtype_size(dt);
}
static ALWAYS_INLINE float load(const void *p, long i, enum dtype dt) {
    if (dt == F32) return ((const float *)p)[i];
    if (dt == BF16) return bf16_to_f32(((const uint16_t *)p)[i]);
    return (float)((const int8_t *)p)[i];
}
static ALWAYS_INLINE void store(void *p, long i, float f, enum dtype dt) {
    if (dt == BF16)
        ((uint16_t *)p)[i] = f32_to_bf16(f);
    else
        ((float *)p)[i] = f;
}
static ALWAYS_INLINE float round_to(float f, enum dtype dt) { return dt == BF16 ? bf16_to_f32(f32_to_bf16(f)) : f; }
static ALWAYS_INLINE vf vload(const void *p, long i, enum dtype dt) {
    if (dt == F32) return load_f32((const float *)p + i);
    if (dt == BF16) return load_bf16((const uint16_t *)p + i);
    return load_i8((const int8_t *)p + i);
}
static ALWAYS_INLINE void vstore(void *p, long i, vf v, enum dtype dt) {
    if (dt == BF16)
        store_bf16((uint16_t *)p + i, v);
    else
        store_f32((float *)p + i, v);
}
static ALWAYS_INLINE vf vround(vf v, enum dtype dt) { return dt == BF16 ? round_bf16(v) : v; }

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

/* The next block [n0, n1) of N output rows for the calling thread, or 0 when all are taken. The
 * threads share `*next` (0 at the start) and take blocks as they go, 1/nt of what is left but at
 * least `least` rows: a thread that streams faster takes more, so the threads finish within one
 * small block of each other, where fixed halves could leave one waiting on the other for several
 * percent of the time. Each new block costs its thread a restart of the stream, so blocks do not
 * get smaller than that: smaller ones (1/(2 nt) of what is left) measured slower; see
 * benchmarks/README.md. */
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

/* What decode.c runs inside its own parallel region, for data of type dt (F32 or BF16; INT8 for
 * gemv's w, with x, b and y in F32): gemv.c's products of output rows [n0, n1), or of blocks
 * claimed from *next until none is left; attention.c's attention for thread t of nt; norm.c's
 * norm (one thread). */
INTERNAL void gemv_rows(const void *x, const void *w, const uint16_t *scale, const void *b, void *y, long M, long N,
                        long K, long n0, long n1, enum dtype wt);
INTERNAL void gemv_part(const void *x, const void *w, const uint16_t *scale, const void *b, void *y, long M, long N,
                        long K, long *next, int nt, enum dtype wt);
INTERNAL int attention_part(const void *q, const void *k, const void *v, const void *cos, const void *sin, void *kc,
                            void *vc, const int64_t *slot, const uint8_t *valid, void *out, long B, long H, long K,
                            long S, long D, int t, int nt, enum dtype dt);
INTERNAL int attention_sizes_ok(const int64_t *slot, long B, long H, long K, long S, long D);
INTERNAL void rms_norm(const void *x, const void *w, void *y, long rows, long C, float eps, enum dtype dt);

/* quant.c's products with weights in a block format (wt, an enum dtype from F16 to Q6_K): the
 * activations quantized once (quantize_x, into qx_bytes of memory), then the products of output
 * rows [n0, n1) or of claimed blocks, as gemv.c's; quant_row_bytes is 0 where wt does not take K. */
struct qx { /* per row of K, padded with zeros to Kp (a multiple of 256) */
    int8_t *q;     /* (Kp,) */
    float *lane;   /* (Kp / 4,): the scale of each 4 values' block of 32 */
    float *sum16;  /* (Kp / 16,): the dequantized sum of each 16 values */
    float *d;      /* (Kp / 32,): each block of 32's scale */
    int32_t *qsum; /* (Kp / 32,): each block of 32's sum of q */
    int32_t *qsum16; /* (Kp / 16,): each 16 values' sum of q (Q6_K's offset meets it) */
    float *dsum;     /* (Kp / 32,): d * qsum, each block of 32's dequantized sum (the mins meet it) */
    long Kp;
};
INTERNAL long quant_row_bytes(int wt, long K);
INTERNAL long qx_bytes(long M, long K);
INTERNAL struct qx quantize_x(const void *x, enum dtype xt, long M, long K, void *mem);
INTERNAL void qgemv_rows(const struct qx *qx, const void *x, enum dtype xt, const void *w, int wt, const void *b,
                         void *y, long M, long N, long K, long n0, long n1);
INTERNAL void qgemv_part(const struct qx *qx, const void *x, enum dtype xt, const void *w, int wt, const void *b,
                         void *y, long M, long N, long K, long *next, int nt);
/* claim's blocks of output rows for weights of row_bytes a row, in whole tiles of PACK_ROWS where
 * wt has PACKED (n1 at most N) */
INTERNAL int quant_claim(long *next, int wt, long N, long row_bytes, int nt, long *n0, long *n1);

#endif
