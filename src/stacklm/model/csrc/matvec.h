// One row times a weight matrix, x (1, K) @ weight (N, K)^T -> (1, N): every one-row matmul of a
// batch-1 decode step, the output projection the largest of them.
//
// At one row the product reads each weight once and is bound by memory bandwidth. On a 2-core
// Zen 5 VM, MKL's and oneDNN's matrix-vector products read 21-28 GB/s and Inductor's reduction
// 37-40, where a plain sum over the same bytes read 45-80: reading eight rows at a time, or none
// ahead, let the hardware prefetcher stall at each row's page boundary. Here each thread walks
// its share of rows in order, one row at a time, asking for the rows two ahead.

#pragma once

#include "common.h"

#include <vector>

namespace stacklm {

constexpr int64_t kRowsAhead = 2;

template <typename T>
inline void rows_times(const float* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                       int64_t k, int64_t begin, int64_t end, T* __restrict__ out) {
  for (int64_t r = begin; r < end; ++r) {
    if (r + kRowsAhead < end) prefetch_row(weight + (r + kRowsAhead) * k, k);
    const float dot = dot_product(x, weight + r * k, k);
    out[r] = static_cast<T>(bias != nullptr ? dot + static_cast<float>(bias[r]) : dot);
  }
}

// out (n) = weight (n, k) x (k) + bias (n, or null), in parallel over the rows
template <typename T>
inline void matvec_into(const T* x, const T* weight, const T* bias, int64_t n, int64_t k, T* out) {
  std::vector<float> xf(x, x + k);  // converted once, not once per row
  for_each_share([&](int64_t t, int64_t shares) {
    const auto [begin, end] = share_of(n, t, shares);
    rows_times(xf.data(), weight, bias, k, begin, end, out);
  });
}

}  // namespace stacklm
