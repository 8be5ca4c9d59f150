/* bf16 attention within the segments of a packed encoder row, on AVX512-BF16 (the packed classifier's
 * attention in bf16: pagedq.worker.engine.encoder.varlen_attention).
 *
 * Why: on a CPU with AVX512-BF16 but no AMX, torch's SDPA in bf16 runs no faster than in fp32 (its CPU flash
 * kernel's bf16 products take a path without the bf16 dot-product instructions), so a bf16 BERT spent ~20% of
 * its step in attention against ~11% in fp32. VDPBF16PS multiplies 32 bf16 pairs per instruction into fp32
 * sums: twice the products of an fp32 FMA.
 *
 * Layout: q [T, H, D], k and v [T, KVH, D] bf16 addressed by strides (element (t, h, d) of q at t * ts + h * hs
 * + d; k and v share theirs), query head h reading kv head h / (H / KVH) (grouped-query attention); out is
 * [T, H, D] bf16 contiguous. Segment s holds tokens [starts[s], starts[s] + lengths[s]) and attends to itself
 * only: every key of the segment (an encoder), or with `causal` the keys up to its own position (a decoder's
 * prompt with nothing cached before it). One work item is one (segment, head), handed
 * out dynamically to torch's OpenMP team (libgomp.so.1 is torch's).
 *
 * Arithmetic, per (segment, head):
 *   scores s[i, j] = (q_i . k_j) * scale         fp32 sums of exact bf16 products (VDPBF16PS, pairs along D)
 *   p[i, j] = exp(s[i, j] - max_j s) / sum_j      fp32 (a vectorised Cephes expf, within 2 ulp)
 *   out_i = sum_j p[i, j] v_j                     p split into bf16 hi + lo (16 significant bits, where one
 *                                                 bf16 has 8), each pair of keys one VDPBF16PS per part: fp32
 *                                                 sums, rounded to bf16 (nearest even)
 * Rounding p to one bf16 instead cost ~1.4x the error of torch's bf16 SDPA for 0.75x the time; with the split
 * the error is torch's (the output's own rounding dominates). K is repacked per item into VNNI order (16 keys
 * x one pair of dims per vector), V into pairs of keys per dimension; 8 query rows share each loaded K vector
 * (8 independent sums hide the instruction's latency), 4 each V vector. Not bitwise any other implementation:
 * agreement with exact attention is stated in tests/worker/engine/cpu/test_varlen_bf16.py.
 *
 * On AMX CPUs the scores and P V run on tiles instead (item_amx below; `amx`), with the same packing and softmax.
 *
 * Built (-march=native, -ffast-math for the vectorised expf) by pagedq.worker.engine.cpu.native.load_library;
 * `pagedq_varlen_bf16_supported()` is 0 where the compiler did not target AVX512-BF16 (the caller keeps SDPA).
 */
#define _GNU_SOURCE /* syscall() under -std=c11 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_BF16DOT 1
#else
#define HAVE_BF16DOT 0
#endif

#if HAVE_BF16DOT && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
#else
#define HAVE_AMX 0
#endif

int pagedq_varlen_bf16_supported(void) { return HAVE_BF16DOT; }

/* 1 where this build has the AMX path and Linux lets the process use AMX tiles (asked for once: a process must
 * request the tile state, XFEATURE_XTILEDATA = 18, before its first tile instruction); 0 otherwise. */
int pagedq_varlen_amx_supported(void) {
#if HAVE_AMX
    static int granted = -1;
    if (granted < 0) granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) == 0;
    return granted;
#else
    return 0;
#endif
}

#if HAVE_BF16DOT

#define QB 8 /* query rows per block of scores: 8 independent sums hide VDPBF16PS's latency */
#define PB 4 /* query rows per block of P V (x 4 chunks of 16 dims: 16 sums in registers) */

/* 16 fp32 lanes -> 16 bf16 (nearest even, NaN quiet), stored. */
static inline void store_bf16x16(uint16_t *to, __m512 x) {
    _mm256_storeu_si256((__m256i *)to, (__m256i)_mm512_cvtneps_pbh(x));
}

typedef struct {
    const uint16_t *q, *k, *v;
    uint16_t *out;
    const int64_t *starts, *lengths;
    int64_t ts, hs;   /* q's token and head strides */
    int64_t kts, khs; /* k's and v's */
    int64_t ots, heads, group, dim; /* out: [T, H, D] contiguous; query heads per kv head */
    float scale;
    int causal;
} Job;

/* K of one (segment, head) in VNNI order: kp[(b * P + p) * 16 + j] = the pair (k[16b + j][2p], k[16b + j][2p+1])
 * as one 32-bit word, zero for keys past L. P = D / 2 pairs. */
static void pack_k(const Job *job, const uint16_t *k, int64_t L, uint32_t *kp) {
    const int64_t P = job->dim / 2, blocks = (L + 15) / 16;
    for (int64_t b = 0; b < blocks; b++) {
        for (int64_t j = 0; j < 16; j++) {
            const int64_t key = b * 16 + j;
            const uint32_t *row = (const uint32_t *)(k + key * job->kts);
            for (int64_t p = 0; p < P; p++) kp[(b * P + p) * 16 + j] = key < L ? row[p] : 0u;
        }
    }
}

/* V of one (segment, head) in pairs of keys: vp[jp * D + d] = (v[2jp][d], v[2jp + 1][d]), zero past L up to
 * `pairs` pairs. */
static void pack_v(const Job *job, const uint16_t *v, int64_t L, uint32_t *vp, int64_t pairs) {
    const int64_t D = job->dim;
    for (int64_t jp = 0; jp < pairs; jp++) {
        if (2 * jp >= L) {
            memset(vp + jp * D, 0, sizeof(uint32_t) * (size_t)D);
            continue;
        }
        const uint16_t *a = v + 2 * jp * job->kts;
        const uint16_t *b = 2 * jp + 1 < L ? a + job->kts : NULL;
        for (int64_t d = 0; d < D; d++) vp[jp * D + d] = (uint32_t)a[d] | ((uint32_t)(b ? b[d] : 0) << 16);
    }
}

/* Scores of `n` (<= QB) query rows against the first L keys: s[r * Lp + key], scaled. */
static void scores(const Job *job, const uint16_t *q, int n, int64_t L, const uint32_t *kp, float *s, int64_t Lp) {
    const int64_t P = job->dim / 2, blocks = (L + 15) / 16;
    const uint32_t *qr[QB];
    for (int r = 0; r < QB; r++) qr[r] = (const uint32_t *)(q + (r < n ? r : 0) * job->ts);
    const __m512 scale = _mm512_set1_ps(job->scale);
    for (int64_t b = 0; b < blocks; b++) {
        __m512 acc[QB];
        for (int r = 0; r < QB; r++) acc[r] = _mm512_setzero_ps();
        const uint32_t *kb = kp + b * P * 16;
        for (int64_t p = 0; p < P; p++) {
            const __m512bh kv = (__m512bh)_mm512_loadu_si512(kb + p * 16);
            for (int r = 0; r < QB; r++)
                acc[r] = _mm512_dpbf16_ps(acc[r], kv, (__m512bh)_mm512_set1_epi32((int)qr[r][p]));
        }
        for (int r = 0; r < n; r++) _mm512_storeu_ps(s + r * Lp + b * 16, _mm512_mul_ps(acc[r], scale));
    }
}

/* exp(x) for x <= 0, Cephes' expf as in paged_decode.c (within 2 ulp; ~1e-38 below -87.3). */
static inline __m512 vexp(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.3f), x);
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500E-4f), r, _mm512_set1_ps(1.3981999507E-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, k);
}

/* Softmax of one row of L scores (fp32), written as bf16 hi and lo parts in key order to p and lo, zero from L
 * up to `width` (a multiple of 16: the P V pass of a block of rows reads up to its longest row). */
static void softmax_row(float *s, int64_t L, int64_t width, uint16_t *p, uint16_t *lo) {
    const int64_t blocks = (L + 15) / 16;
    const __mmask16 tail = (__mmask16)(L % 16 ? (1u << (L % 16)) - 1u : 0xffffu);
    __m512 vm = _mm512_set1_ps(-INFINITY);
    for (int64_t b = 0; b < blocks; b++)
        vm = _mm512_mask_max_ps(vm, b + 1 < blocks ? 0xffff : tail, vm, _mm512_loadu_ps(s + 16 * b));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vm));
    __m512 vs = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const __m512 e = _mm512_maskz_mov_ps(b + 1 < blocks ? 0xffff : tail,
                                             vexp(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * b), m)));
        _mm512_storeu_ps(s + 16 * b, e);
        vs = _mm512_add_ps(vs, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vs));
    for (int64_t b = 0; b < blocks; b++) {
        const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + 16 * b), inv);
        const __m256bh hi = _mm512_cvtneps_pbh(x);
        _mm256_storeu_si256((__m256i *)(p + 16 * b), (__m256i)hi);
        store_bf16x16(lo + 16 * b, _mm512_sub_ps(x, _mm512_cvtpbh_ps(hi)));
    }
    for (int64_t b = blocks; b < width / 16; b++) {
        memset(p + 16 * b, 0, 32);
        memset(lo + 16 * b, 0, 32);
    }
}

/* out rows of `n` (<= PB) queries = P V, D a multiple of 16 (at most 256). */
static void weighted_values(const Job *job, int n, int64_t L, const uint16_t *pp, const uint16_t *pl, int64_t pstride,
                            const uint32_t *vp, uint16_t *out) {
    const int64_t D = job->dim, chunks = D / 16, pairs = (L + 1) / 2;
    for (int64_t c0 = 0; c0 < chunks; c0 += 4) {
        const int64_t cn = chunks - c0 < 4 ? chunks - c0 : 4;
        __m512 acc[PB][4];
        for (int r = 0; r < PB; r++)
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
        for (int64_t jp = 0; jp < pairs; jp++) {
            __m512bh vv[4];
            for (int c = 0; c < cn; c++) vv[c] = (__m512bh)_mm512_loadu_si512(vp + jp * D + (c0 + c) * 16);
            for (int r = 0; r < n; r++) {
                uint32_t pair, low;
                memcpy(&pair, pp + r * pstride + 2 * jp, sizeof pair);
                memcpy(&low, pl + r * pstride + 2 * jp, sizeof low);
                const __m512bh pv = (__m512bh)_mm512_set1_epi32((int)pair);
                const __m512bh lv = (__m512bh)_mm512_set1_epi32((int)low);
                for (int c = 0; c < cn; c++) acc[r][c] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[r][c], vv[c], lv), vv[c], pv);
            }
        }
        for (int r = 0; r < n; r++)
            for (int c = 0; c < cn; c++) store_bf16x16(out + r * job->ots + (c0 + c) * 16, acc[r][c]);
    }
}

/* One (segment, query head) of a job: its length, its rows of q and out, its kv head's rows of k and v. */
typedef struct {
    int64_t L;
    const uint16_t *q, *k, *v;
    uint16_t *out;
} Item;

/* The item's rows, with its kv head's K and V packed (V zero-padded to `pairs` pairs of keys). */
static Item item_packed(const Job *job, int64_t seg, int64_t h, uint32_t *kp, uint32_t *vp, int64_t pairs) {
    const int64_t L = job->lengths[seg], start = job->starts[seg], kvh = h / job->group;
    const Item it = {L, job->q + start * job->ts + h * job->hs, job->k + start * job->kts + kvh * job->khs,
                     job->v + start * job->kts + kvh * job->khs, job->out + start * job->ots + h * job->dim};
    pack_k(job, it.k, L, kp);
    pack_v(job, it.v, L, vp, pairs);
    return it;
}

/* One (segment, query head): its kv head's K and V packed once, then blocks of QB query rows. Causal: row i
 * sees keys 0..i, so a block scores only the keys its last row sees and each row's softmax stops at its own. */
static void item(const Job *job, int64_t seg, int64_t h, uint32_t *kp, uint32_t *vp, float *s, uint16_t *pp,
                 int64_t Lp) {
    const int64_t L = job->lengths[seg];
    const Item it = item_packed(job, seg, h, kp, vp, (L + 1) / 2);
    const uint16_t *q = it.q;
    uint16_t *out = it.out;
    for (int64_t i = 0; i < L; i += QB) {
        const int n = L - i < QB ? (int)(L - i) : QB;
        const int64_t keys = job->causal ? i + n : L, width = (keys + 15) / 16 * 16;
        scores(job, q + i * job->ts, n, keys, kp, s, Lp);
        for (int r = 0; r < n; r++)
            softmax_row(s + r * Lp, job->causal ? i + r + 1 : L, width, pp + r * Lp, pp + (QB + r) * Lp);
        for (int r = 0; r < n; r += PB)
            weighted_values(job, n - r < PB ? n - r : PB, keys, pp + r * Lp, pp + (QB + r) * Lp, Lp, vp,
                            out + (i + r) * job->ots);
    }
}

#if HAVE_AMX
/* The same arithmetic on AMX tiles (Sapphire Rapids and later), where TDPBF16PS multiplies a 16 x 32 bf16 tile
 * by a 32 x 16 one into 16 x 16 fp32 sums: 16x the products of one VDPBF16PS. Per block of 16 query rows:
 *   scores   tiles of 16 queries x 16 keys, summed over D in chunks of 32 (A: the rows of q read through their
 *            stride; B: K packed as above, whose 16 pairs of one key block are exactly a B tile's rows)
 *   softmax  as above (fp32, the row scaled first), p as bf16 hi + lo, zero up to a multiple of 32 keys
 *   P V      tiles of 16 queries x 16 dims, summed over keys in chunks of 32 (A: p's hi and lo rows; B: V in
 *            pairs of keys as above: rows of 16 dims x one pair), lo then hi as above
 * Sums run in another order than the AVX512-BF16 path (tiles add their pairs in hardware order): the two
 * paths agree to fp32 rounding, not bit for bit. Tiles: 0-3 accumulators, 4-7 operands. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

#define QT 16 /* query rows per AMX block */

static void tiles_on(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
}

static void item_amx(const Job *job, int64_t seg, int64_t h, uint32_t *kp, uint32_t *vp, float *s, uint16_t *pp,
                     int64_t Lp, uint16_t *qbuf, float *obuf) {
    const int64_t L = job->lengths[seg], D = job->dim, P = D / 2;
    const Item it = item_packed(job, seg, h, kp, vp, (L + 31) / 32 * 16); /* P V reads whole chunks of 32 keys */
    const uint16_t *q = it.q;
    uint16_t *out = it.out;
    const __m512 scale = _mm512_set1_ps(job->scale);
    for (int64_t i = 0; i < L; i += QT) {
        const int n = L - i < QT ? (int)(L - i) : QT;
        const int64_t keys = job->causal ? i + n : L, blocks = (keys + 15) / 16, width = (keys + 31) / 32 * 32;
        const uint16_t *qa = q + i * job->ts;
        int64_t qstride = job->ts * 2;
        if (n < QT) { /* a last partial block: its rows copied, the rest zero */
            memset(qbuf, 0, sizeof(uint16_t) * (size_t)(QT * D));
            for (int r = 0; r < n; r++) memcpy(qbuf + r * D, qa + r * job->ts, sizeof(uint16_t) * (size_t)D);
            qa = qbuf, qstride = D * 2;
        }
        for (int64_t b = 0; b < blocks; b += 2) {
            const int two = b + 1 < blocks;
            _tile_zero(0);
            _tile_zero(1);
            for (int64_t c = 0; c < D / 32; c++) {
                _tile_loadd(4, qa + 32 * c, qstride);
                _tile_loadd(5, kp + (b * P + 16 * c) * 16, 64);
                _tile_dpbf16ps(0, 4, 5);
                if (two) {
                    _tile_loadd(6, kp + ((b + 1) * P + 16 * c) * 16, 64);
                    _tile_dpbf16ps(1, 4, 6);
                }
            }
            _tile_stored(0, s + b * 16, Lp * 4);
            if (two) _tile_stored(1, s + (b + 1) * 16, Lp * 4);
        }
        for (int r = 0; r < n; r++) {
            float *row = s + r * Lp;
            for (int64_t b = 0; b < blocks; b++) _mm512_storeu_ps(row + 16 * b, _mm512_mul_ps(_mm512_loadu_ps(row + 16 * b), scale));
            softmax_row(row, job->causal ? i + r + 1 : L, width, pp + r * Lp, pp + (QT + r) * Lp);
        }
        for (int r = n; r < QT; r++) {
            memset(pp + r * Lp, 0, sizeof(uint16_t) * (size_t)width);
            memset(pp + (QT + r) * Lp, 0, sizeof(uint16_t) * (size_t)width);
        }
        for (int64_t d0 = 0; d0 < D / 16; d0 += 4) {
            const int64_t cn = D / 16 - d0 < 4 ? D / 16 - d0 : 4;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t kc = 0; kc < width / 32; kc++) {
                _tile_loadd(4, pp + 32 * kc, Lp * 2);
                _tile_loadd(5, pp + QT * Lp + 32 * kc, Lp * 2);
                const uint32_t *vb = vp + 16 * kc * D + 16 * d0;
#define PV_TILE(T)                                  \
    if (cn > T) {                                   \
        _tile_loadd(6, vb + 16 * T, D * 4);         \
        _tile_dpbf16ps(T, 5, 6);                    \
        _tile_dpbf16ps(T, 4, 6);                    \
    }
                PV_TILE(0)
                PV_TILE(1)
                PV_TILE(2)
                PV_TILE(3)
#undef PV_TILE
            }
            _tile_stored(0, obuf, 256);
            if (cn > 1) _tile_stored(1, obuf + 16, 256);
            if (cn > 2) _tile_stored(2, obuf + 32, 256);
            if (cn > 3) _tile_stored(3, obuf + 48, 256);
            for (int r = 0; r < n; r++)
                for (int64_t c = 0; c < cn; c++)
                    store_bf16x16(out + (i + r) * job->ots + (d0 + c) * 16, _mm512_loadu_ps(obuf + r * 64 + c * 16));
        }
    }
}
#endif /* HAVE_AMX */

#endif /* HAVE_BF16DOT */

/* q [T, heads, dim] (strides ts, hs), k and v [T, kv_heads, dim] (strides kts, khs; query head h reads kv head
 * h / (heads / kv_heads)), out [T, heads, dim] contiguous. `amx`: run the AMX path (a head dim that is a multiple
 * of 32; check pagedq_varlen_amx_supported() first). Returns 0; 1 without AVX512-BF16 in this build (or without
 * AMX when asked for it); 2 for a head dim that is not a multiple of 16 (32 with amx) up to 256, or heads not a
 * multiple of kv_heads; 3 when scratch memory cannot be allocated. */
int pagedq_varlen_attention_bf16(const void *q, const void *k, const void *v, void *out, const int64_t *starts,
                                 const int64_t *lengths, int64_t segments, int64_t heads, int64_t kv_heads,
                                 int64_t dim, int64_t ts, int64_t hs, int64_t kts, int64_t khs, float scale,
                                 int causal, int threads, int amx) {
#if HAVE_BF16DOT
    if (dim % 16 != 0 || dim > 256 || dim <= 0 || kv_heads <= 0 || heads % kv_heads != 0) return 2;
    if (amx && (!pagedq_varlen_amx_supported())) return 1;
    if (amx && dim % 32 != 0) return 2;
    int64_t longest = 0;
    for (int64_t s = 0; s < segments; s++) longest = lengths[s] > longest ? lengths[s] : longest;
    if (longest == 0) return 0;
    const int64_t Lp = (longest + 31) / 32 * 32, rows = 16; /* rows: max(QB, QT) */
    const Job job = {(const uint16_t *)q, (const uint16_t *)k, (const uint16_t *)v, (uint16_t *)out,
                     starts, lengths, ts, hs, kts, khs, heads * dim, heads, heads / kv_heads, dim, scale, causal};
    const int64_t items = segments * heads;
    int failed = 0;
    /* torch's own OpenMP team (see paged_decode.c): longest segments first would balance better, but the
     * packed row is already sorted by nothing in particular and items are small (<= ~0.2 ms). */
#pragma omp parallel num_threads(threads)
    {
        uint32_t *kp = malloc(sizeof(uint32_t) * (size_t)(Lp * dim / 2));
        uint32_t *vp = malloc(sizeof(uint32_t) * (size_t)(Lp * dim / 2));
        float *s = malloc(sizeof(float) * (size_t)(rows * Lp));
        uint16_t *pp = malloc(sizeof(uint16_t) * (size_t)(2 * rows * Lp));
        uint16_t *qbuf = malloc(sizeof(uint16_t) * (size_t)(rows * dim));
        float *obuf = malloc(sizeof(float) * (size_t)(rows * 64));
        if (!kp || !vp || !s || !pp || !qbuf || !obuf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
#if HAVE_AMX
        if (amx && !failed) tiles_on();
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (failed) continue;
#if HAVE_AMX
            if (amx) {
                item_amx(&job, it / heads, it % heads, kp, vp, s, pp, Lp, qbuf, obuf);
                continue;
            }
#endif
            item(&job, it / heads, it % heads, kp, vp, s, pp, Lp);
        }
#if HAVE_AMX
        if (amx && !failed) _tile_release();
#endif
        free(kp);
        free(vp);
        free(s);
        free(pp);
        free(qbuf);
        free(obuf);
    }
    return failed ? 3 : 0;
#else
    (void)q, (void)k, (void)v, (void)out, (void)starts, (void)lengths, (void)segments, (void)heads, (void)dim;
    (void)kv_heads, (void)ts, (void)hs, (void)kts, (void)khs, (void)scale, (void)causal, (void)threads, (void)amx;
    return 1;
#endif
}
