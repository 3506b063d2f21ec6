// Prefill attention of one sequence's chunk over its paged bf16 KV cache, on AMX tiles.
//
// The chunk's L queries sit at positions ctx_len - L .. ctx_len - 1 and see every earlier
// position (causal), or the last `window` of them (sliding-window layers). Before, each chunk
// gathered its K/V out of the blocks and ran torch's flash attention on [1, H, L, D]: about
// a third of a prefill step's time at 200-token prompts on the AMX Xeon.
//
// Here, per kv head, K and V are first copied out of the blocks into the layouts AMX B tiles
// take (K: 16 positions x 16 pairs of dims; V: 16 pairs of positions x 16 dims), once for
// all G query heads and all query tiles. Then each (kv head, query head, 16 queries) task
// makes its scores with one tdpbf16ps per 16 positions and 32 dims, runs an exact softmax
// over the row (the whole visible range at once: scores of 16 rows x the context, float32,
// stay in L2 for contexts of thousands), rounds the probabilities to bf16 and multiplies them
// with V on tiles, 32 positions x 16 dims per tdpbf16ps. Positions a row may not see get a
// probability of exactly 0.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "attention_bf16.h"  // TUILI_AMX_SCORES where the CPU has AMX-BF16
#include "kernels.h"
#include "vec.h"

namespace {
#ifdef TUILI_AMX_SCORES

// Tiles (all 16 rows x 64 bytes): 0-3 outputs (16 queries x 16 dims, float32), and the
// queries while the scores are made (head dims up to 128); 4 the A operand (queries or
// probabilities, bf16) or a K tile; 5 the B operand (K or V pairs); 6-7 scores.
void load_tile_config() {
  tuili::TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

// Scores of the 16 queries in qt (16 rows of dim bf16) against positions [lo, hi32), 32 at a
// time, into s (rows span floats apart). The queries are loaded into tiles 0..DC-1 once; K
// tiles alternate between 4 and 5 so a load overlaps the product before it.
template <int DC>
void scores_held(const uint16_t* qt, const uint16_t* kh, int64_t lo, int64_t hi32, int64_t dim, float* s,
                 int64_t span) {
  if (DC > 0) _tile_loadd(0, qt, dim * 2);
  if (DC > 1) _tile_loadd(1, qt + 32, dim * 2);
  if (DC > 2) _tile_loadd(2, qt + 64, dim * 2);
  if (DC > 3) _tile_loadd(3, qt + 96, dim * 2);
  for (int64_t t = lo; t < hi32; t += 32) {
    const uint16_t* k0 = kh + t * dim;
    const uint16_t* k1 = k0 + 16 * dim;
    _tile_zero(6);
    _tile_zero(7);
#define TUILI_SCORE_STEP(I)                     \
  if (DC > I) {                                 \
    _tile_loadd(4, k0 + (I) * 512, 64);         \
    _tile_loadd(5, k1 + (I) * 512, 64);         \
    _tile_dpbf16ps(6, I, 4);                    \
    _tile_dpbf16ps(7, I, 5);                    \
  }
    TUILI_SCORE_STEP(0)
    TUILI_SCORE_STEP(1)
    TUILI_SCORE_STEP(2)
    TUILI_SCORE_STEP(3)
#undef TUILI_SCORE_STEP
    _tile_stored(6, s + (t - lo), span * 4);
    _tile_stored(7, s + (t - lo) + 16, span * 4);
  }
}

// m[r] = column r of the 16 x 16 matrix of 32-bit elements whose rows m held.
inline void transpose16x16(__m512i* m) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(m[2 * i], m[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(m[2 * i], m[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 2; ++j) {
      m[4 * i + j] = _mm512_unpacklo_epi64(t[4 * i + j], t[4 * i + 2 + j]);
      m[4 * i + 2 + j] = _mm512_unpackhi_epi64(t[4 * i + j], t[4 * i + 2 + j]);
    }
  // m[4i + k] now holds, in each 128-bit lane L, elements (4i..4i+3) of column 4L + k' (k' = 0, 2, 1, 3 for k = 0..3)
  for (int i = 0; i < 2; ++i)
    for (int k = 0; k < 4; ++k) {
      t[8 * i + k] = _mm512_shuffle_i32x4(m[8 * i + k], m[8 * i + 4 + k], 0x88);
      t[8 * i + 4 + k] = _mm512_shuffle_i32x4(m[8 * i + k], m[8 * i + 4 + k], 0xdd);
    }
  for (int k = 0; k < 4; ++k) {
    const __m512i a0 = _mm512_shuffle_i32x4(t[k], t[8 + k], 0x88), a1 = _mm512_shuffle_i32x4(t[k], t[8 + k], 0xdd);
    const __m512i b0 = _mm512_shuffle_i32x4(t[4 + k], t[12 + k], 0x88), b1 = _mm512_shuffle_i32x4(t[4 + k], t[12 + k], 0xdd);
    const int col = k == 1 ? 2 : k == 2 ? 1 : k;  // unpack order: lo/lo, hi/lo... -> columns 0, 2, 1, 3 of each 4
    m[col] = a0, m[4 + col] = b0, m[8 + col] = a1, m[12 + col] = b1;
  }
}

// The lanes of positions j..j+15 that lie in [a, b].
inline __mmask16 lanes(int64_t j, int64_t a, int64_t b) {
  const int64_t from = std::clamp<int64_t>(a - j, 0, 16), to = std::clamp<int64_t>(b - j + 1, 0, 16);
  return static_cast<__mmask16>(((1u << to) - 1) & ~((1u << from) - 1));
}

// 2^t for t <= 0, to well within bf16's rounding (relative error under 6e-5; the probabilities
// are rounded to bf16 next): 2^round(t) by vscalefps times a degree-4 polynomial of the rest.
inline __m512 exp2_bf16(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);  // [-0.5, 0.5]
  __m512 y = _mm512_set1_ps(9.6181291e-3f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5504109e-2f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022651e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9314718e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, n);
}

using tuili::first_visible;  // the visible positions of the query at position p: [first_visible, p]

void prefill_kernel(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, const int64_t* table,
                    uint16_t* out, int64_t L, int64_t ctx, int64_t heads, int64_t kv_heads, int64_t dim,
                    int64_t block_size, float scale, int64_t window) {
  const int64_t G = heads / kv_heads, past = ctx - L;
  const int64_t ctx32 = (ctx + 31) / 32 * 32, dchunks = dim / 32, dgroups = dim / 16;
  const int64_t row = kv_heads * dim;  // elements between two positions of a block
  // Positions before `base` are seen by no query of the chunk (sliding windows): not staged.
  const int64_t base = first_visible(past, window) / 32 * 32, staged = ctx32 - base;
  // Kp[h][t16][dc][r][c * 2 + e] = K[base + 16 t16 + c][32 dc + 2 r + e]: B tiles of 16 dim pairs x 16 positions.
  // Vp[h][t32][dg][r][c * 2 + e] = V[base + 32 t32 + 2 r + e][16 dg + c]: B tiles of 16 position pairs x 16 dims.
  std::unique_ptr<uint16_t[]> kp(new uint16_t[kv_heads * staged * dim]), vp(new uint16_t[kv_heads * staged * dim]);
  const int64_t t32s = staged / 32;
  at::parallel_for(0, kv_heads * t32s, 1, [&](int64_t begin, int64_t end) {
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / t32s, t32 = task % t32s;
      const uint16_t* krow[32];  // the 32 positions' K and V rows of this head (null past ctx)
      const uint16_t* vrow[32];
      for (int64_t i = 0; i < 32; ++i) {
        const int64_t pos = base + 32 * t32 + i;
        const int64_t slot = pos < ctx ? table[pos / block_size] * block_size + pos % block_size : -1;
        krow[i] = slot < 0 ? nullptr : k_cache + slot * row + h * dim;
        vrow[i] = slot < 0 ? nullptr : v_cache + slot * row + h * dim;
      }
      uint16_t* kd = kp.get() + (h * staged + 32 * t32) * dim;
      for (int64_t half = 0; half < 2; ++half)  // two tiles of 16 positions
        for (int64_t dc = 0; dc < dim / 32; ++dc) {
          __m512i m[16];
          for (int64_t c = 0; c < 16; ++c) {
            const uint16_t* k = krow[16 * half + c];
            m[c] = k ? _mm512_loadu_si512(k + 32 * dc) : zero;
          }
          transpose16x16(m);  // row r: dim pair 16 dc + r of the 16 positions
          for (int64_t r = 0; r < 16; ++r) _mm512_storeu_si512(kd + (half * 16 * dim + dc * 512 + r * 32), m[r]);
        }
      uint16_t* vd = vp.get() + (h * staged + 32 * t32) * dim;
      for (int64_t r = 0; r < 16; ++r)  // row r: positions 2r and 2r + 1, interleaved dim by dim
        for (int64_t dg = 0; dg < dim / 16; ++dg) {
          const uint16_t *v0 = vrow[2 * r], *v1 = vrow[2 * r + 1];
          const __m512i a = v0 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + 16 * dg))) : zero;
          const __m512i b = v1 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + 16 * dg))) : zero;
          _mm512_storeu_si512(vd + dg * 512 + r * 32, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
        }
    }
  });

  const int64_t qtiles = (L + 15) / 16;
  at::parallel_for(0, kv_heads * G * qtiles, 1, [&](int64_t begin, int64_t end) {
    load_tile_config();
    std::vector<float> s(16 * staged);
    std::vector<uint16_t> pr(16 * staged), qt(16 * dim);
    alignas(64) float o[16 * 16];
    float inv[16];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / (G * qtiles), g = task / qtiles % G, i0 = task % qtiles * 16;
      const int64_t hq = h * G + g, rows = std::min<int64_t>(16, L - i0);
      // The visible range of the tile's rows, from a multiple of 32 (V tiles) to the last row's position.
      const int64_t lo = first_visible(past + i0, window) / 32 * 32, hi = past + i0 + rows;  // [lo, hi)
      const int64_t hi32 = (hi + 31) / 32 * 32, span = hi32 - lo;
      for (int64_t r = 0; r < 16; ++r) {
        if (r < rows) std::memcpy(qt.data() + r * dim, q + ((i0 + r) * heads + hq) * dim, dim * 2);
        else std::memset(qt.data() + r * dim, 0, dim * 2);
      }
      const uint16_t* kh = kp.get() + h * staged * dim;  // position base + t at kh + t * dim
      switch (dchunks) {  // the queries held in tiles 0-3 where they fit (dim <= 128)
        case 1: scores_held<1>(qt.data(), kh, lo - base, hi32 - base, dim, s.data(), span); break;
        case 2: scores_held<2>(qt.data(), kh, lo - base, hi32 - base, dim, s.data(), span); break;
        case 3: scores_held<3>(qt.data(), kh, lo - base, hi32 - base, dim, s.data(), span); break;
        case 4: scores_held<4>(qt.data(), kh, lo - base, hi32 - base, dim, s.data(), span); break;
        default:
          for (int64_t t = lo; t < hi32; t += 32) {  // scores of 32 positions: tiles 6 and 7
            _tile_zero(6);
            _tile_zero(7);
            for (int64_t dc = 0; dc < dchunks; ++dc) {
              _tile_loadd(4, qt.data() + 32 * dc, dim * 2);
              _tile_loadd(5, kh + ((t - base) * dim + dc * 512), 64);
              _tile_dpbf16ps(6, 4, 5);
              _tile_loadd(5, kh + ((t - base + 16) * dim + dc * 512), 64);
              _tile_dpbf16ps(7, 4, 5);
            }
            _tile_stored(6, s.data() + (t - lo), span * 4);
            _tile_stored(7, s.data() + (t - lo) + 16, span * 4);
          }
      }
      const float c = scale * 1.44269504088896341f;  // exp(scale * (x - m)) = 2^(c * (x - m))
      for (int64_t r = 0; r < 16; ++r) {
        const float* x = s.data() + r * span;
        uint16_t* p = pr.data() + r * span;
        if (r >= rows) {
          std::memset(p, 0, span * 2);
          continue;
        }
        const int64_t pos = past + i0 + r;
        const int64_t a = first_visible(pos, window) - lo, b = pos - lo;  // visible: [a, b] of the row
        __m512 m = _mm512_set1_ps(-INFINITY);
        for (int64_t j = a / 16 * 16; j <= b; j += 16) m = _mm512_mask_max_ps(m, lanes(j, a, b), m, _mm512_loadu_ps(x + j));
        const __m512 mc = _mm512_set1_ps(_mm512_reduce_max_ps(m) * c), cv = _mm512_set1_ps(c);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < span; j += 32) {  // bf16 probabilities, unnormalized: 1 / sum scales the output
          __m512 e[2];
          for (int k = 0; k < 2; ++k) {
            const int64_t j0 = j + 16 * k;
            const __mmask16 ok = lanes(j0, a, b);
            e[k] = ok ? _mm512_maskz_mov_ps(ok, exp2_bf16(_mm512_fmsub_ps(_mm512_loadu_ps(x + j0), cv, mc)))
                      : _mm512_setzero_ps();
            sum = _mm512_add_ps(sum, e[k]);
          }
          _mm512_storeu_si512(p + j, (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]));
        }
        inv[r] = 1.f / _mm512_reduce_add_ps(sum);
      }
      const uint16_t* vh = vp.get() + h * staged * dim;
      for (int64_t dg0 = 0; dg0 < dgroups; dg0 += 4) {  // outputs of 64 dims at a time: tiles 0-3
        const int64_t ng = std::min<int64_t>(4, dgroups - dg0);
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t t = lo; t < hi32; t += 32) {
          _tile_loadd(4, pr.data() + (t - lo), span * 2);
          const uint16_t* vt = vh + (t - base) * dim + dg0 * 512;
          _tile_loadd(5, vt, 64);
          _tile_dpbf16ps(0, 4, 5);
          if (ng > 1) { _tile_loadd(5, vt + 512, 64); _tile_dpbf16ps(1, 4, 5); }
          if (ng > 2) { _tile_loadd(5, vt + 1024, 64); _tile_dpbf16ps(2, 4, 5); }
          if (ng > 3) { _tile_loadd(5, vt + 1536, 64); _tile_dpbf16ps(3, 4, 5); }
        }
        for (int64_t k = 0; k < ng; ++k) {
          switch (k) {  // tile numbers are immediates
            case 0: _tile_stored(0, o, 64); break;
            case 1: _tile_stored(1, o, 64); break;
            case 2: _tile_stored(2, o, 64); break;
            default: _tile_stored(3, o, 64); break;
          }
          for (int64_t r = 0; r < rows; ++r) {
            const __m256i b = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(o + 16 * r), _mm512_set1_ps(inv[r])));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + ((i0 + r) * heads + hq) * dim + (dg0 + k) * 16), b);
          }
        }
      }
    }
    _tile_release();
  });
}
#endif  // TUILI_AMX_SCORES

}  // namespace

bool prefill_attention_available() {
#ifdef TUILI_AMX_SCORES
  return gemm_amx_available();
#else
  return false;
#endif
}

// q: [L, H, D] bfloat16, the chunk's queries (positions ctx_len - L .. ctx_len - 1); caches:
// [NB, BS, KVH, D] bfloat16 holding the chunk's own K/V already; table: [W] int64 block ids.
// Returns [L, H, D] bfloat16. Needs AMX (prefill_attention_available) and D a multiple of 32.
torch::Tensor paged_prefill_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                      torch::Tensor table, int64_t ctx_len, double scale, int64_t window) {
  TORCH_CHECK(prefill_attention_available(), "paged_prefill_attention needs AMX-BF16 (and TUILI_AMX not 0)");
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kBFloat16, "q: [L, H, D] bfloat16");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == torch::kBFloat16 &&
                  v_cache.scalar_type() == torch::kBFloat16 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches: 4-d contiguous bfloat16");
  TORCH_CHECK(table.scalar_type() == torch::kInt64 && table.dim() == 1, "table: [W] int64");
  q = q.contiguous();
  table = table.contiguous();
  const int64_t L = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dim && heads % kv_heads == 0 && dim % 32 == 0, "head shapes do not match");
  TORCH_CHECK(ctx_len >= L && L > 0 && (ctx_len + block_size - 1) / block_size <= table.size(0),
              "ctx_len: must cover the chunk and fit the table");
  auto out = torch::empty_like(q);
#ifdef TUILI_AMX_SCORES
  auto u16 = [](const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
  prefill_kernel(u16(q), u16(k_cache), u16(v_cache), table.data_ptr<int64_t>(),
                 reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), L, ctx_len, heads, kv_heads, dim,
                 block_size, static_cast<float>(scale), window);
#endif
  return out;
}
