/* Paged decode attention on CPU (fp32 or bf16): each single-token row attends to its own KV blocks in place.
 *
 * The portable path (worker/engine/decoder_only/attention.py) gathers every row's blocks into a padded copy and then
 * runs SDPA over it: the KV bytes cross memory three times (read, write, read). Here each (row, kv head)
 * reads its keys and values once, straight from the pool, as vLLM's CPU paged-attention kernels do.
 *
 * Layout (one layer): k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim], each block
 * contiguous, blocks block_stride elements apart (block_size * num_kv_heads * head_dim when the whole cache
 * is contiguous; more when a block is one slice of a larger page, as in the seq2seq pool). k_cache may
 * equal v_cache (the seq2seq engine's cross-attention reads encoder rows as keys and values, one kv head).
 * Row r's blocks are block_ids[table_start[r] ...]; it attends to key positions [lo, len_r) where
 * lo = max(0, len_r - window) with a sliding window (window > 0), else 0 (transformers' rule: a query at
 * position p sees (p - window, p]). Query heads h = kv * G + g share kv head kv (grouped-query attention).
 * Outputs: out [rows, heads, head_dim] and lse [rows, heads], the log-sum-exp of the scaled scores (for
 * merging with a shared-prefix part). Scores, softmax and sums are fp32, two passes over the keys
 * (scores, then values), in the same order as a dense softmax.
 * Soft-capping (softcap > 0, Gemma-2): each scaled score s becomes tanh(s / softcap) * softcap before the
 * softmax, as transformers' eager attention does. Attention sinks are not applied here: the caller folds
 * them in from lse (o * sigmoid(lse - sink)), which also keeps the shared-prefix merge exact.
 *
 * Dtypes (flags of `pagedq_paged_decode`): q, the K/V caches (both one dtype) and out are each fp32 or
 * bf16; lse is fp32. A bf16 value becomes fp32 in registers (a 16-bit shift: exact), and everything after
 * that is the fp32 path's arithmetic in the same order: bf16 K/V give exactly what the fp32 kernel gives
 * on the same values upcast. A bf16 out is the fp32 result rounded to nearest even (torch's rounding).
 * The bf16 K/V path reads half the bytes of the fp32 one. SIMD: AVX-512F, else AVX2 + FMA, where the
 * compiler targets them (-march=native), else plain C (any CPU).
 *
 * The same library holds the greedy pick (`pagedq_argmax_rows`, end of file): torch's argmax of each logits
 * row, fp32 or bf16, vectorised (torch's argmax reduction is scalar, and 2.5x slower again on bf16).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define PREFETCH 16 /* positions ahead: a row's blocks are scattered, the hardware prefetcher stops at each jump */
#define INLINE static inline __attribute__((always_inline))

/* ---- bf16 <-> fp32 ---------------------------------------------------------------------------------- */

INLINE float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, NaN to a quiet NaN: c10::BFloat16's rounding. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

INLINE const void *offset(const void *p, int64_t i, int bf16) {
    return bf16 ? (const void *)((const uint16_t *)p + i) : (const void *)((const float *)p + i);
}

INLINE const void *position(const void *cache, const int64_t *table, int64_t p, int64_t bs, int64_t block_stride,
                            int64_t stride, int bf16) {
    return offset(cache, table[p / bs] * block_stride + (p % bs) * stride, bf16);
}

INLINE void prefetch_position(const void *cache, const int64_t *table, int64_t p, int64_t bs, int64_t block_stride,
                              int64_t stride, int bf16) {
    const char *from = (const char *)position(cache, table, p, bs, block_stride, stride, bf16);
    const int64_t bytes = stride * (bf16 ? 2 : 4);
    for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(from + c);
}

typedef struct {
    const void *q, *k_cache, *v_cache;
    const int64_t *block_ids, *table_start, *lens;
    void *out;
    float *lse;
    int64_t rows, heads, kv_heads, head_dim, block_size, block_stride, window;
    float scale, softcap;
    int q_bf16, kv_bf16, out_bf16;
    int64_t task_begin, task_end; /* rows */
    int status;
} Job;

/* The plain-C paths (head_dim not a multiple of the vector width, or no AVX2) work on fp32 rows: a bf16 row
 * is widened into a scratch row first, and these two are out of line so that both dtypes run the very same
 * code (-ffast-math could otherwise vectorise each inlined copy in its own order). */
__attribute__((noinline)) static float dot(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += a[d + j] * b[d + j];
    float s = 0.0f;
    for (int j = 0; j < LANES; j++) s += acc[j];
    for (; d < n; d++) s += a[d] * b[d];
    return s;
}

__attribute__((noinline)) static void axpy(float *a, float w, const float *x, int64_t n) {
    for (int64_t d = 0; d < n; d++) a[d] += w * x[d];
}

/* n elements at p as fp32: p itself, or (bf16) widened into `scratch`. */
INLINE const float *as_f32(const void *p, int64_t n, int bf16, float *scratch) {
    if (!bf16) return (const float *)p;
    for (int64_t i = 0; i < n; i++) scratch[i] = bf16_to_f32(((const uint16_t *)p)[i]);
    return scratch;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* 8 K/V elements from p + d as fp32 (bf16: widen to 32 bits, shift into the high half). */
INLINE __m256 load8(const void *p, int64_t d, int bf16) {
    if (bf16) {
        const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + d));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)p + d);
}

/* The horizontal sums of 8 vectors, together (a hadd tree) instead of one reduction each. */
INLINE __m256 hsum8(const __m256 *acc) {
    const __m256 t01 = _mm256_hadd_ps(acc[0], acc[1]), t23 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 t45 = _mm256_hadd_ps(acc[4], acc[5]), t67 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 u0 = _mm256_hadd_ps(t01, t23), u1 = _mm256_hadd_ps(t45, t67);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* Scores of 8 query heads against one position's keys: s[i] = q_(h0+i) . k_(kv of head h0+i), D % 8 == 0,
 * any grouping (each head loads its own kv head's keys). */
INLINE void dot8(const float *q, const void *k, int64_t h0, int64_t G, int64_t D, float *s, int bf16) {
    __m256 acc[8];
    for (int i = 0; i < 8; i++) {
        const float *qh = q + (h0 + i) * D;
        const void *kh = offset(k, ((h0 + i) / G) * D, bf16);
        __m256 a = _mm256_mul_ps(_mm256_loadu_ps(qh), load8(kh, 0, bf16));
        for (int64_t d = 8; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), load8(kh, d, bf16), a);
        acc[i] = a;
    }
    _mm256_storeu_ps(s, hsum8(acc));
}

/* exp(x) for x <= 0 (scores minus their maximum), Cephes' expf: x = k ln2 + r, a polynomial in r, times 2^k;
 * within 2 ulp of expf. Below -87.3 it is ~1e-38 instead of subnormal or 0 (a weight of nothing either way). */
#define EXP_POLY(fma, mul, add, set1, r, y)                                                                      \
    y = fma(set1(1.9875691500E-4f), r, set1(1.3981999507E-3f));                                                  \
    y = fma(y, r, set1(8.3334519073E-3f));                                                                       \
    y = fma(y, r, set1(4.1665795894E-2f));                                                                       \
    y = fma(y, r, set1(1.6666665459E-1f));                                                                       \
    y = fma(y, r, set1(5.0000001201E-1f));                                                                       \
    y = fma(y, mul(r, r), add(r, set1(1.0f)))
#define HAVE_DOT8 1
#else
#define HAVE_DOT8 0
#endif

/* Vectors of VL fp32 lanes: AVX-512 (16) where compiled for, else AVX2 (8). */
#if defined(__AVX512F__)
typedef __m512 vec;
#define VL 16
#define MAX_ACC 16 /* accumulators a value tile keeps in registers (of 32) */
#define vload _mm512_loadu_ps
#define vstore _mm512_storeu_ps
#define vfma _mm512_fmadd_ps
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vset1 _mm512_set1_ps
#define vzero _mm512_setzero_ps
#define vsum _mm512_reduce_add_ps
INLINE vec vload_kv(const void *p, int64_t d, int bf16) {
    if (bf16) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + d));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)p + d);
}
INLINE __m256 halves(vec v) { /* the sum of the two 256-bit halves */
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
INLINE vec vexp(vec x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.3f), x);
    const vec k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vec r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x), y;
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    EXP_POLY(_mm512_fmadd_ps, _mm512_mul_ps, _mm512_add_ps, _mm512_set1_ps, r, y);
    return _mm512_scalef_ps(y, k);
}
#define HAVE_VEC 1
#elif HAVE_DOT8
typedef __m256 vec;
#define VL 8
#define MAX_ACC 8 /* of 16 */
#define vload _mm256_loadu_ps
#define vstore _mm256_storeu_ps
#define vfma _mm256_fmadd_ps
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vset1 _mm256_set1_ps
#define vzero _mm256_setzero_ps
#define vload_kv load8
static inline float vsum(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
INLINE __m256 halves(vec v) { return v; }
INLINE vec vexp(vec x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);
    const vec k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vec r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x), y;
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    EXP_POLY(_mm256_fmadd_ps, _mm256_mul_ps, _mm256_add_ps, _mm256_set1_ps, r, y);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#define HAVE_VEC 1
#else
#define HAVE_VEC 0
#endif

#if HAVE_VEC
/* Scores of N (8 or 4) query heads h0.. against one position's keys, D % VL == 0, where each kv head serves
 * g = min(G, N) of them (G % N == 0 or N % G == 0): each key vector is loaded once for its g heads, and the
 * N sums are reduced together. */
INLINE void scores_n(const float *q, const void *k, int64_t h0, int64_t G, int64_t D, float *s, const int N,
                     const int g, int bf16) {
    vec acc[8];
    for (int i = 0; i < 8; i++) acc[i] = vzero();
    const int64_t kv0 = h0 / G;
    for (int64_t d = 0; d < D; d += VL) {
        for (int j = 0; j < N / g; j++) {
            const vec kk = vload_kv(k, (kv0 + j) * D + d, bf16);
            for (int i = j * g; i < (j + 1) * g; i++) acc[i] = vfma(vload(q + (h0 + i) * D + d), kk, acc[i]);
        }
    }
    __m256 y[8];
    for (int i = 0; i < 8; i++) y[i] = halves(acc[i]);
    float s8[8];
    _mm256_storeu_ps(s8, hsum8(y));
    for (int i = 0; i < N; i++) s[i] = s8[i];
}

/* One tile of the value sums, for K kv heads kv0.. and M query heads of each (heads h_(k, i) = h0 + k G + i)
 * over C vectors of D from d: out[h * D + d + c * VL ..] = sum_p w[h * n + p] * v_p[(kv0 + k) D + d + c VL ..],
 * v_p = rows[p]; the K * M * C accumulators stay in registers across all n positions. */
INLINE void values_tile(const void *const *rows, int64_t kv0, int64_t h0, int64_t d, const float *w, int64_t n,
                        float *out, int64_t G, int64_t D, const int K, const int M, const int C, int bf16) {
    vec acc[16];
    for (int i = 0; i < K * M * C; i++) acc[i] = vzero();
    const int64_t off = kv0 * D + d, bytes = (bf16 ? 2 : 4);
    for (int64_t p = 0; p < n; p++) {
        const void *row = offset(rows[p], off, bf16);
        if (p + PREFETCH < n) {
            const char *next = (const char *)offset(rows[p + PREFETCH], off, bf16);
            for (int k = 0; k < K; k++) {
                __builtin_prefetch(next + k * D * bytes);
                __builtin_prefetch(next + (k * D + C * VL) * bytes - 1);
            }
        }
        for (int k = 0; k < K; k++) {
            vec vv[4];
            for (int c = 0; c < C; c++) vv[c] = vload_kv(row, k * D + c * VL, bf16);
            for (int i = 0; i < M; i++) {
                const vec wi = vset1(w[(h0 + k * G + i) * n + p]);
                for (int c = 0; c < C; c++) acc[(k * M + i) * C + c] = vfma(wi, vv[c], acc[(k * M + i) * C + c]);
            }
        }
    }
    for (int k = 0; k < K; k++)
        for (int i = 0; i < M; i++)
            for (int c = 0; c < C; c++) vstore(out + (h0 + k * G + i) * D + d + c * VL, acc[(k * M + i) * C + c]);
}

#define TILE(k, m, c)                                                                                            \
    case ((k) * 16 + (m)) * 8 + (c):                                                                             \
        values_tile(rows, kv, h, d, scores, n, acc, G, D, k, m, c, bf16);                                        \
        break;

/* acc[h] = sum_p scores[h * n + p] * v_p(kv of h) for every head, D % VL == 0: tiles of up to 4 vectors of D
 * by up to 8 query heads of one kv head, or by all the heads of 2 or 4 kv heads (at most MAX_ACC
 * accumulators each). */
INLINE void values_all(const void *const *rows, const float *scores, int64_t n, float *acc, int64_t H, int64_t G,
                       int64_t D, int bf16) {
    const int64_t KVH = H / G;
    for (int64_t kv = 0; kv < KVH;) {
        int K = 1;
        for (int64_t d = 0; d < D;) {
            const int64_t left = (D - d) / VL;
            const int C = left >= 4 ? 4 : left >= 2 ? 2 : 1;
            K = 4; /* kv heads in one tile: only when all their heads fit, and the same for every d */
            while (K > 1 && (K > KVH - kv || K * G * C > MAX_ACC || D != C * VL)) K /= 2;
            for (int64_t h = kv * G; h < (kv + 1) * G;) {
                int M = 8;
                while (M > (kv + 1) * G - h || K * M * C > MAX_ACC) M /= 2;
                switch ((K * 16 + M) * 8 + C) {
                    TILE(1, 1, 1) TILE(1, 2, 1) TILE(1, 4, 1) TILE(1, 8, 1) TILE(1, 1, 2) TILE(1, 2, 2)
                    TILE(1, 4, 2) TILE(1, 8, 2) TILE(1, 1, 4) TILE(1, 2, 4) TILE(1, 4, 4)
                    TILE(2, 1, 4) TILE(2, 2, 4) TILE(4, 1, 4) TILE(2, 1, 2) TILE(2, 2, 2) TILE(2, 4, 2)
                    TILE(4, 1, 2) TILE(4, 2, 2) TILE(2, 1, 1) TILE(4, 1, 1) TILE(4, 2, 1) TILE(2, 2, 1)
                    TILE(2, 4, 1) TILE(4, 4, 1) TILE(2, 8, 1)
                }
                h += M;
            }
            d += C * VL;
        }
        kv += K;
    }
}
#undef TILE
#endif

static inline float capped(float s, float softcap) { return softcap > 0.0f ? tanhf(s / softcap) * softcap : s; }

/* s[i] = exp(s[i] - m) for n scores; returns their sum. */
__attribute__((noinline)) static float exp_sum(float *s, int64_t n, float m) {
    float total = 0.0f;
    int64_t i = 0;
#if HAVE_VEC
    vec t = vzero();
    const vec mv = vset1(m);
    for (; i + VL <= n; i += VL) {
        const vec e = vexp(vsub(vload(s + i), mv));
        vstore(s + i, e);
        t = vadd(t, e);
    }
    total = vsum(t);
#endif
    for (; i < n; i++) {
        s[i] = expf(s[i] - m);
        total += s[i];
    }
    return total;
}

/* The steps that do not read K/V are out of line, one copy for both dtypes (-ffast-math could otherwise
 * compile each inlined copy's float arithmetic differently; the K/V paths use intrinsics). */
__attribute__((noinline)) static void keep_scores(const float *s8, int64_t h, int count, int64_t n, int64_t i,
                                                  const Job *job, float *scores, float *maxs) {
    for (int j = 0; j < count; j++) {
        const float s = capped(s8[j] * job->scale, job->softcap);
        scores[(h + j) * n + i] = s;
        if (s > maxs[h + j]) maxs[h + j] = s;
    }
}

#if HAVE_DOT8
/* keep_scores for 8 heads, vectorised where there is no soft-capping (the same values: one multiply each). */
__attribute__((noinline)) static void keep_scores8(const float *s8, int64_t h, int64_t n, int64_t i, const Job *job,
                                                   float *scores, float *maxs) {
    if (job->softcap > 0.0f) {
        keep_scores(s8, h, 8, n, i, job, scores, maxs);
        return;
    }
    const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(s8), _mm256_set1_ps(job->scale));
    _mm256_storeu_ps(maxs + h, _mm256_max_ps(s, _mm256_loadu_ps(maxs + h))); /* a NaN score keeps the max */
    float t[8];
    _mm256_storeu_ps(t, s);
    for (int j = 0; j < 8; j++) scores[(h + j) * n + i] = t[j];
}
#define KEEP8 keep_scores8
#else
#define KEEP8(s8, h, n, i, job, scores, maxs) keep_scores(s8, h, 8, n, i, job, scores, maxs)
#endif

/* Scores of every head for one position (k: its keys of every kv head), kept in `scores` and `maxs`. */
INLINE void position_scores(const float *q, const void *k, int64_t n, int64_t i, const Job *job, float *scores,
                            float *maxs, float *kf, int kvb) {
    const int64_t H = job->heads, G = H / job->kv_heads, D = job->head_dim;
    float s8[8];
    int64_t h = 0;
#if HAVE_VEC
    if (D % VL == 0 && (G % 8 == 0 || 8 % G == 0)) {
        for (; h + 8 <= H; h += 8) {
            switch (G >= 8 ? 8 : G) {
                case 1: scores_n(q, k, h, G, D, s8, 8, 1, kvb); break;
                case 2: scores_n(q, k, h, G, D, s8, 8, 2, kvb); break;
                case 4: scores_n(q, k, h, G, D, s8, 8, 4, kvb); break;
                default: scores_n(q, k, h, G, D, s8, 8, 8, kvb); break;
            }
            KEEP8(s8, h, n, i, job, scores, maxs);
        }
        if (h + 4 <= H && (G % 4 == 0 || 4 % G == 0)) {
            switch (G >= 4 ? 4 : G) {
                case 1: scores_n(q, k, h, G, D, s8, 4, 1, kvb); break;
                case 2: scores_n(q, k, h, G, D, s8, 4, 2, kvb); break;
                default: scores_n(q, k, h, G, D, s8, 4, 4, kvb); break;
            }
            keep_scores(s8, h, 4, n, i, job, scores, maxs);
            h += 4;
        }
    }
#endif
#if HAVE_DOT8
    if (D % 8 == 0) {
        for (; h + 8 <= H; h += 8) {
            dot8(q, k, h, G, D, s8, kvb);
            KEEP8(s8, h, n, i, job, scores, maxs);
        }
    }
#endif
    for (; h < H; h++) {
        s8[0] = dot(q + h * D, as_f32(offset(k, (h / G) * D, kvb), D, kvb, kf), D);
        keep_scores(s8, h, 1, n, i, job, scores, maxs);
    }
}

/* Row r's outputs from its value sums: out = acc / sum (fp32, or rounded to bf16), lse = max + log(sum). */
__attribute__((noinline)) static void finish_row(const Job *job, int64_t r, const float *acc, const float *maxs,
                                                 const float *sums) {
    const int64_t H = job->heads, D = job->head_dim;
    for (int64_t h = 0; h < H; h++) {
        const float inv = 1.0f / sums[h];
        if (job->out_bf16) {
            uint16_t *o = (uint16_t *)job->out + (r * H + h) * D;
            for (int64_t d = 0; d < D; d++) o[d] = f32_to_bf16(acc[h * D + d] * inv);
        } else {
            float *o = (float *)job->out + (r * H + h) * D;
            for (int64_t d = 0; d < D; d++) o[d] = acc[h * D + d] * inv;
        }
        job->lse[r * H + h] = maxs[h] + logf(sums[h]);
    }
}

/* One thread's rows; `kvb` (K/V are bf16) is a constant in each of the two copies below. */
INLINE void run_rows(Job *job, const int kvb) {
    const int64_t H = job->heads, KVH = job->kv_heads, D = job->head_dim, BS = job->block_size;
    const int64_t BSTRIDE = job->block_stride;
    const int64_t G = H / KVH, stride = KVH * D; /* one position's keys of every kv head */
    int64_t longest = 1;
    for (int64_t r = job->task_begin; r < job->task_end; r++)
        if (job->lens[r] > longest) longest = job->lens[r];
    float *scores = (float *)malloc(sizeof(float) * (size_t)(H * longest));
    float *acc = (float *)malloc(sizeof(float) * (size_t)(H * D));
    float *qf = (float *)malloc(sizeof(float) * (size_t)(H * D)); /* a bf16 q row as fp32 */
    float *kf = (float *)malloc(sizeof(float) * (size_t)D);       /* a bf16 K or V head row as fp32 */
    float *maxs = (float *)malloc(sizeof(float) * (size_t)H);
    float *sums = (float *)malloc(sizeof(float) * (size_t)H);
    const void **vrows = (const void **)malloc(sizeof(void *) * (size_t)longest);
    if (!scores || !acc || !qf || !kf || !maxs || !sums || !vrows) {
        free(scores), free(acc), free(qf), free(kf), free(maxs), free(sums), free(vrows);
        job->status = 1;
        return;
    }
    for (int64_t r = job->task_begin; r < job->task_end; r++) {
        const int64_t len = job->lens[r];
        const int64_t lo = (job->window > 0 && len > job->window) ? len - job->window : 0;
        const int64_t *table = job->block_ids + job->table_start[r];
        float *lse = job->lse + r * H;
        const int64_t n = len - lo;
        if (n <= 0) { /* nothing visible: output 0, lse -inf */
            const size_t size = job->out_bf16 ? 2 : 4;
            memset((char *)job->out + (size_t)(r * H * D) * size, 0, (size_t)(H * D) * size);
            for (int64_t h = 0; h < H; h++) lse[h] = -INFINITY;
            continue;
        }
        const float *q;
        if (job->q_bf16) {
            const uint16_t *qb = (const uint16_t *)job->q + r * H * D;
            for (int64_t i = 0; i < H * D; i++) qf[i] = bf16_to_f32(qb[i]);
            q = qf;
        } else {
            q = (const float *)job->q + r * H * D;
        }
        for (int64_t h = 0; h < H; h++) maxs[h] = -INFINITY;
        for (int64_t p = lo; p < len; p++) {
            const void *k = position(job->k_cache, table, p, BS, BSTRIDE, stride, kvb);
            if (p + PREFETCH < len) prefetch_position(job->k_cache, table, p + PREFETCH, BS, BSTRIDE, stride, kvb);
            position_scores(q, k, n, p - lo, job, scores, maxs, kf, kvb);
        }
        for (int64_t h = 0; h < H; h++) sums[h] = exp_sum(scores + h * n, n, maxs[h]);
#if HAVE_VEC
        if (D % VL == 0) {
            for (int64_t p = lo; p < len; p++) vrows[p - lo] = position(job->v_cache, table, p, BS, BSTRIDE, stride, kvb);
            values_all(vrows, scores, n, acc, H, G, D, kvb);
        } else
#endif
        {
            memset(acc, 0, sizeof(float) * (size_t)(H * D));
            for (int64_t p = lo; p < len; p++) {
                const void *v = position(job->v_cache, table, p, BS, BSTRIDE, stride, kvb);
                if (p + PREFETCH < len) prefetch_position(job->v_cache, table, p + PREFETCH, BS, BSTRIDE, stride, kvb);
                for (int64_t h = 0; h < H; h++)
                    axpy(acc + h * D, scores[h * n + p - lo], as_f32(offset(v, (h / G) * D, kvb), D, kvb, kf), D);
            }
        }
        finish_row(job, r, acc, maxs, sums);
    }
    free(scores), free(acc), free(qf), free(kf), free(maxs), free(sums), free(vrows);
}

static void run_f32(Job *job) { run_rows(job, 0); }
static void run_bf16(Job *job) { run_rows(job, 1); }

static void *run(void *arg) {
    Job *job = (Job *)arg;
    if (job->kv_bf16)
        run_bf16(job);
    else
        run_f32(job);
    return NULL;
}

/* dtype flags: 0 fp32, 1 bf16 (q, the K/V caches, out). Returns 0 on success, 1 when out of memory, 2 when
 * heads is not a multiple of kv_heads. */
int pagedq_paged_decode(const void *q, const void *k_cache, const void *v_cache, const int64_t *block_ids,
                        const int64_t *table_start, const int64_t *lens, void *out, float *lse, int64_t rows,
                        int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t block_stride,
                        int64_t window, float scale, float softcap, int q_bf16, int kv_bf16, int out_bf16,
                        int threads) {
    if (kv_heads <= 0 || heads % kv_heads != 0) return 2;
    const int64_t tasks = rows;
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if (tasks < threads) threads = (int)(tasks > 0 ? tasks : 1);
    Job jobs[64];
    /* Split by keys to read, not by task count: rows have different lengths. */
    int64_t total = 0;
    for (int64_t r = 0; r < rows; r++) total += lens[r];
    int64_t task = 0, done = 0;
    for (int i = 0; i < threads; i++) {
        const int64_t begin = task, target = total * (i + 1) / threads;
        while (task < tasks && (done < target || i == threads - 1)) {
            done += lens[task];
            task++;
        }
        Job j = {q, k_cache, v_cache, block_ids, table_start, lens, out, lse, rows, heads, kv_heads,
                 head_dim, block_size, block_stride, window, scale, softcap, q_bf16 != 0, kv_bf16 != 0,
                 out_bf16 != 0, begin, task, 0};
        jobs[i] = j;
    }
#ifdef _OPENMP
    /* torch's own OpenMP team (the process has one libgomp.so.1: torch's, loaded first): its threads are
     * awake after torch's last op, where threads of our own would queue behind them spinning. */
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int i = 0; i < threads; i++) run(&jobs[i]);
#else
    pthread_t ids[64];
    int started[64] = {0};
    for (int i = 1; i < threads; i++)
        started[i] = pthread_create(&ids[i], NULL, run, &jobs[i]) == 0;
    run(&jobs[0]);
    for (int i = 1; i < threads; i++) {
        if (started[i]) {
            pthread_join(ids[i], NULL);
        } else {
            run(&jobs[i]); /* could not start a thread: do its share here */
        }
    }
#endif
    int status = 0;
    for (int i = 0; i < threads; i++)
        if (jobs[i].status) status = jobs[i].status;
    return status;
}

/* ---- greedy sampling ---------------------------------------------------------------------------------- */

/* The index of the first maximum of x[0..n) (fp32 or bf16), the first NaN if there is one: torch.argmax's
 * answer. One pass for the maximum (vectorised), one to find where it is. */
INLINE int64_t argmax_row(const void *x, int64_t n, int bf16) {
    float m = -INFINITY;
    int nan = 0;
    int64_t i = 0;
#if HAVE_VEC
    vec mv = vset1(-INFINITY), bad = vzero();
    for (; i + VL <= n; i += VL) {
        const vec v = vload_kv(x, i, bf16);
#if VL == 16
        mv = _mm512_max_ps(mv, v);
        bad = _mm512_mask_mov_ps(bad, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), vset1(1.0f));
#else
        mv = _mm256_max_ps(mv, v);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
#endif
    }
    float lanes[VL], flags[VL];
    vstore(lanes, mv);
    vstore(flags, bad);
    for (int j = 0; j < VL; j++) {
        m = lanes[j] > m ? lanes[j] : m;
        nan |= flags[j] != 0.0f;
    }
#endif
    for (; i < n; i++) {
        const float v = bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
        if (v != v) nan = 1;
        m = v > m ? v : m;
    }
    i = 0;
#if HAVE_VEC
    if (!nan) {
        const vec target = vset1(m);
        for (; i + VL <= n; i += VL) {
#if VL == 16
            const unsigned hit = _mm512_cmp_ps_mask(vload_kv(x, i, bf16), target, _CMP_EQ_OQ);
#else
            const unsigned hit = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(vload_kv(x, i, bf16), target, _CMP_EQ_OQ));
#endif
            if (hit) return i + __builtin_ctz(hit);
        }
    }
#endif
    for (; i < n; i++) {
        const float v = bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
        if (nan ? v != v : v == m) return i;
    }
    return 0; /* n == 0, or every value is -inf: torch's answer is 0 too */
}

/* out[r] = argmax of row r of x [rows, n] (rows `row_stride` elements apart); bf16: x is bf16. */
void pagedq_argmax_rows(const void *x, int64_t rows, int64_t n, int64_t row_stride, int bf16, int64_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const void *row = bf16 ? (const void *)((const uint16_t *)x + r * row_stride)
                               : (const void *)((const float *)x + r * row_stride);
        out[r] = bf16 ? argmax_row(row, n, 1) : argmax_row(row, n, 0);
    }
}
