/* The matrix-vector products of decoding: y[m, n] = sum_k x[m, k] w[n, k] (+ b[n]) for 1 to 8
 * rows of x, in fp32 or bf16 (accumulated in fp32, rounded once). An optional bf16 scale per
 * output row multiplies each sum (no caller passes one now); weights in GGUF block formats are
 * quant.c's.
 *
 * Decoding reads every weight once per token, so it runs at the speed of memory. Each thread takes
 * a contiguous block of output rows and streams through them; the rows of x stay in L1. Every
 * output element is summed in the same order whatever the number of rows, so a batched product
 * equals the products of its rows alone, bit for bit.
 *
 * Built by qwenkit/cpu/build.py with -O3 -march=native -fopenmp. AVX-512 BF16 machines use
 * vdpbf16ps; elsewhere GCC/Clang vector extensions compile to the machine's own SIMD.
 */
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "qwenkit.h"
#include "common.h"

#define STEP 32 /* elements of a weight row per inner step */
/* How far ahead of its reads a thread asks for the weight's cache lines, in bytes: the hardware
 * prefetcher alone falls well short of the memory's bandwidth (benchmarks/README.md has the
 * figures, and the distances tried). Lines past a block's end are another thread's or past the
 * weight: a prefetch never faults. */
#define AHEAD 8192

static ALWAYS_INLINE void prefetch_ahead(const void *p, int bytes) {
    for (int o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)p + AHEAD + o, 0, 3);
}

#if defined(__AVX512BF16__)
/* dot_rows for bf16 x and w: 32 bf16 pairs per vdpbf16ps, one sum per row */
static ALWAYS_INLINE void dot_rows_dpbf16(const uint16_t *x, const uint16_t *w, long K, long kv, float *out, int M) {
    __m512 a[MAX_ROWS];
    for (int m = 0; m < M; m++) a[m] = _mm512_setzero_ps();
    for (long k = 0; k < kv; k += STEP) {
        prefetch_ahead(w + k, 64);
        __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k);
        for (int m = 0; m < M; m++) a[m] = _mm512_dpbf16_ps(a[m], wv, (__m512bh)_mm512_loadu_si512(x + m * K + k));
    }
    for (int m = 0; m < M; m++) {
        float s = _mm512_reduce_add_ps(a[m]);
        for (long k = kv; k < K; k++) s += bf16_to_f32(w[k]) * bf16_to_f32(x[m * K + k]);
        out[m] = s;
    }
}
#endif

/* out[m] = dot(w, x[m]) for M rows of x (M, K), w one weight row (K,); kv: K rounded down to STEP.
 * M is a constant in each copy, so the sums stay in registers. Two sums per row, over alternate
 * 16-element blocks; the tail in scalar code. */
static ALWAYS_INLINE void dot_rows(const void *x, const void *w, long K, long kv, float *out, int M, enum dtype xt,
                                   enum dtype wt) {
#if defined(__AVX512BF16__)
    if (xt == BF16 && wt == BF16) {
        dot_rows_dpbf16(x, w, K, kv, out, M);
        return;
    }
#endif
    vf a[MAX_ROWS], c[MAX_ROWS];
    for (int m = 0; m < M; m++) a[m] = c[m] = (vf){0};
    for (long k = 0; k < kv; k += STEP) {
        /* fp32 weights at one row go without: two prefetches to each step's two loads cost more
         * than they bring */
        if (wt != F32 || M > 1) prefetch_ahead(at(w, k, wt), STEP * dtype_size(wt));
        vf w0 = vload(w, k, wt), w1 = vload(w, k + 16, wt);
        for (int m = 0; m < M; m++) {
            a[m] += w0 * vload(x, m * K + k, xt);
            c[m] += w1 * vload(x, m * K + k + 16, xt);
        }
    }
    for (int m = 0; m < M; m++) {
        float s = hsum(a[m] + c[m]);
        for (long k = kv; k < K; k++) s += load(w, k, wt) * load(x, m * K + k, xt);
        out[m] = s;
    }
}

/* y[m, n] = dot(x[m], w[n]) * scale[n] + b[n] for output rows [n0, n1): x (M, K), w (N, K),
 * scale (N,) bf16 or NULL, b (N,) or NULL, y (M, N); x, b and y of type xt, w of type wt. */
static ALWAYS_INLINE void product_rows(const void *x, const void *w, const uint16_t *scale, const void *b, void *y,
                                       long M, long N, long K, long n0, long n1, enum dtype xt, enum dtype wt) {
    long kv = K - K % STEP;
    float o[MAX_ROWS];
    for (long n = n0; n < n1; n++) {
        const void *wn = at(w, n * K, wt);
        switch (M) {
        case 1: dot_rows(x, wn, K, kv, o, 1, xt, wt); break;
        case 2: dot_rows(x, wn, K, kv, o, 2, xt, wt); break;
        case 3: dot_rows(x, wn, K, kv, o, 3, xt, wt); break;
        case 4: dot_rows(x, wn, K, kv, o, 4, xt, wt); break;
        case 5: dot_rows(x, wn, K, kv, o, 5, xt, wt); break;
        case 6: dot_rows(x, wn, K, kv, o, 6, xt, wt); break;
        case 7: dot_rows(x, wn, K, kv, o, 7, xt, wt); break;
        default: dot_rows(x, wn, K, kv, o, 8, xt, wt);
        }
        float s_n = scale ? bf16_to_f32(scale[n]) : 1.0f;
        for (long m = 0; m < M; m++) {
            float v = scale ? o[m] * s_n : o[m];
            store(y, m * N + n, b ? v + load(b, n, xt) : v, xt);
        }
    }
}

/* One copy of product_rows per weight type, x in the weights' type (block formats: quant.c) */
INTERNAL void gemv_rows(const void *x, const void *w, const uint16_t *scale, const void *b, void *y, long M, long N,
                        long K, long n0, long n1, enum dtype wt) {
    switch (wt) {
    case F32: product_rows(x, w, scale, b, y, M, N, K, n0, n1, F32, F32); break;
    case BF16: product_rows(x, w, scale, b, y, M, N, K, n0, n1, BF16, BF16); break;
    default: break; /* block formats: quant.c */
    }
}

/* Products of blocks of output rows taken from *next (common.h's claim) until none is left, for
 * each of nt threads inside one parallel region. */
INTERNAL void gemv_part(const void *x, const void *w, const uint16_t *scale, const void *b, void *y, long M, long N,
                        long K, long *next, int nt, enum dtype wt) {
    long n0, n1, least = least_rows(K * dtype_size(wt));
    while (claim(next, N, least, nt, &n0, &n1)) gemv_rows(x, w, scale, b, y, M, N, K, n0, n1, wt);
}

static int gemv(const void *x, const void *w, const uint16_t *scale, const void *b, void *y, long M, long N, long K,
                int threads, enum dtype wt) {
    if (M < 1 || M > MAX_ROWS || N < 1 || K < 1 || threads < 1) return -1;
    long next = 0;
#pragma omp parallel num_threads(threads)
    gemv_part(x, w, scale, b, y, M, N, K, &next, omp_get_num_threads(), wt);
    return 0;
}

int qwenkit_gemv_f32(const float *x, const float *w, const void *scale, const float *b, float *y, long M, long N,
                     long K, int threads) {
    return gemv(x, w, scale, b, y, M, N, K, threads, F32);
}
int qwenkit_gemv_bf16(const uint16_t *x, const uint16_t *w, const void *scale, const uint16_t *b, uint16_t *y, long M,
                      long N, long K, int threads) {
    return gemv(x, w, scale, b, y, M, N, K, threads, BF16);
}
