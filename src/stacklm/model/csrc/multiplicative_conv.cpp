// The sparse q/k/v's one-token step as an op (the kernel itself is in multiplicative_conv.h).

#include "multiplicative_conv.h"

namespace {

using stacklm::MultiplicativeConv;

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
    layer.run(y.data_ptr<scalar_t>(), qk.data_ptr<scalar_t>(), v.data_ptr<scalar_t>());
  });
  return {y, qk, v};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(stacklm, m) {
  m.def("multiplicative_conv_decode(Tensor x, Tensor multiplier, Tensor weight, Tensor? bias, Tensor frames, "
        "Tensor qk_weight, Tensor qk_bias, Tensor v_weight, Tensor v_bias) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(stacklm, CPU, m) { m.impl("multiplicative_conv_decode", &multiplicative_conv_decode); }
