"""llmkit's own CPU matmul kernel for int8 weights: y = x W^T with W int8 [N, K] and scales [N, G].

Why (measured on the dev box's AMD EPYC, 1 thread, batch 1): PyTorch's `_weight_int8pack_mm` runs its
vectorised path only with bf16 activations and scales (a rounding step on each) and still reads the
weights at about half llama.cpp q8_0's speed. This kernel quantizes each activation row to int16
(one fp32 scale per row, 15 bits: 256x finer than llama.cpp's int8 activations) and multiplies with
integer dot products (AVX-512 VNNI `vpdpwssd`, AVX-512BW / AVX2 `vpmaddwd`, or plain C), exact int32
sums per weight group, fp32 scales. Group-wise weights (`G` groups of K / G inputs) run at the same
speed as per-channel ones.

The C source is compiled with the system C compiler (`cc`, `-O3 -march=native -fopenmp`) on first use
and cached under `~/.cache/llmkit/kernels` (or `$LLMKIT_KERNEL_DIR`); without a compiler, or with
`LLMKIT_NO_KERNELS=1`, `available()` is False, a warning says why once, and the quantized kinds use
PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
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

#define XMAX 16383.0f   /* int16 activations kept within +-2^14: int32 sums cannot overflow (chunks) */
#define CHUNK 8192      /* inputs summed in int32 lanes before going to fp32: 8 or more lanes, each sums
                           at most 1024 products of 127 * 16383, < 2^31 */

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
    __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int64_t k = 0; k < len; k += 32) {
        __m512i xv = _mm512_loadu_si512((const void*)(x + k));
        for (int r = 0; r < n; r++) {
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
    __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int64_t k = 0; k < len; k += 16) {
        __m256i xv = _mm256_loadu_si256((const __m256i*)(x + k));
        for (int r = 0; r < n; r++) {
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
def _lib() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with one warning saying why)."""
    if os.environ.get("LLMKIT_NO_KERNELS"):
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    key = hashlib.sha256((C_SOURCE + _cpu_id() + str(cc)).encode()).hexdigest()[:16]
    path = _cache_dir() / f"llmkit_kernels_{key}.so"
    if not path.exists():
        if cc is None:
            warnings.warn("llmkit: no C compiler (cc/gcc) found: int8 layers use PyTorch's "
                          "_weight_int8pack_mm (bf16 activations, slower); install gcc for llmkit's kernel",
                          stacklevel=3)
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, out = Path(tmp) / "k.c", Path(tmp) / "k.so"
            src.write_text(C_SOURCE)
            flags = ["-O3", "-shared", "-fPIC", "-fopenmp"]
            flags += ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []
            r = subprocess.run([cc, *flags, str(src), "-o", str(out), "-lm"], capture_output=True, text=True)
            if r.returncode != 0:
                warnings.warn(f"llmkit: compiling the int8 kernel failed ({cc}): {r.stderr.strip()[:500]}; "
                              "int8 layers use PyTorch's _weight_int8pack_mm", stacklevel=3)
                return None
            os.replace(out, path)  # atomic: concurrent first uses each build, one wins
    lib = ctypes.CDLL(str(path))
    p = ctypes.c_void_p
    i64 = ctypes.c_int64
    lib.llmkit_quant_rows.argtypes = [p, i64, i64, i64, p, p]
    lib.llmkit_quant_rows.restype = None
    lib.llmkit_int8_mm.argtypes = [p, p, p, p, p, i64, i64, i64, i64, ctypes.c_int]
    lib.llmkit_int8_mm.restype = None
    return lib


def available() -> bool:
    """True when llmkit's int8 kernel is compiled (or cached) and loaded."""
    return _lib() is not None


def int8_mm(x: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    """y [M, N] = x [M, K] (fp32) times W^T, W = w [N, Kp] int8 (Kp a multiple of 32, zero columns past K)
    * scales [N, G] (fp32, groups of Kp / G inputs). Requires `available()`."""
    lib = _lib()
    M, K = x.shape
    N, Kp = w.shape
    x = x.float().contiguous()
    xq = torch.empty(M, Kp, dtype=torch.int16)
    xs = torch.empty(M, dtype=torch.float32)
    y = torch.empty(M, N, dtype=torch.float32)
    lib.llmkit_quant_rows(x.data_ptr(), M, K, Kp, xq.data_ptr(), xs.data_ptr())
    lib.llmkit_int8_mm(xq.data_ptr(), xs.data_ptr(), w.data_ptr(), scales.data_ptr(), y.data_ptr(),
                       M, N, Kp, scales.shape[1], torch.get_num_threads())
    return y
