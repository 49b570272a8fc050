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

// Gathered rows are scattered over the matrix: those a few steps ahead are requested explicitly.
constexpr int64_t kGatherAhead = 2;

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
    for (int64_t r = 0; r < rank; ++r) z[r] = rounded<T>(dot_product(x, c1 + r * d_model, d_model));
    const int64_t n = end - begin;
    std::vector<int64_t> units(n);
    std::vector<float> h(n);
    std::vector<float> logits(block_size);
    for (int64_t k = 0; k < n; ++k) units[k] = choose(begin + k, z.data(), logits.data());
    for (int64_t k = 0; k < std::min(n, kGatherAhead); ++k) prefetch_row(w1 + units[k] * d_model, d_model);
    for (int64_t k = 0; k < n; ++k) {
      if (k + kGatherAhead < n) prefetch_row(w1 + units[k + kGatherAhead] * d_model, d_model);
      float dot = dot_product(x, w1 + units[k] * d_model, d_model);
      if (b1 != nullptr) dot += static_cast<float>(b1[units[k]]);
      h[k] = rounded<T>(dot);
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
    for (int64_t k = 0; k < std::min(live, kGatherAhead); ++k) prefetch_row(w2 + units[k] * d_model, d_model);
    for (int64_t k = 0; k < live; ++k) {
      if (k + kGatherAhead < live) prefetch_row(w2 + units[k + kGatherAhead] * d_model, d_model);
      add_scaled(acc, h[k], w2 + units[k] * d_model, d_model);
    }
  }
};

template <typename T>
inline void sparse_ffn_one(const SparseFFN<T>& layer, T* out) {
  const int64_t d = layer.d_model;
  std::vector<float> partial(static_cast<size_t>(at::get_num_threads()) * d, 0.0f);
  // Shares of whole groups of 8 blocks keep both threads of a small machine busy down to 16 blocks.
  for_each_share([&](int64_t t, int64_t shares) {
    const auto [begin, end] = share_of(layer.n_blocks, t, shares);
    layer.run(begin, end, partial.data() + static_cast<size_t>(t) * d);
  });
  for (int64_t i = 0; i < d; ++i) {
    float sum = 0.0f;
    for (size_t t = 0; t < partial.size() / d; ++t) sum += partial[t * d + i];
    out[i] = static_cast<T>(sum);
  }
}

}  // namespace stacklm
