/* The two passes around an int8 GEMM of pagedq.worker.engine.cpu.quantization's Int8Linear, each one pass over
 * memory instead of torch's four or five eager ones (the module's docstring says why that matters):
 *
 *   pagedq_quantize_rows   x fp32 [M, K] -> q int8 [M, K] (or uint8 q + 128), scale fp32 [M]:
 *                          scale = max(max(x[m]), -min(x[m])), floored at eps, / 127; q = rint(x / scale)
 *   pagedq_dequantize      acc [M, N] (int32 sums, or fp32 products already scaled per column) -> out fp32:
 *                          out = ((float)acc * ws[n]) * rs[m] + bias[n]   (ws, bias optional)
 *
 * Both give torch's eager arithmetic bit for bit (the same IEEE operations in the same order: one division,
 * round half to even, then fp32 products and a sum), so the result is the eager path's and the fp32
 * emulation's. That is why this file is built without -ffast-math and with -ffp-contract=off (no reciprocal
 * for the division, no fused multiply-add): `native.load_library(exact=True)`.
 * Built on first use by pagedq.worker.engine.cpu.native.load_library, like paged_decode.c. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define TILE 2048 /* columns per work item of the dequantize pass */

static void quantize_row(const float *x, int64_t K, float eps, int offset, uint8_t *q, float *scale) {
    float hi = -INFINITY, lo = INFINITY;
    int nan = 0;
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 vhi = _mm512_set1_ps(-INFINITY), vlo = _mm512_set1_ps(INFINITY);
    __mmask16 vnan = 0;
    for (; k + 16 <= K; k += 16) {
        const __m512 v = _mm512_loadu_ps(x + k);
        vhi = _mm512_max_ps(vhi, v);
        vlo = _mm512_min_ps(vlo, v);
        vnan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    hi = _mm512_reduce_max_ps(vhi);
    lo = _mm512_reduce_min_ps(vlo);
    nan = vnan != 0;
#endif
    for (; k < K; k++) {
        const float v = x[k];
        hi = v > hi ? v : hi;
        lo = v < lo ? v : lo;
        nan |= v != v;
    }
    float m = hi > -lo ? hi : -lo;
    if (nan) m = NAN; /* torch's maximum and clamp propagate NaN: the row becomes NaN */
    else if (m < eps) m = eps;
    const float s = m / 127.0f;
    *scale = s;
    k = 0;
#if defined(__AVX512F__)
    const __m512 vs = _mm512_set1_ps(s);
    const __m128i flip = _mm_set1_epi8(offset ? (char)0x80 : 0); /* + 128 on a two's complement byte */
    for (; k + 16 <= K; k += 16) {
        const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + k), vs),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(q + k), _mm_xor_si128(_mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r)), flip));
    }
#endif
    for (; k < K; k++) q[k] = (uint8_t)((int)rintf(x[k] / s) + offset); /* |x / s| <= 127 */
}

/* x rows `ldx` floats apart; q contiguous: int8 (offset 0), or uint8 q + 128 (offset 128: oneDNN's u8
 * activations with zero point 128). Returns 0. */
int pagedq_quantize_rows(const float *x, int64_t M, int64_t K, int64_t ldx, float eps, int offset, void *q,
                         float *scale, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (M * K >= 32768 && M > 1)
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * ldx, K, eps, offset, (uint8_t *)q + m * K, scale + m);
    return 0;
}

static void dequantize_span(const void *acc, int acc_int32, const float *ws, float r, const float *bias, float *o,
                            int64_t n, int64_t end) {
    const int32_t *ai = (const int32_t *)acc;
    const float *af = (const float *)acc;
#if defined(__AVX512F__)
    const __m512 vr = _mm512_set1_ps(r);
    for (; n + 16 <= end; n += 16) {
        __m512 v = acc_int32 ? _mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)(ai + n))) : _mm512_loadu_ps(af + n);
        if (ws) v = _mm512_mul_ps(v, _mm512_loadu_ps(ws + n));
        v = _mm512_mul_ps(v, vr);
        if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + n));
        _mm512_storeu_ps(o + n, v);
    }
#endif
    for (; n < end; n++) {
        float v = acc_int32 ? (float)ai[n] : af[n];
        if (ws) v = v * ws[n];
        v = v * r;
        if (bias) v = v + bias[n];
        o[n] = v;
    }
}

/* acc and out [M, N] contiguous; out may be acc itself (int32 and fp32 have one size: each element is read
 * before it is written). `acc_int32`: acc holds int32 sums, else fp32 values. ws [N] or NULL (no column
 * scale), rs [M], bias [N] or NULL. Returns 0. */
int pagedq_dequantize(const void *acc, int acc_int32, int64_t M, int64_t N, const float *ws, const float *rs,
                      const float *bias, float *out, int threads) {
    const int64_t tiles = (N + TILE - 1) / TILE;
#pragma omp parallel for num_threads(threads) schedule(static) if (M * N >= 32768)
    for (int64_t t = 0; t < M * tiles; t++) {
        const int64_t m = t / tiles, n0 = (t % tiles) * TILE;
        const int64_t n1 = n0 + TILE < N ? n0 + TILE : N;
        const void *row = acc_int32 ? (const void *)((const int32_t *)acc + m * N) : (const void *)((const float *)acc + m * N);
        dequantize_span(row, acc_int32, ws, rs[m], bias, out + m * N, n0, n1);
    }
    return 0;
}
