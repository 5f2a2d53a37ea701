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
 *           cachemask: the straight-through gradient mask, one bit per element for one scale (packed,
 *           little-endian bit order), one byte per element for per-channel scales
 * backward: grad_in = mask ? grad : 0
 * range:    with the one-scale forward, (min, max) of x from the same loop, both NaN when a value is NaN
 *           or +-inf
 * weight:   per output channel of a QAT weight (optionally BN-folded, t = w * fold), the channel range,
 *           the scale max|t| / qmax and fake_quant(t) / fold, with the row in L1 between the two passes.
 * record:   a QAT step's observer and scale bookkeeping on the host, on the node's CPU buffers: the
 *           ATen ops' float32 arithmetic (lerp's fused multiply-add included) on a handful of values.
 *
 * One pass over memory each way. Pointers arrive as integers (``Tensor.data_ptr()``); the Python side checks
 * dtypes, shapes and contiguity. The GIL is released while the kernels run. Large tensors are split over
 * ``threads`` OpenMP threads: torch's CPU wheels ship their OpenMP runtime as ``libgomp.so.1``, so once
 * torch is imported this module links to that same runtime and shares torch's thread pool.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAGIC 12582912.0f /* 1.5 * 2**23 */
#define MIN_PER_THREAD 65536
#define LANES 16

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

typedef float vfloat __attribute__((vector_size(4 * LANES)));
typedef int32_t vint __attribute__((vector_size(4 * LANES)));
#define VSELECT(m, a, b) ((vfloat)(((vint)(a) & (m)) | ((vint)(b) & ~(m))))

/* Threads worth using for `total` elements in `units` independent pieces. */
static int team_size(int64_t total, int64_t units, int threads) {
#ifdef _OPENMP
    int64_t useful = total / MIN_PER_THREAD;
    int64_t team = threads < useful ? threads : useful;
    team = team < units ? team : units;
    team = team < 64 ? team : 64; /* per-thread result arrays hold 64 */
    return team > 1 ? (int)team : 1;
#else
    (void)total;
    (void)units;
    (void)threads;
    return 1;
#endif
}

/* Piece t of n elements split in `team` pieces on multiples of 64 elements (cache lines). */
static void flat_piece(int64_t n, int t, int team, int64_t *begin, int64_t *end) {
    *begin = t == 0 ? 0 : (n * t / team) & ~(int64_t)63;
    *end = t == team - 1 ? n : (n * (t + 1) / team) & ~(int64_t)63;
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static int team_threads(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* ---- ranges ------------------------------------------------------------------------------------------ */

/* Range of t = w * f (or w) over n elements; NaN/inf anywhere makes both results NaN (the caller checks).
 * GCC/Clang vector types (16 lanes, lowered to the clone's ISA) vectorize the min/max reductions without
 * reassociating floats. */
MULTIVERSION
static void channel_range(const float *restrict w, int64_t n, float f, int use_fold, float *lo_out,
                          float *hi_out) {
    vfloat lo, hi, bad = {0};
    for (int k = 0; k < LANES; ++k) {
        lo[k] = INFINITY;
        hi[k] = -INFINITY;
    }
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        vfloat t;
        memcpy(&t, w + i, sizeof t);
        if (use_fold) t *= f;
        lo = VSELECT(t < lo, t, lo);
        hi = VSELECT(t > hi, t, hi);
        bad += t - t; /* 0 for finite t, NaN for NaN/inf */
    }
    float l = lo[0], h = hi[0], e = bad[0];
    for (int k = 1; k < LANES; ++k) {
        l = lo[k] < l ? lo[k] : l;
        h = hi[k] > h ? hi[k] : h;
        e += bad[k];
    }
    for (; i < n; ++i) {
        const float t = use_fold ? w[i] * f : w[i];
        l = t < l ? t : l;
        h = t > h ? t : h;
        e += t - t;
    }
    *lo_out = l + e;
    *hi_out = h + e;
}

/* ---- activations: forward and backward ------------------------------------------------------------- */

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

/* Fold a piece's range [l, h] into range[0..1]; NaN (a NaN/inf in a piece) wins. */
static void merge_range(float *range, float l, float h) {
    range[0] = (l < range[0] || l != l) ? l : range[0];
    range[1] = (h > range[1] || h != h) ? h : range[1];
}

/* Per-tensor rows with a bit-packed mask: bit i of the mask is element i (little-endian bytes). `x`, `out`
 * and `bits` start at an element index that is a multiple of 64 (whole mask bytes per thread). With `range`
 * (not NULL) the rows' [min, max] of x is merged into it in the same loop (NaN for a NaN/inf). */
static const vint BIT_WEIGHTS = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768};

MULTIVERSION
static int quantize_row_bits_generic(const float *restrict x, float *restrict out, uint8_t *restrict bits, int64_t n,
                                     float s, float qmin, float qmax, float *range) {
    const float inv = 1.0f / s;
    const float lo = qmin - 0.5f, hi = qmax + 0.5f;
    int clipped = 0; /* any mask bit 0 */
    vfloat vmin = {0}, vmax = {0}, bad = {0};
    vmin += INFINITY;
    vmax -= INFINITY;
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        vfloat v;
        memcpy(&v, x + i, sizeof v);
        if (range) {
            vmin = VSELECT(v < vmin, v, vmin);
            vmax = VSELECT(v > vmax, v, vmax);
            bad += v - v; /* 0 for finite v, NaN for NaN/inf */
        }
        v *= inv;
        const vint keep = (v >= lo) & (v < hi);
        v = VSELECT(v < qmin, (vfloat){0} + qmin, v);
        v = VSELECT(v > qmax, (vfloat){0} + qmax, v);
        v = ((v + MAGIC) - MAGIC) * s;
        memcpy(out + i, &v, sizeof v);
        const vint weighted = keep & BIT_WEIGHTS;
        int32_t word = 0;
        for (int k = 0; k < LANES; ++k) word |= weighted[k];
        bits[i / 8] = (uint8_t)word;
        bits[i / 8 + 1] = (uint8_t)(word >> 8);
        clipped |= word != 0xFFFF;
    }
    float l = vmin[0], h = vmax[0], e = bad[0];
    for (int k = 1; k < LANES; ++k) {
        l = vmin[k] < l ? vmin[k] : l;
        h = vmax[k] > h ? vmax[k] : h;
        e += bad[k];
    }
    for (; i < n; ++i) {
        l = x[i] < l ? x[i] : l;
        h = x[i] > h ? x[i] : h;
        e += x[i] - x[i];
        float v = x[i] * inv;
        const int keep = (v >= lo) & (v < hi);
        v = v < qmin ? qmin : v;
        v = v > qmax ? qmax : v;
        out[i] = ((v + MAGIC) - MAGIC) * s;
        if ((i & 7) == 0) bits[i / 8] = 0;
        bits[i / 8] |= (uint8_t)(keep << (i & 7));
        clipped |= !keep;
    }
    if (range) merge_range(range, l + e, h + e);
    return clipped;
}

MULTIVERSION
static void mask_row_bits_generic(const float *restrict grad, const uint8_t *restrict bits, float *restrict out,
                          int64_t n) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        vfloat g;
        memcpy(&g, grad + i, sizeof g);
        const int32_t word = bits[i / 8] | (bits[i / 8 + 1] << 8);
        const vint keep = (((vint){0} + word) & BIT_WEIGHTS) != 0;
        g = (vfloat)((vint)g & keep);
        memcpy(out + i, &g, sizeof g);
    }
    for (; i < n; ++i) {
        out[i] = (bits[i / 8] >> (i & 7)) & 1 ? grad[i] : 0.0f;
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_X86_BITS 1

/* AVX-512 / AVX2 versions of the bit-mask rows: the comparison masks are the mask bits (no lane-by-lane
 * packing). Same values as the generic code: max/min return their second operand (v) for NaN, and
 * round-to-nearest-even rounding equals the 1.5 * 2**23 trick on clamped values (only the sign of a zero
 * may differ, -0.0 == 0.0). */
__attribute__((target("avx512f"))) static int quantize_row_bits_avx512(const float *x, float *out,
                                                                      uint8_t *bits, int64_t n, float s,
                                                                      float qmin, float qmax, float *range) {
    const __m512 inv = _mm512_set1_ps(1.0f / s), vs = _mm512_set1_ps(s);
    const __m512 lo = _mm512_set1_ps(qmin - 0.5f), hi = _mm512_set1_ps(qmax + 0.5f);
    const __m512 vqmin = _mm512_set1_ps(qmin), vqmax = _mm512_set1_ps(qmax);
    __m512 vmin = _mm512_set1_ps(INFINITY), vmax = _mm512_set1_ps(-INFINITY), bad = _mm512_setzero_ps();
    __mmask16 all = 0xFFFF;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 xv = _mm512_loadu_ps(x + i);
        if (range) { /* a NaN lane may be lost by min / max: `bad` keeps it */
            vmin = _mm512_min_ps(vmin, xv);
            vmax = _mm512_max_ps(vmax, xv);
            bad = _mm512_add_ps(bad, _mm512_sub_ps(xv, xv));
        }
        __m512 v = _mm512_mul_ps(xv, inv);
        __mmask16 keep = _mm512_cmp_ps_mask(v, lo, _CMP_GE_OQ);
        keep &= _mm512_cmp_ps_mask(v, hi, _CMP_LT_OQ);
        v = _mm512_min_ps(vqmax, _mm512_max_ps(vqmin, v));
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm512_storeu_ps(out + i, _mm512_mul_ps(v, vs));
        memcpy(bits + i / 8, &keep, 2);
        all &= keep;
    }
    if (range) {
        const float e = _mm512_reduce_add_ps(bad);
        merge_range(range, _mm512_reduce_min_ps(vmin) + e, _mm512_reduce_max_ps(vmax) + e);
    }
    return (all != 0xFFFF) | quantize_row_bits_generic(x + i, out + i, bits + i / 8, n - i, s, qmin, qmax, range);
}

__attribute__((target("avx512f"))) static void mask_row_bits_avx512(const float *grad, const uint8_t *bits,
                                                                  float *out, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __mmask16 keep;
        memcpy(&keep, bits + i / 8, 2);
        _mm512_storeu_ps(out + i, _mm512_maskz_mov_ps(keep, _mm512_loadu_ps(grad + i)));
    }
    mask_row_bits_generic(grad + i, bits + i / 8, out + i, n - i);
}

__attribute__((target("avx2"))) static int quantize_row_bits_avx2(const float *x, float *out, uint8_t *bits,
                                                                 int64_t n, float s, float qmin, float qmax,
                                                                 float *range) {
    const __m256 inv = _mm256_set1_ps(1.0f / s), vs = _mm256_set1_ps(s);
    const __m256 lo = _mm256_set1_ps(qmin - 0.5f), hi = _mm256_set1_ps(qmax + 0.5f);
    const __m256 vqmin = _mm256_set1_ps(qmin), vqmax = _mm256_set1_ps(qmax);
    __m256 vmin = _mm256_set1_ps(INFINITY), vmax = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();
    int all = 0xFF;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 xv = _mm256_loadu_ps(x + i);
        if (range) { /* a NaN lane may be lost by min / max: `bad` keeps it */
            vmin = _mm256_min_ps(vmin, xv);
            vmax = _mm256_max_ps(vmax, xv);
            bad = _mm256_add_ps(bad, _mm256_sub_ps(xv, xv));
        }
        __m256 v = _mm256_mul_ps(xv, inv);
        const __m256 low = _mm256_cmp_ps(v, lo, _CMP_GE_OQ);
        const int keep = _mm256_movemask_ps(_mm256_and_ps(low, _mm256_cmp_ps(v, hi, _CMP_LT_OQ)));
        bits[i / 8] = (uint8_t)keep;
        all &= keep;
        v = _mm256_min_ps(vqmax, _mm256_max_ps(vqmin, v));
        v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_ps(out + i, _mm256_mul_ps(v, vs));
    }
    if (range) {
        float l[8], h[8], e[8];
        _mm256_storeu_ps(l, vmin);
        _mm256_storeu_ps(h, vmax);
        _mm256_storeu_ps(e, bad);
        for (int k = 1; k < 8; ++k) {
            l[0] = l[k] < l[0] ? l[k] : l[0];
            h[0] = h[k] > h[0] ? h[k] : h[0];
            e[0] += e[k];
        }
        merge_range(range, l[0] + e[0], h[0] + e[0]);
    }
    return (all != 0xFF) | quantize_row_bits_generic(x + i, out + i, bits + i / 8, n - i, s, qmin, qmax, range);
}

__attribute__((target("avx2"))) static void mask_row_bits_avx2(const float *grad, const uint8_t *bits,
                                                              float *out, int64_t n) {
    const __m256i weights = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i byte = _mm256_set1_epi32(bits[i / 8]);
        const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(byte, weights), weights);
        _mm256_storeu_ps(out + i, _mm256_and_ps(_mm256_castsi256_ps(keep), _mm256_loadu_ps(grad + i)));
    }
    mask_row_bits_generic(grad + i, bits + i / 8, out + i, n - i);
}
#endif

typedef int (*QuantizeBitsFn)(const float *, float *, uint8_t *, int64_t, float, float, float, float *);
typedef void (*MaskBitsFn)(const float *, const uint8_t *, float *, int64_t);
static QuantizeBitsFn quantize_row_bits = quantize_row_bits_generic;
static MaskBitsFn mask_row_bits = mask_row_bits_generic;

static const char *bit_kernels_isa = "generic";

/* Pick the bit-mask rows for this CPU once, at import; QAT_LIGHTNING_KERNEL_ISA=avx2|generic caps the
 * choice (tests run every available one against the ATen formulas). */
static void select_bit_kernels(void) {
#ifdef HAVE_X86_BITS
    const char *cap = getenv("QAT_LIGHTNING_KERNEL_ISA");
    const int allow512 = cap == NULL || strcmp(cap, "avx512") == 0;
    const int allow2 = allow512 || strcmp(cap, "avx2") == 0;
    __builtin_cpu_init();
    if (allow512 && __builtin_cpu_supports("avx512f")) {
        quantize_row_bits = quantize_row_bits_avx512;
        mask_row_bits = mask_row_bits_avx512;
        bit_kernels_isa = "avx512";
    } else if (allow2 && __builtin_cpu_supports("avx2")) {
        quantize_row_bits = quantize_row_bits_avx2;
        mask_row_bits = mask_row_bits_avx2;
        bit_kernels_isa = "avx2";
    }
#endif
}

/* Forward of one piece of a one-scale tensor; with `range` (initially [inf, -inf]) its [min, max] is merged
 * into it: inside the bit kernels' loop, or without a mask (no gradient) block by block, so that each block is
 * read from memory once (the range pass reads it into L1, the quantize pass reads it there). */
#define RANGE_BLOCK 4096 /* elements: 16 KiB */
static int quantize_piece(const float *x, float *out, uint8_t *mask, int64_t n, float s, float qmin, float qmax,
                          float *range) {
    if (mask) return quantize_row_bits(x, out, mask, n, s, qmin, qmax, range);
    for (int64_t b = 0; b < n; b += RANGE_BLOCK) {
        const int64_t m = n - b < RANGE_BLOCK ? n - b : RANGE_BLOCK;
        if (range) {
            float bl, bh;
            channel_range(x + b, m, 1.0f, 0, &bl, &bh);
            merge_range(range, bl, bh);
        }
        quantize_row(x + b, out + b, NULL, m, s, qmin, qmax);
    }
    return 1;
}

static PyObject *fake_quantize_forward(PyObject *self, PyObject *args) {
    unsigned long long xa, outa, maska, scalea;
    long long outer, channels, inner;
    float qmin, qmax;
    int threads, want_range = 0;
    if (!PyArg_ParseTuple(args, "KKKKLLLffi|p", &xa, &outa, &maska, &scalea, &outer, &channels, &inner, &qmin,
                          &qmax, &threads, &want_range)) {
        return NULL;
    }
    if (want_range && channels != 1) {
        PyErr_SetString(PyExc_ValueError, "fake_quantize_forward: the range is only taken with one scale");
        return NULL;
    }
    const float *x = (const float *)(uintptr_t)xa, *scale = (const float *)(uintptr_t)scalea;
    float *out = (float *)(uintptr_t)outa;
    uint8_t *mask = (uint8_t *)(uintptr_t)maska;
    const int64_t n = (int64_t)outer * channels * inner;
    int clipped = 1; /* per channel (byte masks): not tracked */
    float lo[64], hi[64];
    int used = 1;
    Py_BEGIN_ALLOW_THREADS
    if (channels == 1) { /* one scale: the tensor as one flat range */
        const int team = team_size(n, n / 64 + 1, threads);
        int piece_clipped[64] = {0};
#pragma omp parallel num_threads(team) if (team > 1)
        {
            int64_t b, e;
            const int t = thread_id();
            float range[2] = {INFINITY, -INFINITY};
            if (t == 0) used = team_threads();
            flat_piece(n, t, team_threads(), &b, &e);
            piece_clipped[t] = quantize_piece(x + b, out + b, mask ? mask + b / 8 : NULL, e - b, scale[0], qmin,
                                              qmax, want_range ? range : NULL);
            lo[t] = range[0];
            hi[t] = range[1];
        }
        clipped = 0;
        for (int t = 0; t < team; ++t) clipped |= piece_clipped[t];
    } else { /* rows of `inner` elements, row r uses scale[r % channels] */
        const int64_t rows = (int64_t)outer * channels;
        const int team = team_size(n, rows, threads);
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t off = r * inner;
            quantize_row(x + off, out + off, mask ? mask + off : NULL, inner, scale[r % channels], qmin, qmax);
        }
    }
    Py_END_ALLOW_THREADS
    if (!want_range) return PyBool_FromLong(clipped);
    float l = lo[0], h = hi[0];
    for (int t = 1; t < used; ++t) { /* NaN in any piece wins */
        l = (lo[t] < l || lo[t] != lo[t]) ? lo[t] : l;
        h = (hi[t] > h || hi[t] != hi[t]) ? hi[t] : h;
    }
    return Py_BuildValue("Nff", PyBool_FromLong(clipped), l, h);
}

static PyObject *fake_quantize_backward(PyObject *self, PyObject *args) {
    unsigned long long grada, maska, outa;
    long long n;
    int packed, threads;
    if (!PyArg_ParseTuple(args, "KKKLpi", &grada, &maska, &outa, &n, &packed, &threads)) {
        return NULL;
    }
    const float *grad = (const float *)(uintptr_t)grada;
    const uint8_t *mask = (const uint8_t *)(uintptr_t)maska;
    float *out = (float *)(uintptr_t)outa;
    Py_BEGIN_ALLOW_THREADS
    const int team = team_size(n, n / 64 + 1, threads);
#pragma omp parallel num_threads(team) if (team > 1)
    {
        int64_t b, e;
        flat_piece(n, thread_id(), team_threads(), &b, &e);
        if (packed) {
            mask_row_bits(grad + b, mask + b / 8, out + b, e - b);
        } else {
            mask_row(grad + b, mask + b, out + b, e - b);
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- per-channel QAT weight: fold, channel range, scale, fake quant, unfold ---------------------------- */

/* The row's fake quant, as the ATen path computes it: without a fold clamp(round(w * (1 / s))) * s; with a
 * fold f clamp(round(w * (f / s))) * (s / f) (each product rounded once). */
MULTIVERSION
static void channel_quantize(const float *restrict w, float *restrict out, int64_t n, float f, int use_fold,
                             float s, float qmin, float qmax) {
    if (!use_fold) {
        quantize_row(w, out, NULL, n, s, qmin, qmax);
        return;
    }
    const float a = f / s, b = s / f;
    for (int64_t i = 0; i < n; ++i) {
        float v = w[i] * a;
        v = v < qmin ? qmin : v;
        v = v > qmax ? qmax : v;
        out[i] = ((v + MAGIC) - MAGIC) * b;
    }
}

static PyObject *fake_quantize_weight(PyObject *self, PyObject *args) {
    unsigned long long wa, folda, outa, loa, hia, olda, scalea;
    long long channels, inner;
    float qmin, qmax, eps;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKKKLLfffi", &wa, &folda, &outa, &loa, &hia, &olda, &scalea, &channels,
                          &inner, &qmin, &qmax, &eps, &threads)) {
        return NULL;
    }
    const float *w = (const float *)(uintptr_t)wa, *fold = (const float *)(uintptr_t)folda;
    const float *old = (const float *)(uintptr_t)olda;
    float *out = (float *)(uintptr_t)outa, *lo = (float *)(uintptr_t)loa, *hi = (float *)(uintptr_t)hia;
    float *scale = (float *)(uintptr_t)scalea;
    Py_BEGIN_ALLOW_THREADS
    const int team = team_size((int64_t)channels * inner, channels, threads);
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
    for (int64_t c = 0; c < channels; ++c) {
        const float *row = w + c * inner;
        const float f = fold ? fold[c] : 1.0f;
        float l, h;
        channel_range(row, inner, f, fold != NULL, &l, &h);
        /* as the ATen path: maximum(-lo, hi) / qmax, at least eps; a row with NaN/inf (l, h NaN) keeps its
         * old scale */
        float s = -l > h ? -l : h;
        s = s / qmax;
        s = s < eps ? eps : s;
        s = l == l ? s : old[c];
        lo[c] = l;
        hi[c] = h;
        scale[c] = s;
        channel_quantize(row, out + c * inner, inner, f, fold != NULL, s, qmin, qmax);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- a QAT step's observer bookkeeping, on the host (eager mode, CPU buffers) ---------------------------- */

/* One row of Observer._record_range: a finite batch range [l, h] (not NaN, amax = max(-l, h) finite) widens
 * the running [min, max] (as torch.minimum / maximum: the old value unless the new one is beyond it).
 * Returns whether the row was finite; *amax is its max(-l, h) (0 when not finite). */
static int record_row(float l, float h, float *min, float *max, float *amax) {
    const float a = l != l || h != h ? NAN : (-l > h ? -l : h);
    if (!(fabsf(a) < INFINITY)) {
        *amax = 0.0f;
        return 0;
    }
    *min = l < *min ? l : *min;
    *max = *max < h ? h : *max;
    *amax = a;
    return 1;
}

/* torch.lerp(s, e, w) on float32 as ATen computes it (a fused multiply-add in either branch). */
static float lerp_as_aten(float s, float e, float w) {
    const float diff = e - s;
    return fabsf(w) < 0.5f ? fmaf(w, diff, s) : fmaf(-diff, 1.0f - w, e);
}

/* MovingMinMaxObserver's averages of a finite row: the first value taken as is, later ones lerp'ed. */
static float moved_average(float avg, float v, float c) {
    return isinf(avg) ? v : lerp_as_aten(avg, v, c);
}

static PyObject *record_moving_step(PyObject *self, PyObject *args) {
    unsigned long long mina, maxa, avg_mina, avg_maxa, batchesa, nonfinitea, readya, scalea;
    float l, h, avg_c, c, qmax, eps;
    if (!PyArg_ParseTuple(args, "ffKKKKfKKKKfff", &l, &h, &mina, &maxa, &avg_mina, &avg_maxa, &avg_c, &batchesa,
                          &nonfinitea, &readya, &scalea, &c, &qmax, &eps)) {
        return NULL;
    }
    float amax, *scale = (float *)(uintptr_t)scalea;
    float *avg_min = (float *)(uintptr_t)avg_mina, *avg_max = (float *)(uintptr_t)avg_maxa;
    const int finite = record_row(l, h, (float *)(uintptr_t)mina, (float *)(uintptr_t)maxa, &amax);
    *(int64_t *)(uintptr_t)batchesa += finite;
    *(int64_t *)(uintptr_t)nonfinitea += !finite;
    if (finite) {
        if (avg_min) {
            *avg_min = moved_average(*avg_min, l, avg_c);
            *avg_max = moved_average(*avg_max, h, avg_c);
        }
        float batch = amax / qmax;
        batch = batch < eps ? eps : batch;
        *scale = lerp_as_aten(*scale, batch, c);
        *(uint8_t *)(uintptr_t)readya = 1;
    }
    Py_RETURN_NONE;
}

static PyObject *record_rows(PyObject *self, PyObject *args) {
    unsigned long long loa, hia, mina, maxa, avg_mina, avg_maxa, batchesa, nonfinitea, readya;
    long long rows;
    float avg_c;
    if (!PyArg_ParseTuple(args, "KKLKKKKfKKK", &loa, &hia, &rows, &mina, &maxa, &avg_mina, &avg_maxa, &avg_c,
                          &batchesa, &nonfinitea, &readya)) {
        return NULL;
    }
    const float *lo = (const float *)(uintptr_t)loa, *hi = (const float *)(uintptr_t)hia;
    float *min = (float *)(uintptr_t)mina, *max = (float *)(uintptr_t)maxa, amax;
    float *avg_min = (float *)(uintptr_t)avg_mina, *avg_max = (float *)(uintptr_t)avg_maxa;
    int any = 0, all = 1;
    for (int64_t r = 0; r < rows; ++r) {
        const int finite = record_row(lo[r], hi[r], min + r, max + r, &amax);
        if (finite && avg_min) {
            avg_min[r] = moved_average(avg_min[r], lo[r], avg_c);
            avg_max[r] = moved_average(avg_max[r], hi[r], avg_c);
        }
        any |= finite;
        all &= finite;
    }
    *(int64_t *)(uintptr_t)batchesa += any;
    *(int64_t *)(uintptr_t)nonfinitea += !all;
    if (all) *(uint8_t *)(uintptr_t)readya = 1;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fake_quantize_forward", fake_quantize_forward, METH_VARARGS,
     "fake_quantize_forward(x, out, mask, scale, outer, channels, inner, qmin, qmax, threads, range=False): "
     "addresses of contiguous float32 x/out/scale and the mask (0: no mask): ceil(n / 8) bytes of bits when "
     "channels == 1, else n bytes. Returns False when a bit mask has no zero (nothing clipped), else True; "
     "with range (one scale only) (clipped, min, max) of x, min and max NaN if x holds NaN/inf."},
    {"fake_quantize_backward", fake_quantize_backward, METH_VARARGS,
     "fake_quantize_backward(grad, mask, out, n, packed, threads): out = mask ? grad : 0 (packed: bit mask)."},
    {"fake_quantize_weight", fake_quantize_weight, METH_VARARGS,
     "fake_quantize_weight(w, fold, out, lo, hi, old, scale, channels, inner, qmin, qmax, eps, threads): per "
     "channel c of a contiguous (channels, inner) float32 weight, t = w * fold[c] (fold 0: none); lo/hi = "
     "range of t (NaN if t holds NaN/inf); scale = max(-lo, hi) / qmax, at least eps (old[c] for a NaN "
     "range); out = clamp(round(w * (fold / scale))) * (scale / fold) (no fold: as fake_quantize_forward)."},
    {"record_moving_step", record_moving_step, METH_VARARGS,
     "record_moving_step(lo, hi, min, max, avg_min, avg_max, avg_c, num_batches, nonfinite_batches, ready, "
     "scale, c, qmax, eps): a per-tensor QAT node's step after its forward: the batch range [lo, hi] (NaN: "
     "NaN/inf in the batch) is recorded as Observer.record_extremes records it (float32 min / max, int64 "
     "counters; with avg_min / avg_max, not 0, MovingMinMaxObserver's averages too) and the scale moves as "
     "FakeQuantize._qat_forward moves it (scale = lerp(scale, max(amax / qmax, eps), c); ready set)."},
    {"record_rows", record_rows, METH_VARARGS,
     "record_rows(lo, hi, rows, min, max, avg_min, avg_max, avg_c, num_batches, nonfinite_batches, ready): "
     "per-row ranges of a weight step recorded as Observer.record_extremes records them (with avg_min / "
     "avg_max, not 0, MovingMinMaxObserver's averages too); ready set when every row was finite."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "Fused fake-quant CPU kernels.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    select_bit_kernels();
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "BIT_KERNELS_ISA", bit_kernels_isa) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
