/* RMSNorm of a few rows (decoding): y = w * to_dtype(x * rsqrt(mean(x^2) + eps)), in the order and
 * with the roundings of qwenkit's PyTorch RMSNorm (the reference's): the statistics in fp32, the
 * normalized row rounded to the model's dtype, then the product with the weight rounded again.
 * One call instead of about eight small PyTorch ops per norm; rows are short, so no threads.
 */
#include <math.h>
#include <stdint.h>
#include "qwenkit.h"
#include "common.h"

/* x, y (rows, C), w (C,), all of type dt; y may be x: each element is read before it is written */
static ALWAYS_INLINE void norm_rows(const void *x, const void *w, void *y, long rows, long C, float eps,
                                    enum dtype dt) {
    for (long r = 0; r < rows; r++) {
        const void *xr = at(x, r * C, dt);
        void *yr = at(y, r * C, dt);
        vf acc = {0};
        long c = 0;
        for (; c + 16 <= C; c += 16) {
            vf v;
            for (int i = 0; i < 16; i++) v[i] = load(xr, c + i, dt);
            acc += v * v;
        }
        float ss = 0;
        for (int i = 0; i < 16; i++) ss += acc[i];
        for (; c < C; c++) ss += load(xr, c, dt) * load(xr, c, dt);
        float scale = 1.0f / sqrtf(ss / (float)C + eps);
        for (c = 0; c < C; c++) {
            float h = round_to(load(xr, c, dt) * scale, dt);
            store(yr, c, load(w, c, dt) * h, dt);
        }
    }
}

INTERNAL void rms_norm(const void *x, const void *w, void *y, long rows, long C, float eps, enum dtype dt) {
    if (dt == F32)
        norm_rows(x, w, y, rows, C, eps, F32);
    else
        norm_rows(x, w, y, rows, C, eps, BF16);
}

static int norm(const void *x, const void *w, void *y, long rows, long C, float eps, enum dtype dt) {
    if (rows < 1 || C < 1) return -1;
    rms_norm(x, w, y, rows, C, eps, dt);
    return 0;
}

int qwenkit_rms_norm_f32(const float *x, const float *w, float *y, long rows, long C, float eps) {
    return norm(x, w, y, rows, C, eps, F32);
}
int qwenkit_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, long rows, long C, float eps) {
    return norm(x, w, y, rows, C, eps, BF16);
}
