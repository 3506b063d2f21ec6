// Matrix products from bfloat16, int8 or int4 weights, on AVX2 CPUs.
//
// A CPU without native bfloat16 runs torch's bf16 matmul at a fraction of memory speed, and
// converting a bf16 weight to float32 for every call costs more memory traffic than the
// product itself. Here the weight is repacked once, at load time, into panels of 16
// output columns: packed[p][k][j] = w[16 p + j][k] (columns past N are zero). A micro-tile
// of MR activation rows x 16 columns keeps its 2 MR accumulators in registers; each weight
// element is loaded once per tile, widened to float32 in registers (bf16: shift left 16)
// and used by every row of the tile. Activations and accumulation are float32. Threads
// split the panels. The sum over k runs in order, one float32 FMA per element, so results
// differ from a BLAS float32 product of the same values only by summation order.
//
// int8 and int4 weights multiply int8 activations instead (gemm_a8, gemm_q4a8 below): the
// activations are quantized per block of 32 inputs on the fly, and the products are
// integer byte products summed exactly in int32.
//
// Every product walks row blocks, panels and tiles through one loop (for_each_tile) and
// writes its sums out through one function (store_rows); what differs is only the
// micro-kernel of a tile. The tiles over two panels (vdpbf16ps; int8 VNNI) walk
// the same blocks in for_each_pair_tile, threads splitting the panels in pairs. The AMX products
// (bf16, and int8 from a measured row count) keep loops of their own: their unit is two panels
// x 32 rows held in tile registers configured once per thread.
//
// Why this file stays whole (over 600 lines): its parts share one anonymous namespace of
// compile-time constants, the tile loop and the write-out, all inlined into each product,
// and they are picked at compile time by the CPU's instruction sets (AVX2, AVX512-BF16,
// AMX) in one dispatch (packed_linear). Split into files, each would need those shared
// templates in a header and its own #if guards repeated, for no file shorter to read on
// its own: each section below (float32 widening, int8, int8 on AMX, int4, bf16 pairs, AMX) is one
// block that reads top to bottom.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "tile_f32.h"
#include "vec.h"

// int8 products of at least this many rows run on AMX tiles where the CPU has them
// (gemm_amx_a8), fewer on the VNNI / AVX2 tiles; set from the measurement in paths.py.
static std::atomic<int64_t> g_int8_amx_rows{16};

#ifdef __AVX2__
namespace {
#ifdef __AMX_TILE__
using tuili::TileConfig;
#endif

using tuili::tiles::kMaxRows;
using tuili::tiles::kPanel;
using tuili::tiles::load16;
using tuili::tiles::tile;
using tuili::tiles::with_rows;
// Activations of one row block: half of a 512 KB L2. Measured against 64 KB (the
// widened panel is reused by more tiles): 10-15% more GFLOP/s at 64-512 rows.
constexpr int64_t kRowBlockBytes = 256 * 1024;

// Rows per block of a product whose activation rows take `row_bytes` each (a multiple of TileRows).
inline int64_t row_block_rows(int64_t row_bytes, int64_t tile_rows) {
  return std::max<int64_t>(tile_rows, (kRowBlockBytes / row_bytes) / tile_rows * tile_rows);
}

// out[m][n0 .. n0 + width) = sums (rows x 16 float32, row stride 16) * scales + bias, for
// `rows` rows: the write-out of a tile's sums in every product. Per-column scales (int8
// weights) and bias are optional (null).
template <typename Out>
inline void store_rows(const float* sums, int64_t rows, int64_t n0, int64_t width, int64_t N, const float* scales,
                       const float* bias, Out* out) {
  for (int64_t r = 0; r < rows; ++r) {
    Out* o = out + r * N + n0;
    const float* a = sums + r * kPanel;
    for (int64_t j = 0; j < width; ++j) {
      float v = a[j];
      if (scales) v *= scales[n0 + j];
      if (bias) v += bias[n0 + j];
      o[j] = static_cast<Out>(v);
    }
  }
}

// Rows m0 .. m1 - 1 cut into `tiles` tiles whose sizes differ by one at most, f(first row,
// rows) for each: 32 rows in tiles of up to 6 are 6 + 6 + 5 + 5 + 5 + 5, not 6 x 5 + 2 (a
// short tile has few accumulators to hide the multiply-add's latency; on the Zen 5 EPYC the
// two cuts measured within 0.99-1.02x of each other, kernel_ab at 8-64 rows).
template <typename F>
inline void balanced_tiles(int64_t m0, int64_t m1, int64_t tiles, F&& f) {
  const int64_t base = (m1 - m0) / tiles, extra = (m1 - m0) % tiles;
  for (int64_t t = 0, m = m0; t < tiles; ++t) {
    const int rows = static_cast<int>(base + (t < extra ? 1 : 0));
    f(m, rows);
    m += rows;
  }
}

// No work before a panel's tiles (see for_each_tile).
struct NoPanelStep {
  void operator()(int64_t, int64_t, std::vector<float>&) const {}
};

// The loop every product here runs but AMX's: rows are taken in blocks small enough that
// their activations (`row_bytes` each) stay in L2 while the block walks every panel (for
// decode that is a single block); the panels of a block are split among threads; each panel
// is covered by tiles of up to TileRows rows. Per (block, panel), `panel_step(p, block_rows,
// scratch)` runs first (scratch: a buffer of the thread's own); per tile,
// `tile(p, m, rows, scratch, acc)` leaves the tile's sums in acc [rows][16], which are then
// written out with `scales` and `bias` (store_rows).
template <int TileRows, typename Out, typename Tile, typename PanelStep = NoPanelStep, bool Balanced = false>
void for_each_tile(int64_t M, int64_t N, int64_t row_bytes, const float* scales, const float* bias, Out* out,
                   Tile tile, PanelStep panel_step = {}) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t row_block = row_block_rows(row_bytes, TileRows);
  for (int64_t m0 = 0; m0 < M; m0 += row_block) {
    const int64_t m1 = std::min(M, m0 + row_block);
    // Balanced: the block's rows in tiles of equal size (16 rows as 8 + 8, not 12 + 4), for
    // kernels whose short tiles cost nearly what full ones do.
    const int64_t tiles = (m1 - m0 + TileRows - 1) / TileRows;
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      alignas(64) float acc[TileRows * kPanel];
      std::vector<float> scratch;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * kPanel;
        const int64_t width = std::min(kPanel, N - n0);
        panel_step(p, m1 - m0, scratch);
        auto run = [&](int64_t m, int rows) {
          tile(p, m, rows, scratch, acc);
          store_rows(acc, rows, n0, width, N, scales, bias, out + m * N);
        };
        if constexpr (Balanced) {
          balanced_tiles(m0, m1, tiles, run);
        } else {
          for (int64_t m = m0; m < m1; m += TileRows) run(m, static_cast<int>(std::min<int64_t>(TileRows, m1 - m)));
        }
      }
    });
  }
}


// The pair of panels a thread takes after this one (first panel `p`, -1 when none or when the
// panels take their own tiles), and which of the pair's `parts` tiles runs now: a tile may
// request its share of the next pair's lines while it computes (gemm_bf16x2).
struct NextPair {
  int64_t p, part, parts;
};

// Items [0, n) over the threads; f(q, q_next) per item, with q_next the item the thread takes
// after q (-1: none or not known).
// two_ended: each thread's share is taken as it goes, not fixed up front. A product of a
// decode step lasts 20-110 us a thread, and with halves fixed at the start a thread that
// started late or was held up (the server's event loop shares the cores) left the other
// waiting at the end. Threads go in twos over a contiguous range (its length in proportion to
// its threads), one from each end, so each still knows its next item, and the two meet
// wherever their speeds put them; one atomic per range counts the items taken, so the ends
// never cross. The thread from the back walks memory downwards from item to item, which only
// pays where the tiles request the next item's weights themselves (the bf16 pair tiles from
// kBf16PairRows rows; kernel_ab.py, Zen 5: 0.91-0.93x at 1 and 6 rows without the requests,
// and no gain for the int8 tiles). Otherwise: contiguous shares fixed up front.
template <typename F>
void for_each_item_two_ended(int64_t n, bool two_ended, F&& f) {
  if (!two_ended) {
    at::parallel_for(0, n, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) f(q, q + 1 < q1 ? q + 1 : -1);
    });
    return;
  }
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  const int64_t ranges = (threads + 1) / 2;  // an odd thread out has a range of its own
  std::vector<std::atomic<int64_t>> taken(ranges);
  for (auto& a : taken) a.store(0, std::memory_order_relaxed);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / 2, lo = n * (2 * r) / threads, hi = n * std::min(2 * r + 2, threads) / threads;
      std::atomic<int64_t>& count = taken[r];
      const bool back = t % 2 == 1;
      for (int64_t i = 0; count.fetch_add(1, std::memory_order_relaxed) < hi - lo; ++i) {
        if (back)
          f(hi - 1 - i, hi - 2 - i >= lo ? hi - 2 - i : -1);
        else
          f(lo + i, lo + i + 1 < hi ? lo + i + 1 : -1);
      }
    }
  });
}

// The loop of the two-panel tiles (gemm_bf16x2; gemm_a8 with VNNI): row blocks as
// for_each_tile's, each block's rows in tiles of equal size, threads splitting the panels in
// pairs. Where `joint`, a tile covers both panels of a pair; otherwise (and for an odd last
// panel) each panel takes its own tiles; `two_ended`: the pairs handed out as in
// for_each_item_two_ended. Per tile, `tile(p, np, m, rows, acc, next)` leaves the
// sums of np panels (a compile-time 1 or 2) from panel p at acc + j * TileRows * kPanel, written
// out with `scales` and `bias`; `next` is a NextPair.
template <int TileRows, typename Out, typename Tile>
void for_each_pair_tile(int64_t M, int64_t N, int64_t row_bytes, bool joint, bool two_ended, const float* scales,
                        const float* bias, Out* out, Tile tile) {
  const int64_t panels = (N + kPanel - 1) / kPanel, pairs = (panels + 1) / 2;
  const int64_t row_block = row_block_rows(row_bytes, TileRows);
  for (int64_t m0 = 0; m0 < M; m0 += row_block) {
    const int64_t m1 = std::min(M, m0 + row_block), tiles = (m1 - m0 + TileRows - 1) / TileRows;
    for_each_item_two_ended(pairs, two_ended, [&](int64_t q, int64_t q_next) {
      alignas(64) float acc[2 * TileRows * kPanel];
      auto tiles_of = [&](int64_t p, auto np, int64_t next) {  // np: panels per tile, a compile-time 1 or 2
        int64_t part = 0;
        balanced_tiles(m0, m1, tiles, [&](int64_t m, int rows) {
          tile(p, np, m, rows, acc, NextPair{next, part++, tiles});
          for (int i = 0; i < decltype(np)::value; ++i) {
            const int64_t n0 = (p + i) * kPanel;
            store_rows(acc + i * TileRows * kPanel, rows, n0, std::min(kPanel, N - n0), N, scales, bias, out + m * N);
          }
        });
      };
      const int64_t p = 2 * q;
      if (joint && p + 1 < panels) {
        tiles_of(p, std::integral_constant<int, 2>{}, q_next >= 0 ? 2 * q_next : -1);
      } else {
        for (int64_t j = p; j < std::min(p + 2, panels); ++j) tiles_of(j, std::integral_constant<int, 1>{}, -1);
      }
    });
  }
}

template <typename T, typename Out>
void gemm(const float* x, int64_t M, int64_t K, const T* packed, int64_t N, const float* scales,
          const float* bias, Out* out) {
  // A block of many tiles widens each panel to float32 once, into the thread's scratch
  // buffer, instead of once per tile: the widening takes vector slots the FMAs need
  // (prefill). With few tiles the extra pass over the panel costs more than it saves
  // (8 rows: -25%). Widened or not, the tile sums the same float32 values in the same order.
  // `wide` (one per thread and row block) stays empty, and the tiles read the packed panel, or
  // holds the panel widened: the same choice for every panel of a block, so it is sized once
  // (resizing it per panel zero-filled it first, a memset as large as the widened panel).
  auto widen = [&](int64_t p, int64_t block_rows, std::vector<float>& wide) {
    if (std::is_same_v<T, float> || block_rows < 4 * kMaxRows) return;
    if (wide.size() != static_cast<size_t>(K * kPanel)) wide.resize(K * kPanel);
    const T* panel = packed + p * K * kPanel;
    for (int64_t k = 0; k < K; ++k) {
      __m256 a, b;
      load16(panel + k * kPanel, a, b);
      _mm256_storeu_ps(wide.data() + k * kPanel, a);
      _mm256_storeu_ps(wide.data() + k * kPanel + 8, b);
    }
  };
  // The first tile of each widened panel requests the next panel, widened after this one's tiles.
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t wide_block = row_block_rows(K * 4, kMaxRows);  // as for_each_tile splits the rows
  auto run = [&](int64_t p, int64_t m, int rows, std::vector<float>& wide, float* acc) {
    with_rows<kMaxRows>(rows, [&](auto mr) {
      if (!wide.empty()) {
        const bool ask = std::is_same_v<T, uint16_t> && m % wide_block == 0 && p + 1 < panels;
        tile<decltype(mr)::value>(x + m * K, K, wide.data(), K, acc,
                                  ask ? reinterpret_cast<const char*>(packed + (p + 1) * K * kPanel) : nullptr);
      }
      else tile<decltype(mr)::value>(x + m * K, K, packed + p * K * kPanel, K, acc);
    });
  };
  for_each_tile<kMaxRows>(M, N, K * 4, scales, bias, out, run, widen);
}

// ---- int8 weights x int8 activations -------------------------------------------------
// Each activation row is quantized on the fly, per block of 32 inputs, to int8 with one
// float32 scale per block (round to nearest, the block's abs-max maps to 127). Sums of
// int8 x int8 products are exact in int32; each block's sum is scaled to float32 once.
// Per 64 products this takes 2 sign + 2 multiply-add-pairs + 2 pair-sum + 2 add
// instructions, where widening the int8 weight to float32 took 8 + 8 conversions and
// 8 FMAs (docs/BENCHMARKS.md, "int8 activations").
//
// Weight layout: [ceil(N/16)][K32/4][16][4] int8 (K32 = K rounded up to 32, padded with
// zeros): the 4 consecutive inputs of one column are adjacent, so one 32-byte load holds
// 4 inputs x 8 columns. AVX2's byte product (maddubs) takes one unsigned operand: it gets
// |x| and the weight takes x's sign (sign_epi8), as |x| w sign(x) = x w. With |x|, |w| <=
// 127 a pair of products is at most 32,258 and never saturates the int16 sum.
constexpr int64_t kQBlock = 32;
// Bytes of the int8 / int4 weight streams requested ahead, into L1 (_MM_HINT_T0). On the
// AVX512 Xeon, batch 1, the non-temporal hint at 512 B / 2 KB ran int8 at 9.3 ms and int4
// at 7.1 ms; T0 at 1 KB at 6.5 and 3.7 ms.
constexpr int64_t kA8Ahead = 1024;
constexpr int64_t kQ4A8Ahead = 1024;
constexpr int kA8Rows = 2;  // measured: 4-row tiles were slower at every row count (4 rows: 19 ms, 2 x 2: 12 ms)
constexpr int kQ4A8Rows = 2;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// x [M][K] float32 -> xq [M][K32] int8 and xs [M][K32/32] float32 (zero padding).
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* xs, int32_t* comp = nullptr) {
  const int64_t K32 = round_up(K, kQBlock), nb = K32 / kQBlock;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    alignas(32) float buf[kQBlock];
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * kQBlock, n = std::min(kQBlock, K - k0);
        const float* src = x + m * K + k0;
        if (n < kQBlock) {
          std::memset(buf, 0, sizeof(buf));
          std::memcpy(buf, src, n * sizeof(float));
          src = buf;
        }
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int i = 0; i < 4; ++i) {
          v[i] = _mm256_loadu_ps(src + 8 * i);
          amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
        const float mx = _mm_cvtss_f32(h);
        const float scale = mx / 127.f;
        xs[m * nb + b] = scale;
        const __m256 inv = _mm256_set1_ps(mx > 0.f ? 127.f / mx : 0.f);
        __m256i q[4];
        for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // nearest, ties to even
        // int32 -> int8 keeping order: packs interleave 128-bit lanes, the permute undoes it.
        const __m256i w16 = _mm256_packs_epi32(q[0], q[1]), z16 = _mm256_packs_epi32(q[2], q[3]);
        const __m256i b8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16, z16),
                                                       _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + m * K32 + k0), b8);
        if (comp) {  // -128 x the block's code sum (tile_vnni's offset weights)
          int32_t sum = 0;
          for (int i = 0; i < kQBlock; ++i) sum += xq[m * K32 + k0 + i];
          comp[m * nb + b] = -128 * sum;
        }
      }
    }
  });
}

// acc[MR][16] = sum over blocks of xs[r][b] * (xq[r, block b] . panel[block b]) in float32.
#define TUILI_A8_ROWS(X) X(0) X(1)
template <int MR>
inline void tile_a8(const int8_t* xq, const float* xs, int64_t K32, const int8_t* panel, const float* ws, float* acc) {
  static_assert(MR <= kA8Rows, "TUILI_A8_ROWS names kA8Rows rows");
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t nb = K32 / kQBlock;
#define TUILI_DECL(r) __m256 f##r##0 = _mm256_setzero_ps(), f##r##1 = _mm256_setzero_ps();
  TUILI_A8_ROWS(TUILI_DECL)
#undef TUILI_DECL
  for (int64_t b = 0; b < nb; ++b) {
#define TUILI_DECL(r) __m256i i##r##0 = _mm256_setzero_si256(), i##r##1 = _mm256_setzero_si256();
    TUILI_A8_ROWS(TUILI_DECL)
#undef TUILI_DECL
    const int8_t* wb = panel + b * kQBlock * kPanel;
    for (int64_t g = 0; g < kQBlock / 4; ++g) {  // 4 inputs x 16 columns = one 64-byte line
      const int8_t* wp = wb + g * 64;
      _mm_prefetch(reinterpret_cast<const char*>(wp + kA8Ahead), _MM_HINT_T0);
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32));
#define TUILI_STEP(r)                                                                              \
  if constexpr (MR > r) {                                                                          \
    int32_t x4;                                                                                    \
    std::memcpy(&x4, xq + r * K32 + b * kQBlock + g * 4, 4);                                       \
    const __m256i xv = _mm256_set1_epi32(x4), xa = _mm256_abs_epi8(xv);                            \
    i##r##0 = _mm256_add_epi32(i##r##0,                                                            \
                               _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(w0, xv)), ones)); \
    i##r##1 = _mm256_add_epi32(i##r##1,                                                            \
                               _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(w1, xv)), ones)); \
  }
      TUILI_A8_ROWS(TUILI_STEP)
#undef TUILI_STEP
    }
#define TUILI_FOLD(r)                                                          \
  if constexpr (MR > r) {                                                      \
    const __m256 s = _mm256_set1_ps(xs[r * nb + b]);                           \
    f##r##0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i##r##0), _mm256_mul_ps(s, ws0), f##r##0); \
    f##r##1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i##r##1), _mm256_mul_ps(s, ws1), f##r##1); \
  }
    const __m256 ws0 = ws ? _mm256_loadu_ps(ws + b * kPanel) : _mm256_set1_ps(1.f);
    const __m256 ws1 = ws ? _mm256_loadu_ps(ws + b * kPanel + 8) : _mm256_set1_ps(1.f);
    TUILI_A8_ROWS(TUILI_FOLD)
#undef TUILI_FOLD
  }
#define TUILI_STORE(r)                                   \
  if constexpr (MR > r) {                                \
    _mm256_storeu_ps(acc + r * kPanel, f##r##0);         \
    _mm256_storeu_ps(acc + r * kPanel + 8, f##r##1);     \
  }
  TUILI_A8_ROWS(TUILI_STORE)
#undef TUILI_STORE
}
#undef TUILI_A8_ROWS

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// ---- int8 weights x int8 activations with AVX512-VNNI ------------------------------------
// vpdpbusd multiplies 64 unsigned x signed byte pairs and adds each group of four to one of
// 16 int32 sums: one 64-byte line of the packed weight (4 inputs x 16 columns) per
// instruction and activation row, twice the multiply-adds of vdpbf16ps. The weight is the
// unsigned operand, offset by 128 (w ^ 0x80 = w + 128 as a byte, one xor per line shared by
// every row of the tile); each block's int32 sum starts at -128 x the sum of the row's
// activation codes in that block (quantize_rows' comp), so it ends exactly at sum x w.
// (w + 128) x <= 255 x 127 per product: no saturation.
// A tile covers two panels: 6 rows x 2 panels x (int32 + float32 sums) = 24 registers; per 4
// inputs 12 vpdpbusd against 2 weight and 6 activation loads. At every row count: the
// one-panel tiles of up to 8 rows that took 1-63 rows ran 1.5-3x slower
// (kernel_ab --int8, Zen 5, same bits: 1.05x at 1 row, 1.46x at 2, 1.50x at 4, 1.68x at 6,
// 2.0x at 8, 2.7x at 16, 3.1x at 32, 3.0x at 63; 1.00x from 64, where the pair tile was
// already taken).
constexpr int kVnniPairRows = 6;
// The sums of MR rows over NP panels (`panel` + j * stride, block scales `ws` + j * ws_stride):
// acc + (j * kVnniPairRows + r) * kPanel. Every (row, panel) takes the same steps in the same order
// whatever MR and NP are, so a row's bits do not depend on the tile it lands in.
template <int MR, int NP>
inline void tile_vnni(const int8_t* xq, const float* xs, const int32_t* comp, int64_t K32, const int8_t* panel,
                      const float* ws, float* acc, int64_t stride, int64_t ws_stride) {
  static_assert(MR <= kVnniPairRows && NP <= 2, "tile_vnni: too many sums for the registers");
  const int64_t nb = K32 / kQBlock;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 f[NP][MR];
#pragma GCC unroll 2
  for (int j = 0; j < NP; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) f[j][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i s[NP][MR];
#pragma GCC unroll 2
    for (int j = 0; j < NP; ++j)
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) s[j][r] = _mm512_set1_epi32(comp[r * nb + b]);
    // Unrolled: as a loop, GCC 12 kept the 12 sums of tile_vnni<6, 2> in registers of their own
    // and copied each into a scratch register before its vpdpbusd and back after it (24 moves per
    // 12 products, and 17 stack spills), which held the tile to half of vpdpbusd's rate.
#pragma GCC unroll 8
    for (int64_t g = 0; g < kQBlock / 4; ++g) {
      __m512i w[NP];
#pragma GCC unroll 2
      for (int j = 0; j < NP; ++j) {
        const int8_t* wp = panel + j * stride + b * kQBlock * kPanel + g * 64;
        _mm_prefetch(reinterpret_cast<const char*>(wp + kA8Ahead), _MM_HINT_T0);
        w[j] = _mm512_xor_si512(_mm512_loadu_si512(wp), flip);
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        int32_t x4;
        std::memcpy(&x4, xq + r * K32 + b * kQBlock + g * 4, 4);
        const __m512i xv = _mm512_set1_epi32(x4);
#pragma GCC unroll 2
        for (int j = 0; j < NP; ++j) s[j][r] = _mm512_dpbusd_epi32(s[j][r], w[j], xv);
      }
    }
#pragma GCC unroll 2
    for (int j = 0; j < NP; ++j) {
      const __m512 wsv = ws ? _mm512_loadu_ps(ws + j * ws_stride + b * kPanel) : _mm512_set1_ps(1.f);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
        f[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[j][r]), _mm512_mul_ps(_mm512_set1_ps(xs[r * nb + b]), wsv),
                                  f[j][r]);
    }
  }
#pragma GCC unroll 2
  for (int j = 0; j < NP; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) _mm512_storeu_ps(acc + (j * kVnniPairRows + r) * kPanel, f[j][r]);
}
constexpr bool kVnni = true;
#else
constexpr bool kVnni = false;
#endif  // AVX512-VNNI

#ifdef __AMX_TILE__
// ---- AMX tiles: shared by the int8 and bf16 products below ---------------------------------
// (TileConfig: vec.h, shared with the decode attention's score tiles)
// Linux hands out the AMX register state only to processes that ask for it.
bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
}
#endif

// TUILI_AMX=0 turns the AMX products off (documented and read on the Python side in
// src/tuili/device.py, amx_allowed); read here at each product so that it acts on every
// caller of the extension.
inline bool amx_env_allows() {
  const char* env = std::getenv("TUILI_AMX");
  return !(env && std::string(env) == "0");
}

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__)
// ---- int8 weights x int8 activations on AMX tiles -----------------------------------------
// tdpbssd multiplies a 16-row x 32-byte tile of int8 activations by an 8-row x 64-byte
// tile of int8 weights (8 steps of 4 inputs x 16 columns) into 16 x 16 int32 sums: exactly
// one block of 32 inputs of a panel in gemm_a8's layout (8 consecutive 64-byte lines), so
// the same packed weight serves the VNNI tiles and these. Both operands are signed: no
// offset. The per-block scales (activation row x weight column) cannot enter the integer
// sum, so each block's sums are stored and folded into float32 with AVX512, in the same
// order and with the same operations as tile_vnni (fma(float(sum), xs * ws, acc)): the two
// paths give identical results. Eight tile registers: four sums (32 rows x 2 panels), two
// activation tiles, two weight tiles. Activations are zero-padded to 16 rows by the caller.
constexpr bool kAmxA8Built = true;

template <typename Out>
void gemm_amx_a8(const int8_t* xq, const float* xs, int64_t M, int64_t M16, int64_t K32, const int8_t* packed,
                 int64_t N, const float* scales, const float* wscales, const float* bias, Out* out) {
  constexpr int64_t kRows = 16;
  const int64_t panels = (N + kPanel - 1) / kPanel, pairs = (panels + 1) / 2, nb = K32 / kQBlock;
  at::parallel_for(0, pairs, 1, [&](int64_t q0, int64_t q1) {
    TileConfig cfg;
    for (int t = 0; t < 4; ++t) cfg.rows[t] = kRows, cfg.colsb[t] = 64;  // int32 sums
    for (int t = 4; t < 6; ++t) cfg.rows[t] = kRows, cfg.colsb[t] = kQBlock;  // activations: 32 inputs
    for (int t = 6; t < 8; ++t) cfg.rows[t] = kQBlock / 4, cfg.colsb[t] = 64;  // weights: 8 steps x 16 x 4
    _tile_loadconfig(&cfg);
    alignas(64) int32_t sums[2][4][kRows * kPanel];  // two blocks' sums: one being folded, one being written
    alignas(64) float acc[4][kRows * kPanel];
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t p = 2 * q;
      const bool two = p + 1 < panels;
      const int8_t* b0 = packed + p * K32 * kPanel;
      const int8_t* b1 = two ? b0 + K32 * kPanel : b0;
      const float* ws[2] = {wscales ? wscales + p * nb * kPanel : nullptr,
                            wscales && two ? wscales + (p + 1) * nb * kPanel : nullptr};
      for (int64_t m = 0; m < M16; m += 2 * kRows) {
        const bool rows2 = m + kRows < M16;
        const int64_t live[2] = {std::min(kRows, M - m), rows2 ? std::min(kRows, M - m - kRows) : 0};
        for (int t = 0; t < 4; ++t) std::memset(acc[t], 0, sizeof(acc[t]));
        // Block b's tile products are issued before block b - 1 is folded, so the tile unit and
        // the vector units work side by side, and the fold reads sums stored a block earlier.
        auto fold = [&](int64_t b) {
          for (int c = 0; c < (two ? 2 : 1); ++c) {
            const __m512 wsv = ws[c] ? _mm512_loadu_ps(ws[c] + b * kPanel) : _mm512_set1_ps(1.f);
            for (int h = 0; h < 2; ++h) {
              const int32_t* si = sums[b & 1][2 * h + c];
              float* a = acc[2 * h + c];
              const float* xsr = xs + (m + h * kRows) * nb + b;
              for (int64_t r = 0; r < live[h]; ++r) {
                const __m512 sc = _mm512_mul_ps(_mm512_set1_ps(xsr[r * nb]), wsv);
                _mm512_store_ps(a + r * kPanel, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(si + r * kPanel)),
                                                                 sc, _mm512_load_ps(a + r * kPanel)));
              }
            }
          }
        };
        for (int64_t b = 0; b < nb; ++b) {
          int32_t(*out_sums)[kRows * kPanel] = sums[b & 1];
          _tile_zero(0);
          _tile_zero(1);
          _tile_loadd(4, xq + m * K32 + b * kQBlock, K32);
          _tile_loadd(6, b0 + b * kQBlock * kPanel, 64);
          _tile_loadd(7, b1 + b * kQBlock * kPanel, 64);
          _tile_dpbssd(0, 4, 6);
          _tile_dpbssd(1, 4, 7);
          if (rows2) {
            _tile_zero(2);
            _tile_zero(3);
            _tile_loadd(5, xq + (m + kRows) * K32 + b * kQBlock, K32);
            _tile_dpbssd(2, 5, 6);
            _tile_dpbssd(3, 5, 7);
          }
          if (b > 0) fold(b - 1);
          _tile_stored(0, out_sums[0], 64);
          _tile_stored(1, out_sums[1], 64);
          if (rows2) {
            _tile_stored(2, out_sums[2], 64);
            _tile_stored(3, out_sums[3], 64);
          }
        }
        fold(nb - 1);
        for (int h = 0; h < 2; ++h) {
          if (live[h] <= 0) continue;
          for (int c = 0; c < (two ? 2 : 1); ++c) {
            const int64_t n0 = (p + c) * kPanel;
            store_rows(acc[2 * h + c], live[h], n0, std::min(kPanel, N - n0), N, scales, bias,
                       out + (m + h * kRows) * N);
          }
        }
      }
    }
    _tile_release();
  });
}
#else
constexpr bool kAmxA8Built = false;
#endif  // AMX int8

// scales: [N] per column (applied at the write-out), or null with wscales [panels][K32/32][16]
// per column and block of 32 inputs (applied per block, as the activations' scales are).
template <typename Out>
void gemm_a8(const float* x, int64_t M, int64_t K, const int8_t* packed, int64_t N, const float* scales,
             const float* wscales, const float* bias, Out* out) {
  const int64_t K32 = round_up(K, kQBlock), nb = K32 / kQBlock;
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__)
  if (M >= g_int8_amx_rows.load(std::memory_order_relaxed) && amx_env_allows() && amx_permitted()) {
    const int64_t M16 = round_up(M, 16);
    std::vector<int8_t> xq(M16 * K32, 0);  // rows past M stay zero
    std::vector<float> xs(M16 * nb, 0.f);
    quantize_rows(x, M, K, xq.data(), xs.data());
    gemm_amx_a8(xq.data(), xs.data(), M, M16, K32, packed, N, scales, wscales, bias, out);
    return;
  }
#endif
  std::vector<int8_t> xq(M * K32);
  std::vector<float> xs(M * nb);
  std::vector<int32_t> comp(kVnni ? M * nb : 0);
  quantize_rows(x, M, K, xq.data(), xs.data(), kVnni ? comp.data() : nullptr);
  auto ws_of = [&](int64_t p) { return wscales ? wscales + p * nb * kPanel : nullptr; };
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  // two panels a tile, as gemm_bf16x2 (same bits), at every row count (kVnniPairRows)
  const int64_t stride = K32 * kPanel;
  auto run = [&](int64_t p, auto np, int64_t m, int rows, float* acc, NextPair) {
    with_rows<kVnniPairRows>(rows, [&](auto mr) {
      tile_vnni<decltype(mr)::value, decltype(np)::value>(xq.data() + m * K32, xs.data() + m * nb, comp.data() + m * nb,
                                                          K32, packed + p * stride, ws_of(p), acc, stride, nb * kPanel);
    });
  };
  for_each_pair_tile<kVnniPairRows>(M, N, K32, true, false, scales, bias, out, run);
#else
  auto run = [&](int64_t p, int64_t m, int rows, std::vector<float>&, float* acc) {
    with_rows<kA8Rows>(rows, [&](auto mr) {
      tile_a8<decltype(mr)::value>(xq.data() + m * K32, xs.data() + m * nb, K32, packed + p * K32 * kPanel, ws_of(p),
                                   acc);
    });
  };
  for_each_tile<kA8Rows>(M, N, K32, scales, bias, out, run);
#endif
}


// ---- int4 weights x int8 activations ---------------------------------------------------
// The activations are quantized as for gemm_a8; the codes (0..15) are the unsigned operand
// of the byte product, so no sign trick is needed. w = q * scale + min per (group, column):
// sum_k w x = scale * sum_k q x + min * sum_k x, with sum_k q x exact in int32 per block of
// 32 inputs and sum_k x taken over the quantized activations, so the result is the product
// of the int4 weight and the int8 activations, up to float32 rounding.
//
// Codes layout: [ceil(N/16)][K/4][32] bytes: byte i of a 4-input step holds input 4 s + i % 4
// of column i / 4 in its low nibble and of column 8 + i / 4 in its high nibble; one 32-byte
// load thus covers 4 inputs x 16 columns.
#define TUILI_Q4A8_ROWS(X) X(0) X(1)
template <int MR>
inline void tile_q4a8(const int8_t* xq, const float* xs, const float* xsum, int64_t K, const uint8_t* panel,
                      const float* sc, const float* mn, int64_t gs, float* acc) {
  static_assert(MR <= kQ4A8Rows, "TUILI_Q4A8_ROWS names kQ4A8Rows rows");
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0f);
  const int64_t groups = K / gs, nb = K / kQBlock, per_group = gs / kQBlock;
#define TUILI_DECL(r) __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = _mm256_setzero_ps();
  TUILI_Q4A8_ROWS(TUILI_DECL)
#undef TUILI_DECL
  for (int64_t grp = 0; grp < groups; ++grp) {
#define TUILI_DECL(r) __m256 e##r##0 = _mm256_setzero_ps(), e##r##1 = _mm256_setzero_ps();
    TUILI_Q4A8_ROWS(TUILI_DECL)
#undef TUILI_DECL
    for (int64_t b = grp * per_group; b < (grp + 1) * per_group; ++b) {
#define TUILI_DECL(r) __m256i i##r##0 = _mm256_setzero_si256(), i##r##1 = _mm256_setzero_si256();
      TUILI_Q4A8_ROWS(TUILI_DECL)
#undef TUILI_DECL
      for (int64_t g = 0; g < kQBlock / 4; ++g) {
        const uint8_t* wp = panel + (b * (kQBlock / 4) + g) * 32;
        _mm_prefetch(reinterpret_cast<const char*>(wp + kQ4A8Ahead), _MM_HINT_T0);
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
        const __m256i lo = _mm256_and_si256(bytes, low);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
#define TUILI_STEP(r)                                                                        \
  if constexpr (MR > r) {                                                                    \
    int32_t x4;                                                                              \
    std::memcpy(&x4, xq + r * K + b * kQBlock + g * 4, 4);                                   \
    const __m256i xv = _mm256_set1_epi32(x4);                                                \
    i##r##0 = _mm256_add_epi32(i##r##0, _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xv), ones)); \
    i##r##1 = _mm256_add_epi32(i##r##1, _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xv), ones)); \
  }
        TUILI_Q4A8_ROWS(TUILI_STEP)
#undef TUILI_STEP
      }
#define TUILI_FOLD(r)                                                          \
  if constexpr (MR > r) {                                                      \
    const __m256 s = _mm256_set1_ps(xs[r * nb + b]);                           \
    e##r##0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i##r##0), s, e##r##0);        \
    e##r##1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i##r##1), s, e##r##1);        \
  }
      TUILI_Q4A8_ROWS(TUILI_FOLD)
#undef TUILI_FOLD
    }
    const __m256 s0 = _mm256_loadu_ps(sc + grp * kPanel), s1 = _mm256_loadu_ps(sc + grp * kPanel + 8);
    const __m256 m0 = _mm256_loadu_ps(mn + grp * kPanel), m1 = _mm256_loadu_ps(mn + grp * kPanel + 8);
#define TUILI_FOLD(r)                                                          \
  if constexpr (MR > r) {                                                      \
    const __m256 xsm = _mm256_set1_ps(xsum[r * groups + grp]);                 \
    c##r##0 = _mm256_fmadd_ps(s0, e##r##0, c##r##0);                           \
    c##r##1 = _mm256_fmadd_ps(s1, e##r##1, c##r##1);                           \
    c##r##0 = _mm256_fmadd_ps(m0, xsm, c##r##0);                               \
    c##r##1 = _mm256_fmadd_ps(m1, xsm, c##r##1);                               \
  }
    TUILI_Q4A8_ROWS(TUILI_FOLD)
#undef TUILI_FOLD
  }
#define TUILI_STORE(r)                                   \
  if constexpr (MR > r) {                                \
    _mm256_storeu_ps(acc + r * kPanel, c##r##0);         \
    _mm256_storeu_ps(acc + r * kPanel + 8, c##r##1);     \
  }
  TUILI_Q4A8_ROWS(TUILI_STORE)
#undef TUILI_STORE
}
#undef TUILI_Q4A8_ROWS

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// The same product with vpdpbusd, 16 columns in one register: the 32 bytes of a 4-input step
// are loaded into both halves of a register and the high half's words shifted right by 4, so
// that after the mask the low half holds columns 0-7 (low nibbles) and the high half columns
// 8-15 (high nibbles), each column's 4 codes in one int32 lane: the unsigned operand as it is.
// The int32 sums are exact either way and the float32 folds are tile_q4a8's, lane for lane, so
// the results are tile_q4a8's bit for bit. Up to 8 rows a tile: 3 x 8 sums in registers. Below 4
// rows each row keeps two integer chains (even and odd steps, added at the end of a block:
// exact) so that a lone row does not wait on vpdpbusd's latency.
constexpr int kQ4VnniRows = 8;
template <int MR>
inline void tile_q4vnni(const int8_t* xq, const float* xs, const float* xsum, int64_t K, const uint8_t* panel,
                        const float* sc, const float* mn, int64_t gs, float* acc) {
  constexpr int kChains = MR < 4 ? 2 : 1;
  const __m512i low = _mm512_set1_epi8(0x0f);
  const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const int64_t groups = K / gs, nb = K / kQBlock, per_group = gs / kQBlock;
  __m512 c[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) c[r] = _mm512_setzero_ps();
  for (int64_t grp = 0; grp < groups; ++grp) {
    __m512 e[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) e[r] = _mm512_setzero_ps();
    for (int64_t b = grp * per_group; b < (grp + 1) * per_group; ++b) {
      __m512i s[kChains][MR];
#pragma GCC unroll 2
      for (int h = 0; h < kChains; ++h)
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) s[h][r] = _mm512_setzero_si512();
      // unrolled, as tile_vnni's steps (GCC 12 copies loop-carried vpdpbusd sums otherwise)
#pragma GCC unroll 8
      for (int g = 0; g < kQBlock / 4; ++g) {
        const uint8_t* wp = panel + (b * (kQBlock / 4) + g) * 32;
        _mm_prefetch(reinterpret_cast<const char*>(wp + kQ4A8Ahead), _MM_HINT_T0);
        const __m512i both = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp)));
        const __m512i q = _mm512_and_si512(_mm512_srlv_epi16(both, shift), low);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          int32_t x4;
          std::memcpy(&x4, xq + r * K + b * kQBlock + g * 4, 4);
          s[g % kChains][r] = _mm512_dpbusd_epi32(s[g % kChains][r], q, _mm512_set1_epi32(x4));
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512i sum = kChains == 2 ? _mm512_add_epi32(s[0][r], s[kChains - 1][r]) : s[0][r];
        e[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(xs[r * nb + b]), e[r]);
      }
    }
    const __m512 sv = _mm512_loadu_ps(sc + grp * kPanel), mv = _mm512_loadu_ps(mn + grp * kPanel);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      c[r] = _mm512_fmadd_ps(sv, e[r], c[r]);
      c[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum[r * groups + grp]), c[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(acc + r * kPanel, c[r]);
}
#endif  // AVX512-VNNI

template <typename Out>
void gemm_q4a8(const float* x, int64_t M, int64_t K, const uint8_t* codes, const float* scales, const float* mins,
               int64_t gs, int64_t N, const float* bias, Out* out) {
  const int64_t groups = K / gs, nb = K / kQBlock, per_group = gs / kQBlock;
  std::vector<int8_t> xq(M * K);
  std::vector<float> xs(M * nb), xsum(M * groups);
  quantize_rows(x, M, K, xq.data(), xs.data());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      int32_t s = 0;
      for (int64_t k = b * kQBlock; k < (b + 1) * kQBlock; ++k) s += xq[m * K + k];
      xsum[m * groups + b / per_group] += static_cast<float>(s) * xs[m * nb + b];
    }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  constexpr int kRows = kQ4VnniRows;
#else
  constexpr int kRows = kQ4A8Rows;
#endif
  auto run = [&](int64_t p, int64_t m, int rows, std::vector<float>&, float* acc) {
    with_rows<kRows>(rows, [&](auto mr) {
      const uint8_t* panel = codes + p * K * (kPanel / 2);
      const float *sc = scales + p * groups * kPanel, *mn = mins + p * groups * kPanel;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
      tile_q4vnni<decltype(mr)::value>(xq.data() + m * K, xs.data() + m * nb, xsum.data() + m * groups, K, panel, sc,
                                       mn, gs, acc);
#else
      tile_q4a8<decltype(mr)::value>(xq.data() + m * K, xs.data() + m * nb, xsum.data() + m * groups, K, panel, sc,
                                     mn, gs, acc);
#endif
    });
  };
  for_each_tile<kRows, Out, decltype(run), NoPanelStep, true>(M, N, K, nullptr, bias, out, run);
}


#ifdef __AVX512BF16__
// ---- bf16 weights on CPUs with AVX512-BF16 -----------------------------------------------
// One vdpbf16ps multiplies 16 columns x 2 inputs of bf16 and adds both products to 16
// float32 sums, so the weight is packed in pairs of inputs: [ceil(N/16)][K2/2][16][2]
// (K2 = K rounded up to 32, zeros past K), one 64-byte line per pair. The activations are bf16 (the
// model's own; float32 rows are rounded to bf16). Chosen over widening to float32 on such
// CPUs (docs/BENCHMARKS.md, "bf16 on CPUs with native bf16").
constexpr bool kPairedBf16 = true;
// Rows of a tile: 6 rows x 2 panels x 2 sums = 24 registers, + 4 weight lines and a broadcast.
// Per 4 inputs a two-panel tile issues 24 vdpbf16ps against 4 weight and 12 activation loads,
// where one panel of 4 rows issued 8 against 2 + 8: on a core with two vdpbf16ps and two
// 512-bit loads a cycle (AMD Zen 5) the old tile waited on its loads.
constexpr int kBf16Rows = 6;
// Input pairs (64-byte lines) requested ahead, into L1 (_MM_HINT_T0): on the AVX512 Xeon
// the non-temporal hint of the AVX2 tile ran at 19.3 ms for batch 1, none at 14.3, T0 at 12.3.
constexpr int64_t kBf16Ahead = 16;
constexpr auto kNextPairHint = _MM_HINT_T1;

// The sums of MR rows over NP consecutive panels (`panel`, `panel + stride`): acc[j][r][16] at
// acc + (j * kBf16Rows + r) * kPanel. Every (row, panel) takes the same two sums in the same
// order whatever MR and NP are (pairs at k = 0 mod 4 into one, k = 2 mod 4 into the other,
// added at the end), so a row's bits do not depend on the tile it lands in.
template <int MR, int NP>
inline void tile_bf16x2(const uint16_t* x, int64_t ldx, const uint16_t* panel, int64_t stride, int64_t K2,
                        float* acc, const char* next = nullptr, int64_t next_lines = 0) {
  // next: lines of the pair of panels taken after this one, requested into L2 a few per step
  const int64_t per_step = next_lines > 0 ? (next_lines + K2 / 4 - 1) / std::max<int64_t>(1, K2 / 4) : 0;
  int64_t requested = 0;
  __m512 c[NP][MR], d[NP][MR];
#pragma GCC unroll 2
  for (int j = 0; j < NP; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) c[j][r] = d[j][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 3 < K2; k += 4) {
    __m512bh w0[NP], w1[NP];
#pragma GCC unroll 2
    for (int j = 0; j < NP; ++j) {
      const uint16_t* pj = panel + j * stride;
      _mm_prefetch(reinterpret_cast<const char*>(pj + (k + 2 * kBf16Ahead) * kPanel), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(pj + (k + 2 * kBf16Ahead + 2) * kPanel), _MM_HINT_T0);
      w0[j] = (__m512bh)_mm512_loadu_si512(pj + k * kPanel);
      w1[j] = (__m512bh)_mm512_loadu_si512(pj + (k + 2) * kPanel);
    }
    for (int64_t i = 0; i < per_step && requested < next_lines; ++i, ++requested)
      _mm_prefetch(next + requested * 64, kNextPairHint);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t a, b;
      std::memcpy(&a, x + r * ldx + k, 4);
      std::memcpy(&b, x + r * ldx + k + 2, 4);
      const __m512bh va = (__m512bh)_mm512_set1_epi32(a), vb = (__m512bh)_mm512_set1_epi32(b);
#pragma GCC unroll 2
      for (int j = 0; j < NP; ++j) {
        c[j][r] = _mm512_dpbf16_ps(c[j][r], va, w0[j]);
        d[j][r] = _mm512_dpbf16_ps(d[j][r], vb, w1[j]);
      }
    }
  }
  for (; k < K2; k += 2) {
#pragma GCC unroll 2
    for (int j = 0; j < NP; ++j) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + j * stride + k * kPanel);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        int32_t a;
        std::memcpy(&a, x + r * ldx + k, 4);
        c[j][r] = _mm512_dpbf16_ps(c[j][r], (__m512bh)_mm512_set1_epi32(a), w0);
      }
    }
  }
#pragma GCC unroll 2
  for (int j = 0; j < NP; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) _mm512_storeu_ps(acc + (j * kBf16Rows + r) * kPanel, _mm512_add_ps(c[j][r], d[j][r]));
}

// x bf16 [M][K2] (zero-padded), packed as above, through for_each_pair_tile. Below
// kBf16PairRows rows each panel of a pair takes its own tiles (one weight stream at a time:
// measured 10% faster at 1-4 rows, where the product only streams the weight); the two ways
// give the same bits.
constexpr int64_t kBf16PairRows = 8;

template <typename Out>
void gemm_bf16x2(const uint16_t* x, int64_t M, int64_t K2, const uint16_t* packed, int64_t N, const float* bias,
                 Out* out) {
  const int64_t stride = K2 * kPanel;
  const int64_t panels = (N + kPanel - 1) / kPanel;
  auto run = [&](int64_t p, auto np, int64_t m, int rows, float* acc, NextPair next) {
    const char* ahead = nullptr;
    int64_t lines = 0;
    if (next.p >= 0) {  // this tile's share of the next pair's lines
      const int64_t total = std::min<int64_t>(2, panels - next.p) * stride * 2 / 64;
      const int64_t from = total * next.part / next.parts, to = total * (next.part + 1) / next.parts;
      ahead = reinterpret_cast<const char*>(packed + next.p * stride) + from * 64;
      lines = to - from;
    }
    with_rows<kBf16Rows>(rows, [&](auto mr) {
      tile_bf16x2<decltype(mr)::value, decltype(np)::value>(x + m * K2, K2, packed + p * stride, stride, K2, acc,
                                                            ahead, lines);
    });
  };
  for_each_pair_tile<kBf16Rows>(M, N, K2 * 2, M >= kBf16PairRows, M >= kBf16PairRows, nullptr, bias, out, run);
}

// The same pair-packed weight, widened to float32 in registers and multiplied with float32
// FMAs (zmm), for CPUs where vdpbf16ps issues at a fraction of the FMA rate: on the
// AVX512-BF16 Xeon without AMX one vdpbf16ps (32 multiply-adds) retires every other cycle
// while two 16-wide FMAs retire every cycle, so widening does 2x the multiply-adds per cycle
// once a product is bound by arithmetic (a few rows up); on CPUs where vdpbf16ps runs at
// the FMA rate it loses. Which one a product takes is measured per machine
// (src/tuili/model/paths.py) and set with set_bf16_widen_rows. A 64-byte pair line gives
// both inputs of the pair for 16 columns: the low halves shifted up are input k, the high
// halves masked are input k + 1, exactly as float32. Activations are float32 [M][K2].
constexpr int kWideRows = 12;  // 2 x 12 sums + 2 weight vectors + broadcasts: 28 of 32 registers

template <int MR>
inline void tile_bf16w(const float* x, int64_t ldx, const uint16_t* panel, int64_t K2, float* acc) {
  __m512 c[MR], d[MR];  // even and odd inputs: two chains per row, so short tiles do not wait on FMA latency
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) c[r] = d[r] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k = 0; k < K2; k += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(panel + (k + 2 * kBf16Ahead) * kPanel), _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(panel + k * kPanel);
    const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    const __m512 w1 = _mm512_castsi512_ps(_mm512_and_si512(v, high));
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      c[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), w0, c[r]);
      d[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k + 1]), w1, d[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(acc + r * kPanel, _mm512_add_ps(c[r], d[r]));
}

// x float32 [M][K2] (zero-padded), packed as above.
template <typename Out>
void gemm_bf16w(const float* x, int64_t M, int64_t K2, const uint16_t* packed, int64_t N, const float* bias,
                Out* out) {
  auto run = [&](int64_t p, int64_t m, int rows, std::vector<float>&, float* acc) {
    with_rows<kWideRows>(rows, [&](auto mr) {
      tile_bf16w<decltype(mr)::value>(x + m * K2, K2, packed + p * K2 * kPanel, K2, acc);
    });
  };
  for_each_tile<kWideRows, Out, decltype(run), NoPanelStep, true>(M, N, K2 * 4, nullptr, bias, out, run);
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// ---- bf16 weights on CPUs with AMX ---------------------------------------------------------
// An AMX tile multiply (tdpbf16ps) takes a 16-row x 32-input tile of activations and a
// 32-input x 16-column tile of weights in input pairs: exactly 16 consecutive 64-byte lines
// of the pair-packed panel above, so the same packed weight serves both kernels. Eight
// tile registers: four 16 x 16 float32 sums (32 rows x 2 panels), two activation tiles,
// two weight tiles. Each weight tile is read once per 32 activation rows, so from a few
// rows up to a few dozen the product streams the weight at memory speed, where the
// vdpbf16ps tiles above are bound by their arithmetic. Activations are zero-padded to a
// multiple of 16 rows by the caller, and K2 is a multiple of 32 (pack_weight pads it).
constexpr int64_t kAmxRows = 16;  // rows of a tile
constexpr int64_t kAmxK = 32;  // bf16 inputs of a tile row (64 bytes)

// x bf16 [M16][K2] (M16 a multiple of 16, rows past M zero), packed as for gemm_bf16x2.
template <typename Out>
void gemm_amx(const uint16_t* x, int64_t M, int64_t M16, int64_t K2, const uint16_t* packed, int64_t N,
              const float* bias, Out* out) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t pairs = (panels + 1) / 2;
  const int64_t x_stride = K2 * 2;  // bytes between activation rows
  at::parallel_for(0, pairs, 1, [&](int64_t q0, int64_t q1) {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) {
      cfg.rows[t] = kAmxRows;
      cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
    alignas(64) float sums[4][kAmxRows * kPanel];
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t p = 2 * q;
      const bool two = p + 1 < panels;
      const uint16_t* b0 = packed + p * K2 * kPanel;
      const uint16_t* b1 = two ? b0 + K2 * kPanel : b0;
      for (int64_t m = 0; m < M16; m += 2 * kAmxRows) {
        const bool rows2 = m + kAmxRows < M16;
        const uint16_t* a0 = x + m * K2;
        const uint16_t* a1 = rows2 ? a0 + kAmxRows * K2 : a0;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t k = 0; k < K2; k += kAmxK) {
          _tile_loadd(4, a0 + k, x_stride);
          _tile_loadd(6, b0 + k * kPanel, 64);
          _tile_loadd(7, b1 + k * kPanel, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (rows2) {
            _tile_loadd(5, a1 + k, x_stride);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, sums[0], 64);
        _tile_stored(1, sums[1], 64);
        if (rows2) {
          _tile_stored(2, sums[2], 64);
          _tile_stored(3, sums[3], 64);
        }
        for (int h = 0; h < (rows2 ? 2 : 1); ++h) {
          const int64_t r0 = m + h * kAmxRows;
          const int64_t rows = std::min(kAmxRows, M - r0);
          if (rows <= 0) continue;
          for (int c = 0; c < (two ? 2 : 1); ++c) {
            const int64_t n0 = (p + c) * kPanel;
            store_rows(sums[2 * h + c], rows, n0, std::min(kPanel, N - n0), N, nullptr, bias, out + r0 * N);
          }
        }
      }
    }
    _tile_release();
  });
}
constexpr bool kAmxBuilt = true;
#else
constexpr bool kAmxBuilt = false;
#endif  // AMX
#else
constexpr bool kPairedBf16 = false;
constexpr bool kAmxBuilt = false;
#endif  // __AVX512BF16__

}  // namespace

#endif  // __AVX2__

// bf16 products of at least this many rows widen the weight to float32 (gemm_bf16w) instead
// of vdpbf16ps (gemm_bf16x2); never by default, set from the measurement in paths.py.
static std::atomic<int64_t> g_bf16_widen_rows{INT64_MAX};

void set_bf16_widen_rows(int64_t rows) { g_bf16_widen_rows.store(rows < 1 ? 1 : rows); }

int64_t bf16_widen_rows() { return g_bf16_widen_rows.load(); }

void set_int8_amx_rows(int64_t rows) { g_int8_amx_rows.store(rows < 1 ? 1 : rows); }

int64_t int8_amx_rows() { return g_int8_amx_rows.load(); }

// Whether int8 products can run on AMX tiles (built for them, allowed, and permitted).
bool gemm_amx_int8_available() {
#if defined(__AVX2__) && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__)
  return amx_env_allows() && amx_permitted();
#else
  return false;
#endif
}

bool gemm_available() {
#ifdef __AVX2__
  return true;
#else
  return false;
#endif
}

// Whether bf16 products from pair-packed weights can run on AMX tiles (built for them, and
// the kernel lets this process use them).
// TUILI_AMX=0 turns them off (the vdpbf16ps tiles then take every row count). The switch is
// documented and read on the Python side in src/tuili/device.py (amx_allowed); it is read
// here again, at each product, so that it acts on every caller of the extension.
bool gemm_amx_available() {
#if defined(__AVX2__) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
  return amx_env_allows() && amx_permitted();
#else
  return false;
#endif
}

// Whether bf16 weights are packed in pairs for AVX512-BF16 (the activations then are bf16).
bool gemm_bf16_pairs() {
#if defined(__AVX2__) && defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// w [N, K] bfloat16 or float32 -> packed [ceil(N/16), K, 16] of the same dtype;
// int8 -> [ceil(N/16), K32 / 4, 16, 4] (gemm_a8's layout, K32 = K rounded up to 32).
torch::Tensor pack_weight(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2, "pack_weight: weight must be 2-D");
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t panels = (N + kPanel - 1) / kPanel;
#if defined(__AVX2__) && defined(__AVX512BF16__)
  if (w.scalar_type() == torch::kBFloat16) {  // pairs of inputs: [panels, K2/2, 16, 2] (gemm_bf16x2, gemm_amx)
    const int64_t K2 = (K + 31) / 32 * 32;  // whole 32-input AMX tiles
    auto padded = torch::zeros({panels * kPanel, K2}, w.options());
    padded.narrow(0, 0, N).narrow(1, 0, K).copy_(w);
    return padded.view({panels, kPanel, K2 / 2, 2}).permute({0, 2, 1, 3}).contiguous().view({panels, K2, kPanel});
  }
#endif
  if (w.scalar_type() == torch::kChar) {
    const int64_t K32 = (K + 31) / 32 * 32;
    auto padded = torch::zeros({panels * kPanel, K32}, w.options());
    padded.narrow(0, 0, N).narrow(1, 0, K).copy_(w);
    return padded.view({panels, kPanel, K32 / 4, 4}).permute({0, 2, 1, 3}).contiguous();
  }
  auto padded = torch::zeros({panels * kPanel, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({panels, kPanel, K}).transpose(1, 2).contiguous();
}

// x [M, K] float32 or bfloat16; returns [M, N] float32 when out_float, else x's dtype.
// scales [N] float32 (int8 weights) and bias [N] are optional (empty tensors).
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor packed, int64_t N, torch::Tensor scales,
                            torch::Tensor bias, bool out_float) {
  const bool a8 = packed.scalar_type() == torch::kChar;
  TORCH_CHECK(x.dim() == 2 && packed.dim() == (a8 ? 4 : 3) && packed.size(2) == kPanel, "packed_linear: bad shapes");
#ifndef __AVX2__
  TORCH_CHECK(false, "packed_linear: built without AVX2");
#else
  const int64_t M = x.size(0), K = x.size(1);
  const bool paired = kPairedBf16 && packed.scalar_type() == torch::kBFloat16;
  const int64_t k_packed = a8 ? packed.size(1) * 4 : packed.size(1);
  const int64_t k_want = a8 || paired ? (K + 31) / 32 * 32 : K;
  TORCH_CHECK(k_packed == k_want && packed.size(0) * kPanel >= N, "packed_linear: weight does not match input");
  // int8: [N] scales per column, or [panels, K32/32, 16] float32 per column and block of 32 inputs
  const bool grouped = a8 && scales.dim() == 3;
  TORCH_CHECK(!a8 || (!grouped && scales.numel() == N) ||
                  (grouped && scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() &&
                   scales.size(0) == packed.size(0) && scales.size(1) * 32 == k_packed && scales.size(2) == kPanel),
              "packed_linear: int8 weights need [N] or [panels, K32/32, 16] float32 scales");
#ifdef __AVX512BF16__
  if (paired) {
    TORCH_CHECK(scales.numel() == 0, "packed_linear: bf16 weights take no scales");
    auto out_dtype = out_float ? torch::kFloat32 : x.scalar_type();
    TORCH_CHECK(out_dtype == torch::kFloat32 || out_dtype == torch::kBFloat16,
                "packed_linear: activations must be float32 or bfloat16");
    auto out = torch::empty({M, N}, x.options().dtype(out_dtype));
    auto bf = bias.numel() ? bias.to(torch::kFloat32).contiguous() : bias;
    const float* b = bf.numel() ? bf.data_ptr<float>() : nullptr;
    const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
    // AMX from a single row up: measured faster than the vdpbf16ps tiles at every row count
    // (docs/BENCHMARKS.md, "The full peers run with AMX products", step 2).
    const bool amx = kAmxBuilt && gemm_amx_available();
    if (!amx && M >= g_bf16_widen_rows.load(std::memory_order_relaxed)) {
      auto xw = x.to(torch::kBFloat16).to(torch::kFloat32);  // the same bf16 activations as vdpbf16ps takes
      if (k_want != K) xw = torch::constant_pad_nd(xw, {0, k_want - K});
      xw = xw.contiguous();
      if (out_dtype == torch::kFloat32) gemm_bf16w<float>(xw.data_ptr<float>(), M, k_want, wp, N, b, out.data_ptr<float>());
      else gemm_bf16w<at::BFloat16>(xw.data_ptr<float>(), M, k_want, wp, N, b, out.data_ptr<at::BFloat16>());
      return out;
    }
    const int64_t m_pad = amx ? (M + 15) / 16 * 16 - M : 0;
    auto xb = x.to(torch::kBFloat16);
    if (k_want != K || m_pad) xb = torch::constant_pad_nd(xb, {0, k_want - K, 0, m_pad});
    xb = xb.contiguous();
    const auto* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (amx) {
      if (out_dtype == torch::kFloat32) gemm_amx<float>(xp, M, M + m_pad, k_want, wp, N, b, out.data_ptr<float>());
      else gemm_amx<at::BFloat16>(xp, M, M + m_pad, k_want, wp, N, b, out.data_ptr<at::BFloat16>());
      return out;
    }
#endif
    if (out_dtype == torch::kFloat32) gemm_bf16x2<float>(xp, M, k_want, wp, N, b, out.data_ptr<float>());
    else gemm_bf16x2<at::BFloat16>(xp, M, k_want, wp, N, b, out.data_ptr<at::BFloat16>());
    return out;
  }
#endif
  auto xf = x.to(torch::kFloat32).contiguous();
  auto out_dtype = out_float ? torch::kFloat32 : x.scalar_type();
  auto out = torch::empty({M, N}, x.options().dtype(out_dtype));
  auto sf = scales.numel() ? scales.to(torch::kFloat32).contiguous() : scales;
  auto bf = bias.numel() ? bias.to(torch::kFloat32).contiguous() : bias;
  const float* s = sf.numel() && !grouped ? sf.data_ptr<float>() : nullptr;
  const float* ws = grouped ? sf.data_ptr<float>() : nullptr;
  const float* b = bf.numel() ? bf.data_ptr<float>() : nullptr;
  const float* xp = xf.data_ptr<float>();
  auto dispatch_out = [&](auto* wp) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(wp)>>;
    if (out_dtype == torch::kFloat32) {
      if constexpr (std::is_same_v<W, int8_t>) gemm_a8<float>(xp, M, K, wp, N, s, ws, b, out.data_ptr<float>());
      else gemm<W, float>(xp, M, K, wp, N, s, b, out.data_ptr<float>());
    } else if (out_dtype == torch::kBFloat16) {
      if constexpr (std::is_same_v<W, int8_t>) gemm_a8<at::BFloat16>(xp, M, K, wp, N, s, ws, b, out.data_ptr<at::BFloat16>());
      else gemm<W, at::BFloat16>(xp, M, K, wp, N, s, b, out.data_ptr<at::BFloat16>());
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

// int4: codes [ceil(N/16), K/4, 32] uint8 (see tile_q4a8), scales and mins [ceil(N/16), K/group, 16]
// float32; x [M, K] float32 or bfloat16 -> [M, N] in x's dtype (float32 when out_float).
torch::Tensor packed_linear_q4(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor mins,
                               int64_t N, int64_t group, torch::Tensor bias, bool out_float) {
#ifndef __AVX2__
  TORCH_CHECK(false, "packed_linear_q4: built without AVX2");
#else
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 3 && codes.size(2) == 2 * kPanel && codes.scalar_type() == torch::kByte,
              "packed_linear_q4: bad shapes");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(codes.size(1) * 4 == K && codes.size(0) * kPanel >= N && group % kQBlock == 0 && K % group == 0,
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
    gemm_q4a8<float>(xf.data_ptr<float>(), M, K, cc.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                   mins.data_ptr<float>(), group, N, b, out.data_ptr<float>());
  } else {
    TORCH_CHECK(out_dtype == torch::kBFloat16, "packed_linear_q4: activations must be float32 or bfloat16");
    gemm_q4a8<at::BFloat16>(xf.data_ptr<float>(), M, K, cc.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                          mins.data_ptr<float>(), group, N, b, out.data_ptr<at::BFloat16>());
  }
  return out;
#endif
}
