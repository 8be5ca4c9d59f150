/* Paged decode attention on CPU (fp32): each single-token row attends to its own KV blocks in place.
 *
 * The portable path (worker/engine/attention.py) gathers every row's blocks into a padded copy and then
 * runs SDPA over it: the KV bytes cross memory three times (read, write, read). Here each (row, kv head)
 * reads its keys and values once, straight from the pool, as vLLM's CPU paged-attention kernels do.
 *
 * Layout (one layer): k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim], each block
 * contiguous, blocks block_stride floats apart (block_size * num_kv_heads * head_dim when the whole cache
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
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define PREFETCH 16 /* positions ahead: a row's blocks are scattered, the hardware prefetcher stops at each jump */

static inline const float *position(const float *cache, const int64_t *table, int64_t p, int64_t bs,
                                    int64_t block_stride, int64_t stride) {
    return cache + table[p / bs] * block_stride + (p % bs) * stride;
}

static inline void prefetch_position(const float *cache, const int64_t *table, int64_t p, int64_t bs,
                                     int64_t block_stride, int64_t stride) {
    const char *at = (const char *)position(cache, table, p, bs, block_stride, stride);
    for (int64_t c = 0; c < stride * (int64_t)sizeof(float); c += 64) __builtin_prefetch(at + c);
}

typedef struct {
    const float *q, *k_cache, *v_cache;
    const int64_t *block_ids, *table_start, *lens;
    float *out, *lse;
    int64_t rows, heads, kv_heads, head_dim, block_size, block_stride, window;
    float scale, softcap;
    int64_t task_begin, task_end; /* rows */
    int status;
} Job;

static inline float dot(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += a[d + j] * b[d + j];
    float s = 0.0f;
    for (int j = 0; j < LANES; j++) s += acc[j];
    for (; d < n; d++) s += a[d] * b[d];
    return s;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* Scores of 8 query heads against one position's keys: s[i] = q_(h0+i) . k_(kv of head h0+i), D % 8 == 0.
 * The 8 dot products are reduced together (a hadd tree) instead of one horizontal sum each. */
static inline void dot8(const float *q, const float *k, int64_t h0, int64_t G, int64_t D, float *s) {
    __m256 acc[8];
    for (int i = 0; i < 8; i++) {
        const float *qh = q + (h0 + i) * D, *kh = k + ((h0 + i) / G) * D;
        __m256 a = _mm256_mul_ps(_mm256_loadu_ps(qh), _mm256_loadu_ps(kh));
        for (int64_t d = 8; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(kh + d), a);
        acc[i] = a;
    }
    const __m256 t01 = _mm256_hadd_ps(acc[0], acc[1]), t23 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 t45 = _mm256_hadd_ps(acc[4], acc[5]), t67 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 u0 = _mm256_hadd_ps(t01, t23), u1 = _mm256_hadd_ps(t45, t67);
    const __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(s, r);
}
#define HAVE_DOT8 1
#else
#define HAVE_DOT8 0
#endif

/* Groups of 8 query heads that read the same kv head (G % 8 == 0: multi-query attention, and the seq2seq
 * cross-attention over encoder rows, where D is d_model): each key and value is loaded once for all 8, and
 * the 8 value accumulators stay in registers, one vector of D at a time, across all positions. */
#if defined(__AVX512F__)
typedef __m512 vec;
#define VL 16
#define vload _mm512_loadu_ps
#define vstore _mm512_storeu_ps
#define vfma _mm512_fmadd_ps
#define vset1 _mm512_set1_ps
#define vzero _mm512_setzero_ps
#define vsum _mm512_reduce_add_ps
#define HAVE_SHARED8 1
#elif HAVE_DOT8
typedef __m256 vec;
#define VL 8
#define vload _mm256_loadu_ps
#define vstore _mm256_storeu_ps
#define vfma _mm256_fmadd_ps
#define vset1 _mm256_set1_ps
#define vzero _mm256_setzero_ps
static inline float vsum(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#define HAVE_SHARED8 1
#else
#define HAVE_SHARED8 0
#define VL_OR_1 1
#endif

#if HAVE_SHARED8
#define VL_OR_1 VL
/* s[i] = q_(h0+i) . k for the 8 heads h0.. (rows of q, D apart), all against one key row k; D % VL == 0. */
static inline void scores8_shared(const float *q8, const float *k, int64_t D, float *s) {
    vec acc[8];
    for (int i = 0; i < 8; i++) acc[i] = vzero();
    for (int64_t d = 0; d < D; d += VL) {
        const vec kv = vload(k + d);
        for (int i = 0; i < 8; i++) acc[i] = vfma(vload(q8 + i * D + d), kv, acc[i]);
    }
    for (int i = 0; i < 8; i++) s[i] = vsum(acc[i]);
}

/* acc8[i] = sum_p w[i * n + p] * v_p for the 8 heads, v_p = rows[p] (n positions); D % VL == 0. */
static inline void values8_shared(const float *const *rows, const float *w, int64_t n, int64_t D, float *acc8) {
    for (int64_t d = 0; d < D; d += VL) {
        vec acc[8];
        for (int i = 0; i < 8; i++) acc[i] = vzero();
        for (int64_t p = 0; p < n; p++) {
            const vec vv = vload(rows[p] + d);
            for (int i = 0; i < 8; i++) acc[i] = vfma(vset1(w[i * n + p]), vv, acc[i]);
        }
        for (int i = 0; i < 8; i++) vstore(acc8 + i * D + d, acc[i]);
    }
}
#endif

static inline float capped(float s, float softcap) { return softcap > 0.0f ? tanhf(s / softcap) * softcap : s; }

static void *run(void *arg) {
    Job *job = (Job *)arg;
    const int64_t H = job->heads, KVH = job->kv_heads, D = job->head_dim, BS = job->block_size;
    const int64_t BSTRIDE = job->block_stride;
    const int64_t G = H / KVH, stride = KVH * D; /* one position's keys of every kv head */
    const int shared8 = HAVE_SHARED8 && G % 8 == 0 && D % VL_OR_1 == 0;
    int64_t longest = 1;
    for (int64_t r = job->task_begin; r < job->task_end; r++)
        if (job->lens[r] > longest) longest = job->lens[r];
    float *scores = (float *)malloc(sizeof(float) * (size_t)(H * longest));
    float *acc = (float *)malloc(sizeof(float) * (size_t)(H * D));
    float *maxs = (float *)malloc(sizeof(float) * (size_t)H);
    float *sums = (float *)malloc(sizeof(float) * (size_t)H);
    const float **vrows = (const float **)malloc(sizeof(float *) * (size_t)longest);
    if (!scores || !acc || !maxs || !sums || !vrows) {
        free(scores), free(acc), free(maxs), free(sums), free(vrows);
        job->status = 1;
        return NULL;
    }
    for (int64_t r = job->task_begin; r < job->task_end; r++) {
        const int64_t len = job->lens[r];
        const int64_t lo = (job->window > 0 && len > job->window) ? len - job->window : 0;
        const int64_t *table = job->block_ids + job->table_start[r];
        const float *q = job->q + r * H * D;
        float *out = job->out + r * H * D, *lse = job->lse + r * H;
        const int64_t n = len - lo;
        if (n <= 0) { /* nothing visible: output 0, lse -inf */
            memset(out, 0, sizeof(float) * (size_t)(H * D));
            for (int64_t h = 0; h < H; h++) lse[h] = -INFINITY;
            continue;
        }
        for (int64_t h = 0; h < H; h++) maxs[h] = -INFINITY;
        for (int64_t p = lo; p < len; p++) {
            const float *k = position(job->k_cache, table, p, BS, BSTRIDE, stride);
            if (p + PREFETCH < len) prefetch_position(job->k_cache, table, p + PREFETCH, BS, BSTRIDE, stride);
            int64_t h = 0;
#if HAVE_SHARED8
            if (shared8) {
                float s8[8];
                for (; h < H; h += 8) {
                    scores8_shared(q + h * D, k + (h / G) * D, D, s8);
                    for (int i = 0; i < 8; i++) {
                        const float s = capped(s8[i] * job->scale, job->softcap);
                        scores[(h + i) * n + (p - lo)] = s;
                        if (s > maxs[h + i]) maxs[h + i] = s;
                    }
                }
            }
#endif
#if HAVE_DOT8
            if (D % 8 == 0) {
                float s8[8];
                for (; h + 8 <= H; h += 8) {
                    dot8(q, k, h, G, D, s8);
                    for (int i = 0; i < 8; i++) {
                        const float s = capped(s8[i] * job->scale, job->softcap);
                        scores[(h + i) * n + (p - lo)] = s;
                        if (s > maxs[h + i]) maxs[h + i] = s;
                    }
                }
            }
#endif
            for (; h < H; h++) {
                const float s = capped(dot(q + h * D, k + (h / G) * D, D) * job->scale, job->softcap);
                scores[h * n + (p - lo)] = s;
                if (s > maxs[h]) maxs[h] = s;
            }
        }
        for (int64_t h = 0; h < H; h++) {
            float *s = scores + h * n, m = maxs[h], total = 0.0f;
            for (int64_t i = 0; i < n; i++) {
                s[i] = expf(s[i] - m);
                total += s[i];
            }
            sums[h] = total;
        }
        if (shared8) {
#if HAVE_SHARED8
            for (int64_t h = 0; h < H; h += 8) {
                for (int64_t p = lo; p < len; p++)
                    vrows[p - lo] = position(job->v_cache, table, p, BS, BSTRIDE, stride) + (h / G) * D;
                values8_shared(vrows, scores + h * n, n, D, acc + h * D);
            }
#endif
        } else {
            memset(acc, 0, sizeof(float) * (size_t)(H * D));
            for (int64_t p = lo; p < len; p++) {
                const float *v = position(job->v_cache, table, p, BS, BSTRIDE, stride);
                if (p + PREFETCH < len) prefetch_position(job->v_cache, table, p + PREFETCH, BS, BSTRIDE, stride);
                for (int64_t h = 0; h < H; h++) {
                    const float w = scores[h * n + (p - lo)];
                    const float *vh = v + (h / G) * D;
                    float *a = acc + h * D;
                    for (int64_t d = 0; d < D; d++) a[d] += w * vh[d];
                }
            }
        }
        for (int64_t h = 0; h < H; h++) {
            const float inv = 1.0f / sums[h];
            for (int64_t d = 0; d < D; d++) out[h * D + d] = acc[h * D + d] * inv;
            lse[h] = maxs[h] + logf(sums[h]);
        }
    }
    free(scores), free(acc), free(maxs), free(sums), free(vrows);
    return NULL;
}

/* Returns 0 on success, 1 when out of memory, 2 when heads is not a multiple of kv_heads. */
int pagedq_paged_decode_f32(const float *q, const float *k_cache, const float *v_cache, const int64_t *block_ids,
                            const int64_t *table_start, const int64_t *lens, float *out, float *lse, int64_t rows,
                            int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,
                            int64_t block_stride, int64_t window, float scale, float softcap, int threads) {
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
                 head_dim, block_size, block_stride, window, scale, softcap, begin, task, 0};
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
