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
#include <stdint.h>
#include <stdlib.h>

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
            for (Py_ssize_t j = 0; j < W; j++) {
                if (c[j] < 0 || c[j] >= M) return 0;
                o[j] = dot(qi, k + b * kb + c[j] * kr, d);
            }
        }
    return 1;
}

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
    uintptr_t src = (uintptr_t)v[0], dst = (uintptr_t)v[6];
    int kind = v[1] < F32 || v[1] > HALF16 ? -1 : (int)v[1];
    Py_ssize_t rows = v[2], M = v[3], stride = v[4], K = v[5], out_stride = v[7];
    if (kind < F32 || kind > HALF16 || rows < 0 || K < 1 || K > M || M > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "topk: kind must be 0-2 and 1 <= K <= width < 2^31");
        return NULL;
    }
    /* rank_row's keys, its heap and group maxima, and its chosen groups */
    size_t n_keys = (size_t)M + (size_t)M / GROUP + 4 * LANES;
    size_t n_scratch = 2 * (size_t)K + (size_t)M / GROUP + 1;
    int64_t *chosen = (int64_t *)malloc((size_t)K * sizeof(int64_t));
    int32_t *keys = (int32_t *)malloc((n_keys + n_scratch) * sizeof(int32_t));
    /* narrow rows with few rounds: LANES rows at a time, a row to a lane, their keys lane by
     * lane in lane_keys */
    int by_lanes = M <= LANE_ROWS_WIDTH && K * M <= ROUNDS_WORK;
    int32_t *lane_keys = by_lanes ? (int32_t *)malloc((size_t)M * LANES * sizeof(int32_t)) : NULL;
    if (keys == NULL || chosen == NULL || (by_lanes && lane_keys == NULL)) {
        free(keys), free(chosen), free(lane_keys);
        return PyErr_NoMemory();
    }
    size_t item = kind == HALF16 ? 2 : 4;
    Py_BEGIN_ALLOW_THREADS;
    Py_ssize_t r = 0;
    for (; by_lanes && r < rows; r += LANES) {
        const char *group[LANES];
        for (int l = 0; l < LANES; l++)
            group[l] = r + l < rows ? (const char *)src + (size_t)((r + l) * stride) * item : NULL;
        read_keys_lanes(group, M, kind, lane_keys);
        int64_t *out = (int64_t *)dst + r * out_stride;
        int real = rows - r < LANES ? (int)(rows - r) : LANES;
        int failed = rank_rounds_lanes(lane_keys, M, K, out, out_stride, real);
        for (int l = 0; l < real; l++)
            if (failed >> l & 1)
                rank_heap(group[l], kind, M, K, keys + n_keys, keys + n_keys + K,
                          keys + n_keys + 2 * K, out + l * out_stride);
    }
    for (; r < rows; r++) {
        const char *row = (const char *)src + (size_t)(r * stride) * item;
        rank_row(row, kind, M, K, keys, keys + n_keys, chosen, (int64_t *)dst + r * out_stride);
    }
    Py_END_ALLOW_THREADS;
    free(keys), free(chosen), free(lane_keys);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"topk", (PyCFunction)(void (*)(void))topk, METH_FASTCALL, topk_doc},
    {"window", (PyCFunction)(void (*)(void))window, METH_FASTCALL, window_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rank", "Native top-K and window scores (see convnn.native).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__rank(void) { return PyModule_Create(&module); }
