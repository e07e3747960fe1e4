"""Where batch-1 decoding's time goes: oneDNN's packed bf16 product against hand-written AVX-512 kernels and a
plain read of the same bytes, for the linear shapes of SmolLM2-135M (issue 19, docs/BENCHMARKS.md).

    pip install ninja   # torch's inline C++ build uses it; needs a CPU with avx512_bf16
    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/gemv_kernels.py

Each shape is timed over enough distinct weight matrices that they do not fit in the caches (as in decoding, where
every step reads all 269 MB): microseconds per product, the weight bytes read per second, and whether the kernel's
bf16 output equals oneDNN's. The kernels: `dot_four_rows` (vdpbf16ps, four rows at a time), `dot_two_rows` (two
rows, two accumulators each, software prefetch), `fma_two_rows` (bf16 widened to fp32, then FMA). Not used by
loramem: a measurement of whether a hand-written kernel could read the weights faster than oneDNN does.
"""
import statistics
import tempfile
import time

import torch
from torch.utils.cpp_extension import load_inline

SHAPES = [(960, 576, 120), (576, 576, 120), (3072, 576, 60), (576, 1536, 90), (49152, 576, 5)]  # (out, in, matrices)
KERNELS = r'''
#include <torch/extension.h>
#include <immintrin.h>
// y (N) = W (N x K, bf16 row-major) . x (K, bf16), fp32 accumulation, bf16 out; K % 32 == 0, N % 4 == 0
torch::Tensor dot_four_rows(torch::Tensor W, torch::Tensor x) {
  const int64_t N = W.size(0), K = W.size(1);
  auto y = torch::empty({N}, torch::dtype(torch::kFloat32));
  const uint16_t* w = reinterpret_cast<const uint16_t*>(W.data_ptr());
  const uint16_t* xv = reinterpret_cast<const uint16_t*>(x.data_ptr());
  float* out = y.data_ptr<float>();
  for (int64_t n = 0; n < N; n += 4) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const uint16_t* r = w + n * K;
    for (int64_t k = 0; k < K; k += 32) {
      __m512bh xb = (__m512bh)_mm512_loadu_si512(xv + k);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + k), xb);
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(r + K + k), xb);
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(r + 2 * K + k), xb);
      a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(r + 3 * K + k), xb);
    }
    out[n] = _mm512_reduce_add_ps(a0); out[n + 1] = _mm512_reduce_add_ps(a1);
    out[n + 2] = _mm512_reduce_add_ps(a2); out[n + 3] = _mm512_reduce_add_ps(a3);
  }
  return y.to(torch::kBFloat16);
}
torch::Tensor fma_two_rows(torch::Tensor W, torch::Tensor x) {
  const int64_t N = W.size(0), K = W.size(1);
  auto y = torch::empty({N}, torch::dtype(torch::kFloat32));
  const uint16_t* w = reinterpret_cast<const uint16_t*>(W.data_ptr());
  auto xf = x.to(torch::kFloat32).contiguous(); const float* xv = xf.data_ptr<float>();
  float* out = y.data_ptr<float>();
  for (int64_t n = 0; n < N; n += 2) {
    const uint16_t* r = w + n * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (int64_t k = 0; k < K; k += 16) {
      __m512 xk = _mm512_loadu_ps(xv + k);
      __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(r + k))), 16));
      __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(r + K + k))), 16));
      a0 = _mm512_fmadd_ps(w0, xk, a0); a1 = _mm512_fmadd_ps(w1, xk, a1);
    }
    out[n] = _mm512_reduce_add_ps(a0); out[n + 1] = _mm512_reduce_add_ps(a1);
  }
  return y.to(torch::kBFloat16);
}
torch::Tensor dot_two_rows(torch::Tensor W, torch::Tensor x) {
  const int64_t N = W.size(0), K = W.size(1);
  auto y = torch::empty({N}, torch::dtype(torch::kFloat32));
  const uint16_t* w = reinterpret_cast<const uint16_t*>(W.data_ptr());
  const uint16_t* xv = reinterpret_cast<const uint16_t*>(x.data_ptr());
  float* out = y.data_ptr<float>();
  for (int64_t n = 0; n < N; n += 2) {
    const uint16_t* r = w + n * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    for (int64_t k = 0; k < K; k += 64) {
      _mm_prefetch((const char*)(r + 8 * K + k), _MM_HINT_T0);
      _mm_prefetch((const char*)(r + 9 * K + k), _MM_HINT_T0);
      __m512bh x0 = (__m512bh)_mm512_loadu_si512(xv + k), x1 = (__m512bh)_mm512_loadu_si512(xv + k + 32);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + k), x0);
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(r + k + 32), x1);
      b0 = _mm512_dpbf16_ps(b0, (__m512bh)_mm512_loadu_si512(r + K + k), x0);
      b1 = _mm512_dpbf16_ps(b1, (__m512bh)_mm512_loadu_si512(r + K + k + 32), x1);
    }
    out[n] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)); out[n + 1] = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
  }
  return y.to(torch::kBFloat16);
}
'''


def timed(f, count: int) -> float:
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for i in range(count):
            f(i)
        runs.append((time.perf_counter() - started) / count)
    return statistics.median(runs)


def main() -> None:
    names = ["dot_four_rows", "dot_two_rows", "fma_two_rows"]
    kernels = load_inline("gemv_kernels", cpp_sources=KERNELS, functions=names, build_directory=tempfile.mkdtemp(),
                          extra_cflags=["-O3", "-mavx512f", "-mavx512bf16", "-mavx512bw"])
    torch.set_num_threads(1)
    for n, k, count in SHAPES:
        weights = [torch.randn(n, k).to(torch.bfloat16) for _ in range(count)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
        x = torch.randn(1, k).to(torch.bfloat16)
        onednn = torch.ops.mkldnn._linear_pointwise(x, packed[0], None, "none", [], "")[0]
        paths = {"oneDNN packed": lambda i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], "")}
        paths |= {name: (lambda i, f=getattr(kernels, name): f(weights[i], x[0])) for name in names}
        paths["plain sum"] = lambda i: weights[i].sum()
        for name, f in paths.items():
            seconds = timed(f, count)
            same = "" if name in ("oneDNN packed", "plain sum") else \
                f"  equal to oneDNN: {int((f(0) == onednn).sum())}/{n}"
            print(f"{n}x{k}  {name:14s} {seconds * 1e6:8.1f} us  {n * k * 2 / seconds / 1e9:5.1f} GB/s{same}")


if __name__ == "__main__":
    main()
