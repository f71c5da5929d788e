/* The matrix-vector products of decoding: y[m, n] = sum_k x[m, k] w[n, k] (+ b[n]) for 1 to 8
 * rows of x, in fp32 or bf16 (accumulated in fp32, rounded once); and for int8 weights with one
 * scale per output row (qwenkit.quant), x in fp32.
 *
 * Decoding reads every weight once per token, so it runs at the speed of memory. Each thread takes
 * a contiguous block of output rows and streams through them; the rows of x stay in L1. Every
 * output element is summed in the same order whatever the number of rows, so a batched product
 * equals the products of its rows alone, bit for bit.
 *
 * Built by qwenkit/kernels/__init__.py with -O3 -march=native -fopenmp. AVX-512 BF16 machines use
 * vdpbf16ps, AVX-512 machines a vector sign extension for int8; elsewhere GCC/Clang vector
 * extensions compile to the machine's own SIMD.
 */
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "common.h"

#define STEP 32 /* elements of a weight row per inner step */
/* How far ahead of its reads a thread asks for the weight's cache lines, in bytes. The hardware
 * prefetcher alone leaves these products well below what the memory gives. A 272 MB weight on
 * 2 threads of this project's CPU, alternating builds, in its fast regime (a reduction reading
 * 77 GB/s), GB/s without / with: bf16 at 1, 4 and 8 rows 67-73 / 78-82, 60-64 / 77-78, 47-49 / 64;
 * int8 58 / 74, 40 / 41, 16 / 21; fp32 at 4 and 8 rows 58 / 70, 27 / 38. fp32 at one row is the
 * exception, 79 / 72-76 (two prefetches to each step's two loads), so it goes without. 512 bytes
 * ahead was worse than none, 4 and 16 KB no better than 8. Lines past a block's end are another
 * thread's or past the weight: a prefetch never faults. */
#define AHEAD 8192
#define PREFETCH(w, bytes) \
    for (int o_ = 0; o_ < (bytes); o_ += 64) __builtin_prefetch((const char *)(w) + AHEAD + o_, 0, 3)

/* int8 weights (one scale per output row, applied in the caller's loop) against fp32 rows of x */
typedef int8_t vb __attribute__((vector_size(16)));
typedef int32_t vi __attribute__((vector_size(64)));
static inline vf load_i8(const int8_t *p) {
#if defined(__AVX512F__) /* GCC turns the generic conversion below into byte-by-byte code */
    __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    vf v; memcpy(&v, &f, sizeof v); return v;
#else
    vb b; memcpy(&b, p, sizeof b);
    return __builtin_convertvector(__builtin_convertvector(b, vi), vf);
#endif
}
#define TO_FLOAT(v) ((float)(v))

/* out[m] = dot(w_row, x[m]) for M rows of x; M is a constant in each copy, so the sums stay in
 * registers. Two sums per row, over alternate 16-element blocks; the tail in scalar code. */
#define ROW_VEC(NAME, XT, WT, LOAD_X, LOAD_W, X_F32, W_F32, M) \
static inline __attribute__((always_inline)) void NAME##_##M( \
        const XT *x, const WT *w, long K, long kv, float *out) { \
    vf a[M], c[M]; \
    for (int m = 0; m < M; m++) a[m] = c[m] = (vf){0}; \
    for (long k = 0; k < kv; k += STEP) { \
        if (sizeof(WT) < 4 || M > 1) PREFETCH(w + k, STEP * (int)sizeof(WT)); \
        vf w0 = LOAD_W(w + k), w1 = LOAD_W(w + k + 16); \
        for (int m = 0; m < M; m++) { a[m] += w0 * LOAD_X(x + m * K + k); c[m] += w1 * LOAD_X(x + m * K + k + 16); } \
    } \
    for (int m = 0; m < M; m++) { \
        float s = hsum(a[m] + c[m]); \
        for (long k = kv; k < K; k++) s += W_F32(w[k]) * X_F32(x[m * K + k]); \
        out[m] = s; \
    } \
}
#define ROW_F32(M) ROW_VEC(row_f32, float, float, load_f32, load_f32, SAME, SAME, M)
#define ROW_I8(M) ROW_VEC(row_i8, float, int8_t, load_f32, load_i8, SAME, TO_FLOAT, M)

#if defined(__AVX512BF16__) /* 32 bf16 pairs per vdpbf16ps */
#define ROW_BF16(M) \
static inline __attribute__((always_inline)) void row_bf16_##M( \
        const uint16_t *x, const uint16_t *w, long K, long kv, float *out) { \
    __m512 a[M]; \
    for (int m = 0; m < M; m++) a[m] = _mm512_setzero_ps(); \
    for (long k = 0; k < kv; k += STEP) { \
        PREFETCH(w + k, 64); \
        __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k); \
        for (int m = 0; m < M; m++) a[m] = _mm512_dpbf16_ps(a[m], wv, (__m512bh)_mm512_loadu_si512(x + m * K + k)); \
    } \
    for (int m = 0; m < M; m++) { \
        float s = _mm512_reduce_add_ps(a[m]); \
        for (long k = kv; k < K; k++) s += bf16_to_f32(w[k]) * bf16_to_f32(x[m * K + k]); \
        out[m] = s; \
    } \
}
#else
#define ROW_BF16(M) ROW_VEC(row_bf16, uint16_t, uint16_t, load_bf16, load_bf16, bf16_to_f32, bf16_to_f32, M)
#endif

#define FOR_EACH_ROW_COUNT(ROW) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5) ROW(6) ROW(7) ROW(8)
FOR_EACH_ROW_COUNT(ROW_F32)
FOR_EACH_ROW_COUNT(ROW_BF16)
FOR_EACH_ROW_COUNT(ROW_I8)

/* y[m, n] = dot(x[m], w[n]) * scale[n] + b[n] (scale only for int8), for output rows [n0, n1).
 * NAME##_part takes blocks of rows from *next (common.h's claim) until none is left, for callers
 * already inside a parallel region (decode.c); NAME checks the sizes and runs every block. */
#define GEMV(NAME, XT, WT, ROW, SCALE_T, TO_F32, FROM_F32) \
INTERNAL void NAME##_rows(const XT *x, const WT *w, const SCALE_T *scale, const XT *b, XT *y, long M, long N, \
                          long K, long n0, long n1) { \
    long kv = K - K % STEP; \
    float o[MAX_ROWS]; \
    for (long n = n0; n < n1; n++) { \
        const WT *wn = w + n * K; \
        switch (M) { \
        case 1: ROW##_1(x, wn, K, kv, o); break; case 2: ROW##_2(x, wn, K, kv, o); break; \
        case 3: ROW##_3(x, wn, K, kv, o); break; case 4: ROW##_4(x, wn, K, kv, o); break; \
        case 5: ROW##_5(x, wn, K, kv, o); break; case 6: ROW##_6(x, wn, K, kv, o); break; \
        case 7: ROW##_7(x, wn, K, kv, o); break; default: ROW##_8(x, wn, K, kv, o); \
        } \
        float s_n = scale ? bf16_to_f32(((const uint16_t *)scale)[n]) : 1.0f; \
        for (long m = 0; m < M; m++) { \
            float v = scale ? o[m] * s_n : o[m]; \
            y[m * N + n] = FROM_F32(b ? v + TO_F32(b[n]) : v); \
        } \
    } \
} \
INTERNAL void NAME##_part(const XT *x, const WT *w, const SCALE_T *scale, const XT *b, XT *y, long M, long N, \
                          long K, long *next, int nt) { \
    long n0, n1, least = least_rows(K * (long)sizeof(WT)); \
    while (claim(next, N, least, nt, &n0, &n1)) NAME##_rows(x, w, scale, b, y, M, N, K, n0, n1); \
} \
int NAME(const XT *x, const WT *w, const SCALE_T *scale, const XT *b, XT *y, long M, long N, long K, int threads) { \
    if (M < 1 || M > MAX_ROWS || N < 1 || K < 1 || threads < 1) return -1; \
    long next = 0; \
    _Pragma("omp parallel num_threads(threads)") \
    NAME##_part(x, w, scale, b, y, M, N, K, &next, omp_get_num_threads()); \
    return 0; \
}

GEMV(qwenkit_gemv_f32, float, float, row_f32, void, SAME, SAME)
GEMV(qwenkit_gemv_bf16, uint16_t, uint16_t, row_bf16, void, bf16_to_f32, f32_to_bf16)
/* int8 weight-only: x in fp32, scales in bf16 (Int8Linear's), y in fp32 */
GEMV(qwenkit_gemv_int8, float, int8_t, row_i8, uint16_t, SAME, SAME)
