// One token through the Scaling Transformer's sparse q/k/v (model/qkv_sparse.py,
// `multiplicative_conv`): the shared multiplicative layer, then the causal convolutions over
// (position, module) for q, k and v.
//
// Each of the three is a small matrix product with the S modules as its rows: the shared layer
// y (S, M) = (x * D) (S, d) @ E^T (d, M), and each convolution out (S, O) = windows (S, Lk k M) @
// kernel^T, a window being the module's neighbours at the last Lk positions. At the 800M shape
// that is 2.4M multiply-adds on 0.6 MB of weights a layer. Unfused, a decode step runs it as about
// ten op calls (80 us a layer on a 2-core machine), their fixed costs outweighing their work.
//
// Here the weights are repacked once per sequence (`pack`) as panels of 16 output columns, each
// k's 16 values contiguous, so that a thread streams each weight once, in order, and multiplies it
// into up to 16 modules' sums kept in registers: per k (per pair of k in bfloat16 pairs) one
// vector load and a broadcast multiply-add per module, no sums across lanes. The windows are not
// built: a convolution's A operand is read from the grid of the last Lk shared outputs,
// zero-padded by one module on each side. The previous kernel took the weights in their own
// layout, as sixteen dot products per row of weights against windows it built (41 us a layer at
// the 800M shape in float32 on a 2-core Zen 5, where the weights' reads take 9). On a 2-core Xeon
// (2.6 GHz) this one took 28 us a layer with its weights in cache against 56 before (bfloat16: 35
// against 50), its products at 82-92% of the FMA units' peak, and 58-65 against 86-92 with its weights read
// from memory (bfloat16: 51-58 against 79-87); the 800M step became 1.14x faster in both dtypes.
//
// Rounding follows the unfused path: x * D, the layer's output and each convolution's output are
// rounded to the model's dtype, as its ops return them; sums are accumulated in float32. A
// bfloat16 layer keeps x * D and the grid in bfloat16 where the CPU multiplies bfloat16 pairs
// (common.h, Operand), and its panels hold pairs of consecutive k. (On the Xeon, widening the
// bfloat16 weights to float32 instead took 31 us a layer in cache against 39 with pairs, and
// 48 against 51 from memory: its vdpbf16ps retires about one every two cycles; on Zen 5, where the
// pairs made the previous kernel's step 1.07x faster, they stay.)
//
// On CPUs with AMX tiles (Sapphire Rapids and later), a bfloat16 layer whose module width is a
// multiple of 32 runs its three products on the tiles instead (`tile_multiply`): the panels of
// pairs are already the tiles' B operand, and the A operands are x * D and the grid laid out with
// the modules as rows. On the 2-core Xeon at the 800M shape this took the kernel from 35 to 18 us
// a layer with its weights in cache and from 51-58 to 40 from memory, and the bfloat16 step 1.12-1.21x
// faster. oneDNN's AMX matmul would need its own packing and an op call per product; these
// products are 16 rows by 192 to 1024 k, a few dozen tile instructions each.

#pragma once

#include "common.h"

#include <cstring>
#include <tuple>
#include <vector>

namespace stacklm {

// Values per broadcast: 2 where a layer in T multiplies bfloat16 pairs, else 1
template <typename T>
constexpr int64_t kGroup = std::is_same_v<Operand<T>, float> ? 1 : 2;

inline int64_t even(int64_t n) { return n + n % 2; }
inline int64_t panels(int64_t n) { return (n + 15) / 16; }

// b (N, K) transposed into panels of 16 columns, (panels(N), K, 16): panel p holds K / g rows of
// 16 columns of g consecutive k each (g = 1 or 2, K a multiple of g), zero past N
inline at::Tensor as_panels(const at::Tensor& b, int64_t g) {
  const int64_t N = b.size(0), K = b.size(1);
  const at::Tensor padded = at::constant_pad_nd(b, {0, 0, 0, panels(N) * 16 - N});
  return padded.reshape({panels(N), 16, K / g, g}).permute({0, 2, 1, 3}).contiguous().view({panels(N), K, 16});
}

// One term of a product's A operand: `steps` groups of g values per row, group t of row r at
// a + t * step + r * g. The rows' groups are adjacent, so that the kernel reads them at offsets
// known when it is compiled (a runtime row stride took a register per row: too many for 16 rows).
template <typename U>
struct Segment {
  const U* a;
  int64_t step, steps;
};

#ifdef __AVX512F__
// How far ahead of its use a panel's stream is requested. Each thread reads its panels in order,
// and the hardware prefetcher stops at each 4 KB page: with the weights not in cache, the kernel
// took 81 us a layer at the 800M shape in float32 without these requests, 72 at 2 KB ahead and
// 58-61 at 8 KB (106, 68 and 51 in bfloat16; 2-core Xeon, 24 layers in turn).
constexpr int64_t kPanelAhead = 8192;

// acc[r] += sum_t a[r][t] panel[t] for R rows in registers: per k, one load of the panel's 16
// values and R broadcast multiply-adds
template <int R, typename T>
inline const T* panel_fma(const Segment<Operand<T>>& s, const T* panel, __m512* acc) {
  constexpr int64_t g = kGroup<T>;
  for (int64_t t = 0; t < s.steps; ++t, panel += 16 * g) {
    _mm_prefetch(reinterpret_cast<const char*>(panel) + kPanelAhead, _MM_HINT_T0);
    const Operand<T>* a = s.a + t * s.step;
    if constexpr (g == 1) {
      const __m512 b = load16(panel);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(a[r])), b, acc[r]);
    } else {
#ifdef __AVX512BF16__
      const __m512bh b = (__m512bh)_mm512_loadu_si512(panel);
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, a + 2 * r, sizeof(pair));
        acc[r] = _mm512_dpbf16_ps(acc[r], b, (__m512bh)_mm512_set1_epi32(pair));
      }
#endif
    }
  }
  return panel;
}

// The product's rows [r0, r0 + R) for one panel, summed over the segments: store(r, out[16])
template <int R, typename T, typename Store>
inline void panel_rows(const Segment<Operand<T>>* segments, int64_t n_segments, const T* panel, int64_t r0,
                       const Store& store) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n_segments; ++i) {
    Segment<Operand<T>> s = segments[i];
    s.a += r0 * kGroup<T>;
    panel = panel_fma<R>(s, panel, acc);
  }
  float out[16];
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(out, acc[r]);
    store(r0 + r, out);
  }
}
#else
// Portable: the same loops with the 16 columns as arrays (the compiler vectorises them)
template <int R, typename T, typename Store>
inline void panel_rows(const Segment<Operand<T>>* segments, int64_t n_segments, const T* panel, int64_t r0,
                       const Store& store) {
  float acc[R][16] = {};
  for (int64_t i = 0; i < n_segments; ++i) {
    const Segment<Operand<T>>& s = segments[i];
    for (int64_t t = 0; t < s.steps; ++t, panel += 16) {
      for (int r = 0; r < R; ++r) {
        const float a = static_cast<float>(s.a[r0 + r + t * s.step]);
#pragma omp simd
        for (int c = 0; c < 16; ++c) acc[r][c] += a * static_cast<float>(panel[c]);
      }
    }
  }
  for (int r = 0; r < R; ++r) store(r0 + r, acc[r]);
}
#endif

// The product of A (rows < n_rows, given by its segments) and the panels [p0, p1):
// store(r, p, out[16]) for each row r and panel p, rows sixteen at a time where there are as many
template <typename T, typename Store>
void multiply(const Segment<Operand<T>>* segments, int64_t n_segments, int64_t n_rows, const T* weights,
              int64_t panel_size, int64_t p0, int64_t p1, const Store& store) {
  for (int64_t p = p0; p < p1; ++p) {
    const T* panel = weights + p * panel_size;
    auto row_store = [&](int64_t r, const float* out) { store(r, p, out); };
    int64_t r = 0;
    for (; r + 16 <= n_rows; r += 16) panel_rows<16>(segments, n_segments, panel, r, row_store);
    for (; r + 8 <= n_rows; r += 8) panel_rows<8>(segments, n_segments, panel, r, row_store);
    for (; r + 4 <= n_rows; r += 4) panel_rows<4>(segments, n_segments, panel, r, row_store);
    for (; r < n_rows; ++r) panel_rows<1>(segments, n_segments, panel, r, row_store);
  }
}

#ifdef STACKLM_AMX
// One term of a product's A operand on AMX tiles: `chunks` blocks of 32 bfloat16 a row, block c
// of row r at a + r * stride + c * 32 (rows past the product's are read and their sums dropped)
struct TileSegment {
  const c10::BFloat16* a;
  int64_t stride, chunks;
};

// `multiply` on AMX tiles, for bfloat16 panels of pairs: per 32 k, a tile of 16 rows of A, the
// panel's 16 rows of pairs and one tdpbf16ps into a 16 x 16 sum (8192 multiply-adds, where the
// vector path does 32 per vdpbf16ps). The panels are the tiles' B operand as they are packed.
template <typename Store>
void tile_multiply(const TileSegment* segments, int64_t n_segments, int64_t n_rows, const c10::BFloat16* weights,
                   int64_t panel_size, int64_t p0, int64_t p1, const Store& store) {
  configure_tiles();
  alignas(64) float out[16][16];
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t r0 = 0; r0 < n_rows; r0 += 16) {
      const char* b = reinterpret_cast<const char*>(weights + p * panel_size);
      _tile_zero(0);
      for (int64_t i = 0; i < n_segments; ++i) {
        const TileSegment& s = segments[i];
        for (int64_t c = 0; c < s.chunks; ++c, b += 1024) {
          for (int line = 0; line < 1024; line += 64) _mm_prefetch(b + kPanelAhead + line, _MM_HINT_T0);
          _tile_loadd(1, s.a + r0 * s.stride + c * 32, s.stride * 2);
          _tile_loadd(2, b, 64);
          _tile_dpbf16ps(0, 1, 2);
        }
      }
      _tile_stored(0, out, 64);
      for (int64_t r = r0; r < std::min(n_rows, r0 + 16); ++r) store(r, p, out[r - r0]);
    }
  }
  _tile_release();
}
#endif

// The layer's weights repacked for `MultiplicativeConv`, with d and M rounded up to even (d_2, M_2:
// zeros past d and M) so that bfloat16 pairs never straddle a row; the shapes do not depend on g:
//  - D^T (d_2, S): element (i, s) = D[s, i] at (i / g) S g + s g + i % g;
//  - E's panels (panels(M), d_2, 16): the (d_2, M) matrix E^T;
//  - the q/k kernel's panels (panels(2 M), Lk 3 M_2, 16): the matrix of rows (l, j, m) and columns
//    o, qk_w[o, m, l, j];
//  - the v kernel's (panels(M), Lk M_2, 16): rows (l, m), columns o, v_w[o, m, l, 0].
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pack(const at::Tensor& mult, const at::Tensor& weight,
                                                                       const at::Tensor& qk_w, const at::Tensor& v_w) {
  const int64_t g = mult.scalar_type() == at::kBFloat16 ? kGroup<c10::BFloat16> : kGroup<float>;
  const int64_t S = mult.size(0), d = mult.size(1), M = weight.size(0), Lk = qk_w.size(2);
  const int64_t dg = even(d), Mg = even(M);
  const at::Tensor dt = at::constant_pad_nd(mult, {0, dg - d}).view({S, dg / g, g}).permute({1, 0, 2});
  // the kernels' rows (o, l, j, m), m padded to M_2
  auto rows = [&](const at::Tensor& w) {
    return at::constant_pad_nd(w.permute({0, 2, 3, 1}), {0, Mg - M}).reshape({w.size(0), -1});
  };
  return {dt.contiguous().view({dg, S}), as_panels(at::constant_pad_nd(weight, {0, dg - d}), g), as_panels(rows(qk_w), g),
          as_panels(rows(v_w), g)};
}

// (S, M, Lk) of a layer of width d packed as `pack` packs it, or zeros where the shapes disagree
inline std::tuple<int64_t, int64_t, int64_t> packed_dims(int64_t d, const at::Tensor& mult_t, const at::Tensor& weight,
                                                         const at::Tensor& qk_w, const at::Tensor& v_w) {
  const int64_t S = mult_t.dim() == 2 ? mult_t.size(1) : 0, M = S > 0 ? d / S : 0, Mg = even(M);
  const int64_t Lk = v_w.dim() == 3 && M > 0 ? v_w.size(1) / Mg : 0;
  auto is = [](const at::Tensor& t, std::initializer_list<int64_t> shape) { return t.sizes() == at::IntArrayRef(shape); };
  if (S * M != d || Lk < 1 || !is(mult_t, {even(d), S}) || !is(weight, {panels(M), even(d), 16}) ||
      !is(qk_w, {panels(2 * M), Lk * 3 * Mg, 16}) || !is(v_w, {panels(M), Lk * Mg, 16}))
    return {0, 0, 0};
  return {S, M, Lk};
}

template <typename T>
struct MultiplicativeConv {
  const T* x;        // (d)
  const T* mult_t;   // D^T, packed
  const T* weight;   // E's panels
  const T* bias;     // (S M) or null
  const T* frames;   // the shared layer's previous outputs (Lk - 1, S M), oldest first
  const T* qk_w;     // the q/k kernel's panels
  const T* qk_b;     // (2 M)
  const T* v_w;      // the v kernel's panels
  const T* v_b;      // (M)
  int64_t d, S, M, Lk;

  static constexpr int64_t g = kGroup<T>;
  int64_t dg() const { return even(d); }
  int64_t Mg() const { return even(M); }

  // y[s M + m] = sum_i x_i D[s, i] E[m, i] (+ bias), for the units m of E's panels [p0, p1)
  void shared(int64_t p0, int64_t p1, T* y) const {
    if (p0 == p1) return;  // a share with no panels (more threads than panels)
#ifdef STACKLM_AMX
    if constexpr (std::is_same_v<T, c10::BFloat16>)
      if (tiles()) return shared_tiles(p0, p1, y);
#endif
    // x D[s] (rounded as x * D rounds it) in D^T's layout; every thread makes its own copy, in a
    // buffer kept from call to call (allocated at each, the copy took 5 us against 3)
    thread_local std::vector<Operand<T>> scaled;
    scaled.resize(dg() * S);
    std::vector<float> xf(dg(), 0.0f);
    std::copy(x, x + d, xf.begin());
    const int64_t width = S * g;  // D^T's values for x_i ... x_i+g-1, alternating between them
    for (int64_t i = 0; i < dg(); i += g) {
      const T* from = mult_t + i * S;
      Operand<T>* to = scaled.data() + i * S;
      int64_t f = 0;
#ifdef __AVX512F__
      double pair;  // (x_i, x_i+1) as one 64-bit value, repeated below (g = 2)
      std::memcpy(&pair, xf.data() + i, sizeof(pair));
      const __m512 xs = g == 1 ? _mm512_set1_ps(xf[i]) : _mm512_castpd_ps(_mm512_set1_pd(pair));
      for (; f + 16 <= width; f += 16) store16_rounded<T>(to + f, _mm512_mul_ps(xs, load16(from + f)));
#endif
      for (; f < width; ++f) to[f] = static_cast<T>(xf[i + f % g] * static_cast<float>(from[f]));
    }
    const Segment<Operand<T>> segment{scaled.data(), S * g, dg() / g};
    multiply<T>(&segment, 1, S, weight, dg() * 16, p0, p1, shared_store(y));
  }

  // y's units of panel p for module s from their sums out[16]
  auto shared_store(T* y) const {
    return [this, y](int64_t s, int64_t p, const float* out) {
      for (int64_t m = p * 16; m < std::min(M, p * 16 + 16); ++m) {
        float v = rounded<T>(out[m - p * 16]);
        if (bias != nullptr) v += static_cast<float>(bias[s * M + m]);
        y[s * M + m] = static_cast<T>(v);
      }
    };
  }

  // Rows of 16 modules for AMX tiles (zeros past S)
  int64_t tile_rows() const { return (S + 15) / 16 * 16; }

  // Whether the products run on AMX tiles: bfloat16 pairs, the CPU has tiles, and modules of a
  // multiple of 32 units (so d is one too: each 32 k of a product lie in one row of its A operand)
  bool tiles() const { return kAmx && g == 2 && M % 32 == 0 && amx_ready(); }

#ifdef STACKLM_AMX
  // `shared` on tiles: x * D with the modules as rows, (tile_rows, d_2), from D^T's pairs (one
  // gather of 16 pairs per 32 k of a module), then E's panels
  void shared_tiles(int64_t p0, int64_t p1, T* y) const {
    const int64_t pairs = dg() / 2;
    // kept from call to call, as `scaled` above; the rows past S hold whatever an earlier call left
    // there (a tile's rows are summed apart, and the sums of those rows are dropped)
    thread_local std::vector<c10::BFloat16> scaled;
    thread_local std::vector<float> even_x, odd_x;
    scaled.resize(tile_rows() * dg());
    even_x.resize(pairs), odd_x.resize(pairs);
    for (int64_t i = 0; i < d; i += 2) even_x[i / 2] = static_cast<float>(x[i]), odd_x[i / 2] = static_cast<float>(x[i + 1]);
    const int* from = reinterpret_cast<const int*>(mult_t);  // pair (i / 2) of module s at i / 2 * S + s
    const __m512i index = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(static_cast<int>(S)));
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t q = 0; q < pairs; q += 16) {
        const __m512i d_pairs = _mm512_i32gather_epi32(index, from + q * S + s, 4);
        const __m512 lo = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(d_pairs, 16)), _mm512_loadu_ps(even_x.data() + q));
        const __m512 hi = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(d_pairs, high)), _mm512_loadu_ps(odd_x.data() + q));
        const __m512i both = _mm512_or_si512(bfloat16_bits16(lo), _mm512_slli_epi32(bfloat16_bits16(hi), 16));
        _mm512_storeu_si512(scaled.data() + s * dg() + 2 * q, both);
      }
    }
    const TileSegment segment{scaled.data(), dg(), dg() / 32};
    tile_multiply(&segment, 1, S, weight, dg() * 16, p0, p1, shared_store(y));
  }

  // The convolutions' A operand on tiles: per position l, (tile_rows + 2, M_2) with module s's
  // units in row s + 1 (rows 0 and past S zero)
  std::vector<c10::BFloat16> tile_grid(const T* y) const {
    const int64_t rows = tile_rows() + 2;
    std::vector<c10::BFloat16> out(Lk * rows * Mg(), c10::BFloat16(0.0f));
    for (int64_t l = 0; l < Lk; ++l) {
      const T* from = position(l, y);
      for (int64_t s = 0; s < S; ++s) std::copy_n(from + s * M, M, out.data() + (l * rows + s + 1) * Mg());
    }
    return out;
  }

  // `conv` on tiles, from `tile_grid`
  void conv_tiles(const c10::BFloat16* grid, const T* w, const T* b, int64_t k, int64_t n_out, int64_t p0, int64_t p1,
                  T* out) const {
    std::vector<TileSegment> segments;
    const int64_t rows = tile_rows() + 2;
    for (int64_t l = 0; l < Lk; ++l)
      for (int64_t j = 0; j < k; ++j)
        segments.push_back({grid + (l * rows + grid_row(j, k)) * Mg(), Mg(), Mg() / 32});
    tile_multiply(segments.data(), static_cast<int64_t>(segments.size()), S, w, Lk * k * Mg() * 16, p0, p1, conv_store(b, n_out, out));
  }
#endif

  // Module s's neighbour j of a window of width k, module s + j - (k - 1) / 2, is in row s + grid_row(j, k)
  // of a grid (both grids hold module s in row s + 1, a zero row on each side)
  static int64_t grid_row(int64_t j, int64_t k) { return j - (k - 1) / 2 + 1; }

  // The shared layer's output at position l of the last Lk: the frames, then y (S M)
  const T* position(int64_t l, const T* y) const { return l < Lk - 1 ? frames + l * S * M : y; }

  // The A operand of the convolutions: the last Lk outputs of the shared layer (the frames, then
  // y), zero-padded by one module on each side, as (Lk, M_2 / g, S + 2, g): position l's unit m
  // of module s at ((l M_2 / g + m / g) (S + 2) + s + 1) g + m % g
  std::vector<Operand<T>> grid(const T* y) const {
    const int64_t groups = Mg() / g;
    std::vector<Operand<T>> out(Lk * groups * (S + 2) * g, Operand<T>(0.0f));
    for (int64_t l = 0; l < Lk; ++l) {
      const T* from = position(l, y);
      for (int64_t s = 0; s < S; ++s)
        for (int64_t m = 0; m < M; ++m) out[((l * groups + m / g) * (S + 2) + s + 1) * g + m % g] = from[s * M + m];
    }
    return out;
  }

  // out[s, o] = b[o] + the kernel's row o . the window of module s, for o in the panels [p0, p1)
  // of a kernel of width k over modules, n_out rows
  void conv(const Operand<T>* grid, const T* w, const T* b, int64_t k, int64_t n_out, int64_t p0, int64_t p1,
            T* out) const {
    std::vector<Segment<Operand<T>>> segments;
    const int64_t groups = Mg() / g;
    for (int64_t l = 0; l < Lk; ++l)
      for (int64_t j = 0; j < k; ++j)
        segments.push_back({grid + (l * groups * (S + 2) + grid_row(j, k)) * g, (S + 2) * g, groups});
    multiply<T>(segments.data(), static_cast<int64_t>(segments.size()), S, w, Lk * k * Mg() * 16, p0, p1,
                conv_store(b, n_out, out));
  }

  // A convolution's outputs of panel p for module s from their sums acc[16]
  static auto conv_store(const T* b, int64_t n_out, T* out) {
    return [=](int64_t s, int64_t p, const float* acc) {
      for (int64_t o = p * 16; o < std::min(n_out, p * 16 + 16); ++o)
        out[s * n_out + o] = static_cast<T>(acc[o - p * 16] + static_cast<float>(b[o]));
    };
  }

  // The whole step: y (S M), qk (S, 2 M) and v (S, M). Each thread takes a share of the output
  // panels (of E, then of the kernels), so that every weight is read once. The convolutions read
  // every module's y: a second parallel loop, in which each thread copies the grid (a few KB).
  void run(T* y, T* qk, T* v) const {
    for_each_share([&](int64_t t, int64_t shares) {
      const auto [p0, p1] = share_of_panels(panels(M), t, shares);
      shared(p0, p1, y);
    });
    for_each_share([&](int64_t t, int64_t shares) {
      const auto [q0, q1] = share_of_panels(panels(2 * M), t, shares);
      const auto [v0, v1] = share_of_panels(panels(M), t, shares);
      if (q0 == q1 && v0 == v1) return;
#ifdef STACKLM_AMX
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (tiles()) {
          const std::vector<c10::BFloat16> a = tile_grid(y);
          conv_tiles(a.data(), qk_w, qk_b, 3, 2 * M, q0, q1, qk);
          conv_tiles(a.data(), v_w, v_b, 1, M, v0, v1, v);
          return;
        }
      }
#endif
      const std::vector<Operand<T>> a = grid(y);
      conv(a.data(), qk_w, qk_b, 3, 2 * M, q0, q1, qk);
      conv(a.data(), v_w, v_b, 1, M, v0, v1, v);
    });
  }

  // [begin, end) of share t of n panels
  static std::pair<int64_t, int64_t> share_of_panels(int64_t n, int64_t t, int64_t shares) {
    return {n * t / shares, n * (t + 1) / shares};
  }
};

}  // namespace stacklm
