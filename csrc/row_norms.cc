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

#include "rows.h"

namespace ffi = xla::ffi;
using namespace lnjax;  // NOLINT: this file's kernels are lnjax's

namespace {

// --- one row, forward ---------------------------------------------------------------------

template <bool Center, class T>
void forward_row(const T* x, T* y, const Acc<T>* g, const Acc<T>* b, int64_t h, double eps,
                 Acc<T>* stats, Acc<T>* buf) {
  for (int64_t i = 0; i < h; ++i) buf[i] = load(x[i]);
  row_stats<Center>(buf, h, eps, stats);
  for (int64_t i = 0; i < h; ++i) y[i] = store<T>(normalized<Center>(buf[i], stats) * g[i] + b[i]);
}

template <bool Center, class T>
void forward(ffi::ThreadPool& pool, const Layout& L, const T* x, T* y, const Acc<T>* g, const Acc<T>* b,
             double eps, Acc<T>* stats) {
  constexpr int k = kStats<Center>;
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
  load_scaled<Center>(x, h, stats, xhat);
  for (int64_t i = 0; i < h; ++i) {
    const A xh = normalized<Center>(xhat[i], stats), d = load(dy[i]);
    xhat[i] = xh, gs[i] = d * g[i];
    dscale[i] += d * xh, dbias[i] += d;
  }
  input_grad<Center>(xhat, gs, h, stats, gs);
  for (int64_t i = 0; i < h; ++i) dx[i] = store<T>(gs[i]);
}

template <bool Center, class T>
void backward(ffi::ThreadPool& pool, const Layout& L, const T* x, const T* dy, T* dx, const Acc<T>* g,
              const Acc<T>* stats, Acc<T>* dscale, Acc<T>* dbias) {
  using A = Acc<T>;
  constexpr int k = kStats<Center>;
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
