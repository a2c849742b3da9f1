/* Native top-K of rows of scores, with the library's tie rule, and the scores of queries
 * against their own candidates (window), for convnn.native.
 *
 * Scores are compared as ordered integer keys: the float's sign-magnitude bits made
 * monotone (negative magnitudes reversed) after -0.0 is taken for +0.0, the keys of
 * _common._tie_free_keys. Among equal keys the lower position wins (the tie rule), and the
 * K best come out in canonical order: descending score, equal scores by lower position.
 * Each row is ranked one of three ways (rank_row):
 *
 * - rounds: K passes of a vectorised maximum, each taking the best key at the lowest
 *   position and striking it out, where K times the width is small; rows of at most 512
 *   scores eight at a time, a row to a vector lane;
 * - rounds over the K best groups of 32 scores of a wide row (the K best scores lie in
 *   them), found by rounds over the group maxima;
 * - a heap of the K best (worst at the root), offered in ascending position only the
 *   scores that can still enter, where K is large.
 *
 * Plain C99 with GCC / Clang vector extensions and the CPython API (no torch headers):
 * tensors come as data pointers, and the interpreter lock is released while rows are ranked
 * (the chunked backend's worker threads rank blocks at once).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Score kinds: how a score's 32-bit sign-magnitude pattern is read. */
enum { F32 = 0, F32_AS_BF16 = 1, HALF16 = 2 };

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__APPLE__) && !defined(__clang__)
/* One build runs on every x86-64 CPU and uses the wide vectors where the CPU has them. */
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

#define GROUP 32
#define LANES 8
/* Eight int32 lanes (GCC and Clang vector extensions): one AVX2 register, two SSE ones. */
typedef int32_t lanes __attribute__((vector_size(4 * LANES)));
typedef int32_t lanes_u __attribute__((vector_size(4 * LANES), aligned(4)));
/* Rows with K * M up to this are ranked by rounds (see rank_row). */
#define ROUNDS_WORK 8192
/* Rows of at most this many scores are ranked LANES at a time (rank_rounds_lanes). */
#define LANE_ROWS_WIDTH 512

/* Lane by lane, where ``better``: best = k and at = pos (the round's running maximum). */
static inline void keep(lanes *best, lanes *at, lanes k, lanes pos, lanes better) {
    *best = (k & better) | (*best & ~better);
    *at = (pos & better) | (*at & ~better);
}

/* Merge the odd chain (best2, at2) into the even one: the better key, an equal one at the
 * lower position. */
static inline void merge(lanes *best, lanes *at, lanes best2, lanes at2) {
    keep(best, at, best2, at2, (best2 > *best) | ((best2 == *best) & (at2 < *at)));
}

static inline int32_t ordered(uint32_t bits) {
    bits = bits == 0x80000000u ? 0u : bits; /* -0.0 ties +0.0, as the scores compare */
    int32_t s = (int32_t)bits;
    return s ^ ((s >> 31) & 0x7FFFFFFF);
}

/* The float bits of an ordered key (the map is its own inverse; -0.0 comes back as +0.0). */
static inline uint32_t bits_of(int32_t key) { return (uint32_t)(key ^ ((key >> 31) & 0x7FFFFFFF)); }

/* The bits of an fp32 score rounded to bfloat16 (round to nearest even), as fp32 bits. */
static inline uint32_t round_bf16(uint32_t bits) {
    return ((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16) << 16;
}

/* a is worse than b: a lower key, or an equal key at a higher position. */
static inline int worse(int32_t ka, int32_t pa, int32_t kb, int32_t pb) {
    return ka < kb || (ka == kb && pa > pb);
}

/* Restore the heap (worst at the root) below slot i of n. */
static void sift_down(int32_t *hk, int32_t *hp, Py_ssize_t n, Py_ssize_t i) {
    int32_t k = hk[i], p = hp[i];
    for (;;) {
        Py_ssize_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && worse(hk[c + 1], hp[c + 1], hk[c], hp[c])) c++;
        if (!worse(hk[c], hp[c], k, p)) break;
        hk[i] = hk[c], hp[i] = hp[c];
        i = c;
    }
    hk[i] = k, hp[i] = p;
}

static inline int32_t key_at(const void *row, Py_ssize_t j, int kind) {
    if (kind == HALF16) return ordered((uint32_t)((const uint16_t *)row)[j] << 16);
    uint32_t bits = ((const uint32_t *)row)[j];
    return ordered(kind == F32_AS_BF16 ? round_bf16(bits) : bits);
}

/* The best key of each group of GROUP scores, best[g] = max(keys of row[g * GROUP ...]), in
 * one vectorised pass per kind. */
#define GROUP_BEST(T, KEY)                                                \
    for (Py_ssize_t g = 0; g < groups; g++) {                             \
        const T *x = (const T *)row + g * GROUP;                          \
        int32_t m = INT32_MIN;                                            \
        for (int t = 0; t < GROUP; t++) {                                 \
            int32_t k = KEY;                                              \
            m = k > m ? k : m;                                            \
        }                                                                 \
        best[g] = m;                                                      \
    }

CLONES static void group_best(const void *row, Py_ssize_t groups, int kind, int32_t *best) {
    if (kind != HALF16) {
        GROUP_BEST(uint32_t, ordered(x[t]))
        if (kind == F32_AS_BF16) /* rounding is monotone: a group's best, rounded */
            for (Py_ssize_t g = 0; g < groups; g++) best[g] = ordered(round_bf16(bits_of(best[g])));
    } else {
        GROUP_BEST(uint16_t, ordered((uint32_t)x[t] << 16))
    }
}

/* Offer key k at position p to the heap of n (< K: still filling) kept ones. */
static inline Py_ssize_t offer(int32_t *hk, int32_t *hp, Py_ssize_t n, Py_ssize_t K, int32_t k,
                               int32_t p) {
    if (n < K) { /* sift up: positions come ascending, so an equal key is worse */
        Py_ssize_t i = n;
        while (i > 0 && worse(k, p, hk[(i - 1) / 2], hp[(i - 1) / 2])) {
            hk[i] = hk[(i - 1) / 2], hp[i] = hp[(i - 1) / 2];
            i = (i - 1) / 2;
        }
        hk[i] = k, hp[i] = p;
        return n + 1;
    }
    if (k > hk[0]) { /* an equal key comes later than the root's: it loses */
        hk[0] = k, hp[0] = p;
        sift_down(hk, hp, K, 0);
    }
    return n;
}

/* The K best positions of a row of M scores, in canonical order, into out[0..K), by a heap.
 *
 * With enough groups, the K-th best group maximum bounds the K-th best key from below
 * (K groups hold keys at least that good), so only groups reaching it are read again, and
 * in them only keys reaching it are offered. Otherwise every key is offered. ``scratch``
 * holds the M / GROUP group maxima. */
static void rank_heap(const void *row, int kind, Py_ssize_t M, Py_ssize_t K, int32_t *hk,
                      int32_t *hp, int32_t *scratch, int64_t *out) {
    Py_ssize_t n = 0, groups = M / GROUP;
    if (groups >= 2 * K) {
        group_best(row, groups, kind, scratch);
        for (Py_ssize_t g = 0; g < groups; g++) n = offer(hk, hp, n, K, scratch[g], (int32_t)g);
        int32_t bar = hk[0];
        n = 0;
        for (Py_ssize_t g = 0; g < groups; g++) {
            if (scratch[g] < bar) continue;
            for (Py_ssize_t j = g * GROUP; j < (g + 1) * GROUP; j++) {
                int32_t k = key_at(row, j, kind);
                if (k >= bar) n = offer(hk, hp, n, K, k, (int32_t)j);
            }
        }
        for (Py_ssize_t j = groups * GROUP; j < M; j++) {
            int32_t k = key_at(row, j, kind);
            if (k >= bar) n = offer(hk, hp, n, K, k, (int32_t)j);
        }
    } else {
        for (Py_ssize_t j = 0; j < M; j++)
            n = offer(hk, hp, n, K, key_at(row, j, kind), (int32_t)j);
    }
    for (; n > 0; n--) { /* pop the worst into the last free slot */
        out[n - 1] = hp[0];
        hk[0] = hk[n - 1], hp[0] = hp[n - 1];
        sift_down(hk, hp, n - 1, 0);
    }
}

/* The ordered keys of row[0..M) into keys, padded with INT32_MIN to a whole number of
 * 2 LANES: one vectorised pass per kind. */
CLONES static void read_keys(const void *row, Py_ssize_t M, int kind, int32_t *keys) {
    if (kind == F32) {
        const uint32_t *x = (const uint32_t *)row;
        for (Py_ssize_t t = 0; t < M; t++) keys[t] = ordered(x[t]);
    } else if (kind == F32_AS_BF16) {
        const uint32_t *x = (const uint32_t *)row;
        for (Py_ssize_t t = 0; t < M; t++) keys[t] = ordered(round_bf16(x[t]));
    } else {
        const uint16_t *x = (const uint16_t *)row;
        for (Py_ssize_t t = 0; t < M; t++) keys[t] = ordered((uint32_t)x[t] << 16);
    }
    for (Py_ssize_t t = M; t % (2 * LANES); t++) keys[t] = INT32_MIN;
}

/* K rounds over a row's M keys (padded to 2 LANES), each taking the best key at the lowest
 * position (the tie rule) and striking it out with INT32_MIN: the canonical order comes out
 * directly. Each lane keeps its best key and the first position holding it; the lanes are
 * then compared. Returns 0 if a round's best was INT32_MIN, which a struck key, padding and
 * a real score (a negative NaN of all-one bits) share: the caller ranks that row by the heap
 * instead. */
CLONES static int rank_rounds(int32_t *keys, Py_ssize_t M, Py_ssize_t K, int64_t *out) {
    Py_ssize_t padded = (M + 2 * LANES - 1) / (2 * LANES) * (2 * LANES);
    lanes first = {0, 1, 2, 3, 4, 5, 6, 7}, none = first - first + INT32_MIN;
    for (Py_ssize_t r = 0; r < K; r++) {
        /* two chains (even and odd vectors), so each compare waits on half as many */
        lanes best = none, at = first, best2 = none, at2 = first + LANES, pos = first;
        for (Py_ssize_t t = 0; t < padded; t += 2 * LANES, pos += 2 * LANES) {
            lanes k = *(const lanes_u *)(keys + t), k2 = *(const lanes_u *)(keys + t + LANES);
            keep(&best, &at, k, pos, k > best); /* strictly: the first best stays */
            keep(&best2, &at2, k2, pos + LANES, k2 > best2);
        }
        merge(&best, &at, best2, at2);
        int32_t m = best[0], p = INT32_MAX; /* across the lanes, without branches */
        for (int l = 1; l < LANES; l++) m = best[l] > m ? best[l] : m;
        for (int l = 0; l < LANES; l++) p = best[l] == m && at[l] < p ? at[l] : p;
        if (m == INT32_MIN) return 0;
        out[r] = p;
        keys[p] = INT32_MIN;
    }
    return 1;
}

/* The keys of LANES rows (``rows``, each M scores; NULL: a missing row, all INT32_MIN) into
 * ``keys`` lane by lane: keys[t * LANES + l] is row l's key at position t. */
static void read_keys_lanes(const char *const *rows, Py_ssize_t M, int kind, int32_t *keys) {
    for (int l = 0; l < LANES; l++)
        for (Py_ssize_t t = 0; t < M; t++)
            keys[t * LANES + l] = rows[l] ? key_at(rows[l], t, kind) : INT32_MIN;
}

/* rank_rounds for LANES rows at once, a row to a lane (keys from read_keys_lanes): each
 * round is a lane-wise maximum down the positions, with no step across lanes. The first
 * ``real`` lanes hold rows; row l's positions go to out[l * out_stride ...]. Returns a bit
 * mask of the lanes a round found INT32_MIN in (see rank_rounds), to be ranked by the heap
 * instead. */
CLONES static int rank_rounds_lanes(int32_t *keys, Py_ssize_t M, Py_ssize_t K, int64_t *out,
                                    Py_ssize_t out_stride, int real) {
    lanes zero = {0}, none = zero + INT32_MIN;
    int failed = 0;
    for (Py_ssize_t r = 0; r < K; r++) {
        /* two chains (even and odd positions), so each compare waits on half as many */
        lanes best = none, at = zero, best2 = none, at2 = zero;
        Py_ssize_t t = 0;
        for (; t + 1 < M; t += 2) {
            lanes k = *(const lanes_u *)(keys + t * LANES);
            lanes k2 = *(const lanes_u *)(keys + (t + 1) * LANES);
            keep(&best, &at, k, zero + (int32_t)t, k > best); /* strictly: the first stays */
            keep(&best2, &at2, k2, zero + (int32_t)(t + 1), k2 > best2);
        }
        if (t < M) {
            lanes k = *(const lanes_u *)(keys + t * LANES);
            keep(&best, &at, k, zero + (int32_t)t, k > best);
        }
        merge(&best, &at, best2, at2);
        for (int l = 0; l < real; l++) {
            failed |= (best[l] == INT32_MIN) << l;
            out[l * out_stride + r] = at[l];
            keys[at[l] * LANES + l] = INT32_MIN;
        }
    }
    return failed;
}

/* rank_rounds over the K best groups of GROUP scores: the K best scores lie in them (a
 * group is beaten only by one holding a better score; equal group maxima go to the lower
 * group, as the tie rule would). The groups are found by rounds over the group maxima, and
 * their scores, in ascending position with the tail that fills no group, ranked by rounds.
 * ``keys`` holds M / GROUP + 2 LANES + K GROUP + M % GROUP + 2 LANES keys, ``chosen`` K.
 * Returns 0 where rank_rounds does. */
static int rank_groups(const void *row, int kind, Py_ssize_t M, Py_ssize_t K, int32_t *keys,
                       int64_t *chosen, int64_t *out) {
    Py_ssize_t groups = M / GROUP, body = groups * GROUP, item = kind == HALF16 ? 2 : 4;
    Py_ssize_t padded = (groups + 2 * LANES - 1) / (2 * LANES) * (2 * LANES);
    group_best(row, groups, kind, keys);
    for (Py_ssize_t g = groups; g < padded; g++) keys[g] = INT32_MIN;
    if (!rank_rounds(keys, groups, K, chosen)) return 0;
    for (Py_ssize_t i = 1; i < K; i++) { /* the groups in ascending position */
        int64_t g = chosen[i];
        Py_ssize_t j = i;
        for (; j > 0 && chosen[j - 1] > g; j--) chosen[j] = chosen[j - 1];
        chosen[j] = g;
    }
    int32_t *cand = keys + padded;
    for (Py_ssize_t i = 0; i < K; i++)
        read_keys((const char *)row + chosen[i] * GROUP * item, GROUP, kind, cand + i * GROUP);
    read_keys((const char *)row + body * item, M - body, kind, cand + K * GROUP);
    if (!rank_rounds(cand, K * GROUP + M - body, K, out)) return 0;
    for (Py_ssize_t i = 0; i < K; i++) { /* candidate columns back to positions */
        int64_t c = out[i];
        out[i] = c < K * GROUP ? chosen[c / GROUP] * GROUP + c % GROUP : body + c - K * GROUP;
    }
    return 1;
}

/* The K best positions of a row of M scores, in canonical order, into out[0..K): by rounds
 * where they are little work (each round is one vectorised pass), over the K best groups
 * of a wide row or over the whole row, else by the heap. ``keys`` holds M + M / GROUP +
 * 4 LANES keys, ``scratch`` 2 K + M / GROUP + 1, ``chosen`` K. */
static void rank_row(const void *row, int kind, Py_ssize_t M, Py_ssize_t K, int32_t *keys,
                     int32_t *scratch, int64_t *chosen, int64_t *out) {
    Py_ssize_t groups = M / GROUP;
    if (groups >= 2 * K && K * (K * GROUP + M % GROUP) <= ROUNDS_WORK) {
        if (rank_groups(row, kind, M, K, keys, chosen, out)) return;
    } else if (K * M <= ROUNDS_WORK) {
        read_keys(row, M, kind, keys);
        if (rank_rounds(keys, M, K, out)) return;
    }
    rank_heap(row, kind, M, K, scratch, scratch + K, scratch + 2 * K, out);
}

/* What rank_rows needs for rows of M scores and K best: rank_row's keys, its heap and group
 * maxima, and its chosen groups; for narrow rows with few rounds (by_lanes), LANES rows at
 * a time, a row to a lane, their keys lane by lane. */
typedef struct {
    Py_ssize_t M, K;
    int by_lanes;
    size_t n_keys;
    int32_t *keys, *lane_keys;
    int64_t *chosen;
} Ranker;

static int ranker_open(Ranker *r, Py_ssize_t M, Py_ssize_t K) {
    r->M = M, r->K = K;
    r->n_keys = (size_t)M + (size_t)M / GROUP + 4 * LANES;
    size_t n_scratch = 2 * (size_t)K + (size_t)M / GROUP + 1;
    r->chosen = (int64_t *)malloc((size_t)K * sizeof(int64_t));
    r->keys = (int32_t *)malloc((r->n_keys + n_scratch) * sizeof(int32_t));
    r->by_lanes = M <= LANE_ROWS_WIDTH && K * M <= ROUNDS_WORK;
    r->lane_keys = r->by_lanes ? (int32_t *)malloc((size_t)M * LANES * sizeof(int32_t)) : NULL;
    if (r->keys && r->chosen && (!r->by_lanes || r->lane_keys)) return 1;
    free(r->keys), free(r->chosen), free(r->lane_keys);
    return 0;
}

static void ranker_close(Ranker *r) { free(r->keys), free(r->chosen), free(r->lane_keys); }

/* The K best positions of each of ``rows`` rows of M scores (``kind``; rows ``stride``
 * elements apart, each contiguous) into the int64 rows of dst (``out_stride`` apart), in
 * canonical order. */
static void rank_rows(const Ranker *rk, const void *src, int kind, Py_ssize_t rows,
                      Py_ssize_t stride, int64_t *dst, Py_ssize_t out_stride) {
    Py_ssize_t M = rk->M, K = rk->K, r = 0;
    size_t item = kind == HALF16 ? 2 : 4;
    int32_t *keys = rk->keys, *heap = keys + rk->n_keys;
    for (; rk->by_lanes && r < rows; r += LANES) {
        const char *group[LANES];
        for (int l = 0; l < LANES; l++)
            group[l] = r + l < rows ? (const char *)src + (size_t)((r + l) * stride) * item : NULL;
        read_keys_lanes(group, M, kind, rk->lane_keys);
        int64_t *out = dst + r * out_stride;
        int real = rows - r < LANES ? (int)(rows - r) : LANES;
        int failed = rank_rounds_lanes(rk->lane_keys, M, K, out, out_stride, real);
        for (int l = 0; l < real; l++)
            if (failed >> l & 1)
                rank_heap(group[l], kind, M, K, heap, heap + K, heap + 2 * K, out + l * out_stride);
    }
    for (; r < rows; r++) {
        const char *row = (const char *)src + (size_t)(r * stride) * item;
        rank_row(row, kind, M, K, keys, heap, rk->chosen, dst + r * out_stride);
    }
}

/* Eight float lanes; with contraction off (setup.py: -ffp-contract=off) every build and CPU
 * rounds a dot product the same way. */
typedef float floats __attribute__((vector_size(4 * LANES)));
typedef float floats_u __attribute__((vector_size(4 * LANES), aligned(4)));

/* a . b over d floats, in a fixed order: eight lane sums, added pairwise, then the tail. */
static inline float dot(const float *a, const float *b, Py_ssize_t d) {
    floats acc = {0};
    Py_ssize_t t = 0;
    for (; t + LANES <= d; t += LANES)
        acc += *(const floats_u *)(a + t) * *(const floats_u *)(b + t);
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; t < d; t++) s += a[t] * b[t];
    return s;
}

/* dot(a, b[t], d) for eight rows b[t] at once, each summed as dot sums it (bit for bit): their
 * lane sums side by side, transposed so that lane l of all eight is one vector, and added in
 * dot's pairs; then the tail. Into out[0..8). */
static inline __attribute__((always_inline)) void dot8(const float *a, const float *const *b,
                                                       Py_ssize_t d, float *out) {
    floats r0 = {0}, r1 = {0}, r2 = {0}, r3 = {0}, r4 = {0}, r5 = {0}, r6 = {0}, r7 = {0};
    Py_ssize_t t = 0;
    for (; t + LANES <= d; t += LANES) {
        floats x = *(const floats_u *)(a + t);
        r0 += x * *(const floats_u *)(b[0] + t), r1 += x * *(const floats_u *)(b[1] + t);
        r2 += x * *(const floats_u *)(b[2] + t), r3 += x * *(const floats_u *)(b[3] + t);
        r4 += x * *(const floats_u *)(b[4] + t), r5 += x * *(const floats_u *)(b[5] + t);
        r6 += x * *(const floats_u *)(b[6] + t), r7 += x * *(const floats_u *)(b[7] + t);
    }
    const lanes even = {0, 8, 1, 9, 4, 12, 5, 13}, odd = {2, 10, 3, 11, 6, 14, 7, 15};
    const lanes pairs_lo = {0, 1, 8, 9, 4, 5, 12, 13}, pairs_hi = {2, 3, 10, 11, 6, 7, 14, 15};
    const lanes lo = {0, 1, 2, 3, 8, 9, 10, 11}, hi = {4, 5, 6, 7, 12, 13, 14, 15};
    floats t0 = __builtin_shuffle(r0, r1, even), t1 = __builtin_shuffle(r0, r1, odd);
    floats t2 = __builtin_shuffle(r2, r3, even), t3 = __builtin_shuffle(r2, r3, odd);
    floats t4 = __builtin_shuffle(r4, r5, even), t5 = __builtin_shuffle(r4, r5, odd);
    floats t6 = __builtin_shuffle(r6, r7, even), t7 = __builtin_shuffle(r6, r7, odd);
    floats u0 = __builtin_shuffle(t0, t2, pairs_lo), u1 = __builtin_shuffle(t0, t2, pairs_hi);
    floats u2 = __builtin_shuffle(t1, t3, pairs_lo), u3 = __builtin_shuffle(t1, t3, pairs_hi);
    floats u4 = __builtin_shuffle(t4, t6, pairs_lo), u5 = __builtin_shuffle(t4, t6, pairs_hi);
    floats u6 = __builtin_shuffle(t5, t7, pairs_lo), u7 = __builtin_shuffle(t5, t7, pairs_hi);
    /* lane l of the eight rows: (u0, u4) hold lanes 0 and 4, (u1, u5) 1 and 5, ... */
    floats l0 = __builtin_shuffle(u0, u4, lo), l4 = __builtin_shuffle(u0, u4, hi);
    floats l1 = __builtin_shuffle(u1, u5, lo), l5 = __builtin_shuffle(u1, u5, hi);
    floats l2 = __builtin_shuffle(u2, u6, lo), l6 = __builtin_shuffle(u2, u6, hi);
    floats l3 = __builtin_shuffle(u3, u7, lo), l7 = __builtin_shuffle(u3, u7, hi);
    floats s = ((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7));
    for (; t < d; t++) {
        floats x = {b[0][t], b[1][t], b[2][t], b[3][t], b[4][t], b[5][t], b[6][t], b[7][t]};
        s += a[t] * x;
    }
    *(floats_u *)out = s; /* stored here: a vector return's registers differ between clones */
}

/* out[b, i, j] = q[b, i] . k[b, cand[b, i, j]] for B x n queries and their W candidates
 * (strides in elements; a batch stride of 0 shares across the batch). Returns 0 if a
 * candidate lies outside [0, M). */
CLONES static int window_rows(const float *q, const float *k, const int64_t *cand, float *out,
                              Py_ssize_t B, Py_ssize_t n, Py_ssize_t W, Py_ssize_t d,
                              Py_ssize_t M, Py_ssize_t qb, Py_ssize_t qr, Py_ssize_t kb,
                              Py_ssize_t kr, Py_ssize_t cb) {
    for (Py_ssize_t b = 0; b < B; b++)
        for (Py_ssize_t i = 0; i < n; i++) {
            const float *qi = q + b * qb + i * qr;
            const int64_t *c = cand + b * cb + i * W;
            float *o = out + (b * n + i) * W;
            Py_ssize_t j = 0;
            for (; j + LANES <= W; j += LANES) { /* eight candidates at a time */
                const float *kc[LANES];
                for (int t = 0; t < LANES; t++) {
                    if (c[j + t] < 0 || c[j + t] >= M) return 0;
                    kc[t] = k + b * kb + c[j + t] * kr;
                }
                dot8(qi, kc, d, o + j);
            }
            for (; j < W; j++) {
                if (c[j] < 0 || c[j] >= M) return 0;
                o[j] = dot(qi, k + b * kb + c[j] * kr, d);
            }
        }
    return 1;
}

/* The K best of each query's W candidates under its window scores, into out (B, n, K) as the
 * candidates' key indices in canonical order (descending score, equal scores by lower
 * position in cand, whose rows ascend): window_rows' scores of a block of queries at a time,
 * ranked by rank_rows while they are in the cache. ex: NULL or each query's excluded key,
 * scored -inf. rk: a Ranker for W and K; buf: WINDOW_BLOCK * W floats. Returns 0 if a
 * candidate lies outside [0, M). */
#define WINDOW_BLOCK 64
static int window_topk_rows(const float *q, const float *k, const int64_t *cand, const int64_t *ex,
                            int64_t *out, Py_ssize_t B, Py_ssize_t n, Py_ssize_t W, Py_ssize_t d,
                            Py_ssize_t M, Py_ssize_t qb, Py_ssize_t qr, Py_ssize_t kb,
                            Py_ssize_t kr, Py_ssize_t cb, const Ranker *rk, float *buf) {
    Py_ssize_t K = rk->K;
    for (Py_ssize_t b = 0; b < B; b++)
        for (Py_ssize_t i0 = 0; i0 < n; i0 += WINDOW_BLOCK) {
            Py_ssize_t rows = n - i0 < WINDOW_BLOCK ? n - i0 : WINDOW_BLOCK;
            const int64_t *c = cand + b * cb + i0 * W;
            if (!window_rows(q + b * qb + i0 * qr, k + b * kb, c, buf, 1, rows, W, d, M, 0, qr, 0,
                             kr, 0))
                return 0;
            if (ex)
                for (Py_ssize_t i = 0; i < rows; i++)
                    for (Py_ssize_t j = 0; j < W; j++)
                        if (c[i * W + j] == ex[i0 + i]) buf[i * W + j] = -INFINITY;
            int64_t *o = out + (b * n + i0) * K;
            rank_rows(rk, buf, F32, rows, W, o, K);
            for (Py_ssize_t i = 0; i < rows; i++) /* positions to key indices */
                for (Py_ssize_t t = 0; t < K; t++) o[i * K + t] = c[i * W + o[i * K + t]];
        }
    return 1;
}

/* Scores and top-K in one pass (gemm_topk): the K best keys of each query under q . k,
 * where the (n, M) scores are never written out. A 6 x 16 register tile of scores is
 * computed at a time (packed operands, fused multiply-adds in one fixed order over the depth,
 * so every CPU that runs it gets the same scores) and offered at once to the rows' running
 * top-K: a row's K best so far, sorted, in 16 slots, and its K-th score as the threshold a
 * score must beat. Candidates reach each row in ascending position, so a strict comparison
 * keeps the lower position among equal scores: the tie rule, and the slots come out in
 * canonical order. Equal floats compare equal (-0.0 and +0.0 too), as their ordered keys do.
 *
 * Self-similarity (the keys are the queries) is symmetric: only tiles on or above the
 * diagonal are computed, and each score s(i, j), i < j, is offered to row i and to row j.
 * The loop order (superblocks of rows, then panels of keys, then the superblock's tiles)
 * still brings each row its candidates in ascending position (see gemm_topk_images).
 *
 * x86-64 with AVX2 and FMA only (checked at run time); elsewhere convnn.native does not
 * offer it and the chunked backend takes the GEMM and top-K path. */
/* Sixteen float lanes: one AVX-512 register, two AVX2 ones (the rows of attention). */
typedef float wides __attribute__((vector_size(64)));
typedef float wides_u __attribute__((vector_size(64), aligned(4)));
#define WIDE 16

/* y[0..d) += a * x[0..d), sixteen lanes at a time (no contraction: every build rounds
 * alike). */
static inline __attribute__((always_inline)) void axpy(float *y, float a, const float *x, Py_ssize_t d) {
    wides A = (wides){0} + a;
    Py_ssize_t t = 0;
    for (; t + WIDE <= d; t += WIDE) *(wides_u *)(y + t) += A * *(const wides_u *)(x + t);
    for (; t < d; t++) y[t] += a * x[t];
}

/* o[0..d) = sum over j < K of p[j] rows[j][0..d), each number summed in ascending j from 0:
 * four vectors of the output at a time kept in registers while the K rows stream by. */
static inline __attribute__((always_inline)) void weighted_rows(float *o, const float *p, const float *const *rows,
                                 Py_ssize_t K, Py_ssize_t d) {
    Py_ssize_t t = 0;
    for (; t + 4 * WIDE <= d; t += 4 * WIDE) {
        wides a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (Py_ssize_t j = 0; j < K; j++) {
            wides P = (wides){0} + p[j];
            const float *x = rows[j] + t;
            a0 += P * *(const wides_u *)x, a1 += P * *(const wides_u *)(x + WIDE);
            a2 += P * *(const wides_u *)(x + 2 * WIDE), a3 += P * *(const wides_u *)(x + 3 * WIDE);
        }
        *(wides_u *)(o + t) = a0, *(wides_u *)(o + t + WIDE) = a1;
        *(wides_u *)(o + t + 2 * WIDE) = a2, *(wides_u *)(o + t + 3 * WIDE) = a3;
    }
    for (; t + WIDE <= d; t += WIDE) {
        wides a = {0};
        for (Py_ssize_t j = 0; j < K; j++) a += ((wides){0} + p[j]) * *(const wides_u *)(rows[j] + t);
        *(wides_u *)(o + t) = a;
    }
    for (; t < d; t++) {
        float a = 0.0f;
        for (Py_ssize_t j = 0; j < K; j++) a += p[j] * rows[j][t];
        o[t] = a;
    }
}

/* exp of eight numbers at most 0 (scores less their row's maximum), about one unit in the
 * last place from expf: 2^n e^r with r = x - n ln 2 (in two parts) and a polynomial for
 * e^r (Cephes' expf). Below -87 (where expf leaves the normal floats) it gives 0; NaN
 * stays NaN. */
static inline __attribute__((always_inline)) floats exp_lanes(floats x) {
    const floats lo = (floats){0} - 87.0f;
    lanes below = x < lo; /* NaN compares false: kept */
    x = (floats)((below & (lanes)lo) | (~below & (lanes)x));
    floats fx = x * 1.44269504088896341f + 0.5f;
    lanes n = __builtin_convertvector(fx, lanes); /* truncates toward 0: floor below */
    n += __builtin_convertvector(n, floats) > fx; /* -1 where it rounded up */
    floats fn = __builtin_convertvector(n, floats);
    floats r = x - fn * 0.693359375f - fn * -2.12194440e-4f;
    floats y = (floats){0} + 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f, y = y * r + 8.3334519073e-3f, y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f, y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    lanes bits = (n + 127) << 23;
    floats scale;
    memcpy(&scale, &bits, sizeof scale);
    return (floats)((lanes)(y * scale) & ~below);
}

/* sc[0..K) = exp(sc - top), returning their sum in a fixed order. */
static inline __attribute__((always_inline)) float exp_sum(float *sc, Py_ssize_t K, float top) {
    floats acc = {0};
    Py_ssize_t j = 0;
    for (; j + LANES <= K; j += LANES) {
        floats e = exp_lanes(*(floats_u *)(sc + j) - top);
        *(floats_u *)(sc + j) = e, acc += e;
    }
    float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    if (j < K) { /* the tail as one padded vector */
        floats e = (floats){0} - 87.0f - 1.0f, t = (floats){0};
        for (Py_ssize_t u = j; u < K; u++) e[u - j] = sc[u] - top;
        e = exp_lanes(e);
        for (Py_ssize_t u = j; u < K; u++) sc[u] = e[u - j], t[u - j] = e[u - j];
        sum += ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
    }
    return sum;
}

/* Softmax attention of each query over its own list of K keys (those the operator selected,
 * or its window): with every tensor given as a pointer and strides in floats for the image
 * b, the head g and the row (a row's d numbers contiguous; a stride of 0 shares), and the
 * slices s = b * G + g for s0 <= s < s1, p[s, i, :] = softmax(scale * q_i . k_c) over the
 * keys c = cand[b, g, i, :], and out_i = sum_j p[s, i, j] v_c[j]. */
typedef struct {
    const float *q, *k, *v;
    const int64_t *cand;
    float *prob; /* (B * G, N, K), contiguous */
    Py_ssize_t G, N, M, d, K;
    Py_ssize_t qs[3], ks[3], vs[3], cs[3];
    float scale;
    float *sc;          /* scratch: a row's K scores */
    const float **rows; /* scratch: its K key (or value) rows */
} Listed;

#define AT(base, st, b, g) ((base) + (b) * (st)[0] + (g) * (st)[1])

/* x . r for the K listed rows r = base + c[j] * row of M, into a->sc (the rows' pointers
 * into a->rows): 0 if a listed row lies outside [0, M). */
CLONES static int listed_dots(const Listed *a, const float *x, const float *base, Py_ssize_t row,
                              const int64_t *c) {
    Py_ssize_t j = 0, K = a->K;
    float *sc = a->sc;
    const float **rows = a->rows;
    for (Py_ssize_t t = 0; t < K; t++) {
        if (c[t] < 0 || c[t] >= a->M) return 0;
        rows[t] = base + c[t] * row;
    }
    for (; j + LANES <= K; j += LANES) dot8(x, rows + j, a->d, sc + j);
    for (; j < K; j++) sc[j] = dot(x, rows[j], a->d);
    return 1;
}

/* The forward pass into out (strides os). Returns 0 if a key lies outside [0, M). */
CLONES static int listed_forward(const Listed *a, float *out, const Py_ssize_t *os, Py_ssize_t s0,
                                 Py_ssize_t s1) {
    Py_ssize_t K = a->K, d = a->d;
    float *sc = a->sc;
    const float **rows = a->rows;
    for (Py_ssize_t s = s0; s < s1; s++) {
        Py_ssize_t b = s / a->G, g = s % a->G;
        const float *qb = AT(a->q, a->qs, b, g), *kb = AT(a->k, a->ks, b, g);
        const float *vb = AT(a->v, a->vs, b, g);
        const int64_t *cb = AT(a->cand, a->cs, b, g);
        float *ob = AT(out, os, b, g);
        for (Py_ssize_t i = 0; i < a->N; i++) {
            if (!listed_dots(a, qb + i * a->qs[2], kb, a->ks[2], cb + i * a->cs[2])) return 0;
            float top = -INFINITY;
            for (Py_ssize_t j = 0; j < K; j++) sc[j] *= a->scale, top = sc[j] > top ? sc[j] : top;
            float sum = exp_sum(sc, K, top), *p = a->prob + (s * a->N + i) * K;
            const int64_t *c = cb + i * a->cs[2];
            for (Py_ssize_t j = 0; j < K; j++) p[j] = sc[j] / sum, rows[j] = vb + c[j] * a->vs[2];
            weighted_rows(ob + i * os[2], p, rows, K, d);
        }
    }
    return 1;
}

/* The backward pass for the gradient dout of the output: dq (each row written), dk and dv
 * (added into: zeroed by the caller), any of them NULL to skip, strides like the inputs'.
 * With dp_j = dout_i . v_c[j] and ds_j = p_j (dp_j - sum_t p_t dp_t): dq_i = scale sum_j
 * ds_j k_c[j], dk_c[j] += scale ds_j q_i, dv_c[j] += p_j dout_i. (sum_t p_t dp_t is
 * dout_i . out_i, without the output.) */
CLONES static int listed_backward(const Listed *a, const float *dout, const Py_ssize_t *gs, float *dq,
                                  const Py_ssize_t *dqs, float *dk, const Py_ssize_t *dks,
                                  float *dv, const Py_ssize_t *dvs, Py_ssize_t s0,
                                  Py_ssize_t s1) {
    Py_ssize_t K = a->K, d = a->d;
    float *sc = a->sc;
    const float **rows = a->rows;
    for (Py_ssize_t s = s0; s < s1; s++) {
        Py_ssize_t b = s / a->G, g = s % a->G;
        const float *qb = AT(a->q, a->qs, b, g), *kb = AT(a->k, a->ks, b, g);
        const float *vb = AT(a->v, a->vs, b, g), *gb = AT(dout, gs, b, g);
        const int64_t *cb = AT(a->cand, a->cs, b, g);
        for (Py_ssize_t i = 0; i < a->N; i++) {
            const float *qi = qb + i * a->qs[2], *gi = gb + i * gs[2];
            const int64_t *c = cb + i * a->cs[2];
            const float *p = a->prob + (s * a->N + i) * K;
            if (!listed_dots(a, gi, vb, a->vs[2], c)) return 0; /* dout_i . v_c[j] */
            float delta = 0.0f;
            for (Py_ssize_t j = 0; j < K; j++) delta += p[j] * sc[j];
            for (Py_ssize_t j = 0; j < K; j++) sc[j] = p[j] * (sc[j] - delta) * a->scale;
            if (dq) {
                for (Py_ssize_t j = 0; j < K; j++) rows[j] = kb + c[j] * a->ks[2];
                weighted_rows(AT(dq, dqs, b, g) + i * dqs[2], sc, rows, K, d);
            }
            for (Py_ssize_t j = 0; j < K; j++) {
                if (dk) axpy(AT(dk, dks, b, g) + c[j] * dks[2], sc[j], qi, d);
                if (dv) axpy(AT(dv, dvs, b, g) + c[j] * dvs[2], p[j], gi, d);
            }
        }
    }
    return 1;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_GEMM_TOPK 1
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <string.h>

#define MR 6
#define NR 16
#define SLOTS 16

#define AVX2 __attribute__((target("avx2,fma")))

/* The 6 x 16 register tile: twelve accumulators, c<row><half>. TILE_STEP adds one depth
 * step: row r's number (at a0..a5) times the 16 numbers b0 (first eight) and b1. */
#define TILE_DECLARE(init)                                                                   \
    __m256 c00 = init(0), c01 = init(8), c10 = init(16), c11 = init(24), c20 = init(32),       \
           c21 = init(40), c30 = init(48), c31 = init(56), c40 = init(64), c41 = init(72),     \
           c50 = init(80), c51 = init(88)
#define TILE_STEP(b0, b1, a0, a1, a2, a3, a4, a5)                                             \
    do {                                                                                     \
        __m256 x_;                                                                           \
        x_ = _mm256_broadcast_ss(a0), c00 = _mm256_fmadd_ps(x_, b0, c00);                    \
        c01 = _mm256_fmadd_ps(x_, b1, c01);                                                  \
        x_ = _mm256_broadcast_ss(a1), c10 = _mm256_fmadd_ps(x_, b0, c10);                    \
        c11 = _mm256_fmadd_ps(x_, b1, c11);                                                  \
        x_ = _mm256_broadcast_ss(a2), c20 = _mm256_fmadd_ps(x_, b0, c20);                    \
        c21 = _mm256_fmadd_ps(x_, b1, c21);                                                  \
        x_ = _mm256_broadcast_ss(a3), c30 = _mm256_fmadd_ps(x_, b0, c30);                    \
        c31 = _mm256_fmadd_ps(x_, b1, c31);                                                  \
        x_ = _mm256_broadcast_ss(a4), c40 = _mm256_fmadd_ps(x_, b0, c40);                    \
        c41 = _mm256_fmadd_ps(x_, b1, c41);                                                  \
        x_ = _mm256_broadcast_ss(a5), c50 = _mm256_fmadd_ps(x_, b0, c50);                    \
        c51 = _mm256_fmadd_ps(x_, b1, c51);                                                  \
    } while (0)
#define TILE_STORE(t)                                                                        \
    do {                                                                                     \
        _mm256_store_ps((t) + 0, c00), _mm256_store_ps((t) + 8, c01);                        \
        _mm256_store_ps((t) + 16, c10), _mm256_store_ps((t) + 24, c11);                      \
        _mm256_store_ps((t) + 32, c20), _mm256_store_ps((t) + 40, c21);                      \
        _mm256_store_ps((t) + 48, c30), _mm256_store_ps((t) + 56, c31);                      \
        _mm256_store_ps((t) + 64, c40), _mm256_store_ps((t) + 72, c41);                      \
        _mm256_store_ps((t) + 80, c50), _mm256_store_ps((t) + 88, c51);                      \
    } while (0)
#define TILE_ZERO(offset) _mm256_setzero_ps()

typedef struct {
    float *score;  /* (rows, SLOTS): each row's best scores, descending, -inf where empty */
    int32_t *at;   /* (rows, SLOTS): their positions */
    float *thr;    /* (rows + NR): score[row][K - 1], what a new score must beat */
    float *gate;   /* (rows + NR): the least raw score that may beat it (see gate_of) */
    int K, bf16;
} Best;

/* The least raw score that may beat threshold t: the next float up, or, for scores ranked
 * as their bfloat16 rounding, the midpoint between t (a bfloat16 value) and the next
 * bfloat16 up, where rounding up starts (at the midpoint itself it may round down: the exact
 * test follows). The vector test is then score >= gate. */
static inline float gate_of(float t, int bf16) {
    if (t == -INFINITY) return -FLT_MAX;
    if (t == INFINITY) return t;
    uint32_t bits, step = bf16 ? 0x8000u : 1u; /* half a bfloat16 step, or one float step */
    memcpy(&bits, &t, 4);
    bits = bits == 0x80000000u ? 0u : bits; /* -0.0 as +0.0 */
    bits = bits >> 31 ? bits - step : bits + step;
    memcpy(&t, &bits, 4);
    return t;
}

/* Whether the AVX-512 forms serve the tile kernels (rows_tile_wide, best_insert_wide): set at
 * import on a CPU with AVX-512F, and switchable (tile_rows) to compare the two forms, which
 * give the same numbers bit for bit. */
static int wide_tiles = 0;

#define AVX512 __attribute__((target("avx512f,avx2,fma")))

/* best_insert on AVX-512, where a row's 16 slots are one register. */
AVX512 __attribute__((noinline)) static void best_insert_wide(Best *b, Py_ssize_t r, float s,
                                                             int32_t j) {
    float *sv = b->score + r * SLOTS;
    int32_t *iv = b->at + r * SLOTS;
    __m512 v = _mm512_load_ps(sv), S = _mm512_set1_ps(s);
    __m512i at = _mm512_load_si512((const void *)iv);
    /* the slots are sorted, so those >= s are the first pos ones */
    __mmask16 ge = _mm512_cmp_ps_mask(v, S, _CMP_GE_OQ), after = (__mmask16)~ge;
    __mmask16 here = (__mmask16)(ge + 1u); /* slot pos */
    const __m512i rot = _mm512_setr_epi32(15, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14);
    v = _mm512_mask_permutexvar_ps(v, after, rot, v); /* slots from pos on move one along */
    at = _mm512_mask_permutexvar_epi32(at, after, rot, at);
    v = _mm512_mask_mov_ps(v, here, S);
    at = _mm512_mask_mov_epi32(at, here, _mm512_set1_epi32(j));
    _mm512_store_ps(sv, v);
    _mm512_store_si512((void *)iv, at);
    float t = _mm512_cvtss_f32(_mm512_permutexvar_ps(_mm512_set1_epi32(b->K - 1), v));
    b->thr[r] = t;
    b->gate[r] = gate_of(t, b->bf16);
}

/* Put score s at position j into row r's sorted slots (s beats the row's threshold): after
 * every score >= s, so an earlier equal score stays first. Branch-free. */
AVX2 static inline void best_insert(Best *b, Py_ssize_t r, float s, int32_t j) {
    if (wide_tiles) return best_insert_wide(b, r, s, j);
    float *sv = b->score + r * SLOTS;
    int32_t *iv = b->at + r * SLOTS;
    __m256 v0 = _mm256_load_ps(sv), v1 = _mm256_load_ps(sv + 8), S = _mm256_set1_ps(s);
    unsigned ge = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v0, S, _CMP_GE_OQ)) |
                  (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v1, S, _CMP_GE_OQ)) << 8;
    __m256i pos = _mm256_set1_epi32(__builtin_popcount(ge));
    const __m256i rot = _mm256_setr_epi32(7, 0, 1, 2, 3, 4, 5, 6);
    const __m256i l0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i l1 = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
    __m256i after0 = _mm256_cmpgt_epi32(l0, pos), at0 = _mm256_cmpeq_epi32(l0, pos);
    __m256i after1 = _mm256_cmpgt_epi32(l1, pos), at1 = _mm256_cmpeq_epi32(l1, pos);
    __m256i i0 = _mm256_load_si256((const __m256i *)iv);
    __m256i i1 = _mm256_load_si256((const __m256i *)(iv + 8));
    /* every slot moved one along: slot t takes slot t - 1 (slot 8 takes slot 7) */
    __m256 sh0 = _mm256_permutevar8x32_ps(v0, rot);
    __m256 sh1 = _mm256_blend_ps(_mm256_permutevar8x32_ps(v1, rot), sh0, 1);
    __m256i ih0 = _mm256_permutevar8x32_epi32(i0, rot);
    __m256i ih1 = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(i1, rot), ih0, 1);
    v0 = _mm256_blendv_ps(_mm256_blendv_ps(v0, sh0, _mm256_castsi256_ps(after0)), S,
                          _mm256_castsi256_ps(at0));
    v1 = _mm256_blendv_ps(_mm256_blendv_ps(v1, sh1, _mm256_castsi256_ps(after1)), S,
                          _mm256_castsi256_ps(at1));
    __m256i J = _mm256_set1_epi32(j);
    i0 = _mm256_blendv_epi8(_mm256_blendv_epi8(i0, ih0, after0), J, at0);
    i1 = _mm256_blendv_epi8(_mm256_blendv_epi8(i1, ih1, after1), J, at1);
    _mm256_store_ps(sv, v0), _mm256_store_ps(sv + 8, v1);
    _mm256_store_si256((__m256i *)iv, i0), _mm256_store_si256((__m256i *)(iv + 8), i1);
    b->thr[r] = sv[b->K - 1];
    b->gate[r] = gate_of(b->thr[r], b->bf16);
}

/* tile[MR][NR] = sum over k < K and c < C of rows[r * K + k][c] * w[k * C + c][NR], summed in
 * ascending k and c: a block of MR rows (queries, or their neighbours' rows) against a packed
 * panel of NR columns. */
AVX2 __attribute__((noinline)) static void rows_tile(const float *const *rows, int K, Py_ssize_t C,
                                                      const float *w, float *tile) {
    TILE_DECLARE(TILE_ZERO);
    for (int k = 0; k < K; k++) {
        const float *a0 = rows[k], *a1 = rows[K + k], *a2 = rows[2 * K + k];
        const float *a3 = rows[3 * K + k], *a4 = rows[4 * K + k], *a5 = rows[5 * K + k];
        for (Py_ssize_t c = 0; c < C; c++, w += NR) {
            __m256 b0 = _mm256_load_ps(w), b1 = _mm256_load_ps(w + 8);
            TILE_STEP(b0, b1, a0 + c, a1 + c, a2 + c, a3 + c, a4 + c, a5 + c);
        }
    }
    TILE_STORE(tile);
}

#define WIDE_STEP(r) z##r = _mm512_fmadd_ps(_mm512_set1_ps(a##r[d]), b, z##r)
/* The wide tiles' twelve rows at neighbour k (a0..a11), having fetched those at k + 1, which
 * lie anywhere in the values. */
#define WIDE_ROWS(rows, K, k, C)                                                               \
    if ((k) + 1 < (K))                                                                       \
        for (int r_ = 0; r_ < 2 * MR; r_++)                                                  \
            for (Py_ssize_t c_ = 0; c_ < (C); c_ += 16)                                      \
                _mm_prefetch((const char *)((rows)[r_ * (K) + (k) + 1] + c_), _MM_HINT_T0);  \
    const float *a0 = (rows)[k], *a1 = (rows)[(K) + (k)], *a2 = (rows)[2 * (K) + (k)];     \
    const float *a3 = (rows)[3 * (K) + (k)], *a4 = (rows)[4 * (K) + (k)];                  \
    const float *a5 = (rows)[5 * (K) + (k)], *a6 = (rows)[6 * (K) + (k)];                  \
    const float *a7 = (rows)[7 * (K) + (k)], *a8 = (rows)[8 * (K) + (k)];                  \
    const float *a9 = (rows)[9 * (K) + (k)], *a10 = (rows)[10 * (K) + (k)];                \
    const float *a11 = (rows)[11 * (K) + (k)]
#define WIDE_STORE(r) _mm512_store_ps(tile + (r) * NR, z##r)

/* rows_tile for two blocks at once (2 * MR rows, tile[2 * MR][NR]) on AVX-512: a row of 16
 * scores is one register, and twelve rows keep both fused multiply-add units busy. Each
 * number is the same sum in the same order as rows_tile's, so the two agree bit for bit.
 * With gates (one per row) and col_gates (one per column, or NULL), a tile none of whose
 * scores reaches its row's or column's gate is not stored, and 0 is returned: the top-K
 * then skips it without reading it (most tiles, once the rows have their K). Else 1. */
AVX512 __attribute__((noinline)) static int rows_tile_wide(const float *const *rows, int K,
                                                          Py_ssize_t C, const float *w,
                                                          float *tile, const float *gates,
                                                          const float *col_gates) {
    __m512 z0 = _mm512_setzero_ps(), z1 = z0, z2 = z0, z3 = z0, z4 = z0, z5 = z0, z6 = z0;
    __m512 z7 = z0, z8 = z0, z9 = z0, z10 = z0, z11 = z0;
    for (int k = 0; k < K; k++) {
        WIDE_ROWS(rows, K, k, C);
        for (Py_ssize_t d = 0; d < C; d++, w += NR) {
            __m512 b = _mm512_load_ps(w);
            WIDE_STEP(0), WIDE_STEP(1), WIDE_STEP(2), WIDE_STEP(3), WIDE_STEP(4), WIDE_STEP(5);
            WIDE_STEP(6), WIDE_STEP(7), WIDE_STEP(8), WIDE_STEP(9), WIDE_STEP(10), WIDE_STEP(11);
        }
    }
    if (gates) {
        __m512 cg = col_gates ? _mm512_loadu_ps(col_gates) : _mm512_set1_ps(INFINITY);
        __mmask16 m = 0;
#define WIDE_GATE(r)                                                                           \
    m |= _mm512_cmp_ps_mask(z##r, _mm512_set1_ps(gates[r]), _CMP_GE_OQ) |                    \
         _mm512_cmp_ps_mask(z##r, cg, _CMP_GE_OQ)
        WIDE_GATE(0), WIDE_GATE(1), WIDE_GATE(2), WIDE_GATE(3), WIDE_GATE(4), WIDE_GATE(5);
        WIDE_GATE(6), WIDE_GATE(7), WIDE_GATE(8), WIDE_GATE(9), WIDE_GATE(10), WIDE_GATE(11);
#undef WIDE_GATE
        if (!m) return 0;
    }
    WIDE_STORE(0), WIDE_STORE(1), WIDE_STORE(2), WIDE_STORE(3), WIDE_STORE(4), WIDE_STORE(5);
    WIDE_STORE(6), WIDE_STORE(7), WIDE_STORE(8), WIDE_STORE(9), WIDE_STORE(10), WIDE_STORE(11);
    return 1;
}

/* rows_tile_wide against two panels at once (w and w + next), into tile and tile + 2 * MR *
 * NR: every row's numbers serve 32 columns where they would serve 16, so the neighbours'
 * rows (gathered from anywhere) are read half as often. The same sums as rows_tile_wide's. */
#define WIDE2_STEP(r)                                                                          \
    do {                                                                                     \
        __m512 x_ = _mm512_set1_ps(a##r[d]);                                                 \
        z##r = _mm512_fmadd_ps(x_, b, z##r), y##r = _mm512_fmadd_ps(x_, b2, y##r);           \
    } while (0)
AVX512 __attribute__((noinline)) static void rows_tile_wide2(const float *const *rows, int K,
                                                            Py_ssize_t C, const float *w,
                                                            Py_ssize_t next, float *tile) {
    __m512 z0 = _mm512_setzero_ps(), z1 = z0, z2 = z0, z3 = z0, z4 = z0, z5 = z0, z6 = z0;
    __m512 z7 = z0, z8 = z0, z9 = z0, z10 = z0, z11 = z0, y0 = z0, y1 = z0, y2 = z0, y3 = z0;
    __m512 y4 = z0, y5 = z0, y6 = z0, y7 = z0, y8 = z0, y9 = z0, y10 = z0, y11 = z0;
    for (int k = 0; k < K; k++) {
        WIDE_ROWS(rows, K, k, C);
        for (Py_ssize_t d = 0; d < C; d++, w += NR) {
            __m512 b = _mm512_load_ps(w), b2 = _mm512_load_ps(w + next);
            WIDE2_STEP(0); WIDE2_STEP(1); WIDE2_STEP(2); WIDE2_STEP(3);
            WIDE2_STEP(4); WIDE2_STEP(5); WIDE2_STEP(6); WIDE2_STEP(7);
            WIDE2_STEP(8); WIDE2_STEP(9); WIDE2_STEP(10); WIDE2_STEP(11);
        }
    }
    WIDE_STORE(0), WIDE_STORE(1), WIDE_STORE(2), WIDE_STORE(3), WIDE_STORE(4), WIDE_STORE(5);
    WIDE_STORE(6), WIDE_STORE(7), WIDE_STORE(8), WIDE_STORE(9), WIDE_STORE(10), WIDE_STORE(11);
    tile += 2 * MR * NR;
#define WIDE2_STORE(r) _mm512_store_ps(tile + (r) * NR, y##r)
    WIDE2_STORE(0), WIDE2_STORE(1), WIDE2_STORE(2), WIDE2_STORE(3), WIDE2_STORE(4);
    WIDE2_STORE(5), WIDE2_STORE(6), WIDE2_STORE(7), WIDE2_STORE(8), WIDE2_STORE(9);
    WIDE2_STORE(10), WIDE2_STORE(11);
#undef WIDE2_STORE
}

/* rows_tile for one block (two = 0: rows[0 .. MR * K)) or two (rows[0 .. 2 * MR * K), into
 * tile[2 * MR][NR]): one wide tile where it runs, else one or two 6 x 16 tiles. gates and
 * col_gates as for rows_tile_wide (where it runs); returns 0 when no score reaches them. */
AVX2 static int rows_tiles(const float *const *rows, int K, Py_ssize_t C, const float *w,
                           float *tile, int two, const float *gates, const float *col_gates) {
    if (two && wide_tiles) return rows_tile_wide(rows, K, C, w, tile, gates, col_gates);
    rows_tile(rows, K, C, w, tile);
    if (two) rows_tile(rows + MR * K, K, C, w, tile + MR * NR);
    return 1;
}

/* rows_tiles (without gates) against the panel at w and, where the wide tiles run with two
 * blocks of rows and another panel follows (at w + next), that one too, into tile + 2 * MR *
 * NR (rows_tile_wide2): the number of panels done, 1 or 2. */
AVX2 static int panel_tiles(const float *const *rows, int K, Py_ssize_t C, const float *w,
                            Py_ssize_t next, float *tile, int two, int another) {
    if (wide_tiles && two && another) return rows_tile_wide2(rows, K, C, w, next, tile), 2;
    rows_tiles(rows, K, C, w, tile, two, NULL, NULL);
    return 1;
}

/* A score rounded to bfloat16, as a float. */
static inline float as_bf16(float s) {
    uint32_t bits;
    memcpy(&bits, &s, 4);
    bits = round_bf16(bits);
    memcpy(&s, &bits, 4);
    return s;
}

/* The scores of a tile row that reach their gates (g0 for the first eight, g1 the rest). */
AVX2 static inline unsigned beats(const float *row, __m256 g0, __m256 g1) {
    return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_load_ps(row), g0, _CMP_GE_OQ)) |
           (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_load_ps(row + 8), g1, _CMP_GE_OQ))
               << 8;
}

/* Offer a tile's scores: rows i0.. (``rows`` of them) against positions j0.. (``cols``).
 * symmetric: a score s(i, j) with i < j goes to row j first (position i), and row i takes
 * only positions j >= i (the tiles below the diagonal are never computed). ex: each row's
 * excluded position (or NULL), never taken (the caller leaves each row K others).
 * bf16: scores rank as their bfloat16 rounding. The vector test compares raw scores with
 * each row's gate (gate_of), a superset of those that beat the threshold; only those
 * scores are rounded and compared again. */
AVX2 static void offer_tile(Best *b, const float *tile, Py_ssize_t i0, int rows, Py_ssize_t j0,
                            int cols, int symmetric, const int64_t *ex, int bf16) {
    unsigned valid = cols == NR ? 0xFFFFu : (1u << cols) - 1;
    if (symmetric) {
        __m256 t0 = _mm256_loadu_ps(b->gate + j0), t1 = _mm256_loadu_ps(b->gate + j0 + 8);
        unsigned m = 0, cm[MR]; /* cm[r]: the columns row r's scores reach */
        for (int r = 0; r < rows; r++) m |= cm[r] = beats(tile + r * NR, t0, t1);
        for (m &= valid; m; m &= m - 1) {
            int c = __builtin_ctz(m);
            Py_ssize_t j = j0 + c;
            /* the rows whose score reaches column c's gate, among those before it (i0 + r < j):
             * a loop over them alone, whose branches the CPU predicts */
            unsigned rm = 0;
            for (int r = 0; r < rows; r++) rm |= (cm[r] >> c & 1u) << r;
            rm &= j - i0 >= MR ? ~0u : j > i0 ? (1u << (j - i0)) - 1 : 0u;
            for (; rm; rm &= rm - 1) {
                int r = __builtin_ctz(rm);
                float s = bf16 ? as_bf16(tile[r * NR + c]) : tile[r * NR + c];
                if (s > b->thr[j] && !(ex && ex[j] == i0 + r)) best_insert(b, j, s, (int32_t)(i0 + r));
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        Py_ssize_t i = i0 + r;
        __m256 t = _mm256_set1_ps(b->gate[i]);
        unsigned m = beats(tile + r * NR, t, t) & valid;
        if (symmetric && i > j0) m &= i - j0 >= NR ? 0u : ~((1u << (i - j0)) - 1);
        for (; m; m &= m - 1) {
            int c = __builtin_ctz(m);
            float s = bf16 ? as_bf16(tile[r * NR + c]) : tile[r * NR + c];
            if (s > b->thr[i] && !(ex && ex[i] == j0 + c)) best_insert(b, i, s, (int32_t)(j0 + c));
        }
    }
}

/* Offer a computed tile of ``tile_rows`` rows (i0.., up to the superblock's end s1) in blocks
 * of at most MR rows, in ascending order (the order each row's candidates need): the tile
 * kernels' blocks of 6 or 12 rows and the tile unit's of 16. Stops at the first block wholly
 * below the diagonal under ``symmetric`` (and the rest are too). */
AVX2 static void offer_rows(Best *b, const float *tile, Py_ssize_t i0, int tile_rows, Py_ssize_t s1,
                            Py_ssize_t j0, int cols, int symmetric, const int64_t *ex, int bf16) {
    for (Py_ssize_t ih = i0; ih < i0 + tile_rows && ih < s1; ih += MR) {
        if (symmetric && j0 + cols <= ih) break;
        int rows = s1 - ih < MR ? (int)(s1 - ih) : MR;
        rows = i0 + tile_rows - ih < rows ? (int)(i0 + tile_rows - ih) : rows;
        offer_tile(b, tile + (ih - i0) * NR, ih, rows, j0, cols, symmetric, ex, bf16);
    }
}

static void *aligned_block(size_t bytes, void **base) {
    *base = malloc(bytes + 63);
    return *base ? (void *)(((uintptr_t)*base + 63) & ~(uintptr_t)63) : NULL;
}

/* n rows' running top-K (bases[0 .. 4) get the blocks to free); 0 when out of memory. */
static int best_open(Best *b, Py_ssize_t n, int K, int bf16, void **bases) {
    b->K = K, b->bf16 = bf16;
    b->score = aligned_block((size_t)n * SLOTS * sizeof(float), &bases[0]);
    b->at = aligned_block((size_t)n * SLOTS * sizeof(int32_t), &bases[1]);
    b->thr = aligned_block(((size_t)n + NR) * sizeof(float), &bases[2]);
    b->gate = aligned_block(((size_t)n + NR) * sizeof(float), &bases[3]);
    return b->score && b->at && b->thr && b->gate;
}

/* Every row empty: no score kept, and any score beats the threshold. */
static void best_reset(Best *b, Py_ssize_t n) {
    for (Py_ssize_t t = 0; t < n * SLOTS; t++) b->score[t] = -INFINITY, b->at[t] = 0;
    for (Py_ssize_t t = 0; t < n + NR; t++) b->thr[t] = -INFINITY, b->gate[t] = -FLT_MAX;
}

/* The rows' K best positions into out (n, K), in canonical order. */
static void best_write(const Best *b, Py_ssize_t n, int64_t *out) {
    for (Py_ssize_t i = 0; i < n; i++)
        for (int t = 0; t < b->K; t++) out[i * b->K + t] = b->at[i * SLOTS + t];
}

/* Image by image, the K best keys of n queries (rows q_row apart, images q_batch apart)
 * among M keys (k_row, k_batch; a batch stride of 0 shares), depth D, into int64 out
 * (B, n, K). symmetric: the keys are the queries (n == M). ex: NULL or each query's
 * excluded key. bf16: rank the scores' bfloat16 rounding. Returns 0 when out of memory. */
AVX2 static int gemm_topk_images(const float *q, Py_ssize_t q_batch, Py_ssize_t q_row,
                                 const float *k, Py_ssize_t k_batch, Py_ssize_t k_row,
                                 Py_ssize_t B, Py_ssize_t n, Py_ssize_t M, Py_ssize_t D, int K,
                                 int symmetric, const int64_t *ex, int bf16, int64_t *out) {
    /* rows per superblock: its queries stay in the L2 cache (48 KiB at D = 64) */
    Py_ssize_t sb = (49152 / 4 / D) / MR * MR;
    sb = sb < MR ? MR : sb > 192 ? 192 : sb;
    Py_ssize_t panels = (M + NR - 1) / NR;
    void *bases[5];
    Best b;
    int ok = best_open(&b, n, K, bf16, bases + 1);
    float *P = aligned_block((size_t)panels * D * NR * sizeof(float), &bases[0]);
    ok = ok && P;
    for (Py_ssize_t img = 0; ok && img < B; img++, q += q_batch, k += k_batch, out += n * K) {
        /* keys packed in panels of NR, depth-major: P[panel][d][NR], zero past M (shared
         * keys are packed once) */
        if (img == 0 || k_batch != 0)
            for (Py_ssize_t p = 0; p < panels; p++)
                for (Py_ssize_t d = 0; d < D; d++)
                    for (int c = 0; c < NR; c++) {
                        Py_ssize_t m = p * NR + c;
                        P[(p * D + d) * NR + c] = m < M ? k[m * k_row + d] : 0.0f;
                    }
        best_reset(&b, n);
        float tile[2 * MR * NR] __attribute__((aligned(64)));
        for (Py_ssize_t s0 = 0; s0 < n; s0 += sb) {
            Py_ssize_t s1 = s0 + sb < n ? s0 + sb : n, blocks = (s1 - s0 + MR - 1) / MR;
            /* Row i's candidates come in ascending position: in earlier superblocks (as a
             * column, ascending), then at its own panel from this superblock's earlier rows
             * and its own tile's (as a column, first), then as a row, panel by panel. */
            for (Py_ssize_t p = symmetric ? s0 / NR : 0; p < panels; p++) {
                Py_ssize_t j0 = p * NR;
                int cols = M - j0 < NR ? (int)(M - j0) : NR;
                for (Py_ssize_t bk = 0; bk < blocks; bk += 2) { /* two blocks at a time */
                    Py_ssize_t i0 = s0 + bk * MR;
                    if (symmetric && j0 + cols <= i0) continue; /* below the diagonal */
                    const float *a[2 * MR]; /* rows past the superblock repeat its first */
                    for (int r = 0; r < 2 * MR; r++) a[r] = q + (i0 + r < s1 ? i0 + r : i0) * q_row;
                    if (!rows_tiles(a, 1, D, P + p * D * NR, tile, bk + 1 < blocks, b.gate + i0,
                                    symmetric ? b.gate + j0 : NULL))
                        continue; /* no score reaches a gate */
                    offer_rows(&b, tile, i0, 2 * MR, s1, j0, cols, symmetric, ex, bf16);
                }
            }
        }
        best_write(&b, n, out);
    }
    for (int t = 0; t < 5; t++) free(bases[t]);
    return ok;
}

#if defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && \
    !defined(CONVNN_NO_AMX)
/* bfloat16 scores in the tile unit (AMX-BF16): Linux lends a process the tile registers on
 * request, asked once at import (amx_open). The build leaves it out (CONVNN_NO_AMX, set by
 * setup.py when the first build fails) where the assembler lacks the tile instructions. */
#define HAVE_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX __attribute__((target("amx-tile,amx-bf16,avx2,fma")))
#define AMX_DEPTH 32 /* bfloat16 numbers of a row that one tile product takes */
static int amx_ready = 0;

static int amx_open(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 22 & 1) || !(d >> 24 & 1)) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* tile[16][NR] = rows q[0 .. 16) (Dp bfloat16 numbers each, q_bytes apart) times the
 * panel's NR keys (packed in pairs of depths, P[Dp / 2][NR][2]), in chunks of 32 depths. */
AMX static void amx_tile(const uint16_t *q, Py_ssize_t q_bytes, const uint16_t *panel, Py_ssize_t Dp,
                         float *tile) {
    __asm__ volatile("" ::: "memory"); /* the packed rows are written before the tiles load */
    _tile_zero(0);
    for (Py_ssize_t c = 0; c < Dp; c += AMX_DEPTH) {
        _tile_loadd(1, q + c, q_bytes);
        _tile_loadd(2, panel + c * NR, NR * 4);
        _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, tile, NR * 4);
}

/* gemm_topk_images for bfloat16 queries and keys (rows q_row and k_row numbers apart),
 * scored 16 x 16 at a time by the tile unit, each score the products' sum in float32 as
 * that unit rounds it (not bit for bit the float32 kernels' sum; denormal numbers are
 * flushed to zero), offered as those offer theirs. Returns 0 when out of memory. */
AMX static int gemm_topk_images_amx(const uint16_t *q, Py_ssize_t q_batch, Py_ssize_t q_row,
                                    const uint16_t *k, Py_ssize_t k_batch, Py_ssize_t k_row,
                                    Py_ssize_t B, Py_ssize_t n, Py_ssize_t M, Py_ssize_t D, int K,
                                    int symmetric, const int64_t *ex, int bf16, int64_t *out) {
    const int TR = 16;                                        /* a tile's rows */
    Py_ssize_t Dp = (D + AMX_DEPTH - 1) / AMX_DEPTH * AMX_DEPTH; /* zeros past D */
    Py_ssize_t panels = (M + NR - 1) / NR, rows_pad = (n + TR - 1) / TR * TR;
    Py_ssize_t sb = (49152 / 2 / Dp) / TR * TR; /* rows per superblock, as gemm_topk_images */
    sb = sb < TR ? TR : sb > 192 ? 192 : sb;
    void *bases[6];
    Best b;
    int ok = best_open(&b, n, K, bf16, bases + 2);
    uint16_t *P = aligned_block((size_t)panels * Dp * NR * 2, &bases[0]);
    uint16_t *Q = aligned_block((size_t)rows_pad * Dp * 2, &bases[1]);
    ok = ok && P && Q;
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 3; t++) cfg.rows[t] = TR, cfg.colsb[t] = 64;
    if (ok) _tile_loadconfig(&cfg);
    float tile[16 * NR] __attribute__((aligned(64)));
    for (Py_ssize_t img = 0; ok && img < B; img++, q += q_batch, k += k_batch, out += n * K) {
        /* keys in panels of NR, pairs of depths together: P[panel][d / 2][NR][2] */
        if (img == 0 || k_batch != 0)
            for (Py_ssize_t p = 0; p < panels; p++)
                for (Py_ssize_t d = 0; d < Dp; d++)
                    for (int c = 0; c < NR; c++) {
                        Py_ssize_t m = p * NR + c;
                        P[(p * Dp + d / 2 * 2) * NR + c * 2 + d % 2] =
                            m < M && d < D ? k[m * k_row + d] : 0;
                    }
        /* the queries' rows, zeros past D and past n */
        for (Py_ssize_t i = 0; i < rows_pad; i++)
            for (Py_ssize_t d = 0; d < Dp; d++) Q[i * Dp + d] = i < n && d < D ? q[i * q_row + d] : 0;
        best_reset(&b, n);
        /* the order of gemm_topk_images: superblocks, then panels, then blocks of rows */
        for (Py_ssize_t s0 = 0; s0 < n; s0 += sb) {
            Py_ssize_t s1 = s0 + sb < n ? s0 + sb : n;
            for (Py_ssize_t p = symmetric ? s0 / NR : 0; p < panels; p++) {
                Py_ssize_t j0 = p * NR;
                int cols = M - j0 < NR ? (int)(M - j0) : NR;
                for (Py_ssize_t i0 = s0; i0 < s1; i0 += TR) {
                    if (symmetric && j0 + cols <= i0) continue; /* below the diagonal */
                    amx_tile(Q + i0 * Dp, Dp * 2, P + p * Dp * NR, Dp, tile);
                    offer_rows(&b, tile, i0, TR, s1, j0, cols, symmetric, ex, bf16);
                }
            }
        }
        best_write(&b, n, out);
    }
    if (ok) _tile_release();
    for (int t = 0; t < 6; t++) free(bases[t]);
    return ok;
}
#endif

/* ---- Aggregation: out = sum_k W_k v[idx[n, k]] (+ bias) with the neighbours read in place.
 *
 * The standard kernel's three products, forward, input gradient and weight gradient, run
 * with the gathered (n, K*C) matrix never formed: a tile's rows point into the values
 * (forward, weight gradient) or its output rows are added into them (input gradient). */

/* Forward: values (B, M, C), idx (B, N, K), weight (O, C, K), bias (O) or NULL, all
 * contiguous -> out (B, O, N) (the layout of a (B, O, H, W) map). The weight is packed in
 * panels of NR outputs, P[panel][k][c][NR]. Returns 0 when out of memory. */
AVX2 static int aggregate_images(const float *values, const int64_t *idx, const float *weight,
                                 const float *bias, float *out, Py_ssize_t B, Py_ssize_t M,
                                 Py_ssize_t N, Py_ssize_t C, int K, Py_ssize_t O) {
    Py_ssize_t panels = (O + NR - 1) / NR, depth = K * C;
    void *base;
    float *P = aligned_block((size_t)panels * depth * NR * sizeof(float), &base);
    const float **rows = malloc((size_t)2 * MR * K * sizeof(float *));
    if (!P || !rows) return free(base), free(rows), 0;
    for (Py_ssize_t p = 0; p < panels; p++)
        for (Py_ssize_t kc = 0; kc < depth; kc++)
            for (int j = 0; j < NR; j++) {
                Py_ssize_t o = p * NR + j;
                P[(p * depth + kc) * NR + j] = o < O ? weight[(o * C + kc % C) * K + kc / C] : 0.0f;
            }
    float tile[2 * 2 * MR * NR] __attribute__((aligned(64)));
    for (Py_ssize_t b = 0; b < B; b++)
        for (Py_ssize_t n0 = 0; n0 < N; n0 += 2 * MR) { /* two blocks of rows at a time */
            int nr = N - n0 < 2 * MR ? (int)(N - n0) : 2 * MR;
            for (int r = 0; r < 2 * MR; r++) /* rows past the end repeat the first */
                for (int k = 0; k < K; k++)
                    rows[r * K + k] = values + (b * M + idx[(b * N + n0 + (r < nr ? r : 0)) * K + k]) * C;
            for (Py_ssize_t p = 0; p < panels;) {
                int done = panel_tiles(rows, K, C, P + p * depth * NR, depth * NR, tile, nr > MR,
                                       p + 1 < panels);
                for (int h = 0; h < done; h++, p++) {
                    const float *t = tile + h * 2 * MR * NR;
                    int cols = O - p * NR < NR ? (int)(O - p * NR) : NR;
                    for (int j = 0; j < cols; j++) {
                        float *o = out + (b * O + p * NR + j) * N + n0, add = bias ? bias[p * NR + j] : 0.0f;
                        for (int r = 0; r < nr; r++) o[r] = t[r * NR + j] + add;
                    }
                }
            }
        }
    free(base), free(rows);
    return 1;
}

/* dst[s * ld + r] = src[r * ls + s] for r < R, s < S (a matrix transposed, rows of both
 * contiguous): blocks of 8 x 8 transposed in registers, two blocks down the rows at a time
 * (whole lines of dst), the last rows and columns one number at a time. */
AVX2 static void transpose(float *dst, Py_ssize_t ld, const float *src, Py_ssize_t ls,
                           Py_ssize_t R, Py_ssize_t S) {
    Py_ssize_t r8 = R / 8 * 8, s8 = S / 8 * 8;
    for (Py_ssize_t r1 = 0; r1 < r8; r1 += 16)
        for (Py_ssize_t s0 = 0; s0 < s8; s0 += 8)
            for (Py_ssize_t r0 = r1; r0 < r1 + 16 && r0 < r8; r0 += 8) {
                __m256 a[8], t[8];
                for (int i = 0; i < 8; i++) a[i] = _mm256_loadu_ps(src + (r0 + i) * ls + s0);
                for (int i = 0; i < 8; i += 2) {
                    t[i] = _mm256_unpacklo_ps(a[i], a[i + 1]);
                    t[i + 1] = _mm256_unpackhi_ps(a[i], a[i + 1]);
                }
                for (int i = 0; i < 8; i += 4) {
                    a[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
                    a[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
                    a[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
                    a[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
                }
                /* a[i], a[i + 4]: columns i (low lanes) and i + 4 (high) of rows 0-3 and 4-7 */
                for (int i = 0; i < 4; i++) {
                    _mm256_storeu_ps(dst + (s0 + i) * ld + r0,
                                     _mm256_permute2f128_ps(a[i], a[i + 4], 0x20));
                    _mm256_storeu_ps(dst + (s0 + i + 4) * ld + r0,
                                     _mm256_permute2f128_ps(a[i], a[i + 4], 0x31));
                }
            }
    for (Py_ssize_t r = 0; r < R; r++)
        for (Py_ssize_t c = r < r8 ? s8 : 0; c < S; c++) dst[c * ld + r] = src[r * ls + c];
}

/* Input gradient: g_values (B, M, C) = the sum of each neighbour's share, W_k^T gy[n], added
 * into its row (overwritten). gy[b, n, o] lies at gy + b * gb + n * gn + o * go, and
 * g_values[b, m, c] at g_values + b * vb + m * vm + c * vc. The weight is packed in panels of
 * NR channels of one k, P[k][cb][o][NR], so a tile's row is added into one neighbour's row.
 * With contiguous rows (vc 1) an image's rows are zeroed and added into in place; else (vm 1:
 * a gradient laid out as a (B, C, M) map) into one image's rows zeroed in a scratch block,
 * then stored transposed. Returns 0 when out of memory. */
AVX2 static int aggregate_grad_values(const float *gy, Py_ssize_t gb, Py_ssize_t gn, Py_ssize_t go,
                                      const int64_t *idx, const float *weight, float *g_values,
                                      Py_ssize_t vb, Py_ssize_t vm, Py_ssize_t vc, Py_ssize_t B,
                                      Py_ssize_t M, Py_ssize_t N, Py_ssize_t C, int K,
                                      Py_ssize_t O) {
    Py_ssize_t cbs = (C + NR - 1) / NR;
    int in_place = vc == 1;
    Py_ssize_t rs = in_place ? vm : C; /* the row stride added into */
    void *base, *scratch_base = NULL;
    float *P = aligned_block((size_t)K * cbs * O * NR * sizeof(float), &base);
    float *rows = malloc((size_t)2 * MR * O * sizeof(float)); /* two blocks' gradient rows */
    float *scratch = in_place ? NULL : aligned_block((size_t)M * C * sizeof(float), &scratch_base);
    if (!P || !rows || (!in_place && !scratch))
        return free(base), free(rows), free(scratch_base), 0;
    for (int k = 0; k < K; k++)
        for (Py_ssize_t cb = 0; cb < cbs; cb++)
            for (Py_ssize_t o = 0; o < O; o++)
                for (int j = 0; j < NR; j++) {
                    Py_ssize_t c = cb * NR + j;
                    P[((k * cbs + cb) * O + o) * NR + j] = c < C ? weight[(o * C + c) * K + k] : 0.0f;
                }
    float tile[2 * 2 * MR * NR] __attribute__((aligned(64)));
    const float *a[2 * MR];
    for (int r = 0; r < 2 * MR; r++) a[r] = rows + r * O;
    for (Py_ssize_t b = 0; b < B; b++) {
        float *g = in_place ? g_values + b * vb : scratch;
        if (rs == C) /* rows end to end: the scratch block, or a contiguous image */
            memset(g, 0, (size_t)M * C * sizeof(float));
        else
            for (Py_ssize_t m = 0; m < M; m++) memset(g + m * rs, 0, (size_t)C * sizeof(float));
        for (Py_ssize_t n0 = 0; n0 < N; n0 += 2 * MR) { /* two blocks of rows at a time */
            int nr = N - n0 < 2 * MR ? (int)(N - n0) : 2 * MR;
            for (int r = 0; r < 2 * MR; r++) /* rows past the end repeat the first */
                for (Py_ssize_t o = 0; o < O; o++)
                    rows[r * O + o] = gy[b * gb + (n0 + (r < nr ? r : 0)) * gn + o * go];
            const int64_t *ix = idx + (b * N + n0) * K;
            for (int k = 0; k < K; k++) {
                /* the next neighbours' rows (anywhere in g_values), to be added into */
                for (int r = 0; k + 1 < K && r < nr; r++)
                    for (Py_ssize_t c = 0; c < C; c += 16)
                        __builtin_prefetch(g + ix[r * K + k + 1] * rs + c, 1, 3);
                for (Py_ssize_t cb = 0; cb < cbs;) { /* blocks of NR channels: panels */
                    int done = panel_tiles(a, 1, O, P + (k * cbs + cb) * O * NR, O * NR, tile,
                                           nr > MR, cb + 1 < cbs);
                    for (int h = 0; h < done; h++, cb++) {
                        Py_ssize_t c0 = cb * NR, cols = C - c0 < NR ? C - c0 : NR;
                        for (int r = 0; r < nr; r++) {
                            float *dst = g + ix[r * K + k] * rs + c0;
                            const float *src = tile + h * 2 * MR * NR + r * NR;
                            if (cols == NR) {
                                _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), _mm256_load_ps(src)));
                                _mm256_storeu_ps(dst + 8, _mm256_add_ps(_mm256_loadu_ps(dst + 8), _mm256_load_ps(src + 8)));
                            } else
                                for (Py_ssize_t j = 0; j < cols; j++) dst[j] += src[j];
                        }
                    }
                }
            }
        }
        if (!in_place) transpose(g_values + b * vb, vc, scratch, C, M, C); /* vm 1 here */
    }
    free(base), free(rows), free(scratch_base);
    return 1;
}

/* Weight gradient: g_weight (O, C, K) = sum over n of gy[n, o] v[idx[n, k], c] (overwritten;
 * gy strided as for aggregate_grad_values). Tiles of channels of one k (MR, or 2 * MR on
 * AVX-512) by NR outputs run over blocks of NB rows: the block's gradient rows packed
 * (G[panel][n][NR]) and its neighbours' row pointers, and every tile carried from block to
 * block in acc[k][panel][channel][NR] (channels padded to a multiple of MR). Each number is
 * summed over n in ascending order, whatever the tile. Returns 0 when out of memory. */
#define NB 256

/* t (MR channels c0.. by NR outputs) += sum over n < nb of rows[n][c0 + r] g[n][NR]; channels
 * from c0 + cr on (a short last block) read channel c0 again. */
AVX2 static void weight_tile(float *t, const float *g, const float *const *rows, Py_ssize_t c0,
                             Py_ssize_t cr, Py_ssize_t nb) {
    Py_ssize_t o1 = cr > 1, o2 = cr > 2 ? 2 : 0, o3 = cr > 3 ? 3 : 0;
    Py_ssize_t o4 = cr > 4 ? 4 : 0, o5 = cr > 5 ? 5 : 0;
#define TILE_AT(offset) _mm256_load_ps(t + (offset))
    TILE_DECLARE(TILE_AT);
#undef TILE_AT
    for (Py_ssize_t n = 0; n < nb; n++, g += NR) {
        const float *a = rows[n] + c0;
        __m256 b0 = _mm256_load_ps(g), b1 = _mm256_load_ps(g + 8);
        TILE_STEP(b0, b1, a, a + o1, a + o2, a + o3, a + o4, a + o5);
    }
    TILE_STORE(t);
}

/* weight_tile for 2 * MR whole channels on AVX-512. */
#define WIDE_LOAD(r) __m512 z##r = _mm512_load_ps(t + (r) * NR)
#define WIDE_CHANNEL(r) z##r = _mm512_fmadd_ps(_mm512_set1_ps(a[r]), b, z##r)
AVX512 __attribute__((noinline)) static void weight_tile_wide(float *t, const float *g,
                                                             const float *const *rows,
                                                             Py_ssize_t c0, Py_ssize_t nb) {
    WIDE_LOAD(0); WIDE_LOAD(1); WIDE_LOAD(2); WIDE_LOAD(3); WIDE_LOAD(4); WIDE_LOAD(5);
    WIDE_LOAD(6); WIDE_LOAD(7); WIDE_LOAD(8); WIDE_LOAD(9); WIDE_LOAD(10); WIDE_LOAD(11);
    for (Py_ssize_t n = 0; n < nb; n++, g += NR) {
        const float *a = rows[n] + c0;
        /* the neighbours' rows lie anywhere in the values: fetch one a few rows ahead */
        if (n + 16 < nb) _mm_prefetch((const char *)(rows[n + 16] + c0), _MM_HINT_T0);
        __m512 b = _mm512_load_ps(g);
        WIDE_CHANNEL(0), WIDE_CHANNEL(1), WIDE_CHANNEL(2), WIDE_CHANNEL(3);
        WIDE_CHANNEL(4), WIDE_CHANNEL(5), WIDE_CHANNEL(6), WIDE_CHANNEL(7);
        WIDE_CHANNEL(8), WIDE_CHANNEL(9), WIDE_CHANNEL(10), WIDE_CHANNEL(11);
    }
    float *tile = t;
    WIDE_STORE(0), WIDE_STORE(1), WIDE_STORE(2), WIDE_STORE(3), WIDE_STORE(4), WIDE_STORE(5);
    WIDE_STORE(6), WIDE_STORE(7), WIDE_STORE(8), WIDE_STORE(9), WIDE_STORE(10), WIDE_STORE(11);
}

/* weight_tile_wide for two panels of outputs at once (t, g and t2, g2): each neighbour's
 * numbers serve 32 outputs where they would serve 16. */
#define WIDE2_LOAD(r) __m512 y##r = _mm512_load_ps(t2 + (r) * NR)
#define WIDE2_CHANNEL(r)                                                                       \
    do {                                                                                     \
        __m512 x_ = _mm512_set1_ps(a[r]);                                                    \
        z##r = _mm512_fmadd_ps(x_, b, z##r), y##r = _mm512_fmadd_ps(x_, b2, y##r);           \
    } while (0)
AVX512 __attribute__((noinline)) static void weight_tile_wide2(float *t, float *t2,
                                                              const float *g, const float *g2,
                                                              const float *const *rows,
                                                              Py_ssize_t c0, Py_ssize_t nb) {
    WIDE_LOAD(0); WIDE_LOAD(1); WIDE_LOAD(2); WIDE_LOAD(3); WIDE_LOAD(4); WIDE_LOAD(5);
    WIDE_LOAD(6); WIDE_LOAD(7); WIDE_LOAD(8); WIDE_LOAD(9); WIDE_LOAD(10); WIDE_LOAD(11);
    WIDE2_LOAD(0); WIDE2_LOAD(1); WIDE2_LOAD(2); WIDE2_LOAD(3); WIDE2_LOAD(4); WIDE2_LOAD(5);
    WIDE2_LOAD(6); WIDE2_LOAD(7); WIDE2_LOAD(8); WIDE2_LOAD(9); WIDE2_LOAD(10); WIDE2_LOAD(11);
    for (Py_ssize_t n = 0; n < nb; n++, g += NR, g2 += NR) {
        const float *a = rows[n] + c0;
        if (n + 16 < nb) _mm_prefetch((const char *)(rows[n + 16] + c0), _MM_HINT_T0);
        __m512 b = _mm512_load_ps(g), b2 = _mm512_load_ps(g2);
        WIDE2_CHANNEL(0); WIDE2_CHANNEL(1); WIDE2_CHANNEL(2); WIDE2_CHANNEL(3);
        WIDE2_CHANNEL(4); WIDE2_CHANNEL(5); WIDE2_CHANNEL(6); WIDE2_CHANNEL(7);
        WIDE2_CHANNEL(8); WIDE2_CHANNEL(9); WIDE2_CHANNEL(10); WIDE2_CHANNEL(11);
    }
    float *tile = t;
    WIDE_STORE(0), WIDE_STORE(1), WIDE_STORE(2), WIDE_STORE(3), WIDE_STORE(4), WIDE_STORE(5);
    WIDE_STORE(6), WIDE_STORE(7), WIDE_STORE(8), WIDE_STORE(9), WIDE_STORE(10), WIDE_STORE(11);
#define WIDE2_STORE(r) _mm512_store_ps(t2 + (r) * NR, y##r)
    WIDE2_STORE(0), WIDE2_STORE(1), WIDE2_STORE(2), WIDE2_STORE(3), WIDE2_STORE(4);
    WIDE2_STORE(5), WIDE2_STORE(6), WIDE2_STORE(7), WIDE2_STORE(8), WIDE2_STORE(9);
    WIDE2_STORE(10), WIDE2_STORE(11);
#undef WIDE2_STORE
}

AVX2 static int aggregate_grad_weight(const float *gy, Py_ssize_t gb, Py_ssize_t gn, Py_ssize_t go,
                                      const int64_t *idx, const float *values, float *g_weight,
                                      Py_ssize_t B, Py_ssize_t M, Py_ssize_t N, Py_ssize_t C, int K,
                                      Py_ssize_t O) {
    Py_ssize_t panels = (O + NR - 1) / NR, cpad = (C + MR - 1) / MR * MR, total = B * N;
    size_t floats = (size_t)K * panels * cpad * NR;
    void *bases[2];
    float *acc = aligned_block(floats * sizeof(float), &bases[0]);
    float *G = aligned_block((size_t)panels * NB * NR * sizeof(float), &bases[1]);
    const float **rp = malloc((size_t)NB * K * sizeof(float *));
    if (!acc || !G || !rp) return free(bases[0]), free(bases[1]), free(rp), 0;
    memset(acc, 0, floats * sizeof(float));
    for (Py_ssize_t n0 = 0; n0 < total; n0 += NB) {
        Py_ssize_t nb = total - n0 < NB ? total - n0 : NB;
        for (Py_ssize_t n = 0; n < nb; n++) {
            const float *row = gy + (n0 + n) / N * gb + (n0 + n) % N * gn;
            for (Py_ssize_t p = 0; p < panels; p++)
                for (int j = 0; j < NR; j++) {
                    Py_ssize_t o = p * NR + j;
                    G[(p * NB + n) * NR + j] = o < O ? row[o * go] : 0.0f;
                }
        }
        for (Py_ssize_t n = 0; n < nb; n++)
            for (int k = 0; k < K; k++)
                rp[k * NB + n] = values + ((n0 + n) / N * M + idx[(n0 + n) * K + k]) * C;
        for (int k = 0; k < K; k++)
            for (Py_ssize_t p = 0; p < panels;) {
                /* where the wide tiles run: two panels at a time, in whole blocks of 2 * MR
                 * channels; the rest in blocks of MR */
                int two = wide_tiles && p + 1 < panels;
                float *t = acc + ((size_t)k * panels + p) * cpad * NR, *t2 = t + cpad * NR;
                const float *g = G + p * NB * NR, *g2 = g + NB * NR, *const *rows = rp + k * NB;
                Py_ssize_t c0 = 0;
                for (; wide_tiles && c0 + 2 * MR <= C; c0 += 2 * MR)
                    if (two)
                        weight_tile_wide2(t + c0 * NR, t2 + c0 * NR, g, g2, rows, c0, nb);
                    else
                        weight_tile_wide(t + c0 * NR, g, rows, c0, nb);
                for (int h = 0; h <= two; h++, p++)
                    for (Py_ssize_t c = c0; c < C; c += MR)
                        weight_tile(t + h * cpad * NR + c * NR, g + h * NB * NR, rows, c,
                                    C - c < MR ? C - c : MR, nb);
            }
    }
    for (int k = 0; k < K; k++)
        for (Py_ssize_t p = 0; p < panels; p++)
            for (Py_ssize_t c = 0; c < C; c++)
                for (Py_ssize_t j = 0; j < NR && p * NR + j < O; j++)
                    g_weight[((p * NR + j) * C + c) * K + k] =
                        acc[(((size_t)k * panels + p) * cpad + c) * NR + j];
    free(bases[0]), free(bases[1]), free(rp);
    return 1;
}

static int gemm_topk_cpu(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

/* The integer arguments of a METH_FASTCALL (vectorcall) function: torch's compiled-graph
 * machinery calls builtins that way. Data pointers fit a Py_ssize_t on every platform
 * CPython supports. Returns 0 with an exception set if they are not ``want`` integers. */
static int integers(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *name,
                    Py_ssize_t *out) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd integer arguments", name, want);
        return 0;
    }
    for (Py_ssize_t i = 0; i < want; i++) out[i] = PyLong_AsSsize_t(args[i]);
    return !PyErr_Occurred();
}

/* Whether the n sizes s are all >= 0; else 0 with a ValueError saying ``message``. */
static int sizes(const Py_ssize_t *s, int n, const char *message) {
    for (int t = 0; t < n; t++)
        if (s[t] < 0) {
            PyErr_SetString(PyExc_ValueError, message);
            return 0;
        }
    return 1;
}

PyDoc_STRVAR(max_norm_doc,
             "max_norm(x, x_batch, x_row, B, N, D)\n\n"
             "The largest Euclidean norm of the rows of float32 x (B, N, D), rows contiguous\n"
             "(strides in elements), summed in double: nan where an entry is nan, inf where one\n"
             "is infinite; 0 with no rows.");

static PyObject *max_norm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Py_ssize_t v[6];
    if (!integers(args, nargs, 6, "max_norm", v) || !sizes(v + 3, 3, "max_norm: need B, N, D >= 0"))
        return NULL;
    double best = 0.0;
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t b = 0; b < v[3]; b++)
        for (Py_ssize_t n = 0; n < v[4]; n++) {
            const float *row = (const float *)v[0] + b * v[1] + n * v[2];
            double acc[8] = {0}, sum = 0.0; /* eight sums: a pipeline, not one chain */
            Py_ssize_t d = 0;
            for (; d + 8 <= v[5]; d += 8)
                for (int j = 0; j < 8; j++) acc[j] += (double)row[d + j] * row[d + j];
            for (; d < v[5]; d++) sum += (double)row[d] * row[d];
            for (int j = 0; j < 8; j++) sum += acc[j];
            if (sum != sum) { /* nan: the answer, whatever the other rows hold */
                best = sum;
                b = v[3], n = v[4];
            } else if (sum > best)
                best = sum;
        }
    Py_END_ALLOW_THREADS;
    return PyFloat_FromDouble(sqrt(best));
}

PyDoc_STRVAR(listed_doc,
             "listed(q, q_b, q_g, q_row, k, .., v, .., cand, .., out, .., prob, G, N, M, d, K,\n"
             "       s0, s1, scale)\n\n"
             "Softmax attention of each query over its own K listed keys, for the slices\n"
             "s0 <= b * G + g < s1: float32 q (B, G, N, d), k and v (B, G, M, d), int64 cand\n"
             "(B, G, N, K) and out (B, G, N, d), each a data pointer and its strides in elements\n"
             "for b, g and the row (rows contiguous; 0 shares), prob (B * G, N, K) contiguous:\n"
             "prob = softmax(scale * q . k[cand]), out = prob @ v[cand].");

PyDoc_STRVAR(listed_grad_doc,
             "listed_grad(q, .., k, .., v, .., cand, .., prob, dout, .., dq, .., dk, .., dv, ..,\n"
             "            G, N, M, d, K, s0, s1, scale)\n\n"
             "The gradients of listed for dout: dq written, dk and dv added into (0: skip).");

/* The shared head of listed and listed_grad: the integers and the trailing scale; 0 with an
 * exception set when wrong. dims: G, N, M, d, K, s0, s1. */
static int listed_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *name,
                       Py_ssize_t *v, float *scale) {
    if (nargs != want + 1) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", name, want + 1);
        return 0;
    }
    if (!integers(args, want, want, name, v)) return 0;
    *scale = (float)PyFloat_AsDouble(args[want]);
    if (PyErr_Occurred()) return 0;
    const Py_ssize_t *dims = v + want - 7;
    if (dims[0] < 1 || dims[1] < 0 || dims[2] < 1 || dims[3] < 1 || dims[4] < 1 || dims[5] < 0 ||
        dims[6] < dims[5]) {
        PyErr_Format(PyExc_ValueError, "%s: need G, M, d, K >= 1, N >= 0, 0 <= s0 <= s1", name);
        return 0;
    }
    return 1;
}

/* The operands of listed and listed_grad (v: q, k, v and cand, each a pointer and three
 * strides), with their scratch; 0 with MemoryError set. */
static int listed_open(Listed *a, const Py_ssize_t *v, float *prob, const Py_ssize_t *dims,
                       float scale) {
    *a = (Listed){(const float *)v[0], (const float *)v[4], (const float *)v[8],
                  (const int64_t *)v[12], prob, dims[0], dims[1], dims[2], dims[3], dims[4],
                  {v[1], v[2], v[3]}, {v[5], v[6], v[7]}, {v[9], v[10], v[11]},
                  {v[13], v[14], v[15]}, scale, malloc((size_t)dims[4] * sizeof(float)),
                  malloc((size_t)dims[4] * sizeof(float *))};
    if (a->sc && a->rows) return 1;
    free(a->sc), free((void *)a->rows);
    PyErr_NoMemory();
    return 0;
}

/* Frees the scratch and returns None, or raises when a kernel met a key outside the keys. */
static PyObject *listed_done(Listed *a, int ok, const char *name) {
    free(a->sc), free((void *)a->rows);
    if (!ok) return PyErr_Format(PyExc_ValueError, "%s: a listed key lies outside the keys", name);
    Py_RETURN_NONE;
}

static PyObject *listed(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Py_ssize_t v[28];
    float scale;
    Listed a;
    if (!listed_args(args, nargs, 28, "listed", v, &scale) ||
        !listed_open(&a, v, (float *)v[20], v + 21, scale))
        return NULL;
    int ok;
    Py_BEGIN_ALLOW_THREADS;
    ok = listed_forward(&a, (float *)v[16], v + 17, v[26], v[27]);
    Py_END_ALLOW_THREADS;
    return listed_done(&a, ok, "listed");
}

static PyObject *listed_grad(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Py_ssize_t v[40];
    float scale;
    Listed a;
    if (!listed_args(args, nargs, 40, "listed_grad", v, &scale) ||
        !listed_open(&a, v, (float *)v[16], v + 33, scale))
        return NULL;
    int ok;
    Py_BEGIN_ALLOW_THREADS;
    ok = listed_backward(&a, (const float *)v[17], v + 18, (float *)v[21], v + 22,
                         (float *)v[25], v + 26, (float *)v[29], v + 30, v[38], v[39]);
    Py_END_ALLOW_THREADS;
    return listed_done(&a, ok, "listed_grad");
}

PyDoc_STRVAR(window_doc,
             "window(q, k, cand, out, B, n, W, d, M, q_batch, q_row, k_batch, k_row,\n"
             "       cand_batch)\n\n"
             "Each of B x n queries' scores against its own W candidate keys: float32 data\n"
             "pointers q, k (rows contiguous), int64 cand (n, W) rows and float32 out (B, n, W);\n"
             "strides in elements, a batch stride of 0 shares across the batch.");

static PyObject *window(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Py_ssize_t v[14];
    if (!integers(args, nargs, 14, "window", v)) return NULL;
    int ok;
    Py_BEGIN_ALLOW_THREADS;
    ok = window_rows((const float *)v[0], (const float *)v[1], (const int64_t *)v[2],
                     (float *)v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12], v[13]);
    Py_END_ALLOW_THREADS;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "window: a candidate lies outside the keys");
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(window_topk_doc,
             "window_topk(q, k, cand, exclude, out, B, n, W, d, M, q_batch, q_row, k_batch,\n"
             "            k_row, cand_batch, K)\n\n"
             "The K best of each query's candidates under window's scores, as key indices into\n"
             "the int64 out (B, n, K), canonical order; exclude: 0 or n int64 keys, one a query\n"
             "scores -inf. Finite scores only (the caller's check).");

static PyObject *window_topk(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Py_ssize_t v[16];
    if (!integers(args, nargs, 16, "window_topk", v)) return NULL;
    if (v[15] < 1 || v[15] > v[7]) {
        PyErr_SetString(PyExc_ValueError, "window_topk: need 1 <= K <= W");
        return NULL;
    }
    Ranker rk;
    float *buf = malloc((size_t)WINDOW_BLOCK * v[7] * sizeof(float));
    if (!buf || !ranker_open(&rk, v[7], v[15])) return free(buf), PyErr_NoMemory();
    int ok;
    Py_BEGIN_ALLOW_THREADS;
    ok = window_topk_rows((const float *)v[0], (const float *)v[1], (const int64_t *)v[2],
                          (const int64_t *)v[3], (int64_t *)v[4], v[5], v[6], v[7], v[8], v[9],
                          v[10], v[11], v[12], v[13], v[14], &rk, buf);
    Py_END_ALLOW_THREADS;
    ranker_close(&rk), free(buf);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "window_topk: a candidate lies outside the keys");
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(topk_doc,
             "topk(scores, kind, rows, width, row_stride, K, out, out_stride)\n\n"
             "The K best positions of each of ``rows`` rows of ``width`` scores (data pointer\n"
             "``scores``; rows ``row_stride`` elements apart, each contiguous) into the int64\n"
             "rows of ``out`` (``out_stride`` apart), in canonical order. ``kind``: 0 fp32,\n"
             "1 fp32 ranked by its bfloat16 rounding, 2 16-bit floats (bfloat16 or float16).");

static PyObject *topk(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Py_ssize_t v[8];
    if (!integers(args, nargs, 8, "topk", v)) return NULL;
    int kind = v[1] < F32 || v[1] > HALF16 ? -1 : (int)v[1];
    Py_ssize_t rows = v[2], M = v[3], stride = v[4], K = v[5], out_stride = v[7];
    if (kind < F32 || kind > HALF16 || rows < 0 || K < 1 || K > M || M > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "topk: kind must be 0-2 and 1 <= K <= width < 2^31");
        return NULL;
    }
    Ranker r;
    if (!ranker_open(&r, M, K)) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS;
    rank_rows(&r, (const void *)v[0], kind, rows, stride, (int64_t *)v[6], out_stride);
    Py_END_ALLOW_THREADS;
    ranker_close(&r);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(gemm_topk_doc,
             "gemm_topk(q, q_batch, q_row, k, k_batch, k_row, B, n, M, D, K, symmetric,\n"
             "          exclude, bf16, out, half)\n\n"
             "For each of B images, the K best of M keys (float32 rows k_row apart) for each\n"
             "of n queries (float32 rows q_row apart) under q . k, depth D, scored and ranked\n"
             "in one pass, into int64 out (B, n, K) in canonical order; 1 <= K <= 16, K <= M.\n"
             "Strides in elements; a batch stride of 0 shares. symmetric: the keys are the\n"
             "queries (same pointer and strides, n == M). exclude: 0 or n int64 positions, one\n"
             "a query never takes (then K < M). bf16: rank each score's bfloat16 rounding.\n"
             "half: q and k are bfloat16, scored by the tile unit (only where amx()). Only\n"
             "where gemm_topk_cpu() is true.");

/* Whether the tile kernels (gemm_topk, aggregate, aggregate_grad) run here: 0 with a
 * RuntimeError naming ``name`` when this build or CPU lacks them. */
static int tiles_here(const char *name) {
#ifdef HAVE_GEMM_TOPK
    if (gemm_topk_cpu()) return 1;
    PyErr_Format(PyExc_RuntimeError, "%s: this CPU lacks AVX2 and FMA", name);
#else
    PyErr_Format(PyExc_RuntimeError, "%s: built without it (x86-64 only)", name);
#endif
    return 0;
}

/* Whether gemm_topk takes bfloat16 operands here (the tile unit, lent to this process). */
static int amx_here_now(void) {
#ifdef HAVE_AMX
    return amx_ready;
#else
    return 0;
#endif
}

static PyObject *gemm_topk(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Py_ssize_t v[16];
    if (!integers(args, nargs, 16, "gemm_topk", v) || !tiles_here("gemm_topk")) return NULL;
#ifdef HAVE_GEMM_TOPK
    Py_ssize_t B = v[6], n = v[7], M = v[8], D = v[9], K = v[10];
    int symmetric = v[11] != 0, half = v[15] != 0;
    if (half && !amx_here_now()) {
        PyErr_SetString(PyExc_ValueError,
                        "gemm_topk: bfloat16 operands need the tile unit (AMX-BF16), which "
                        "this CPU or process lacks");
        return NULL;
    }
    if (B < 0 || n < 0 || D < 1 || K < 1 || K > SLOTS || K > M - (v[12] != 0) || M > INT32_MAX ||
        (symmetric && (v[0] != v[3] || v[1] != v[4] || v[2] != v[5] || n != M))) {
        PyErr_SetString(PyExc_ValueError,
                        "gemm_topk: need B, n >= 0, D >= 1, 1 <= K <= min(16, M), K < M with "
                        "exclude, M < 2^31, and for symmetric the same q and k, n == M");
        return NULL;
    }
    int ok = 1;
    if (B > 0 && n > 0) {
        Py_BEGIN_ALLOW_THREADS;
#ifdef HAVE_AMX
        if (half)
            ok = gemm_topk_images_amx((const uint16_t *)v[0], v[1], v[2], (const uint16_t *)v[3],
                                      v[4], v[5], B, n, M, D, (int)K, symmetric,
                                      (const int64_t *)v[12], v[13] != 0, (int64_t *)v[14]);
        else
#endif
            ok = gemm_topk_images((const float *)v[0], v[1], v[2], (const float *)v[3], v[4], v[5],
                                  B, n, M, D, (int)K, symmetric, (const int64_t *)v[12],
                                  v[13] != 0, (int64_t *)v[14]);
        Py_END_ALLOW_THREADS;
    }
    if (!ok) return PyErr_NoMemory();
#endif
    Py_RETURN_NONE;
}

PyDoc_STRVAR(aggregate_doc,
             "aggregate(values, idx, weight, bias, out, B, M, N, C, K, O)\n\n"
             "out[b, :, n] = sum over k of weight[:, :, k] values[b, idx[b, n, k]] + bias,\n"
             "the neighbours read in place: float32 values (B, M, C), weight (O, C, K), bias\n"
             "(O) or 0, int64 idx (B, N, K) in [0, M), out (B, O, N), all contiguous. Only\n"
             "where gemm_topk_cpu() is true.");

PyDoc_STRVAR(aggregate_grad_doc,
             "aggregate_grad(grad_out, g_batch, g_row, g_col, values, idx, weight, g_values,\n"
             "               v_batch, v_row, v_col, g_weight, B, M, N, C, K, O)\n\n"
             "The gradients of aggregate: g_values (B, M, C) = the neighbours' shares (0 to\n"
             "skip; overwritten), g_weight (O, C, K) = their products with grad_out (B, N, O)\n"
             "(0 to skip). grad_out's and g_values' strides in elements; g_values' rows or\n"
             "columns contiguous (v_col 1 or v_row 1).");

/* The arguments of the aggregation entry points: 0 with an exception set when wrong. */
static int aggregate_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want,
                          const char *name, int idx_arg, Py_ssize_t *v) {
    if (!integers(args, nargs, want, name, v) || !tiles_here(name)) return 0;
    Py_ssize_t *shape = v + want - 6; /* B, M, N, C, K, O */
    for (int t = 0; t < 6; t++)
        if (shape[t] < (t == 0 || t == 2 ? 0 : 1) || shape[t] > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: need B, N >= 0 and M, C, K, O >= 1", name);
            return 0;
        }
    /* every neighbour must lie among the M values: the kernels read them unchecked */
    const int64_t *idx = (const int64_t *)v[idx_arg];
    for (Py_ssize_t t = 0, n = shape[0] * shape[2] * shape[4]; t < n; t++)
        if (idx[t] < 0 || idx[t] >= shape[1]) {
            PyErr_Format(PyExc_ValueError, "%s: a neighbour index lies outside the values", name);
            return 0;
        }
    return 1;
}

PyDoc_STRVAR(transpose_doc,
             "transpose(dst, d_batch, d_row, src, s_batch, s_row, B, R, S)\n\n"
             "dst[b, s, r] = src[b, r, s] for B float32 matrices (R, S), rows of both\n"
             "contiguous (strides in elements).");

static PyObject *transpose_entry(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Py_ssize_t v[9];
    if (!integers(args, nargs, 9, "transpose", v) || !tiles_here("transpose") ||
        !sizes(v + 6, 3, "transpose: need B, R, S >= 0"))
        return NULL;
#ifdef HAVE_GEMM_TOPK
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t b = 0; b < v[6]; b++)
        transpose((float *)v[0] + b * v[1], v[2], (const float *)v[3] + b * v[4], v[5], v[7], v[8]);
    Py_END_ALLOW_THREADS;
#endif
    Py_RETURN_NONE;
}

static PyObject *aggregate(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Py_ssize_t v[11];
    if (!aggregate_args(args, nargs, 11, "aggregate", 1, v)) return NULL;
#ifdef HAVE_GEMM_TOPK
    int ok;
    Py_BEGIN_ALLOW_THREADS;
    ok = aggregate_images((const float *)v[0], (const int64_t *)v[1], (const float *)v[2],
                          (const float *)v[3], (float *)v[4], v[5], v[6], v[7], v[8], (int)v[9],
                          v[10]);
    Py_END_ALLOW_THREADS;
    if (!ok) return PyErr_NoMemory();
#endif
    Py_RETURN_NONE;
}

static PyObject *aggregate_grad(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Py_ssize_t v[18];
    if (!aggregate_args(args, nargs, 18, "aggregate_grad", 5, v)) return NULL;
    if (v[7] && v[10] != 1 && v[9] != 1) {
        PyErr_SetString(PyExc_ValueError,
                        "aggregate_grad: g_values needs contiguous rows or columns (v_col or "
                        "v_row 1)");
        return NULL;
    }
#ifdef HAVE_GEMM_TOPK
    int ok = 1;
    const float *gy = (const float *)v[0];
    Py_BEGIN_ALLOW_THREADS;
    if (v[7])
        ok = aggregate_grad_values(gy, v[1], v[2], v[3], (const int64_t *)v[5], (const float *)v[6],
                                   (float *)v[7], v[8], v[9], v[10], v[12], v[13], v[14], v[15],
                                   (int)v[16], v[17]);
    if (ok && v[11])
        ok = aggregate_grad_weight(gy, v[1], v[2], v[3], (const int64_t *)v[5], (const float *)v[4],
                                   (float *)v[11], v[12], v[13], v[14], v[15], (int)v[16], v[17]);
    Py_END_ALLOW_THREADS;
    if (!ok) return PyErr_NoMemory();
#endif
    Py_RETURN_NONE;
}

PyDoc_STRVAR(gemm_topk_cpu_doc, "gemm_topk_cpu()\n\nWhether gemm_topk runs on this CPU.");

static PyObject *gemm_topk_here(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
#ifdef HAVE_GEMM_TOPK
    return PyBool_FromLong(gemm_topk_cpu());
#else
    Py_RETURN_FALSE;
#endif
}

PyDoc_STRVAR(amx_doc, "amx()\n\nWhether gemm_topk takes bfloat16 operands here (AMX-BF16).");

static PyObject *amx(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    return PyBool_FromLong(amx_here_now());
}

PyDoc_STRVAR(tile_rows_doc,
             "tile_rows(rows=0)\n\n"
             "The rows of the tile kernels' widest tile: 12 (AVX-512, 12 x 16), 6 (AVX2, 6 x 16)\n"
             "or 0 (none). rows = 6 or 12 sets it first (12 only where the CPU has AVX-512F):\n"
             "both give the same numbers, bit for bit.");

static PyObject *tile_rows(PyObject *self, PyObject *args) {
    (void)self;
    int rows = 0;
    if (!PyArg_ParseTuple(args, "|i:tile_rows", &rows)) return NULL;
#ifdef HAVE_GEMM_TOPK
    if (rows != 0) {
        __builtin_cpu_init();
        if (!gemm_topk_cpu() || (rows != MR && rows != 2 * MR) ||
            (rows == 2 * MR && !__builtin_cpu_supports("avx512f"))) {
            PyErr_Format(PyExc_ValueError, "tile_rows: rows must be 6 or, on a CPU with "
                         "AVX-512F, 12; got %d", rows);
            return NULL;
        }
        wide_tiles = rows == 2 * MR;
    }
    return PyLong_FromLong(!gemm_topk_cpu() ? 0 : wide_tiles ? 2 * MR : MR);
#else
    if (rows != 0) {
        PyErr_SetString(PyExc_ValueError, "tile_rows: built without the tile kernels");
        return NULL;
    }
    return PyLong_FromLong(0);
#endif
}

static PyMethodDef methods[] = {
    {"tile_rows", tile_rows, METH_VARARGS, tile_rows_doc},
    {"topk", (PyCFunction)(void (*)(void))topk, METH_FASTCALL, topk_doc},
    {"window", (PyCFunction)(void (*)(void))window, METH_FASTCALL, window_doc},
    {"listed", (PyCFunction)(void (*)(void))listed, METH_FASTCALL, listed_doc},
    {"listed_grad", (PyCFunction)(void (*)(void))listed_grad, METH_FASTCALL, listed_grad_doc},
    {"window_topk", (PyCFunction)(void (*)(void))window_topk, METH_FASTCALL, window_topk_doc},
    {"gemm_topk", (PyCFunction)(void (*)(void))gemm_topk, METH_FASTCALL, gemm_topk_doc},
    {"gemm_topk_cpu", gemm_topk_here, METH_NOARGS, gemm_topk_cpu_doc},
    {"amx", amx, METH_NOARGS, amx_doc},
    {"aggregate", (PyCFunction)(void (*)(void))aggregate, METH_FASTCALL, aggregate_doc},
    {"aggregate_grad", (PyCFunction)(void (*)(void))aggregate_grad, METH_FASTCALL,
     aggregate_grad_doc},
    {"transpose", (PyCFunction)(void (*)(void))transpose_entry, METH_FASTCALL, transpose_doc},
    {"max_norm", (PyCFunction)(void (*)(void))max_norm, METH_FASTCALL, max_norm_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rank", "Native top-K and window scores (see convnn.native).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__rank(void) {
#ifdef HAVE_GEMM_TOPK
    __builtin_cpu_init();
    wide_tiles = gemm_topk_cpu() && __builtin_cpu_supports("avx512f");
#endif
#ifdef HAVE_AMX
    amx_ready = gemm_topk_cpu() && amx_open();
#endif
    return PyModule_Create(&module);
}
