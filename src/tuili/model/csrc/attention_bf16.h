// The decode attention's AVX512-BF16 and AMX pieces (paged_attention.cpp): the list of a
// task's reads that its requests ahead follow, bf16 score tiles with their lane sums, the
// weighted sum of V rows group by group, and the AMX scores' softmax (bf16 rows are widened
// by vec.h's load16). Kept apart so that file stays one readable kernel; included by it alone.
#pragma once
#ifdef __AVX2__
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "vec.h"

namespace {
// ---- the decode attention's requests ahead in the bf16 vector loops ------------------------
// One decode-attention task's reads in the order the bf16 loops without AMX make them: per
// chunk, the score pass's K rows (groups of 16 rows, a kv head at a time), then the output
// pass's V rows (likewise: v_pass_grouped). A unit is one group's rows of one kv head; each
// unit read requests the unit kAheadUnits on (paged_attention.cpp: 3, the next group's same
// head; kernel_ab --bf16-queries at batch 32, Zen 5: 1.07-1.08x 6 units against 12, 1.04x 3
// against 6, 0.97-0.98x 4 against 3, 0.88x 2 against 3), a row's lines at a time, so
// requests go out at the rate of the reads in every pass and from chunk to chunk. Before,
// the first output pass requested whole V rows (the other heads' passes then read from L2
// and requested nothing), V's first blocks were requested whole during each score pass, and requests for whole blocks stall the loops until they drain (a /tmp
// loop reading 384-byte rows of random 6 KB blocks with some arithmetic a row, Zen 5:
// 6.6-7.5 ms with each row's lines requested 32-64 rows ahead, 8.0-8.7 with 5-8 rows' at
// once, 11.4-12.1 with a block's). units[u]: unit u's first row (kv head h0 + its head);
// chunk_unit0[j]: chunk j's first unit (`chunks` + 1 entries); bounds(j): chunk j's
// positions [first, end); rows0: scratch.
template <typename T, typename Bounds>
void list_reads(const T* k_cache, const T* v_cache, const int64_t* table, int64_t block_size, int64_t kv_heads,
                int64_t dim, int64_t h0, int64_t h1, int64_t chunks, Bounds bounds, std::vector<const char*>& units,
                std::vector<int64_t>& chunk_unit0, std::vector<int64_t>& rows0) {
  units.clear();
  chunk_unit0.clear();
  for (int64_t j = 0; j < chunks; ++j) {
    const std::pair<int64_t, int64_t> span = bounds(j);
    const int64_t f = span.first, e = span.second;
    chunk_unit0.push_back(static_cast<int64_t>(units.size()));
    rows0.clear();  // the slot of each group's first row
    for (int64_t t0 = f - f % block_size; t0 < e; t0 += block_size)
      for (int64_t i = std::max<int64_t>(0, f - t0), n = std::min(e - t0, block_size); i < n; i += 16)
        rows0.push_back(table[t0 / block_size] * block_size + i);
    for (int64_t slot : rows0)
      for (int64_t h = h0; h < h1; ++h)
        units.push_back(reinterpret_cast<const char*>(k_cache + (slot * kv_heads + h) * dim));
    for (int64_t slot : rows0)
      for (int64_t h = h0; h < h1; ++h)
        units.push_back(reinterpret_cast<const char*>(v_cache + (slot * kv_heads + h) * dim));
  }
  chunk_unit0.push_back(static_cast<int64_t>(units.size()));
}

#ifdef __AVX512BF16__
// ---- bf16 caches with bf16 queries on AVX512-BF16 CPUs --------------------------------------
// A bf16 cache belongs to a bf16 model, whose queries are bf16 too: q . k then is a sum of
// exact bf16 x bf16 products, which vdpbf16ps forms 32 at a time. Scores are made for 16
// positions at once (16 sums, folded into one vector), and the weighted sum of V rows keeps
// G heads x 64 dims of float32 sums in registers. Measured with the step's KV out of cache
// (docs/BENCHMARKS.md, "The full peers run with AMX products", step 3): 6% less time than
// the AVX2 loops; both wait on memory latency more than on arithmetic.
constexpr bool kBf16Attention = true;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define TUILI_AMX_SCORES 1
#endif

// The 16 lane-sums of a[0..15], in lane order.
inline __m512 sum16(__m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xdd));
}

// out[g * out_stride + r] = scale * q[g] . k[r] for rows r < rows (<= 16) of K, stride apart.
// ahead (or null): 16 rows (ahead_stride bytes apart) of a block read later, ahead_lines
// 64-byte lines each, requested one line per row at each 32-dim step of the first head, so
// the requests are spread over the work (see decode_kernel_avx2). Whole blocks of 16 rows
// (Full) and the requests (PF) are compile-time cases: with both tested per row inside the
// unrolled loop, GCC 12 kept the 16 row addresses and each K vector on the stack (a store and
// a reload per vdpbf16ps), and the score pass ran at half the speed it has now.
template <int G, bool Full, bool PF>
inline void scores16_rows(const uint16_t* q, const uint16_t* k, int64_t stride, int64_t dim, int64_t rows, float scale,
                          float* out, int64_t out_stride, const char* ahead, int64_t ahead_stride,
                          int64_t ahead_lines) {
  for (int g = 0; g < G; ++g) {
    __m512 acc[16];
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 32) {
      const __m512i qi = _mm512_loadu_si512(q + g * dim + d);
      const uint16_t* kr = k + d;
      const char* pa = ahead + d * 2;  // this step's line of each row ahead
      const bool pf = PF && g == 0 && d / 32 < ahead_lines;
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) {
        if (pf) _mm_prefetch(pa, _MM_HINT_T0);
        pa += ahead_stride;
        if (Full || r < rows) {
          const __m512i kv = _mm512_loadu_si512(kr);
          acc[r] = _mm512_dpbf16_ps(acc[r], reinterpret_cast<const __m512bh&>(qi),
                                    reinterpret_cast<const __m512bh&>(kv));
        }
        kr += stride;
      }
    }
    const __m512 s = _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale));
    if (Full)
      _mm512_storeu_ps(out + g * out_stride, s);
    else
      _mm512_mask_storeu_ps(out + g * out_stride, static_cast<__mmask16>((1u << rows) - 1), s);
  }
}

template <int G>
inline void scores16(const uint16_t* q, const uint16_t* k, int64_t stride, int64_t dim, int64_t rows, float scale,
                     float* out, int64_t out_stride, const char* ahead, int64_t ahead_stride, int64_t ahead_lines) {
  if (rows == 16 && ahead != nullptr)
    scores16_rows<G, true, true>(q, k, stride, dim, rows, scale, out, out_stride, ahead, ahead_stride, ahead_lines);
  else if (rows == 16)
    scores16_rows<G, true, false>(q, k, stride, dim, rows, scale, out, out_stride, ahead, ahead_stride, ahead_lines);
  else if (ahead != nullptr)
    scores16_rows<G, false, true>(q, k, stride, dim, rows, scale, out, out_stride, ahead, ahead_stride, ahead_lines);
  else
    scores16_rows<G, false, false>(q, k, stride, dim, rows, scale, out, out_stride, ahead, ahead_stride, ahead_lines);
}

// The weighted sum of V rows for one decode-attention task's chunk (the bf16 loops without
// AMX): positions [first, end_pos) of the sequence whose block table is `table`, kv heads
// h0 .. h1, weights sc[(kv head - h0) * G * len + g * len + pos - first] (unnormalised), each
// head's output scaled by norm at the end, into ob[(kv head - h0) * G + g][dim]. Group by group
// of 16 rows, the task's kv heads in turn within each, as list_reads has them: a V block's
// lines are read together, not a third of them in each of three passes over the chunk, head
// by head (kernel_ab --bf16-queries, Zen 5: 1.03-1.05x at batch 32, 1.04-1.09x at 16). With
// several heads a head's G x 64 sums are loaded from ob and stored back around each group;
// every output is the same chain of FMAs over the positions in order as with sums held in
// registers throughout (one head: held), so the same bits. unit_at(u): the list's unit u (or
// null); u0: this chunk's first V unit; a unit read requests the unit `ahead` on, a row's
// lines at a time.
template <int G, typename T, typename UnitAt>
void v_pass_grouped(const T* v_cache, const int64_t* table, int64_t block_size, int64_t kv_heads, int64_t dim,
                    int64_t h0, int64_t h1, int64_t first, int64_t end_pos, const float* sc, int64_t len,
                    const float* norm, float* ob, int64_t u0, UnitAt unit_at, int64_t ahead) {
  const int64_t row_stride = kv_heads * dim, row_bytes = row_stride * static_cast<int64_t>(sizeof(T));
  const int64_t head_bytes = dim * static_cast<int64_t>(sizeof(T)), nq = (h1 - h0) * G;
  const int64_t start_block = first - first % block_size;
  // Rows g0 .. ge of the block at slot0, kv head kvh, dims d .. d + 64, into acc; w: the
  // weights of row g0 (head g at w[g * len]); p: the unit ahead (or null).
  auto v_rows = [&](__m512 (&acc)[G][4], int64_t kvh, int64_t d, int64_t slot0, int64_t g0, int64_t ge,
                    const float* w, const char* p) {
    const T* vp = v_cache + ((slot0 + g0) * kv_heads + kvh) * dim + d;
    for (int64_t i = g0; i < ge; ++i, vp += row_stride, ++w) {
      if (p != nullptr) {
        for (int64_t off = 0; off < head_bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
        p += row_bytes;
      }
      const __m512 v0 = tuili::load16(vp), v1 = tuili::load16(vp + 16), v2 = tuili::load16(vp + 32),
                   v3 = tuili::load16(vp + 48);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        const __m512 wg = _mm512_set1_ps(w[g * len]);
        acc[g][0] = _mm512_fmadd_ps(wg, v0, acc[g][0]);
        acc[g][1] = _mm512_fmadd_ps(wg, v1, acc[g][1]);
        acc[g][2] = _mm512_fmadd_ps(wg, v2, acc[g][2]);
        acc[g][3] = _mm512_fmadd_ps(wg, v3, acc[g][3]);
      }
    }
  };
  const bool held = h1 - h0 == 1;
  for (int64_t d0 = 0; d0 < dim; d0 += held ? 64 : dim) {
    __m512 acc[G][4];
    if (held) {
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = acc[g][2] = acc[g][3] = _mm512_setzero_ps();
    } else {
      for (int64_t g = 0; g < nq; ++g) std::memset(ob + g * dim, 0, dim * sizeof(float));
    }
    int64_t u = u0;  // the unit being read
    for (int64_t t0 = start_block; t0 < end_pos; t0 += block_size) {
      const int64_t i0 = std::max<int64_t>(0, first - t0), n = std::min(end_pos - t0, block_size);
      const int64_t slot0 = table[t0 / block_size] * block_size;
      for (int64_t g0 = i0; g0 < n; g0 += 16) {
        const int64_t ge = std::min(g0 + 16, n);
        for (int64_t kvh = h0; kvh < h1; ++kvh, ++u) {
          const char* pa = unit_at(u + ahead);
          const float* w = sc + (kvh - h0) * G * len + (t0 + g0 - first);
          if (held) {
            v_rows(acc, kvh, d0, slot0, g0, ge, w, d0 == 0 ? pa : nullptr);
            continue;
          }
          float* ok = ob + (kvh - h0) * G * dim;
          for (int64_t d = 0; d < dim; d += 64) {
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g)
              for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_loadu_ps(ok + g * dim + d + 16 * j);
            v_rows(acc, kvh, d, slot0, g0, ge, w, d == 0 ? pa : nullptr);
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g)
              for (int j = 0; j < 4; ++j) _mm512_storeu_ps(ok + g * dim + d + 16 * j, acc[g][j]);
          }
        }
      }
    }
    if (held) {  // one kv head: h0
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < 4; ++j)
          _mm512_storeu_ps(ob + g * dim + d0 + 16 * j, _mm512_mul_ps(acc[g][j], _mm512_set1_ps(norm[g])));
    }
  }
  if (!held)
    for (int64_t g = 0; g < nq; ++g) {
      const __m512 s = _mm512_set1_ps(norm[g]);
      for (int64_t d = 0; d < dim; d += 16)
        _mm512_storeu_ps(ob + g * dim + d, _mm512_mul_ps(_mm512_loadu_ps(ob + g * dim + d), s));
    }
}

#ifdef TUILI_AMX_SCORES
// Softmax over the scores of `heads_kv` kv heads laid out position-major, as the AMX tiles
// store them: x[(kv * len + pos) * G + g], the unscaled q . k. Each is replaced by
// exp(scale * (x - max)) with the max of its query head; per query head (kv * G + g) the
// scaled max and the sum go to part_m / part_l when given (chunks merged later), else 1 / sum
// to norm. 16 G values (16 positions) at a time: lane l of the i-th vector is head (16 i + l) % G.
template <int G>
void softmax_interleaved(float* scores, int64_t len, int64_t heads_kv, float scale, float* part_m, float* part_l,
                         float* norm) {
  const int64_t total = G * len, body = total / (16 * G) * (16 * G);
  alignas(64) float lanes[16 * G];
  for (int64_t kv = 0; kv < heads_kv; ++kv) {
    float* x = scores + kv * total;
    __m512 v[G];
#pragma GCC unroll 8
    for (int i = 0; i < G; ++i) v[i] = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < body; t += 16 * G)
#pragma GCC unroll 8
      for (int i = 0; i < G; ++i) v[i] = _mm512_max_ps(v[i], _mm512_loadu_ps(x + t + 16 * i));
    float m[G], sum[G];
    for (int g = 0; g < G; ++g) m[g] = -INFINITY, sum[g] = 0.f;
    for (int i = 0; i < G; ++i) _mm512_store_ps(lanes + 16 * i, v[i]);
    for (int l = 0; l < 16 * G; ++l) m[l % G] = std::max(m[l % G], lanes[l]);
    for (int64_t t = body; t < total; ++t) m[t % G] = std::max(m[t % G], x[t]);  // body: a multiple of G
    for (int l = 0; l < 16 * G; ++l) lanes[l] = m[l % G] * scale;
#pragma GCC unroll 8
    for (int i = 0; i < G; ++i) v[i] = _mm512_load_ps(lanes + 16 * i);  // the scaled maxima, lane by lane
    __m512 s[G];
#pragma GCC unroll 8
    for (int i = 0; i < G; ++i) s[i] = _mm512_setzero_ps();
    const __m512 sv = _mm512_set1_ps(scale);
    for (int64_t t = 0; t < body; t += 16 * G)
#pragma GCC unroll 8
      for (int i = 0; i < G; ++i) {
        const __m512 e = tuili::exp16(_mm512_fmsub_ps(_mm512_loadu_ps(x + t + 16 * i), sv, v[i]));
        _mm512_storeu_ps(x + t + 16 * i, e);
        s[i] = _mm512_add_ps(s[i], e);
      }
    for (int i = 0; i < G; ++i) _mm512_store_ps(lanes + 16 * i, s[i]);
    for (int l = 0; l < 16 * G; ++l) sum[l % G] += lanes[l];
    for (int64_t t = body; t < total; ++t) {
      x[t] = std::exp(x[t] * scale - m[t % G] * scale);
      sum[t % G] += x[t];
    }
    for (int g = 0; g < G; ++g) {
      if (part_m != nullptr) {
        part_m[kv * G + g] = m[g] * scale;
        part_l[kv * G + g] = sum[g];
      } else {
        norm[kv * G + g] = 1.f / sum[g];
      }
    }
  }
}
#endif

#else
constexpr bool kBf16Attention = false;
#endif  // __AVX512BF16__

}  // namespace
#endif  // __AVX2__
