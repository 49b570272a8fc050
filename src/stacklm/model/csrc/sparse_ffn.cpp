// The sparse FFN's one-token step as an op (the kernel itself is in sparse_ffn.h).

#include "sparse_ffn.h"

namespace {

using stacklm::SparseFFN;
using stacklm::sparse_ffn_one;

at::Tensor sparse_ffn_decode(const at::Tensor& x, const at::Tensor& c1, const at::Tensor& c2,
                             const at::Tensor& c, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                             const at::Tensor& w2, int64_t block_size) {
  // x: (D), c1: (R, D), c2: (d_ff, R), c: (d_ff), w1 and w2: (d_ff, D), b1: (d_ff) -> (D)
  const int64_t d = x.size(-1), d_ff = w1.size(0), rank = c1.size(0);
  TORCH_CHECK(x.dim() == 1 && c1.sizes() == at::IntArrayRef({rank, d}) && c2.sizes() == at::IntArrayRef({d_ff, rank}) &&
                  c.sizes() == at::IntArrayRef({d_ff}) && w1.sizes() == at::IntArrayRef({d_ff, d}) &&
                  w2.sizes() == w1.sizes() && (!b1.has_value() || b1->sizes() == c.sizes()),
              "sparse_ffn_decode: the shapes of x, the controller and the weights disagree");
  TORCH_CHECK(block_size > 0 && d_ff % block_size == 0, "sparse_ffn_decode: block_size must divide d_ff");
  for (const at::Tensor* t : {&c1, &c2, &c, &w1, &w2})
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "sparse_ffn_decode: every tensor must have x's dtype");
  TORCH_CHECK(!b1.has_value() || b1->scalar_type() == x.scalar_type(), "sparse_ffn_decode: b1 must have x's dtype");
  const at::Tensor xc = x.contiguous(), c1c = c1.contiguous(), c2c = c2.contiguous(), cc = c.contiguous(),
                   w1c = w1.contiguous(), w2c = w2.contiguous();
  const at::Tensor b1c = b1.has_value() ? b1->contiguous() : at::Tensor();
  at::Tensor out = at::empty({d}, x.options());
  STACKLM_DISPATCH(x.scalar_type(), "sparse_ffn_decode", [&] {
    const SparseFFN<scalar_t> layer{xc.data_ptr<scalar_t>(), c1c.data_ptr<scalar_t>(), c2c.data_ptr<scalar_t>(),
                                    cc.data_ptr<scalar_t>(), w1c.data_ptr<scalar_t>(),
                                    b1c.defined() ? b1c.data_ptr<scalar_t>() : nullptr, w2c.data_ptr<scalar_t>(),
                                    d, rank, d_ff / block_size, block_size};
    sparse_ffn_one(layer, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(stacklm, m) {
  m.def("sparse_ffn_decode(Tensor x, Tensor c1, Tensor c2, Tensor c, Tensor w1, Tensor? b1, Tensor w2, "
        "int block_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(stacklm, CPU, m) { m.impl("sparse_ffn_decode", &sparse_ffn_decode); }
