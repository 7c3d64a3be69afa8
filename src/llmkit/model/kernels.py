"""llmkit's own CPU kernels: matmuls for int8 and int4 weights (y = x W^T, W = (q - zero) * scale per group),
and the fp32 pieces of a decode step (`f32_mm` for a few rows, `rms_norm`, one-query `decode_attention`).

fp32 (decode, batch 1): one weight row at a time, a single contiguous stream per thread, reads the weights
at the memory-read floor where PyTorch's single-row products did not (docs/benchmarks.md); RMSNorm and
the one-query attention are one C call each instead of several small torch ops.

Why (measured on the dev box's AMD EPYC, 1 thread, batch 1): PyTorch's `_weight_int8pack_mm` runs its
vectorised path only with bf16 activations and scales (a rounding step on each) and still reads the
weights at about half llama.cpp q8_0's speed. This kernel quantizes each activation row to int16
(one fp32 scale per row, 15 bits: 256x finer than llama.cpp's int8 activations) and multiplies with
integer dot products (AVX-512 VNNI `vpdpwssd`, AVX-512BW / AVX2 `vpmaddwd`, or plain C), exact int32
sums per weight group, fp32 scales. Group-wise weights (`G` groups of K / G inputs) run at the same
speed as per-channel ones.

The C source is compiled with the system C compiler (`cc`, `-O3 -march=native -fopenmp`, ~5 s) on first
use and cached under `~/.cache/llmkit/kernels` (or `$LLMKIT_KERNEL_DIR`); without a compiler, or with
`LLMKIT_NO_KERNELS=1`, `available()` is False (a warning says why once) and the quantized kinds, the
packed-for-decode Linear, RMSNorm and attention run PyTorch's kernels. int8/int4 weights are prefetched
8 KB ahead in software: a row is only K bytes (512 on the benchmark model), too short for the hardware
prefetcher to ramp up (~1.4x on the int8 decode).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

C_SOURCE = r"""
#include <stdint.h>
#include <math.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#define INLINE static inline __attribute__((always_inline))
#define Z512 _mm512_setzero_si512()
#define Z256 _mm256_setzero_si256()
#ifndef F32_NTA
#define F32_NTA 2048   /* fp32 kernel: the weights are prefetched non-temporally this far ahead (~5% faster decode
                          steps: less of the cache the rest of the step uses is evicted) */
#endif
#ifndef ATT_PF
#define ATT_PF 8       /* decode attention: keys prefetched this many rows ahead (0: none) */
#endif
#define PF_BYTES 8192  /* software prefetch distance: rows are short (K bytes), too short for the hardware to ramp up */
#define XMAX 16383.0f  /* int16 activations within +-2^14 */
#define CHUNK 8192     /* inputs summed in int32 lanes before fp32: 8 or more lanes, each summing at most
                          1024 products of |127 * 16383|, stays below 2^31 */
#if defined(__AVX512BW__) && defined(__AVX512F__)
#define W512 1
#endif

/* x [M, K] fp32 -> xq [M, Kp] int16 (zero padded), xs [M] fp32: x ~= xq * xs */
void llmkit_quant_rows(const float* x, int64_t M, int64_t K, int64_t Kp, int16_t* xq, float* xs) {
    for (int64_t m = 0; m < M; m++) {
        const float* r = x + m * K;
        float amax = 0.f;
        for (int64_t k = 0; k < K; k++) { float a = fabsf(r[k]); amax = a > amax ? a : amax; }
        float s = amax > 0.f ? amax / XMAX : 1.f, inv = 1.f / s;
        int16_t* q = xq + m * Kp;
        for (int64_t k = 0; k < K; k++) q[k] = (int16_t)lrintf(r[k] * inv);
        for (int64_t k = K; k < Kp; k++) q[k] = 0;
        xs[m] = s;
    }
}

/* sum_k w[k] * x[k] for n rows of w (row stride ldw) at once, len a multiple of 32: int32 */
static inline void dot4(const int8_t* w, int64_t ldw, const int16_t* x, int64_t len, int n, int32_t* out) {
#if defined(__AVX512BW__)
    __m512i acc[4] = {Z512, Z512, Z512, Z512};
    for (int64_t k = 0; k < len; k += 32) {
        __m512i xv = _mm512_loadu_si512((const void*)(x + k));
        for (int r = 0; r < n; r++) {
            if ((k & 63) == 0) _mm_prefetch((const char*)(w + r * ldw + k + PF_BYTES), _MM_HINT_T0);
            __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + r * ldw + k)));
#if defined(__AVX512VNNI__)
            acc[r] = _mm512_dpwssd_epi32(acc[r], wv, xv);
#else
            acc[r] = _mm512_add_epi32(acc[r], _mm512_madd_epi16(wv, xv));
#endif
        }
    }
    for (int r = 0; r < n; r++) out[r] = _mm512_reduce_add_epi32(acc[r]);
#elif defined(__AVX2__)
    __m256i acc[4] = {Z256, Z256, Z256, Z256};
    for (int64_t k = 0; k < len; k += 16) {
        __m256i xv = _mm256_loadu_si256((const __m256i*)(x + k));
        for (int r = 0; r < n; r++) {
            if ((k & 63) == 0) _mm_prefetch((const char*)(w + r * ldw + k + PF_BYTES), _MM_HINT_T0);
            __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + r * ldw + k)));
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(wv, xv));
        }
    }
    for (int r = 0; r < n; r++) {
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc[r]), _mm256_extracti128_si256(acc[r], 1));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
        out[r] = _mm_cvtsi128_si32(s);
    }
#else
    for (int r = 0; r < n; r++) {
        int64_t s = 0;
        for (int64_t k = 0; k < len; k++) s += (int32_t)w[r * ldw + k] * (int32_t)x[k];
        out[r] = (int32_t)s;
    }
#endif
}

/* y [M, N] = (xq [M, Kp] * xs) W^T, W = w [N, Kp] int8 * ws [N, G] (groups of Kp / G inputs) */
void llmkit_int8_mm(const int16_t* xq, const float* xs, const int8_t* w, const float* ws, float* y,
                    int64_t M, int64_t N, int64_t Kp, int64_t G, int nthreads) {
    const int64_t g = Kp / G, nb = (N + 3) / 4;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t b = 0; b < nb; b++) {
        const int64_t n0 = b * 4;
        const int n = (int)(N - n0 < 4 ? N - n0 : 4);
        for (int64_t m = 0; m < M; m++) {
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
            int32_t part[4];
            for (int64_t gi = 0; gi < G; gi++) {
                for (int64_t c = 0; c < g; c += CHUNK) {
                    const int64_t len = g - c < CHUNK ? g - c : CHUNK;
                    dot4(w + n0 * Kp + gi * g + c, Kp, xq + m * Kp + gi * g + c, len, n, part);
                    for (int r = 0; r < n; r++) acc[r] += (float)part[r] * ws[(n0 + r) * G + gi];
                }
            }
            for (int r = 0; r < n; r++) y[m * N + n0 + r] = acc[r] * xs[m];
        }
    }
}

/* ---- int4: codes two per byte (low nibble = even input). Inputs are reordered per block of PB inputs as
   [PB/2 even, PB/2 odd] so that one widened load of PB/2 bytes meets them: PB = 64 with 512-bit vectors
   and groups a multiple of 64, else 32. */
int llmkit_int4_block(int64_t g) {
#if defined(W512)
    return g % 64 == 0 ? 64 : 32;
#else
    return 32;
#endif
}

/* as llmkit_quant_rows, reordered for int4, plus each group's input sum xsum [M, Kp / g] int32 */
void llmkit_quant_rows_i4(const float* x, int64_t M, int64_t K, int64_t Kp, int64_t g, int16_t* xq, float* xs,
                          int32_t* xsum) {
    const int pb = llmkit_int4_block(g);
    int16_t tmp[64];
    llmkit_quant_rows(x, M, K, Kp, xq, xs);
    for (int64_t m = 0; m < M; m++) {
        int16_t* q = xq + m * Kp;
        for (int64_t gi = 0; gi < Kp / g; gi++) {
            int32_t t = 0;
            for (int64_t k = gi * g; k < (gi + 1) * g; k++) t += q[k];
            xsum[m * (Kp / g) + gi] = t;
        }
        for (int64_t k = 0; k < Kp; k += pb) {
            for (int i = 0; i < pb / 2; i++) { tmp[i] = q[k + 2 * i]; tmp[pb / 2 + i] = q[k + 2 * i + 1]; }
            for (int i = 0; i < pb; i++) q[k + i] = tmp[i];
        }
    }
}

/* out[r] = sum_g ws[r, g] * (sum_{k in g} q[r, k] x[k] - wz[r, g] * xsum[g]) for rows r < n */
INLINE void rows4(const uint8_t* w, int64_t Kp, const int16_t* x, const int32_t* xsum, const float* ws,
                  const uint8_t* wz, int64_t G, int n, float* out) {
    const int64_t g = Kp / G, ldw = Kp / 2;
    float zt[4] = {0.f, 0.f, 0.f, 0.f};
    for (int r = 0; r < n; r++)
        for (int64_t gi = 0; gi < G; gi++) zt[r] += ws[r * G + gi] * (float)((int32_t)wz[r * G + gi] * xsum[gi]);
#if defined(W512)
    if (g % 64 == 0) {
        const __m512i lo4 = _mm512_set1_epi16(15);
        __m512 f[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t gi = 0; gi < G; gi++) {  /* g <= 256: exact int32 sums */
            __m512i a[4] = {Z512, Z512, Z512, Z512};
            for (int64_t k = gi * g; k < (gi + 1) * g; k += 64) {
                __m512i xe = _mm512_loadu_si512((const void*)(x + k));
                __m512i xo = _mm512_loadu_si512((const void*)(x + k + 32));
                for (int r = 0; r < n; r++) {
                    if ((k & 127) == 0) _mm_prefetch((const char*)(w + r * ldw + k / 2 + PF_BYTES), _MM_HINT_T0);
                    __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(w + r * ldw + k / 2)));
                    __m512i lo = _mm512_and_si512(v, lo4), hi = _mm512_srli_epi16(v, 4);
#if defined(__AVX512VNNI__)
                    a[r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(a[r], lo, xe), hi, xo);
#else
                    a[r] = _mm512_add_epi32(a[r], _mm512_add_epi32(_mm512_madd_epi16(lo, xe),
                                                                   _mm512_madd_epi16(hi, xo)));
#endif
                }
            }
            for (int r = 0; r < n; r++)
                f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r]), _mm512_set1_ps(ws[r * G + gi]), f[r]);
        }
        for (int r = 0; r < n; r++) out[r] = _mm512_reduce_add_ps(f[r]) - zt[r];
        return;
    }
#endif
#if defined(__AVX2__) && defined(__FMA__)
    const __m256i lo4 = _mm256_set1_epi16(15);
    __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t gi = 0; gi < G; gi++) {
        __m256i a[4] = {Z256, Z256, Z256, Z256};
        for (int64_t k = gi * g; k < (gi + 1) * g; k += 32) {
            __m256i xe = _mm256_loadu_si256((const __m256i*)(x + k));
            __m256i xo = _mm256_loadu_si256((const __m256i*)(x + k + 16));
            for (int r = 0; r < n; r++) {
                if ((k & 127) == 0) _mm_prefetch((const char*)(w + r * ldw + k / 2 + PF_BYTES), _MM_HINT_T0);
                __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(w + r * ldw + k / 2)));
                __m256i lo = _mm256_and_si256(v, lo4), hi = _mm256_srli_epi16(v, 4);
                a[r] = _mm256_add_epi32(a[r], _mm256_add_epi32(_mm256_madd_epi16(lo, xe), _mm256_madd_epi16(hi, xo)));
            }
        }
        for (int r = 0; r < n; r++)
            f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r]), _mm256_set1_ps(ws[r * G + gi]), f[r]);
    }
    for (int r = 0; r < n; r++) {
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(f[r]), _mm256_extractf128_ps(f[r], 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        out[r] = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h))) - zt[r];
    }
#else
    for (int r = 0; r < n; r++) {
        float acc = 0.f;
        for (int64_t gi = 0; gi < G; gi++) {
            int64_t t = 0;
            for (int64_t k = gi * g; k < (gi + 1) * g; k += 32)
                for (int i = 0; i < 16; i++) {
                    uint8_t b = w[r * ldw + k / 2 + i];
                    t += (int32_t)(b & 15) * x[k + i] + (int32_t)(b >> 4) * x[k + 16 + i];
                }
            acc += (float)t * ws[r * G + gi];
        }
        out[r] = acc - zt[r];
    }
#endif
}

/* y [M, N] = (xq * xs) W^T with W = (q - zero) * scale per group of Kp / G inputs: w [N, Kp / 2] codes,
   ws [N, G] fp32 scales, wz [N, G] uint8 zero points; xq, xs, xsum from llmkit_quant_rows_i4 */
void llmkit_int4_mm(const int16_t* xq, const float* xs, const int32_t* xsum, const uint8_t* w, const float* ws,
                    const uint8_t* wz, float* y, int64_t M, int64_t N, int64_t Kp, int64_t G, int nthreads) {
    const int64_t nb = (N + 3) / 4;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t b = 0; b < nb; b++) {
        const int64_t n0 = b * 4;
        float out[4];
        for (int64_t m = 0; m < M; m++) {
            const int16_t* x = xq + m * Kp;
            const int32_t* s = xsum + m * G;
            if (N - n0 >= 4) rows4(w + n0 * (Kp / 2), Kp, x, s, ws + n0 * G, wz + n0 * G, G, 4, out);
            else rows4(w + n0 * (Kp / 2), Kp, x, s, ws + n0 * G, wz + n0 * G, G, (int)(N - n0), out);
            for (int r = 0; r < 4 && n0 + r < N; r++) y[m * N + n0 + r] = out[r] * xs[m];
        }
    }
}

/* ---- fp32, few rows (decode): y [M, N] = x [M, K] W^T (+ b), W = w [N, K] row-major as nn.Linear keeps it.
   One weight row at a time against up to 4 rows of x (L1-resident): each thread reads one contiguous run of
   W front to back, a single stream the hardware prefetcher follows at memory speed (measured: the same time
   as summing the bytes; 4 rows interleaved, even with software prefetch, took 1.3-1.5x that). */
#if defined(__AVX512F__)
#define FV __m512
#define FW 16
#define FZERO _mm512_setzero_ps()
#define FLOAD _mm512_loadu_ps
#define FMA _mm512_fmadd_ps
#define FADD _mm512_add_ps
#define FSUM _mm512_reduce_add_ps
#elif defined(__AVX2__) && defined(__FMA__)
#define FV __m256
#define FW 8
#define FZERO _mm256_setzero_ps()
#define FLOAD _mm256_loadu_ps
#define FMA _mm256_fmadd_ps
#define FADD _mm256_add_ps
INLINE float FSUM(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#endif

/* out[i * ldo] = sum_k w[k] x[i * K + k] for the m <= 4 rows of x */
INLINE void f32_row(const float* w, const float* x, int64_t K, int m, float* out, int64_t ldo) {
    int64_t k = 0;
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#if defined(FV)
    if (m == 1) {  /* four independent sums: one row streams at memory speed */
        FV a0 = FZERO, a1 = FZERO, a2 = FZERO, a3 = FZERO;
        for (; k + 4 * FW <= K; k += 4 * FW) {
#if F32_NTA
            for (int j = 0; j < 4 * FW; j += 16) _mm_prefetch((const char*)(w + k + j) + F32_NTA, _MM_HINT_NTA);
#endif
            a0 = FMA(FLOAD(w + k), FLOAD(x + k), a0);
            a1 = FMA(FLOAD(w + k + FW), FLOAD(x + k + FW), a1);
            a2 = FMA(FLOAD(w + k + 2 * FW), FLOAD(x + k + 2 * FW), a2);
            a3 = FMA(FLOAD(w + k + 3 * FW), FLOAD(x + k + 3 * FW), a3);
        }
        for (; k + FW <= K; k += FW) a0 = FMA(FLOAD(w + k), FLOAD(x + k), a0);
        s[0] = FSUM(FADD(FADD(a0, a1), FADD(a2, a3)));
    } else {
        FV a[4][2];
        for (int i = 0; i < 4; i++) a[i][0] = a[i][1] = FZERO;
        for (; k + 2 * FW <= K; k += 2 * FW) {
            FV w0 = FLOAD(w + k), w1 = FLOAD(w + k + FW);
            for (int i = 0; i < m; i++) {
                a[i][0] = FMA(w0, FLOAD(x + i * K + k), a[i][0]);
                a[i][1] = FMA(w1, FLOAD(x + i * K + k + FW), a[i][1]);
            }
        }
        for (; k + FW <= K; k += FW) {
            FV w0 = FLOAD(w + k);
            for (int i = 0; i < m; i++) a[i][0] = FMA(w0, FLOAD(x + i * K + k), a[i][0]);
        }
        for (int i = 0; i < m; i++) s[i] = FSUM(FADD(a[i][0], a[i][1]));
    }
#endif
    for (; k < K; k++)  /* the tail (K not a multiple of the vector width), or all of it in plain C */
        for (int i = 0; i < m; i++) s[i] += w[k] * x[i * K + k];
    for (int i = 0; i < m; i++) out[i * ldo] = s[i];
}

void llmkit_f32_mm(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t N, int64_t K,
                   int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int m = (int)(M - m0 < 4 ? M - m0 : 4);
            float* out = y + m0 * N + n;
            if (m == 1) f32_row(w + n * K, x + m0 * K, K, 1, out, N);  /* constant m: unrolled */
            else if (m == 4) f32_row(w + n * K, x + m0 * K, K, 4, out, N);
            else f32_row(w + n * K, x + m0 * K, K, m, out, N);
            if (b) for (int i = 0; i < m; i++) out[i * N] += b[n];
        }
    }
}

/* xo [M, D] = x + h (the residual add), y = RMSNorm(xo) as llmkit_rms_norm: one call instead of two (decode) */
void llmkit_rms_norm(const float* x, const float* w, float* y, int64_t M, int64_t D, float eps, float offset);
void llmkit_add_rms_norm(const float* x, const float* h, const float* w, float* xo, float* y, int64_t M, int64_t D,
                         float eps, float offset) {
    for (int64_t i = 0; i < M * D; i++) xo[i] = x[i] + h[i];
    llmkit_rms_norm(xo, w, y, M, D, eps, offset);
}

/* first index of each row's maximum: x [B, V] -> idx [B], val [B]; returns 1 (and stops) at a NaN */
int llmkit_argmax_rows(const float* x, int64_t B, int64_t V, int64_t* idx, float* val) {
    for (int64_t b = 0; b < B; b++) {
        const float* r = x + b * V;
        float mx = -INFINITY;
        int nan = 0;
        int64_t i = 0;
#if defined(__AVX512F__)
        __m512 m = _mm512_set1_ps(-INFINITY);
        __mmask16 bad = 0;
        for (; i + 16 <= V; i += 16) {
            __m512 v = _mm512_loadu_ps(r + i);
            bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            m = _mm512_max_ps(m, v);
        }
        mx = _mm512_reduce_max_ps(m);
        nan = bad != 0;
#endif
        for (; i < V; i++) { nan |= r[i] != r[i]; mx = r[i] > mx ? r[i] : mx; }
        if (nan) return 1;
        int64_t j = 0;
        while (j < V - 1 && !(r[j] == mx)) j++;
        idx[b] = j;
        val[b] = r[j];
    }
    return 0;
}

/* y [M, D] = x * (1 / sqrt(mean(x^2) + eps)) * (offset + w): RMSNorm of a few rows, one thread (decode) */
void llmkit_rms_norm(const float* x, const float* w, float* y, int64_t M, int64_t D, float eps, float offset) {
    for (int64_t m = 0; m < M; m++) {
        const float* r = x + m * D;
        float* o = y + m * D;
        int64_t k = 0;
        float ss = 0.f;
#if defined(FV)
        FV a0 = FZERO, a1 = FZERO;
        for (; k + 2 * FW <= D; k += 2 * FW) {
            FV v0 = FLOAD(r + k), v1 = FLOAD(r + k + FW);
            a0 = FMA(v0, v0, a0);
            a1 = FMA(v1, v1, a1);
        }
        ss = FSUM(FADD(a0, a1));
#endif
        for (; k < D; k++) ss += r[k] * r[k];
        const float inv = 1.f / sqrtf(ss / (float)D + eps);
        for (k = 0; k < D; k++) o[k] = (r[k] * inv) * (offset + w[k]);
    }
}

/* ---- attention of one new query per head over S cached keys (decode, no mask): y [B, H, D] =
   softmax(q k^T * scale) v. q [B, H, D] contiguous; k, v [B, Hkv, S, D] with batch / head strides sb, sh
   (each head's S x D keys contiguous: a view of a static cache); head h reads kv head h / (H / Hkv). */
static float* attn_scratch(int64_t n);
INLINE void attend_head(const float* qh, const float* kh, const float* vh, float* yh, int64_t S, int64_t D,
                        float scale) {
    float* sc = attn_scratch(S);
    float mx = -INFINITY;
    for (int64_t j = 0; j < S; j++) {
        const float* kj = kh + j * D;
        int64_t d = 0;
        float t = 0.f;
#if ATT_PF
        /* the cache is cold after the weights streamed through: fetch keys ahead, and the values for the second pass */
        for (int64_t e = 0; e < D; e += 16) {
            _mm_prefetch((const char*)(kj + ATT_PF * D + e), _MM_HINT_T0);
            _mm_prefetch((const char*)(vh + j * D + e), _MM_HINT_T0);
        }
#endif
#if defined(FV)
        FV a = FZERO;
        for (; d + FW <= D; d += FW) a = FMA(FLOAD(qh + d), FLOAD(kj + d), a);
        t = FSUM(a);
#endif
        for (; d < D; d++) t += qh[d] * kj[d];
        sc[j] = t * scale;
        mx = sc[j] > mx ? sc[j] : mx;
    }
    float sum = 0.f;
    for (int64_t j = 0; j < S; j++) { sc[j] = expf(sc[j] - mx); sum += sc[j]; }
    const float inv = 1.f / sum;
    for (int64_t d = 0; d < D; d++) yh[d] = 0.f;
    for (int64_t j = 0; j < S; j++) {
        const float p = sc[j] * inv;
        const float* vj = vh + j * D;
        for (int64_t d = 0; d < D; d++) yh[d] += p * vj[d];
    }
}

void llmkit_decode_attention(const float* q, const float* k, const float* v, float* y, int64_t B, int64_t H,
                             int64_t Hkv, int64_t S, int64_t D, int64_t sb, int64_t sh, float scale, int nthreads) {
    const int64_t rep = H / Hkv;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H;
        attend_head(q + bh * D, k + b * sb + (h / rep) * sh, v + b * sb + (h / rep) * sh, y + bh * D, S, D, scale);
    }
}

/* o = RoPE (halves layout) of one head x [D] with this position's cos, sin_signed [D] (as positions.apply_rope) */
INLINE void rope_head(const float* x, const float* c, const float* s, float* o, int64_t D) {
    const int64_t h = D / 2;
    for (int64_t d = 0; d < h; d++) o[d] = x[d] * c[d] + x[d + h] * s[d];
    for (int64_t d = h; d < D; d++) o[d] = x[d] * c[d] + x[d - h] * s[d];
}

/* A whole decode step of attention on a static cache, one new token per row: the fused projection's output
   qkv [B, (H + 2 Hkv) D] (q heads, k heads, v heads), cos / sin_signed [B, D]; the k heads (rotated) and v heads
   go to column `pos` of the cache kc, vc [B, Hkv, L, D] (contiguous), and each rotated q head attends to
   columns 0..pos -> y [B, H D]. The same arithmetic as rope1 + the cache's copy + llmkit_decode_attention. */
void llmkit_decode_attention_step(const float* qkv, const float* cs, const float* sn, float* kc, float* vc, float* y,
                                  int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t L, int64_t pos, float scale,
                                  int nthreads) {
    const int64_t W = (H + 2 * Hkv) * D, sb = Hkv * L * D, sh = L * D;
    for (int64_t b = 0; b < B; b++)
        for (int64_t r = 0; r < Hkv; r++) {
            rope_head(qkv + b * W + (H + r) * D, cs + b * D, sn + b * D, kc + b * sb + r * sh + pos * D, D);
            const float* vr = qkv + b * W + (H + Hkv + r) * D;
            float* vo = vc + b * sb + r * sh + pos * D;
            for (int64_t d = 0; d < D; d++) vo[d] = vr[d];
        }
    const int64_t rep = H / Hkv;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H;
        float* yh = y + bh * D;  /* the rotated query waits in its output slot (read before it is written) */
        rope_head(qkv + b * W + h * D, cs + b * D, sn + b * D, yh, D);
        attend_head(yh, kc + b * sb + (h / rep) * sh, vc + b * sb + (h / rep) * sh, yh, pos + 1, D, scale);
    }
}

/* RoPE (halves layout) of one position per row: x [B, R, D] (strides sb, D, 1) -> y [B, R, D] contiguous,
   y = x * cos + roll(x, D/2) * sin_signed with cos, sin_signed [B, D] (as positions.apply_rope) */
void llmkit_rope1(const float* x, const float* cs, const float* sn, float* y, int64_t B, int64_t R, int64_t D,
                  int64_t sb) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t r = 0; r < R; r++) rope_head(x + b * sb + r * D, cs + b * D, sn + b * D, y + (b * R + r) * D, D);
}

/* SwiGLU's silu(gate) * up of rows [gate; up]: h [M, 2I] -> y [M, I] */
void llmkit_silu_mul(const float* hb, float* y, int64_t M, int64_t I) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < I; i++) {
            const float g = hb[m * 2 * I + i];
            y[m * I + i] = g / (1.f + expf(-g)) * hb[m * 2 * I + I + i];
        }
}

/* ---- one call per layer: quantize x [M, K] into per-thread scratch, then multiply (y [M, N]) */
#include <stdlib.h>
static __thread void* scratch_buf = 0;
static __thread int64_t scratch_cap = 0;
static void* scratch(int64_t bytes) {
    if (bytes > scratch_cap) {
        free(scratch_buf);
        scratch_buf = aligned_alloc(64, (bytes + 63) / 64 * 64);
        scratch_cap = scratch_buf ? bytes : 0;
    }
    return scratch_buf;
}
static float* attn_scratch(int64_t n) {  /* a second per-thread buffer: attention scores */
    static __thread float* buf = 0;
    static __thread int64_t cap = 0;
    if (n > cap) {
        free(buf);
        cap = (n + 1023) / 1024 * 1024;
        buf = (float*)aligned_alloc(64, cap * 4);
    }
    return buf;
}

int llmkit_int8_linear(const float* x, int64_t M, int64_t K, const int8_t* w, const float* ws, float* y,
                       int64_t N, int64_t Kp, int64_t G, int nthreads) {
    int16_t* xq = (int16_t*)scratch(M * Kp * 2 + M * 4);
    if (!xq) return 1;
    float* xs = (float*)(xq + M * Kp);  /* Kp % 32 == 0: aligned */
    llmkit_quant_rows(x, M, K, Kp, xq, xs);
    llmkit_int8_mm(xq, xs, w, ws, y, M, N, Kp, G, nthreads);
    return 0;
}

int llmkit_int4_linear(const float* x, int64_t M, int64_t K, const uint8_t* w, const float* ws, const uint8_t* wz,
                       float* y, int64_t N, int64_t Kp, int64_t G, int nthreads) {
    int16_t* xq = (int16_t*)scratch(M * Kp * 2 + M * 4 + M * G * 4);
    if (!xq) return 1;
    float* xs = (float*)(xq + M * Kp);
    int32_t* xsum = (int32_t*)(xs + M);
    llmkit_quant_rows_i4(x, M, K, Kp, Kp / G, xq, xs, xsum);
    llmkit_int4_mm(xq, xs, xsum, w, ws, wz, y, M, N, Kp, G, nthreads);
    return 0;
}
"""

ALIGN = 32  # K is padded to a multiple of this (the widest vector step)


def _cache_dir() -> Path:
    d = os.environ.get("LLMKIT_KERNEL_DIR")
    return Path(d) if d else Path.home() / ".cache" / "llmkit" / "kernels"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


@functools.cache
def build(march: str = "native") -> ctypes.CDLL | None:
    """The kernel library compiled for `-march=<march>` on x86-64 ("native"; "x86-64-v3" = AVX2,
    "x86-64" = plain C; ignored elsewhere), cached; None (with a warning saying why) when it cannot be."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp"]
    flags += [f"-march={march}"] if platform.machine() in ("x86_64", "AMD64") else []
    key = hashlib.sha256((C_SOURCE + _cpu_id() + str(cc) + " ".join(flags)).encode()).hexdigest()[:16]
    path = _cache_dir() / f"llmkit_kernels_{key}.so"
    if not path.exists():
        if cc is None:
            warnings.warn("llmkit: no C compiler (cc/gcc) found, so int8/int4 layers run PyTorch's kernels "
                          "(bf16 activations, slower); install gcc to get llmkit's", stacklevel=3)
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, out = Path(tmp) / "k.c", Path(tmp) / "k.so"
            src.write_text(C_SOURCE)
            r = subprocess.run([cc, *flags, str(src), "-o", str(out), "-lm"], capture_output=True, text=True)
            if r.returncode != 0:
                warnings.warn(f"llmkit: compiling the int8/int4 kernels failed ({cc} {' '.join(flags)}): "
                              f"{r.stderr.strip()[:500]}; int8/int4 layers run PyTorch's kernels", stacklevel=3)
                return None
            os.replace(out, path)  # atomic: concurrent first uses each build, one wins
    lib = ctypes.CDLL(str(path))
    p = ctypes.c_void_p
    i64 = ctypes.c_int64
    lib.llmkit_quant_rows.argtypes = [p, i64, i64, i64, p, p]
    lib.llmkit_quant_rows.restype = None
    lib.llmkit_int8_mm.argtypes = [p, p, p, p, p, i64, i64, i64, i64, ctypes.c_int]
    lib.llmkit_int8_mm.restype = None
    lib.llmkit_quant_rows_i4.argtypes = [p, i64, i64, i64, i64, p, p, p]
    lib.llmkit_quant_rows_i4.restype = None
    lib.llmkit_int4_mm.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i64, ctypes.c_int]
    lib.llmkit_int4_mm.restype = None
    lib.llmkit_f32_mm.argtypes = [p, p, p, p, i64, i64, i64, ctypes.c_int]
    lib.llmkit_f32_mm.restype = None
    lib.llmkit_rms_norm.argtypes = [p, p, p, i64, i64, ctypes.c_float, ctypes.c_float]
    lib.llmkit_rms_norm.restype = None
    lib.llmkit_add_rms_norm.argtypes = [p, p, p, p, p, i64, i64, ctypes.c_float, ctypes.c_float]
    lib.llmkit_add_rms_norm.restype = None
    lib.llmkit_argmax_rows.argtypes = [p, i64, i64, p, p]
    lib.llmkit_argmax_rows.restype = ctypes.c_int
    lib.llmkit_decode_attention.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, i64, i64, ctypes.c_float,
                                            ctypes.c_int]
    lib.llmkit_decode_attention.restype = None
    lib.llmkit_decode_attention_step.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, ctypes.c_float,
                                                 ctypes.c_int]
    lib.llmkit_decode_attention_step.restype = None
    lib.llmkit_rope1.argtypes = [p, p, p, p, i64, i64, i64, i64]
    lib.llmkit_rope1.restype = None
    lib.llmkit_silu_mul.argtypes = [p, p, i64, i64]
    lib.llmkit_silu_mul.restype = None
    lib.llmkit_int8_linear.argtypes = [p, i64, i64, p, p, p, i64, i64, i64, ctypes.c_int]
    lib.llmkit_int8_linear.restype = ctypes.c_int
    lib.llmkit_int4_linear.argtypes = [p, i64, i64, p, p, p, p, i64, i64, i64, ctypes.c_int]
    lib.llmkit_int4_linear.restype = ctypes.c_int
    return lib


def _lib() -> ctypes.CDLL | None:
    return None if os.environ.get("LLMKIT_NO_KERNELS") else build()


def available() -> bool:
    """True when llmkit's kernels are compiled (or cached) and loaded (not with LLMKIT_NO_KERNELS=1)."""
    return _lib() is not None


def int8_mm(x: Tensor, w: Tensor, scales: Tensor, lib: ctypes.CDLL | None = None) -> Tensor:
    """y [M, N] = x [M, K] (fp32) times W^T, W = w [N, Kp] int8 (Kp a multiple of 32, zero columns past K)
    * scales [N, G] (fp32, groups of Kp / G inputs). Requires `available()` (or a `build()`)."""
    lib = lib or _lib()
    M, K = x.shape
    N, Kp = w.shape
    x = x.float().contiguous()
    y = torch.empty(M, N, dtype=torch.float32)
    if lib.llmkit_int8_linear(x.data_ptr(), M, K, w.data_ptr(), scales.data_ptr(), y.data_ptr(), N, Kp,
                              scales.shape[1], torch.get_num_threads()):
        raise MemoryError(f"int8_mm: no memory for the {M}x{Kp} activation scratch")
    return y


def int4_mm(x: Tensor, w: Tensor, scales: Tensor, zeros: Tensor, lib: ctypes.CDLL | None = None) -> Tensor:
    """y [M, N] = x [M, K] (fp32) times W^T, W = (q - zero) * scale per group: w [N, Kp / 2] uint8 codes (two
    per byte, low nibble first; Kp a multiple of the group), scales [N, G] fp32, zeros [N, G] uint8 (group
    Kp / G, a multiple of 32 up to 256). Requires `available()` (or a `build()`)."""
    lib = lib or _lib()
    M, K = x.shape
    N, Kp = w.shape[0], w.shape[1] * 2
    x = x.float().contiguous()
    y = torch.empty(M, N, dtype=torch.float32)
    if lib.llmkit_int4_linear(x.data_ptr(), M, K, w.data_ptr(), scales.data_ptr(), zeros.data_ptr(), y.data_ptr(),
                              N, Kp, scales.shape[1], torch.get_num_threads()):
        raise MemoryError(f"int4_mm: no memory for the {M}x{Kp} activation scratch")
    return y


def f32_mm(x: Tensor, w: Tensor, bias: Tensor | None = None, lib: ctypes.CDLL | None = None) -> Tensor:
    """y [..., N] = x [..., K] W^T (+ bias), W = w [N, K] fp32 contiguous (an nn.Linear weight as it is), for few
    rows M (decode: it reads W at memory speed). Requires `available()` (or a `build()`)."""
    lib = lib or _lib()
    x = x.contiguous()
    N, K = w.shape
    M = x.numel() // K
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    n = torch.get_num_threads() if N * K >= 1 << 15 else 1  # a small matrix is not worth waking threads
    lib.llmkit_f32_mm(x.data_ptr(), w.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(), M, N, K, n)
    return y


def rms_norm(x: Tensor, w: Tensor, eps: float, offset: float = 0.0, lib: ctypes.CDLL | None = None) -> Tensor:
    """RMSNorm of fp32 x [..., D] with fp32 weight w [D]: x / sqrt(mean(x^2) + eps) * (offset + w), one thread
    (for decode's few rows, where one small torch op costs more than the arithmetic)."""
    lib = lib or _lib()
    x, w = x.contiguous(), w.contiguous()
    y = torch.empty_like(x)
    D = x.shape[-1]
    lib.llmkit_rms_norm(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.numel() // D, D, eps, offset)
    return y


def add_rms_norm(x: Tensor, h: Tensor, w: Tensor, eps: float, offset: float = 0.0,
                 lib: ctypes.CDLL | None = None) -> tuple[Tensor, Tensor]:
    """(x + h, RMSNorm(x + h)) of fp32 x, h [..., D] (the same shape) in one C call: a block's residual add and
    the next norm (vLLM's fused_add_rms_norm), with `rms_norm`'s arithmetic."""
    lib = lib or _lib()
    x, h, w = x.contiguous(), h.contiguous(), w.contiguous()
    xo, y = torch.empty_like(x), torch.empty_like(x)
    D = x.shape[-1]
    lib.llmkit_add_rms_norm(x.data_ptr(), h.data_ptr(), w.data_ptr(), xo.data_ptr(), y.data_ptr(), x.numel() // D, D,
                            eps, offset)
    return xo, y


def argmax_rows(x: Tensor, lib: ctypes.CDLL | None = None) -> tuple[Tensor, Tensor] | None:
    """`x.max(-1)` (values, first maximal indices) of fp32 logits x [B, V] in one pass, ~10x faster than torch's
    at a 32k vocabulary; None when a row holds a NaN (torch's semantics then apply)."""
    lib = lib or _lib()
    x = x.contiguous()
    B, V = x.shape
    idx, val = torch.empty(B, dtype=torch.long), torch.empty(B)
    if lib.llmkit_argmax_rows(x.data_ptr(), B, V, idx.data_ptr(), val.data_ptr()):
        return None
    return val, idx


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not a DTensor / FakeTensor, whose data_ptr() is not the data


def readable(x: Tensor) -> bool:
    """True when the C kernels may read `x`: a plain fp32 CPU tensor, outside tracing (ONNX export: the
    tracer cannot see inside a C call)."""
    return type(x) in _PLAIN and x.is_cpu and x.dtype is torch.float32 and not torch._C._get_tracing_state()


def decode_lib() -> ctypes.CDLL | None:
    """The library for a decode step's fp32 fast paths (attention, RoPE, SwiGLU), or None; unlike
    `available()`, LLMKIT_NO_KERNELS is read once per process (these run a few times per layer)."""
    if _DECODE[0] is None:
        _DECODE[0] = (_lib(),)
    return _DECODE[0][0]


_DECODE: list = [None]


def rope1(x: Tensor, cos: Tensor, sin_signed: Tensor, lib: ctypes.CDLL | None = None) -> Tensor | None:
    """`positions.apply_rope` for ONE position per row: x [B, R, 1, D] fp32 (each row's R x D block with
    strides (D, 1), e.g. q and k heads sliced from the fused projection), cos / sin_signed [B, 1, 1, D]
    -> [B, R, 1, D] contiguous; None when the layout does not allow it."""
    B, R, _, D = x.shape
    if x.stride(1) != D or x.stride(3) != 1 or D % 2 or cos.numel() != B * D or sin_signed.numel() != B * D:
        return None
    lib = lib or _lib()
    cos, sin_signed = cos.contiguous(), sin_signed.contiguous()
    y = torch.empty(B, R, 1, D)
    lib.llmkit_rope1(x.data_ptr(), cos.data_ptr(), sin_signed.data_ptr(), y.data_ptr(), B, R, D, x.stride(0))
    return y


def silu_mul(h: Tensor, lib: ctypes.CDLL | None = None) -> Tensor:
    """SwiGLU's silu(gate) * up of fp32 h [..., 2I] = [gate; up] -> [..., I]."""
    lib = lib or _lib()
    h = h.contiguous()
    inter = h.shape[-1] // 2
    y = torch.empty(*h.shape[:-1], inter)
    lib.llmkit_silu_mul(h.data_ptr(), y.data_ptr(), h.numel() // (2 * inter), inter)
    return y


def decode_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                     lib: ctypes.CDLL | None = None) -> Tensor | None:
    """softmax(q k^T * scale) v for ONE query per head attending to all S keys (a decode step without a mask):
    q [B, H, 1, D], k/v [B, Hkv, S, D] fp32 (views of a static cache are fine: each head's S x D block must be
    contiguous) -> [B, H, 1, D]; scale defaults to 1/sqrt(D). None when the layouts do not allow it."""
    B, H, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.stride() != v.stride() or k.stride()[2:] != (D, 1) or H % Hkv:
        return None
    lib = lib or _lib()
    q = q.contiguous()
    y = torch.empty_like(q)
    n = torch.get_num_threads() if B * H * S * D >= 1 << 15 else 1
    lib.llmkit_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), y.data_ptr(), B, H, Hkv, S, D,
                                k.stride(0), k.stride(1), D**-0.5 if scale is None else scale, n)
    return y


def decode_attention_step(qkv: Tensor, cos: Tensor, sin_signed: Tensor, cache, layer_idx: int, n_head: int,
                          n_kv_head: int, scale: float | None = None, lib: ctypes.CDLL | None = None) -> Tensor | None:
    """A decode step's attention on a static KV cache in one C call: RoPE of the q and k heads of the fused
    projection qkv [B, 1, (H + 2 Hkv) D], k and v written into the cache's next column (`cache.slot`), one
    query per head over every cached key -> [B, 1, H D]; the same arithmetic as `rope1`, the cache's `update`
    and `decode_attention`. None when the layout does not allow it (then nothing was written)."""
    B, T, W = qkv.shape
    D = W // (n_head + 2 * n_kv_head)
    if T != 1 or D % 2 or n_head % n_kv_head or cos.numel() != B * D or sin_signed.numel() != B * D:
        return None
    lib = lib or _lib()
    K, V, pos = cache.slot(layer_idx, 1)  # [B, Hkv, L, D] contiguous fp32 (`cache.fused_decode`)
    qkv, cos, sin_signed = qkv.contiguous(), cos.contiguous(), sin_signed.contiguous()
    y = torch.empty(B, 1, n_head * D)
    n = torch.get_num_threads() if B * n_head * (pos + 1) * D >= 1 << 15 else 1
    lib.llmkit_decode_attention_step(qkv.data_ptr(), cos.data_ptr(), sin_signed.data_ptr(), K.data_ptr(), V.data_ptr(),
                                     y.data_ptr(), B, n_head, n_kv_head, D, K.shape[2], pos,
                                     D**-0.5 if scale is None else scale, n)
    return y


HUGE = 2 << 20  # a transparent huge page


def huge_copy(t: Tensor) -> Tensor:
    """A contiguous copy of CPU tensor `t` (of 1 MB or more; a smaller one is returned as it is) in memory
    backed by 2 MB pages where the OS allows (Linux transparent huge pages: an anonymous mapping advised
    MADV_HUGEPAGE before it is touched; elsewhere the pages stay small and the copy works the same).
    Streaming a weight from 2 MB pages is ~15% faster at 2 threads: fewer TLB misses, and the hardware
    prefetcher does not stop at every 4 KB page (docs/benchmarks.md)."""
    n = t.numel() * t.element_size()
    if n < HUGE // 2 or not hasattr(mmap, "MAP_ANONYMOUS"):  # a small tensor would waste most of a 2 MB page
        return t.contiguous()
    size = -(-n // HUGE) * HUGE + HUGE  # room to align the start to 2 MB
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    buf = (ctypes.c_char * size).from_buffer(m)  # the tensor keeps `buf` (and so the mapping) alive
    start = ctypes.addressof(buf)
    off = -(-start // HUGE) * HUGE - start
    out = torch.frombuffer(buf, dtype=t.dtype, count=t.numel(), offset=off).view(t.shape)
    return out.copy_(t)
