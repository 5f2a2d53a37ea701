/*
 * Fused CPU kernels for symmetric fake quantization (float32, contiguous).
 *
 * Built by setup.py as the optional extension ``qat_lightning.quant._kernels``; without a C compiler the
 * package falls back to the ATen formulas in ``functional.py``, which give the same values.
 *
 * forward:  v = x * (1 / s)  (float32, as torch's fake_quantize_per_tensor/per_channel_affine);
 *           out = clamp(v, qmin, qmax) rounded half to even, times s
 *           (rounding a value already clamped to integer bounds equals clamping the rounded value;
 *           half-to-even rounding is the 1.5 * 2**23 trick, exact for |v| <= 2**22, and it is the same
 *           rounding as ``torch.round``; NaN stays NaN, +-inf clamps to the bound);
 *           mask = qmin - 0.5 <= v < qmax + 0.5, i.e. qmin <= round(v) <= qmax for even qmin, as torch's
 *           cachemask (one byte per element: the straight-through gradient mask)
 * backward: grad_in = mask ? grad : 0
 * range:    (min, max) of a tensor, both NaN when a value is NaN or +-inf (the observer then re-checks)
 * weight:   per output channel of a QAT weight (optionally BN-folded, t = w * fold), the channel range,
 *           the scale max|t| / qmax and fake_quant(t) / fold, with the row in L1 between the two passes.
 *
 * One pass over memory each way. Pointers arrive as integers (``Tensor.data_ptr()``); the Python side checks
 * dtypes, shapes and contiguity. Work is split over ``threads`` POSIX threads for large tensors; the GIL
 * is released while the kernels run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <math.h>
#include <stdint.h>

#define MAGIC 12582912.0f /* 1.5 * 2**23 */
#define MIN_PER_THREAD 65536

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

typedef struct {
    const float *x;
    float *out;
    uint8_t *mask;
    const float *scale;
    int64_t rows, channels, inner; /* (rows, inner), row r uses scale[r % channels]; channels 1: flat */
    float qmin, qmax;
    const float *grad;
    int64_t begin, end; /* rows of this job */
} Job;

MULTIVERSION
static void quantize_row(const float *restrict x, float *restrict out, uint8_t *restrict mask, int64_t n,
                         float s, float qmin, float qmax) {
    const float inv = 1.0f / s;
    const float lo = qmin - 0.5f, hi = qmax + 0.5f;
    if (mask) {
        for (int64_t i = 0; i < n; ++i) {
            float v = x[i] * inv;
            mask[i] = (uint8_t)((v >= lo) & (v < hi));
            v = v < qmin ? qmin : v;
            v = v > qmax ? qmax : v;
            out[i] = ((v + MAGIC) - MAGIC) * s;
        }
    } else {
        for (int64_t i = 0; i < n; ++i) {
            float v = x[i] * inv;
            v = v < qmin ? qmin : v;
            v = v > qmax ? qmax : v;
            out[i] = ((v + MAGIC) - MAGIC) * s;
        }
    }
}

MULTIVERSION
static void mask_row(const float *restrict grad, const uint8_t *restrict mask, float *restrict out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        out[i] = mask[i] ? grad[i] : 0.0f;
    }
}

static void *forward_job(void *arg) {
    const Job *j = (const Job *)arg;
    if (j->channels == 1) { /* per tensor: a flat range of elements */
        quantize_row(j->x + j->begin, j->out + j->begin, j->mask ? j->mask + j->begin : NULL,
                     j->end - j->begin, j->scale[0], j->qmin, j->qmax);
        return NULL;
    }
    for (int64_t r = j->begin; r < j->end; ++r) {
        const int64_t off = r * j->inner;
        quantize_row(j->x + off, j->out + off, j->mask ? j->mask + off : NULL, j->inner,
                     j->scale[r % j->channels], j->qmin, j->qmax);
    }
    return NULL;
}

static void *backward_job(void *arg) {
    const Job *j = (const Job *)arg;
    mask_row(j->grad + j->begin, j->mask + j->begin, j->out + j->begin, j->end - j->begin);
    return NULL;
}

/* Run fn over the rows of base, split into at most `threads` jobs; the calling thread runs the first. */
static void run_split(void *(*fn)(void *), const Job *base, int threads) {
    int64_t total = base->rows * base->inner;
    int64_t useful = total / MIN_PER_THREAD;
    if (threads > 8) threads = 8;
    if (useful < threads) threads = (int)(useful > 1 ? useful : 1);
    if (threads > base->rows) threads = (int)base->rows;
    if (threads <= 1) {
        Job j = *base;
        j.begin = 0;
        j.end = base->rows;
        fn(&j);
        return;
    }
    const int64_t align = base->channels == 1 ? ~(int64_t)63 : ~(int64_t)0;
    Job jobs[8];
    pthread_t tids[8];
    int started[8] = {0};
    for (int t = 0; t < threads; ++t) {
        jobs[t] = *base;
        /* flat ranges split on multiples of 64 elements (cache lines, vector alignment) */
        jobs[t].begin = t == 0 ? 0 : (base->rows * t / threads) & align;
        jobs[t].end = t == threads - 1 ? base->rows : (base->rows * (t + 1) / threads) & align;
    }
    for (int t = 1; t < threads; ++t) {
        started[t] = pthread_create(&tids[t], NULL, fn, &jobs[t]) == 0;
    }
    fn(&jobs[0]);
    for (int t = 1; t < threads; ++t) {
        if (started[t]) {
            pthread_join(tids[t], NULL);
        } else {
            fn(&jobs[t]);
        }
    }
}

static PyObject *fake_quantize_forward(PyObject *self, PyObject *args) {
    unsigned long long x, out, mask, scale;
    long long outer, channels, inner;
    float qmin, qmax;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKLLLffi", &x, &out, &mask, &scale, &outer, &channels, &inner, &qmin,
                          &qmax, &threads)) {
        return NULL;
    }
    Job j = {0};
    j.x = (const float *)(uintptr_t)x;
    j.out = (float *)(uintptr_t)out;
    j.mask = (uint8_t *)(uintptr_t)mask;
    j.scale = (const float *)(uintptr_t)scale;
    j.qmin = qmin;
    j.qmax = qmax;
    if (channels == 1) { /* one scale: the whole tensor as a flat range of elements */
        j.channels = 1;
        j.rows = (int64_t)outer * inner;
        j.inner = 1;
    } else {
        j.channels = channels;
        j.rows = (int64_t)outer * channels;
        j.inner = inner;
    }
    Py_BEGIN_ALLOW_THREADS
    run_split(forward_job, &j, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *fake_quantize_backward(PyObject *self, PyObject *args) {
    unsigned long long grad, mask, out;
    long long n;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKLi", &grad, &mask, &out, &n, &threads)) {
        return NULL;
    }
    Job j = {0};
    j.grad = (const float *)(uintptr_t)grad;
    j.mask = (uint8_t *)(uintptr_t)mask;
    j.out = (float *)(uintptr_t)out;
    j.channels = 1;
    j.rows = n;
    j.inner = 1;
    Py_BEGIN_ALLOW_THREADS
    run_split(backward_job, &j, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- per-channel QAT weight: fold, channel range, scale, fake quant, unfold ---------------------------- */

typedef struct {
    const float *w, *fold;
    float *out, *lo, *hi, *scale;
    int64_t inner, begin, end;
    float qmin, qmax, eps;
} WeightJob;

/* Range of t = w * f (or w) over n elements; NaN/inf anywhere makes both results NaN (the caller checks).
 * LANES independent accumulators so the compiler vectorizes without reassociating floats. */
#define LANES 16
MULTIVERSION
static void channel_range(const float *restrict w, int64_t n, float f, int use_fold, float *lo_out,
                          float *hi_out) {
    float lo[LANES], hi[LANES], bad[LANES];
    for (int k = 0; k < LANES; ++k) {
        lo[k] = INFINITY;
        hi[k] = -INFINITY;
        bad[k] = 0.0f;
    }
    int64_t i = 0;
    if (use_fold) {
        for (; i + LANES <= n; i += LANES) {
            for (int k = 0; k < LANES; ++k) {
                const float t = w[i + k] * f;
                lo[k] = t < lo[k] ? t : lo[k];
                hi[k] = t > hi[k] ? t : hi[k];
                bad[k] += t - t; /* 0 for finite t, NaN for NaN/inf */
            }
        }
    } else {
        for (; i + LANES <= n; i += LANES) {
            for (int k = 0; k < LANES; ++k) {
                const float t = w[i + k];
                lo[k] = t < lo[k] ? t : lo[k];
                hi[k] = t > hi[k] ? t : hi[k];
                bad[k] += t - t;
            }
        }
    }
    for (int k = 0; i < n; ++i, ++k) {
        const float t = use_fold ? w[i] * f : w[i];
        lo[k] = t < lo[k] ? t : lo[k];
        hi[k] = t > hi[k] ? t : hi[k];
        bad[k] += t - t;
    }
    float l = lo[0], h = hi[0], e = bad[0];
    for (int k = 1; k < LANES; ++k) {
        l = lo[k] < l ? lo[k] : l;
        h = hi[k] > h ? hi[k] : h;
        e += bad[k];
    }
    *lo_out = l + e;
    *hi_out = h + e;
}

MULTIVERSION
static void channel_quantize(const float *restrict w, float *restrict out, int64_t n, float f, int use_fold,
                             float s, float qmin, float qmax) {
    if (!use_fold) {
        quantize_row(w, out, NULL, n, s, qmin, qmax);
        return;
    }
    const float inv = 1.0f / s;
    for (int64_t i = 0; i < n; ++i) {
        float v = (w[i] * f) * inv;
        v = v < qmin ? qmin : v;
        v = v > qmax ? qmax : v;
        out[i] = (((v + MAGIC) - MAGIC) * s) / f;
    }
}

static void *weight_job(void *arg) {
    const WeightJob *j = (const WeightJob *)arg;
    for (int64_t c = j->begin; c < j->end; ++c) {
        const float *w = j->w + c * j->inner;
        const int use_fold = j->fold != NULL;
        const float f = use_fold ? j->fold[c] : 1.0f;
        float lo, hi;
        channel_range(w, j->inner, f, use_fold, &lo, &hi);
        /* as torch: maximum(-lo, hi).clamp_min_(0).div_(qmax).clamp_min_(eps); NaN propagates */
        float s = (-lo > hi || hi != hi) ? -lo : hi;
        s = s < 0.0f ? 0.0f : s;
        s = s / j->qmax;
        s = s < j->eps ? j->eps : s;
        j->lo[c] = lo;
        j->hi[c] = hi;
        j->scale[c] = s;
        channel_quantize(w, j->out + c * j->inner, j->inner, f, use_fold, s, j->qmin, j->qmax);
    }
    return NULL;
}

static PyObject *fake_quantize_weight(PyObject *self, PyObject *args) {
    unsigned long long w, fold, out, lo, hi, scale;
    long long channels, inner;
    float qmin, qmax, eps;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKKLLfffi", &w, &fold, &out, &lo, &hi, &scale, &channels, &inner, &qmin,
                          &qmax, &eps, &threads)) {
        return NULL;
    }
    WeightJob base = {(const float *)(uintptr_t)w, (const float *)(uintptr_t)fold, (float *)(uintptr_t)out,
                      (float *)(uintptr_t)lo, (float *)(uintptr_t)hi, (float *)(uintptr_t)scale,
                      inner, 0, channels, qmin, qmax, eps};
    int64_t useful = channels * inner / MIN_PER_THREAD;
    if (threads > 8) threads = 8;
    if (useful < threads) threads = (int)(useful > 1 ? useful : 1);
    if (threads > channels) threads = (int)channels;
    WeightJob jobs[8];
    pthread_t tids[8];
    int started[8] = {0};
    Py_BEGIN_ALLOW_THREADS
    for (int t = 0; t < threads; ++t) {
        jobs[t] = base;
        jobs[t].begin = channels * t / threads;
        jobs[t].end = channels * (t + 1) / threads;
    }
    for (int t = 1; t < threads; ++t) started[t] = pthread_create(&tids[t], NULL, weight_job, &jobs[t]) == 0;
    weight_job(&jobs[0]);
    for (int t = 1; t < threads; ++t) {
        if (started[t]) {
            pthread_join(tids[t], NULL);
        } else {
            weight_job(&jobs[t]);
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- range of a whole tensor (the per-tensor observer update) ----------------------------------------- */

typedef struct {
    const float *x;
    int64_t begin, end;
    float lo, hi;
} RangeJob;

static void *range_job(void *arg) {
    RangeJob *j = (RangeJob *)arg;
    channel_range(j->x + j->begin, j->end - j->begin, 1.0f, 0, &j->lo, &j->hi);
    return NULL;
}

static PyObject *tensor_range(PyObject *self, PyObject *args) {
    unsigned long long x;
    long long n;
    int threads;
    if (!PyArg_ParseTuple(args, "KLi", &x, &n, &threads)) {
        return NULL;
    }
    int64_t useful = n / MIN_PER_THREAD;
    if (threads > 8) threads = 8;
    if (useful < threads) threads = (int)(useful > 1 ? useful : 1);
    RangeJob jobs[8];
    pthread_t tids[8];
    int started[8] = {0};
    Py_BEGIN_ALLOW_THREADS
    for (int t = 0; t < threads; ++t) {
        jobs[t].x = (const float *)(uintptr_t)x;
        jobs[t].begin = t == 0 ? 0 : (n * t / threads) & ~(int64_t)63;
        jobs[t].end = t == threads - 1 ? n : (n * (t + 1) / threads) & ~(int64_t)63;
    }
    for (int t = 1; t < threads; ++t) started[t] = pthread_create(&tids[t], NULL, range_job, &jobs[t]) == 0;
    range_job(&jobs[0]);
    for (int t = 1; t < threads; ++t) {
        if (started[t]) {
            pthread_join(tids[t], NULL);
        } else {
            range_job(&jobs[t]);
        }
    }
    Py_END_ALLOW_THREADS
    float lo = jobs[0].lo, hi = jobs[0].hi;
    for (int t = 1; t < threads; ++t) {
        lo = (jobs[t].lo < lo || jobs[t].lo != jobs[t].lo) ? jobs[t].lo : lo;
        hi = (jobs[t].hi > hi || jobs[t].hi != jobs[t].hi) ? jobs[t].hi : hi;
    }
    return Py_BuildValue("ff", lo, hi);
}

static PyMethodDef methods[] = {
    {"fake_quantize_forward", fake_quantize_forward, METH_VARARGS,
     "fake_quantize_forward(x, out, mask, scale, outer, channels, inner, qmin, qmax, threads): "
     "addresses of contiguous float32 x/out/scale and uint8 mask (0: no mask)."},
    {"fake_quantize_backward", fake_quantize_backward, METH_VARARGS,
     "fake_quantize_backward(grad, mask, out, n, threads): out = mask ? grad : 0."},
    {"fake_quantize_weight", fake_quantize_weight, METH_VARARGS,
     "fake_quantize_weight(w, fold, out, lo, hi, scale, channels, inner, qmin, qmax, eps, threads): per "
     "channel c of a contiguous (channels, inner) float32 weight, t = w * fold[c] (fold 0: none); lo/hi = "
     "range of t; scale = max(-lo, hi, 0) / qmax, at least eps; out = fake_quant(t, scale) / fold[c]."},
    {"tensor_range", tensor_range, METH_VARARGS,
     "tensor_range(x, n, threads) -> (min, max) of n contiguous float32 values; both NaN if any is NaN/inf."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "Fused fake-quant CPU kernels.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
