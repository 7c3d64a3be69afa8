"""llmkit's own CPU kernels: matmuls for int8 and int4 weights (y = x W^T, W = (q - zero) * scale per group),
and the fp32 pieces of a decode step (`f32_mm` for a few rows, `rms_norm`, one-query `decode_attention`).

fp32 (decode, batch 1): one weight row at a time, a single contiguous stream per thread, reads the weights
at the memory-read floor where PyTorch's single-row products did not (docs/benchmarks.md); RMSNorm and
the one-query attention are one C call each instead of several small torch ops.

Why (measured on the dev box's AMD EPYC, 1 thread, batch 1): PyTorch's `_weight_int8pack_mm` runs its
vectorised path only with bf16 activations and scales (a rounding step on each) and still reads the
weights at about half llama.cpp q8_0's speed. This kernel quantizes each activation row to int16
(one fp32 scale per row, 15 bits: 256x finer than llama.cpp's int8 activations) and multiplies with
integer dot products, exact integer sums per weight group, fp32 scales. With AVX-512 VNNI each int16
activation is split into two bytes (q = 256 h + l) so that `vpdpbusd` multiplies 64 weight bytes as
loaded by 64 activation bytes: twice the products per instruction of int16 x int16 and no widening of
the weights (the same sums, bit for bit); without it, AVX-512BW / AVX2 `vpmaddwd` on widened weights, or
plain C. Group-wise weights (`G` groups of K / G inputs) run at the same speed as per-channel ones.

The C source is compiled with the system C compiler (`cc`, `-O3 -march=native -fopenmp`, ~5 s) on first
use and cached under `~/.cache/llmkit/kernels` (or `$LLMKIT_KERNEL_DIR`); without a compiler, or with
`LLMKIT_NO_KERNELS=1`, `available()` is False (a warning says why once) and the quantized kinds, the
packed-for-decode Linear, RMSNorm and attention run PyTorch's kernels. int8/int4 weights are prefetched
8 KB ahead in software (non-temporally with VNNI): rows are only K bytes (512 on the benchmark model), four
rows are read at once, and the hardware prefetcher does not keep up (streaming 4x slower without it).
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

from llmkit.errors import InputError

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
#define PF_BYTES 8192  /* software prefetch distance: rows are short (K bytes), too short for the hardware to ramp up;
                          non-temporal in the VNNI kernels */
#define XMAX 16383.0f  /* int16 activations within +-2^14 */
#define CHUNK 8192     /* inputs summed in int32 lanes before fp32: 8 or more lanes, each summing at most
                          1024 products of |127 * 16383|, stays below 2^31 */
#if defined(__AVX512BW__) && defined(__AVX512F__)
#define W512 1
#endif

/* ---- int8 / int4 weights. Activations: each row x [K] -> int16 q [Kp] (zero padded) with one fp32 scale,
   x ~= q * s, |q| <= 16383 (15 bits: 256x finer than llama.cpp's int8 activations). Rounded to nearest even
   (lrintf's default), the same with or without vectors. Returns s. */
INLINE float quant_row(const float* r, int64_t K, int64_t Kp, int16_t* q) {
    float amax = 0.f;
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 mx = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) mx = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(r + k)), mx);  /* NaN: ignored */
    amax = _mm512_reduce_max_ps(mx);
#endif
    for (; k < K; k++) { float a = fabsf(r[k]); amax = a > amax ? a : amax; }
    const float s = amax > 0.f ? amax / XMAX : 1.f, inv = 1.f / s;
    k = 0;
#if defined(__AVX512F__)
    const __m512 vi = _mm512_set1_ps(inv);
    for (; k + 16 <= K; k += 16)
        _mm256_storeu_si256((__m256i*)(q + k),
                            _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(r + k), vi))));
#elif defined(__AVX2__)
    const __m256 vi = _mm256_set1_ps(inv);
    for (; k + 8 <= K; k += 8) {
        __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(r + k), vi));
        _mm_storeu_si128((__m128i*)(q + k), _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
    }
#endif
    for (; k < K; k++) q[k] = (int16_t)lrintf(r[k] * inv);
    for (; k < Kp; k++) q[k] = 0;
    return s;
}

#if defined(__AVX512VNNI__) && defined(W512) && defined(__AVX512VL__) && defined(__AVX512DQ__)
/* AVX-512 VNNI: q is split into two bytes, q = 256 h + l, and `vpdpbusd` multiplies 64 weight bytes by 64
   activation bytes (four unsigned x signed products per int32 lane): twice the products per instruction of
   int16 `vpdpwssd`, and the weights are used as loaded (no widening). Sums stay exact integers. Four weight
   rows at a time, each with its own accumulators (named registers: no spills between iterations). */
#define BYTE_ACT 1

/* [sum a, sum b, sum c, sum d] of the 16 int32 lanes of each */
INLINE __m128i hsum4(__m512i a, __m512i b, __m512i c, __m512i d) {
    const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    const __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
    const __m256i t = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
}

/* the same for fp32 lanes */
INLINE __m128 hsum4ps(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
    const __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
    const __m256 t = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* int8 (weights signed): h' = (q >> 8) + 64 in 0..127 and l = q & 255 are the unsigned operands, so
   sum w q = 256 sum w h' + sum w l - 16384 sum w, with sum w per row and group precomputed (wsum).
   Activations per row: h' [Kx] then l [Kx], Kx = Kp rounded up to 64. */
static void split8(const int16_t* q, int64_t Kp, int64_t Kx, uint8_t* h, uint8_t* l) {
    for (int64_t k = 0; k < Kx; k += 32) {
        __m512i v = k < Kp ? _mm512_loadu_si512((const void*)(q + k)) : Z512;
        _mm256_storeu_si256((__m256i*)(h + k),
                            _mm512_cvtepi16_epi8(_mm512_add_epi16(_mm512_srai_epi16(v, 8), _mm512_set1_epi16(64))));
        _mm256_storeu_si256((__m256i*)(l + k), _mm512_cvtepi16_epi8(v));  /* the low byte */
    }
}

#define SEG8 512  /* inputs per int32 sum: 512 * (256 * 127 * 128 + 255 * 128) < 2^31, so the sums are exact */

/* [4] int32: sum_{k < len} w_r[k] (256 h'[k] + l[k]) for the rows w0..w3, len <= SEG8 a multiple of 32. Plain
   loads for whole vectors: a masked load that misses the cache stalls the ones after it (measured: streaming
   the weights 4x slower without the software prefetch, ~20% with it) */
INLINE __m128i dot8x4(const int8_t* w0, const int8_t* w1, const int8_t* w2, const int8_t* w3, const uint8_t* h,
                      const uint8_t* l, int64_t len) {
    __m512i h0 = Z512, h1 = Z512, h2 = Z512, h3 = Z512, l0 = Z512, l1 = Z512, l2 = Z512, l3 = Z512;
    int64_t k = 0;
#define ROW8(r, LD) { _mm_prefetch((const char*)(w##r + k) + PF_BYTES, _MM_HINT_NTA); \
                  const __m512i v = LD(w##r + k); \
                  h##r = _mm512_dpbusd_epi32(h##r, hv, v); l##r = _mm512_dpbusd_epi32(l##r, lv, v); }
#define LDU(p) _mm512_loadu_si512((const void*)(p))
#define LDM(p) _mm512_maskz_loadu_epi8(0xffffffffull, p)
    for (; k + 64 <= len; k += 64) {
        const __m512i hv = LDU(h + k), lv = LDU(l + k);
        ROW8(0, LDU) ROW8(1, LDU) ROW8(2, LDU) ROW8(3, LDU)
    }
    if (k < len) {
        const __m512i hv = LDM(h + k), lv = LDM(l + k);
        ROW8(0, LDM) ROW8(1, LDM) ROW8(2, LDM) ROW8(3, LDM)
    }
#undef ROW8
#undef LDU
#undef LDM
    return hsum4(_mm512_add_epi32(_mm512_slli_epi32(h0, 8), l0), _mm512_add_epi32(_mm512_slli_epi32(h1, 8), l1),
                 _mm512_add_epi32(_mm512_slli_epi32(h2, 8), l2), _mm512_add_epi32(_mm512_slli_epi32(h3, 8), l3));
}

/* y [M, N] = (q * xs) W^T, W = w [N, Kp] int8 * ws [N, G]; xb: M rows of [h' Kx | l Kx]; wsum [N, G] */
static void int8_mm(const uint8_t* xb, int64_t Kx, const float* xs, const int8_t* w, const float* ws,
                    const int32_t* wsum, float* y, int64_t M, int64_t N, int64_t Kp, int64_t G, int nthreads) {
    const int64_t g = Kp / G, nb = (N + 3) / 4;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t b = 0; b < nb; b++) {
        const int64_t n0 = b * 4;
        const int n = (int)(N - n0 < 4 ? N - n0 : 4);
        const int8_t* wr[4];  /* past the last row: the last row again (computed, not stored) */
        for (int r = 0; r < 4; r++) wr[r] = w + (n0 + (r < n ? r : n - 1)) * Kp;
        for (int64_t m = 0; m < M; m++) {
            const uint8_t* h = xb + m * 2 * Kx;
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
            for (int64_t gi = 0; gi < G; gi++) {
                __m256i t = _mm256_setzero_si256();  /* int64 per row */
                for (int64_t c = gi * g; c < (gi + 1) * g; c += SEG8) {
                    const int64_t len = (gi + 1) * g - c < SEG8 ? (gi + 1) * g - c : SEG8;
                    t = _mm256_add_epi64(t, _mm256_cvtepi32_epi64(dot8x4(wr[0] + c, wr[1] + c, wr[2] + c, wr[3] + c,
                                                                          h + c, h + Kx + c, len)));
                }
                int64_t s[4];
                _mm256_storeu_si256((__m256i*)s, t);
                for (int r = 0; r < n; r++)
                    acc[r] += (float)(s[r] - 16384 * (int64_t)wsum[(n0 + r) * G + gi]) * ws[(n0 + r) * G + gi];
            }
            for (int r = 0; r < n; r++) y[m * N + n0 + r] = acc[r] * xs[m];
        }
    }
}

/* int4 (codes unsigned 0..15): l = (int8) q and h = (q - l) / 256 in -64..64 are the signed operands. Inputs
   go in blocks of 128 = one 64-byte load of codes: the low nibbles are the even inputs, the high nibbles the
   odd ones, so a block's activations are stored [even h | even l | odd h | odd l], 64 bytes each. Lane j of
   a block sums inputs 8j..8j+7, all in one group (groups are multiples of 32), whose scale it picks. */
#define I4B 128
static void split4(const int16_t* q, int64_t Kp, uint8_t* xb) {
    const __m512i even = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32,
                                          30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
    for (int64_t k0 = 0; k0 < Kp; k0 += I4B, xb += 4 * 64) {
        for (int half = 0; half < 2; half++) {  /* inputs k0 + 64 half .. + 63 -> 32 even and 32 odd */
            const int64_t k = k0 + 64 * half;  /* Kp is a multiple of 32: whole vectors or none */
            const __m512i a = k < Kp ? _mm512_loadu_si512((const void*)(q + k)) : Z512;
            const __m512i b = k + 32 < Kp ? _mm512_loadu_si512((const void*)(q + k + 32)) : Z512;
            for (int par = 0; par < 2; par++) {
                const __m512i v = _mm512_permutex2var_epi16(a, par ? odd : even, b);
                const __m512i lo = _mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8);  /* the low byte, signed */
                const __m512i hi = _mm512_srai_epi16(_mm512_sub_epi16(v, lo), 8);
                _mm256_storeu_si256((__m256i*)(xb + par * 128 + half * 32), _mm512_cvtepi16_epi8(hi));
                _mm256_storeu_si256((__m256i*)(xb + par * 128 + 64 + half * 32), _mm512_cvtepi16_epi8(lo));
            }
        }
    }
}

/* per block of 128 inputs: its first group, a mask of the groups it touches and each lane's group in it */
typedef struct { int32_t lane[16]; int64_t gi; __mmask16 ms; } blk4_t;

/* out[r] = sum_g ws[r, g] (sum_{k in g} c[r, k] q[k] - wz[r, g] xsum[g]) for 4 rows r (row pointers: codes w_r,
   scales s_r, zeros z_r); xsum [G] fp32 (exact: |xsum| < 2^24) */
INLINE __m128 dot4x4(const uint8_t* const* wr, const float* const* sr, const uint8_t* const* zr, const uint8_t* xb,
                     const float* xsum, const blk4_t* blk, int64_t Kp, int64_t G) {
    const __m512i m4 = _mm512_set1_epi8(15);
    __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
    for (int r = 0; r < 4; r++) {  /* the scales and zeros of the rows ahead */
        _mm_prefetch((const char*)(sr[r] + 16 * G), _MM_HINT_NTA);
        _mm_prefetch((const char*)(zr[r] + 16 * G), _MM_HINT_NTA);
    }
    for (int64_t k0 = 0, b = 0; k0 < Kp; k0 += I4B, b++, xb += 4 * 64) {
        const int full = Kp - k0 >= I4B;  /* plain loads for whole blocks (see dot8row) */
        const __mmask64 mk = full ? ~0ull : (1ull << ((Kp - k0) / 2)) - 1;
        const __m512i eh = _mm512_loadu_si512(xb), el = _mm512_loadu_si512(xb + 64);
        const __m512i oh = _mm512_loadu_si512(xb + 128), ol = _mm512_loadu_si512(xb + 192);
        const __m512i sidx = _mm512_loadu_si512((const void*)blk[b].lane);
        const int64_t gi = blk[b].gi;
        const __mmask16 ms = blk[b].ms;
#define ROW4(r) { const uint8_t* p = wr[r] + k0 / 2; \
                  _mm_prefetch((const char*)p + PF_BYTES, _MM_HINT_NTA); \
                  const __m512i v = full ? _mm512_loadu_si512((const void*)p) : _mm512_maskz_loadu_epi8(mk, p); \
                  const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4); \
                  const __m512i ah = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(Z512, lo, eh), hi, oh); \
                  const __m512i al = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(Z512, lo, el), hi, ol); \
                  const __m512 sc = _mm512_permutexvar_ps(sidx, _mm512_maskz_loadu_ps(ms, sr[r] + gi)); \
                  const __m512i s = _mm512_add_epi32(_mm512_slli_epi32(ah, 8), al); \
                  f##r = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, f##r); }
        ROW4(0) ROW4(1) ROW4(2) ROW4(3)
#undef ROW4
    }
    for (int64_t gi = 0; gi < G; gi += 16) {  /* zero points, 16 groups per step */
        const __mmask16 m = G - gi >= 16 ? 0xffff : (__mmask16)((1u << (G - gi)) - 1);
        const __m512 xg = _mm512_maskz_loadu_ps(m, xsum + gi);
#define ZP(r) f##r = _mm512_fnmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, sr[r] + gi), \
                  _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, zr[r] + gi)))), xg, f##r);
        ZP(0) ZP(1) ZP(2) ZP(3)
#undef ZP
    }
    return hsum4ps(f0, f1, f2, f3);
}

/* y [M, N] = (q * xs) W^T with W = (c - zero) * scale per group of Kp / G inputs: w [N, Kp / 2] codes,
   ws [N, G] fp32, wz [N, G] uint8; xb: M rows of nblk blocks (split4), xsum [M, G]; blk [nblk] */
static void int4_mm(const uint8_t* xb, int64_t nblk, const float* xs, const float* xsum, const blk4_t* blk,
                    const uint8_t* w, const float* ws, const uint8_t* wz, float* y, int64_t M, int64_t N, int64_t Kp,
                    int64_t G, int nthreads) {
    const int64_t nb = (N + 3) / 4;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t b = 0; b < nb; b++) {
        const int64_t n0 = b * 4;
        const int n = (int)(N - n0 < 4 ? N - n0 : 4);
        const uint8_t* wr[4];
        const float* sr[4];
        const uint8_t* zr[4];
        for (int r = 0; r < 4; r++) {  /* past the last row: the last row again (computed, not stored) */
            const int64_t i = n0 + (r < n ? r : n - 1);
            wr[r] = w + i * (Kp / 2), sr[r] = ws + i * G, zr[r] = wz + i * G;
        }
        for (int64_t m = 0; m < M; m++) {
            float out[4];
            _mm_storeu_ps(out, _mm_mul_ps(dot4x4(wr, sr, zr, xb + m * nblk * 4 * 64, xsum + m * G, blk, Kp, G),
                                          _mm_set1_ps(xs[m])));
            for (int r = 0; r < n; r++) y[m * N + n0 + r] = out[r];
        }
    }
}
#else
/* without AVX-512 VNNI: int16 activations, weights widened to int16 (AVX-512BW / AVX2 `vpmaddwd`, or C) */
/* sum_k w[k] * x[k] for n rows of w (row stride ldw) at once, len a multiple of 32: int32 */
INLINE void dot4(const int8_t* w, int64_t ldw, const int16_t* x, int64_t len, int n, int32_t* out) {
#if defined(__AVX512BW__)
    __m512i acc[4] = {Z512, Z512, Z512, Z512};
    for (int64_t k = 0; k < len; k += 32) {
        __m512i xv = _mm512_loadu_si512((const void*)(x + k));
        for (int r = 0; r < n; r++) {
            if ((k & 63) == 0) _mm_prefetch((const char*)(w + r * ldw + k + PF_BYTES), _MM_HINT_T0);
            __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + r * ldw + k)));
            acc[r] = _mm512_add_epi32(acc[r], _mm512_madd_epi16(wv, xv));
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
static void int8_mm(const int16_t* xq, const float* xs, const int8_t* w, const float* ws, float* y,
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
static int int4_block(int64_t g) {
#if defined(W512)
    return g % 64 == 0 ? 64 : 32;
#else
    return 32;
#endif
}

/* as quant_row, reordered for int4, plus each group's input sum xsum [M, Kp / g] int32 */
static void quant_rows_i4(const float* x, int64_t M, int64_t K, int64_t Kp, int64_t g, int16_t* xq, float* xs,
                          int32_t* xsum) {
    const int pb = int4_block(g);
    int16_t tmp[64];
    for (int64_t m = 0; m < M; m++) xs[m] = quant_row(x + m * K, K, Kp, xq + m * Kp);
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
                    a[r] = _mm512_add_epi32(a[r], _mm512_add_epi32(_mm512_madd_epi16(lo, xe),
                                                                   _mm512_madd_epi16(hi, xo)));
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
   ws [N, G] fp32 scales, wz [N, G] uint8 zero points; xq, xs, xsum from quant_rows_i4 */
static void int4_mm(const int16_t* xq, const float* xs, const int32_t* xsum, const uint8_t* w, const float* ws,
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
#endif

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

int llmkit_int8_linear(const float* x, int64_t M, int64_t K, const int8_t* w, const float* ws,
                       const int32_t* wsum, float* y, int64_t N, int64_t Kp, int64_t G, int nthreads) {
#if defined(BYTE_ACT)
    const int64_t Kx = (Kp + 63) / 64 * 64;
    uint8_t* xb = (uint8_t*)scratch(M * 2 * Kx + M * 4 + Kp * 2);
    if (!xb) return 1;
    float* xs = (float*)(xb + M * 2 * Kx);
    int16_t* q = (int16_t*)(xs + M);
    for (int64_t m = 0; m < M; m++) {
        xs[m] = quant_row(x + m * K, K, Kp, q);
        split8(q, Kp, Kx, xb + m * 2 * Kx, xb + m * 2 * Kx + Kx);
    }
    int8_mm(xb, Kx, xs, w, ws, wsum, y, M, N, Kp, G, nthreads);
#else
    (void)wsum;
    int16_t* xq = (int16_t*)scratch(M * Kp * 2 + M * 4);
    if (!xq) return 1;
    float* xs = (float*)(xq + M * Kp);  /* Kp % 32 == 0: aligned */
    for (int64_t m = 0; m < M; m++) xs[m] = quant_row(x + m * K, K, Kp, xq + m * Kp);
    int8_mm(xq, xs, w, ws, y, M, N, Kp, G, nthreads);
#endif
    return 0;
}

int llmkit_int4_linear(const float* x, int64_t M, int64_t K, const uint8_t* w, const float* ws, const uint8_t* wz,
                       float* y, int64_t N, int64_t Kp, int64_t G, int nthreads) {
#if defined(BYTE_ACT)
    const int64_t nblk = (Kp + I4B - 1) / I4B, g = Kp / G;
    uint8_t* xb = (uint8_t*)scratch(M * nblk * 256 + nblk * (int64_t)sizeof(blk4_t) + M * 4 + M * G * 4 + Kp * 2);
    if (!xb) return 1;
    blk4_t* blk = (blk4_t*)(xb + M * nblk * 256);
    float* xs = (float*)(blk + nblk);
    float* xsum = xs + M;
    int16_t* q = (int16_t*)(xsum + M * G);
    for (int64_t b = 0; b < nblk; b++) {
        const int64_t k0 = b * I4B, last = (k0 + I4B < Kp ? k0 + I4B : Kp) - 1;
        blk[b].gi = k0 / g;
        blk[b].ms = (__mmask16)((1u << (last / g - k0 / g + 1)) - 1);
        for (int j = 0; j < 16; j++) blk[b].lane[j] = (int32_t)((k0 + 8 * j) / g - k0 / g);
    }
    for (int64_t m = 0; m < M; m++) {
        xs[m] = quant_row(x + m * K, K, Kp, q);
        for (int64_t gi = 0; gi < G; gi++) {
            int32_t t = 0;
            for (int64_t k = gi * g; k < (gi + 1) * g; k++) t += q[k];
            xsum[m * G + gi] = (float)t;
        }
        split4(q, Kp, xb + m * nblk * 256);
    }
    int4_mm(xb, nblk, xs, xsum, blk, w, ws, wz, y, M, N, Kp, G, nthreads);
#else
    int16_t* xq = (int16_t*)scratch(M * Kp * 2 + M * 4 + M * G * 4);
    if (!xq) return 1;
    float* xs = (float*)(xq + M * Kp);
    int32_t* xsum = (int32_t*)(xs + M);
    quant_rows_i4(x, M, K, Kp, Kp / G, xq, xs, xsum);
    int4_mm(xq, xs, xsum, w, ws, wz, y, M, N, Kp, G, nthreads);
#endif
    return 0;
}

/* one quantized layer's fixed arguments, bound once from Python (`QuantMatmul`): int8 (aux = wsum [N, G]) or
   int4 (aux = zeros [N, G]) */
typedef struct { const void* w; const float* ws; const void* aux; int64_t N, Kp, G, bits; } llmkit_qlayer;
int llmkit_qlinear(const llmkit_qlayer* p, const float* x, float* y, int64_t M, int64_t K, int nthreads) {
    if (p->bits == 8)
        return llmkit_int8_linear(x, M, K, (const int8_t*)p->w, p->ws, (const int32_t*)p->aux, y, p->N, p->Kp, p->G,
                                  nthreads);
    return llmkit_int4_linear(x, M, K, (const uint8_t*)p->w, p->ws, (const uint8_t*)p->aux, y, p->N, p->Kp, p->G,
                              nthreads);
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
    lib.llmkit_qlinear.argtypes = [p, p, p, i64, i64, ctypes.c_int]
    lib.llmkit_qlinear.restype = ctypes.c_int
    return lib


def _lib() -> ctypes.CDLL | None:
    return None if os.environ.get("LLMKIT_NO_KERNELS") else build()


def available() -> bool:
    """True when llmkit's kernels are compiled (or cached) and loaded (not with LLMKIT_NO_KERNELS=1)."""
    return _lib() is not None


class QuantMatmul:
    """y [..., N] = x [..., K] (fp32) times W^T for one int8 or int4 weight, its fixed arguments bound once (a
    decode step makes ~30 of these calls: the ctypes call converts 6 arguments instead of 11). Keeps the
    tensors alive; a caller whose weights change builds a new one. `in_features`: the K every x must have
    (default: any K up to the padded Kp). See `int8_mm` / `int4_mm` for the layouts."""

    def __init__(self, bits: int, w: Tensor, scales: Tensor, aux: Tensor, lib: ctypes.CDLL,
                 in_features: int | None = None) -> None:
        self.tensors = (w, scales, aux)
        self.N, self.Kp = w.shape[0], w.shape[1] * (2 if bits == 4 else 1)
        self.K = in_features
        self._plan = (ctypes.c_int64 * 7)(w.data_ptr(), scales.data_ptr(), aux.data_ptr(), self.N, self.Kp,
                                          scales.shape[1], bits)
        self._addr, self._call = ctypes.addressof(self._plan), lib.llmkit_qlinear

    def __call__(self, x: Tensor) -> Tensor:
        K, N = x.shape[-1], self.N
        if K != self.K and (self.K is not None or K > self.Kp):
            raise InputError(f"the input has {K} features, the quantized layer takes {self.K or f'up to {self.Kp}'}")
        if x.dtype is not torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        y = torch.empty(*x.shape[:-1], N)  # (x.shape[:-1] + (N,) costs a microsecond more)
        if self._call(self._addr, x.data_ptr(), y.data_ptr(), y.numel() // N, K, torch.get_num_threads()):
            raise MemoryError(f"QuantMatmul: no memory for the activation scratch of {tuple(x.shape)}")
        return y


def int8_mm(x: Tensor, w: Tensor, scales: Tensor, wsum: Tensor | None = None,
            lib: ctypes.CDLL | None = None) -> Tensor:
    """y [..., N] = x [..., K] (fp32) times W^T, W = w [N, Kp] int8 (Kp a multiple of 32, zero columns past K)
    * scales [N, G] (fp32, groups of Kp / G inputs). `wsum` [N, G] int32 = each group's sum of w
    (`int8_wsum`; computed here when not given). Requires `available()` (or a `build()`)."""
    wsum = int8_wsum(w, scales.shape[1]) if wsum is None else wsum
    return QuantMatmul(8, w, scales, wsum, lib or _lib())(x)


def int8_wsum(w: Tensor, groups: int) -> Tensor:
    """Each group's sum of the int8 weights w [N, Kp] -> [N, groups] int32 (the AVX-512 VNNI kernel's
    correction for its unsigned activation bytes)."""
    out = torch.empty(w.shape[0], groups, dtype=torch.int32)
    v = w.view(w.shape[0], groups, -1)
    for i in range(0, w.shape[0], 2048):  # in blocks of rows: the sum widens them (an LM head would take 64 MB)
        torch.sum(v[i : i + 2048], -1, dtype=torch.int32, out=out[i : i + 2048])
    return out


def int4_mm(x: Tensor, w: Tensor, scales: Tensor, zeros: Tensor, lib: ctypes.CDLL | None = None) -> Tensor:
    """y [..., N] = x [..., K] (fp32) times W^T, W = (q - zero) * scale per group: w [N, Kp / 2] uint8 codes (two
    per byte, low nibble first; Kp a multiple of the group), scales [N, G] fp32, zeros [N, G] uint8 (group
    Kp / G, a multiple of 32 up to 256). Requires `available()` (or a `build()`)."""
    return QuantMatmul(4, w, scales, zeros, lib or _lib())(x)


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
