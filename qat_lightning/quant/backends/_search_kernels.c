/*
 * Fused CPU kernels for the histogram threshold searches (float64, contiguous).
 *
 * Built by setup.py as the optional extension ``qat_lightning.quant._search_kernels``; without a C compiler
 * (or with QAT_LIGHTNING_NO_KERNELS=1) the searches run their ATen code (histogram_error.py, kl_search.py),
 * which computes the same values. ``search_kernels.py`` checks dtypes, shapes and contiguity and passes the
 * addresses (``Tensor.data_ptr()``) as integers. The GIL is released while a kernel runs; rows are split
 * over ``threads`` OpenMP threads when there is enough work.
 *
 * Every kernel repeats the arithmetic of its ATen counterpart operation by operation, in the same order:
 * one ATen op per rounding. Where the ATen code calls ``addcmul`` its CPU kernel computes
 * ``fma(value * t1, t2, self)`` (one rounding, measured), so the kernels call fma() there and nowhere else:
 * the file is compiled without FP contraction (the pragma below and -ffp-contract=off), and the prefix
 * sums are sequential like torch's CPU cumsum. So the results are bit-identical to the ATen code on a CPU
 * with FMA (where torch's addcmul uses it), and equal to float rounding elsewhere.
 *
 * moments:  pre[0] = cumsum(c), pre[1] = cumsum(c * (lo + j) / 2) * w, pre[2] = cumsum(c * (lo^2 + lo j +
 *           j^2) / 3) * w^2 per row (bin j covers (lo w, j w], lo = max(j - 1, 0)); w = width or 1.
 * edge_mse: histogram_error.edge_mse, the estimated error of every bin edge i * w, i = first .. last.
 * mse_at:   histogram_error.mse_at at given thresholds (every row, or one row index per threshold).
 * kl_args, kl_finish: the prefix sums, J (bins up to the last non-empty one) and the kl_search divergences
 *           of the candidates i = nq .. 2 nq (kl_divergences / _low_terms) in two passes: kl_args writes
 *           the arguments of the logarithms, torch takes the logs (the ATen log itself), kl_finish sums.
 * kl_pick:  kl_threshold's tie-break: the band of divergences within the tolerance of the minimum, the
 *           smallest estimated error in it (then the smallest i), and the threshold.
 */
#pragma GCC optimize("fp-contract=off")
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MIN_CELLS_PER_THREAD 16384
#define TINY 1e-300

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* fma() is one instruction with FMA and a (correctly rounded, slower) libm call without: same values */
#define FMA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FMA_CLONES
#endif

/* Threads worth using for `rows` rows of `cells` cells. */
static int team_size(int64_t rows, int64_t cells, int threads) {
#ifdef _OPENMP
    int64_t useful = rows * cells / MIN_CELLS_PER_THREAD;
    int64_t team = threads < useful ? threads : useful;
    team = team < rows ? team : rows;
    return team > 1 ? (int)team : 1;
#else
    (void)rows;
    (void)cells;
    (void)threads;
    return 1;
#endif
}

static inline double max0(double v) { return v < 0.0 ? 0.0 : v; } /* clamp_min(0): NaN stays NaN */

static inline double clamp_lo(double v, double lo) { return v < lo ? lo : v; }

static inline double minimum(double a, double b) { /* torch.minimum: NaN if either is NaN */
    if (isnan(a) || isnan(b)) {
        return NAN;
    }
    return a < b ? a : b;
}

/* ---- moments ----------------------------------------------------------------------------------------- */

/* Rows r .. r + BLOCK - 1 at once: BLOCK independent chains of sequential sums per moment. `c1`, `c2` are
 * (lo + j) / 2 and (lo^2 + lo j + j^2) / 3 per column. */
#define BLOCK 4
static void moments_rows(const double *restrict cnt, const double *restrict width, const double *restrict c1,
                         const double *restrict c2, double *restrict p0, double *restrict w_out, int64_t nrows,
                         int64_t cells, int64_t plane) {
    double w[BLOCK], ww[BLOCK], a0[BLOCK], a1[BLOCK], a2[BLOCK];
    for (int64_t q = 0; q < nrows; ++q) {
        w[q] = width[q] > 0.0 ? width[q] : 1.0; /* torch.where(width > 0, width, 1) */
        ww[q] = w[q] * w[q];
        a0[q] = a1[q] = a2[q] = 0.0;
        w_out[q] = w[q];
    }
    double *restrict p1 = p0 + plane, *restrict p2 = p1 + plane;
    for (int64_t j = 0; j < cells; ++j) {
        for (int64_t q = 0; q < nrows; ++q) {
            const double c = cnt[q * cells + j];
            a0[q] = a0[q] + c;
            a1[q] = a1[q] + c * c1[j];
            a2[q] = a2[q] + c * c2[j];
            p0[q * cells + j] = a0[q];
            p1[q * cells + j] = a1[q] * w[q];
            p2[q * cells + j] = a2[q] * ww[q];
        }
    }
}

static PyObject *moments(PyObject *self, PyObject *args) {
    unsigned long long ca, wa, pa, woa;
    long long rows, cells;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKLLi", &ca, &wa, &pa, &woa, &rows, &cells, &threads)) {
        return NULL;
    }
    const double *counts = (const double *)(uintptr_t)ca, *width = (const double *)(uintptr_t)wa;
    double *pre = (double *)(uintptr_t)pa, *w_out = (double *)(uintptr_t)woa;
    double *c1 = malloc(2 * (size_t)cells * sizeof(double));
    if (!c1) {
        return PyErr_NoMemory();
    }
    double *c2 = c1 + cells;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t j = 0; j < cells; ++j) { /* bin j covers (lo w, j w]; bin 0 (exact zeros) has both 0 */
        const double jd = (double)j, lo = j > 0 ? (double)(j - 1) : 0.0;
        c1[j] = (lo + jd) / 2.0;
        c2[j] = (lo * lo + lo * jd + jd * jd) / 3.0;
    }
    const int64_t blocks = (rows + BLOCK - 1) / BLOCK;
    const int team = team_size(rows, cells, threads);
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t r = b * BLOCK, n = rows - r < BLOCK ? rows - r : BLOCK;
        moments_rows(counts + r * cells, width + r, c1, c2, pre + r * cells, w_out + r, n, cells, rows * cells);
    }
    Py_END_ALLOW_THREADS
    free(c1);
    Py_RETURN_NONE;
}

/* ---- error estimates --------------------------------------------------------------------------------- */

/* One histogram row with its moments, as histogram_error.Moments holds it. */
typedef struct {
    const double *cnt, *p0, *p1, *p2;
    double w;
    int64_t bins;
} Row;

static Row get_row(const double *counts, const double *pre, const double *w, int64_t rows, int64_t cells,
                   int64_t r) {
    Row row;
    row.cnt = counts + r * cells;
    row.p0 = pre + r * cells;
    row.p1 = row.p0 + rows * cells;
    row.p2 = row.p1 + rows * cells;
    row.w = w[r];
    row.bins = cells - 1;
    return row;
}

/* histogram_error.mse_at for one threshold t of one row. */
FMA_CLONES
static double mse_point(const Row *row, double t, double qmax) {
    const double w = row->w, bins = (double)row->bins;
    const double n0 = row->p0[row->bins], n1 = row->p1[row->bins], n2 = row->p2[row->bins];
    t = minimum(max0(t), w * bins);
    double got[2][3];
    const double pts[2] = {(t / (2.0 * qmax)) / w, t / w}; /* s / 2 and t, in bins */
    for (int p = 0; p < 2; ++p) {
        const double x = pts[p];
        double k = ceil(x);
        k = k < 1.0 ? 1.0 : (k > bins ? bins : k);
        const double prev = k - 1.0;
        const int64_t ki = (int64_t)k;
        const double count = row->cnt[ki];
        const double part = x - prev;
        const double c1 = ((x + prev) * part) * (w / 2.0);
        const double c2 = (x * x * x - prev * prev * prev) * (w * w / 3.0);
        got[p][0] = fma(count, part, row->p0[ki - 1]);
        got[p][1] = fma(count, c1, row->p1[ki - 1]);
        got[p][2] = fma(count, c2, row->p2[ki - 1]);
    }
    const double a0 = n0 - got[1][0], a1 = n1 - got[1][1], a2 = n2 - got[1][2];
    const double clip = max0(fma(-0.5 * a0, t, a1) * (-2.0 * t) + a2);
    const double rounding = max0(got[1][0] - got[0][0]) * (t * t / (12.0 * qmax * qmax));
    return (clip + rounding + got[0][2]) / clamp_lo(n0, TINY);
}

static PyObject *mse_at(PyObject *self, PyObject *args) {
    unsigned long long pa, ca, wa, ra, ta, oa;
    long long rows, cells, n, per_row;
    double qmax;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKKLLLLdi", &pa, &ca, &wa, &ra, &ta, &oa, &rows, &cells, &n, &per_row, &qmax,
                          &threads)) {
        return NULL;
    }
    const double *pre = (const double *)(uintptr_t)pa, *counts = (const double *)(uintptr_t)ca;
    const double *w = (const double *)(uintptr_t)wa, *t = (const double *)(uintptr_t)ta;
    const int64_t *row_idx = (const int64_t *)(uintptr_t)ra;
    double *out = (double *)(uintptr_t)oa;
    Py_BEGIN_ALLOW_THREADS
    if (row_idx) { /* n thresholds, one row index each */
        for (int64_t e = 0; e < n; ++e) {
            const Row row = get_row(counts, pre, w, rows, cells, row_idx[e]);
            out[e] = mse_point(&row, t[e], qmax);
        }
    } else { /* (rows, per_row) thresholds */
        const int team = team_size(rows, per_row * 64, threads);
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
        for (int64_t r = 0; r < rows; ++r) {
            const Row row = get_row(counts, pre, w, rows, cells, r);
            for (int64_t e = 0; e < per_row; ++e) {
                out[r * per_row + e] = mse_point(&row, t[r * per_row + e], qmax);
            }
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* histogram_error.edge_mse for one row: the error of the edges i * w, i = first .. last. `xs` holds
 * i / (2 qmax), `c3` ((x^3 - prev^3) / 3), `ii` i * i, `ids` i (the same for every row); the bin k of x is constant
 * over runs of edges: run g covers the edges run_at[g] .. run_at[g + 1] - 1 with k = run_k[g]. */
FMA_CLONES
static void edge_row(const Row *row, int64_t first, const double *restrict xs, const double *restrict c3,
                     const double *restrict ii, const double *restrict ids, const int64_t *restrict run_at, const int64_t *restrict run_k,
                     int64_t runs, double qmax, double *restrict out) {
    const double w = row->w, ww = w * w;
    const double n0 = row->p0[row->bins], n1 = row->p1[row->bins], n2 = row->p2[row->bins];
    const double rc = ww / (12.0 * qmax * qmax), div = clamp_lo(n0, TINY);
    const double *restrict q0 = row->p0 + first, *restrict q1 = row->p1 + first, *restrict q2 = row->p2 + first;
    for (int64_t g = 0; g < runs; ++g) {
        const int64_t k = run_k[g];
        const double c = row->cnt[k], f0 = row->p0[k - 1], f2 = row->p2[k - 1], prev = (double)(k - 1);
        for (int64_t e = run_at[g]; e < run_at[g + 1]; ++e) {
            const double t = w * ids[e];
            const double z0 = fma(c, xs[e] - prev, f0);
            const double z2 = fma(c, c3[e] * ww, f2);
            const double a0 = n0 - q0[e], a1 = n1 - q1[e], a2 = n2 - q2[e];
            const double clip = max0(fma(-0.5 * a0, t, a1) * (-2.0 * t) + a2);
            out[e] = (fma(max0(q0[e] - z0), rc * ii[e], clip) + z2) / div;
        }
    }
}

static PyObject *edge_mse(PyObject *self, PyObject *args) {
    unsigned long long pa, ca, wa, oa, aa;
    long long rows, cells, first, last;
    double qmax;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLdi", &pa, &ca, &wa, &oa, &aa, &rows, &cells, &first, &last, &qmax,
                          &threads)) {
        return NULL;
    }
    int64_t *arg = (int64_t *)(uintptr_t)aa;
    const double *pre = (const double *)(uintptr_t)pa, *counts = (const double *)(uintptr_t)ca;
    const double *w = (const double *)(uintptr_t)wa;
    double *out = (double *)(uintptr_t)oa;
    const int64_t ncol = last - first + 1;
    double *xs = malloc(4 * (size_t)ncol * sizeof(double));
    int64_t *run_at = malloc(2 * ((size_t)ncol + 1) * sizeof(int64_t));
    if (!xs || !run_at) {
        free(xs);
        free(run_at);
        return PyErr_NoMemory();
    }
    double *c3 = xs + ncol, *ii = xs + 2 * ncol, *ids = xs + 3 * ncol;
    int64_t *run_k = run_at + ncol + 1, runs = 0;
    Py_BEGIN_ALLOW_THREADS
    const double bins = (double)(cells - 1);
    for (int64_t e = 0; e < ncol; ++e) {
        const double id = (double)(first + e), x = id / (2.0 * qmax);
        double k = ceil(x);
        k = k < 1.0 ? 1.0 : (k > bins ? bins : k);
        const double prev = k - 1.0;
        xs[e] = x;
        c3[e] = (x * x * x - prev * prev * prev) / 3.0;
        ii[e] = id * id;
        ids[e] = id;
        if (runs == 0 || run_k[runs - 1] != (int64_t)k) {
            run_at[runs] = e;
            run_k[runs++] = (int64_t)k;
        }
    }
    run_at[runs] = ncol;
    const int team = team_size(rows, ncol, threads);
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const Row row = get_row(counts, pre, w, rows, cells, r);
        edge_row(&row, first, xs, c3, ii, ids, run_at, run_k, runs, qmax, out + r * ncol);
        if (arg) { /* torch.argmin: the first minimum; the first NaN if there is one */
            const double *v = out + r * ncol;
            int64_t best = 0;
            for (int64_t e = 0; e < ncol; ++e) {
                if (isnan(v[e])) {
                    best = e;
                    break;
                }
                best = v[e] < v[best] ? e : best;
            }
            arg[r] = best;
        }
    }
    Py_END_ALLOW_THREADS
    free(xs);
    free(run_at);
    Py_RETURN_NONE;
}

/* ---- kl ---------------------------------------------------------------------------------------------- */

/* Layout of the logarithms one row of the kl divergences needs (kl_search._log = log(max(v, 1e-300))):
 * the bins h[0 .. 2 nq), the pair sums s_r and the top groups' P mass p_r (r < nq), cum[nq + r] / total
 * (r <= nq), then b + out and s / n of candidate 2 nq. `kl_args` writes max(v, 1e-300), torch takes the
 * log in place (the very log of the ATen code), `kl_finish` combines them. */
#define LOG_S(nq) (2 * (nq))
#define LOG_P(nq) (3 * (nq))
#define LOG_CUM(nq) (4 * (nq))
#define LOG_LAST(nq) (5 * (nq) + 1)
#define LOG_ARGS(nq) (5 * (nq) + 3)

static inline double tiny_min(double v) { return clamp_lo(v, TINY); }

/* Candidate 2 nq: nq pairs, the clipped mass `out` in the second bin of the last one; s, n: its last pair's
 * count and non-empty bins. */
static void last_pair(const double *restrict h, double total, const double *restrict cum, int64_t nq,
                      double *out, double *s, double *n) {
    const double a = h[2 * nq - 2], b = h[2 * nq - 1];
    *out = max0(total - cum[2 * nq]);
    *s = a + b;
    *n = (double)(a > 0.0) + (double)((b > 0.0) | (*out > 0.0));
}

/* kl_divergences for one row, first pass: cum (0, then the prefix sums of h = cnt[1:]), J, and when
 * args != NULL the arguments of the logarithms (needs bins >= 2 nq). */
static int64_t kl_args_row(const double *restrict cnt, int64_t bins, int64_t nq, double *restrict cum,
                           double *restrict args) {
    const double *h = cnt + 1;
    cum[0] = 0.0;
    for (int64_t j = 0; j < bins; ++j) {
        cum[j + 1] = cum[j] + h[j];
    }
    const double total = cum[bins];
    int64_t last = 0;
    for (int64_t j = 0; j < bins; ++j) {
        last += cum[j] < total;
    }
    if (!args) {
        return last;
    }
    for (int64_t j = 0; j < 2 * nq; ++j) {
        args[j] = tiny_min(h[j]);
    }
    for (int64_t r = 0; r < nq; ++r) {
        args[LOG_S(nq) + r] = tiny_min(h[2 * r] + h[2 * r + 1]);
        args[LOG_P(nq) + r] = tiny_min(max0(total - cum[nq + r]) + h[nq - 1 + r]);
    }
    for (int64_t r = 0; r <= nq; ++r) {
        args[LOG_CUM(nq) + r] = tiny_min(cum[nq + r] / total);
    }
    double out, s, n;
    last_pair(h, total, cum, nq, &out, &s, &n);
    args[LOG_LAST(nq)] = tiny_min(h[2 * nq - 1] + out);
    args[LOG_LAST(nq) + 1] = tiny_min(s / clamp_lo(n, 1.0));
    return last;
}

/* Second pass: the divergences of i = nq .. 2 nq (nq + 1 values) from the logarithms `lg` (log_h = lg[0 ..
 * 2 nq)), as kl_search._low_terms and kl_divergences (inf above J). */
FMA_CLONES
static void kl_finish_row(const double *restrict cnt, int64_t bins, int64_t nq, const double *restrict cum,
                          int64_t last, const double *restrict lg, double *restrict kl) {
    const double *h = cnt + 1;
    const double total = cum[bins], ln2 = log(2.0);
    double pairs = 0.0, before_last = 0.0; /* sum of the first r pairs; of the first nq - 1 */
    for (int64_t r = 0; r < nq; ++r) {
        /* top group of i = nq + r: bin i - 1, with the clipped mass */
        const double single = h[nq - 1 + r];
        const double p_last = max0(total - cum[nq + r]) + single;
        double top = p_last * (lg[LOG_P(nq) + r] - lg[nq - 1 + r]);
        if (single == 0.0) {
            top = INFINITY;
        }
        kl[r] = nq + r > last ? INFINITY : lg[LOG_CUM(nq) + r] + (pairs + top) / total;
        /* pair r: bins 2r, 2r + 1 */
        const double a = h[2 * r], b = h[2 * r + 1], s = a + b, ab = a * b;
        const double both = ab > 0.0 ? 1.0 : (ab < 0.0 ? -1.0 : ab);
        double d = fma(b, lg[2 * r + 1], a * lg[2 * r]);
        d = fma(-s, lg[LOG_S(nq) + r], d);
        d = fma(ln2 * s, both, d);
        before_last = pairs;
        pairs = pairs + d;
    }
    double out, s, n;
    last_pair(h, total, cum, nq, &out, &s, &n);
    const double a = h[2 * nq - 2], b = h[2 * nq - 1];
    double pair = a * lg[2 * nq - 2] + (b + out) * lg[LOG_LAST(nq)] - (s + out) * lg[LOG_LAST(nq) + 1];
    if (s == 0.0 && out > 0.0) {
        pair = INFINITY;
    }
    kl[nq] = 2 * nq > last ? INFINITY : lg[LOG_CUM(nq) + nq] + (before_last + pair) / total;
}

static PyObject *kl_args(PyObject *self, PyObject *args) {
    unsigned long long ca, cuma, la, aa;
    long long rows, cells, nq;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKLLLi", &ca, &cuma, &la, &aa, &rows, &cells, &nq, &threads)) {
        return NULL;
    }
    const double *counts = (const double *)(uintptr_t)ca;
    double *cum = (double *)(uintptr_t)cuma, *lg = (double *)(uintptr_t)aa;
    int64_t *last = (int64_t *)(uintptr_t)la;
    Py_BEGIN_ALLOW_THREADS
    const int team = team_size(rows, cells, threads);
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
    for (int64_t r = 0; r < rows; ++r) {
        last[r] = kl_args_row(counts + r * cells, cells - 1, nq, cum + r * cells, lg ? lg + r * LOG_ARGS(nq) : NULL);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *kl_finish(PyObject *self, PyObject *args) {
    unsigned long long ca, cuma, la, lga, ka;
    long long rows, cells, nq;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKLLLi", &ca, &cuma, &la, &lga, &ka, &rows, &cells, &nq, &threads)) {
        return NULL;
    }
    const double *counts = (const double *)(uintptr_t)ca, *cum = (const double *)(uintptr_t)cuma;
    const double *lg = (const double *)(uintptr_t)lga;
    const int64_t *last = (const int64_t *)(uintptr_t)la;
    double *kl = (double *)(uintptr_t)ka;
    Py_BEGIN_ALLOW_THREADS
    const int team = team_size(rows, cells, threads);
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
    for (int64_t r = 0; r < rows; ++r) {
        kl_finish_row(counts + r * cells, cells - 1, nq, cum + r * cells, last[r], lg + r * LOG_ARGS(nq),
                      kl + r * (nq + 1));
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* kl_threshold's tie-break for one row: returns the threshold. */
static double pick_row(const Row *row, const double *restrict kl, int64_t ncand, int64_t cand0, double amax,
                       int64_t last, int64_t nq, double qmax, double scale, double slack) {
    double lo = INFINITY;
    for (int64_t c = 0; c < ncand; ++c) { /* amin: NaN propagates */
        lo = (kl[c] < lo || isnan(kl[c])) && !isnan(lo) ? kl[c] : lo;
    }
    double bound = lo * scale + slack;
    bound = isnan(bound) ? 0.0 : (bound == INFINITY ? -1.0 : bound); /* nan_to_num_(posinf=-1.0) */
    const int64_t none = cand0 + ncand;
    int64_t pick = none;
    double low = INFINITY;
    for (int64_t c = 0; c < ncand; ++c) {
        if (!(kl[c] <= bound)) {
            continue;
        }
        const int64_t i = cand0 + c;
        const double err = mse_point(row, minimum((double)i * row->w, amax), qmax);
        if (isnan(err) || isnan(low)) { /* amin of the errors is NaN: no error equals it */
            low = NAN;
            pick = none;
        } else if (err < low) {
            low = err;
            pick = i;
        }
    }
    return last >= nq && pick < none ? minimum((double)pick * row->w, amax) : amax;
}

static PyObject *kl_pick(PyObject *self, PyObject *args) {
    unsigned long long ka, pa, ca, wa, aa, la, oa;
    long long ld, rows, cells, ncand, cand0, nq;
    double qmax, scale, slack;
    int threads;
    if (!PyArg_ParseTuple(args, "KLKKKKKKLLLLLdddi", &ka, &ld, &pa, &ca, &wa, &aa, &la, &oa, &rows, &cells, &ncand,
                          &cand0, &nq, &qmax, &scale, &slack, &threads)) {
        return NULL;
    }
    const double *kl = (const double *)(uintptr_t)ka, *pre = (const double *)(uintptr_t)pa;
    const double *counts = (const double *)(uintptr_t)ca, *w = (const double *)(uintptr_t)wa;
    const double *amax = (const double *)(uintptr_t)aa;
    const int64_t *last = (const int64_t *)(uintptr_t)la;
    double *out = (double *)(uintptr_t)oa;
    Py_BEGIN_ALLOW_THREADS
    const int team = team_size(rows, ncand, threads);
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const Row row = get_row(counts, pre, w, rows, cells, r);
        out[r] = pick_row(&row, kl + r * ld, ncand, cand0, amax[r], last[r], nq, qmax, scale, slack);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"moments", moments, METH_VARARGS,
     "moments(counts, width, pre, w, rows, cells, threads): pre (3, rows, cells) = prefix sums of count, "
     "|x| and x^2; w (rows,) = width where > 0, else 1."},
    {"edge_mse", edge_mse, METH_VARARGS,
     "edge_mse(pre, counts, w, out, arg, rows, cells, first, last, qmax, threads): out (rows, last - first + 1) "
     "= estimated error of the bin edges i * w; arg (rows,) int64 (0: skipped) = its argmin per row."},
    {"mse_at", mse_at, METH_VARARGS,
     "mse_at(pre, counts, w, row, t, out, rows, cells, n, per_row, qmax, threads): estimated error at t; "
     "row 0: t and out are (rows, per_row), else n thresholds with an int64 row index each."},
    {"kl_args", kl_args, METH_VARARGS,
     "kl_args(counts, cum, last, args, rows, cells, nq, threads): cum (rows, cells) = 0, then the prefix sums "
     "of counts[:, 1:]; last (rows,) int64 = J; args (rows, 5 nq + 3) = the arguments of the logarithms of "
     "the divergences of i = nq .. 2 nq, clamped at 1e-300 (args 0: skipped; needs cells > 2 nq)."},
    {"kl_finish", kl_finish, METH_VARARGS,
     "kl_finish(counts, cum, last, logs, kl, rows, cells, nq, threads): kl (rows, nq + 1) = divergences of "
     "i = nq .. 2 nq from kl_args' outputs, args replaced by their logarithms."},
    {"kl_pick", kl_pick, METH_VARARGS,
     "kl_pick(kl, ld, pre, counts, w, amax, last, out, rows, cells, ncand, cand0, nq, qmax, scale, slack, "
     "threads): out (rows,) = kl_threshold's threshold from the divergences kl (rows, ncand; row stride ld) "
     "of i = cand0 .. ."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_search_kernels",
                                    "Fused CPU kernels for the histogram threshold searches.", -1, methods};

PyMODINIT_FUNC PyInit__search_kernels(void) { return PyModule_Create(&module); }
