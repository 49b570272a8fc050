// One token through the Scaling Transformer's sparse q/k/v (model/qkv_sparse.py,
// `multiplicative_conv`): the shared multiplicative layer, then the causal convolutions over
// (position, module) for q, k and v.
//
// Unfused, a decode step runs this as a matmul of the S scaled copies of x, two small matmuls of
// the convolution windows and the kernels that build them: about 80 us a layer at the 800M shape
// on a 2-core machine, for under 5 MFLOP and 0.6 MB of weights, because each call's fixed cost
// outweighs its work. Here it is two parallel loops, each thread taking a share of the output
// units so that each weight is read once.
//
// Rounding follows the unfused path: x * D, the layer's output and each convolution's output are
// rounded to the model's dtype, as its ops return them; sums are accumulated in float32. A
// bfloat16 layer keeps x * D and the windows in bfloat16 where the CPU multiplies bfloat16 pairs
// (common.h, Operand).

#pragma once

#include "common.h"

#include <memory>
#include <tuple>
#include <vector>

namespace stacklm {

template <typename T>
struct MultiplicativeConv {
  const T* x;        // (d)
  const T* mult;     // D (S, d)
  const T* weight;   // E (M, d)
  const T* bias;     // (S M) or null
  const T* frames;   // the shared layer's previous outputs (Lk - 1, S M), oldest first
  const T* qk_w;     // (2 M, M, Lk, 3)
  const T* qk_b;     // (2 M)
  const T* v_w;      // (M, M, Lk, 1)
  const T* v_b;      // (M)
  int64_t d, S, M, Lk;

  // y[s M + m] = sum_i x_i D[s, i] E[m, i] (+ bias), for the units m in [begin, end) of every module
  void shared(int64_t begin, int64_t end, T* y) const {
    // x D[s], rounded as x * D rounds it; every thread makes its own copy
    std::vector<Operand<T>> scaled(S * d);
    std::vector<float> xf(x, x + d);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t i = 0; i < d; ++i) scaled[s * d + i] = static_cast<T>(xf[i] * static_cast<float>(mult[s * d + i]));
    float out[16];
    // sixteen rows of E at a time against every module, so that each row is read from memory once
    for (int64_t m = begin; m < end; m += 16) {
      const int64_t rows = std::min<int64_t>(16, end - m);
      for (int64_t s = 0; s < S; ++s) {
        dot_products(scaled.data() + s * d, weight + m * d, d, d, rows, out);
        for (int64_t j = 0; j < rows; ++j) {
          float v = rounded<T>(out[j]);
          if (bias != nullptr) v += static_cast<float>(bias[s * M + m + j]);
          y[s * M + m + j] = static_cast<T>(v);
        }
      }
    }
  }

  // The windows of a convolution of width k over modules (zero-padded) and Lk over positions, one
  // per module s, laid out as the kernel (M, Lk, k): window[s][(m Lk + l) k + j] = grid[l, s + j - (k - 1) / 2, m].
  // This fills the entries of the units [m0, m1), which read only those units of y.
  void fill_windows(const T* y, int64_t k, int64_t m0, int64_t m1, Operand<T>* window) const {
    const int64_t size = M * Lk * k, step = Lk * k;
    for (int64_t s = 0; s < S; ++s)
      for (int64_t l = 0; l < Lk; ++l)
        for (int64_t j = 0; j < k; ++j) {
          const int64_t module = s + j - (k - 1) / 2;
          // one module's units, read in order, written every Lk k places
          Operand<T>* __restrict__ to = window + s * size + l * k + j;
          if (module < 0 || module >= S) {
            for (int64_t m = m0; m < m1; ++m) to[m * step] = Operand<T>(0.0f);
            continue;
          }
          const T* __restrict__ from = (l < Lk - 1 ? frames + l * S * M : y) + module * M;
          for (int64_t m = m0; m < m1; ++m) to[m * step] = from[m];
        }
  }

  // out[s, o] = b[o] + w[o] . window[s] for the kernel rows o in [begin, end), each read once
  void conv(const Operand<T>* window, const T* w, const T* b, int64_t k, int64_t n_out, int64_t begin,
            int64_t end, T* out) const {
    const int64_t size = M * Lk * k;
    float acc[16];
    for (int64_t o = begin; o < end; o += 16) {
      const int64_t rows = std::min<int64_t>(16, end - o);
      for (int64_t s = 0; s < S; ++s) {
        dot_products(window + s * size, w + o * size, size, size, rows, acc);
        for (int64_t j = 0; j < rows; ++j) out[s * n_out + o + j] = static_cast<T>(acc[j] + static_cast<float>(b[o + j]));
      }
    }
  }
  // The whole step: y (S M), qk (S, 2 M) and v (S, M). Each thread takes a share of the output
  // units (rows of E, then of the kernels), so that every weight is read once. The convolutions
  // read every module's y: a second loop. Float32 windows are filled in the first loop, each
  // thread the entries of its own units: at the 800M shape the step became 1.03x faster than with
  // each thread building them whole in the second, where they took 5 us of the kernel's 41 a
  // layer. Bfloat16 windows, half the bytes, are still built whole by each thread: read half from
  // the other core's cache, they made the bfloat16 step 0.93-0.99x as fast.
  void run(T* y, T* qk, T* v) const {
    constexpr bool fill_first = std::is_same_v<Operand<T>, float>;
    const int64_t qk_size = S * M * Lk * 3, v_size = S * M * Lk;
    // both windows, q/k's then v's, for the units [m0, m1); every entry is written
    auto fill = [&](Operand<T>* windows, int64_t m0, int64_t m1) {
      fill_windows(y, 3, m0, m1, windows);
      fill_windows(y, 1, m0, m1, windows + qk_size);
    };
    std::unique_ptr<Operand<T>[]> filled(fill_first ? new Operand<T>[qk_size + v_size] : nullptr);
    for_each_share([&](int64_t t, int64_t shares) {
      const auto [m0, m1] = share_of(M, t, shares);
      shared(m0, m1, y);
      if constexpr (fill_first) fill(filled.get(), m0, m1);
    });
    for_each_share([&](int64_t t, int64_t shares) {
      std::unique_ptr<Operand<T>[]> own;
      if constexpr (!fill_first) {
        own.reset(new Operand<T>[qk_size + v_size]);
        fill(own.get(), 0, M);
      }
      const Operand<T>* windows = fill_first ? filled.get() : own.get();
      const auto [q0, q1] = share_of(2 * M, t, shares);
      conv(windows, qk_w, qk_b, 3, 2 * M, q0, q1, qk);
      const auto [v0, v1] = share_of(M, t, shares);
      conv(windows + qk_size, v_w, v_b, 1, M, v0, v1, v);
    });
  }
};

}  // namespace stacklm
