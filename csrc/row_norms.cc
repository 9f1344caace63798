// Layer and RMS normalization over the last axis as XLA FFI handlers for the CPU.
//
// Each row is normalized by one thread, in cache, with the same code whatever the number of
// rows or threads: a row's output is bitwise independent of the batch, of jit vs eager and of
// the thread count. Statistics are in at least float32 (float64 inputs: float64) and exact:
// layer norm uses the corrected two-pass algorithm (mean, then the residual sum(x - mean) and
// sum((x - mean)^2) in a second pass over the cached row), the same algorithm as lnjax's XLA
// path. A row whose max|x| lies outside [2^-16, 2^32] (float64: [2^-256, 2^256]) is first
// multiplied by a power of two s = 2^-e, which is exact, so that its squares neither overflow
// nor underflow: every finite input gives a finite output. Rows inside that range have s = 1
// and compute the plain formula.
//
// Per row the forward saves its statistics in scaled units, with e, for the backward:
//   layer: [mean, residual, rstd, e]   rms: [rstd, e]
// and the backward's parameter gradients are summed per fixed-size chunk of rows, the chunks
// then combined in order: deterministic, and independent of the thread count.
//
// `scale` and `bias` are [..., H] in the statistics dtype, their G leading entries dividing
// the R rows: rows r * R / G ... (r + 1) * R / G - 1 use group r (G = 1 normally; G > 1 under
// a vmap that maps the parameters too).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels.h"

namespace ffi = xla::ffi;
using namespace lnjax;  // NOLINT: this file's kernels are lnjax's

namespace {

// --- deterministic sums over a row: fixed lanes, combined in a fixed tree -------------------


template <class A, class F>
inline A lane_sum(int64_t n, F term) {
  A acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += term(i + j);
  for (int j = 0; i + j < n; ++j) acc[j] += term(i + j);
  return tree(acc);
}

template <class A>
inline A max_abs(const A* v, int64_t n) {
  A acc[kLanes] = {};
  int64_t i = 0;
  // `a > m ? a : m` rather than std::max, whose NaN rule keeps the loop from vectorizing; a
  // NaN is passed over here, and reaches the output through the sums anyway.
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const A a = std::fabs(v[i + j]);
      acc[j] = a > acc[j] ? a : acc[j];
    }
  for (int j = 0; i + j < n; ++j) acc[j] = std::max(acc[j], std::fabs(v[i + j]));
  return *std::max_element(acc, acc + kLanes);
}

// The exponent e of the power-of-two scale 2^-e a row needs (0: none). Tiny rows need it only
// if eps does not dwarf their variance (else var + eps is eps to working precision).
template <class A>
inline int row_exponent(A m, double eps) {
  constexpr bool wide = std::is_same_v<A, double>;
  const int lo = wide ? -256 : -16, hi = wide ? 256 : 32, digits = wide ? 53 : 24;
  if (!(m > 0) || !std::isfinite(m)) return 0;
  const int e = std::ilogb(m);
  if (e >= hi) return e;
  if (e < lo && (eps == 0 || std::ilogb(eps) < 2 * e + digits)) return e;
  return 0;
}

// 1 / sqrt(var + eps * s^2) for a scaled row, computed in double so that eps * s^2 cannot
// overflow, and capped at the largest finite A: a capped value only ever multiplies zeros
// (a row with no spread), which then stay zeros rather than NaN.
template <class A>
inline A scaled_rstd(A var, double eps, int e) {
  const double es = std::ldexp(eps, -e);
  const double ve = double(var) + es * std::ldexp(1.0, -e);
  if (!(ve > 0)) return A(1) / std::sqrt(A(ve));
  return A(std::min(1.0 / std::sqrt(ve), double(std::numeric_limits<A>::max())));
}

// Rows per chunk: about 64 KiB of row data, a function of H only (never of the thread count).
inline int64_t chunk_rows(int64_t h) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(h, 1)); }

struct Layout {
  int64_t rows, h, groups, per_group, per_chunk, chunks_per_group;
  int64_t chunks() const { return groups * chunks_per_group; }
  int64_t begin(int64_t c) const { return (c / chunks_per_group) * per_group + (c % chunks_per_group) * per_chunk; }
  int64_t end(int64_t c) const {
    return std::min(begin(c) + per_chunk, (c / chunks_per_group + 1) * per_group);
  }
  int64_t group(int64_t row) const { return row / per_group; }
};

ffi::Error layout(const ffi::AnyBuffer& x, const ffi::AnyBuffer& scale, Layout* out) {
  auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("x must have a feature axis");
  const int64_t h = dims.back();
  const int64_t rows = h == 0 ? 0 : int64_t(x.element_count()) / h;
  // scale: [..., H], its leading axes the groups (vmap adds them to x and scale alike).
  auto sd = scale.dimensions();
  if (sd.size() < 1 || sd.back() != h) return ffi::Error::InvalidArgument("scale must be [..., H]");
  const int64_t groups = h == 0 ? 1 : int64_t(scale.element_count()) / h;
  if (groups < 1 || rows % groups) return ffi::Error::InvalidArgument("groups must divide the rows");
  const int64_t per_group = rows / groups, per_chunk = chunk_rows(h);
  *out = Layout{rows, h, groups, per_group, per_chunk, (per_group + per_chunk - 1) / per_chunk};
  return ffi::Error::Success();
}

// --- one row, forward ---------------------------------------------------------------------

template <bool Center, class T>
void forward_row(const T* x, T* y, const Acc<T>* g, const Acc<T>* b, int64_t h, double eps,
                 Acc<T>* stats, Acc<T>* buf) {
  using A = Acc<T>;
  for (int64_t i = 0; i < h; ++i) buf[i] = load(x[i]);
  const int e = row_exponent(max_abs(buf, h), eps);
  if (e != 0)
    for (int64_t i = 0; i < h; ++i) buf[i] = std::ldexp(buf[i], -e);
  const A n = A(h);
  A mean = 0, residual = 0, var;
  if constexpr (Center) {
    mean = lane_sum<A>(h, [&](int64_t i) { return buf[i]; }) / n;
    residual = lane_sum<A>(h, [&](int64_t i) { return buf[i] - mean; }) / n;
    const A sq = lane_sum<A>(h, [&](int64_t i) { A d = buf[i] - mean; return d * d; }) / n;
    var = std::max(sq - residual * residual, A(0));
  } else {
    var = lane_sum<A>(h, [&](int64_t i) { return buf[i] * buf[i]; }) / n;
  }
  const A rstd = e == 0 ? A(1) / std::sqrt(var + A(eps)) : scaled_rstd(var, eps, e);
  for (int64_t i = 0; i < h; ++i) {
    const A xhat = Center ? ((buf[i] - mean) - residual) * rstd : buf[i] * rstd;
    y[i] = store<T>(xhat * g[i] + b[i]);
  }
  if constexpr (Center) {
    stats[0] = mean, stats[1] = residual, stats[2] = rstd, stats[3] = A(e);
  } else {
    stats[0] = rstd, stats[1] = A(e);
  }
}

template <bool Center, class T>
void forward(ffi::ThreadPool& pool, const Layout& L, const T* x, T* y, const Acc<T>* g, const Acc<T>* b,
             double eps, Acc<T>* stats) {
  constexpr int k = Center ? 4 : 2;
  parallel_for(pool, L.chunks(), [&](int64_t c) {
    std::vector<Acc<T>> buf(L.h);
    for (int64_t r = L.begin(c); r < L.end(c); ++r) {
      const int64_t gr = L.group(r) * L.h;
      forward_row<Center>(x + r * L.h, y + r * L.h, g + gr, b + gr, L.h, eps, stats + r * k, buf.data());
    }
  });
}

// --- one row, backward --------------------------------------------------------------------
// dx = s * rstd * (gs - mean(gs) - xhat * mean(gs * xhat)), gs = dy * scale (RMS: without the
// mean(gs) term); dscale += dy * xhat, dbias += dy.

template <bool Center, class T>
void backward_row(const T* x, const T* dy, T* dx, const Acc<T>* g, const Acc<T>* stats, int64_t h,
                  Acc<T>* dscale, Acc<T>* dbias, Acc<T>* xhat, Acc<T>* gs) {
  using A = Acc<T>;
  const A mean = Center ? stats[0] : A(0), residual = Center ? stats[1] : A(0);
  const A rstd = Center ? stats[2] : stats[0];
  const int e = int(Center ? stats[3] : stats[1]);
  if (e == 0) {
    for (int64_t i = 0; i < h; ++i) xhat[i] = load(x[i]);
  } else {  // a separate loop, so that the common one has no ldexp and vectorizes
    for (int64_t i = 0; i < h; ++i) xhat[i] = std::ldexp(load(x[i]), -e);
  }
  // One pass: xhat, gs = dy * scale, the parameter gradients and both row sums.
  A sum_gs[kLanes] = {}, sum_gx[kLanes] = {};
  auto step = [&](int64_t i, int j) {
    const A xh = Center ? ((xhat[i] - mean) - residual) * rstd : xhat[i] * rstd;
    const A d = load(dy[i]), gi = d * g[i];
    xhat[i] = xh, gs[i] = gi;
    dscale[i] += d * xh, dbias[i] += d;
    sum_gs[j] += gi, sum_gx[j] += gi * xh;
  };
  int64_t i = 0;
  for (; i + kLanes <= h; i += kLanes)
    for (int j = 0; j < kLanes; ++j) step(i + j, j);
  for (int j = 0; i + j < h; ++j) step(i + j, j);
  const A n = A(h);
  const A a = Center ? tree(sum_gs) / n : A(0), m = tree(sum_gx) / n;
  if (e == 0) {
    for (int64_t i = 0; i < h; ++i) dx[i] = store<T>((gs[i] - a - xhat[i] * m) * rstd);
  } else {
    for (int64_t i = 0; i < h; ++i) dx[i] = store<T>(std::ldexp((gs[i] - a - xhat[i] * m) * rstd, -e));
  }
}

template <bool Center, class T>
void backward(ffi::ThreadPool& pool, const Layout& L, const T* x, const T* dy, T* dx, const Acc<T>* g,
              const Acc<T>* stats, Acc<T>* dscale, Acc<T>* dbias) {
  using A = Acc<T>;
  constexpr int k = Center ? 4 : 2;
  const int64_t h = L.h;
  std::vector<A> partial(size_t(2 * L.chunks() * h), A(0));
  parallel_for(pool, L.chunks(), [&](int64_t c) {
    std::vector<A> buf(2 * h);
    A* ps = partial.data() + 2 * c * h;
    for (int64_t r = L.begin(c); r < L.end(c); ++r)
      backward_row<Center>(x + r * h, dy + r * h, dx + r * h, g + L.group(r) * h, stats + r * k, h, ps,
                           ps + h, buf.data(), buf.data() + h);
  });
  // Chunk partials, summed in chunk order within each group.
  for (int64_t grp = 0; grp < L.groups; ++grp) {
    A* ds = dscale + grp * h;
    A* db = dbias + grp * h;
    std::fill(ds, ds + h, A(0));
    std::fill(db, db + h, A(0));
    for (int64_t c = grp * L.chunks_per_group; c < (grp + 1) * L.chunks_per_group; ++c) {
      const A* ps = partial.data() + 2 * c * h;
      for (int64_t i = 0; i < h; ++i) ds[i] += ps[i], db[i] += ps[h + i];
    }
  }
}

// --- FFI entry points ---------------------------------------------------------------------

template <bool Center>
ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::AnyBuffer bias,
                   ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> stats, double eps) {
  Layout L;
  if (auto err = layout(x, scale, &L); !err.success()) return err;
  return dispatch(x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    forward<Center>(pool, L, data<T>(x), data<T>(y), data<A>(scale), data<A>(bias), eps, data<A>(stats));
    return ffi::Error::Success();
  });
}

template <bool Center>
ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer scale,
                    ffi::AnyBuffer stats, ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dscale,
                    ffi::Result<ffi::AnyBuffer> dbias) {
  Layout L;
  if (auto err = layout(x, scale, &L); !err.success()) return err;
  return dispatch(x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    backward<Center>(pool, L, data<T>(x), data<T>(dy), data<T>(dx), data<A>(scale), data<A>(stats),
                     data<A>(dscale), data<A>(dbias));
    return ffi::Error::Success();
  });
}

}  // namespace

#define LNJAX_FORWARD(name, center)                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, Forward<center>,                 \
                                ffi::Ffi::Bind()                       \
                                    .Ctx<ffi::ThreadPool>()            \
                                    .Arg<ffi::AnyBuffer>()             \
                                    .Arg<ffi::AnyBuffer>()             \
                                    .Arg<ffi::AnyBuffer>()             \
                                    .Ret<ffi::AnyBuffer>()             \
                                    .Ret<ffi::AnyBuffer>()             \
                                    .Attr<double>("eps"))

#define LNJAX_BACKWARD(name, center)                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, Backward<center>,                \
                                ffi::Ffi::Bind()                       \
                                    .Ctx<ffi::ThreadPool>()            \
                                    .Arg<ffi::AnyBuffer>()             \
                                    .Arg<ffi::AnyBuffer>()             \
                                    .Arg<ffi::AnyBuffer>()             \
                                    .Arg<ffi::AnyBuffer>()             \
                                    .Ret<ffi::AnyBuffer>()             \
                                    .Ret<ffi::AnyBuffer>()             \
                                    .Ret<ffi::AnyBuffer>())

LNJAX_FORWARD(LnjaxLayerNormForward, true);
LNJAX_FORWARD(LnjaxRmsNormForward, false);
LNJAX_BACKWARD(LnjaxLayerNormBackward, true);
LNJAX_BACKWARD(LnjaxRmsNormBackward, false);
