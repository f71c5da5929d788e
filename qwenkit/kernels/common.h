/* What the kernels share: 16-lane fp32 vectors (GCC/Clang vector extensions, compiled to the
 * machine's own SIMD), bf16 <-> fp32 conversion as PyTorch rounds, and vector loads. */
#ifndef QWENKIT_KERNELS_COMMON_H
#define QWENKIT_KERNELS_COMMON_H

#include <stdint.h>
#include <string.h>

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
static inline vf load_bf16(const uint16_t *p) { /* 16 bf16 -> 16 fp32, exact */
    vh h; memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f; memcpy(&f, &u, sizeof f); return f;
}
static inline float hsum(vf v) { float s = 0; for (int i = 0; i < 16; i++) s += v[i]; return s; }

#endif
