// The one-row matmul as an op (the kernel itself is in matvec.h).

#include "matvec.h"

namespace {

at::Tensor matvec(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && weight.dim() == 2 && weight.size(1) == x.size(1),
              "matvec: x must be (1, K) and weight (N, K)");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "matvec: x and weight must have the same dtype");
  const int64_t k = weight.size(1), n = weight.size(0);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty({1, n}, x.options());
  STACKLM_DISPATCH(x.scalar_type(), "matvec", [&] {
    stacklm::matvec_into<scalar_t>(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), nullptr, n, k,
                                   out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(stacklm, m) { m.def("matvec(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(stacklm, CPU, m) { m.impl("matvec", &matvec); }
