// Fused element-wise steps of a Llama decoder layer, for the CPU.
//
// A decode step of a small model is mostly many small tensor ops: each RMSNorm is eight
// of them, rotary embedding and the KV write another twenty. Here each group is one call.
// The arithmetic follows PyTorch's op by op, rounding to the model's dtype where PyTorch
// would store an intermediate tensor in that dtype (`R` below), so bfloat16 results match
// the unfused path and float32 results differ only by the order of a norm's sum of squares.
// Built with -ffp-contract=off so that a * b + c is never fused into one rounding.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

inline float to_f(float x) { return x; }
inline float to_f(at::BFloat16 x) { return static_cast<float>(x); }

// Round a float to what storing it in T and reading it back gives.
template <typename T>
inline float R(float x) { return static_cast<float>(static_cast<T>(x)); }

template <typename T>
void rms_norm_kernel(T* x, const T* delta, const T* w, T* out, int64_t rows, int64_t dim, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* xr = x + r * dim;
      T* o = out + r * dim;
#ifdef __AVX2__
      if (dim % 8 == 0) {  // the same steps 8 lanes at a time (the sum of squares in 8 partial sums)
        using tuili::load8;
        if (delta)
          for (int64_t i = 0; i < dim; i += 8) tuili::store8(xr + i, _mm256_add_ps(load8(xr + i), load8(delta + r * dim + i)));
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < dim; i += 8) {
          const __m256 v = load8(xr + i);
          acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
        }
        const __m256 inv = _mm256_set1_ps(1.f / std::sqrt(tuili::hsum(acc) / static_cast<float>(dim) + eps));
        for (int64_t i = 0; i < dim; i += 8)
          tuili::store8(o + i, _mm256_mul_ps(load8(w + i), tuili::round8(_mm256_mul_ps(load8(xr + i), inv), xr)));
        continue;
      }
#endif
      if (delta) {
        const T* dr = delta + r * dim;
        for (int64_t i = 0; i < dim; ++i) xr[i] = static_cast<T>(to_f(xr[i]) + to_f(dr[i]));
      }
      float ss = 0.f;
      for (int64_t i = 0; i < dim; ++i) {
        const float v = to_f(xr[i]);
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
      for (int64_t i = 0; i < dim; ++i) o[i] = static_cast<T>(to_f(w[i]) * R<T>(to_f(xr[i]) * inv));
    }
  });
}

// Rotate-half rotary embedding of one head, rounding like q * cos + rotate_half(q) * sin in T.
template <typename T>
inline void rotate(const T* src, const T* cos, const T* sin, int64_t dim, float* dst) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < dim; ++i) {
    const float rot = i < half ? -to_f(src[i + half]) : to_f(src[i - half]);
    dst[i] = R<T>(R<T>(to_f(src[i]) * to_f(cos[i])) + R<T>(rot * to_f(sin[i])));
  }
}

#ifdef __AVX512F__
// rotate() 16 lanes at a time, for head dims that are a multiple of 32: the same roundings
// (a lane's -x flips the sign bit, as the scalar negation does, zeros included). In a batch-32
// decode step of the default model (timers around each call, Zen 5): 0.61 -> 0.36 ms of rotary
// embedding and K/V writes a step.
template <typename T>
inline void rotate16(const T* src, const T* cos, const T* sin, int64_t dim, float* dst) {
  const int64_t half = dim / 2;
  const __m512i sign = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  for (int64_t i = 0; i < half; i += 16) {
    const __m512 a = tuili::load16(src + i), b = tuili::load16(src + i + half);
    const __m512 nb = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(b), sign));
    const __m512 lo = _mm512_add_ps(tuili::round16(_mm512_mul_ps(a, tuili::load16(cos + i)), src),
                                    tuili::round16(_mm512_mul_ps(nb, tuili::load16(sin + i)), src));
    const __m512 hi = _mm512_add_ps(tuili::round16(_mm512_mul_ps(b, tuili::load16(cos + i + half)), src),
                                    tuili::round16(_mm512_mul_ps(a, tuili::load16(sin + i + half)), src));
    _mm512_storeu_ps(dst + i, tuili::round16(lo, src));
    _mm512_storeu_ps(dst + i + half, tuili::round16(hi, src));
  }
}
#endif

// One head's rotary embedding into dst (float32, rounded as T), vectorised where it can be.
template <typename T>
inline void rotate_head(const T* src, const T* cos, const T* sin, int64_t dim, float* dst) {
#ifdef __AVX512F__
  if (dim % 32 == 0) return rotate16(src, cos, sin, dim, dst);
#endif
  rotate(src, cos, sin, dim, dst);
}

// dst[0 .. dim) = src as C (float32 values already rounded as T), 16 at a time where it can be.
template <typename C>
inline void store_row(const float* src, int64_t dim, C* dst) {
  int64_t i = 0;
#ifdef __AVX512F__
  if constexpr (!std::is_same_v<C, int8_t>)
    for (; i + 16 <= dim; i += 16) tuili::store16(dst + i, _mm512_loadu_ps(src + i));
#endif
  for (; i < dim; ++i) dst[i] = static_cast<C>(src[i]);
}

template <typename T, typename C>
void rope_write_kernel(const T* qkv, const int64_t* pos, const T* cos, const T* sin, int64_t tokens,
                       int64_t heads, int64_t kv_heads, int64_t dim, C* k_cache, C* v_cache, const int64_t* slots,
                       float* k_scales, float* v_scales, T* q_out) {
  const int64_t width = (heads + 2 * kv_heads) * dim;
  at::parallel_for(0, tokens, 8, [&](int64_t t0, int64_t t1) {
    std::vector<float> row(dim);
    for (int64_t t = t0; t < t1; ++t) {
      const T* src = qkv + t * width;
      const T* c = cos + pos[t] * dim;
      const T* s = sin + pos[t] * dim;
      for (int64_t h = 0; h < heads; ++h) {
        rotate_head(src + h * dim, c, s, dim, row.data());
        store_row(row.data(), dim, q_out + (t * heads + h) * dim);
      }
      const int64_t slot = slots[t];
      for (int64_t h = 0; h < kv_heads; ++h) {
        const T* vsrc = src + (heads + kv_heads + h) * dim;
        rotate_head(src + (heads + h) * dim, c, s, dim, row.data());
        C* kd = k_cache + (slot * kv_heads + h) * dim;
        C* vd = v_cache + (slot * kv_heads + h) * dim;
        if constexpr (std::is_same_v<C, int8_t>) {
          // Symmetric int8 per (token, head), as layers.quantize_kv.
          float ka = 0.f, va = 0.f;
          for (int64_t i = 0; i < dim; ++i) {
            ka = std::max(ka, std::fabs(row[i]));
            va = std::max(va, std::fabs(to_f(vsrc[i])));
          }
          const float ks = std::max(ka / 127.f, 1e-8f), vs = std::max(va / 127.f, 1e-8f);
          for (int64_t i = 0; i < dim; ++i) {
            kd[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(row[i] / ks))));
            vd[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(to_f(vsrc[i]) / vs))));
          }
          k_scales[slot * kv_heads + h] = ks;
          v_scales[slot * kv_heads + h] = vs;
        } else {
          store_row(row.data(), dim, kd);
          std::memcpy(vd, vsrc, dim * sizeof(T));
        }
      }
    }
  });
}

template <typename T>
void silu_mul_kernel(const T* gate_up, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = gate_up + r * 2 * inter;
      const T* u = g + inter;
      T* o = out + r * inter;
      int64_t i = 0;
#ifdef __AVX512F__
      for (; i + 16 <= inter; i += 16) {  // the AVX2 loop below, 16 lanes at a time
        const __m512 x = tuili::load16(g + i);
        const __m512 silu =
            _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), tuili::exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
        tuili::store16(o + i, _mm512_mul_ps(tuili::round16(silu, g), tuili::load16(u + i)));
      }
#endif
#ifdef __AVX2__
      for (; i + 8 <= inter; i += 8) {
        const __m256 x = tuili::load8(g + i);
        const __m256 one = _mm256_set1_ps(1.f);
        const __m256 silu = _mm256_div_ps(x, _mm256_add_ps(one, tuili::exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
        tuili::store8(o + i, _mm256_mul_ps(tuili::round8(silu, g), tuili::load8(u + i)));
      }
#endif
      for (; i < inter; ++i) {
        const float x = to_f(g[i]);
        o[i] = static_cast<T>(R<T>(x / (1.f + std::exp(-x))) * to_f(u[i]));
      }
    }
  });
}

// The index of the first maximal value of x[0 .. n), a NaN counting as the largest (the first
// NaN wins), as torch.max(dim=-1).indices gives it. n > 0.
inline int64_t argmax_row(const float* x, int64_t n) {
  int64_t i = 0;
  float m = -INFINITY;
  bool nan = false;
#ifdef __AVX2__
  __m256 v[4], un = _mm256_setzero_ps();
  for (int k = 0; k < 4; ++k) v[k] = _mm256_set1_ps(-INFINITY);
  for (; i + 32 <= n; i += 32)
    for (int k = 0; k < 4; ++k) {
      const __m256 a = _mm256_loadu_ps(x + i + 8 * k);
      v[k] = _mm256_max_ps(v[k], a);
      un = _mm256_or_ps(un, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(v[0], v[1]), _mm256_max_ps(v[2], v[3])));
  for (float l : lanes) m = std::max(m, l);
  nan = _mm256_movemask_ps(un) != 0;
#endif
  for (; i < n; ++i) {
    if (std::isnan(x[i])) nan = true;
    else m = std::max(m, x[i]);
  }
  if (nan)
    for (int64_t j = 0; j < n; ++j)
      if (std::isnan(x[j])) return j;
  int64_t j = 0;
#ifdef __AVX2__
  const __m256 mv = _mm256_set1_ps(m);
  for (; j + 8 <= n; j += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), mv, _CMP_EQ_OQ));
    if (hit) return j + __builtin_ctz(hit);
  }
#endif
  for (; j < n; ++j)
    if (x[j] == m) return j;
  return 0;
}

}  // namespace

// x [rows, dim] (float32 or bfloat16, contiguous), w [dim]. With a non-empty delta, first
// x += delta in place (the residual add); returns weight * normalize(x) in x's dtype.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps, torch::Tensor delta) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.scalar_type() == x.scalar_type(), "rms_norm: bad input");
  TORCH_CHECK(!delta.numel() || (delta.sizes() == x.sizes() && delta.scalar_type() == x.scalar_type()),
              "rms_norm: delta must match x");
  auto d = delta.numel() ? delta.contiguous() : delta;
  auto wc = w.contiguous();
  auto out = torch::empty_like(x);
  if (x.scalar_type() == torch::kFloat32) {
    rms_norm_kernel<float>(x.data_ptr<float>(), d.numel() ? d.data_ptr<float>() : nullptr, wc.data_ptr<float>(),
                           out.data_ptr<float>(), x.size(0), x.size(1), static_cast<float>(eps));
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "rms_norm: float32 or bfloat16");
    rms_norm_kernel<at::BFloat16>(x.data_ptr<at::BFloat16>(), d.numel() ? d.data_ptr<at::BFloat16>() : nullptr,
                                  wc.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), x.size(0), x.size(1),
                                  static_cast<float>(eps));
  }
  return out;
}

// qkv [T, (H + 2 KVH) * D] -> q [T, H, D] rotated; K rotated and V stored at `slots` of the
// cache ([blocks, block_size, KVH, D], the qkv dtype, or int8 with float32 scales
// [blocks, block_size, KVH]). cos/sin: [positions, D] tables in the qkv dtype.
torch::Tensor rope_write_kv(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
                            int64_t heads, int64_t kv_heads, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor slots, torch::Tensor k_scales, torch::Tensor v_scales) {
  const int64_t T = qkv.size(0);
  const int64_t D = cos.size(1);
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (heads + 2 * kv_heads) * D, "rope_write_kv: qkv");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type() &&
              cos.is_contiguous() && sin.is_contiguous(), "rope_write_kv: cos/sin");
  TORCH_CHECK(positions.scalar_type() == torch::kLong && slots.scalar_type() == torch::kLong &&
              positions.numel() == T && slots.numel() == T, "rope_write_kv: positions/slots");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.size(-1) == D &&
              k_cache.size(-2) == kv_heads, "rope_write_kv: cache");
  const bool quant = k_cache.scalar_type() == torch::kChar;
  TORCH_CHECK(quant || k_cache.scalar_type() == qkv.scalar_type(), "rope_write_kv: cache dtype");
  TORCH_CHECK(!quant || (k_scales.is_contiguous() && v_scales.is_contiguous() &&
                         k_scales.scalar_type() == torch::kFloat32), "rope_write_kv: scales");
  auto pos = positions.contiguous();
  auto sl = slots.contiguous();
  auto q = torch::empty({T, heads, D}, qkv.options());
  float* ks = quant ? k_scales.data_ptr<float>() : nullptr;
  float* vs = quant ? v_scales.data_ptr<float>() : nullptr;
  auto run = [&](auto* typed) {
    using T_ = std::remove_pointer_t<decltype(typed)>;
    const T_* src = qkv.data_ptr<T_>();
    if (quant) {
      rope_write_kernel<T_, int8_t>(src, pos.data_ptr<int64_t>(), cos.data_ptr<T_>(), sin.data_ptr<T_>(), T, heads,
                                    kv_heads, D, k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(),
                                    sl.data_ptr<int64_t>(), ks, vs, q.data_ptr<T_>());
    } else {
      rope_write_kernel<T_, T_>(src, pos.data_ptr<int64_t>(), cos.data_ptr<T_>(), sin.data_ptr<T_>(), T, heads,
                                kv_heads, D, k_cache.data_ptr<T_>(), v_cache.data_ptr<T_>(), sl.data_ptr<int64_t>(),
                                nullptr, nullptr, q.data_ptr<T_>());
    }
  };
  if (qkv.scalar_type() == torch::kFloat32) {
    run(static_cast<float*>(nullptr));
  } else {
    TORCH_CHECK(qkv.scalar_type() == torch::kBFloat16, "rope_write_kv: float32 or bfloat16");
    run(static_cast<at::BFloat16*>(nullptr));
  }
  return q;
}

// gate_up [T, 2 I] -> silu(gate) * up [T, I].
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0, "silu_mul: bad input");
  const int64_t I = gate_up.size(1) / 2;
  auto out = torch::empty({gate_up.size(0), I}, gate_up.options());
  if (gate_up.scalar_type() == torch::kFloat32) {
    silu_mul_kernel<float>(gate_up.data_ptr<float>(), out.data_ptr<float>(), gate_up.size(0), I);
  } else {
    TORCH_CHECK(gate_up.scalar_type() == torch::kBFloat16, "silu_mul: float32 or bfloat16");
    silu_mul_kernel<at::BFloat16>(gate_up.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), gate_up.size(0), I);
  }
  return out;
}

// x [rows, n] float32 -> [rows] int64: each row's first maximal index (greedy sampling). torch's
// max over the last dim took about 1 ms for a batch of 32 rows of a 49,152-token vocabulary on
// 2 threads of the Zen 5 EPYC, about 3% of a decode step; this takes 0.08 ms.
torch::Tensor argmax_rows(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.size(1) > 0,
              "argmax_rows: float32 [rows, n] with n > 0");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), N = xc.size(1);
  auto out = torch::empty({M}, xc.options().dtype(torch::kLong));
  const float* p = xc.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, M, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) o[r] = argmax_row(p + r * N, N);
  });
  return out;
}
