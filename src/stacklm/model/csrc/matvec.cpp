// One row times a weight matrix, x (1, K) @ weight (N, K)^T -> (1, N): every one-row matmul of a
// batch-1 decode step, the output projection the largest of them.
//
// At one row the product reads each weight once and is bound by memory bandwidth. On a 2-core
// Zen 5 VM, MKL's and oneDNN's matrix-vector products read 21-28 GB/s and Inductor's reduction
// 37-40, where a plain sum over the same bytes read 45-80: reading eight rows at a time, or none
// ahead, let the hardware prefetcher stall at each row's page boundary. Here each thread walks
// its share of rows in order, one row at a time, asking for the rows two ahead.

#include "common.h"

#include <vector>

namespace {

constexpr int64_t kAhead = 2;

template <typename T>
void rows_times(const float* __restrict__ x, const T* __restrict__ weight, int64_t k, int64_t begin, int64_t end,
                T* __restrict__ out) {
  for (int64_t r = begin; r < end; ++r) {
    if (r + kAhead < end) stacklm::prefetch_row(weight + (r + kAhead) * k, k);
    out[r] = static_cast<T>(stacklm::dot_product(x, weight + r * k, k));
  }
}

at::Tensor matvec(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && weight.dim() == 2 && weight.size(1) == x.size(1),
              "matvec: x must be (1, K) and weight (N, K)");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "matvec: x and weight must have the same dtype");
  const int64_t k = weight.size(1), n = weight.size(0);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty({1, n}, x.options());
  STACKLM_DISPATCH(x.scalar_type(), "matvec", [&] {
    std::vector<float> xf(k);  // converted once, not once per row
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    for (int64_t i = 0; i < k; ++i) xf[i] = static_cast<float>(xp[i]);
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    stacklm::for_each_share([&](int64_t t, int64_t shares) {
      const auto [begin, end] = stacklm::share_of(n, t, shares);
      rows_times(xf.data(), wp, k, begin, end, op);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(stacklm, m) { m.def("matvec(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(stacklm, CPU, m) { m.impl("matvec", &matvec); }
