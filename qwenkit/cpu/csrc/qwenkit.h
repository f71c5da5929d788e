/* The functions that qwenkit binds with ctypes (qwenkit/cpu/ops.py), and the layout of a block's
 * tensors for decode_layers. A test reads this header and checks the Python side against it.
 *
 * Sizes: M rows of x, N output features, K input features (gemv); B rows of one new token each,
 * H query heads, K key/value heads, S cache slots, D head size (attention); C hidden size, I MLP
 * size, L blocks (decode_layers). Weights are (out, in); bf16 tensors are uint16_t bit patterns.
 * Each function returns 0, -1 on sizes it does not handle, or -2 out of memory.
 */
#ifndef QWENKIT_H
#define QWENKIT_H

#include <stdint.h>

/* A block's tensors, BLOCK_TENSORS pointers per block in this order in decode_layers' p (Python's
 * BlockTensors, the same fields in lower case): the norms' weights (C,); the projections' weights,
 * q (H*D, C), k and v (K*D, C), o (C, H*D), gate and up (I, C), down (C, I); the q, k and v biases
 * (out,), each may be NULL; the layer's caches (B, K, S, D). */
enum block_tensor {
    INPUT_LAYERNORM,
    Q_PROJ,
    Q_BIAS,
    K_PROJ,
    K_BIAS,
    V_PROJ,
    V_BIAS,
    O_PROJ,
    POST_ATTENTION_LAYERNORM,
    GATE_PROJ,
    UP_PROJ,
    DOWN_PROJ,
    K_CACHE,
    V_CACHE,
    BLOCK_TENSORS
};

/* y (M, N) = x (M, K) w^T (+ b (N,)) for 1 to 8 rows, on `threads` threads; scale is NULL here */
int qwenkit_gemv_f32(const float *x, const float *w, const void *scale, const float *b, float *y, long M, long N,
                     long K, int threads);
int qwenkit_gemv_bf16(const uint16_t *x, const uint16_t *w, const void *scale, const uint16_t *b, uint16_t *y, long M,
                      long N, long K, int threads);

/* Weights in a GGUF block format, w (N, row bytes): wtype is ggml's type number (Q4_0 2, Q4_1 3,
 * Q5_0 6, Q5_1 7, Q8_0 8, Q4_K 12, Q5_K 13, Q6_K 14; F16 1), plus 64 for weights that qwenkit_pack
 * has packed. y (M, N) = x (M, K) w^T (+ b) for 1 to 8 rows (packed: any number), x, b and y
 * fp32; x is quantized to int8 in blocks of 32 first (not for F16) */
int qwenkit_qgemv(const float *x, const void *w, int wtype, const float *b, float *y, long M, long N, long K,
                  int threads);
/* w (N, row bytes) of any block format but F16 into out, ceil(N / 16) tiles of 16 rows
 * (16 * row bytes each; quant.c's layout) */
int qwenkit_pack(const void *w, int wtype, long N, long K, void *out, int threads);
/* rows of such weights in fp32: out (rows, K) */
int qwenkit_dequantize(const void *w, int wtype, long rows, long K, float *out, int threads);
/* x (M, K) fp32 to int8 q (M, K) with a scale per 32 values, d (M, K / 32), as qgemv quantizes it */
int qwenkit_quantize_activations(const float *x, long M, long K, int8_t *q, float *d);

/* One decoding step of a layer's attention: q (B, H, D), k and v (B, K, D) before RoPE; cos, sin
 * (B, D); kc, vc (B, K, S, D), written at slot (B,); valid (B, S): the slots holding real tokens;
 * out (B, H, D) */
int qwenkit_decode_attention_f32(const float *q, const float *k, const float *v, const float *cos, const float *sin,
                                 float *kc, float *vc, const int64_t *slot, const uint8_t *valid, float *out, long B,
                                 long H, long K, long S, long D, int threads);
int qwenkit_decode_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *cos,
                                  const uint16_t *sin, uint16_t *kc, uint16_t *vc, const int64_t *slot,
                                  const uint8_t *valid, uint16_t *out, long B, long H, long K, long S, long D,
                                  int threads);

/* RMSNorm of rows of C: y (rows, C) = w * norm(x (rows, C)); y may be x */
int qwenkit_rms_norm_f32(const float *x, const float *w, float *y, long rows, long C, float eps);
int qwenkit_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, long rows, long C, float eps);

/* One decoding step through L blocks: p, L * BLOCK_TENSORS pointers; types, NULL where every
 * weight is in the activations' dtype, else L * BLOCK_TENSORS ggml type numbers, of which the
 * projections' are read (the activations' dtype: F32 0, BF16 30; a block format: quant.c's
 * products); final_norm (C,) or NULL; x (B, C), updated in place; cos, sin (B, D); slot (B,) and
 * valid (B, S) as for attention */
int qwenkit_decode_layers_f32(void *const *p, const int32_t *types, long L, const float *final_norm, float *x,
                              const float *cos, const float *sin, const int64_t *slot, const uint8_t *valid, long B,
                              long C, long H, long K, long S, long D, long I, float eps, int threads);
int qwenkit_decode_layers_bf16(void *const *p, const int32_t *types, long L, const uint16_t *final_norm, uint16_t *x,
                               const uint16_t *cos, const uint16_t *sin, const int64_t *slot, const uint8_t *valid,
                               long B, long C, long H, long K, long S, long D, long I, float eps, int threads);

#endif
