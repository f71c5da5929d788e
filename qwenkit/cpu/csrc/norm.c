/* RMSNorm of a few rows (decoding): y = w * to_dtype(x * rsqrt(mean(x^2) + eps)), in the order and
 * with the roundings of qwenkit's PyTorch RMSNorm (the reference's): the statistics in fp32, the
 * normalized row rounded to the model's dtype, then the product with the weight rounded again.
 * One call instead of about eight small PyTorch ops per norm; rows are short, so no threads.
 */
#include <math.h>
#include <stdint.h>
#include "common.h"

#define RMS_NORM(NAME, T, LOAD, STORE_ROUND) \
int NAME(const T *x, const T *w, T *y, long rows, long C, float eps) { \
    if (rows < 1 || C < 1) return -1; \
    for (long r = 0; r < rows; r++) { \
        const T *xr = x + r * C; \
        T *yr = y + r * C; \
        vf acc = {0}; \
        long c = 0; \
        for (; c + 16 <= C; c += 16) { \
            vf v; \
            for (int i = 0; i < 16; i++) v[i] = LOAD(xr[c + i]); \
            acc += v * v; \
        } \
        float ss = 0; \
        for (int i = 0; i < 16; i++) ss += acc[i]; \
        for (; c < C; c++) ss += LOAD(xr[c]) * LOAD(xr[c]); \
        float scale = 1.0f / sqrtf(ss / (float)C + eps); \
        for (c = 0; c < C; c++) { \
            float h = LOAD(STORE_ROUND(LOAD(xr[c]) * scale)); \
            yr[c] = STORE_ROUND(LOAD(w[c]) * h); \
        } \
    } \
    return 0; \
}

RMS_NORM(qwenkit_rms_norm_f32, float, SAME, SAME)
RMS_NORM(qwenkit_rms_norm_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
