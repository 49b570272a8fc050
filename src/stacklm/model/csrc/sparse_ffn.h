// One token through the Scaling Transformer's sparse FFN (model/ffn_sparse.py): the low-rank
// controller, the chosen unit of each block, its row of W1, its row of W2.
//
// PyTorch has no fused op for this: its pieces (two small linears, argmax, index_select + linear,
// embedding_bag) are five kernel calls a layer, each reading a few hundred KB at most, so at
// batch 1 their fixed costs outweigh their reads. Here one parallel region does it all: each
// thread takes a share of the blocks, reads only their controller rows and chosen rows of W1 and
// W2, and keeps a partial output; the partials are summed at the end.
//
// Rounding follows the unfused path: the controller's two outputs and h are rounded to the
// model's dtype, as its linear layers return them; sums are accumulated in float32.

#pragma once

#include "common.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace stacklm {

// x's dot products with eight rows at once, out[j] = x . rows[j]: eight independent streams of
// loads keep more of the gathered rows in flight than one row at a time. At the 800M shape in
// float32, four rows at once made the layer 1.4-1.5x faster than one, and eight took another 2 us
// off its 40 (bfloat16: 3 of 35); software prefetches of the rows ahead, as matvec.h makes,
// gained nothing and cost 1.4x once the rows were read four at a time (they fill the buffers the
// loads need).
template <typename A, typename B>
inline void gathered_dots8(const A* __restrict__ x, const B* const* rows, int64_t n, float* __restrict__ out) {
  const B* __restrict__ r0 = rows[0];
  const B* __restrict__ r1 = rows[1];
  const B* __restrict__ r2 = rows[2];
  const B* __restrict__ r3 = rows[3];
  const B* __restrict__ r4 = rows[4];
  const B* __restrict__ r5 = rows[5];
  const B* __restrict__ r6 = rows[6];
  const B* __restrict__ r7 = rows[7];
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    s0 += v * static_cast<float>(r0[i]);
    s1 += v * static_cast<float>(r1[i]);
    s2 += v * static_cast<float>(r2[i]);
    s3 += v * static_cast<float>(r3[i]);
    s4 += v * static_cast<float>(r4[i]);
    s5 += v * static_cast<float>(r5[i]);
    s6 += v * static_cast<float>(r6[i]);
    s7 += v * static_cast<float>(r7[i]);
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3, out[4] = s4, out[5] = s5, out[6] = s6, out[7] = s7;
}

// acc += sum_j scale[j] rows[j], four rows at once for the same reason (eight gained nothing here)
template <typename T>
inline void gathered_add4(float* __restrict__ acc, const float* scale, const T* const* rows, int64_t n) {
  const T* __restrict__ r0 = rows[0];
  const T* __restrict__ r1 = rows[1];
  const T* __restrict__ r2 = rows[2];
  const T* __restrict__ r3 = rows[3];
  const float h0 = scale[0], h1 = scale[1], h2 = scale[2], h3 = scale[3];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    acc[i] += (h0 * static_cast<float>(r0[i]) + h1 * static_cast<float>(r1[i])) +
              (h2 * static_cast<float>(r2[i]) + h3 * static_cast<float>(r3[i]));
}

template <typename T>
struct SparseFFN {
  const T* x;   // (D)
  const T* c1;  // controller_down (R, D)
  const T* c2;  // controller_up (d_ff, R)
  const T* c;   // its bias (d_ff)
  const T* w1;  // (d_ff, D)
  const T* b1;  // (d_ff) or null
  const T* w2;  // (d_ff, D)
  int64_t d_model, rank, n_blocks, block_size;

  // The controller's logits for block b: each unit's row of C2 (R values) against z, plus c.
  void block_logits(int64_t b, const float* z, float* out) const {
    stacklm::dot_products(z, c2 + b * block_size * rank, rank, rank, block_size, out);
    for (int64_t j = 0; j < block_size; ++j) out[j] = rounded<T>(out[j] + static_cast<float>(c[b * block_size + j]));
  }

  // The chosen unit of block b: argmax as torch.argmax's, the first maximum, NaN above all.
  int64_t choose(int64_t b, const float* z, float* logits) const {
    block_logits(b, z, logits);
#ifdef __AVX512F__
    // Sixteen logits at a time where no NaN is among them: with weights in cache, the scalar loop
    // below, with its NaN tests, was a quarter of the controller's time.
    if (block_size % 16 == 0) {
      __m512 top = _mm512_loadu_ps(logits);
      __mmask16 nan = _mm512_cmp_ps_mask(top, top, _CMP_UNORD_Q);
      for (int64_t j = 16; j < block_size; j += 16) {
        const __m512 v = _mm512_loadu_ps(logits + j);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        top = _mm512_max_ps(top, v);
      }
      if (nan == 0) {
        const __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        for (int64_t j = 0;; j += 16) {
          const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(logits + j), best, _CMP_EQ_OQ);
          if (hit != 0) return b * block_size + j + __builtin_ctz(hit);
        }
      }
    }
#endif
    int64_t best = 0;
    for (int64_t j = 1; j < block_size; ++j) {
      const float v = logits[j], top = logits[best];
      if (v > top || (std::isnan(v) && !std::isnan(top))) best = j;
    }
    return b * block_size + best;
  }

  // Blocks [begin, end) added into acc (D).
  void run(int64_t begin, int64_t end, float* acc) const {
    // z = C1 x: R small dot products, done by every thread rather than shared through a barrier
    std::vector<float> z(rank);
    dot_products(x, c1, d_model, d_model, rank, z.data());
    for (int64_t r = 0; r < rank; ++r) z[r] = rounded<T>(z[r]);
    const int64_t n = end - begin, block_rows = block_size * rank;  // C2's values for one block
    std::vector<int64_t> units(n);
    std::vector<float> h(n);
    std::vector<float> logits(block_size);
    // The next block's rows of C2 are requested while this block's are used: the hardware
    // prefetcher stops at a page, and at the 800M shape (N 64, R 16, float32) a block's rows are
    // one page. With the weights not in cache this took 3-8 us off the controller's 20 a layer
    // (float32, 2 threads); also asking here for each chosen row of W1 made the layer 1.14x slower.
    if (n > 0) prefetch_row(c2 + begin * block_rows, block_rows);
    for (int64_t k = 0; k < n; ++k) {
      if (k + 1 < n) prefetch_row(c2 + (begin + k + 1) * block_rows, block_rows);
      units[k] = choose(begin + k, z.data(), logits.data());
    }
    // W1's chosen rows, eight at a time (a short last group repeats the last row, its dot product unused)
    for (int64_t k = 0; k < n; k += 8) {
      const T* rows[8];
      float dots[8];
      for (int j = 0; j < 8; ++j) rows[j] = w1 + units[std::min(k + j, n - 1)] * d_model;
      gathered_dots8(x, rows, d_model, dots);
      for (int64_t j = 0; j < std::min<int64_t>(8, n - k); ++j) {
        const float dot = dots[j] + (b1 != nullptr ? static_cast<float>(b1[units[k + j]]) : 0.0f);
        h[k + j] = rounded<T>(dot);
      }
    }
    // relu: units with h <= 0 add nothing and their rows of W2 are not read (a NaN passes on, as
    // torch.relu's does)
    int64_t live = 0;
    for (int64_t k = 0; k < n; ++k) {
      if (!(h[k] <= 0.0f)) {
        units[live] = units[k];
        h[live++] = h[k];
      }
    }
    // W2's rows of the live units, four at a time, then one by one
    int64_t k = 0;
    for (; k + 4 <= live; k += 4) {
      const T* rows[4] = {w2 + units[k] * d_model, w2 + units[k + 1] * d_model, w2 + units[k + 2] * d_model,
                          w2 + units[k + 3] * d_model};
      gathered_add4(acc, h.data() + k, rows, d_model);
    }
    for (; k < live; ++k) add_scaled(acc, h[k], w2 + units[k] * d_model, d_model);
  }
};

template <typename T>
inline void sparse_ffn_one(const SparseFFN<T>& layer, T* out) {
  const int64_t d = layer.d_model;
  const int64_t shares = at::get_num_threads();  // read once: the partials are sized by it
  std::vector<float> partial(static_cast<size_t>(shares) * d, 0.0f);
  // Shares of whole groups of 8 blocks keep both threads of a small machine busy down to 16 blocks.
  for_each_share(shares, [&](int64_t t, int64_t n) {
    const auto [begin, end] = share_of(layer.n_blocks, t, n);
    layer.run(begin, end, partial.data() + static_cast<size_t>(t) * d);
  });
  for (int64_t i = 0; i < d; ++i) {
    float sum = 0.0f;
    for (size_t t = 0; t < partial.size() / d; ++t) sum += partial[t * d + i];
    out[i] = static_cast<T>(sum);
  }
}

}  // namespace stacklm
