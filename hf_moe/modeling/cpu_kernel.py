"""A fused CPU kernel for routed experts with few rows each: decoding, one token or a batch.

Why: a decoding step gives each expert a handful of rows, and MKL's matrix-vector and small-row GEMMs stream
the weights at a third to a half of what the memory delivers (BENCHMARKS.md, "Few rows per expert"). The step
is bound by weight bytes, so this kernel reads each routed expert's weights once, straight from memory, and
does everything else in the same pass:

    out[t] = sum over the slots s of token t:  w_s * down[e_s] @ (act(gate[e_s] @ x[t]) * (up[e_s] @ x[t]))

One call per MoE layer: no gather of the routed rows, no padding, no separate activation, weighting or combine.
Each weight row is dotted with up to 8 token rows while it sits in L1; from 5 rows on two weight rows go through
together, sharing the token rows' loads, and their streams are prefetched ahead. The vectors are one register
wide (16 floats with AVX-512, 8 with AVX2), so the accumulators stay in registers on either.
Phase 1 splits the active experts' gate/up rows across threads and writes h (S, I); phase 2 splits the output
columns, so each thread owns its columns of `out` for every expert: no atomics, and the sum over a token's
experts runs in one fixed order (deterministic).

The C++ source below is compiled once per machine and torch build with the system's C++ compiler (`$CXX`, else
`c++`) into `$HF_MOE_KERNEL_CACHE` (default `~/.cache/hf_moe/kernels`), `-march=native` (or
`$HF_MOE_KERNEL_MARCH`, e.g. `x86-64-v3` for an AVX2 build on an AVX-512 machine), so the cache key includes the
CPU and the level. It is kept here as a string so the file ships as Hub remote code with the rest of the folder.
Float32 or bfloat16 weights (bfloat16 widened to float32 as it is loaded: half the bytes, float32 arithmetic),
inference only; the experts implementation "hf_moe"/"hf_moe_cpu" calls it as the setting
`HF_MOE_CPU_SMALL_GROUPS` says (experts.py).

The same library holds the three grouped products of CPU training in float32 (`grouped_times_transposed`,
`grouped_times`, `grouped_weight_grad`): x @ W.T and g @ W per expert group, and the per-expert weight gradients
g.T @ a. MKL packs each weight matrix before a product, and its fp32 GEMMs on AMD CPUs reach about half of what
these tiles do (BENCHMARKS.md, "Grouped products for CPU training"); here each weight row streams from memory into
register tiles once per group of rows (a column slab is copied only when several row tiles pass over it, as rows a
power of two bytes apart evict each other from the cache), and the sums are split every 256 rows so that long
reductions keep float32 accuracy.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

KERNEL_CACHE_ENV = "HF_MOE_KERNEL_CACHE"
KERNEL_MARCH_ENV = "HF_MOE_KERNEL_MARCH"

# The expert activations the kernel computes (ACT2FN names -> the kernel's code); others take the other kernels.
ACTIVATION_CODES = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "gelu_new": 2}

_SOURCE = r"""
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/empty.h>
#include <algorithm>
#include <cmath>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <vector>

namespace {

// One vector register of floats: 16 with AVX-512, 8 with AVX2 (GCC vector extensions; -march=native picks the
// instructions). The width follows the register file: AVX2 has 16 registers, so an 8-row tile of 16-float vectors
// (two registers apiece) spilled its accumulators and trailed the vendor's bmm 3.7x at 16 rows per expert.
#ifdef __AVX512F__
#define HF_MOE_LANES 16
#else
#define HF_MOE_LANES 8
#endif
constexpr int64_t kLanes = HF_MOE_LANES;
typedef float vec __attribute__((vector_size(4 * HF_MOE_LANES)));
typedef uint16_t u16vec __attribute__((vector_size(2 * HF_MOE_LANES)));
typedef uint32_t u32vec __attribute__((vector_size(4 * HF_MOE_LANES)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

constexpr int64_t kTile = 8;    // activation rows per pass over a weight row (the weight row stays in L1)
constexpr int64_t kBlock = 16;  // weight rows per work item
constexpr int64_t kPrefetchBytes = 4096;  // how far ahead a weight stream is prefetched, in the two-row form
// Tiles of this many rows or more pass over two weight rows at once, sharing the loads of the token rows. The
// two-row form holds 2N accumulators: up to 16 rows' worth in AVX-512's 32 registers; with AVX2's 16 registers a
// pass holds at most 6 rows (12 + 2 weight vectors + 1 token vector), so 7-8-row tiles go as 4 + the rest.
constexpr int64_t kTwoRowsFrom = 5;
#ifdef __AVX512F__
constexpr int64_t kTwoRowsMaxPass = 8;
#else
constexpr int64_t kTwoRowsMaxPass = 6;
#endif

// Weights are float32 or bfloat16 (stored as uint16_t: the upper half of a float32), widened to float32 as they
// are loaded: the arithmetic is float32 either way, and bfloat16 halves the bytes a decoding step reads.
inline vec loadv(const float* p) {
  vec v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline vec loadv(const uint16_t* p) {
  u16vec b;
  __builtin_memcpy(&b, p, sizeof(b));
  const u32vec w = __builtin_convertvector(b, u32vec) << 16;
  vec v;
  __builtin_memcpy(&v, &w, sizeof(v));
  return v;
}
inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  const uint32_t w = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &w, sizeof(f));
  return f;
}
// One prefetch per 64-byte line of float32 weights (every vector with AVX-512, every other one with AVX2).
template <typename W>
inline void prefetch_ahead(const W* p, int64_t j) {
  if ((j * static_cast<int64_t>(sizeof(W))) % 64 == 0)
    __builtin_prefetch(reinterpret_cast<const char*>(p + j) + kPrefetchBytes, 0, 0);
}

// The sum of the lanes as a tree of vector adds (shorter than a chain of scalar adds).
inline float hsum(vec v) {
  v8 s8;
#if HF_MOE_LANES == 16
  v8 lo, hi;
  __builtin_memcpy(&lo, &v, sizeof(lo));
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  s8 = lo + hi;
#else
  s8 = v;
#endif
  v4 a, b;
  __builtin_memcpy(&a, &s8, sizeof(a));
  __builtin_memcpy(&b, reinterpret_cast<const char*>(&s8) + sizeof(a), sizeof(b));
  const v4 s4 = a + b;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// acc[m] = dot(rows[m], w) for m < N, each of length k. N is a template argument so that the N accumulators
// live in registers (a runtime bound makes the compiler keep them in memory). With fewer than 4 rows each
// accumulator would be a chain of dependent multiply-adds (4 cycles apiece), so U interleaved chains run over j.
template <int N, typename W>
inline void dots_n(const float* const* rows, const W* w, int64_t k, float* acc) {
  constexpr int U = N == 1 ? 4 : N < 4 ? 2 : 1;
  vec a[U][N];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < N; ++m) a[u][m] = vec{};
  int64_t j = 0;
  for (; j + kLanes * U <= k; j += kLanes * U) {
    for (int u = 0; u < U; ++u) {
      const vec wv = loadv(w + j + kLanes * u);
      for (int m = 0; m < N; ++m) {
        vec xv;
        __builtin_memcpy(&xv, rows[m] + j + kLanes * u, sizeof(xv));
        a[u][m] += xv * wv;
      }
    }
  }
  for (; j + kLanes <= k; j += kLanes) {
    const vec wv = loadv(w + j);
    for (int m = 0; m < N; ++m) {
      vec xv;
      __builtin_memcpy(&xv, rows[m] + j, sizeof(xv));
      a[0][m] += xv * wv;
    }
  }
  for (int m = 0; m < N; ++m) {
    vec t = a[0][m];
    for (int u = 1; u < U; ++u) t += a[u][m];
    float s = hsum(t);
    for (int64_t jj = j; jj < k; ++jj) s += rows[m][jj] * widen(w[jj]);
    acc[m] = s;
  }
}

// dots_n for a runtime n <= kTile.
template <typename W>
inline void dots(const float* const* rows, int64_t n, const W* w, int64_t k, float* acc) {
  switch (n) {
    case 1: return dots_n<1>(rows, w, k, acc);
    case 2: return dots_n<2>(rows, w, k, acc);
    case 3: return dots_n<3>(rows, w, k, acc);
    case 4: return dots_n<4>(rows, w, k, acc);
    case 5: return dots_n<5>(rows, w, k, acc);
    case 6: return dots_n<6>(rows, w, k, acc);
    case 7: return dots_n<7>(rows, w, k, acc);
    default: return dots_n<8>(rows, w, k, acc);
  }
}

// The two-row form, for tiles of kTwoRowsFrom rows or more: acc[r * stride + m] = dot(rows[m], w[r]) for r < 2.
// The two weight rows share every load of a token row (N + 2 loads for 2N multiply-adds, against N + 1 for N),
// and the weight streams are prefetched ahead: with this much arithmetic per byte the hardware prefetcher falls
// behind (BENCHMARKS.md, "Few rows per expert": 1.5x at 8 rows per expert; it slowed 1-4 rows, so not there).
template <int N, typename W>
inline void dots2_n(const float* const* rows, const W* const* w, int64_t k, float* acc, int64_t stride) {
  static_assert(N <= kTwoRowsMaxPass, "the 2N accumulators must fit the vector registers");
  vec a[2][N];
  for (int r = 0; r < 2; ++r)
    for (int m = 0; m < N; ++m) a[r][m] = vec{};
  int64_t j = 0;
  for (; j + kLanes <= k; j += kLanes) {
    const vec w0 = loadv(w[0] + j), w1 = loadv(w[1] + j);
    prefetch_ahead(w[0], j);
    prefetch_ahead(w[1], j);
    for (int m = 0; m < N; ++m) {
      vec xv;
      __builtin_memcpy(&xv, rows[m] + j, sizeof(xv));
      asm("" : "+v"(xv));  // one load of xv for both rows, not one folded into each multiply-add
      a[0][m] += xv * w0;
      a[1][m] += xv * w1;
    }
  }
  for (int r = 0; r < 2; ++r)
    for (int m = 0; m < N; ++m) {
      float s = hsum(a[r][m]);
      for (int64_t jj = j; jj < k; ++jj) s += rows[m][jj] * widen(w[r][jj]);
      acc[r * stride + m] = s;
    }
}

// acc[m] = dot(rows[m], w0) and acc[n + m] = dot(rows[m], w1) for a runtime n <= kTile.
template <typename W>
inline void dots2(const float* const* rows, int64_t n, const W* w0, const W* w1, int64_t k, float* acc) {
  if (n < kTwoRowsFrom) {
    dots(rows, n, w0, k, acc);
    dots(rows, n, w1, k, acc + n);
    return;
  }
  const W* w[2] = {w0, w1};
  if (n == 5) return dots2_n<5>(rows, w, k, acc, n);
  if (n == 6) return dots2_n<6>(rows, w, k, acc, n);
  if constexpr (kTwoRowsMaxPass >= kTile) {
    if (n == 7) return dots2_n<7>(rows, w, k, acc, n);
    return dots2_n<8>(rows, w, k, acc, n);
  } else {
    // AVX2: 7-8 rows as a 4-row pass and a 3-4-row one; the two weight rows stay in L1 for the second pass.
    dots2_n<4>(rows, w, k, acc, n);
    if (n == 7) return dots2_n<3>(rows + 4, w, k, acc + 4, n);
    return dots2_n<4>(rows + 4, w, k, acc + 4, n);
  }
}

inline float activate(float g, int64_t act) {
  if (act == 0) return g / (1.f + std::exp(-g));                             // silu
  if (act == 1) return 0.5f * g * (1.f + std::erf(g * 0.70710678118654752f));  // gelu (erf)
  const float c = 0.7978845608028654f;                                       // gelu, tanh approximation
  return 0.5f * g * (1.f + std::tanh(c * (g + 0.044715f * g * g * g)));
}

// Both phases, for weights of type W (float, or uint16_t holding bfloat16); x, h and out are float32.
template <typename W>
void run_experts(const float* xp, const int64_t* tok, const std::vector<int64_t>& start,
                 const std::vector<int64_t>& active, const float* wp, const W* gup, const W* dp, float* hp, float* op,
                 int64_t H, int64_t I, int64_t S, int64_t act) {
  std::vector<const float*> xrows(S), hrows(S);
  for (int64_t s = 0; s < S; ++s) {
    xrows[s] = xp + tok[s] * H;
    hrows[s] = hp + s * I;
  }
  const int64_t num_active = static_cast<int64_t>(active.size());
  // Phase 1: h[s, j] = act(gate_j . x[s]) * (up_j . x[s]), work items = (active expert, block of j).
  const int64_t blocks1 = (I + kBlock - 1) / kBlock;
  at::parallel_for(0, num_active * blocks1, 1, [&](int64_t begin, int64_t end) {
    float gu[2 * kTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t e = active[item / blocks1], j0 = (item % blocks1) * kBlock, j1 = std::min(I, j0 + kBlock);
      const W* Wg = gup + e * 2 * I * H;
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t m0 = start[e]; m0 < start[e + 1]; m0 += kTile) {
          const int64_t n = std::min(kTile, start[e + 1] - m0);
          dots2(xrows.data() + m0, n, Wg + j * H, Wg + (I + j) * H, H, gu);  // gate row j, up row j
          for (int64_t m = 0; m < n; ++m) hp[(m0 + m) * I + j] = activate(gu[m], act) * gu[n + m];
        }
      }
    }
  });
  // Phase 2: out[token[s], c] += w[s] * (down_c . h[s]), work items = blocks of output columns c, every expert
  // inside one item: a thread owns its columns, and a token's experts add up in expert order.
  const int64_t blocks2 = (H + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks2, 1, [&](int64_t begin, int64_t end) {
    float acc[2 * kTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c0 = item * kBlock, c1 = std::min(H, c0 + kBlock);
      for (int64_t a = 0; a < num_active; ++a) {
        const int64_t e = active[a];
        const W* Wd = dp + e * H * I;
        for (int64_t c = c0; c < c1; c += 2) {
          const int64_t cols = std::min<int64_t>(2, c1 - c);  // output columns c (and c + 1)
          for (int64_t m0 = start[e]; m0 < start[e + 1]; m0 += kTile) {
            const int64_t n = std::min(kTile, start[e + 1] - m0);
            if (cols == 2) dots2(hrows.data() + m0, n, Wd + c * I, Wd + (c + 1) * I, I, acc);
            else dots(hrows.data() + m0, n, Wd + c * I, I, acc);
            for (int64_t r = 0; r < cols; ++r)
              for (int64_t m = 0; m < n; ++m) op[tok[m0 + m] * H + c + r] += wp[m0 + m] * acc[r * n + m];
          }
        }
      }
    }
  });
}

// The group boundaries from the per-expert counts, checked against the rows.
std::vector<int64_t> group_starts(at::IntArrayRef counts, int64_t S, std::vector<int64_t>* active,
                                  const char* op) {
  const int64_t E = static_cast<int64_t>(counts.size());
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(counts[e] >= 0, "hf_moe ", op, ": negative count");
    start[e + 1] = start[e] + counts[e];
    if (counts[e] > 0 && active != nullptr) active->push_back(e);
  }
  TORCH_CHECK(start[E] == S, "hf_moe ", op, ": counts add up to ", start[E], ", not to the ", S, " rows");
  return start;
}

at::Tensor fused_experts(const at::Tensor& x, const at::Tensor& token, at::IntArrayRef counts,
                         const at::Tensor& weights, const at::Tensor& gate_up, const at::Tensor& down,
                         int64_t act) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && gate_up.scalar_type() == dtype &&
                  down.scalar_type() == dtype,
              "hf_moe fused_experts: x, gate_up_proj and down_proj must all be float32 or all bfloat16");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "hf_moe fused_experts: x must be a contiguous (T, H) tensor");
  TORCH_CHECK(gate_up.dim() == 3 && gate_up.is_contiguous() && down.dim() == 3 && down.is_contiguous(),
              "hf_moe fused_experts: gate_up_proj (E, 2I, H) and down_proj (E, H, I) must be contiguous");
  const int64_t T = x.size(0), H = x.size(1), E = gate_up.size(0), I = down.size(2);
  TORCH_CHECK(gate_up.size(1) == 2 * I && gate_up.size(2) == H && down.size(0) == E && down.size(1) == H,
              "hf_moe fused_experts: expert weight shapes do not match x");
  TORCH_CHECK(static_cast<int64_t>(counts.size()) == E, "hf_moe fused_experts: counts needs one entry per expert");
  const int64_t S = token.numel();
  TORCH_CHECK(token.scalar_type() == at::kLong && token.is_contiguous() && weights.numel() == S &&
                  weights.scalar_type() == at::kFloat && weights.is_contiguous(),
              "hf_moe fused_experts: token (S,) int64 and weights (S,) float32, contiguous");
  std::vector<int64_t> active;
  const auto start = group_starts(counts, S, &active, "fused_experts");
  const int64_t* tok = token.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(tok[s] >= 0 && tok[s] < T, "hf_moe fused_experts: token out of range");

  // float32 throughout inside: x widened once (T x H, small), the output rounded back to x's dtype at the end.
  const at::Tensor xf = dtype == at::kFloat ? x : x.to(at::kFloat);
  at::Tensor out = at::zeros({T, H}, xf.options());
  if (S == 0) return dtype == at::kFloat ? out : out.to(dtype);
  at::Tensor h = at::empty({S, I}, xf.options());
  if (dtype == at::kFloat) {
    run_experts(xf.data_ptr<float>(), tok, start, active, weights.data_ptr<float>(), gate_up.data_ptr<float>(),
                down.data_ptr<float>(), h.data_ptr<float>(), out.data_ptr<float>(), H, I, S, act);
    return out;
  }
  run_experts(xf.data_ptr<float>(), tok, start, active, weights.data_ptr<float>(),
              reinterpret_cast<const uint16_t*>(gate_up.data_ptr<at::BFloat16>()),
              reinterpret_cast<const uint16_t*>(down.data_ptr<at::BFloat16>()), h.data_ptr<float>(),
              out.data_ptr<float>(), H, I, S, act);
  return out.to(dtype);
}

// ---- Training: the grouped products of few-row groups (float32), forward and backward ----
// MKL packs a weight matrix before each product; at a few rows per expert the packing costs as much as the
// arithmetic, and its small-row paths reach half the dense layer's FLOP rate (BENCHMARKS.md, "Few rows per
// expert, training"). These read each weight row straight from memory. Rows are sorted by expert: group e is
// rows start[e] .. start[e + 1]. Every output element is written by one thread, summing in a fixed order.

// out[s, n] = x[s, :] . W[e][n, :] (W (E, N, K)): the forward's products, as dots of each weight row pair with
// the group's rows (the decoding kernel's tiles); work items = (active expert, block of weight rows).
void run_grouped_nt(const float* x, const float* W, float* out, const std::vector<int64_t>& start,
                    const std::vector<int64_t>& active, int64_t N, int64_t K) {
  const int64_t S = start.back();
  std::vector<const float*> rows(S);
  for (int64_t s = 0; s < S; ++s) rows[s] = x + s * K;
  const int64_t blocks = (N + kBlock - 1) / kBlock, num_active = static_cast<int64_t>(active.size());
  at::parallel_for(0, num_active * blocks, 1, [&](int64_t begin, int64_t end) {
    float acc[2 * kTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t e = active[item / blocks], n0 = (item % blocks) * kBlock, n1 = std::min(N, n0 + kBlock);
      const float* We = W + e * N * K;
      // Row tiles outside, weight rows inside: a tile's rows stay in L1 while the block's weight rows (L2) pass.
      for (int64_t m0 = start[e]; m0 < start[e + 1]; m0 += kTile) {
        const int64_t m = std::min(kTile, start[e + 1] - m0);
        for (int64_t n = n0; n < n1; n += 2) {
          const int64_t cols = std::min<int64_t>(2, n1 - n);
          if (cols == 2) dots2(rows.data() + m0, m, We + n * K, We + (n + 1) * K, K, acc);
          else dots(rows.data() + m0, m, We + n * K, K, acc);
          for (int64_t r = 0; r < cols; ++r)
            for (int64_t i = 0; i < m; ++i) out[(m0 + i) * N + n + r] = acc[r * m + i];
        }
      }
    }
  });
}

// out[s, :] = sum_n g[s, n] * W[e][n, :]: the backward's input-side products (W as stored, not transposed). A tile
// of R rows x V vectors of columns accumulates in registers while the weight rows stream past.
#ifdef __AVX512F__
constexpr int64_t kNNRows = 6, kNNVecs = 4;  // 24 accumulators + 4 weight vectors of 32 registers
#else
constexpr int64_t kNNRows = 6, kNNVecs = 2;  // 12 + 2 of 16
#endif
constexpr int64_t kNNPrefetchRows = 8;  // the weight rows are kNNVecs vectors apart by a row stride: prefetched

constexpr int64_t kNNSumRows = 256;  // weight rows summed per partial sum (a long chain loses float32 bits)

template <int R, int V>
inline void nn_tile(const float* g, int64_t ldg, const float* w, int64_t N, int64_t ldw, float* out, int64_t ldo) {
  for (int64_t n0 = 0; n0 < N; n0 += kNNSumRows) {
    const int64_t n1 = std::min(N, n0 + kNNSumRows);
    vec a[R][V];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) a[r][v] = vec{};
    for (int64_t n = n0; n < n1; ++n) {
      const float* wn = w + n * ldw;
      for (int v = 0; v < V; v += 64 / (4 * kLanes) > 0 ? 64 / (4 * kLanes) : 1)
        __builtin_prefetch(wn + kNNPrefetchRows * ldw + v * kLanes, 0, 0);
      vec wv[V];
      for (int v = 0; v < V; ++v) wv[v] = loadv(wn + v * kLanes);
      for (int r = 0; r < R; ++r) {
        const float s = g[r * ldg + n];
        for (int v = 0; v < V; ++v) a[r][v] += s * wv[v];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) {
        float* o = out + r * ldo + v * kLanes;
        if (n0 > 0) a[r][v] += loadv(o);
        __builtin_memcpy(o, &a[r][v], sizeof(vec));
      }
  }
}

static_assert(kNNRows == 6, "nn_rows dispatches 1 to 6 rows");
template <int V>
inline void nn_rows(int64_t rows, const float* g, int64_t ldg, const float* w, int64_t N, int64_t ldw, float* out,
                    int64_t ldo) {
  switch (rows) {
    case 1: return nn_tile<1, V>(g, ldg, w, N, ldw, out, ldo);
    case 2: return nn_tile<2, V>(g, ldg, w, N, ldw, out, ldo);
    case 3: return nn_tile<3, V>(g, ldg, w, N, ldw, out, ldo);
    case 4: return nn_tile<4, V>(g, ldg, w, N, ldw, out, ldo);
    case 5: return nn_tile<5, V>(g, ldg, w, N, ldw, out, ldo);
    default: return nn_tile<kNNRows, V>(g, ldg, w, N, ldw, out, ldo);
  }
}

// out[r, :cols] = sum_n g[r, n] * b[n, :cols] for r < rows (b rows ldb apart): full-width tiles, else single
// vectors and a scalar tail for the last columns.
inline void nn_block(int64_t rows, const float* g, int64_t ldg, const float* b, int64_t ldb, int64_t N, int64_t cols,
                     float* out, int64_t ldo) {
  if (cols == kNNVecs * kLanes) return nn_rows<kNNVecs>(rows, g, ldg, b, N, ldb, out, ldo);
  int64_t k = 0;
  for (; k + kLanes <= cols; k += kLanes) nn_rows<1>(rows, g, ldg, b + k, N, ldb, out + k, ldo);
  for (; k < cols; ++k)
    for (int64_t r = 0; r < rows; ++r) {
      float s = 0.f;
      for (int64_t n0 = 0; n0 < N; n0 += kNNSumRows) {
        float part = 0.f;
        for (int64_t n = n0; n < std::min(N, n0 + kNNSumRows); ++n) part += g[r * ldg + n] * b[n * ldb + k];
        s += part;
      }
      out[r * ldo + k] = s;
    }
}

void run_grouped_nn(const float* g, const float* W, float* out, const std::vector<int64_t>& start,
                    const std::vector<int64_t>& active, int64_t N, int64_t K) {
  constexpr int64_t width = kNNVecs * kLanes;
  const int64_t tiles = (K + width - 1) / width, num_active = static_cast<int64_t>(active.size());
  at::parallel_for(0, num_active * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> slab;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t e = active[item / tiles], k0 = (item % tiles) * width, cols = std::min(K, k0 + width) - k0;
      const float* We = W + e * N * K;
      // A group of several row tiles reads the (N, width) column slab once per tile. Rows a power-of-two bytes
      // apart fall into a few cache sets and evict each other between those passes, so the slab is copied into
      // contiguous memory first (the one read from memory happens in the copy).
      const float* b = We + k0;
      int64_t ldb = K;
      if (start[e + 1] - start[e] > kNNRows) {
        slab.resize(N * width);
        for (int64_t n = 0; n < N; ++n) std::copy(We + n * K + k0, We + n * K + k0 + cols, slab.data() + n * width);
        b = slab.data();
        ldb = width;
      }
      for (int64_t m0 = start[e]; m0 < start[e + 1]; m0 += kNNRows)
        nn_block(std::min(kNNRows, start[e + 1] - m0), g + m0 * N, N, b, ldb, N, cols, out + m0 * K + k0, K);
    }
  });
}

// x @ W.T for groups of many rows: the (K, width) slab of W.T for a block of output columns is copied out
// transposed, then the g @ W tiles run on it (rows of x as g); the copy costs one pass over the weights, which
// these groups repay in arithmetic, and the tiles need no sums across the lanes.
// Rows per expert on average past which x @ W.T takes the transposed copy: it cost 2-4 ms per layer at the
// SmolLM2 shapes, and at 64 rows per expert the dots were still ahead (4.7 against 6.7 ms), at 256 behind (15.0
// against 13.1), at 1024 well behind (63 against 42).
constexpr int64_t kNTTransposedFromRows = 128;

void run_grouped_nt_transposed(const float* x, const float* W, float* out, const std::vector<int64_t>& start,
                               const std::vector<int64_t>& active, int64_t N, int64_t K) {
  constexpr int64_t width = kNNVecs * kLanes;
  const int64_t tiles = (N + width - 1) / width, num_active = static_cast<int64_t>(active.size());
  at::parallel_for(0, num_active * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> slab(K * width);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t e = active[item / tiles], n0 = (item % tiles) * width, cols = std::min(N, n0 + width) - n0;
      const float* We = W + e * N * K;
      for (int64_t j = 0; j < cols; ++j)
        for (int64_t k = 0; k < K; ++k) slab[k * width + j] = We[(n0 + j) * K + k];
      for (int64_t m0 = start[e]; m0 < start[e + 1]; m0 += kNNRows)
        nn_block(std::min(kNNRows, start[e + 1] - m0), x + m0 * K, K, slab.data(), width, K, cols,
                 out + m0 * N + n0, N);
    }
  });
}

// dW[e][n, :] = sum over the rows s of group e of g[s, n] * a[s, :]: the weight gradients. A tile of C weight rows
// x V vectors of columns accumulates over the group's rows (which stay in cache) and is stored once.
// (Tile shapes measured, BENCHMARKS.md: C must divide kBlock, or the block's last rows go one at a time.)
#ifdef __AVX512F__
constexpr int64_t kTNCols = 8, kTNVecs = 3;  // 24 accumulators + 3 row vectors of 32 registers
#else
constexpr int64_t kTNCols = 4, kTNVecs = 3;  // 12 + 3 of 16
#endif
static_assert(kBlock % kTNCols == 0, "the weight-row block splits into whole tiles");

// How tn_tile writes its sums: store, add to the partial sums there, or stream past the caches (non-temporal,
// no read of the line first; `out` rows and columns vector-aligned).
enum TnWrite { kStore, kAdd, kStream };

inline void store_streaming(float* p, const vec& v) {
#if defined(__AVX512F__)
  __m512 r;
  __builtin_memcpy(&r, &v, sizeof(r));
  _mm512_stream_ps(p, r);
#elif defined(__AVX__)
  __m256 r;
  __builtin_memcpy(&r, &v, sizeof(r));
  _mm256_stream_ps(p, r);
#else
  __builtin_memcpy(p, &v, sizeof(v));
#endif
}

template <int C, int V>
inline void tn_tile(const float* g, int64_t ldg, const float* a, int64_t lda, int64_t M, float* out, int64_t ldo,
                    TnWrite write) {
  const bool add = write == kAdd;
  vec acc[C][V];
  for (int c = 0; c < C; ++c)
    for (int v = 0; v < V; ++v) {
      acc[c][v] = vec{};
      if (add) __builtin_memcpy(&acc[c][v], out + c * ldo + v * kLanes, sizeof(vec));
    }
  for (int64_t m = 0; m < M; ++m) {
    vec av[V];
    for (int v = 0; v < V; ++v) av[v] = loadv(a + m * lda + v * kLanes);
    for (int c = 0; c < C; ++c) {
      const float s = g[m * ldg + c];
      for (int v = 0; v < V; ++v) acc[c][v] += s * av[v];
    }
  }
  for (int c = 0; c < C; ++c)
    for (int v = 0; v < V; ++v) {
      if (write == kStream) store_streaming(out + c * ldo + v * kLanes, acc[c][v]);
      else __builtin_memcpy(out + c * ldo + v * kLanes, &acc[c][v], sizeof(vec));
    }
}

// All K columns of C output rows (C = kTNCols, or 1 for the block's last rows).
template <int C>
inline void tn_cols(const float* g, int64_t ldg, const float* a, int64_t lda, int64_t M, float* out, int64_t K,
                    TnWrite write) {
  constexpr int64_t width = kTNVecs * kLanes;
  int64_t k = 0;
  for (; k + width <= K; k += width) tn_tile<C, kTNVecs>(g, ldg, a + k, lda, M, out + k, K, write);
  for (; k + kLanes <= K; k += kLanes) tn_tile<C, 1>(g, ldg, a + k, lda, M, out + k, K, write);
  for (; k < K; ++k)  // the last K % kLanes columns (never with kStream, which needs K % kLanes == 0)
    for (int c = 0; c < C; ++c) {
      float s = write == kAdd ? out[c * K + k] : 0.f;
      for (int64_t m = 0; m < M; ++m) s += g[m * ldg + c] * a[m * lda + k];
      out[c * K + k] = s;
    }
}

constexpr int64_t kTNStreamBytes = int64_t{64} << 20;  // weight gradients past this are written streaming
// Rows of `a` summed per pass: they stay in L2 across the block, and at most 256 go into one partial sum.
constexpr int64_t kTNChunkBytes = 256 * 1024;

void run_grouped_tn(const float* g, const float* a, float* out, const std::vector<int64_t>& start, int64_t E,
                    int64_t N, int64_t K) {
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  // Gradients larger than the last-level cache go to memory anyway: there each tile is written in one pass
  // (groups within one chunk of rows) with streaming stores, which skip reading the lines first (a third of
  // the traffic). Smaller ones stay cached for what reads them next.
  const bool streaming = E * N * K * 4 > kTNStreamBytes && K % kLanes == 0 &&
                         reinterpret_cast<uintptr_t>(out) % (4 * kLanes) == 0;
  at::parallel_for(0, E * blocks, 1, [&](int64_t begin, int64_t end) {
    bool streamed = false;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t e = item / blocks, n0 = (item % blocks) * kBlock, n1 = std::min(N, n0 + kBlock);
      const int64_t M = start[e + 1] - start[e];
      float* oe = out + e * N * K;
      if (M == 0) {  // an expert without rows: zero gradient
        std::fill(oe + n0 * K, oe + n1 * K, 0.f);
        continue;
      }
      // The group's rows in chunks that stay in L2 while the block's weight rows pass over them; the chunks after
      // the first add to the partial sums, in row order.
      const int64_t chunk = std::clamp<int64_t>(kTNChunkBytes / (4 * std::max<int64_t>(K, 1)), 16, 256);
      for (int64_t c0 = 0; c0 < M; c0 += chunk) {
        const int64_t rows = std::min(chunk, M - c0);
        const float* ge = g + (start[e] + c0) * N;
        const float* ae = a + (start[e] + c0) * K;
        const TnWrite write = c0 > 0 ? kAdd : streaming && M <= chunk ? kStream : kStore;
        streamed |= write == kStream;
        int64_t n = n0;
        for (; n + kTNCols <= n1; n += kTNCols) tn_cols<kTNCols>(ge + n, N, ae, K, rows, oe + n * K, K, write);
        for (; n < n1; ++n) tn_cols<1>(ge + n, N, ae, K, rows, oe + n * K, K, write);
      }
    }
#if defined(__AVX__)
    if (streamed) _mm_sfence();  // this thread's streaming stores are visible before the op returns
#endif
  });
}

void check_float_matrix(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == dim && t.is_contiguous(), "hf_moe ", op, ": ", name,
              " must be a contiguous float32 tensor of ", dim, " dimensions");
}

// x (S, K) @ weight[e].T for each group -> (S, N); weight (E, N, K).
at::Tensor grouped_nt(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef counts) {
  check_float_matrix(x, 2, "grouped_nt", "x");
  check_float_matrix(weight, 3, "grouped_nt", "weight");
  const int64_t S = x.size(0), E = weight.size(0), N = weight.size(1), K = weight.size(2);
  TORCH_CHECK(x.size(1) == K && static_cast<int64_t>(counts.size()) == E,
              "hf_moe grouped_nt: x (S, K), weight (E, N, K) and counts (E,) do not match");
  std::vector<int64_t> active;
  const auto start = group_starts(counts, S, &active, "grouped_nt");
  at::Tensor out = at::empty({S, N}, x.options());
  if (S == 0) return out;
  // Many rows per expert on average: the transposed copy pays off (BENCHMARKS.md); few: dots of each weight row.
  const bool transposed = S > kNTTransposedFromRows * static_cast<int64_t>(active.size());
  (transposed ? run_grouped_nt_transposed : run_grouped_nt)(x.data_ptr<float>(), weight.data_ptr<float>(),
                                                           out.data_ptr<float>(), start, active, N, K);
  return out;
}

// g (S, N) @ weight[e] for each group -> (S, K); weight (E, N, K).
at::Tensor grouped_nn(const at::Tensor& g, const at::Tensor& weight, at::IntArrayRef counts) {
  check_float_matrix(g, 2, "grouped_nn", "g");
  check_float_matrix(weight, 3, "grouped_nn", "weight");
  const int64_t S = g.size(0), E = weight.size(0), N = weight.size(1), K = weight.size(2);
  TORCH_CHECK(g.size(1) == N && static_cast<int64_t>(counts.size()) == E,
              "hf_moe grouped_nn: g (S, N), weight (E, N, K) and counts (E,) do not match");
  std::vector<int64_t> active;
  const auto start = group_starts(counts, S, &active, "grouped_nn");
  at::Tensor out = at::empty({S, K}, g.options());
  if (S > 0) run_grouped_nn(g.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), start, active,
                            N, K);
  return out;
}

// g[group e].T @ a[group e] for each expert -> (E, N, K), zeros for experts without rows; g (S, N), a (S, K).
at::Tensor grouped_tn(const at::Tensor& g, const at::Tensor& a, at::IntArrayRef counts) {
  check_float_matrix(g, 2, "grouped_tn", "g");
  check_float_matrix(a, 2, "grouped_tn", "a");
  const int64_t S = g.size(0), N = g.size(1), K = a.size(1), E = static_cast<int64_t>(counts.size());
  TORCH_CHECK(a.size(0) == S, "hf_moe grouped_tn: g (S, N) and a (S, K) need the same rows");
  const auto start = group_starts(counts, S, nullptr, "grouped_tn");
  at::Tensor out = at::empty({E, N, K}, g.options());
  if (E * N * K > 0) run_grouped_tn(g.data_ptr<float>(), a.data_ptr<float>(), out.data_ptr<float>(), start, E, N, K);
  return out;
}

}  // namespace

TORCH_LIBRARY(hf_moe_kernels, m) {
  m.def("fused_experts(Tensor x, Tensor token, int[] counts, Tensor weights, Tensor gate_up, Tensor down, "
        "int act) -> Tensor");
  m.def("grouped_nt(Tensor x, Tensor weight, int[] counts) -> Tensor");
  m.def("grouped_nn(Tensor g, Tensor weight, int[] counts) -> Tensor");
  m.def("grouped_tn(Tensor g, Tensor a, int[] counts) -> Tensor");
}
TORCH_LIBRARY_IMPL(hf_moe_kernels, CPU, m) {
  m.impl("fused_experts", &fused_experts);
  m.impl("grouped_nt", &grouped_nt);
  m.impl("grouped_nn", &grouped_nn);
  m.impl("grouped_tn", &grouped_tn);
}
"""

# -D_GLIBCXX_USE_CXX11_ABI as torch was built, or the std::string in its signatures would not link.
_FLAGS = [
    "-O3",
    "-march=native",
    "-std=c++20",
    "-shared",
    "-fPIC",
    "-fopenmp",
    "-w",
    f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
]
# What a -march level may use, as the compiler's macros, and the /proc/cpuinfo flag the CPU needs for it: a library
# built for more than the CPU has would die of SIGILL on its first call, so such a level is refused instead.
_ISA_MACROS = {
    "__AVX512F__": "avx512f",
    "__AVX512BW__": "avx512bw",
    "__AVX512DQ__": "avx512dq",
    "__AVX512VL__": "avx512vl",
    "__AVX2__": "avx2",
    "__FMA__": "fma",
    "__F16C__": "f16c",
    "__BMI2__": "bmi2",
}


def kernel_march() -> str:
    """The `-march` the kernel is compiled for: `$HF_MOE_KERNEL_MARCH` (e.g. `x86-64-v3` for AVX2, `x86-64-v4`
    for AVX-512), else `native`. Read once per process, when the kernel is first needed."""
    value = os.environ.get(KERNEL_MARCH_ENV, "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", value):
        raise ValueError(
            f"{KERNEL_MARCH_ENV}={value!r}: expected a -march value such as native, x86-64-v3 (AVX2) or x86-64-v4 "
            "(AVX-512)"
        )
    return value


def _flags(march: str) -> list[str]:
    return [f"-march={march}" if flag == "-march=native" else flag for flag in _FLAGS]


def _cpu_fingerprint() -> str:
    """What -march=native compiles for: the CPU model and its feature flags."""
    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("vendor_id", "model name", "flags")):
                    lines.append(line.strip())
                if line.startswith("flags"):
                    break
    except OSError:
        lines.append(platform.processor())
    return "\n".join(lines)


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where there is none (not Linux)."""
    for line in _cpu_fingerprint().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[-1].split())
    return None


@functools.cache
def _march_macros(compiler: str, march: str) -> frozenset[str] | None:
    """The ISA macros of `_ISA_MACROS` that `compiler -march=<march>` defines; None if it refuses the level."""
    done = subprocess.run(
        [compiler, f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True
    )
    if done.returncode != 0:
        return None
    defined = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("#define ")}
    return frozenset(defined & _ISA_MACROS.keys())


def _march_problem(compiler: str, march: str) -> str | None:
    """Why the kernel cannot be built for `march` on this CPU (None when it can): the compiler refuses the level, or
    the level uses instructions the CPU lacks."""
    if march == "native":
        return None
    macros = _march_macros(compiler, march)
    if macros is None:
        return f"{KERNEL_MARCH_ENV}={march!r}: `{compiler}` does not accept -march={march}"
    flags = _cpu_flags()
    missing = sorted(_ISA_MACROS[m] for m in macros if flags is not None and _ISA_MACROS[m] not in flags)
    if missing:
        return (
            f"{KERNEL_MARCH_ENV}={march!r} uses instructions this CPU lacks ({', '.join(missing)}): choose a lower "
            "level (x86-64-v3 for AVX2) or unset it"
        )
    return None


@functools.cache
def has_avx512() -> bool:
    """Whether the kernel is built with AVX-512 (16-float vectors; BENCHMARKS.md, "AVX2 hosts"): the CPU's flags
    for `-march=native`, the compiler's answer for a level set with `$HF_MOE_KERNEL_MARCH`."""
    try:
        march = kernel_march()
    except ValueError:  # load_fused_kernel() reports it; the import that reads this must not fail on it
        return False
    if march == "native":
        return "avx512f" in (_cpu_flags() or set())
    compiler = _compiler()
    macros = _march_macros(compiler, march) if compiler else None
    return macros is not None and "__AVX512F__" in macros


def kernel_cache_dir() -> Path:
    """Where the compiled kernel lives: `$HF_MOE_KERNEL_CACHE`, else ~/.cache/hf_moe/kernels."""
    return Path(os.environ.get(KERNEL_CACHE_ENV) or Path.home() / ".cache" / "hf_moe" / "kernels")


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _library_path(compiler: str, march: str) -> Path:
    # The torch install is part of the key: the library links against that install's libraries.
    key = "\n".join(
        [
            _SOURCE,
            torch.__version__,
            str(Path(torch.__file__).parent),
            compiler,
            *_flags(march),
            _cpu_fingerprint(),
        ]
    )
    return kernel_cache_dir() / f"fused_experts-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _build(compiler: str, target: Path, march: str) -> None:
    """Compile into a temporary file beside `target`, then rename it into place: a killed or concurrent build
    never leaves a half-written library under the final name."""
    from torch.utils.cpp_extension import include_paths, library_paths

    target.parent.mkdir(parents=True, exist_ok=True)
    warnings.warn(
        f"hf_moe: compiling the fused CPU experts kernel once for this machine (~10 s) into {target.parent}",
        stacklevel=4,
    )
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        source = Path(tmp) / "fused_experts.cpp"
        source.write_text(_SOURCE)
        partial = Path(tmp) / target.name
        (lib_dir,) = library_paths()
        command = [
            compiler,
            *_flags(march),
            *(f"-I{path}" for path in include_paths()),
            str(source),
            "-o",
            str(partial),
            f"-L{lib_dir}",
            "-lc10",
            "-ltorch_cpu",
            f"-Wl,-rpath,{lib_dir}",
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(command[:3])} ...` failed:\n{done.stderr[-2000:]}")
        os.replace(partial, target)


@functools.cache
def load_fused_kernel() -> str | None:
    """Build (once per machine and torch build) and load the kernel. Returns None when it is ready, else why it
    is not (no C++ compiler, a failed compile or load), so callers can fall back or raise with the reason."""
    if not hasattr(torch.ops.hf_moe_kernels, "fused_experts"):
        compiler = _compiler()
        if compiler is None:
            return "no C++ compiler found (set $CXX, or install g++)"
        try:
            march = kernel_march()
        except ValueError as error:
            return str(error)
        problem = _march_problem(compiler, march)
        if problem is not None:
            return problem
        target = _library_path(compiler, march)
        try:
            if not target.exists():
                _build(compiler, target, march)
            torch.ops.load_library(str(target))
        except (OSError, RuntimeError) as error:
            return f"{type(error).__name__}: {error}"
        # Shapes without computing, for tracing (the op runs opaque inside `hf_moe::cpu_experts` when compiled).
        torch.library.register_fake("hf_moe_kernels::fused_experts")(
            lambda x, token, counts, weights, gate_up, down, act: torch.empty_like(x)
        )
        torch.library.register_fake("hf_moe_kernels::grouped_nt")(
            lambda x, weight, counts: x.new_empty(x.shape[0], weight.shape[1])
        )
        torch.library.register_fake("hf_moe_kernels::grouped_nn")(
            lambda g, weight, counts: g.new_empty(g.shape[0], weight.shape[2])
        )
        torch.library.register_fake("hf_moe_kernels::grouped_tn")(
            lambda g, a, counts: g.new_empty(len(counts), g.shape[1], a.shape[1])
        )
    return None


def fused_experts(
    x: torch.Tensor,
    token: torch.Tensor,
    counts: list[int],
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Routed experts in one pass (inference; x and both weights all float32 or all bfloat16, the arithmetic in
    float32): x (T, H); the S routed slots sorted by expert, as
    `token` (S,) int64 rows of x, `counts` (E,) slots per expert and `weights` (S,) float32 routing weights;
    gate_up_proj (E, 2I, H), down_proj (E, H, I). Returns (T, H): each token's weighted sum over its experts.
    `load_fused_kernel()` must have returned None."""
    return torch.ops.hf_moe_kernels.fused_experts(
        x, token, counts, weights, gate_up_proj, down_proj, ACTIVATION_CODES[activation]
    )


# Training: the grouped products of `_RoutedExpertsFunction` (experts.py) in float32, on rows sorted by expert with
# `counts` (E,) rows per expert. `load_fused_kernel()` must have returned None.
def grouped_times_transposed(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x (S, K) @ weight[e].T for the rows of each expert e -> (S, N); weight (E, N, K)."""
    return torch.ops.hf_moe_kernels.grouped_nt(x, weight, counts)


def grouped_times(g: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """g (S, N) @ weight[e] for the rows of each expert e -> (S, K); weight (E, N, K)."""
    return torch.ops.hf_moe_kernels.grouped_nn(g, weight, counts)


def grouped_weight_grad(g: torch.Tensor, a: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """g[rows of e].T @ a[rows of e] for each expert e -> (E, N, K), zeros for experts without rows."""
    return torch.ops.hf_moe_kernels.grouped_tn(g, a, counts)


__all__ = [
    "ACTIVATION_CODES",
    "KERNEL_CACHE_ENV",
    "KERNEL_MARCH_ENV",
    "fused_experts",
    "grouped_times",
    "grouped_times_transposed",
    "grouped_weight_grad",
    "has_avx512",
    "kernel_cache_dir",
    "kernel_march",
    "load_fused_kernel",
]
