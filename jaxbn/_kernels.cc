// Native CPU batch norm for jaxbn as XLA FFI handlers, exposed to Python as PyCapsules.
//
// Canonical view: x comes in its own shape with two attributes, batch_dims and axis. The leading
// batch_dims axes (the ones jax.vmap adds) are independent batches B; axis holds the C features;
// the R rows are the axes between, the S inner values the axes after. Each (b, c) has its own
// statistics over its R * S values. Features-last (N, D) is R = N, S = 1; NHWC R = N*H*W, S = 1;
// NCHW R = N, S = H*W. Per-feature arrays are (B, C); gamma and beta (C) or (B, C).
//
// Handlers. The fused pair runs a whole batch in two passes each way, the fewest the math
// allows: forward reads x once for the statistics and once to write y; backward reads x and dy
// once for sum(dy) and sum(dy * (x - mean)) and once to write dx. Where a channel's values are
// long spans that fit a core's L2 (NCHW-like; ByChannel), both passes run one channel at a
// time, so that the second reads from L2.
//   jaxbn_batch_norm_forward   x, gamma, beta -> y, mean, var, inv_std, mean_low, inv_std_low
//   jaxbn_batch_norm_backward  x, dy, mean, mean_low, inv_std, inv_std_low, gamma
//                              -> dx, dgamma, dbeta
// The forward's float64 mean and inv_std reach the backward as float32 pairs (value, low: the
// rest, PutLow), exact to 48 bits: a float32 mean alone would cost dx its accuracy at large
// offsets, and recomputing the statistics in the backward's sums pass (as this file once did)
// took that pass twice the arithmetic (bfloat16 forward + backward 1.06-1.14x as long).
// The pieces, for a batch split across devices (jaxbn/_partition.py merges the per-shard results
// between them with all-reduces):
//   jaxbn_batch_norm_stats       x -> mean, var (of this shard)
//   jaxbn_batch_norm_normalize   x, mean, var, gamma, beta -> y, inv_std (global statistics)
//   jaxbn_batch_norm_grad_sums   x, dy, mean -> sum(dy), sum(dy * (x - mean)) (of this shard)
//   jaxbn_batch_norm_grad_input  x, dy, mean, inv_std, gamma, sum_dy, sum_dy_xmu -> dx
//
// Accuracy. Every sum is accumulated in float64, whatever x's dtype: float32 accumulation within
// blocks made the float32 statistics less exact than the jnp rules' (a relative error of 1e-6
// for a (64, 10) batch, against 1e-7), and no block length fixes that for every shape. float64
// costs nothing here (the passes wait on memory, not on arithmetic) and makes each statistic
// exact to its final rounding. The statistics pass also subtracts a shift K = x[b, 0, c, 0], a
// value of the same feature, so that sum(d^2)/m - (sum(d)/m)^2 with d = x - K measures the spread
// around a value inside the data: no cancellation even at offset 1e4. The elementwise passes of
// float32 (and float64) data compute in float64 too and round once, into y or dx; bfloat16 and
// float16 compute in float32, far below their own rounding.
//
// Determinism. The work is cut into blocks of rows fixed by the shape alone; each block writes
// its own partial sums and the partials are added in block order. A pass cuts its blocks into
// static ranges (by the thread count alone), whichever thread runs each, so the bits are the same
// for every call and every thread count. The ranges run on the calling thread and on XLA's own
// intra-op thread pool, the one its CPU code runs on: warm after XLA's work, and nothing of ours
// spins between calls (a std::thread started per pass, the fallback where XLA gives no pool,
// cost 17 us to start and join here, 65 us at the 90th percentile).

#include <Python.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockValues = 512;  // values per feature per block of the sums
// Below this many values per thread a call runs on the calling thread: handing work to another
// thread cost more than streaming 2 MB when threads were started per pass (0.1-1 ms on a loaded
// machine; tiny and vmapped calls 3-5x faster, 4M-value calls unchanged; experiments/README.md).
constexpr int64_t kMinValuesPerThread = 1 << 19;
// Channels per work item of the sums: rows of up to 1024 features are read whole, contiguously
// (at (4096, 1024) the sums take 0.8x the time they take in chunks of 512); the two float64
// accumulators of the backward's sums take 16 KB.
constexpr int64_t kChannelChunk = 1024;

struct BFloat16 {
  uint16_t bits;
};

inline float Load(float v) { return v; }
inline double Load(double v) { return v; }
inline float Load(_Float16 v) { return static_cast<float>(v); }
inline float Load(BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <class T, class F>
inline T Store(F v) {
  return static_cast<T>(v);
}
template <>
inline BFloat16 Store<BFloat16, float>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  // Round to nearest even, as XLA's convert; NaN stays a (quiet) NaN. Branch-free, so that the
  // loops that store bfloat16 vectorize.
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return BFloat16{static_cast<uint16_t>(nan ? quiet_nan : rounded)};
}

// The type of the elementwise arithmetic (see "Accuracy" above).
template <class T>
struct Elementwise {
  using type = double;
};
template <>
struct Elementwise<BFloat16> {
  using type = float;
};
template <>
struct Elementwise<_Float16> {
  using type = float;
};
template <class T>
using E = typename Elementwise<T>::type;

// Eight values as float64 lanes (GCC/Clang vector extensions: AVX-512, AVX2 or SSE2, whatever the
// build targets). The reductions along S and the explicit loops across channels use them: the
// compiler does not vectorize those loops well. Where the build targets AVX-512 the bfloat16
// loads and stores and the float32 <-> float64 conversions are intrinsics: GCC 12 lowers the
// generic ones 4 or 8 lanes at a time, partly through the stack, and at (64, 64, 32, 32)
// bfloat16 the passes took 1.3-1.9x as long that way. kAvx512: the build has AVX-512 F and DQ.
#if defined(__AVX512F__) && defined(__AVX512DQ__)
constexpr bool kAvx512 = true;
#else
constexpr bool kAvx512 = false;
#endif
typedef float Floats __attribute__((vector_size(32)));
typedef double Lanes4 __attribute__((vector_size(32)));
#if defined(__AVX2__) && !defined(__AVX512F__)
// AVX2 has no 64-byte registers, and GCC 12 keeps a 64-byte generic vector in memory, moving its
// lanes through general registers for every operation (most of an NCHW float32 pass's time in a
// perf profile). Here the eight float64 / sixteen float32 lanes are two 32-byte vectors, the
// same arithmetic lane by lane.
template <class H>
struct Pair {
  H lo, hi;
  auto operator[](int i) const {
    constexpr int kHalf = sizeof(H) / sizeof(lo[0]);
    return i < kHalf ? lo[i] : hi[i - kHalf];
  }
};
template <class H>
inline Pair<H> operator+(Pair<H> a, Pair<H> b) { return {a.lo + b.lo, a.hi + b.hi}; }
template <class H>
inline Pair<H> operator-(Pair<H> a, Pair<H> b) { return {a.lo - b.lo, a.hi - b.hi}; }
template <class H>
inline Pair<H> operator*(Pair<H> a, Pair<H> b) { return {a.lo * b.lo, a.hi * b.hi}; }
template <class H, class S, class = std::enable_if_t<std::is_floating_point<S>::value>>
inline Pair<H> operator+(Pair<H> a, S b) { return {a.lo + b, a.hi + b}; }
template <class H, class S, class = std::enable_if_t<std::is_floating_point<S>::value>>
inline Pair<H> operator-(Pair<H> a, S b) { return {a.lo - b, a.hi - b}; }
template <class H, class S, class = std::enable_if_t<std::is_floating_point<S>::value>>
inline Pair<H> operator*(Pair<H> a, S b) { return {a.lo * b, a.hi * b}; }
template <class H, class S, class = std::enable_if_t<std::is_floating_point<S>::value>>
inline Pair<H> operator*(S a, Pair<H> b) { return {a * b.lo, a * b.hi}; }
template <class H>
inline Pair<H>& operator+=(Pair<H>& a, Pair<H> b) {
  a.lo += b.lo;
  a.hi += b.hi;
  return a;
}
using Lanes = Pair<Lanes4>;
using Floats16 = Pair<Floats>;
#define JAXBN_PAIRS 1
#else
typedef double Lanes __attribute__((vector_size(64)));
typedef float Floats16 __attribute__((vector_size(64)));
#endif
typedef uint16_t Halves __attribute__((vector_size(16)));
typedef uint32_t Words __attribute__((vector_size(32)));
typedef _Float16 Float16s __attribute__((vector_size(16)));

// AVX2 without AVX-512: a 64-byte vector is two 32-byte registers, and the bfloat16 loads and
// stores take them half by half in intrinsics. GCC 12 compared the generic vectors' lanes one by
// one in scalar code, and moved halves through the stack: on a 2-core AMD EPYC the bfloat16
// forward took 2.2x as long at (4096, 1024) that way, the NCHW one 2.4x.
#if defined(__AVX2__) && !defined(__AVX512F__)
// Eight bfloat16 values widened to float32 (a bfloat16 is the high half of a float32).
inline __m256 WidenBf16(const BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// Store<BFloat16>'s rounding on eight float32 bit patterns, as 32-bit lanes below 2^16. The NaN
// test compares signed: the magnitude is below 2^31.
inline __m256i RoundBf16(__m256i u) {
  const __m256i high = _mm256_srli_epi32(u, 16);
  const __m256i odd = _mm256_and_si256(high, _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
  const __m256i quiet_nan = _mm256_or_si256(high, _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(rounded, quiet_nan, nan);
}
#endif

typedef uint16_t Halves16 __attribute__((vector_size(32)));
typedef uint32_t Words16 __attribute__((vector_size(64)));
typedef int32_t Ints16 __attribute__((vector_size(64)));
typedef _Float16 Float16s16 __attribute__((vector_size(32)));

// Writes v (16 or 32 bytes) to p; with stream, where p is aligned to v's size, bypassing the
// caches (a non-temporal store). An output larger than the caches is written that way
// (kStreamBytes): an ordinary store first reads every line it writes from memory, and at
// (4096, 1024) bfloat16 forward + backward took 1.2x as long, 1.1x at (64, 64, 32, 32), in rounds
// with other programs. Streamed stores are ordered only by StoreFence, which ParallelFor calls
// at the end of every range.
template <class V>
inline void StoreVector(void* p, const V& v, bool stream) {
  static_assert(sizeof(V) == 16 || sizeof(V) == 32, "a 16- or 32-byte vector");
#if defined(__AVX2__) || defined(__AVX512F__)
  if (stream && reinterpret_cast<uintptr_t>(p) % sizeof(V) == 0) {
    if constexpr (sizeof(V) == 32) {
      __m256i w;
      std::memcpy(&w, &v, sizeof w);
      _mm256_stream_si256(static_cast<__m256i*>(p), w);
    } else {
      __m128i w;
      std::memcpy(&w, &v, sizeof w);
      _mm_stream_si128(static_cast<__m128i*>(p), w);
    }
    return;
  }
#else
  (void)stream;
#endif
  std::memcpy(p, &v, sizeof v);
}
inline void StoreFence() {
#if defined(__AVX2__) || defined(__AVX512F__)
  _mm_sfence();
#endif
}
#ifdef JAXBN_PAIRS
// The same loads, stores and conversions on the two halves, in AVX2 intrinsics (a memcpy into
// the pair was copied through the stack 16 bytes at a time and stalled the loads after it).
inline Lanes Widen8(Floats f) {
  const __m256 m = (__m256)f;
  return {(Lanes4)_mm256_cvtps_pd(_mm256_castps256_ps128(m)),
          (Lanes4)_mm256_cvtps_pd(_mm256_extractf128_ps(m, 1))};
}
inline Lanes Load8(const double* p) {
  return {(Lanes4)_mm256_loadu_pd(p), (Lanes4)_mm256_loadu_pd(p + 4)};
}
inline Lanes Load8(const float* p) { return Widen8((Floats)_mm256_loadu_ps(p)); }
inline Lanes Load8(const BFloat16* p) { return Widen8((Floats)WidenBf16(p)); }
inline Lanes Load8(const _Float16* p) {
  Float16s h;
  std::memcpy(&h, p, sizeof h);
  return Widen8(__builtin_convertvector(h, Floats));
}
inline Floats16 Load16(const float* p) {
  return {(Floats)_mm256_loadu_ps(p), (Floats)_mm256_loadu_ps(p + 8)};
}
inline Floats16 Load16(const BFloat16* p) {
  return {(Floats)WidenBf16(p), (Floats)WidenBf16(p + 8)};
}
inline Floats16 Load16(const _Float16* p) {
  Float16s low, high;
  std::memcpy(&low, p, sizeof low);
  std::memcpy(&high, p + 8, sizeof high);
  return {__builtin_convertvector(low, Floats), __builtin_convertvector(high, Floats)};
}
inline void Widen(Floats16 v, Lanes* low, Lanes* high) {
  *low += Widen8(v.lo);
  *high += Widen8(v.hi);
}
inline void Store16(BFloat16* p, Floats16 v, bool stream = false) {
  // packus keeps the lanes (all below 2^16) and interleaves the halves' 128-bit blocks; the
  // permutation puts them back in order.
  const __m256i low = RoundBf16((__m256i)v.lo), high = RoundBf16((__m256i)v.hi);
  StoreVector(p, _mm256_permute4x64_epi64(_mm256_packus_epi32(low, high), 0xd8), stream);
}
inline void Store16(_Float16* p, Floats16 v, bool stream = false) {
  StoreVector(p, __builtin_convertvector(v.lo, Float16s), stream);
  StoreVector(p + 8, __builtin_convertvector(v.hi, Float16s), stream);
}
inline void Store8(float* p, Lanes v, bool stream = false) {
  const __m128 low = _mm256_cvtpd_ps((__m256d)v.lo), high = _mm256_cvtpd_ps((__m256d)v.hi);
  StoreVector(p, _mm256_set_m128(high, low), stream);
}
#else
inline Lanes Load8(const double* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline Lanes Load8(const float* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<Lanes>(_mm512_cvtps_pd(_mm256_loadu_ps(p)));
#else
  Floats v;
  std::memcpy(&v, p, sizeof v);
  return __builtin_convertvector(v, Lanes);
#endif
}
inline Lanes Load8(const BFloat16* p) {
  Halves h;
  std::memcpy(&h, p, sizeof h);
  const Words w = __builtin_convertvector(h, Words) << 16;
  Floats f;
  std::memcpy(&f, &w, sizeof f);
  return __builtin_convertvector(f, Lanes);
}
inline Lanes Load8(const _Float16* p) {
  Float16s h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(__builtin_convertvector(h, Floats), Lanes);
}
// Sixteen bfloat16/float16 values as float32 lanes, and a float32 vector added into two float64 ones.


inline Floats16 Load16(const BFloat16* p) {
#if defined(__AVX512F__)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return reinterpret_cast<Floats16>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
  Halves16 h;
  std::memcpy(&h, p, sizeof h);
  const Words16 w = __builtin_convertvector(h, Words16) << 16;
  Floats16 f;
  std::memcpy(&f, &w, sizeof f);
  return f;
#endif
}
inline Floats16 Load16(const _Float16* p) {
  Float16s16 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, Floats16);
}
inline void Widen(Floats16 v, Lanes* low, Lanes* high) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  const __m512 m = reinterpret_cast<__m512>(v);
  *low += reinterpret_cast<Lanes>(_mm512_cvtps_pd(_mm512_castps512_ps256(m)));
  *high += reinterpret_cast<Lanes>(_mm512_cvtps_pd(_mm512_extractf32x8_ps(m, 1)));
#else
  Floats a, b;
  std::memcpy(&a, &v, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof a, sizeof b);
  *low += __builtin_convertvector(a, Lanes);
  *high += __builtin_convertvector(b, Lanes);
#endif
}
inline Floats16 Load16(const float* p) {
  Floats16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// Sixteen float32 values stored as bfloat16 (the rounding of Store<BFloat16>, lane-parallel) or
// float16.
inline void Store16(BFloat16* p, Floats16 v, bool stream = false) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  // One instruction with the same rounding, except that it flushes subnormal inputs to zero:
  // a vector holding one takes the integer path below.
  const __m512i bits = reinterpret_cast<__m512i>(v);
  const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
  const __mmask16 subnormal = _mm512_cmplt_epu32_mask(
      _mm512_sub_epi32(magnitude, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x007fffff));
  if (subnormal == 0) {
    StoreVector(p, _mm512_cvtneps_pbh(reinterpret_cast<__m512>(v)), stream);
    return;
  }
#endif
  Words16 u;
  std::memcpy(&u, &v, sizeof u);
  const Words16 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const Words16 quiet_nan = (u >> 16) | 0x40u;
  // A signed comparison (the magnitude is below 2^31): x86 has no unsigned one before AVX-512,
  // and GCC then compares lane by lane in scalar code.
  const Words16 nan = (Words16)((Ints16)(u & 0x7fffffffu) > 0x7f800000);
  StoreVector(p, __builtin_convertvector((quiet_nan & nan) | (rounded & ~nan), Halves16), stream);
}
inline void Store16(_Float16* p, Floats16 v, bool stream = false) {
  StoreVector(p, __builtin_convertvector(v, Float16s16), stream);
}
// Eight float64 values rounded to float32 and stored.
inline void Store8(float* p, Lanes v, bool stream = false) {
#if defined(__AVX512F__)
  StoreVector(p, _mm512_cvtpd_ps(reinterpret_cast<__m512d>(v)), stream);
#else
  StoreVector(p, __builtin_convertvector(v, Floats), stream);
#endif
}
#endif  // JAXBN_PAIRS
inline double Total(Lanes v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// The fused epilogue y = relu(z + r) (z the affine output, r the residual) and, in the backward,
// dz = dy * [y > 0] on the forward's stored output y: the jnp rules' test, so both paths mask the
// same entries. ReLU keeps NaN, as jnp.maximum(z, 0) does. Scalars and vectors alike.
// Scalars select by masking their bits (a data-dependent branch here mispredicts on half the
// values of a ReLU: measured 4.5x slower); vectors select lane-wise.
inline float Keep(float v, bool keep) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  u &= 0u - static_cast<uint32_t>(keep);
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline double Keep(double v, bool keep) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  u &= uint64_t{0} - static_cast<uint64_t>(keep);
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline float Relu(float v) { return Keep(v, !(v < 0.0f)); }
inline double Relu(double v) { return Keep(v, !(v < 0.0)); }
template <class V>
inline V Relu(V v) {
  const V zero = {};
  return v < zero ? zero : v;
}
// g where y > 0, else 0, lane by lane.
template <class V>
inline V WherePositive(V y, V g) {
  const V zero = {};
  return y > zero ? g : zero;
}
#ifdef JAXBN_PAIRS
template <class H>
inline Pair<H> Relu(Pair<H> v) { return {Relu(v.lo), Relu(v.hi)}; }
template <class H>
inline Pair<H> WherePositive(Pair<H> y, Pair<H> g) {
  return {WherePositive(y.lo, g.lo), WherePositive(y.hi, g.hi)};
}
#endif
template <bool kRes, bool kRelu, class F, class T>
inline F Finish(F z, const T* r, int64_t i) {
  if constexpr (kRes) z += static_cast<F>(Load(r[i]));
  if constexpr (kRelu) z = Relu(z);
  return z;
}
template <bool kRes, bool kRelu, class T>
inline Floats16 Finish16(Floats16 z, const T* r) {
  if constexpr (kRes) z += Load16(r);
  if constexpr (kRelu) z = Relu(z);
  return z;
}
template <bool kRes, bool kRelu, class T>
inline Lanes Finish8(Lanes z, const T* r) {
  if constexpr (kRes) z += Load8(r);
  if constexpr (kRelu) z = Relu(z);
  return z;
}
template <bool kMask, class T>
inline auto DzAt(const T* dy, const T* y, int64_t i) {
  const auto g = Load(dy[i]);
  if constexpr (kMask) return Keep(g, Load(y[i]) > 0);
  else return g;
}
template <bool kMask, class T>
inline Floats16 Dz16(const T* dy, const T* y) {
  const Floats16 g = Load16(dy);
  if constexpr (kMask) return WherePositive(Load16(y), g);
  else return g;
}
template <bool kMask, class T>
inline Lanes Dz8(const T* dy, const T* y) {
  const Lanes g = Load8(dy);
  if constexpr (kMask) return WherePositive(Load8(y), g);
  else return g;
}

// Calls fn(std::bool_constant<a>{}, std::bool_constant<b>{}): one instantiation per case.
template <class Fn>
void Cases(bool a, bool b, Fn fn) {
  if (a && b) fn(std::true_type{}, std::true_type{});
  else if (a) fn(std::true_type{}, std::false_type{});
  else if (b) fn(std::false_type{}, std::true_type{});
  else fn(std::false_type{}, std::false_type{});
}

struct Shape {
  int64_t batches, rows, channels, inner;  // B, R, C, S
  int64_t values() const { return rows * inner; }  // per statistic
  int64_t stats() const { return batches * channels; }
  int64_t block_rows() const { return std::max<int64_t>(1, kBlockValues / inner); }
  int64_t blocks() const { return (rows + block_rows() - 1) / block_rows(); }
  int64_t row_size() const { return channels * inner; }
};

// Whether an elementwise pass writes its x-shaped outputs with streaming stores (StoreVector):
// where one is at least kStreamBytes, larger than most caches' share of one call.
constexpr int64_t kStreamBytes = int64_t{8} << 20;
template <class T>
bool Streams(const Shape& sh) {
  return sh.batches * sh.rows * sh.row_size() * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
}

// x's own dimensions (no reshape: a reshape before a custom call can make XLA copy x into the
// layout the call asks for) as (B, R, C, S), the features at `axis`, `batch_dims` leading batches.
bool ToShape(ffi::AnyBuffer::Dimensions dims, int64_t batch_dims, int64_t axis, Shape* shape) {
  const int64_t rank = static_cast<int64_t>(dims.size());
  if (batch_dims < 0 || axis < batch_dims || axis >= rank) return false;
  auto product = [&](int64_t begin, int64_t end) {
    int64_t p = 1;
    for (int64_t i = begin; i < end; ++i) p *= dims[i];
    return p;
  };
  *shape = Shape{product(0, batch_dims), product(batch_dims, axis), dims[axis],
                 product(axis + 1, rank)};
  return shape->batches > 0 && shape->rows > 0 && shape->channels > 0 && shape->inner > 0;
}

int NumThreads() {
  static const int hardware = std::max(1u, std::thread::hardware_concurrency());
  const char* env = std::getenv("JAXBN_NUM_THREADS");
  int n = env ? std::atoi(env) : hardware;
  return std::max(1, n);
}

// XLA's intra-op thread pool of the running handler (set by PoolScope), or none.
thread_local ffi::ThreadPool* current_pool = nullptr;

struct PoolScope {
  explicit PoolScope(ffi::ThreadPool& pool) : saved(current_pool) {
    if (pool.num_threads() > 0) current_pool = &pool;  // 0: XLA gave this call no pool
  }
  ~PoolScope() { current_pool = saved; }
  ffi::ThreadPool* saved;
};

// Runs run(0), ..., run(ranges - 1), each once, on the calling thread and on XLA's pool. The
// caller claims ranges too and waits only for ranges some thread has claimed, so it never waits
// on a task still queued behind busy pool threads; a task that starts after all ranges are claimed
// returns without touching run (the shared counters outlive the call). An exception (only
// allocation can throw) terminates, as it did on a std::thread, never leaving ranges running.
void RunRanges(int ranges, const std::function<void(int)>& run) noexcept {
  struct Claims {
    std::atomic<int> next{0}, done{0};
    std::mutex mutex;
    std::condition_variable all_done;
  };
  auto claims = std::make_shared<Claims>();
  auto work = [claims, ranges, &run]() noexcept {
    for (int r; (r = claims->next.fetch_add(1)) < ranges;) {
      run(r);
      if (claims->done.fetch_add(1) + 1 == ranges) {
        std::lock_guard<std::mutex> lock(claims->mutex);
        claims->all_done.notify_all();
      }
    }
  };
  if (current_pool != nullptr) {
    for (int t = 1; t < ranges; ++t) current_pool->Schedule([work] { work(); });
    work();
  } else {
    std::vector<std::thread> pool;
    for (int t = 1; t < ranges; ++t) pool.emplace_back(work);
    work();
    for (auto& thread : pool) thread.join();
  }
  std::unique_lock<std::mutex> lock(claims->mutex);
  claims->all_done.wait(lock, [&] { return claims->done.load() == ranges; });
}

// Runs body(first, last) over [0, items) cut into static contiguous ranges, one per thread used.
template <class Body>
void ParallelFor(int64_t items, int64_t values_per_item, Body body) {
  int64_t by_work = std::max<int64_t>(1, items * values_per_item / kMinValuesPerThread);
  int threads = static_cast<int>(std::min<int64_t>({NumThreads(), items, by_work}));
  if (threads <= 1) {
    body(int64_t{0}, items);
    StoreFence();
    return;
  }
  RunRanges(threads, [&](int t) {
    body(items * t / threads, items * (t + 1) / threads);
    StoreFence();
  });
}

// N per-(b, c) sums over all rows, in float64. A work item is one block of rows of one chunk of
// channels (the chunk bounds the accumulators and gives wide, short inputs parallelism);
// rows(b, r0, r1, c0, c1, acc) adds rows [r0, r1) of channels [c0, c1) into acc[i][0, c1 - c0).
// Each item's partials go to their own slot and are added in block order.
template <int N, class Rows>
std::array<std::vector<double>, N> Sums(const Shape& sh, Rows rows) {
  const int64_t blocks = sh.blocks(), rows_per = sh.block_rows(), C = sh.channels;
  const int64_t chunks = (C + kChannelChunk - 1) / kChannelChunk, width = std::min(C, kChannelChunk);
  std::vector<double> part(N * sh.batches * blocks * C);
  const int64_t slots = sh.batches * blocks * C;
  // The work of an item is its rows' values (a batch shorter than a block fills it partly).
  const int64_t item_values = std::min(rows_per, sh.rows) * sh.inner * width;
  ParallelFor(sh.batches * blocks * chunks, item_values, [&](int64_t lo, int64_t hi) {
    std::vector<double> acc(N * width);
    double* lanes[N];
    for (int i = 0; i < N; ++i) lanes[i] = acc.data() + i * width;
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t chunk = item % chunks, bk = item / chunks;
      const int64_t b = bk / blocks, k = bk % blocks;
      const int64_t c0 = chunk * kChannelChunk, c1 = std::min(C, c0 + kChannelChunk);
      std::fill(acc.begin(), acc.end(), 0.0);
      rows(b, k * rows_per, std::min(sh.rows, (k + 1) * rows_per), c0, c1, lanes);
      for (int i = 0; i < N; ++i)
        std::copy(lanes[i], lanes[i] + (c1 - c0), part.begin() + i * slots + bk * C + c0);
    }
  });
  std::array<std::vector<double>, N> out;
  for (int i = 0; i < N; ++i) {
    out[i].assign(sh.stats(), 0.0);
    for (int64_t b = 0; b < sh.batches; ++b)
      for (int64_t k = 0; k < blocks; ++k)
        for (int64_t c = 0; c < C; ++c) out[i][b * C + c] += part[i * slots + (b * blocks + k) * C + c];
  }
  return out;
}

// The sums below add values in groups (four rows, or four vectors along s) in the elementwise
// type G = E<T>, then the group's sum into float64. For float32 and float64 data G is float64.
// For bfloat16 and float16 data G is float32, in which x - K (8 or 11 significant bits) and its
// square are exact and a group of four sums with at most one rounding: the float64 totals stay
// exact to a few float32 roundings per group, and the conversions run at 16 values per vector.

// Wide<G>: explicit vectors of G, for the sums here and the elementwise passes (kExplicit below).
// StatsRows' S == 1 sums run across channels a vector at a time, explicitly: 16 float32 lanes
// for bfloat16/float16 data, 8 float64 lanes for float32/float64. With AVX-512 the compiler's
// own vectorization of the scalar loop converts 4 values at a time and takes 1.2x as long at
// (4096, 1024); without AVX-512 these 64-byte vectors are split and take 2x as long as the
// compiler's loop, which then does the work (kAvx512). Add(acc, v) adds v into acc[0, kWidth)
// in float64; AddSquares(sum, square_sum, d) adds d and d * d, squared in float64.
template <class G>
struct Wide;
template <>
struct Wide<double> {
  using V = Lanes;
  static constexpr int64_t kWidth = 8;
  template <class T>
  static V Get(const T* p) { return Load8(p); }
  static void Add(double* acc, V v) {
    const Lanes sum = Load8(acc) + v;
    std::memcpy(acc, &sum, sizeof sum);
  }
  static void AddSquares(double* sum, double* square_sum, V d) {
    Add(sum, d);
    Add(square_sum, d * d);
  }
  template <bool kMask, class T>
  static V Dz(const T* dy, const T* y) { return Dz8<kMask>(dy, y); }
  template <bool kRes, bool kRelu, class T>
  static V Finish(V z, const T* r) { return Finish8<kRes, kRelu>(z, r); }
  static void Set(float* p, V v, bool stream) { Store8(p, v, stream); }
};
template <>
struct Wide<float> {
  using V = Floats16;
  static constexpr int64_t kWidth = 16;
  template <class T>
  static V Get(const T* p) { return Load16(p); }
  static void Add(double* acc, V v) {
    Lanes low = Load8(acc), high = Load8(acc + 8);
    Widen(v, &low, &high);
    std::memcpy(acc, &low, sizeof low);
    std::memcpy(acc + 8, &high, sizeof high);
  }
  // sum += d and square_sum += d * d, d widened first (as the scalar loop of single rows).
  static void AddSquares(double* sum, double* square_sum, V d) {
    Lanes low = {}, high = {};
    Widen(d, &low, &high);
    Wide<double>::AddSquares(sum, square_sum, low);
    Wide<double>::AddSquares(sum + 8, square_sum + 8, high);
  }
  template <bool kMask, class T>
  static V Dz(const T* dy, const T* y) { return Dz16<kMask>(dy, y); }
  template <bool kRes, bool kRelu, class T>
  static V Finish(V z, const T* r) { return Finish16<kRes, kRelu>(z, r); }
  template <class T>
  static void Set(T* p, V v, bool stream) { Store16(p, v, stream); }
};

// Whether T's elementwise passes run in explicit vectors of Wide<E<T>>: bfloat16 and float16 data
// 16 float32 lanes at a time (the compiler's vectorization of the scalar conversions is several
// times slower), float32 with AVX-512 8 float64 lanes (the compiler's loop took 1.1x as long at
// (4096, 1024)); float64 is left to the compiler. Get, Dz, Finish and Set: loads, the masked
// cotangent, the epilogue and the (streaming, where asked) store, kWidth lanes each.
template <class T>
constexpr bool kExplicit =
    std::is_same<E<T>, float>::value || (std::is_same<T, float>::value && kAvx512);

// The grouped S == 1 sums below read four rows at once: per input, four streams a row
// apart, which the hardware prefetchers follow poorly (a test loop over (4096, 1024) bfloat16 x
// and dy, two threads, read 13-14 GB/s that way against 20 GB/s one row at a time, and 18 GB/s
// with these requests; one row at a time costs twice the float64 additions). Ahead asks for the
// same columns kAheadRows rows further down, one request per cache line of each row; rows past
// the batch's last are not asked for.
constexpr int64_t kAheadRows = 8;
template <class T>
constexpr int64_t kLineValues = 64 / sizeof(T);
template <class T>
inline void Ahead(const T* p, int64_t stride) {
  for (int i = 0; i < 4; ++i) __builtin_prefetch(p + (kAheadRows + i) * stride);
}

// StatsRows' S == 1 sums over channels [0, wide), grouped as its scalar loop; returns wide.
template <class T, class G>
int64_t StatsWide(const T* x, int64_t stride, int64_t r0, int64_t r1, int64_t rows, int64_t n,
                  const G* shift, double* sum, double* square_sum) {
  if (!kAvx512) return 0;
  using W = Wide<G>;
  using V = typename W::V;
  const int64_t wide = n / W::kWidth * W::kWidth;
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const T* p = x + r * stride;
    const bool ahead = r + kAheadRows + 4 <= rows;
    for (int64_t c = 0; c < wide; c += W::kWidth) {
      if (ahead && c % kLineValues<T> == 0) Ahead(p + c, stride);
      const V k = W::Get(shift + c);
      const V d0 = W::Get(p + c) - k, d1 = W::Get(p + stride + c) - k;
      const V d2 = W::Get(p + 2 * stride + c) - k, d3 = W::Get(p + 3 * stride + c) - k;
      W::Add(sum + c, (d0 + d1) + (d2 + d3));
      W::Add(square_sum + c, (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3));
    }
  }
  for (; r < r1; ++r)
    for (int64_t c = 0; c < wide; c += W::kWidth)
      W::AddSquares(sum + c, square_sum + c, W::Get(x + r * stride + c) - W::Get(shift + c));
  return wide;
}

// sum(x - K) and sum((x - K)^2) over rows [r0, r1) of channels [c0, c1). S == 1 (features last)
// vectorizes across channels, four rows at a time; S > 1 along s.
template <class T>
void StatsRows(const Shape& sh, const T* x, int64_t b, int64_t r0, int64_t r1, int64_t c0,
               int64_t c1, const E<T>* __restrict shift, double* __restrict sum,
               double* __restrict square_sum) {
  using G = E<T>;
  const int64_t n = c1 - c0, S = sh.inner, stride = sh.row_size();
  const T* base = x + (b * sh.rows * sh.channels + c0) * S;
  if (S == 1) {
    const int64_t wide = StatsWide(base, stride, r0, r1, sh.rows, n, shift, sum, square_sum);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
      const T* __restrict p0 = base + r * stride;
      const T* __restrict p1 = p0 + stride;
      const T* __restrict p2 = p1 + stride;
      const T* __restrict p3 = p2 + stride;
      const bool ahead = r + kAheadRows + 4 <= sh.rows;
      for (int64_t line = wide; line < n; line += kLineValues<T>) {
        if (ahead) Ahead(p0 + line, stride);
        for (int64_t c = line; c < std::min(n, line + kLineValues<T>); ++c) {
          const G d0 = Load(p0[c]) - shift[c], d1 = Load(p1[c]) - shift[c];
          const G d2 = Load(p2[c]) - shift[c], d3 = Load(p3[c]) - shift[c];
          sum[c] += static_cast<double>((d0 + d1) + (d2 + d3));
          square_sum[c] += static_cast<double>((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3));
        }
      }
    }
    for (; r < r1; ++r) {
      const T* __restrict p = base + r * stride;
      for (int64_t c = wide; c < n; ++c) {
        const double d = static_cast<double>(Load(p[c]) - shift[c]);
        sum[c] += d;
        square_sum[c] += d * d;
      }
    }
    return;
  }
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = 0; c < n; ++c) {
      const T* __restrict p = base + r * stride + c * S;
      const G k = shift[c];
      Lanes a1 = {}, b1 = {}, a2 = {}, b2 = {};
      int64_t s = 0;
      if constexpr (std::is_same<G, float>::value) {
        for (; s + 64 <= S; s += 64) {
          const Floats16 d0 = Load16(p + s) - k, d1 = Load16(p + s + 16) - k;
          const Floats16 d2 = Load16(p + s + 32) - k, d3 = Load16(p + s + 48) - k;
          Widen((d0 + d1) + (d2 + d3), &a1, &b1);
          Widen((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3), &a2, &b2);
        }
      }
      const double k64 = k;
      for (; s + 16 <= S; s += 16) {
        const Lanes d0 = Load8(p + s) - k64, d1 = Load8(p + s + 8) - k64;
        a1 += d0;
        b1 += d1;
        a2 += d0 * d0;
        b2 += d1 * d1;
      }
      double t1 = Total(a1 + b1), t2 = Total(a2 + b2);
      for (; s < S; ++s) {
        const double d = Load(p[s]) - k64;
        t1 += d;
        t2 += d * d;
      }
      sum[c] += t1;
      square_sum[c] += t2;
    }
}

// The backward's sums pass: sum(dz) and sum(dz * (x - K)) with dz = dy, or with kMask dy
// masked by the forward's ReLU output y (DzAt; y is not read otherwise), laid out and grouped
// as in StatsRows. center: K, a value near the batch mean (GradSums corrects for the rest).
template <class T, bool kMask>
void BackwardRows(const Shape& sh, const T* x, const T* dy, const T* y, int64_t b, int64_t r0,
                  int64_t r1, int64_t c0, int64_t c1, const E<T>* __restrict center,
                  double* __restrict sum_dz, double* __restrict sum_dz_xmu) {
  using G = E<T>;
  const int64_t n = c1 - c0, S = sh.inner, stride = sh.row_size();
  const int64_t offset = (b * sh.rows * sh.channels + c0) * S;
  if (S == 1) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
      const T* __restrict x0 = x + offset + r * stride;
      const T* __restrict g0 = dy + offset + r * stride;
      const T* __restrict y0 = y + offset + r * stride;
      const bool ahead = r + kAheadRows + 4 <= sh.rows;
      for (int64_t line = 0; line < n; line += kLineValues<T>) {
        if (ahead) {
          Ahead(x0 + line, stride);
          Ahead(g0 + line, stride);
          if constexpr (kMask) Ahead(y0 + line, stride);
        }
        for (int64_t c = line; c < std::min(n, line + kLineValues<T>); ++c) {
          const G k = center[c];
          const G d0 = Load(x0[c]) - k, d1 = Load(x0[c + stride]) - k;
          const G d2 = Load(x0[c + 2 * stride]) - k, d3 = Load(x0[c + 3 * stride]) - k;
          const G a0 = DzAt<kMask>(g0, y0, c), a1 = DzAt<kMask>(g0, y0, c + stride);
          const G a2 = DzAt<kMask>(g0, y0, c + 2 * stride);
          const G a3 = DzAt<kMask>(g0, y0, c + 3 * stride);
          sum_dz[c] += static_cast<double>((a0 + a1) + (a2 + a3));
          sum_dz_xmu[c] += static_cast<double>((a0 * d0 + a1 * d1) + (a2 * d2 + a3 * d3));
        }
      }
    }
    for (; r < r1; ++r) {
      const T* __restrict xr = x + offset + r * stride;
      const T* __restrict gr = dy + offset + r * stride;
      const T* __restrict yr = y + offset + r * stride;
      for (int64_t c = 0; c < n; ++c) {
        const double d = static_cast<double>(Load(xr[c]) - center[c]), g = DzAt<kMask>(gr, yr, c);
        sum_dz[c] += g;
        sum_dz_xmu[c] += g * d;
      }
    }
    return;
  }
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = 0; c < n; ++c) {
      const T* __restrict px = x + offset + r * stride + c * S;
      const T* __restrict pg = dy + offset + r * stride + c * S;
      const T* __restrict py = y + offset + r * stride + c * S;
      const G k = center[c];
      Lanes l[4] = {};
      int64_t s = 0;
      if constexpr (std::is_same<G, float>::value) {
        for (; s + 64 <= S; s += 64) {
          const Floats16 d0 = Load16(px + s) - k, d1 = Load16(px + s + 16) - k;
          const Floats16 d2 = Load16(px + s + 32) - k, d3 = Load16(px + s + 48) - k;
          const Floats16 g0 = Dz16<kMask>(pg + s, py + s), g1 = Dz16<kMask>(pg + s + 16, py + s + 16);
          const Floats16 g2 = Dz16<kMask>(pg + s + 32, py + s + 32);
          const Floats16 g3 = Dz16<kMask>(pg + s + 48, py + s + 48);
          Widen((g0 + g1) + (g2 + g3), &l[0], &l[1]);
          Widen((g0 * d0 + g1 * d1) + (g2 * d2 + g3 * d3), &l[2], &l[3]);
        }
      }
      const double k64 = k;
      for (; s + 8 <= S; s += 8) {
        const Lanes d = Load8(px + s) - k64, g = Dz8<kMask>(pg + s, py + s);
        l[0] += g;
        l[2] += g * d;
      }
      double t[2] = {Total(l[0] + l[1]), Total(l[2] + l[3])};
      for (; s < S; ++s) {
        const double d = Load(px[s]) - k64, g = DzAt<kMask>(pg, py, s);
        t[0] += g;
        t[1] += g * d;
      }
      sum_dz[c] += t[0];
      sum_dz_xmu[c] += t[1];
    }
}

// The batch mean and biased variance from sums of d = x - shift over m values.
inline void Moments(double shift, double sum, double square_sum, double m, double* mean,
                    double* var) {
  const double d_mean = sum / m;
  *var = std::max(0.0, square_sum / m - d_mean * d_mean);
  *mean = shift + d_mean;
}

// gamma and beta's index for statistic i = (b, c).
inline int64_t ParamIndex(const Shape& sh, int64_t i, int64_t param_stride) {
  return (i / sh.channels) * param_stride + i % sh.channels;
}

// Per-(b, c) coefficients of an elementwise pass, in its arithmetic type.
template <class T>
struct Coefficients {
  std::vector<E<T>> mean, a, k1, k2;
  explicit Coefficients(int64_t n) : mean(n), a(n), k1(n), k2(n) {}
  // y = (x - mean) * a + k1 with a = gamma * inv_std, k1 = beta; returns inv_std.
  template <class F>
  double SetForward(int64_t i, double mu, double var, F gamma, F beta, double eps) {
    const double inv_std = 1.0 / std::sqrt(var + eps);
    mean[i] = static_cast<E<T>>(mu);
    a[i] = static_cast<E<T>>(static_cast<double>(gamma) * inv_std);
    k1[i] = static_cast<E<T>>(beta);
    return inv_std;
  }
  // dx = a * dy + k1 + (x - mean) * k2 from the global sums over m values: a = gamma * inv_std,
  // k1 = -a * sum_dy / m, k2 = -a * inv_std^2 * sum_dy_xmu / m (jaxbn/_normalize.py alt_rule).
  template <class F>
  void SetBackward(int64_t i, double mu, double inv_std, F gamma, double sum_dy,
                   double sum_dy_xmu, double m) {
    const double ai = static_cast<double>(gamma) * inv_std;
    mean[i] = static_cast<E<T>>(mu);
    a[i] = static_cast<E<T>>(ai);
    k1[i] = static_cast<E<T>>(-ai * sum_dy / m);
    k2[i] = static_cast<E<T>>(-ai * inv_std * inv_std * sum_dy_xmu / m);
  }
};

// q[0, S) = (p - mu) * a + k1, then the epilogue (r: the residual, not read without kRes).
template <class T, bool kRes, bool kRelu>
void NormalizeSpan(const T* __restrict p, const T* __restrict r, T* __restrict q, int64_t S,
                   E<T> mu, E<T> a, E<T> k1, bool stream) {
  using F = E<T>;
  int64_t s = 0;
  if constexpr (kExplicit<T>) {
    using W = Wide<F>;
    for (; s + W::kWidth <= S; s += W::kWidth)
      W::Set(q + s, W::template Finish<kRes, kRelu>((W::Get(p + s) - mu) * a + k1, r + s), stream);
  }
  for (; s < S; ++s) q[s] = Store<T, F>(Finish<kRes, kRelu>((Load(p[s]) - mu) * a + k1, r, s));
}

// q[0, S) = a * dz + k1 + (x - mu) * k2 with dz = dy, or dy masked by y with kMask (written to
// z with kDz).
template <class T, bool kMask, bool kDz>
void GradSpan(const T* __restrict px, const T* __restrict pg, const T* __restrict py,
              T* __restrict pz, T* __restrict q, int64_t S, E<T> mu, E<T> a, E<T> k1, E<T> k2,
              bool stream) {
  using F = E<T>;
  int64_t s = 0;
  if constexpr (kExplicit<T>) {
    using W = Wide<F>;
    for (; s + W::kWidth <= S; s += W::kWidth) {
      const typename W::V g = W::template Dz<kMask>(pg + s, py + s);
      if constexpr (kDz) W::Set(pz + s, g, stream);
      W::Set(q + s, a * g + k1 + (W::Get(px + s) - mu) * k2, stream);
    }
  }
  for (; s < S; ++s) {
    const F g = DzAt<kMask>(pg, py, s);
    if constexpr (kDz) pz[s] = Store<T, F>(g);
    q[s] = Store<T, F>(a * g + k1 + (Load(px[s]) - mu) * k2);
  }
}

// y = (x - mean) * a + k1 over every row, rows in parallel, then the epilogue (Finish: + res with
// kRes, ReLU with kRelu; res is not read without kRes), in explicit vectors where kExplicit<T>.
template <class T, bool kRes, bool kRelu>
void Normalize(const Shape& sh, const T* x, const Coefficients<T>& co, const T* res, T* y,
               bool stream) {
  using F = E<T>;
  const int64_t C = sh.channels, S = sh.inner;
  ParallelFor(sh.batches * sh.rows, C * S, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t i = (item / sh.rows) * C;
      const T* __restrict in = x + item * C * S;
      const T* __restrict rs = res + item * C * S;
      T* __restrict out = y + item * C * S;
      const F* __restrict mean = co.mean.data() + i;
      const F* __restrict a = co.a.data() + i;
      const F* __restrict o = co.k1.data() + i;
      if (S == 1) {
        int64_t c = 0;
        if constexpr (kExplicit<T>) {
          using W = Wide<F>;
          for (; c + W::kWidth <= C; c += W::kWidth)
            W::Set(out + c,
                   W::template Finish<kRes, kRelu>(
                       (W::Get(in + c) - W::Get(mean + c)) * W::Get(a + c) + W::Get(o + c), rs + c),
                   stream);
        }
        for (; c < C; ++c)
          out[c] = Store<T, F>(Finish<kRes, kRelu>((Load(in[c]) - mean[c]) * a[c] + o[c], rs, c));
        continue;
      }
      for (int64_t c = 0; c < C; ++c)
        NormalizeSpan<T, kRes, kRelu>(in + c * S, rs + c * S, out + c * S, S, mean[c], a[c], o[c],
                                      stream);
    }
  });
}

// dx = a * dz + k1 + (x - mean) * k2 over every row, rows in parallel (vectors as in Normalize),
// with dz = dy, or with kMask dy masked by the ReLU output y (DzAt), written to dz with kDz.
template <class T, bool kMask, bool kDz>
void GradInput(const Shape& sh, const T* x, const T* dy, const T* y, const Coefficients<T>& co,
               T* dx, T* dz, bool stream) {
  using F = E<T>;
  const int64_t C = sh.channels, S = sh.inner;
  ParallelFor(sh.batches * sh.rows, C * S, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t i = (item / sh.rows) * C, offset = item * C * S;
      const T* __restrict xr = x + offset;
      const T* __restrict gr = dy + offset;
      const T* __restrict yr = y + offset;
      T* __restrict zr = dz + offset;
      T* __restrict out = dx + offset;
      const F* __restrict mean = co.mean.data() + i;
      const F* __restrict a = co.a.data() + i;
      const F* __restrict k1 = co.k1.data() + i;
      const F* __restrict k2 = co.k2.data() + i;
      if (S == 1) {
        int64_t c = 0;
        if constexpr (kExplicit<T>) {
          using W = Wide<F>;
          for (; c + W::kWidth <= C; c += W::kWidth) {
            const typename W::V g = W::template Dz<kMask>(gr + c, yr + c);
            if constexpr (kDz) W::Set(zr + c, g, stream);
            W::Set(out + c,
                   W::Get(a + c) * g + W::Get(k1 + c) +
                       (W::Get(xr + c) - W::Get(mean + c)) * W::Get(k2 + c),
                   stream);
          }
        }
        for (; c < C; ++c) {
          const F g = DzAt<kMask>(gr, yr, c);
          if constexpr (kDz) zr[c] = Store<T, F>(g);
          out[c] = Store<T, F>(a[c] * g + k1[c] + (Load(xr[c]) - mean[c]) * k2[c]);
        }
        continue;
      }
      for (int64_t c = 0; c < C; ++c) {
        const int64_t o = c * S;
        GradSpan<T, kMask, kDz>(xr + o, gr + o, yr + o, zr + o, out + o, S, mean[c], a[c], k1[c],
                                k2[c], stream);
      }
    }
  });
}

// The statistics pass's shift K of statistic i = (b, c): its first value, exact in E<T>.
template <class T>
E<T> Shift(const Shape& sh, const T* x, int64_t i) {
  return Load(x[((i / sh.channels) * sh.rows * sh.channels + i % sh.channels) * sh.inner]);
}

// The backward's centres K: each mean rounded to x's dtype (GradSums).
template <class T>
std::vector<E<T>> Centers(const double* mean, int64_t n) {
  std::vector<E<T>> center(n);
  for (int64_t i = 0; i < n; ++i) center[i] = Load(Store<T, E<T>>(static_cast<E<T>>(mean[i])));
  return center;
}

// sum(dz * (x - mean)) from sum(dz * (x - center)) and sum(dz), in float64.
inline double AtMean(double sum_dz_xk, double mean, double center, double sum_dz) {
  return sum_dz_xk - (mean - center) * sum_dz;
}

// Batch mean and biased variance of every (b, c), in float64.
template <class T>
void Statistics(const Shape& sh, const T* x, std::vector<double>* mean, std::vector<double>* var) {
  const int64_t C = sh.channels;
  std::vector<E<T>> shift(sh.stats());
  for (int64_t i = 0; i < sh.stats(); ++i) shift[i] = Shift(sh, x, i);
  const auto [sum, square_sum] = Sums<2>(
      sh, [&](int64_t b, int64_t r0, int64_t r1, int64_t c0, int64_t c1, double* const* acc) {
        StatsRows<T>(sh, x, b, r0, r1, c0, c1, shift.data() + b * C + c0, acc[0], acc[1]);
      });
  const double m = static_cast<double>(sh.values());
  mean->resize(sh.stats());
  var->resize(sh.stats());
  for (int64_t i = 0; i < sh.stats(); ++i)
    Moments(shift[i], sum[i], square_sum[i], m, &(*mean)[i], &(*var)[i]);
}

// y from statistics: y = (x - mean) * gamma / sqrt(var + eps) + beta; inv_std out, in float64.
// residual nullptr: none; relu: the epilogue's ReLU.
template <class T, class F>
void NormalizeWith(const Shape& sh, const T* x, const double* mean, const double* var,
                   const F* gamma, const F* beta, int64_t param_stride, double eps,
                   const T* residual, bool relu, T* y, std::vector<double>* inv_std) {
  Coefficients<T> co(sh.stats());
  inv_std->resize(sh.stats());
  for (int64_t i = 0; i < sh.stats(); ++i) {
    const int64_t p = ParamIndex(sh, i, param_stride);
    (*inv_std)[i] = co.SetForward(i, mean[i], var[i], gamma[p], beta[p], eps);
  }
  Cases(residual != nullptr, relu, [&](auto res, auto act) {
    Normalize<T, decltype(res)::value, decltype(act)::value>(sh, x, co, residual ? residual : x, y,
                                                             Streams<T>(sh));
  });
}

// dx from the global sums over m values (Coefficients::SetBackward).
// y (the ReLU output; nullptr: no mask) masks dy, and dz (nullptr: not wanted) receives it.
template <class T, class F>
void GradInputWith(const Shape& sh, const T* x, const T* dy, const double* mean,
                   const double* inv_std, const F* gamma, int64_t param_stride,
                   const double* sum_dy, const double* sum_dy_xmu, double m, const T* y, T* dx,
                   T* dz) {
  Coefficients<T> co(sh.stats());
  for (int64_t i = 0; i < sh.stats(); ++i)
    co.SetBackward(i, mean[i], inv_std[i], gamma[ParamIndex(sh, i, param_stride)], sum_dy[i],
                   sum_dy_xmu[i], m);
  Cases(y != nullptr, dz != nullptr, [&](auto mask, auto write) {
    constexpr bool kMask = decltype(mask)::value, kDz = decltype(write)::value;
    if constexpr (kMask || !kDz)
      GradInput<T, kMask, kDz>(sh, x, dy, y ? y : dy, co, dx, dz ? dz : dx, Streams<T>(sh));
  });
}

// sum(dz) and sum(dz * (x - mean)) over every row (BackwardRows, dz as there: y masks dy where
// given). The pass centres x at K, mean rounded to x's dtype: x - K and dz * (x - K) are then
// exact in E<T> for x near K, as the statistics' x - K is (float64 x: K is the mean, and x - K
// rounds once), and the float64 sum is corrected for mean - K.
template <class T>
void GradSums(const Shape& sh, const T* x, const T* dy, const T* y, const double* mean,
              std::vector<double>* sum_dz, std::vector<double>* sum_dz_xmu) {
  const std::vector<E<T>> center = Centers<T>(mean, sh.stats());
  const int64_t C = sh.channels;
  auto sums = Sums<2>(
      sh, [&](int64_t b, int64_t r0, int64_t r1, int64_t c0, int64_t c1, double* const* acc) {
        const E<T>* k = center.data() + b * C + c0;
        if (y != nullptr) BackwardRows<T, true>(sh, x, dy, y, b, r0, r1, c0, c1, k, acc[0], acc[1]);
        else BackwardRows<T, false>(sh, x, dy, dy, b, r0, r1, c0, c1, k, acc[0], acc[1]);
      });
  for (int64_t i = 0; i < sh.stats(); ++i)
    sums[1][i] = AtMean(sums[1][i], mean[i], center[i], sums[0][i]);
  *sum_dz = std::move(sums[0]);
  *sum_dz_xmu = std::move(sums[1]);
}

// Channel by channel: for NCHW-like inputs whose channel is long spans that fit a core's L2
// (sizes below), the fused passes run one (b, c) at a time, its sums and then its elementwise
// pass, so that the second pass reads x (and dy) from L2 instead of memory. The arithmetic and
// its order are the two-pass path's (the same blocks of rows, added in the same order; the same
// spans), so the bits are too.
constexpr int64_t kChannelMinSpanBytes = 1024;  // shorter spans share lines with other channels
constexpr int64_t kChannelMaxBytes = 256 << 10;  // per array: x and dy in a 1 MiB L2, with room
constexpr int64_t kChannelMinCount = 16;  // enough (b, c) to keep every thread busy
template <class T>
bool ByChannel(const Shape& sh) {
  const int64_t bytes = static_cast<int64_t>(sizeof(T));
  return sh.inner * bytes >= kChannelMinSpanBytes && sh.values() * bytes <= kChannelMaxBytes &&
         sh.stats() >= kChannelMinCount;
}

// Runs per_block(i, b, r0, r1) for every block of rows of statistic i = (b, c), in block order
// (Sums' blocks), then done(i, b, c); statistics in parallel.
template <class Block, class Done>
void EachStatistic(const Shape& sh, Block per_block, Done done) {
  ParallelFor(sh.stats(), sh.values(), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / sh.channels, per = sh.block_rows();
      for (int64_t k = 0; k < sh.blocks(); ++k)
        per_block(i, b, k * per, std::min(sh.rows, (k + 1) * per));
      done(i, b, i % sh.channels);
    }
  });
}

// Statistics, then NormalizeWith, channel by channel (ByChannel).
template <class T, class F>
void ForwardByChannel(const Shape& sh, const T* x, const F* gamma, const F* beta,
                      int64_t param_stride, double eps, const T* res, bool relu, T* y,
                      std::vector<double>* mean, std::vector<double>* var,
                      std::vector<double>* inv_std) {
  const int64_t C = sh.channels, S = sh.inner, n = sh.stats();
  std::vector<E<T>> shift(n);
  std::vector<double> sum(n), square_sum(n);
  mean->resize(n);
  var->resize(n);
  inv_std->resize(n);
  Coefficients<T> co(n);
  const bool stream = Streams<T>(sh);
  Cases(res != nullptr, relu, [&](auto with_res, auto with_relu) {
    constexpr bool kRes = decltype(with_res)::value, kRelu = decltype(with_relu)::value;
    EachStatistic(
        sh,
        [&](int64_t i, int64_t b, int64_t r0, int64_t r1) {
          const int64_t c = i % C;
          if (r0 == 0) shift[i] = Shift(sh, x, i);
          double s1 = 0.0, s2 = 0.0;
          StatsRows<T>(sh, x, b, r0, r1, c, c + 1, &shift[i], &s1, &s2);
          sum[i] += s1;
          square_sum[i] += s2;
        },
        [&](int64_t i, int64_t b, int64_t c) {
          Moments(shift[i], sum[i], square_sum[i], static_cast<double>(sh.values()),
                  &(*mean)[i], &(*var)[i]);
          const int64_t p = ParamIndex(sh, i, param_stride);
          (*inv_std)[i] = co.SetForward(i, (*mean)[i], (*var)[i], gamma[p], beta[p], eps);
          for (int64_t r = 0; r < sh.rows; ++r) {
            const int64_t o = ((b * sh.rows + r) * C + c) * S;
            NormalizeSpan<T, kRes, kRelu>(x + o, (kRes ? res : x) + o, y + o, S, co.mean[i],
                                          co.a[i], co.k1[i], stream);
          }
        });
  });
}

// FusedBackward channel by channel (ByChannel).
template <class T, class F>
void BackwardByChannel(const Shape& sh, const T* x, const T* dy, const T* y, const double* mean,
                       const double* inv_std, const F* gamma, int64_t param_stride, T* dx,
                       T* dz, double* dgamma, double* dbeta) {
  const int64_t C = sh.channels, S = sh.inner, n = sh.stats();
  const std::vector<E<T>> center = Centers<T>(mean, n);
  std::vector<double> sum_dz(n), sum_dz_xmu(n);
  Coefficients<T> co(n);
  const bool stream = Streams<T>(sh);
  Cases(y != nullptr, dz != nullptr, [&](auto mask, auto write) {
    constexpr bool kMask = decltype(mask)::value, kDz = decltype(write)::value;
    if constexpr (kMask || !kDz)
      EachStatistic(
          sh,
          [&](int64_t i, int64_t b, int64_t r0, int64_t r1) {
            const int64_t c = i % C;
            double s1 = 0.0, s2 = 0.0;
            BackwardRows<T, kMask>(sh, x, dy, kMask ? y : dy, b, r0, r1, c, c + 1, &center[i],
                                   &s1, &s2);
            sum_dz[i] += s1;
            sum_dz_xmu[i] += s2;
          },
          [&](int64_t i, int64_t b, int64_t c) {
            sum_dz_xmu[i] = AtMean(sum_dz_xmu[i], mean[i], center[i], sum_dz[i]);
            dgamma[i] = sum_dz_xmu[i] * inv_std[i];
            dbeta[i] = sum_dz[i];
            co.SetBackward(i, mean[i], inv_std[i], gamma[ParamIndex(sh, i, param_stride)],
                           sum_dz[i], sum_dz_xmu[i], static_cast<double>(sh.values()));
            for (int64_t r = 0; r < sh.rows; ++r) {
              const int64_t o = ((b * sh.rows + r) * C + c) * S;
              GradSpan<T, kMask, kDz>(x + o, dy + o, (kMask ? y : dy) + o,
                                      kDz ? dz + o : nullptr, dx + o, S, co.mean[i], co.a[i],
                                      co.k1[i], co.k2[i], stream);
            }
          });
  });
}

// The fused backward's two passes from the forward's float64 statistics: the sums (GradSums),
// then dx and the parameters' gradients (in float64).
template <class T, class F>
void FusedBackward(const Shape& sh, const T* xs, const T* dys, const T* ys, const double* mean,
                   const double* inv_std, const F* gamma, int64_t param_stride, T* dx, T* dz,
                   double* dgamma, double* dbeta) {
  if (ByChannel<T>(sh))
    return BackwardByChannel<T, F>(sh, xs, dys, ys, mean, inv_std, gamma, param_stride, dx, dz,
                                   dgamma, dbeta);
  std::vector<double> sum_dz, sum_dz_xmu;
  GradSums<T>(sh, xs, dys, ys, mean, &sum_dz, &sum_dz_xmu);
  for (int64_t i = 0; i < sh.stats(); ++i) {
    dgamma[i] = sum_dz_xmu[i] * inv_std[i];
    dbeta[i] = sum_dz[i];
  }
  GradInputWith<T, F>(sh, xs, dys, mean, inv_std, gamma, param_stride, sum_dz.data(),
                      sum_dz_xmu.data(), static_cast<double>(sh.values()), ys, dx, dz);
}

// ---------------------------------------------------------------------------------------------
// FFI plumbing: buffers to typed pointers, shape checks, the dtype switch.

template <class T>
const T* In(const ffi::AnyBuffer& buffer) {
  return static_cast<const T*>(buffer.untyped_data());
}
template <class T>
T* Out(ffi::Result<ffi::AnyBuffer>& buffer) {
  return static_cast<T*>(buffer->untyped_data());
}
template <class F>
void Put(const std::vector<double>& values, ffi::Result<ffi::AnyBuffer>& out) {
  F* p = Out<F>(out);
  for (size_t i = 0; i < values.size(); ++i) p[i] = static_cast<F>(values[i]);
}
// What values leave out of their rounding to F: with Put's, float64 to 48 bits (float32 F);
// zero for float64 F, and for values that are not finite (inf - inf would be NaN). The forward
// hands its statistics to the backward that way.
template <class F>
void PutLow(const std::vector<double>& values, ffi::Result<ffi::AnyBuffer>& out) {
  F* p = Out<F>(out);
  for (size_t i = 0; i < values.size(); ++i) {
    const double v = values[i];
    p[i] = std::isfinite(v) ? static_cast<F>(v - static_cast<double>(static_cast<F>(v))) : F(0);
  }
}
template <class F>
std::vector<double> Get(const ffi::AnyBuffer& buffer) {
  const F* p = In<F>(buffer);
  return std::vector<double>(p, p + buffer.element_count());
}

// The per-(batch, channel) parameter stride: gamma/beta are (C,) or carry the batch axes too.
bool ParamStride(const Shape& sh, const ffi::AnyBuffer& p, int64_t* stride) {
  const int64_t n = static_cast<int64_t>(p.element_count());
  if (n == sh.channels) *stride = 0;
  else if (n == sh.stats()) *stride = sh.channels;
  else return false;
  return true;
}

bool PerStatistic(const Shape& sh, std::initializer_list<const ffi::AnyBuffer*> buffers) {
  for (const ffi::AnyBuffer* b : buffers)
    if (static_cast<int64_t>(b->element_count()) != sh.stats()) return false;
  return true;
}

template <class T>
struct Tag {
  using type = T;
};

// Calls fn(Tag<T>, Tag<F>) for x's dtype T and its statistics' dtype F.
template <class Fn>
ffi::Error ByDtype(ffi::DataType dtype, Fn fn) {
  using D = ffi::DataType;
  switch (dtype) {
    case D::F32: fn(Tag<float>{}, Tag<float>{}); break;
    case D::F64: fn(Tag<double>{}, Tag<double>{}); break;
    case D::BF16: fn(Tag<BFloat16>{}, Tag<float>{}); break;
    case D::F16: fn(Tag<_Float16>{}, Tag<float>{}); break;
    default: return ffi::Error::InvalidArgument("jaxbn batch norm: unsupported dtype");
  }
  return ffi::Error::Success();
}

ffi::Error ShapeError(const char* what) {
  return ffi::Error::InvalidArgument(std::string("jaxbn batch norm: unexpected shapes in ") + what);
}

// An optional x-shaped operand (the residual, the ReLU output): its data, or nullptr.
template <class T>
const T* Maybe(const std::optional<ffi::AnyBuffer>& buffer) {
  return buffer.has_value() ? In<T>(*buffer) : nullptr;
}

bool SameSize(const ffi::AnyBuffer& x, const std::optional<ffi::AnyBuffer>& other) {
  return !other.has_value() ||
         (other->element_count() == x.element_count() && other->element_type() == x.element_type());
}

ffi::Error ForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer gamma, ffi::AnyBuffer beta,
                       std::optional<ffi::AnyBuffer> residual, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<ffi::AnyBuffer> mean, ffi::Result<ffi::AnyBuffer> var,
                       ffi::Result<ffi::AnyBuffer> inv_std, ffi::Result<ffi::AnyBuffer> mean_low,
                       ffi::Result<ffi::AnyBuffer> inv_std_low, int64_t axis, int64_t batch_dims,
                       double eps, bool relu, ffi::ThreadPool pool) {
  PoolScope scope(pool);
  Shape sh;
  int64_t stride, beta_stride;
  if (!ToShape(x.dimensions(), batch_dims, axis, &sh) || !ParamStride(sh, gamma, &stride) ||
      !ParamStride(sh, beta, &beta_stride) || stride != beta_stride || !SameSize(x, residual))
    return ShapeError("forward");
  return ByDtype(x.element_type(), [&](auto t, auto f) {
    using T = typename decltype(t)::type;
    using F = typename decltype(f)::type;
    const T* xs = In<T>(x);
    const T* res = Maybe<T>(residual);
    std::vector<double> mean64, var64, inv_std64;
    if (ByChannel<T>(sh)) {
      ForwardByChannel<T, F>(sh, xs, In<F>(gamma), In<F>(beta), stride, eps, res, relu, Out<T>(y),
                             &mean64, &var64, &inv_std64);
    } else {
      Statistics<T>(sh, xs, &mean64, &var64);
      NormalizeWith<T, F>(sh, xs, mean64.data(), var64.data(), In<F>(gamma), In<F>(beta),
                          stride, eps, res, relu, Out<T>(y), &inv_std64);
    }
    Put<F>(mean64, mean);
    Put<F>(var64, var);
    Put<F>(inv_std64, inv_std);
    PutLow<F>(mean64, mean_low);
    PutLow<F>(inv_std64, inv_std_low);
  });
}

ffi::Error StatsImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> mean,
                     ffi::Result<ffi::AnyBuffer> var, int64_t axis, int64_t batch_dims,
                     ffi::ThreadPool pool) {
  PoolScope scope(pool);
  Shape sh;
  if (!ToShape(x.dimensions(), batch_dims, axis, &sh)) return ShapeError("stats");
  return ByDtype(x.element_type(), [&](auto t, auto f) {
    using T = typename decltype(t)::type;
    using F = typename decltype(f)::type;
    std::vector<double> mean64, var64;
    Statistics<T>(sh, In<T>(x), &mean64, &var64);
    Put<F>(mean64, mean);
    Put<F>(var64, var);
  });
}

ffi::Error NormalizeImpl(ffi::AnyBuffer x, ffi::AnyBuffer mean, ffi::AnyBuffer var,
                         ffi::AnyBuffer gamma, ffi::AnyBuffer beta,
                         std::optional<ffi::AnyBuffer> residual, ffi::Result<ffi::AnyBuffer> y,
                         ffi::Result<ffi::AnyBuffer> inv_std, int64_t axis, int64_t batch_dims,
                         double eps, bool relu, ffi::ThreadPool pool) {
  PoolScope scope(pool);
  Shape sh;
  int64_t stride, beta_stride;
  if (!ToShape(x.dimensions(), batch_dims, axis, &sh) || !PerStatistic(sh, {&mean, &var}) ||
      !ParamStride(sh, gamma, &stride) || !ParamStride(sh, beta, &beta_stride) ||
      stride != beta_stride || !SameSize(x, residual))
    return ShapeError("normalize");
  return ByDtype(x.element_type(), [&](auto t, auto f) {
    using T = typename decltype(t)::type;
    using F = typename decltype(f)::type;
    const std::vector<double> mean64 = Get<F>(mean), var64 = Get<F>(var);
    std::vector<double> inv_std64;
    NormalizeWith<T, F>(sh, In<T>(x), mean64.data(), var64.data(), In<F>(gamma), In<F>(beta),
                        stride, eps, Maybe<T>(residual), relu, Out<T>(y), &inv_std64);
    Put<F>(inv_std64, inv_std);
  });
}

// With y (the forward's ReLU output) dy is masked by y > 0; with the dz result, the masked
// cotangent (the residual's) is written too.
ffi::Error BackwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer mean,
                        ffi::AnyBuffer mean_low, ffi::AnyBuffer inv_std,
                        ffi::AnyBuffer inv_std_low, ffi::AnyBuffer gamma,
                        std::optional<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::Result<ffi::AnyBuffer> dgamma, ffi::Result<ffi::AnyBuffer> dbeta,
                        std::optional<ffi::Result<ffi::AnyBuffer>> dz, int64_t axis,
                        int64_t batch_dims, ffi::ThreadPool pool) {
  PoolScope scope(pool);
  Shape sh;
  int64_t stride;
  if (!ToShape(x.dimensions(), batch_dims, axis, &sh) || !ParamStride(sh, gamma, &stride) ||
      !PerStatistic(sh, {&mean, &mean_low, &inv_std, &inv_std_low}) || !SameSize(x, y) ||
      (dz.has_value() && !y.has_value()))
    return ShapeError("backward");
  return ByDtype(x.element_type(), [&](auto t, auto f) {
    using T = typename decltype(t)::type;
    using F = typename decltype(f)::type;
    const T* xs = In<T>(x);
    const T* dys = In<T>(dy);
    const T* ys = Maybe<T>(y);
    T* dzs = dz.has_value() ? Out<T>(*dz) : nullptr;
    std::vector<double> mean64 = Get<F>(mean), inv_std64 = Get<F>(inv_std);
    const std::vector<double> mean_low64 = Get<F>(mean_low), inv_std_low64 = Get<F>(inv_std_low);
    for (int64_t i = 0; i < sh.stats(); ++i) {
      mean64[i] += mean_low64[i];
      inv_std64[i] += inv_std_low64[i];
    }
    std::vector<double> dgamma64(sh.stats()), dbeta64(sh.stats());
    FusedBackward<T, F>(sh, xs, dys, ys, mean64.data(), inv_std64.data(), In<F>(gamma), stride,
                        Out<T>(dx), dzs, dgamma64.data(), dbeta64.data());
    Put<F>(dgamma64, dgamma);
    Put<F>(dbeta64, dbeta);
  });
}

ffi::Error GradSumsImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer mean,
                        ffi::Result<ffi::AnyBuffer> sum_dy, ffi::Result<ffi::AnyBuffer> sum_dy_xmu,
                        int64_t axis, int64_t batch_dims, ffi::ThreadPool pool) {
  PoolScope scope(pool);
  Shape sh;
  if (!ToShape(x.dimensions(), batch_dims, axis, &sh) || !PerStatistic(sh, {&mean})) return ShapeError("grad_sums");
  return ByDtype(x.element_type(), [&](auto t, auto f) {
    using T = typename decltype(t)::type;
    using F = typename decltype(f)::type;
    std::vector<double> s1, s2;
    GradSums<T>(sh, In<T>(x), In<T>(dy), nullptr, Get<F>(mean).data(), &s1, &s2);
    Put<F>(s1, sum_dy);
    Put<F>(s2, sum_dy_xmu);
  });
}

ffi::Error GradInputImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer mean,
                         ffi::AnyBuffer inv_std, ffi::AnyBuffer gamma, ffi::AnyBuffer sum_dy,
                         ffi::AnyBuffer sum_dy_xmu, ffi::Result<ffi::AnyBuffer> dx,
                         int64_t axis, int64_t batch_dims, double count, ffi::ThreadPool pool) {
  PoolScope scope(pool);
  Shape sh;
  int64_t stride;
  if (!ToShape(x.dimensions(), batch_dims, axis, &sh) || !ParamStride(sh, gamma, &stride) ||
      !PerStatistic(sh, {&mean, &inv_std, &sum_dy, &sum_dy_xmu}))
    return ShapeError("grad_input");
  return ByDtype(x.element_type(), [&](auto t, auto f) {
    using T = typename decltype(t)::type;
    using F = typename decltype(f)::type;
    const std::vector<double> s1 = Get<F>(sum_dy), s2 = Get<F>(sum_dy_xmu);
    const std::vector<double> mean64 = Get<F>(mean), inv_std64 = Get<F>(inv_std);
    GradInputWith<T, F>(sh, In<T>(x), In<T>(dy), mean64.data(), inv_std64.data(), In<F>(gamma),
                        stride, s1.data(), s2.data(), count, nullptr, Out<T>(dx), nullptr);
  });
}

}  // namespace

using Buffer = ffi::AnyBuffer;
using Result = ffi::Result<ffi::AnyBuffer>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnBatchNormForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<Buffer>()  // x
                                  .Arg<Buffer>()  // gamma
                                  .Arg<Buffer>()  // beta
                                  .OptionalArg<Buffer>()  // residual, added before the ReLU
                                  .Ret<Buffer>()  // y
                                  .Ret<Buffer>()  // mean
                                  .Ret<Buffer>()  // var
                                  .Ret<Buffer>()  // inv_std
                                  .Ret<Buffer>()  // mean_low: mean - mean rounded (PutLow)
                                  .Ret<Buffer>()  // inv_std_low
                                  .Attr<int64_t>("axis")
                                  .Attr<int64_t>("batch_dims")
                                  .Attr<double>("eps")
                                  .Attr<bool>("relu")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnBatchNormStats, StatsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<Buffer>()  // x
                                  .Ret<Buffer>()  // mean
                                  .Ret<Buffer>()  // var
                                  .Attr<int64_t>("axis")
                                  .Attr<int64_t>("batch_dims")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnBatchNormNormalize, NormalizeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<Buffer>()  // x
                                  .Arg<Buffer>()  // mean
                                  .Arg<Buffer>()  // var
                                  .Arg<Buffer>()  // gamma
                                  .Arg<Buffer>()  // beta
                                  .OptionalArg<Buffer>()  // residual
                                  .Ret<Buffer>()  // y
                                  .Ret<Buffer>()  // inv_std
                                  .Attr<int64_t>("axis")
                                  .Attr<int64_t>("batch_dims")
                                  .Attr<double>("eps")
                                  .Attr<bool>("relu")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnBatchNormBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<Buffer>()  // x
                                  .Arg<Buffer>()  // dy
                                  .Arg<Buffer>()  // mean, the forward's
                                  .Arg<Buffer>()  // mean_low, the forward's
                                  .Arg<Buffer>()  // inv_std, the forward's
                                  .Arg<Buffer>()  // inv_std_low, the forward's
                                  .Arg<Buffer>()  // gamma
                                  .OptionalArg<Buffer>()  // y, the forward's ReLU output
                                  .Ret<Buffer>()  // dx
                                  .Ret<Buffer>()  // dgamma
                                  .Ret<Buffer>()  // dbeta
                                  .OptionalRet<Buffer>()  // dz = dy * [y > 0] (the residual's)
                                  .Attr<int64_t>("axis")
                                  .Attr<int64_t>("batch_dims")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnBatchNormGradSums, GradSumsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<Buffer>()  // x
                                  .Arg<Buffer>()  // dy
                                  .Arg<Buffer>()  // mean
                                  .Ret<Buffer>()  // sum_dy
                                  .Ret<Buffer>()  // sum_dy_xmu
                                  .Attr<int64_t>("axis")
                                  .Attr<int64_t>("batch_dims")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnBatchNormGradInput, GradInputImpl,
                              ffi::Ffi::Bind()
                                  .Arg<Buffer>()  // x
                                  .Arg<Buffer>()  // dy
                                  .Arg<Buffer>()  // mean
                                  .Arg<Buffer>()  // inv_std
                                  .Arg<Buffer>()  // gamma
                                  .Arg<Buffer>()  // sum_dy (global)
                                  .Arg<Buffer>()  // sum_dy_xmu (global)
                                  .Ret<Buffer>()  // dx
                                  .Attr<int64_t>("axis")
                                  .Attr<int64_t>("batch_dims")
                                  .Attr<double>("count")  // values per statistic, global
                                  .Ctx<ffi::ThreadPool>());

// The Python module: targets() -> {name: PyCapsule of the handler}, for
// jax.ffi.register_ffi_target(name, capsule, platform="cpu").
static PyObject* Targets(PyObject*, PyObject*) {
  PyObject* out = PyDict_New();
  if (out == nullptr) return nullptr;
  const struct {
    const char* name;
    void* fn;
  } handlers[] = {
      {"jaxbn_batch_norm_forward", reinterpret_cast<void*>(JaxbnBatchNormForward)},
      {"jaxbn_batch_norm_backward", reinterpret_cast<void*>(JaxbnBatchNormBackward)},
      {"jaxbn_batch_norm_stats", reinterpret_cast<void*>(JaxbnBatchNormStats)},
      {"jaxbn_batch_norm_normalize", reinterpret_cast<void*>(JaxbnBatchNormNormalize)},
      {"jaxbn_batch_norm_grad_sums", reinterpret_cast<void*>(JaxbnBatchNormGradSums)},
      {"jaxbn_batch_norm_grad_input", reinterpret_cast<void*>(JaxbnBatchNormGradInput)}};
  for (const auto& h : handlers) {
    PyObject* capsule = PyCapsule_New(h.fn, nullptr, nullptr);
    if (capsule == nullptr || PyDict_SetItemString(out, h.name, capsule) < 0) {
      Py_XDECREF(capsule);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(capsule);
  }
  return out;
}

static PyMethodDef kMethods[] = {
    {"targets", Targets, METH_NOARGS, "FFI handler capsules by target name."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_kernels",
                              "jaxbn's native CPU batch norm kernels (XLA FFI).", -1, kMethods,
                              nullptr, nullptr, nullptr, nullptr};

// The handlers' operands, results and attributes, as jaxbn/_native.py's _INTERFACE: an
// extension built from another version of this file is refused there, not by XLA mid-call.
constexpr long kInterface = 2;

PyMODINIT_FUNC PyInit__kernels(void) {
  PyObject* module = PyModule_Create(&kModule);
  if (module != nullptr && PyModule_AddIntConstant(module, "INTERFACE", kInterface) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
