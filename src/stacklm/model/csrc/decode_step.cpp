// A decoder-only model's one-token decode step, batch 1, every block in one call
// (inference/cpu_step.py): for each block, the norm, q/k/v, the rotation, the KV-cache write,
// attention over the cache, the output projection, the residual, the norm and the FFN.
//
// Decoding one token reads every weight once and does little arithmetic, so on a CPU its time is
// the weights' bytes over the memory bandwidth plus fixed costs per operation. Run as PyTorch
// modules, a block is ten to twenty op calls, each a few microseconds of dispatch, allocation and
// Python; compiled, the step still pays Dynamo's guards and the graph's Python wrapper (about 1.5
// ms a token at the 800M shape, against a bound of 2.8 ms for the sparse model). Here the only
// call per token is this one, and the blocks run the kernels of matvec.h, sparse_ffn.h and
// multiplicative_conv.h directly on the weights (the sparse q/k/v's as the caller repacked them
// once, multiplicative_conv_pack).
//
// What it runs is described by the caller, per block: the q/k/v kind (dense: one fused q/k/v
// matmul and an output projection; multiplicative_conv: the Scaling Transformer's sparse q/k/v,
// no output projection) and the FFN kind (SwiGLU, or the sparse FFN), with RMSNorm before each
// and an optional rotary table (RoPE or xPos). Other components keep the module path.
//
// Rounding follows the module path: each op's output is rounded to the model's dtype, as
// PyTorch's ops return it; sums are accumulated in float32. Two exceptions, in bfloat16 models
// only: attention keeps its scores and probabilities in float32 (the modules' bfloat16
// attention rounds them), and RMSNorm rounds once, after the gain.

#include "matvec.h"
#include "multiplicative_conv.h"
#include "sparse_ffn.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace {

using stacklm::matvec_into;
using stacklm::rounded;

enum QKVKind : int64_t { kDenseQKV = 0, kMultiplicativeConv = 1 };
enum FFNKind : int64_t { kSwiGLU = 0, kSparseFFN = 1 };
// How many weights each kind takes, in this order (inference/cpu_step.py lists them; an empty
// tensor stands for a missing bias):
// - dense q/k/v: the fused q/k/v weight (H hd + 2 Hkv hd, d), its bias, the output weight (d, H hd), its bias;
// - multiplicative_conv, as multiplicative_conv_pack returns them (multiplicative_conv.h, pack):
//   D^T, E's panels, the shared layer's bias (S M), the q/k kernel's panels, their bias (2 M),
//   the v kernel's panels, their bias (M);
// - swiglu: gate and up (2 F, d), their bias, the output weight (d, F), its bias;
// - sparse FFN: the controller's C1 (R, d), C2 (d_ff, R) and its bias (d_ff), W1 (d_ff, d), its
//   bias, W2 (d_ff, d), the output bias (d).
constexpr int64_t kQKVWeights[] = {4, 7};
constexpr int64_t kFFNWeights[] = {4, 7};

// Block b's weights in all: its two norms' and its kinds' (kinds checked to be 0 or 1 first)
int64_t block_weights(at::IntArrayRef kinds, int64_t b) {
  return 2 + kQKVWeights[kinds[2 * b]] + kFFNWeights[kinds[2 * b + 1]];
}

struct Dims {
  int64_t d, n_heads, n_kv_heads, head_dim, max_len, block_size;
  double eps, q_mult, ffn_multiplier;
};

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

// F.rms_norm: x / sqrt(mean(x^2) + eps) * w, computed in float32
template <typename T>
void rms_norm(const T* x, const T* w, int64_t d, double eps, T* out) {
  float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < d; ++i) squares += static_cast<float>(x[i]) * static_cast<float>(x[i]);
  const float scale = 1.0f / std::sqrt(squares / static_cast<float>(d) + static_cast<float>(eps));
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<T>(static_cast<float>(x[i]) * scale * static_cast<float>(w[i]));
}

// position.rotate for one position: (a, b) -> (a cos - b sin, b cos + a sin) over each head's two
// halves; cos and sin (hd / 2) rows of the model's tables
template <typename T>
void rotate(T* x, int64_t n_heads, int64_t hd, const T* cos, const T* sin) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < n_heads; ++h) {
    T* a = x + h * hd;
    T* b = a + half;
    for (int64_t i = 0; i < half; ++i) {
      const float c = static_cast<float>(cos[i]), s = static_cast<float>(sin[i]);
      const float av = static_cast<float>(a[i]), bv = static_cast<float>(b[i]);
      a[i] = static_cast<T>(rounded<T>(av * c) - bv * s);  // as mul, then addcmul_, round
      b[i] = static_cast<T>(rounded<T>(bv * c) + av * s);
    }
  }
}

#ifdef __AVX512F__
// e^x for sixteen floats, x <= 0 (scores minus their maximum), within 1 ulp of e^x (checked on
// 2.25M points of [-103, 0]):
// e^x = 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2] (ln 2 in two
// parts, so that r keeps its precision), e^r by its Taylor polynomial of degree 8. Written here
// because an extension's build reaches no vector exp: ATen's (Sleef) is compiled only into
// PyTorch's per-CPU kernels, and glibc's vector expf needs -ffast-math. With std::exp, one by
// one, the exponentials were a fifth of attention's time at 100 cached positions.
inline __m512 exp16(__m512 x) {
  // below -104, e^x is 0 in float32; the clamp also keeps -inf from becoming NaN (a NaN passes on)
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2's first 16 bits
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.4286068202862268e-6f), r);     // and the rest
  constexpr float c[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f};
  __m512 p = _mm512_set1_ps(1.0f / 40320);  // 1 / k!, k = 8 ... 0 below
  for (float k : c) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(k));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);  // p 2^n
}

// out[0, width) = sum_t p[t] rows[t][0, width), width = 16 U: the sums stay in U registers, where
// add_scaled's went through memory for every key
template <int U, typename T>
inline void weighted_sum(const float* p, const T* rows, int64_t stride, int64_t n, float scale, float* out) {
  __m512 acc[U];
  for (int u = 0; u < U; ++u) acc[u] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const __m512 weight = _mm512_set1_ps(p[t]);
    for (int u = 0; u < U; ++u) acc[u] = _mm512_fmadd_ps(weight, stacklm::load16(rows + t * stride + 16 * u), acc[u]);
  }
  for (int u = 0; u < U; ++u) _mm512_storeu_ps(out + 16 * u, _mm512_mul_ps(acc[u], _mm512_set1_ps(scale)));
}
#endif

// scores[0, n) = e^(scores - their maximum); returns their sum
inline float exponentials(float* scores, int64_t n) {
  float top = -INFINITY, total = 0.0f;
  for (int64_t t = 0; t < n; ++t) top = std::max(top, scores[t]);
  int64_t t = 0;
#ifdef __AVX512F__
  __m512 sum = _mm512_setzero_ps();
  for (; t + 16 <= n; t += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + t), _mm512_set1_ps(top)));
    _mm512_storeu_ps(scores + t, e);
    sum = _mm512_add_ps(sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; t < n; ++t) total += scores[t] = std::exp(scores[t] - top);
  return total;
}

// softmax(q k^T / sqrt(hd)) v for one query over the first n_keys >= 1 cached positions; the heads are
// shared among the threads, each query head reading its group's key/value head. At the 800M
// shape (16 heads of 64) the scores sixteen keys at a time, the vector exponentials and the
// values' sums in registers took a layer from 18 to 9 us at 108 cached positions, 100 to 75 at
// 408 (float32, 2 threads).
template <typename T>
void attend(const T* q, const T* keys, const T* values, int64_t n_keys, const Dims& dims, T* out) {
  const int64_t hd = dims.head_dim, group = dims.n_heads / dims.n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  at::parallel_for(0, dims.n_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(n_keys), qf(hd), acc(hd);
    for (int64_t h = begin; h < end; ++h) {
      const int64_t kv = h / group;
      const T* k = keys + kv * dims.max_len * hd;
      const T* v = values + kv * dims.max_len * hd;
      for (int64_t i = 0; i < hd; ++i) qf[i] = static_cast<float>(q[h * hd + i]);
      stacklm::dot_products(qf.data(), k, hd, hd, n_keys, scores.data());
      for (int64_t t = 0; t < n_keys; ++t) scores[t] *= scale;
      const float inverse = 1.0f / exponentials(scores.data(), n_keys);  // the softmax's normaliser
      int64_t done = 0;  // the columns summed in registers
#ifdef __AVX512F__
      for (; done + 64 <= hd; done += 64) weighted_sum<4>(scores.data(), v + done, hd, n_keys, inverse, acc.data() + done);
      for (; done + 16 <= hd; done += 16) weighted_sum<1>(scores.data(), v + done, hd, n_keys, inverse, acc.data() + done);
#endif
      if (done < hd) {
        std::fill(acc.begin() + done, acc.end(), 0.0f);
        for (int64_t t = 0; t < n_keys; ++t) stacklm::add_scaled(acc.data() + done, scores[t] * inverse, v + t * hd + done, hd - done);
      }
      for (int64_t i = 0; i < hd; ++i) out[h * hd + i] = static_cast<T>(acc[i]);
    }
  });
}

template <typename T>
struct Step {
  const Dims& dims;
  const T* rotary;  // (4, positions, hd / 2): q cos, q sin, k cos, k sin; null without rotation
  int64_t rotary_positions, position;

  // The attention half of a block: h = norm(x) -> q, k, v -> the cache -> attention -> out (d)
  void attention(int64_t kind, const at::Tensor* w, const T* h, const at::Tensor& keys,
                 const at::Tensor& values, const at::Tensor& frames, T* out) const {
    const int64_t d = dims.d, hd = dims.head_dim, q_size = dims.n_heads * hd, kv_size = dims.n_kv_heads * hd;
    std::vector<T> qkv(q_size + 2 * kv_size), heads_out(q_size);  // q, then k, then v
    T* q = qkv.data();
    T* k = q + q_size;
    T* v = k + kv_size;
    if (kind == kDenseQKV) {
      matvec_into(h, w[0].data_ptr<T>(), data_or_null<T>(w[1]), q_size + 2 * kv_size, d, qkv.data());
    } else {  // packed D^T and E, bias, qk kernel, its bias, v kernel, its bias: w[0] ... w[6]
      const auto [S, M, Lk] = stacklm::packed_dims(d, w[0], w[1], w[3], w[5]);
      T* past = frames.data_ptr<T>();  // (Lk - 1, d), oldest first
      const stacklm::MultiplicativeConv<T> layer{h, w[0].data_ptr<T>(), w[1].data_ptr<T>(), data_or_null<T>(w[2]),
                                                 past, w[3].data_ptr<T>(), w[4].data_ptr<T>(), w[5].data_ptr<T>(),
                                                 w[6].data_ptr<T>(), d, S, M, Lk};
      std::vector<T> y(d), qk(2 * d);
      layer.run(y.data(), qk.data(), v);
      for (int64_t s = 0; s < S; ++s) {  // qk (S, 2, M) -> q, k (S M)
        std::copy_n(qk.data() + s * 2 * M, M, q + s * M);
        std::copy_n(qk.data() + s * 2 * M + M, M, k + s * M);
      }
      if (Lk > 1) {  // the frames move on by one: the oldest out, y in
        std::memmove(past, past + d, sizeof(T) * d * (Lk - 2));
        std::copy(y.begin(), y.end(), past + d * (Lk - 2));
      }
    }
    if (rotary != nullptr) {
      const int64_t half = hd / 2, table = rotary_positions * half, at = position * half;
      rotate(q, dims.n_heads, hd, rotary + at, rotary + table + at);
      rotate(k, dims.n_kv_heads, hd, rotary + 2 * table + at, rotary + 3 * table + at);
    }
    if (dims.q_mult != 1.0)
      for (int64_t i = 0; i < q_size; ++i) q[i] = static_cast<T>(static_cast<float>(q[i]) * static_cast<float>(dims.q_mult));
    T* key_cache = keys.data_ptr<T>();
    T* value_cache = values.data_ptr<T>();
    for (int64_t kv = 0; kv < dims.n_kv_heads; ++kv) {
      std::copy_n(k + kv * hd, hd, key_cache + (kv * dims.max_len + position) * hd);
      std::copy_n(v + kv * hd, hd, value_cache + (kv * dims.max_len + position) * hd);
    }
    attend(q, key_cache, value_cache, position + 1, dims, heads_out.data());
    if (kind == kDenseQKV)
      matvec_into(heads_out.data(), w[2].data_ptr<T>(), data_or_null<T>(w[3]), d, q_size, out);
    else
      std::copy(heads_out.begin(), heads_out.end(), out);
  }

  // The FFN half of a block: h = norm(x) -> out (d)
  void ffn(int64_t kind, const at::Tensor* w, const T* h, T* out) const {
    const int64_t d = dims.d;
    if (kind == kSwiGLU) {  // gate_up, its bias, out, its bias
      const int64_t f = w[0].size(0) / 2;
      std::vector<T> gate_up(2 * f), hidden(f);
      matvec_into(h, w[0].data_ptr<T>(), data_or_null<T>(w[1]), 2 * f, d, gate_up.data());
      for (int64_t i = 0; i < f; ++i) {
        const float g = static_cast<float>(gate_up[i]);
        const float silu = rounded<T>(g / (1.0f + std::exp(-g)));
        hidden[i] = static_cast<T>(silu * static_cast<float>(gate_up[f + i]));
      }
      matvec_into(hidden.data(), w[2].data_ptr<T>(), data_or_null<T>(w[3]), d, f, out);
      return;
    }
    // controller down, up, its bias; W1, its bias; W2, the output bias
    const int64_t rank = w[0].size(0), d_ff = w[3].size(0);
    const stacklm::SparseFFN<T> layer{h, w[0].data_ptr<T>(), w[1].data_ptr<T>(), w[2].data_ptr<T>(),
                                      w[3].data_ptr<T>(), data_or_null<T>(w[4]), w[5].data_ptr<T>(),
                                      d, rank, d_ff / dims.block_size, dims.block_size};
    stacklm::sparse_ffn_one(layer, out);
    const T* bias = data_or_null<T>(w[6]);
    for (int64_t i = 0; i < d; ++i) {  // SparseFFN.finish
      const float scaled = rounded<T>(static_cast<float>(out[i]) * static_cast<float>(dims.ffn_multiplier));
      out[i] = static_cast<T>(bias != nullptr ? scaled + static_cast<float>(bias[i]) : scaled);
    }
  }
};

template <typename T>
void add_into(T* x, const T* y, int64_t d) {
  for (int64_t i = 0; i < d; ++i) x[i] = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(y[i]));
}

// Whether a block's weights, caches and frames have the shapes the kinds need, checked before
// anything is written (a failure half way would leave some caches advanced)
bool block_fits(int64_t qkv_kind, int64_t ffn_kind, const at::Tensor* w, const at::Tensor& frames, const Dims& dims) {
  const int64_t d = dims.d, q = dims.n_heads * dims.head_dim, kv = dims.n_kv_heads * dims.head_dim;
  auto is = [](const at::Tensor& t, std::initializer_list<int64_t> shape) { return t.sizes() == at::IntArrayRef(shape); };
  auto bias = [](const at::Tensor& t, int64_t n) { return t.numel() == 0 || t.sizes() == at::IntArrayRef({n}); };
  if (!is(w[0], {d})) return false;
  const at::Tensor* a = w + 1;
  if (qkv_kind == kDenseQKV) {
    if (!is(a[0], {q + 2 * kv, d}) || !bias(a[1], q + 2 * kv) || !is(a[2], {d, q}) || !bias(a[3], d)) return false;
  } else {
    const auto [S, M, Lk] = stacklm::packed_dims(d, a[0], a[1], a[3], a[5]);
    if (q != d || kv != d || Lk < 1 || !bias(a[2], d) || !is(a[4], {2 * M}) || !is(a[6], {M}) ||
        !is(frames, {1, Lk - 1, d}) || !frames.is_contiguous())
      return false;
  }
  const at::Tensor* f = a + kQKVWeights[qkv_kind];
  if (!is(f[0], {d})) return false;
  f += 1;
  if (ffn_kind == kSwiGLU) {
    const int64_t hidden = f[0].size(0) / 2;
    return is(f[0], {2 * hidden, d}) && bias(f[1], 2 * hidden) && is(f[2], {d, hidden}) && bias(f[3], d);
  }
  const int64_t rank = f[0].size(0), d_ff = f[3].size(0);
  return dims.block_size > 0 && d_ff % dims.block_size == 0 && is(f[0], {rank, d}) && is(f[1], {d_ff, rank}) &&
         is(f[2], {d_ff}) && is(f[3], {d_ff, d}) && bias(f[4], d_ff) && is(f[5], {d_ff, d}) && bias(f[6], d);
}

at::Tensor decode_blocks(const at::Tensor& x, at::TensorList weights, at::TensorList keys, at::TensorList values,
                         at::TensorList frames, at::IntArrayRef kinds, const at::Tensor& rotary, int64_t position,
                         int64_t n_heads, int64_t block_size, double eps, double q_mult, double ffn_multiplier) {
  // x: (d), the token's embedding; per block b: kinds[2b] (q/k/v) and kinds[2b + 1] (FFN), its
  // weights in order (the attention norm's, the q/k/v kind's, the FFN norm's, the FFN kind's),
  // keys[b] and values[b] (1, n_kv_heads, max_len, hd), frames[b] (1, Lk - 1, d) for
  // multiplicative_conv (any tensor otherwise); rotary (4, positions, hd / 2) or empty -> (d)
  const int64_t n_blocks = static_cast<int64_t>(keys.size()), d = x.size(0);
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "decode_blocks: x must be one contiguous row");
  TORCH_CHECK(static_cast<int64_t>(values.size()) == n_blocks && static_cast<int64_t>(frames.size()) == n_blocks &&
                  static_cast<int64_t>(kinds.size()) == 2 * n_blocks,
              "decode_blocks: keys, values, frames and kinds must describe every block");
  TORCH_CHECK(n_blocks > 0 && keys[0].dim() == 4 && keys[0].size(0) == 1, "decode_blocks: caches must be (1, Hkv, max_len, hd)");
  const Dims dims{d, n_heads, keys[0].size(1), keys[0].size(3), keys[0].size(2), block_size, eps, q_mult, ffn_multiplier};
  TORCH_CHECK(n_heads % dims.n_kv_heads == 0 && position >= 0 && position < dims.max_len,
              "decode_blocks: n_heads must be a multiple of the cache's heads, and position within the cache");
  TORCH_CHECK(rotary.numel() == 0 || (rotary.dim() == 3 && rotary.size(0) == 4 && rotary.size(1) > position &&
                                      rotary.size(2) == dims.head_dim / 2 && rotary.is_contiguous() &&
                                      rotary.scalar_type() == x.scalar_type()),
              "decode_blocks: rotary must be (4, positions, hd / 2), in x's dtype, or empty");
  int64_t expected = 0;
  for (int64_t b = 0; b < n_blocks; ++b) {
    TORCH_CHECK(kinds[2 * b] >= 0 && kinds[2 * b] <= 1 && kinds[2 * b + 1] >= 0 && kinds[2 * b + 1] <= 1,
                "decode_blocks: unknown block kind");
    TORCH_CHECK(keys[b].sizes() == keys[0].sizes() && values[b].sizes() == keys[0].sizes() && keys[b].is_contiguous() &&
                    values[b].is_contiguous() && keys[b].scalar_type() == x.scalar_type() &&
                    values[b].scalar_type() == x.scalar_type(),
                "decode_blocks: every cache must be contiguous, of the same shape and in x's dtype");
    TORCH_CHECK(kinds[2 * b] != kMultiplicativeConv || frames[b].scalar_type() == x.scalar_type(),
                "decode_blocks: frames must be in x's dtype");
    expected += block_weights(kinds, b);
  }
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == expected, "decode_blocks: expected ", expected, " weights, got ",
              weights.size());
  for (const at::Tensor& t : weights)
    TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.is_contiguous(), "decode_blocks: every weight must be contiguous, in x's dtype");
  for (int64_t b = 0, at = 0; b < n_blocks; at += block_weights(kinds, b), ++b)
    TORCH_CHECK(block_fits(kinds[2 * b], kinds[2 * b + 1], weights.data() + at, frames[b], dims), "decode_blocks: block ",
                b, "'s weights or frames do not have the shapes of its kinds");
  at::Tensor hidden = x.clone();
  STACKLM_DISPATCH(x.scalar_type(), "decode_blocks", [&] {
    const bool rotates = rotary.numel() > 0;
    const Step<scalar_t> step{dims, rotates ? rotary.data_ptr<scalar_t>() : nullptr, rotates ? rotary.size(1) : 0, position};
    scalar_t* xp = hidden.data_ptr<scalar_t>();
    std::vector<scalar_t> normed(d), out(d);
    const at::Tensor* w = weights.data();  // the next block's first weight
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t qkv_kind = kinds[2 * b], ffn_kind = kinds[2 * b + 1];
      const at::Tensor* ffn_w = w + 1 + kQKVWeights[qkv_kind];  // the FFN norm's weight, then the FFN's
      rms_norm(xp, w[0].data_ptr<scalar_t>(), d, eps, normed.data());
      step.attention(qkv_kind, w + 1, normed.data(), keys[b], values[b], frames[b], out.data());
      add_into(xp, out.data(), d);
      rms_norm(xp, ffn_w[0].data_ptr<scalar_t>(), d, eps, normed.data());
      step.ffn(ffn_kind, ffn_w + 1, normed.data(), out.data());
      add_into(xp, out.data(), d);
      w += block_weights(kinds, b);
    }
  });
  return hidden;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(stacklm, m) {
  // keys, values and frames are written in place; empty tensors stand for missing biases and rotary tables
  m.def("decode_blocks(Tensor x, Tensor[] weights, Tensor(a!)[] keys, Tensor(b!)[] values, Tensor(c!)[] frames, "
        "int[] kinds, Tensor rotary, int position, int n_heads, int block_size, float eps, float q_mult, "
        "float ffn_multiplier) -> Tensor");
}

TORCH_LIBRARY_IMPL(stacklm, CPU, m) { m.impl("decode_blocks", &decode_blocks); }
