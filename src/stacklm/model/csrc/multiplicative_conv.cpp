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
// rounded to the model's dtype, as its ops return them; sums are accumulated in float32.

#include "common.h"

#include <tuple>
#include <vector>

namespace {

using stacklm::dot_products;
using stacklm::for_each_share;
using stacklm::rounded;
using stacklm::share_of;

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
    // x D[s], rounded as x * D rounds it and kept in float32 for the dot products; every thread
    // makes its own copy
    std::vector<float> scaled(S * d), xf(x, x + d);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t i = 0; i < d; ++i) scaled[s * d + i] = rounded<T>(xf[i] * static_cast<float>(mult[s * d + i]));
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
  // per module s, laid out as the kernel (M, Lk, k): window[s][(m Lk + l) k + j] = grid[l, s + j - (k - 1) / 2, m]
  std::vector<float> windows(const T* y, int64_t k) const {
    const int64_t size = M * Lk * k;
    std::vector<float> out(S * size);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t l = 0; l < Lk; ++l)
          for (int64_t j = 0; j < k; ++j) {
            const int64_t module = s + j - (k - 1) / 2;
            const T* frame = l < Lk - 1 ? frames + l * S * M : y;
            out[s * size + (m * Lk + l) * k + j] = module >= 0 && module < S ? static_cast<float>(frame[module * M + m]) : 0.0f;
          }
    return out;
  }

  // out[s, o] = b[o] + w[o] . window[s] for the kernel rows o in [begin, end), each read once
  void conv(const std::vector<float>& window, const T* w, const T* b, int64_t k, int64_t n_out, int64_t begin,
            int64_t end, T* out) const {
    const int64_t size = M * Lk * k;
    float acc[16];
    for (int64_t o = begin; o < end; o += 16) {
      const int64_t rows = std::min<int64_t>(16, end - o);
      for (int64_t s = 0; s < S; ++s) {
        dot_products(window.data() + s * size, w + o * size, size, size, rows, acc);
        for (int64_t j = 0; j < rows; ++j) out[s * n_out + o + j] = static_cast<T>(acc[j] + static_cast<float>(b[o + j]));
      }
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> multiplicative_conv_decode(
    const at::Tensor& x, const at::Tensor& mult, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& frames, const at::Tensor& qk_w, const at::Tensor& qk_b, const at::Tensor& v_w,
    const at::Tensor& v_b) {
  // x: (d), mult: (S, d), weight: (M, d), bias: (S M), frames: (Lk - 1, S M), qk_w: (2 M, M, Lk, 3),
  // qk_b: (2 M), v_w: (M, M, Lk, 1), v_b: (M) -> y: (S M), qk: (S, 2 M), v: (S, M)
  const int64_t d = x.size(-1), S = mult.size(0), M = weight.size(0), Lk = qk_w.size(2);
  TORCH_CHECK(x.dim() == 1 && mult.sizes() == at::IntArrayRef({S, d}) && weight.sizes() == at::IntArrayRef({M, d}) &&
                  (!bias.has_value() || bias->sizes() == at::IntArrayRef({S * M})) &&
                  frames.sizes() == at::IntArrayRef({Lk - 1, S * M}) &&
                  qk_w.sizes() == at::IntArrayRef({2 * M, M, Lk, 3}) && qk_b.sizes() == at::IntArrayRef({2 * M}) &&
                  v_w.sizes() == at::IntArrayRef({M, M, Lk, 1}) && v_b.sizes() == at::IntArrayRef({M}),
              "multiplicative_conv_decode: the shapes of x, the weights and the frames disagree");
  for (const at::Tensor* t : {&mult, &weight, &frames, &qk_w, &qk_b, &v_w, &v_b})
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "multiplicative_conv_decode: every tensor must have x's dtype");
  TORCH_CHECK(!bias.has_value() || bias->scalar_type() == x.scalar_type(),
              "multiplicative_conv_decode: the bias must have x's dtype");
  const at::Tensor xc = x.contiguous(), mc = mult.contiguous(), wc = weight.contiguous(), fc = frames.contiguous(),
                   qkwc = qk_w.contiguous(), qkbc = qk_b.contiguous(), vwc = v_w.contiguous(), vbc = v_b.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({S * M}, x.options()), qk = at::empty({S, 2 * M}, x.options()),
             v = at::empty({S, M}, x.options());
  STACKLM_DISPATCH(x.scalar_type(), "multiplicative_conv_decode", [&] {
    const MultiplicativeConv<scalar_t> layer{
        xc.data_ptr<scalar_t>(), mc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
        bc.defined() ? bc.data_ptr<scalar_t>() : nullptr, fc.data_ptr<scalar_t>(), qkwc.data_ptr<scalar_t>(),
        qkbc.data_ptr<scalar_t>(), vwc.data_ptr<scalar_t>(), vbc.data_ptr<scalar_t>(), d, S, M, Lk};
    // Each thread takes a share of the output units (rows of E, then of the kernels), so that
    // every weight is read once; the convolutions read every module's y: a second loop.
    scalar_t *yp = y.data_ptr<scalar_t>(), *qkp = qk.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    for_each_share([&](int64_t t, int64_t shares) {
      const auto [m0, m1] = share_of(M, t, shares);
      layer.shared(m0, m1, yp);
    });
    for_each_share([&](int64_t t, int64_t shares) {
      const std::vector<float> qk_windows = layer.windows(yp, 3), v_windows = layer.windows(yp, 1);
      const auto [q0, q1] = share_of(2 * M, t, shares);
      layer.conv(qk_windows, layer.qk_w, layer.qk_b, 3, 2 * M, q0, q1, qkp);
      const auto [v0, v1] = share_of(M, t, shares);
      layer.conv(v_windows, layer.v_w, layer.v_b, 1, M, v0, v1, vp);
    });
  });
  return {y, qk, v};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(stacklm, m) {
  m.def("multiplicative_conv_decode(Tensor x, Tensor multiplier, Tensor weight, Tensor? bias, Tensor frames, "
        "Tensor qk_weight, Tensor qk_bias, Tensor v_weight, Tensor v_bias) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(stacklm, CPU, m) { m.impl("multiplicative_conv_decode", &multiplicative_conv_decode); }
