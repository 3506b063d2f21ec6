// Matrix products with few rows (decode) from bfloat16 or int8 weights, on AVX2 CPUs.
//
// A CPU without native bfloat16 runs torch's bf16 matmul at a fraction of memory speed, and
// converting a bf16 weight to float32 for every call costs more memory traffic than the
// product itself. Here the weight is repacked once, at load time, into panels of 16
// output columns: packed[p][k][j] = w[16 p + j][k] (columns past N are zero). A micro-tile
// of MR activation rows x 16 columns keeps its 2 MR accumulators in registers; each weight
// element is loaded once per tile, widened to float32 in registers (bf16: shift left 16;
// int8: sign-extend and convert, the per-row scale applied at the end) and used by every
// row of the tile. Activations and accumulation are float32. Threads split the panels.
//
// The sum over k runs in order, one float32 FMA per element, so results differ from a
// BLAS float32 product of the same values only by summation order.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef __AVX2__
namespace {

constexpr int64_t kPanel = 16;
constexpr int64_t kStreamAhead = 32;  // k steps (rows of a panel) requested ahead by the few-row tiles
constexpr int kMaxRows = 6;  // 6 x 2 accumulators + 2 weight vectors + 1 broadcast = 15 of 16 registers
// Activations of one row block: half of a 512 KB L2. Measured against 64 KB (the
// widened panel is reused by more tiles): 10-15% more GFLOP/s at 64-512 rows.
constexpr int64_t kRowBlockBytes = 256 * 1024;

inline void load16(const uint16_t* p, __m256& a, __m256& b) {
  a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8))), 16));
}

inline void load16(const int8_t* p, __m256& a, __m256& b) {
  a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
}

inline void load16(const float* p, __m256& a, __m256& b) {
  a = _mm256_loadu_ps(p);
  b = _mm256_loadu_ps(p + 8);
}

// acc[MR][16] = x[MR rows, K] . panel[K][16]. The accumulators are named variables, not
// arrays: compilers keep arrays of vectors in memory and store them on every iteration.
#define TUILI_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
template <int MR, typename T>
inline void tile(const float* x, int64_t ldx, const T* panel, int64_t K, float* acc) {
#define TUILI_DECL(r) __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = _mm256_setzero_ps(), \
                             e##r##0 = _mm256_setzero_ps(), e##r##1 = _mm256_setzero_ps();
  TUILI_ROWS(TUILI_DECL)
#undef TUILI_DECL
  int64_t k = 0;
  if constexpr (MR <= 2) {
    // Few rows: a second set of accumulators for odd k breaks the FMA latency chain.
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
    e##r##0 = _mm256_fmadd_ps(xb, v0, e##r##0);                     \
    e##r##1 = _mm256_fmadd_ps(xb, v1, e##r##1);                     \
  }
      TUILI_ROWS(TUILI_STEP2)
#undef TUILI_STEP2
    }
  }
  for (; k < K; ++k) {
    __m256 w0, w1;
    load16(panel + k * kPanel, w0, w1);
#define TUILI_STEP(r)                                               \
  if constexpr (MR > r) {                                           \
    const __m256 xa = _mm256_broadcast_ss(x + r * ldx + k);         \
    c##r##0 = _mm256_fmadd_ps(xa, w0, c##r##0);                     \
    c##r##1 = _mm256_fmadd_ps(xa, w1, c##r##1);                     \
  }
    TUILI_ROWS(TUILI_STEP)
#undef TUILI_STEP
  }
#define TUILI_STORE(r)                                                               \
  if constexpr (MR > r) {                                                            \
    _mm256_storeu_ps(acc + r * kPanel, _mm256_add_ps(c##r##0, e##r##0));            \
    _mm256_storeu_ps(acc + r * kPanel + 8, _mm256_add_ps(c##r##1, e##r##1));        \
  }
  TUILI_ROWS(TUILI_STORE)
#undef TUILI_STORE
}
#undef TUILI_ROWS

template <typename T>
void run_tile(int rows, const float* x, int64_t ldx, const T* panel, int64_t K, float* acc) {
  switch (rows) {
    case 1: tile<1>(x, ldx, panel, K, acc); break;
    case 2: tile<2>(x, ldx, panel, K, acc); break;
    case 3: tile<3>(x, ldx, panel, K, acc); break;
    case 4: tile<4>(x, ldx, panel, K, acc); break;
    case 5: tile<5>(x, ldx, panel, K, acc); break;
    default: tile<6>(x, ldx, panel, K, acc); break;
  }
}

template <typename T, typename Out>
void gemm(const float* x, int64_t M, int64_t K, const T* packed, int64_t N, const float* scales,
          const float* bias, Out* out) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  // Rows are taken in blocks small enough that their activations stay in L2 while the
  // block walks every panel; for decode that is a single block.
  const int64_t row_block = std::max<int64_t>(kMaxRows, (kRowBlockBytes / (K * 4)) / kMaxRows * kMaxRows);
  for (int64_t m0 = 0; m0 < M; m0 += row_block) {
    const int64_t m1 = std::min(M, m0 + row_block);
    // A block of many tiles widens each panel to float32 once, into a per-thread buffer,
    // instead of once per tile: the widening takes vector slots the FMAs need (prefill).
    // With few tiles the extra pass over the panel costs more than it saves (8 rows: -25%).
    const bool widen = !std::is_same_v<T, float> && m1 - m0 >= 4 * kMaxRows;
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      alignas(32) float acc[kMaxRows * kPanel];
      std::vector<float> wide(widen ? K * kPanel : 0);
      for (int64_t p = p0; p < p1; ++p) {
        const T* panel = packed + p * K * kPanel;
        const int64_t n0 = p * kPanel;
        const int64_t width = std::min(kPanel, N - n0);
        if (widen) {
          for (int64_t k = 0; k < K; ++k) {
            __m256 a, b;
            load16(panel + k * kPanel, a, b);
            _mm256_storeu_ps(wide.data() + k * kPanel, a);
            _mm256_storeu_ps(wide.data() + k * kPanel + 8, b);
          }
        }
        for (int64_t m = m0; m < m1; m += kMaxRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, m1 - m));
          if (widen) run_tile<float>(rows, x + m * K, K, wide.data(), K, acc);
          else run_tile<T>(rows, x + m * K, K, panel, K, acc);
          for (int r = 0; r < rows; ++r) {
            Out* o = out + (m + r) * N + n0;
            const float* a = acc + r * kPanel;
            for (int64_t j = 0; j < width; ++j) {
              float v = a[j];
              if (scales) v *= scales[n0 + j];
              if (bias) v += bias[n0 + j];
              o[j] = static_cast<Out>(v);
            }
          }
        }
      }
    });
  }
}

// int4 weights, asymmetric per group of `gs` inputs: w = q * scale + min, codes q in 0..15.
// A panel row holds 16 codes in 8 bytes, byte j = column j (low nibble) and column j + 8
// (high nibble); scales and mins are float32 [groups][16] per panel. Within a group the
// codes are summed against x, then y += scale * that + min * (the group's sum of x).
#define TUILI_Q4_ROWS(X) X(0) X(1) X(2)
template <int MR>
inline void tile_q4(const float* x, int64_t ldx, const uint8_t* panel, const float* sc, const float* mn,
                    const float* xsum, int64_t groups, int64_t gs, float* acc) {
  const __m256i low = _mm256_set1_epi32(0xf);
#define TUILI_DECL(r) __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = _mm256_setzero_ps();
  TUILI_Q4_ROWS(TUILI_DECL)
#undef TUILI_DECL
  for (int64_t grp = 0; grp < groups; ++grp) {
#define TUILI_DECL(r) __m256 e##r##0 = _mm256_setzero_ps(), e##r##1 = _mm256_setzero_ps(), \
                             f##r##0 = _mm256_setzero_ps(), f##r##1 = _mm256_setzero_ps();
    TUILI_Q4_ROWS(TUILI_DECL)
#undef TUILI_DECL
    const int64_t k_end = (grp + 1) * gs;
    for (int64_t k = grp * gs; k < k_end; k += 2) {  // gs is even: codes two at a time
      const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(panel + k * 8)));
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(panel + k * 8 + 8)));
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(a, low)), w1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
      const __m256 v0 = _mm256_cvtepi32_ps(_mm256_and_si256(b, low)), v1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
#define TUILI_STEP(r)                                               \
  if constexpr (MR > r) {                                           \
    const __m256 xa = _mm256_broadcast_ss(x + r * ldx + k);         \
    const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k + 1);     \
    e##r##0 = _mm256_fmadd_ps(xa, w0, e##r##0);                     \
    e##r##1 = _mm256_fmadd_ps(xa, w1, e##r##1);                     \
    f##r##0 = _mm256_fmadd_ps(xb, v0, f##r##0);                     \
    f##r##1 = _mm256_fmadd_ps(xb, v1, f##r##1);                     \
  }
      TUILI_Q4_ROWS(TUILI_STEP)
#undef TUILI_STEP
    }
    const __m256 s0 = _mm256_loadu_ps(sc + grp * kPanel), s1 = _mm256_loadu_ps(sc + grp * kPanel + 8);
    const __m256 m0 = _mm256_loadu_ps(mn + grp * kPanel), m1 = _mm256_loadu_ps(mn + grp * kPanel + 8);
#define TUILI_FOLD(r)                                                           \
  if constexpr (MR > r) {                                                       \
    const __m256 xs = _mm256_set1_ps(xsum[r * groups + grp]);                   \
    c##r##0 = _mm256_fmadd_ps(s0, _mm256_add_ps(e##r##0, f##r##0), c##r##0);   \
    c##r##1 = _mm256_fmadd_ps(s1, _mm256_add_ps(e##r##1, f##r##1), c##r##1);   \
    c##r##0 = _mm256_fmadd_ps(m0, xs, c##r##0);                                 \
    c##r##1 = _mm256_fmadd_ps(m1, xs, c##r##1);                                 \
  }
    TUILI_Q4_ROWS(TUILI_FOLD)
#undef TUILI_FOLD
  }
#define TUILI_STORE(r)                                   \
  if constexpr (MR > r) {                                \
    _mm256_storeu_ps(acc + r * kPanel, c##r##0);         \
    _mm256_storeu_ps(acc + r * kPanel + 8, c##r##1);     \
  }
  TUILI_Q4_ROWS(TUILI_STORE)
#undef TUILI_STORE
}
#undef TUILI_Q4_ROWS

template <typename Out>
void gemm_q4(const float* x, int64_t M, int64_t K, const uint8_t* codes, const float* scales, const float* mins,
             int64_t gs, int64_t N, const float* bias, Out* out) {
  constexpr int kRows = 3;
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t groups = K / gs;
  std::vector<float> xsum(M * groups);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) s += x[m * K + k];
      xsum[m * groups + g] = s;
    }
  const int64_t row_block = std::max<int64_t>(kRows, (64 * 1024 / (K * 4)) / kRows * kRows);
  for (int64_t m0 = 0; m0 < M; m0 += row_block) {
    const int64_t m1 = std::min(M, m0 + row_block);
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      alignas(32) float acc[kRows * kPanel];
      for (int64_t p = p0; p < p1; ++p) {
        const uint8_t* panel = codes + p * K * (kPanel / 2);
        const float* sc = scales + p * groups * kPanel;
        const float* mn = mins + p * groups * kPanel;
        const int64_t n0 = p * kPanel;
        const int64_t width = std::min(kPanel, N - n0);
        for (int64_t m = m0; m < m1; m += kRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kRows, m1 - m));
          const float* xs = xsum.data() + m * groups;
          if (rows == 1) tile_q4<1>(x + m * K, K, panel, sc, mn, xs, groups, gs, acc);
          else if (rows == 2) tile_q4<2>(x + m * K, K, panel, sc, mn, xs, groups, gs, acc);
          else tile_q4<3>(x + m * K, K, panel, sc, mn, xs, groups, gs, acc);
          for (int r = 0; r < rows; ++r) {
            Out* o = out + (m + r) * N + n0;
            for (int64_t j = 0; j < width; ++j) o[j] = static_cast<Out>(acc[r * kPanel + j] + (bias ? bias[n0 + j] : 0.f));
          }
        }
      }
    });
  }
}

}  // namespace

#endif  // __AVX2__

bool gemm_available() {
#ifdef __AVX2__
  return true;
#else
  return false;
#endif
}

// w [N, K] (bfloat16, int8 or float32) -> packed [ceil(N/16), K, 16] of the same dtype.
torch::Tensor pack_weight(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2, "pack_weight: weight must be 2-D");
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t panels = (N + kPanel - 1) / kPanel;
  auto padded = torch::zeros({panels * kPanel, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({panels, kPanel, K}).transpose(1, 2).contiguous();
}

// x [M, K] float32 or bfloat16; returns [M, N] float32 when out_float, else x's dtype.
// scales [N] float32 (int8 weights) and bias [N] are optional (empty tensors).
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor packed, int64_t N, torch::Tensor scales,
                            torch::Tensor bias, bool out_float) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(2) == kPanel, "packed_linear: bad shapes");
#ifndef __AVX2__
  TORCH_CHECK(false, "packed_linear: built without AVX2");
#else
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(packed.size(1) == K && packed.size(0) * kPanel >= N, "packed_linear: weight does not match input");
  auto xf = x.to(torch::kFloat32).contiguous();
  auto out_dtype = out_float ? torch::kFloat32 : x.scalar_type();
  auto out = torch::empty({M, N}, x.options().dtype(out_dtype));
  auto sf = scales.numel() ? scales.to(torch::kFloat32).contiguous() : scales;
  auto bf = bias.numel() ? bias.to(torch::kFloat32).contiguous() : bias;
  const float* s = sf.numel() ? sf.data_ptr<float>() : nullptr;
  const float* b = bf.numel() ? bf.data_ptr<float>() : nullptr;
  const float* xp = xf.data_ptr<float>();
  auto dispatch_out = [&](auto* wp) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(wp)>>;
    if (out_dtype == torch::kFloat32) {
      gemm<W, float>(xp, M, K, wp, N, s, b, out.data_ptr<float>());
    } else if (out_dtype == torch::kBFloat16) {
      gemm<W, at::BFloat16>(xp, M, K, wp, N, s, b, out.data_ptr<at::BFloat16>());
    } else {
      TORCH_CHECK(false, "packed_linear: activations must be float32 or bfloat16");
    }
  };
  switch (packed.scalar_type()) {
    case torch::kBFloat16: dispatch_out(reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>())); break;
    case torch::kChar: dispatch_out(packed.data_ptr<int8_t>()); break;
    case torch::kFloat32: dispatch_out(packed.data_ptr<float>()); break;
    default: TORCH_CHECK(false, "packed_linear: weight must be bfloat16, int8 or float32");
  }
  return out;
#endif
}

// int4: codes [ceil(N/16), K, 8] uint8 (see tile_q4), scales and mins [ceil(N/16), K/group, 16]
// float32; x [M, K] float32 or bfloat16 -> [M, N] in x's dtype (float32 when out_float).
torch::Tensor packed_linear_q4(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor mins,
                               int64_t N, int64_t group, torch::Tensor bias, bool out_float) {
#ifndef __AVX2__
  TORCH_CHECK(false, "packed_linear_q4: built without AVX2");
#else
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 3 && codes.size(2) == kPanel / 2 && codes.scalar_type() == torch::kByte,
              "packed_linear_q4: bad shapes");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(codes.size(1) == K && codes.size(0) * kPanel >= N && group % 2 == 0 && K % group == 0,
              "packed_linear_q4: weight does not match input");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && mins.scalar_type() == torch::kFloat32 &&
              scales.is_contiguous() && mins.is_contiguous() && scales.numel() == codes.size(0) * (K / group) * kPanel &&
              mins.numel() == scales.numel(), "packed_linear_q4: scales/mins");
  auto xf = x.to(torch::kFloat32).contiguous();
  auto out_dtype = out_float ? torch::kFloat32 : x.scalar_type();
  auto out = torch::empty({M, N}, x.options().dtype(out_dtype));
  auto bf = bias.numel() ? bias.to(torch::kFloat32).contiguous() : bias;
  const float* b = bf.numel() ? bf.data_ptr<float>() : nullptr;
  auto cc = codes.contiguous();
  if (out_dtype == torch::kFloat32) {
    gemm_q4<float>(xf.data_ptr<float>(), M, K, cc.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                   mins.data_ptr<float>(), group, N, b, out.data_ptr<float>());
  } else {
    TORCH_CHECK(out_dtype == torch::kBFloat16, "packed_linear_q4: activations must be float32 or bfloat16");
    gemm_q4<at::BFloat16>(xf.data_ptr<float>(), M, K, cc.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                          mins.data_ptr<float>(), group, N, b, out.data_ptr<at::BFloat16>());
  }
  return out;
#endif
}
