// Decode attention that reads each sequence's KV blocks in place.
//
// One query token per sequence. The cache layout is the engine's:
// [num_blocks, block_size, num_kv_heads, head_dim], float32, bfloat16 or int8; an int8
// cache comes with float32 scales [num_blocks, block_size, num_kv_heads] (one per token
// and kv head) that each row is multiplied by as it is read.
// Work is split over (sequence, kv head) pairs; the G query heads that share a kv head
// are processed together so every K/V row is read once. Scores go to a per-task buffer
// (two-pass softmax in float32), then V rows are accumulated with those weights.
// window > 0 (sliding-window layers): only the last `window` positions are read.
// bf16 queries on a bf16 cache (a bf16 model) take AVX512-BF16 loops, and on AMX CPUs
// (unless TUILI_AMX=0) the scores come from AMX tiles: 16 K rows as they lie in the block
// times the G queries, one tdpbf16ps per 32 dims, no sums across vector lanes (benchmarks/
// decode_attention.py --ab-amx: 1.18x with the caches in L3, 1.09x from memory at batch 32).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "attention_bf16.h"  // kBf16Attention, TUILI_AMX_SCORES and the bf16 / AMX helpers
#include "decode_reference.h"  // to_float, for_each_position and the portable decode_kernel
#include "kernels.h"
#include "vec.h"

namespace {

#ifdef __AVX2__

// Positions per chunk of a context (see decode_kernel_avx2). Against the chunking by batch
// before it (benchmarks/kernel_ab.py, AVX2 EPYC): 0.98-0.99x at batch 8 and 32; 64 cost 12-23%.
constexpr int64_t kChunkPositions = 128;

// decode_kernel's computation (decode_reference.h) with 8-wide float32 vectors, for head
// dims that are a multiple of 8.
// G > 0: the group size (query heads per kv head) as a constant, for head dims that are a
// multiple of 16; each K row then feeds 2 G independent accumulators held in registers.
// A task is one sequence and a range of its kv heads: all of them when there are enough
// sequences to keep the threads busy, so each token's row is read whole and each block is
// one contiguous stretch of memory; fewer when the batch is small. Each context is cut into
// chunks of kChunkPositions (whole blocks from the first block it touches); a context of
// more than one keeps each chunk's softmax unnormalised (max, sum, weighted V) and merges
// them. The chunks follow the context's own length only, never the batch, so a row's result
// is the same whichever rows share the call (a verification's k+1 rows, any batch) and
// greedy text is the same with and without speculative decoding. Only the scheduling
// follows the batch: a small one gets a task per chunk (batch 1: 3 kv heads on 2 threads
// would leave one idle a third of the time), a large one a task per context.
// q16: the queries in bf16 when the caller has them so (else null); with a bf16 cache, a
// known G, 64-dim slices and whole 16-row blocks, the AVX512-BF16 loops above run instead.
template <typename T, int G>
void decode_kernel_avx2(const float* q, const T* k_cache, const T* v_cache, const float* k_scales,
                        const float* v_scales, const int64_t* tables, const int64_t* lens, float* out, int64_t batch,
                        int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size, int64_t table_width,
                        float scale, int64_t window, const uint16_t* q16) {
  using tuili::load8;
  constexpr bool kFastType = kBf16Attention && G > 0 && std::is_same_v<T, at::BFloat16>;
  const bool fast = kFastType && q16 != nullptr && dim % 64 == 0 && block_size % 16 == 0;
  constexpr int64_t kAhead = 4;  // blocks requested ahead of the one being read
  constexpr int64_t kAheadUnits = 3;  // units requested ahead (`streamed`): the next group, head for head
  const int64_t group = G > 0 ? G : heads / kv_heads;
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::min(kv_heads, std::max<int64_t>(1, (2 * threads + batch - 1) / batch));
  const int64_t per_split = (kv_heads + splits - 1) / splits;
  const int64_t row_stride = kv_heads * dim;  // between consecutive tokens of a block
  const int64_t splits_used = (kv_heads + per_split - 1) / per_split;
  const int64_t chunk_blocks = std::max<int64_t>(1, kChunkPositions / block_size);
  auto seq_first_of = [&](int64_t b) { return window > 0 && lens[b] > window ? lens[b] - window : int64_t{0}; };
  // Tasks are handed out one at a time, longest sequences first: contexts differ in length,
  // and a fixed split of the batch left one thread waiting for the other. Sequence order[i]
  // owns tasks task0[i] .. task0[i + 1] - 1 (its pieces x kv-head splits) and, when it has
  // more than one chunk, the partial rows from part0[order[i]] on: per (chunk, query head)
  // the running max, the sum of exp and the unnormalised output, merged after the loop.
  std::vector<int64_t> order(batch);
  for (int64_t b = 0; b < batch; ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lens[a] > lens[b]; });
  // A task takes a run of consecutive chunks (per_piece_of): one chunk each when the batch is
  // too small to keep the threads busy otherwise, all of a context's chunks when it is not.
  // This only schedules: each chunk is computed and merged alike either way.
  const int64_t seq_tasks = batch * splits_used;
  const int64_t pieces_wanted = seq_tasks >= 2 * threads ? 1 : (2 * threads + seq_tasks - 1) / seq_tasks;
  std::vector<int64_t> chunks_of(batch), per_piece_of(batch), part0(batch), task0(batch + 1, 0);
  int64_t parts = 0;
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t b = order[i], seq_first = seq_first_of(b);
    const int64_t span = lens[b] > seq_first ? (lens[b] - 1) / block_size - seq_first / block_size + 1 : 1;
    chunks_of[b] = (span + chunk_blocks - 1) / chunk_blocks;
    per_piece_of[b] = (chunks_of[b] + pieces_wanted - 1) / pieces_wanted;
    part0[b] = parts;
    if (chunks_of[b] > 1) parts += chunks_of[b] * heads;
    task0[i + 1] = task0[i] + (chunks_of[b] + per_piece_of[b] - 1) / per_piece_of[b] * splits_used;
  }
  // Every partial row is written before it is read (empty chunks too): left uninitialised.
  std::unique_ptr<float[]> part_o(new float[parts * dim]), part_m(new float[parts]), part_l(new float[parts]);
  // The output of query head h of sequence b from its chunks' partial rows, each rescaled by
  // exp(its max - the overall max).
  auto merge = [&](int64_t b, int64_t h) {
    const int64_t chunks = chunks_of[b];
    float m = -INFINITY;
    for (int64_t c = 0; c < chunks; ++c) m = std::max(m, part_m[part0[b] + c * heads + h]);
    float total = 0.f;
    float* o = out + (b * heads + h) * dim;
    std::memset(o, 0, dim * sizeof(float));
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r = part0[b] + c * heads + h;
      if (part_l[r] == 0.f) continue;
      const float f = std::exp(part_m[r] - m);
      total += f * part_l[r];
      for (int64_t d = 0; d < dim; ++d) o[d] += f * part_o[r * dim + d];
    }
    const float inv = 1.f / total;
    for (int64_t d = 0; d < dim; ++d) o[d] *= inv;
  };
  const int64_t tasks = task0[batch];
  // Scores on AMX tiles where the CPU has them (and TUILI_AMX allows): a tile of 16 K rows,
  // as they lie in the block, times the G queries laid out in pairs of dims, gives the 16
  // positions' G scores in one tdpbf16ps per 32 dims, with no sums across lanes. The scores
  // then lie position-major (scores[pos * G + g]) instead of head-major.
#ifdef TUILI_AMX_SCORES
  const bool amx = fast && G <= 16 && dim % 32 == 0 && gemm_amx_available();
#else
  constexpr bool amx = false;
#endif
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, tasks), 1, [&](int64_t, int64_t) {
    std::vector<float> scores, norm;
    std::vector<const char*> units;  // see `streamed` below
    std::vector<int64_t> chunk_unit0, rows0;
#ifdef TUILI_AMX_SCORES
    std::vector<uint16_t> qt;  // the task's queries as B tiles: [kv head][32-dim chunk][16 pairs][G x 2]
    alignas(64) float tile_out[16 * 16];
    if (amx) {
      tuili::TileConfig cfg;
      cfg.rows[0] = 16, cfg.colsb[0] = G * 4;  // scores: 16 positions x G heads, float32
      cfg.rows[1] = 16, cfg.colsb[1] = 64;     // K: 16 rows x 32 dims, bf16
      cfg.rows[2] = 16, cfg.colsb[2] = G * 4;  // queries: 16 pairs of dims x G heads
      _tile_loadconfig(&cfg);
    }
#endif
    for (int64_t task; (task = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      const int64_t i = std::upper_bound(task0.begin(), task0.end(), task) - task0.begin() - 1;
      const int64_t b = order[i], chunks = chunks_of[b], per_piece = per_piece_of[b];
      const int64_t pieces = (chunks + per_piece - 1) / per_piece;
      const int64_t h0 = (task - task0[i]) / pieces * per_split;
      const int64_t c_begin = (task - task0[i]) % pieces * per_piece, c_end = std::min(chunks, c_begin + per_piece);
      const int64_t h1 = std::min(kv_heads, h0 + per_split);
      const int64_t nq = (h1 - h0) * group;  // query heads of this task, from h0 * group
      const int64_t seq_end = lens[b];
      const int64_t seq_first = seq_first_of(b);
      const int64_t* table = tables + b * table_width;
      const float* qb = q + (b * heads + h0 * group) * dim;
      // Chunk c's positions: [first, end), whole blocks of the sequence's range.
      auto bounds = [&](int64_t c) -> std::pair<int64_t, int64_t> {
        const int64_t chunk0 = (seq_first - seq_first % block_size) + c * chunk_blocks * block_size;
        return {std::max(seq_first, chunk0),
                c + 1 < chunks ? std::min(seq_end, chunk0 + chunk_blocks * block_size) : seq_end};
      };
      // The bf16 loops without AMX request what they read next from one list of the task's
      // reads (list_reads in attention_bf16.h): units[u] is unit u's first row, and chunk
      // c_begin + j's units start at chunk_unit0[j].
      const bool streamed = fast && !amx;
      const int64_t hn = h1 - h0;  // units per group
      if (streamed)
        list_reads(k_cache, v_cache, table, block_size, kv_heads, dim, h0, h1, c_end - c_begin,
                   [&](int64_t j) { return bounds(c_begin + j); }, units, chunk_unit0, rows0);
      auto unit_at = [&](int64_t u) -> const char* {
        return u < static_cast<int64_t>(units.size()) ? units[u] : nullptr;
      };
      for (int64_t c = c_begin; c < c_end; ++c) {
        const std::pair<int64_t, int64_t> span = bounds(c);
        const int64_t first = span.first, end_pos = span.second;
        // Requests ahead run on to the end of this task's last chunk.
        const int64_t ahead_end = bounds(c_end - 1).second;
        const int64_t len = std::max<int64_t>(0, end_pos - first);
        const int64_t part = part0[b] + c * heads + h0 * group;  // first partial row of this task
        float* ob = chunks > 1 ? part_o.get() + part * dim : out + (b * heads + h0 * group) * dim;
        if (len == 0) {  // an empty context
          for (int64_t g = 0; g < nq; ++g) {
            if (chunks == 1) {
              std::memset(ob + g * dim, 0, dim * sizeof(float));
              continue;
            }
            part_m[part + g] = -INFINITY;
            part_l[part + g] = 0.f;
            std::memset(ob + g * dim, 0, dim * sizeof(float));
          }
          continue;
        }
        scores.resize(nq * len);
        // Blocks are scattered, so the hardware prefetcher does not see one stream, and after a
        // step's weights have streamed through the caches every block is a cache (and TLB) miss.
        // So this task's rows of the block kAhead blocks on are requested while a block is read,
        // a row's lines at each position (K during the score pass, V during the first output
        // pass), not a whole block's at once: at batch 32 a block's 96 requests issued together
        // stalled the loop until they drained (attention over 30 layers 26.4 ms; spread: 18.2).
        // V's first blocks are requested whole during the score pass. (The bf16 loops without
        // AMX request from the task's list instead: `streamed` above.)
        const int64_t row_bytes = (h1 - h0) * dim * static_cast<int64_t>(sizeof(T));
        auto ahead_row = [&](const T* cache, int64_t t0) -> const char* {  // block t0 + kAhead's first row, or null
          const int64_t ta = t0 + kAhead * block_size;
          return ta < ahead_end ? reinterpret_cast<const char*>(cache + (table[ta / block_size] * block_size * kv_heads + h0) * dim)
                              : nullptr;
        };
        auto prefetch_at = [&](const char* p) {  // this task's bytes of one token's row
          for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
        };
        auto prefetch_row = [&](const char* row0, int64_t i) {
          if (row0 != nullptr) prefetch_at(row0 + i * row_stride * static_cast<int64_t>(sizeof(T)));
        };
        auto prefetch_block = [&](const T* cache, int64_t t0) {
          if (t0 >= ahead_end) return;
          const int64_t rows = std::min(block_size, ahead_end - t0);
          const char* p = reinterpret_cast<const char*>(cache + (table[t0 / block_size] * block_size * kv_heads + h0) * dim);
          const int64_t bytes = (h1 - h0) * dim * static_cast<int64_t>(sizeof(T));
          for (int64_t i = 0; i < rows; ++i, p += row_stride * sizeof(T))
            for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
        };
        const int64_t start_block = first - first % block_size;
        // streamed: this chunk's first K unit in the list, its groups, and its first V unit
        const int64_t unit0 = streamed ? chunk_unit0[c - c_begin] : 0;
        const int64_t groups = streamed ? (chunk_unit0[c - c_begin + 1] - unit0) / (2 * hn) : 0;
        const int64_t v_unit0 = unit0 + groups * hn;
        const int64_t row_bytes2 = row_stride * static_cast<int64_t>(sizeof(T));
        const int64_t head_bytes = dim * static_cast<int64_t>(sizeof(T));
        if (c == c_begin && streamed) {  // nothing is read yet to spread these over
          for (int64_t u = 1; u < kAheadUnits; ++u)
            if (const char* p = unit_at(u))
              for (int64_t r = 0; r < 16; ++r)
                for (int64_t off = 0; off < head_bytes; off += 64) _mm_prefetch(p + r * row_bytes2 + off, _MM_HINT_T0);
        } else if (c == c_begin) {  // later chunks' first blocks were requested by the chunk before
          for (int64_t a = 1; a < kAhead; ++a) prefetch_block(k_cache, start_block + a * block_size);
        }
        const char* k_ahead = nullptr;  // the K block kAhead blocks past the one being read
        auto next_block = [&](int64_t t0) {
          k_ahead = ahead_row(k_cache, t0);
          if (t0 < start_block + kAhead * block_size) prefetch_block(v_cache, t0);
        };
  #ifdef TUILI_AMX_SCORES
        if constexpr (kFastType) {
          if (amx) {
            const int64_t c32 = dim / 32;
            qt.assign(static_cast<size_t>((h1 - h0) * c32 * 32 * G), 0);
            for (int64_t kvh = h0; kvh < h1; ++kvh)
              for (int64_t n = 0; n < G; ++n) {
                const uint16_t* qn = q16 + (b * heads + kvh * G + n) * dim;
                for (int64_t d = 0; d < dim; ++d)
                  qt[(((kvh - h0) * c32 + d / 32) * 16 + d % 32 / 2) * 2 * G + 2 * n + d % 2] = qn[d];
              }
            const int64_t row_bytes2 = row_stride * 2;
            for (int64_t t0 = start_block; t0 < end_pos; t0 += block_size) {
              next_block(t0);
              const int64_t slot0 = table[t0 / block_size] * block_size;
              const int64_t n = std::min(end_pos - t0, block_size), i0 = std::max<int64_t>(0, first - t0);
              // whole tiles of 16 rows from a multiple of 16 (block_size is one): rows before
              // `first` or past the end are read (they lie in the block) and their scores dropped
              for (int64_t i = i0 - i0 % 16; i < n; i += 16) {
                const int64_t lo = std::max(i, i0), hi = std::min(i + 16, n);
                for (int64_t kvh = h0; kvh < h1; ++kvh) {
                  if (k_ahead != nullptr) {
                    const char* pa = k_ahead + (i * row_stride + (kvh - h0) * dim) * 2;
                    for (int64_t r = 0; r < 16; ++r)
                      for (int64_t off = 0; off < dim * 2; off += 64) _mm_prefetch(pa + r * row_bytes2 + off, _MM_HINT_T0);
                  }
                  _tile_zero(0);
                  const T* kp = k_cache + ((slot0 + i) * kv_heads + kvh) * dim;
                  for (int64_t c = 0; c < c32; ++c) {
                    _tile_loadd(1, kp + 32 * c, row_bytes2);
                    _tile_loadd(2, qt.data() + ((kvh - h0) * c32 + c) * 32 * G, G * 4);
                    _tile_dpbf16ps(0, 1, 2);
                  }
                  float* dst = scores.data() + (kvh - h0) * G * len + (t0 + lo - first) * G;
                  if (lo == i && hi == i + 16) {
                    _tile_stored(0, dst, G * 4);
                  } else {
                    _tile_stored(0, tile_out, G * 4);
                    std::memcpy(dst, tile_out + (lo - i) * G, (hi - lo) * G * sizeof(float));
                  }
                }
              }
            }
          }
        }
  #endif
  #ifdef __AVX512BF16__
        if constexpr (kFastType) {
          if (fast && !amx) {  // 16 positions of a block at a time
            int64_t u = unit0;  // the unit being read
            for (int64_t t0 = start_block; t0 < end_pos; t0 += block_size) {
              const int64_t slot0 = table[t0 / block_size] * block_size;
              const int64_t n = std::min(end_pos - t0, block_size);
              for (int64_t i = std::max<int64_t>(0, first - t0); i < n; i += 16)
                for (int64_t kvh = h0; kvh < h1; ++kvh, ++u)
                  scores16<G>(q16 + (b * heads + kvh * G) * dim,
                              reinterpret_cast<const uint16_t*>(k_cache + ((slot0 + i) * kv_heads + kvh) * dim),
                              row_stride, dim, std::min<int64_t>(16, n - i), scale,
                              scores.data() + (kvh - h0) * G * len + (t0 + i - first), len,
                              unit_at(u + kAheadUnits), row_stride * 2, dim * 2 / 64);
            }
          }
        }
  #endif
        // Scores: for each position, the G query heads of each kv head against its K row.
        if (!fast) for_each_position(table, block_size, first, end_pos, next_block, [&](int64_t slot, int64_t pos) {
          prefetch_row(k_ahead, slot % block_size);
          for (int64_t kvh = h0; kvh < h1; ++kvh) {
            const T* kp = k_cache + (slot * kv_heads + kvh) * dim;
            const float ks = (k_scales ? k_scales[slot * kv_heads + kvh] : 1.f) * scale;
            const float* qk = qb + (kvh - h0) * group * dim;
            float* sk = scores.data() + (kvh - h0) * group * len + pos;
            if constexpr (G > 0) {
              __m256 a0[G], a1[G];
  #pragma GCC unroll 8
              for (int g = 0; g < G; ++g) a0[g] = a1[g] = _mm256_setzero_ps();
              for (int64_t d = 0; d < dim; d += 16) {
                const __m256 k0 = load8(kp + d), k1 = load8(kp + d + 8);
  #pragma GCC unroll 8
                for (int g = 0; g < G; ++g) {
                  a0[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qk + g * dim + d), k0, a0[g]);
                  a1[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qk + g * dim + d + 8), k1, a1[g]);
                }
              }
  #pragma GCC unroll 8
              for (int g = 0; g < G; ++g) sk[g * len] = tuili::hsum(_mm256_add_ps(a0[g], a1[g])) * ks;
            } else {
              for (int64_t g = 0; g < group; ++g) {
                __m256 acc = _mm256_setzero_ps();
                for (int64_t d = 0; d < dim; d += 8)
                  acc = _mm256_fmadd_ps(_mm256_loadu_ps(qk + g * dim + d), load8(kp + d), acc);
                sk[g * len] = tuili::hsum(acc) * ks;
              }
            }
          }
        });
        // Softmax per query head, in place; in the bf16 loops left unnormalised: the output pass
        // scales each head's sums by 1 / sum once (norm), instead of every score.
        norm.assign(nq, 1.f);
  #if defined(TUILI_AMX_SCORES)
        if constexpr (kFastType) {
          if (amx) {
            softmax_interleaved<G>(scores.data(), len, h1 - h0, scale, chunks > 1 ? part_m.get() + part : nullptr,
                                   chunks > 1 ? part_l.get() + part : nullptr, norm.data());
          }
        }
  #endif
        for (int64_t g = 0; g < (amx ? 0 : nq); ++g) {
          float* sg = scores.data() + g * len;
          float m;
          const float sum = tuili::exp_minus_max(sg, len, &m);
          if (chunks > 1) {  // left unnormalised; the merge rescales
            part_m[part + g] = m;
            part_l[part + g] = sum;
            continue;
          }
          if (fast) {
            norm[g] = 1.f / sum;
          } else {  // the float32 and int8 loops keep normalised scores (their results as before)
            const float inv = 1.f / sum;
            for (int64_t t = 0; t < len; ++t) sg[t] *= inv;
          }
        }
        // Output: the weighted sum of V rows. With G known, a slice of 16 dims of the G heads'
        // outputs stays in registers over all positions (one pass per slice; the rows stay in
        // L2 between passes); otherwise each row is read once and the outputs updated in memory.
        const float* sc = scores.data();
        const char* v_ahead = nullptr;  // in the first output pass, the V block kAhead blocks on
  #ifdef __AVX512BF16__
        if constexpr (kFastType) {
          if (streamed) {  // group by group, the heads in turn (attention_bf16.h)
            v_pass_grouped<G>(v_cache, table, block_size, kv_heads, dim, h0, h1, first, end_pos, sc, len, norm.data(),
                              ob, v_unit0, unit_at, kAheadUnits);
            continue;
          }
          if (fast) {  // AMX scores: 64 dims of the G heads' outputs in registers, one pass per slice
            for (int64_t kvh = h0; kvh < h1; ++kvh) {
              const float* sk = sc + (kvh - h0) * G * len;
              float* ok = ob + (kvh - h0) * G * dim;
              for (int64_t d = 0; d < dim; d += 64) {
                __m512 acc[G][4];
  #pragma GCC unroll 8
                for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = acc[g][2] = acc[g][3] = _mm512_setzero_ps();
                const bool first_pass = kvh == h0 && d == 0;  // requests the rows ahead
                auto pf = [&](int64_t t0) {
                  v_ahead = first_pass ? ahead_row(v_cache, t0) : nullptr;
                  // The next block's 64 dims of this kv head, into L1: the passes after the first
                  // find the rows in L2 only and waited on them (kernel_ab --bf16-queries, Zen 5:
                  // 1.12-1.13x at batch 16 and 32; two blocks ahead 0.97-0.98x of one).
                  const int64_t tn = t0 + block_size;
                  if (tn < end_pos) {
                    const T* vn = v_cache + (table[tn / block_size] * block_size * kv_heads + kvh) * dim + d;
                    for (int64_t r = 0; r < std::min(block_size, end_pos - tn); ++r)
                      for (int64_t off = 0; off < 64 * static_cast<int64_t>(sizeof(T)); off += 64)
                        _mm_prefetch(reinterpret_cast<const char*>(vn + r * row_stride) + off, _MM_HINT_T0);
                  }
                };
                // Block by block, the row and weight addresses walked by pointer: through
                // for_each_position each row cost a division (its offset in the block, for the
                // request ahead) and a product for its address, and the pass ran 1.1x slower.
                for (int64_t t0 = start_block; t0 < end_pos; t0 += block_size) {
                  pf(t0);
                  const int64_t i0 = std::max<int64_t>(0, first - t0), n = std::min(end_pos - t0, block_size);
                  const T* vp = v_cache + ((table[t0 / block_size] * block_size + i0) * kv_heads + kvh) * dim + d;
                  const float* w = sk + (t0 + i0 - first) * G;
                  const char* pa = v_ahead != nullptr ? v_ahead + i0 * row_bytes2 : nullptr;
                  for (int64_t i = i0; i < n; ++i, vp += row_stride, w += G) {
                    if (pa != nullptr) {
                      prefetch_at(pa);
                      pa += row_bytes2;
                    }
                    const __m512 v0 = tuili::load16(vp), v1 = tuili::load16(vp + 16), v2 = tuili::load16(vp + 32),
                                 v3 = tuili::load16(vp + 48);
  #pragma GCC unroll 8
                    for (int g = 0; g < G; ++g) {
                      const __m512 wg = _mm512_set1_ps(w[g]);
                      acc[g][0] = _mm512_fmadd_ps(wg, v0, acc[g][0]);
                      acc[g][1] = _mm512_fmadd_ps(wg, v1, acc[g][1]);
                      acc[g][2] = _mm512_fmadd_ps(wg, v2, acc[g][2]);
                      acc[g][3] = _mm512_fmadd_ps(wg, v3, acc[g][3]);
                    }
                  }
                }
  #pragma GCC unroll 8
                for (int g = 0; g < G; ++g)
                  for (int j = 0; j < 4; ++j)
                    _mm512_storeu_ps(ok + g * dim + d + 16 * j,
                                     _mm512_mul_ps(acc[g][j], _mm512_set1_ps(norm[(kvh - h0) * G + g])));
              }
            }
            continue;
          }
        }
  #endif
        if constexpr (G > 0) {
          // A slice of NV x 8 dims per pass: G x NV accumulators, G broadcast weights and one V
          // vector fill the 16 registers (NV = 4 for G <= 3: two passes over 64 dims, not four,
          // so each weight is broadcast twice, not four times; same sums in the same order).
          // kernel_ab.py against 16-dim slices, AVX2 EPYC, both orders: 1.10-1.17x at batch 1,
          // 1.08-1.17x at 6, 1.07-1.22x at 32.
          constexpr int kWide = G == 1 ? 8 : G <= 3 ? 4 : 2;
          auto out_pass = [&](auto nv) {
            constexpr int NV = decltype(nv)::value;
            for (int64_t kvh = h0; kvh < h1; ++kvh) {
              const float* sk = sc + (kvh - h0) * G * len;
              float* ok = ob + (kvh - h0) * G * dim;
              for (int64_t d = 0; d < dim; d += 8 * NV) {
                __m256 acc[G][NV];
  #pragma GCC unroll 8
                for (int g = 0; g < G; ++g)
  #pragma GCC unroll 8
                  for (int j = 0; j < NV; ++j) acc[g][j] = _mm256_setzero_ps();
                auto pf = [&](int64_t t0) { v_ahead = kvh == h0 && d == 0 ? ahead_row(v_cache, t0) : nullptr; };
                for_each_position(table, block_size, first, end_pos, pf, [&](int64_t slot, int64_t pos) {
                  prefetch_row(v_ahead, slot % block_size);
                  const T* vp = v_cache + (slot * kv_heads + kvh) * dim + d;
                  const float vs = v_scales ? v_scales[slot * kv_heads + kvh] : 1.f;
                  __m256 w[G];
  #pragma GCC unroll 8
                  for (int g = 0; g < G; ++g) w[g] = _mm256_set1_ps(sk[g * len + pos] * vs);
  #pragma GCC unroll 8
                  for (int j = 0; j < NV; ++j) {
                    const __m256 v = load8(vp + 8 * j);
  #pragma GCC unroll 8
                    for (int g = 0; g < G; ++g) acc[g][j] = _mm256_fmadd_ps(w[g], v, acc[g][j]);
                  }
                });
  #pragma GCC unroll 8
                for (int g = 0; g < G; ++g)
  #pragma GCC unroll 8
                  for (int j = 0; j < NV; ++j) _mm256_storeu_ps(ok + g * dim + d + 8 * j, acc[g][j]);
              }
            }
          };
          if (dim % (8 * kWide) == 0) out_pass(std::integral_constant<int, kWide>{});
          else out_pass(std::integral_constant<int, 2>{});
        } else {
          for (int64_t g = 0; g < nq; ++g) std::memset(ob + g * dim, 0, dim * sizeof(float));
          auto pf = [&](int64_t t0) { v_ahead = ahead_row(v_cache, t0); };
          for_each_position(table, block_size, first, end_pos, pf, [&](int64_t slot, int64_t pos) {
            prefetch_row(v_ahead, slot % block_size);
            for (int64_t kvh = h0; kvh < h1; ++kvh) {
              const T* vp = v_cache + (slot * kv_heads + kvh) * dim;
              const float vs = v_scales ? v_scales[slot * kv_heads + kvh] : 1.f;
              const int64_t g0 = (kvh - h0) * group;
              for (int64_t d = 0; d < dim; d += 8) {
                const __m256 v = load8(vp + d);
                for (int64_t g = g0; g < g0 + group; ++g) {
                  const __m256 w = _mm256_set1_ps(sc[g * len + pos] * vs);
                  float* og = ob + g * dim + d;
                  _mm256_storeu_ps(og, _mm256_fmadd_ps(w, v, _mm256_loadu_ps(og)));
                }
              }
            }
          });
        }
      }
      // A task that held all of a context's chunks merges them while they are in its caches.
      if (chunks > 1 && c_begin == 0 && c_end == chunks)
        for (int64_t h = h0 * group; h < h1 * group; ++h) merge(b, h);
    }
#ifdef TUILI_AMX_SCORES
    if (amx) _tile_release();
#endif
  });
  // Sequences whose chunks were spread over several tasks are merged here, split among the threads.
  if (parts == 0) return;
  at::parallel_for(0, batch * heads, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t bh = r0; bh < r1; ++bh)
      if (chunks_of[bh / heads] > per_piece_of[bh / heads]) merge(bh / heads, bh % heads);
  });
}
#endif

}  // namespace

// q: [B, H, D] float32 or bfloat16 (out: float32); caches: [NB, BS, KVH, D]; tables: [B, W] int64; lens: [B] int64;
// k_scales / v_scales: [NB, BS, KVH] float32 for an int8 cache, empty tensors otherwise;
// window: attend to the last `window` positions only (0: all).
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor tables, torch::Tensor lens, double scale,
                                     torch::Tensor k_scales, torch::Tensor v_scales, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && (q.scalar_type() == torch::kFloat32 || q.scalar_type() == torch::kBFloat16),
              "q: [B, H, D] float32 or bfloat16");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(), "caches: 4-d contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k and v caches differ in dtype");
  TORCH_CHECK(tables.scalar_type() == torch::kInt64 && tables.is_contiguous(), "tables: int64");
  TORCH_CHECK(lens.scalar_type() == torch::kInt64 && lens.is_contiguous(), "lens: int64");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dim && heads % kv_heads == 0, "head shapes do not match");
  const bool q_bf16 = q.scalar_type() == torch::kBFloat16;
  auto q16_t = q_bf16 ? q.contiguous() : q;
  const auto* q16 = q_bf16 ? reinterpret_cast<const uint16_t*>(q16_t.data_ptr<at::BFloat16>()) : nullptr;
  q = q.to(torch::kFloat32).contiguous();
  auto out = torch::empty_like(q);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fs = static_cast<float>(scale);
  const int64_t width = tables.size(1);
#ifdef __AVX2__
  const bool vec = dim % 8 == 0;
  const int grouped = dim % 16 == 0 && heads / kv_heads <= 8 ? static_cast<int>(heads / kv_heads) : 0;
#define TUILI_DECODE(T, ...)                                                \
  do {                                                                      \
    if (!vec) { decode_kernel<T>(__VA_ARGS__); break; }                     \
    switch (grouped) {                                                      \
      case 1: decode_kernel_avx2<T, 1>(__VA_ARGS__, q16); break;                 \
      case 2: decode_kernel_avx2<T, 2>(__VA_ARGS__, q16); break;                 \
      case 3: decode_kernel_avx2<T, 3>(__VA_ARGS__, q16); break;                 \
      case 4: decode_kernel_avx2<T, 4>(__VA_ARGS__, q16); break;                 \
      case 5: decode_kernel_avx2<T, 5>(__VA_ARGS__, q16); break;                 \
      case 6: decode_kernel_avx2<T, 6>(__VA_ARGS__, q16); break;                 \
      case 7: decode_kernel_avx2<T, 7>(__VA_ARGS__, q16); break;                 \
      case 8: decode_kernel_avx2<T, 8>(__VA_ARGS__, q16); break;                 \
      default: decode_kernel_avx2<T, 0>(__VA_ARGS__, q16); break;                \
    }                                                                       \
  } while (0)
#else
#define TUILI_DECODE(T, ...) decode_kernel<T>(__VA_ARGS__)
#endif
  switch (k_cache.scalar_type()) {
    case torch::kFloat32:
      TUILI_DECODE(float, q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), nullptr,
                           nullptr, tp, lp, op, batch, heads, kv_heads, dim, block_size, width, fs, window);
      break;
    case torch::kBFloat16:
      TUILI_DECODE(at::BFloat16, q.data_ptr<float>(), k_cache.data_ptr<at::BFloat16>(),
                                  v_cache.data_ptr<at::BFloat16>(), nullptr, nullptr, tp, lp, op, batch, heads,
                                  kv_heads, dim, block_size, width, fs, window);
      break;
    case torch::kChar:
      TORCH_CHECK(k_scales.scalar_type() == torch::kFloat32 && v_scales.scalar_type() == torch::kFloat32 &&
                      k_scales.is_contiguous() && v_scales.is_contiguous() &&
                      k_scales.numel() == k_cache.numel() / dim && v_scales.numel() == k_scales.numel(),
                  "an int8 cache needs float32 scales [NB, BS, KVH]");
      TUILI_DECODE(int8_t, q.data_ptr<float>(), k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(),
                            k_scales.data_ptr<float>(), v_scales.data_ptr<float>(), tp, lp, op, batch, heads,
                            kv_heads, dim, block_size, width, fs, window);
      break;
    default:
      TORCH_CHECK(false, "caches must be float32, bfloat16 or int8");
  }
#undef TUILI_DECODE
  return out;
}
