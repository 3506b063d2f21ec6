// Decode attention, the parts every CPU path shares (paged_attention.cpp): reading a cache
// entry as float, walking a sequence's positions block by block, and the portable kernel
// for CPUs without AVX2 or head dims that are not a multiple of 8.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float x) { return x; }

inline float to_float(int8_t x) { return static_cast<float>(x); }

inline float to_float(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Walks one sequence's positions first..end_pos-1 block by block: on_block(t0) before each
// block (t0: the block's first position), then fn(slot, pos) for each position, with slot
// its row in the cache (block id * block_size + offset) and pos its index from `first`.
template <typename OnBlock, typename Fn>
inline void for_each_position(const int64_t* table, int64_t block_size, int64_t first, int64_t end_pos,
                              OnBlock&& on_block, Fn&& fn) {
  for (int64_t t0 = first - first % block_size; t0 < end_pos; t0 += block_size) {
    const int64_t slot0 = table[t0 / block_size] * block_size;
    const int64_t n = std::min(end_pos - t0, block_size);
    on_block(t0);
    for (int64_t i = std::max<int64_t>(0, first - t0); i < n; ++i) fn(slot0 + i, t0 + i - first);
  }
}

inline void no_prefetch(int64_t) {}

template <typename T>
void decode_kernel(const float* q, const T* k_cache, const T* v_cache, const float* k_scales,
                   const float* v_scales, const int64_t* tables, const int64_t* lens, float* out, int64_t batch, int64_t heads, int64_t kv_heads,
                   int64_t dim, int64_t block_size, int64_t table_width, float scale, int64_t window) {
  const int64_t group = heads / kv_heads;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> row(dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads;
      const int64_t kvh = task % kv_heads;
      const int64_t end_pos = lens[b];
      const int64_t first = window > 0 && end_pos > window ? end_pos - window : 0;  // first position read
      const int64_t len = end_pos - first;  // positions read; scores are indexed from `first`
      const int64_t* table = tables + b * table_width;
      const float* qb = q + (b * heads + kvh * group) * dim;
      float* ob = out + (b * heads + kvh * group) * dim;
      scores.assign(group * len, 0.f);
      for_each_position(table, block_size, first, end_pos, no_prefetch, [&](int64_t slot, int64_t pos) {
        const T* kp = k_cache + (slot * kv_heads + kvh) * dim;
        const float ks = k_scales ? k_scales[slot * kv_heads + kvh] : 1.f;
        for (int64_t d = 0; d < dim; ++d) row[d] = to_float(kp[d]) * ks;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qb + g * dim;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < dim; ++d) s += qg[d] * row[d];
          scores[g * len + pos] = s * scale;
        }
      });
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * len;
        float m = -INFINITY;
        for (int64_t t = 0; t < len; ++t) m = sg[t] > m ? sg[t] : m;
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          sg[t] = std::exp(sg[t] - m);
          sum += sg[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; ++t) sg[t] *= inv;
        std::memset(ob + g * dim, 0, dim * sizeof(float));
      }
      for_each_position(table, block_size, first, end_pos, no_prefetch, [&](int64_t slot, int64_t pos) {
        const T* vp = v_cache + (slot * kv_heads + kvh) * dim;
        const float vs = v_scales ? v_scales[slot * kv_heads + kvh] : 1.f;
        for (int64_t d = 0; d < dim; ++d) row[d] = to_float(vp[d]) * vs;
        for (int64_t g = 0; g < group; ++g) {
          const float w = scores[g * len + pos];
          float* og = ob + g * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) og[d] += w * row[d];
        }
      });
    }
  });
}

}  // namespace
