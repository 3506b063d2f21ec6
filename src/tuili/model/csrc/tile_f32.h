// The float32 micro-kernel of the AVX2 products (gemm.cpp) and of the AVX2 prefill
// attention (prefill_attention_avx2.cpp): MR rows x one panel of 16 columns, over K.
#pragma once
#ifdef __AVX2__
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

namespace tuili::tiles {

constexpr int64_t kPanel = 16;
constexpr int64_t kStreamAhead = 32;  // k steps (rows of a panel) requested ahead by the few-row tiles
constexpr int64_t kTileAhead = 64;    // the same for tiles of 3-6 rows reading a bf16 panel in place
constexpr int kMaxRows = 6;  // 6 x 2 accumulators + 2 weight vectors + 1 broadcast = 15 of 16 registers

// f(std::integral_constant<int, rows>) for rows in 1 .. Max: a tile's row count as the
// template argument its micro-kernel is compiled for.
template <int Max, int MR = 1, typename F>
inline void with_rows(int rows, F&& f) {
  if constexpr (MR == Max) {
    f(std::integral_constant<int, MR>{});
  } else {
    if (rows == MR) f(std::integral_constant<int, MR>{});
    else with_rows<Max, MR + 1>(rows, f);
  }
}

inline void load16(const uint16_t* p, __m256& a, __m256& b) {
  a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8))), 16));
}

inline void load16(const float* p, __m256& a, __m256& b) {
  a = _mm256_loadu_ps(p);
  b = _mm256_loadu_ps(p + 8);
}

// acc[MR][16] = x[MR rows, K] . panel[K][16]. The accumulators are named variables, not
// arrays: compilers keep arrays of vectors in memory and store them on every iteration.
// Every row count sums a row the same way, one float32 FMA per k in order into one
// accumulator per 8 columns, widened or not: a row's result does not depend on how many
// rows share its product (a verification's k+1 rows, a batch of any size), so greedy text
// is the same with and without speculative decoding. (1-2-row tiles used to split the sum
// over two chains, even and odd k; a single chain still outruns memory at 1 row: 2 FMA
// chains of 4-cycle latency per 64 bytes is about 19 GB/s per core.)
#define TUILI_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
// next (or null): a bf16 panel (32 bytes a k step) to request into L2 while this tile runs,
// a line every two k steps: the next panel of a widened block, whose widening then reads L2
// instead of waiting on memory (1.02-1.04x at 32-128 rows on the AVX2 EPYC). A bf16 panel
// read in place by 3-6 rows is requested kTileAhead steps ahead (1.18-1.34x at 6 rows,
// 1.08-1.19x at 16; the MR > 2 loop in pairs of k steps for bf16 only: for the widened
// float32 panel the same paired loop ran at 0.6x).
template <int MR, typename T>
inline void tile(const float* x, int64_t ldx, const T* panel, int64_t K, float* acc, const char* next = nullptr) {
#define TUILI_DECL(r) __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = _mm256_setzero_ps();
  TUILI_ROWS(TUILI_DECL)
#undef TUILI_DECL
  int64_t k = 0;
  if constexpr (MR <= 2) {
    for (; k + 1 < K; k += 2) {
      // Each weight is read once per call and not again before the next step has streamed
      // every other weight through the caches: requested non-temporally ahead of use, so the
      // stream does not push the KV cache, activations and code out of L2/L3.
      _mm_prefetch(reinterpret_cast<const char*>(panel + (k + kStreamAhead) * kPanel), _MM_HINT_NTA);
      __m256 w0, w1, v0, v1;
      load16(panel + k * kPanel, w0, w1);
      load16(panel + (k + 1) * kPanel, v0, v1);
#define TUILI_STEP2(r)                                              \
  if constexpr (MR > r) {                                           \
    const __m256 xa = _mm256_broadcast_ss(x + r * ldx + k);         \
    const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k + 1);     \
    c##r##0 = _mm256_fmadd_ps(xa, w0, c##r##0);                     \
    c##r##1 = _mm256_fmadd_ps(xa, w1, c##r##1);                     \
    c##r##0 = _mm256_fmadd_ps(xb, v0, c##r##0);                     \
    c##r##1 = _mm256_fmadd_ps(xb, v1, c##r##1);                     \
  }
      TUILI_ROWS(TUILI_STEP2)
#undef TUILI_STEP2
    }
  }
#define TUILI_STEP(r, kk)                                           \
  if constexpr (MR > r) {                                           \
    const __m256 xa = _mm256_broadcast_ss(x + r * ldx + (kk));      \
    c##r##0 = _mm256_fmadd_ps(xa, w0, c##r##0);                     \
    c##r##1 = _mm256_fmadd_ps(xa, w1, c##r##1);                     \
  }
#define TUILI_STEP_K(r) TUILI_STEP(r, k)
#define TUILI_STEP_K1(r) TUILI_STEP(r, k + 1)
  if constexpr (MR > 2 && std::is_same_v<T, uint16_t>) {
    for (; k + 1 < K; k += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(panel + (k + kTileAhead) * kPanel), _MM_HINT_NTA);
      {
        __m256 w0, w1;
        load16(panel + k * kPanel, w0, w1);
        TUILI_ROWS(TUILI_STEP_K)
      }
      __m256 w0, w1;
      load16(panel + (k + 1) * kPanel, w0, w1);
      TUILI_ROWS(TUILI_STEP_K1)
    }
  }
  if constexpr (MR > 2 && std::is_same_v<T, float>) {
    if (next != nullptr) {
      for (; k < K; ++k) {
        if ((k & 1) == 0) _mm_prefetch(next + k * 32, _MM_HINT_T1);
        __m256 w0, w1;
        load16(panel + k * kPanel, w0, w1);
        TUILI_ROWS(TUILI_STEP_K)
      }
    }
  }
  for (; k < K; ++k) {
    __m256 w0, w1;
    load16(panel + k * kPanel, w0, w1);
    TUILI_ROWS(TUILI_STEP_K)
  }
#undef TUILI_STEP_K1
#undef TUILI_STEP_K
#undef TUILI_STEP
#define TUILI_STORE(r)                                                               \
  if constexpr (MR > r) {                                                            \
    _mm256_storeu_ps(acc + r * kPanel, c##r##0);                                     \
    _mm256_storeu_ps(acc + r * kPanel + 8, c##r##1);                                 \
  }
  TUILI_ROWS(TUILI_STORE)
#undef TUILI_STORE
}
#undef TUILI_ROWS

}  // namespace tuili::tiles
#endif
