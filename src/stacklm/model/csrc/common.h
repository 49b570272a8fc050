// Helpers shared by stacklm's CPU kernels: float32 accumulation over float32 or bfloat16 inputs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif
// AMX tiles for bfloat16 products: where the compiler targets them (with the AVX-512 bfloat16
// helpers they use), on Linux, which grants a process the tiles' state on request
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define STACKLM_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <type_traits>
#include <utility>

// The kernels' dtypes: float32 and bfloat16. They accumulate in float32, too little for a float64
// model, which keeps the PyTorch path.
#define STACKLM_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace stacklm {

// v rounded to T, as a PyTorch op computing in T returns it
template <typename T>
inline float rounded(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// The loops take their pointers as restrict arguments: read through a kernel's lambda captures,
// the compiler reloaded them every iteration and vectorised with gathers (3x slower).
template <typename A, typename B>
inline float dot_product(const A* __restrict__ a, const B* __restrict__ b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += static_cast<float>(a[i]) * static_cast<float>(b[i]);
  return sum;
}

// a's dot products with 8 rows, rows[r * stride ...]: 8 independent sums keep the FMA units busy,
// where one long dot product waits on its own additions.
template <typename A, typename B>
inline void dot_products8(const A* __restrict__ a, const B* __restrict__ rows, int64_t stride, int64_t n,
                          float* __restrict__ out) {
  const B* __restrict__ r0 = rows;
  const B* __restrict__ r1 = rows + stride;
  const B* __restrict__ r2 = rows + 2 * stride;
  const B* __restrict__ r3 = rows + 3 * stride;
  const B* __restrict__ r4 = rows + 4 * stride;
  const B* __restrict__ r5 = rows + 5 * stride;
  const B* __restrict__ r6 = rows + 6 * stride;
  const B* __restrict__ r7 = rows + 7 * stride;
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(a[i]);
    s0 += v * static_cast<float>(r0[i]);
    s1 += v * static_cast<float>(r1[i]);
    s2 += v * static_cast<float>(r2[i]);
    s3 += v * static_cast<float>(r3[i]);
    s4 += v * static_cast<float>(r4[i]);
    s5 += v * static_cast<float>(r5[i]);
    s6 += v * static_cast<float>(r6[i]);
    s7 += v * static_cast<float>(r7[i]);
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3, out[4] = s4, out[5] = s5, out[6] = s6, out[7] = s7;
}

#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Sixteen floats rounded to bfloat16 as c10::BFloat16 rounds one (to nearest, ties to even; NaN to
// 0x7FC0), as the bfloat16's bits in the low half of each lane: the scalar conversion, one value
// at a time, took half of the q/k/v kernel's time in a bfloat16 model.
inline __m512i bfloat16_bits16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  const __m512i bits = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  return _mm512_mask_mov_epi32(bits, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// Sixteen floats stored as T, rounded as static_cast<T> rounds them, into U (the float32 or
// bfloat16 a kernel keeps them in)
template <typename T, typename U>
inline void store16_rounded(U* to, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(to, v);
  } else if constexpr (std::is_same_v<U, float>) {
    _mm512_storeu_ps(to, _mm512_castsi512_ps(_mm512_slli_epi32(bfloat16_bits16(v), 16)));
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), _mm512_cvtepi32_epi16(bfloat16_bits16(v)));
  }
}

// Lane u of the result is the sum of a[u]'s 16 lanes. The 16 vectors are transposed and added
// together in four rounds of shuffles: summing each one's lanes on its own (the compiler's
// reduction, through memory) cost more than the products when the dot products are short.
inline __m512 lane_sums16(const __m512* a) {
  // per 128-bit lane: pairs of vectors, then fours
  __m512 b[8], c[4];
  for (int k = 0; k < 8; ++k)
    b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(b[2 * k]), _mm512_castps_pd(b[2 * k + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(b[2 * k]), _mm512_castps_pd(b[2 * k + 1]));
    c[k] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  // lane k of c[i] holds vectors 4i..4i+3 summed over lane k: add the four lanes
  constexpr int even = 0 | (2 << 2) | (0 << 4) | (2 << 6), odd = 1 | (3 << 2) | (1 << 4) | (3 << 6);
  const __m512 e01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], even), _mm512_shuffle_f32x4(c[0], c[1], odd));
  const __m512 e23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], even), _mm512_shuffle_f32x4(c[2], c[3], odd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e01, e23, even), _mm512_shuffle_f32x4(e01, e23, odd));
}

// a's dot products with 16 rows, rows[r * stride ...], n a multiple of 16
template <typename B>
inline void dot_products16(const float* __restrict__ a, const B* __restrict__ rows, int64_t stride, int64_t n,
                           float* __restrict__ out) {
  __m512 acc[16];
  for (int u = 0; u < 16; ++u) acc[u] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_loadu_ps(a + i);
    for (int u = 0; u < 16; ++u) acc[u] = _mm512_fmadd_ps(load16(rows + u * stride + i), v, acc[u]);
  }
  _mm512_storeu_ps(out, lane_sums16(acc));
}
#endif

#ifdef __AVX512BF16__
// The same for a and rows both in bfloat16, n a multiple of 16: vdpbf16ps multiplies 32 pairs of
// bfloat16 exactly and adds them into 16 float32 sums, where widening each value to float32 first
// takes three instructions for 16 products.
inline void dot_products16(const c10::BFloat16* __restrict__ a, const c10::BFloat16* __restrict__ rows,
                           int64_t stride, int64_t n, float* __restrict__ out) {
  __m512 acc[16];
  for (int u = 0; u < 16; ++u) acc[u] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 32) {
    const __mmask32 part = n - i >= 32 ? 0xFFFFFFFFu : 0xFFFFu;  // a last 16 fill half the register
    const __m512bh v = (__m512bh)_mm512_maskz_loadu_epi16(part, a + i);
    for (int u = 0; u < 16; ++u)
      acc[u] = _mm512_dpbf16_ps(acc[u], (__m512bh)_mm512_maskz_loadu_epi16(part, rows + u * stride + i), v);
  }
  _mm512_storeu_ps(out, lane_sums16(acc));
}
constexpr bool kBFloat16Pairs = true;
#else
constexpr bool kBFloat16Pairs = false;
#endif

#ifdef STACKLM_AMX
// Whether the process may use AMX tiles: Linux gives a process the tiles' state only when asked
// (arch_prctl ARCH_REQ_XCOMP_PERM), once; without it the first tile instruction raises SIGILL.
// Where the request fails (a kernel before 5.16, a seccomp filter) the kernels keep their vector
// paths.
inline bool amx_ready() {
  static const bool ready = [] {
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ready;
}

// Tiles 0-2 as 16 rows of 64 bytes: tile 0 a 16 x 16 float32 sum, tile 1 16 rows of 32
// bfloat16 (A), tile 2 16 rows of 16 bfloat16 pairs (B); the configuration is per thread.
inline void configure_tiles() {
  struct alignas(64) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } config = {};
  static_assert(sizeof(config) == 64, "the tile configuration is 64 bytes");
  config.palette = 1;
  for (int t = 0; t < 3; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
}
constexpr bool kAmx = true;
#else
inline bool amx_ready() { return false; }
constexpr bool kAmx = false;
#endif

// The dtype a kernel keeps its own operands in for dot_products against weights of dtype T:
// bfloat16 for bfloat16 weights where the CPU multiplies bfloat16 pairs, float32 otherwise.
template <typename T>
using Operand = std::conditional_t<kBFloat16Pairs && std::is_same_v<T, c10::BFloat16>, T, float>;

// out[r] = a . rows[r], r < n_rows: sixteen at a time where AVX-512 and the length allow (a in
// float32, or a and rows in bfloat16 where the CPU multiplies bfloat16 pairs), then eight, then
// one by one
template <typename A, typename B>
inline void dot_products(const A* a, const B* rows, int64_t stride, int64_t n, int64_t n_rows, float* out) {
  int64_t r = 0;
#ifdef __AVX512F__
  if constexpr (std::is_same_v<A, float>)
    if (n % 16 == 0)
      for (; r + 16 <= n_rows; r += 16) dot_products16(a, rows + r * stride, stride, n, out + r);
#endif
#ifdef __AVX512BF16__
  if constexpr (std::is_same_v<A, c10::BFloat16> && std::is_same_v<B, c10::BFloat16>)
    if (n % 16 == 0)
      for (; r + 16 <= n_rows; r += 16) dot_products16(a, rows + r * stride, stride, n, out + r);
#endif
  for (; r + 8 <= n_rows; r += 8) dot_products8(a, rows + r * stride, stride, n, out + r);
  for (; r < n_rows; ++r) out[r] = dot_product(a, rows + r * stride, n);
}

// fn(t, shares) for t < shares = at::get_num_threads(), in parallel: each thread takes a share of
// the work, named by its index rather than by the thread that runs it (one thread may run them all)
template <typename F>
inline void for_each_share(int64_t shares, const F& fn) {
  at::parallel_for(0, shares, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) fn(t, shares);
  });
}

template <typename F>
inline void for_each_share(const F& fn) {
  for_each_share(at::get_num_threads(), fn);
}

// [begin, end) of share t of n items, in whole multiples of 8 where it can be
inline std::pair<int64_t, int64_t> share_of(int64_t n, int64_t t, int64_t shares) {
  const int64_t groups = (n + 7) / 8;
  return {std::min(n, groups * t / shares * 8), std::min(n, groups * (t + 1) / shares * 8)};
}

// Requests a row's cache lines ahead of its use. The hardware prefetcher stops at page boundaries
// (4 KB), and a row of a weight matrix is a page or two, so loops over rows ask for the ones a few
// steps ahead explicitly.
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(p + off);
}

template <typename T>
inline void add_scaled(float* __restrict__ acc, float scale, const T* __restrict__ row, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += scale * static_cast<float>(row[i]);
}

}  // namespace stacklm
