/* Each beam row's top k, one pass over the logits (pagedq.worker.engine.cpu.beam_topk's docstring says what
 * and why). Built on first use by pagedq.worker.engine.cpu.native.load_library, like paged_decode.c. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))
#define BLOCK 64

INLINE float widen(const void *p, int64_t i, const int bf16) {
    if (bf16) {
        const uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return ((const float *)p)[i];
}

/* exp(x) for x <= 0, Cephes' expf (within 2 ulp); below -87.3 about 1e-38. Plain C that vectorizes. */
INLINE float exp_le0(float x) {
    x = x < -87.3f ? -87.3f : x;
    const float k = rintf(x * 1.44269504088896341f);
    float r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float y = 1.9875691500E-4f;
    y = y * r + 1.3981999507E-3f;
    y = y * r + 8.3334519073E-3f;
    y = y * r + 4.1665795894E-2f;
    y = y * r + 1.6666665459E-1f;
    y = y * r + 5.0000001201E-1f;
    y = y * (r * r) + (r + 1.0f);
    const uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return y * scale;
}

INLINE float block_max(const void *x, int64_t b, int64_t end, const int bf16) {
    float m = -INFINITY;
    for (int64_t i = b; i < end; i++) {
        const float v = widen(x, i, bf16);
        m = v > m ? v : m;
    }
    return m;
}

/* The top k of row x[0..n) (value descending, lower index first on ties), leaving out `bans`; then, when
 * normalizing, each value v becomes (v - max) - log(sum exp(x - max)) over the whole row. One pass over the
 * row in blocks of 64 (in L1 for the block's max, its exponentials and, rarely, its top-k scan): the sum is
 * kept against the running maximum, rescaled (in double) when a block raises it. */
INLINE void row_top_k(const void *x, int64_t n, const int bf16, int normalize, int64_t k, const int64_t *bans,
                      int64_t nbans, float *vals, int64_t *idx) {
    float m = -INFINITY, worst = -INFINITY;
    double total = 0.0;
    int64_t c = 0;
    for (int64_t b = 0; b < n; b += BLOCK) {
        const int64_t end = b + BLOCK < n ? b + BLOCK : n;
        const float bm = block_max(x, b, end, bf16);
        if (normalize && bm > -INFINITY) {
            if (bm > m) {
                if (m > -INFINITY) total *= exp((double)m - (double)bm);
                m = bm;
            }
            float s = 0.0f;
            for (int64_t i = b; i < end; i++) s += exp_le0(widen(x, i, bf16) - m);
            total += s;
        }
        if (c == k && !(bm > worst)) continue;
        for (int64_t i = b; i < end; i++) {
            const float v = widen(x, i, bf16);
            if (c == k && !(v > worst)) continue;
            int banned = 0;
            for (int64_t t = 0; t < nbans; t++) banned |= bans[t] == i;
            if (banned) continue;
            int64_t j = c < k ? c++ : k - 1;
            while (j > 0 && v > vals[j - 1]) {
                vals[j] = vals[j - 1];
                idx[j] = idx[j - 1];
                j--;
            }
            vals[j] = v;
            idx[j] = i;
            worst = vals[c - 1];
        }
    }
    for (int64_t j = c; j < k; j++) vals[j] = -INFINITY, idx[j] = 0; /* fewer than k tokens left */
    if (normalize) { /* a row of -inf only (nothing finite) stays -inf */
        const float logsum = (float)log(total);
        for (int64_t j = 0; j < c; j++) vals[j] = m > -INFINITY ? (vals[j] - m) - logsum : -INFINITY;
    }
}

int pagedq_top_k_rows(const void *x, int64_t rows, int64_t n, int64_t row_stride, int bf16, int normalize,
                      int64_t k, const int64_t *ban_start, const int64_t *bans, float *vals, int64_t *idx,
                      int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t b0 = ban_start ? ban_start[r] : 0, b1 = ban_start ? ban_start[r + 1] : 0;
        if (bf16)
            row_top_k((const uint16_t *)x + r * row_stride, n, 1, normalize, k, bans + b0, b1 - b0, vals + r * k,
                      idx + r * k);
        else
            row_top_k((const float *)x + r * row_stride, n, 0, normalize, k, bans + b0, b1 - b0, vals + r * k,
                      idx + r * k);
    }
    return 0;
}
