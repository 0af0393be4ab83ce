// Native CPU batch norm for jaxbn: forward (statistics + normalization) and backward (the two
// per-feature sums + dx) as XLA FFI handlers, exposed to Python as PyCapsules.
//
// Canonical view: x is (..., R, C, S). The leading axes (the ones jax.vmap adds) are independent
// batches B; each (b, c) has its own statistics over its R * S values. Features-last (N, D) is
// (N, D, 1), NHWC (N*H*W, C, 1), NCHW (N, C, H*W).
//
// Four passes over memory, the fewest the math allows: forward reads x once for sum and sum of
// squares and once to write y; backward reads x and dy once for sum(dy) and sum(dy * (x - mean))
// and once to write dx.
//
// Accuracy. The forward's single statistics pass accumulates x - K, with K = x[b, 0, c, 0] a
// value of the same feature (a shift): the squares then measure spread around a value inside
// the data, so sum(d^2)/m - (sum(d)/m)^2 does not cancel even at offset 1e4 (what an unshifted
// one-pass variance would). Sums are blocked: float32 over at most kBlockValues values per
// feature, then float64 across blocks, so a 4M-value reduction carries float64 error, not
// float32's sqrt(m)-growth.
//
// Determinism. The work is cut into blocks of rows fixed by the shape alone; each block writes
// its own partial sums and the partials are added in block order. Threads take static ranges of
// blocks, so the bits are the same for every call and every thread count. Threads are plain
// std::threads joined at the end of each pass: nothing spins between calls.

#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockValues = 512;  // values per feature summed in float32 per block
constexpr int64_t kMinValuesPerThread = 1 << 16;
constexpr int64_t kChannelChunk = 1024;  // channels per work item of the sums

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

// XLA hands the kernel freshly mapped output buffers; writing them faults in one 4 KiB page at a
// time, which measured costlier than the arithmetic. Asking for transparent huge pages on the
// whole 2 MiB pages inside the buffer (advice only; where THP is off it does nothing) cuts the
// faults 512-fold.
void AdviseHugePages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = std::getenv("JAXBN_HUGEPAGES") == nullptr ||
                              std::strcmp(std::getenv("JAXBN_HUGEPAGES"), "0") != 0;
  if (!enabled) return;
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

struct Shape {
  int64_t batches, rows, channels, inner;  // B, R, C, S
  int64_t values() const { return rows * inner; }  // per statistic
  int64_t block_rows() const { return std::max<int64_t>(1, kBlockValues / inner); }
  int64_t blocks() const { return (rows + block_rows() - 1) / block_rows(); }
};

bool ToShape(ffi::AnyBuffer::Dimensions dims, Shape* shape) {
  if (dims.size() < 3) return false;
  int64_t batches = 1;
  for (size_t i = 0; i + 3 < dims.size(); ++i) batches *= dims[i];
  size_t n = dims.size();
  *shape = Shape{batches, dims[n - 3], dims[n - 2], dims[n - 1]};
  return shape->rows > 0 && shape->channels > 0 && shape->inner > 0;
}

int NumThreads() {
  static const int hardware = std::max(1u, std::thread::hardware_concurrency());
  const char* env = std::getenv("JAXBN_NUM_THREADS");
  int n = env ? std::atoi(env) : hardware;
  return std::max(1, n);
}

// Runs body(first, last) over [0, items) cut into static contiguous ranges, one per thread.
template <class Body>
void ParallelFor(int64_t items, int64_t values_per_item, Body body) {
  int64_t by_work = std::max<int64_t>(1, items * values_per_item / kMinValuesPerThread);
  int threads = static_cast<int>(std::min<int64_t>({NumThreads(), items, by_work}));
  if (threads <= 1) {
    body(int64_t{0}, items);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) {
    pool.emplace_back(body, items * t / threads, items * (t + 1) / threads);
  }
  body(int64_t{0}, items / threads);
  for (auto& thread : pool) thread.join();
}

// Per-block partial sums of two terms over each block's rows and inner values, in F within the
// block; partials[(b * blocks + k) * C + c]. A work item is one block of rows of one chunk of
// channels (the chunk keeps the accumulators in L1 and gives wide, short inputs parallelism);
// terms(b, r, c0, c1, acc1, acc2) adds row r's channels [c0, c1) into acc[0, c1 - c0).
template <class F, class Terms>
void BlockSums(const Shape& sh, std::vector<double>* first, std::vector<double>* second,
               Terms terms) {
  const int64_t blocks = sh.blocks(), rows_per = sh.block_rows(), C = sh.channels;
  const int64_t chunks = (C + kChannelChunk - 1) / kChannelChunk;
  first->assign(sh.batches * blocks * C, 0.0);
  second->assign(sh.batches * blocks * C, 0.0);
  const int64_t per_item = rows_per * sh.inner * std::min(C, kChannelChunk);
  ParallelFor(sh.batches * blocks * chunks, per_item, [&](int64_t lo, int64_t hi) {
    std::vector<F> acc1(std::min(C, kChannelChunk)), acc2(acc1.size());
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t chunk = item % chunks, bk = item / chunks;
      const int64_t b = bk / blocks, k = bk % blocks;
      const int64_t c0 = chunk * kChannelChunk, c1 = std::min(C, c0 + kChannelChunk);
      std::fill(acc1.begin(), acc1.end(), F(0));
      std::fill(acc2.begin(), acc2.end(), F(0));
      const int64_t r_end = std::min(sh.rows, (k + 1) * rows_per);
      for (int64_t r = k * rows_per; r < r_end; ++r) terms(b, r, c0, c1, acc1.data(), acc2.data());
      for (int64_t c = c0; c < c1; ++c) {
        (*first)[bk * C + c] = acc1[c - c0];
        (*second)[bk * C + c] = acc2[c - c0];
      }
    }
  });
}

// Adds the block partials of each (b, c) in block order.
void ReduceBlocks(const Shape& sh, const std::vector<double>& partial, std::vector<double>* out) {
  const int64_t blocks = sh.blocks(), C = sh.channels;
  out->assign(sh.batches * C, 0.0);
  for (int64_t b = 0; b < sh.batches; ++b)
    for (int64_t k = 0; k < blocks; ++k)
      for (int64_t c = 0; c < C; ++c) (*out)[b * C + c] += partial[(b * blocks + k) * C + c];
}

// One row of C channels x S inner values into the per-channel float accumulators. S == 1
// (features last) vectorizes across channels; S > 1 along s, in eight independent lanes.
template <class T, class F>
inline void StatsRow(const T* __restrict row, const F* __restrict shift, int64_t C, int64_t S,
                     F* __restrict sum, F* __restrict square_sum) {
  if (S == 1) {
    for (int64_t c = 0; c < C; ++c) {
      const F d = Load(row[c]) - shift[c];
      sum[c] += d;
      square_sum[c] += d * d;
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* __restrict p = row + c * S;
    const F k = shift[c];
    F l1[8] = {}, l2[8] = {};
    int64_t s = 0;
    for (; s + 8 <= S; s += 8)
      for (int l = 0; l < 8; ++l) {
        const F d = Load(p[s + l]) - k;
        l1[l] += d;
        l2[l] += d * d;
      }
    for (; s < S; ++s) {
      const F d = Load(p[s]) - k;
      l1[0] += d;
      l2[0] += d * d;
    }
    F t1 = 0, t2 = 0;
    for (int l = 0; l < 8; ++l) t1 += l1[l], t2 += l2[l];
    sum[c] += t1;
    square_sum[c] += t2;
  }
}

// sum(dy) and sum(dy * (x - mean)) of one row, laid out as in StatsRow.
template <class T, class F>
inline void GradRow(const T* __restrict xr, const T* __restrict gr, const F* __restrict mean,
                    int64_t C, int64_t S, F* __restrict sum_dy, F* __restrict sum_dy_xmu) {
  if (S == 1) {
    for (int64_t c = 0; c < C; ++c) {
      const F g = Load(gr[c]);
      sum_dy[c] += g;
      sum_dy_xmu[c] += g * (Load(xr[c]) - mean[c]);
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* __restrict px = xr + c * S;
    const T* __restrict pg = gr + c * S;
    const F mu = mean[c];
    F l1[8] = {}, l2[8] = {};
    int64_t s = 0;
    for (; s + 8 <= S; s += 8)
      for (int l = 0; l < 8; ++l) {
        const F g = Load(pg[s + l]);
        l1[l] += g;
        l2[l] += g * (Load(px[s + l]) - mu);
      }
    for (; s < S; ++s) {
      const F g = Load(pg[s]);
      l1[0] += g;
      l2[0] += g * (Load(px[s]) - mu);
    }
    F t1 = 0, t2 = 0;
    for (int l = 0; l < 8; ++l) t1 += l1[l], t2 += l2[l];
    sum_dy[c] += t1;
    sum_dy_xmu[c] += t2;
  }
}

// y = (x - mean) * a + o for one row.
template <class T, class F>
inline void NormalizeRow(const T* __restrict in, const F* __restrict mean, const F* __restrict a,
                         const F* __restrict o, int64_t C, int64_t S, T* __restrict out) {
  if (S == 1) {
    for (int64_t c = 0; c < C; ++c) out[c] = Store<T, F>((Load(in[c]) - mean[c]) * a[c] + o[c]);
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    const F mu = mean[c], ac = a[c], oc = o[c];
    const T* __restrict p = in + c * S;
    T* __restrict q = out + c * S;
    for (int64_t s = 0; s < S; ++s) q[s] = Store<T, F>((Load(p[s]) - mu) * ac + oc);
  }
}

// dx = a * dy + k1 + (x - mean) * k2 for one row.
template <class T, class F>
inline void GradInputRow(const T* __restrict xr, const T* __restrict gr, const F* __restrict mean,
                         const F* __restrict a, const F* __restrict k1, const F* __restrict k2,
                         int64_t C, int64_t S, T* __restrict dx) {
  if (S == 1) {
    for (int64_t c = 0; c < C; ++c)
      dx[c] = Store<T, F>(a[c] * Load(gr[c]) + k1[c] + (Load(xr[c]) - mean[c]) * k2[c]);
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    const F mu = mean[c], ac = a[c], c1 = k1[c], c2 = k2[c];
    const T* __restrict px = xr + c * S;
    const T* __restrict pg = gr + c * S;
    T* __restrict q = dx + c * S;
    for (int64_t s = 0; s < S; ++s)
      q[s] = Store<T, F>(ac * Load(pg[s]) + c1 + (Load(px[s]) - mu) * c2);
  }
}

template <class T, class F>
void Forward(const Shape& sh, const T* x, const F* gamma, const F* beta, int64_t param_stride,
             double eps, T* y, F* mean_out, F* var_out) {
  const int64_t C = sh.channels, S = sh.inner, R = sh.rows;
  std::vector<F> shift(sh.batches * C);
  for (int64_t b = 0; b < sh.batches; ++b)
    for (int64_t c = 0; c < C; ++c) shift[b * C + c] = Load(x[(b * R * C + c) * S]);
  std::vector<double> part1, part2, sum1, sum2;
  BlockSums<F>(sh, &part1, &part2,
               [&](int64_t b, int64_t r, int64_t c0, int64_t c1, F* acc1, F* acc2) {
    StatsRow<T, F>(x + ((b * R + r) * C + c0) * S, shift.data() + b * C + c0, c1 - c0, S, acc1,
                   acc2);
  });
  ReduceBlocks(sh, part1, &sum1);
  ReduceBlocks(sh, part2, &sum2);
  const double m = static_cast<double>(sh.values());
  std::vector<F> center(sh.batches * C), scale(sh.batches * C), offset(sh.batches * C);
  for (int64_t i = 0; i < sh.batches * C; ++i) {
    const double d_mean = sum1[i] / m;
    const double var = std::max(0.0, sum2[i] / m - d_mean * d_mean);
    const double mean = static_cast<double>(shift[i]) + d_mean;
    const int64_t p = (i / C) * param_stride + i % C;
    mean_out[i] = static_cast<F>(mean);
    var_out[i] = static_cast<F>(var);
    center[i] = static_cast<F>(mean);
    scale[i] = static_cast<F>(static_cast<double>(gamma[p]) / std::sqrt(var + eps));
    offset[i] = beta[p];
  }
  ParallelFor(sh.batches * R, C * S, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / R;
      NormalizeRow<T, F>(x + item * C * S, center.data() + b * C, scale.data() + b * C,
                         offset.data() + b * C, C, S, y + item * C * S);
    }
  });
}

template <class T, class F>
void Backward(const Shape& sh, const T* x, const T* dy, const F* mean, const F* inv_std,
              const F* gamma, int64_t param_stride, T* dx, F* dgamma, F* dbeta) {
  const int64_t C = sh.channels, S = sh.inner, R = sh.rows;
  std::vector<double> part1, part2, sum_dy, sum_dy_xmu;
  BlockSums<F>(sh, &part1, &part2,
               [&](int64_t b, int64_t r, int64_t c0, int64_t c1, F* acc1, F* acc2) {
    const int64_t offset = ((b * R + r) * C + c0) * S;
    GradRow<T, F>(x + offset, dy + offset, mean + b * C + c0, c1 - c0, S, acc1, acc2);
  });
  ReduceBlocks(sh, part1, &sum_dy);
  ReduceBlocks(sh, part2, &sum_dy_xmu);
  const double m = static_cast<double>(sh.values());
  // dx = a * dy + k1 + (x - mean) * k2, a = gamma * inv_std (see jaxbn/_normalize.py alt_rule).
  std::vector<F> a(sh.batches * C), k1(sh.batches * C), k2(sh.batches * C);
  for (int64_t i = 0; i < sh.batches * C; ++i) {
    const int64_t p = (i / C) * param_stride + i % C;
    const double is = inv_std[i], scale = static_cast<double>(gamma[p]) * is;
    const double sum_dy_xhat = sum_dy_xmu[i] * is;
    dbeta[i] = static_cast<F>(sum_dy[i]);
    dgamma[i] = static_cast<F>(sum_dy_xhat);
    a[i] = static_cast<F>(scale);
    k1[i] = static_cast<F>(-scale * sum_dy[i] / m);
    k2[i] = static_cast<F>(-scale * is * sum_dy_xhat / m);
  }
  ParallelFor(sh.batches * R, C * S, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / R, offset = item * C * S;
      GradInputRow<T, F>(x + offset, dy + offset, mean + b * C, a.data() + b * C,
                         k1.data() + b * C, k2.data() + b * C, C, S, dx + offset);
    }
  });
}

// The per-(batch, channel) parameter stride: gamma/beta are (C,) or carry the batch axes too.
bool ParamStride(const Shape& sh, const ffi::AnyBuffer& p, int64_t* stride) {
  const int64_t n = static_cast<int64_t>(p.element_count());
  if (n == sh.channels) *stride = 0;
  else if (n == sh.batches * sh.channels) *stride = sh.channels;
  else return false;
  return true;
}

template <class T, class F>
ffi::Error ForwardTyped(const Shape& sh, ffi::AnyBuffer x, ffi::AnyBuffer gamma,
                        ffi::AnyBuffer beta, int64_t stride, double eps, ffi::AnyBuffer* y,
                        ffi::AnyBuffer* mean, ffi::AnyBuffer* var) {
  Forward<T, F>(sh, static_cast<const T*>(x.untyped_data()),
                static_cast<const F*>(gamma.untyped_data()),
                static_cast<const F*>(beta.untyped_data()), stride, eps,
                static_cast<T*>(y->untyped_data()), static_cast<F*>(mean->untyped_data()),
                static_cast<F*>(var->untyped_data()));
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer gamma, ffi::AnyBuffer beta,
                       ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean,
                       ffi::Result<ffi::AnyBuffer> var, double eps) {
  Shape sh;
  int64_t stride, beta_stride;
  if (!ToShape(x.dimensions(), &sh) || !ParamStride(sh, gamma, &stride) ||
      !ParamStride(sh, beta, &beta_stride) || stride != beta_stride)
    return ffi::Error::InvalidArgument("jaxbn batch norm: unexpected shapes");
  AdviseHugePages(y->untyped_data(), y->size_bytes());
  using D = ffi::DataType;
  switch (x.element_type()) {
    case D::F32: return ForwardTyped<float, float>(sh, x, gamma, beta, stride, eps, &*y, &*mean, &*var);
    case D::F64: return ForwardTyped<double, double>(sh, x, gamma, beta, stride, eps, &*y, &*mean, &*var);
    case D::BF16: return ForwardTyped<BFloat16, float>(sh, x, gamma, beta, stride, eps, &*y, &*mean, &*var);
    case D::F16: return ForwardTyped<_Float16, float>(sh, x, gamma, beta, stride, eps, &*y, &*mean, &*var);
    default: return ffi::Error::InvalidArgument("jaxbn batch norm: unsupported dtype");
  }
}

template <class T, class F>
ffi::Error BackwardTyped(const Shape& sh, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                         ffi::AnyBuffer mean, ffi::AnyBuffer inv_std, ffi::AnyBuffer gamma,
                         int64_t stride, ffi::AnyBuffer* dx, ffi::AnyBuffer* dgamma,
                         ffi::AnyBuffer* dbeta) {
  Backward<T, F>(sh, static_cast<const T*>(x.untyped_data()),
                 static_cast<const T*>(dy.untyped_data()),
                 static_cast<const F*>(mean.untyped_data()),
                 static_cast<const F*>(inv_std.untyped_data()),
                 static_cast<const F*>(gamma.untyped_data()), stride,
                 static_cast<T*>(dx->untyped_data()), static_cast<F*>(dgamma->untyped_data()),
                 static_cast<F*>(dbeta->untyped_data()));
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer mean,
                        ffi::AnyBuffer inv_std, ffi::AnyBuffer gamma,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dgamma,
                        ffi::Result<ffi::AnyBuffer> dbeta) {
  Shape sh;
  int64_t stride;
  if (!ToShape(x.dimensions(), &sh) || !ParamStride(sh, gamma, &stride) ||
      static_cast<int64_t>(mean.element_count()) != sh.batches * sh.channels)
    return ffi::Error::InvalidArgument("jaxbn batch norm backward: unexpected shapes");
  AdviseHugePages(dx->untyped_data(), dx->size_bytes());
  using D = ffi::DataType;
  switch (x.element_type()) {
    case D::F32: return BackwardTyped<float, float>(sh, x, dy, mean, inv_std, gamma, stride, &*dx, &*dgamma, &*dbeta);
    case D::F64: return BackwardTyped<double, double>(sh, x, dy, mean, inv_std, gamma, stride, &*dx, &*dgamma, &*dbeta);
    case D::BF16: return BackwardTyped<BFloat16, float>(sh, x, dy, mean, inv_std, gamma, stride, &*dx, &*dgamma, &*dbeta);
    case D::F16: return BackwardTyped<_Float16, float>(sh, x, dy, mean, inv_std, gamma, stride, &*dx, &*dgamma, &*dbeta);
    default: return ffi::Error::InvalidArgument("jaxbn batch norm backward: unsupported dtype");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnBatchNormForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<double>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnBatchNormBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

// The Python module: targets() -> {name: PyCapsule of the handler}, for
// jax.ffi.register_ffi_target(name, capsule, platform="cpu").
static PyObject* Targets(PyObject*, PyObject*) {
  PyObject* out = PyDict_New();
  if (out == nullptr) return nullptr;
  const struct {
    const char* name;
    void* fn;
  } handlers[] = {{"jaxbn_batch_norm_forward", reinterpret_cast<void*>(JaxbnBatchNormForward)},
                  {"jaxbn_batch_norm_backward", reinterpret_cast<void*>(JaxbnBatchNormBackward)}};
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

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&kModule); }
