// The sparse q/k/v's one-token step as ops (the kernel itself is in multiplicative_conv.h): the
// weights' repacking, done once per sequence, and the step on the packed weights.

#include "multiplicative_conv.h"

namespace {

using stacklm::MultiplicativeConv;

// D (S, d), E (M, d), the q/k kernel (2 M, M, Lk, 3), the v kernel (M, M, Lk, 1) -> packed, as
// multiplicative_conv.h's `pack` describes
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multiplicative_conv_pack(
    const at::Tensor& mult, const at::Tensor& weight, const at::Tensor& qk_w, const at::Tensor& v_w) {
  TORCH_CHECK(mult.dim() == 2 && weight.dim() == 2 && qk_w.dim() == 4,
              "multiplicative_conv_pack: D and E must be matrices, the q/k kernel (2 M, M, Lk, 3)");
  const int64_t d = mult.size(1), S = mult.size(0), M = weight.size(0), Lk = qk_w.size(2);
  TORCH_CHECK(weight.sizes() == at::IntArrayRef({M, d}) && S * M == d && Lk >= 1 &&
                  qk_w.sizes() == at::IntArrayRef({2 * M, M, Lk, 3}) && v_w.sizes() == at::IntArrayRef({M, M, Lk, 1}),
              "multiplicative_conv_pack: the shapes of the weights disagree");
  for (const at::Tensor* t : {&weight, &qk_w, &v_w})
    TORCH_CHECK(t->scalar_type() == mult.scalar_type(), "multiplicative_conv_pack: every weight must have one dtype");
  TORCH_CHECK(mult.scalar_type() == at::kFloat || mult.scalar_type() == at::kBFloat16,
              "multiplicative_conv_pack: the kernel takes float32 or bfloat16 weights");
  return stacklm::pack(mult, weight, qk_w, v_w);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multiplicative_conv_decode(
    const at::Tensor& x, const at::Tensor& mult_t, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& frames, const at::Tensor& qk_w, const at::Tensor& qk_b, const at::Tensor& v_w,
    const at::Tensor& v_b) {
  // x: (d), the packed D^T, E, q/k and v kernels (multiplicative_conv_pack), bias: (S M), frames:
  // (Lk - 1, S M), qk_b: (2 M), v_b: (M) -> y: (S M), qk: (S, 2 M), v: (S, M)
  TORCH_CHECK(x.dim() == 1, "multiplicative_conv_decode: x must be one row, (d)");
  const int64_t d = x.size(0);
  int64_t S, M, Lk;  // named, not bound: the dispatch's lambda captures them
  std::tie(S, M, Lk) = stacklm::packed_dims(d, mult_t, weight, qk_w, v_w);
  TORCH_CHECK(Lk >= 1 && (!bias.has_value() || bias->sizes() == at::IntArrayRef({d})) &&
                  frames.sizes() == at::IntArrayRef({Lk - 1, d}) && qk_b.sizes() == at::IntArrayRef({2 * M}) &&
                  v_b.sizes() == at::IntArrayRef({M}),
              "multiplicative_conv_decode: the shapes of x, the packed weights and the frames disagree");
  for (const at::Tensor* t : {&mult_t, &weight, &frames, &qk_w, &qk_b, &v_w, &v_b})
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "multiplicative_conv_decode: every tensor must have x's dtype");
  TORCH_CHECK(!bias.has_value() || bias->scalar_type() == x.scalar_type(),
              "multiplicative_conv_decode: the bias must have x's dtype");
  const at::Tensor xc = x.contiguous(), mc = mult_t.contiguous(), wc = weight.contiguous(), fc = frames.contiguous(),
                   qkwc = qk_w.contiguous(), qkbc = qk_b.contiguous(), vwc = v_w.contiguous(), vbc = v_b.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({d}, x.options()), qk = at::empty({S, 2 * M}, x.options()), v = at::empty({S, M}, x.options());
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
  m.def("multiplicative_conv_pack(Tensor multiplier, Tensor weight, Tensor qk_weight, Tensor v_weight) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("multiplicative_conv_decode(Tensor x, Tensor multiplier_t, Tensor weight, Tensor? bias, Tensor frames, "
        "Tensor qk_weight, Tensor qk_bias, Tensor v_weight, Tensor v_bias) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(stacklm, CPU, m) {
  m.impl("multiplicative_conv_pack", &multiplicative_conv_pack);
  m.impl("multiplicative_conv_decode", &multiplicative_conv_decode);
}
