// Prefill attention of one sequence's chunk over its paged cache, in float32, on AVX2 CPUs.
//
// On a CPU without fast bf16 the model's queries are float32 and the chunk's attention went
// through PyTorch: K/V gathered out of the blocks and cast to float32, then torch's flash
// kernel, which at head dim 64 and a few hundred positions ran at about 35 GFLOP/s here
// (2 x 245-token prompts: 118 ms of an 844 ms step on the AVX2 EPYC, docs/BENCHMARKS.md).
//
// Here the products are the AVX2 matmul's own micro-kernel (tile_f32.h). Per kv head, K and
// V are first copied out of the blocks, widened to float32, into panels of 16 (K: 16
// positions x the head dim, so scores come out 16 positions at a time; V: 16 dims x the
// positions, so the weighted sum comes out 16 dims at a time). Then each (query head, 6
// queries; 12 with AVX-512, see attn_tile) task makes its scores against the positions they
// can see, runs an exact softmax per row in float32 (positions a row may not see get exactly
// 0), and multiplies the probabilities with V's panels. The sum over positions runs in
// position order, one FMA per term; the result differs from the float64 attention by
// float32 rounding only. SmolLM2's shape, 30 layers (benchmarks/prefill_attention_avx2.py,
// AVX2 EPYC, 2 cores): 245 tokens 33-35 ms against 74 ms for the PyTorch path, 500 tokens
// 104 against 262 ms.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "kernels.h"
#ifdef __AVX2__
#include "tile_f32.h"
#include "vec.h"
#endif

namespace {
#ifdef __AVX2__
using tuili::tiles::kMaxRows;
using tuili::tiles::kPanel;
using tuili::tiles::tile;
using tuili::tiles::with_rows;

inline float widen(float x) { return x; }

inline float widen(at::BFloat16 x) { return static_cast<float>(x); }

using tuili::first_visible;  // the visible positions of the query at position p: [first_visible, p]

#ifdef __AVX512F__
// With AVX-512 a panel's 16 columns are one register: acc[r][16] = x[r][0..K) . panel[0..K)[16]
// with one FMA per k into one accumulator per row, the same sums in the same order as
// tile<MR> (so the same bits), half the instructions, and 12 rows of queries a task so the
// FMAs' latency stays hidden (benchmarks/prefill_attention_avx2.py, Zen 5, bf16 queries, 245
// tokens x 30 layers: 11.3-11.8 ms against 16.6 ms with the AVX2 tile, 3.0x torch's path).
constexpr int kAttnRows = 12;

template <int MR>
inline void attn_tile(const float* x, int64_t ldx, const float* panel, int64_t K, float* acc) {
  __m512 c[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) c[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w = _mm512_loadu_ps(panel + k * kPanel);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) c[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), w, c[r]);
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(acc + r * kPanel, c[r]);
}

// attn_tile over two panels (the second `stride` floats after the first) at once: each query
// value broadcast feeds two FMAs instead of one, so the tile is bound by the FMAs, not by its
// loads. Each sum is the same chain as attn_tile's (the same bits); the second panel's sums go
// to acc + kAttnRows * kPanel. With the exponentials 16 at a time (vec.h: exp_minus_max), against
// one panel a tile, 30 layers on the Zen 5 EPYC: 245 queries 1.09x, 150 queries over 300
// positions 1.12x, 37 over 200 1.07x, bit for bit the same output. The tiles now run near the
// float32 FMA peak; the rest of the time is the softmax and reading K/V out of the blocks.
template <int MR>
inline void attn_tile2(const float* x, int64_t ldx, const float* panel, int64_t stride, int64_t K, float* acc) {
  __m512 c[MR], e[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) c[r] = e[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w = _mm512_loadu_ps(panel + k * kPanel), v = _mm512_loadu_ps(panel + stride + k * kPanel);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 b = _mm512_set1_ps(x[r * ldx + k]);
      c[r] = _mm512_fmadd_ps(b, w, c[r]);
      e[r] = _mm512_fmadd_ps(b, v, e[r]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(acc + r * kPanel, c[r]);
    _mm512_storeu_ps(acc + (kAttnRows + r) * kPanel, e[r]);
  }
}
#else
constexpr int kAttnRows = kMaxRows;

template <int MR>
inline void attn_tile(const float* x, int64_t ldx, const float* panel, int64_t K, float* acc) {
  tile<MR>(x, ldx, panel, K, acc);
}

template <int MR>
inline void attn_tile2(const float* x, int64_t ldx, const float* panel, int64_t stride, int64_t K, float* acc) {
  tile<MR>(x, ldx, panel, K, acc);
  tile<MR>(x, ldx, panel + stride, K, acc + kAttnRows * kPanel);
}
#endif

template <typename T>
void prefill_f32(const float* q, const T* k_cache, const T* v_cache, const int64_t* table, float* out, int64_t L,
                 int64_t ctx, int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size, float scale,
                 int64_t window) {
  const int64_t G = heads / kv_heads, past = ctx - L, row = kv_heads * dim, dp_count = dim / kPanel;
  // Positions before `base` are seen by no query of the chunk (sliding windows): not staged.
  const int64_t base = first_visible(past, window) / kPanel * kPanel;
  const int64_t span = (ctx - base + kPanel - 1) / kPanel * kPanel, t16s = span / kPanel;
  // kp[h][t16][d][c] = K[base + 16 t16 + c][d]; vp[h][dp][t][c] = V[base + t][16 dp + c];
  // zero past ctx.
  std::unique_ptr<float[]> kp(new float[kv_heads * span * dim]), vp(new float[kv_heads * span * dim]);  // all written below
  at::parallel_for(0, kv_heads * t16s, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / t16s, t16 = task % t16s;
      float* kd = kp.get() + (h * t16s + t16) * dim * kPanel;
      for (int64_t c = 0; c < kPanel; ++c) {
        const int64_t pos = base + t16 * kPanel + c;
        const int64_t t = pos - base;
        if (pos >= ctx) {
          for (int64_t d = 0; d < dim; ++d) kd[d * kPanel + c] = 0.f;
          for (int64_t dp = 0; dp < dp_count; ++dp) std::memset(vp.get() + ((h * dp_count + dp) * span + t) * kPanel, 0, kPanel * 4);
          continue;
        }
        const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
        const T* kr = k_cache + slot * row + h * dim;
        const T* vr = v_cache + slot * row + h * dim;
        for (int64_t d = 0; d < dim; ++d) kd[d * kPanel + c] = widen(kr[d]);
        for (int64_t dp = 0; dp < dp_count; ++dp) {
          float* vd = vp.get() + ((h * dp_count + dp) * span + t) * kPanel;
          for (int64_t j = 0; j < kPanel; ++j) vd[j] = widen(vr[dp * kPanel + j]);
        }
      }
    }
  });
  const int64_t qtiles = (L + kAttnRows - 1) / kAttnRows, tasks = heads * qtiles;
  std::atomic<int64_t> next{0};
  // Tasks are handed out one at a time, latest queries first: a later tile sees more positions.
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), tasks), 1, [&](int64_t, int64_t) {
    std::vector<float> s(kAttnRows * span);
    alignas(64) float acc[2 * kAttnRows * kPanel];
    for (int64_t task; (task = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      const int64_t hq = task % heads, qt = qtiles - 1 - task / heads, h = hq / G;
      const int64_t l0 = qt * kAttnRows, rows = std::min<int64_t>(kAttnRows, L - l0);
      const int64_t p0 = past + l0, p_last = p0 + rows - 1;
      // Columns [c0, c_end) of the staged positions: from the first position the first query
      // sees, in whole panels, to the last query's own position.
      const int64_t t_begin = (first_visible(p0, window) - base) / kPanel, c0 = t_begin * kPanel;
      const int64_t c_end = p_last - base + 1, t_end = (c_end + kPanel - 1) / kPanel;
      const float* qx = q + l0 * heads * dim + hq * dim;
      with_rows<kAttnRows>(static_cast<int>(rows), [&](auto mr) {
        constexpr int R = decltype(mr)::value;
        for (int64_t t16 = t_begin; t16 < t_end; t16 += 2) {  // two panels of positions a tile
          const int64_t np = std::min<int64_t>(2, t_end - t16);
          const float* kpan = kp.get() + (h * t16s + t16) * dim * kPanel;
          if (np == 2) attn_tile2<R>(qx, heads * dim, kpan, dim * kPanel, dim, acc);
          else attn_tile<R>(qx, heads * dim, kpan, dim, acc);
          for (int64_t j = 0; j < np; ++j)
            for (int r = 0; r < R; ++r) {
              float* dst = s.data() + r * span + ((t16 + j) * kPanel - c0);
              const float* a = acc + (j * kAttnRows + r) * kPanel;
              for (int64_t c = 0; c < kPanel; ++c) dst[c] = a[c] * scale;
            }
        }
      });
      const int64_t width = c_end - c0;  // columns the product with V runs over
      float inv[kAttnRows];
      for (int64_t r = 0; r < rows; ++r) {
        float* sr = s.data() + r * span;
        const int64_t lo = first_visible(p0 + r, window) - base - c0, hi = p0 + r - base - c0;  // visible: [lo, hi]
        float m;
        const float sum = tuili::exp_minus_max(sr + lo, hi - lo + 1, &m);
        std::fill(sr, sr + lo, 0.f);
        std::fill(sr + hi + 1, sr + width, 0.f);
        inv[r] = 1.f / sum;
      }
      float* ox = out + l0 * heads * dim + hq * dim;
      with_rows<kAttnRows>(static_cast<int>(rows), [&](auto mr) {
        constexpr int R = decltype(mr)::value;
        for (int64_t dp = 0; dp < dp_count; dp += 2) {  // two panels of dims a tile
          const int64_t np = std::min<int64_t>(2, dp_count - dp);
          const float* vpan = vp.get() + ((h * dp_count + dp) * span + c0) * kPanel;
          if (np == 2) attn_tile2<R>(s.data(), span, vpan, span * kPanel, width, acc);
          else attn_tile<R>(s.data(), span, vpan, width, acc);
          for (int64_t j = 0; j < np; ++j)
            for (int r = 0; r < R; ++r) {
              float* o = ox + r * heads * dim + (dp + j) * kPanel;
              const float* a = acc + (j * kAttnRows + r) * kPanel;
              for (int64_t c = 0; c < kPanel; ++c) o[c] = a[c] * inv[r];
            }
        }
      });
    }
  });
}
#endif
}  // namespace

bool prefill_attention_f32_available() {
#ifdef __AVX2__
  return true;
#else
  return false;
#endif
}

// q: [L, H, D] float32, the chunk's queries at positions ctx_len - L .. ctx_len - 1; caches:
// [NB, BS, KVH, D] bfloat16 or float32 (the chunk's own K/V already written); table: the
// sequence's block ids (int64); window > 0: each query sees its last `window` positions only.
// Returns [L, H, D] float32.
torch::Tensor paged_prefill_attention_f32(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                          torch::Tensor table, int64_t ctx_len, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32, "q: [L, H, D] float32");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.scalar_type() == v_cache.scalar_type() &&
                  (k_cache.scalar_type() == torch::kBFloat16 || k_cache.scalar_type() == torch::kFloat32),
              "caches: [NB, BS, KVH, D] contiguous bfloat16 or float32");
  TORCH_CHECK(table.scalar_type() == torch::kInt64 && table.dim() == 1, "table: int64 block ids");
  const int64_t L = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dim && heads % kv_heads == 0 && dim % 16 == 0,
              "head shapes do not match (head dim a multiple of 16)");
  TORCH_CHECK(ctx_len >= L && L > 0 && table.size(0) * block_size >= ctx_len,
              "ctx_len: at least the chunk's length, within the table's blocks");
#ifndef __AVX2__
  TORCH_CHECK(false, "paged_prefill_attention_f32: built without AVX2");
#else
  auto qc = q.contiguous();
  auto tc = table.contiguous();
  auto out = torch::empty_like(qc);
  const float fs = static_cast<float>(scale);
  if (k_cache.scalar_type() == torch::kBFloat16)
    prefill_f32(qc.data_ptr<float>(), k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(),
                tc.data_ptr<int64_t>(), out.data_ptr<float>(), L, ctx_len, heads, kv_heads, dim, block_size, fs,
                window);
  else
    prefill_f32(qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tc.data_ptr<int64_t>(),
                out.data_ptr<float>(), L, ctx_len, heads, kv_heads, dim, block_size, fs, window);
  return out;
#endif
}
