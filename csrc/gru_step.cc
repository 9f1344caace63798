// One step of a GRU with normalized recurrent terms, forward and backward, as XLA FFI handlers
// for the CPU (Ba et al. 2016, supplement eq. 26-28, with the update written as in PyTorch and
// Flax, z gating the old state):
//
//   [r, z] = sigmoid(u_rz + N_1(a_rz))        u = [N_2(W_x x_t), N_3(W x_t)] (XLA's matmuls)
//   n      = tanh(u_n + r * N_4(a_n))         a = U h_{t-1} = [a_rz, a_n]
//   h_t    = z * h_{t-1} + (1 - z) * n
//
// N_1 (over the 2H gate terms) and N_4 (over the H candidate terms) are each layer norm, RMS
// norm or only a bias (kind 1, 2, 0), with a gain and a bias. Rows as in the LSTM step
// (cells.h): one thread's each, in cache, statistics saved for the backward, which recomputes
// the gates and sums the parameter gradients per chunk of rows in order.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cells.h"

namespace ffi = xla::ffi;
using namespace lnjax;  // NOLINT: this file's kernels are lnjax's

namespace {

// N(v) of the n entries v, into z: recomputed from saved statistics (kind 0: v + b).
template <int Kind, class A>
inline void norm_saved(const A* v, int64_t n, const A* g, const A* b, const A* stats, A* xhat, A* z) {
  if constexpr (Kind == 0) {
    for (int64_t i = 0; i < n; ++i) z[i] = v[i] + b[i];
  } else {
    load_scaled<Kind == 1>(v, n, stats, xhat);
    for (int64_t i = 0; i < n; ++i) {
      xhat[i] = normalized<Kind == 1>(xhat[i], stats);
      z[i] = xhat[i] * g[i] + b[i];
    }
  }
}

template <int K1, int K4, class A>
struct Gru {
  std::vector<A> x1, z1, x4, z4, r, z, n;
  explicit Gru(int64_t h) : x1(2 * h), z1(2 * h), x4(h), z4(h), r(h), z(h), n(h) {}

  // The gates and n of one row, with N_1's and N_4's statistics already in s1, s4.
  void compute(const A* u, const A* a, const A* g1, const A* b1, const A* g4, const A* b4, const A* s1, const A* s4,
               int64_t h) {
    norm_saved<K1>(a, 2 * h, g1, b1, s1, x1.data(), z1.data());
    norm_saved<K4>(a + 2 * h, h, g4, b4, s4, x4.data(), z4.data());
    for (int64_t j = 0; j < h; ++j) {
      r[j] = sigmoid(u[j] + z1[j]), z[j] = sigmoid(u[h + j] + z1[h + j]);
      n[j] = tanh_(u[2 * h + j] + r[j] * z4[j]);
    }
  }
};

template <int Kind, class A>
inline void stats_of(const A* v, int64_t n, double eps, A* stats, A* buf) {
  std::fill(stats, stats + 4, A(0));
  if constexpr (Kind != 0) {
    std::copy(v, v + n, buf);
    row_stats<Kind == 1>(buf, n, eps, stats);
  }
}

template <int K1, int K4, class A>
void forward(ffi::ThreadPool& pool, const Step& S, const A* u, const A* a, const A* hp, const A* g1, const A* b1,
             const A* g4, const A* b4, double eps1, double eps4, A* h_out, A* s1, A* s4) {
  const int64_t h = S.h;
  parallel_for(pool, S.L.chunks(), [&](int64_t chunk) {
    Gru<K1, K4, A> cell(h);
    std::vector<A> buf(2 * h);
    for (int64_t row = S.L.begin(chunk); row < S.L.end(chunk); ++row) {
      const int64_t grp = S.L.group(row);
      const A* ar = a + row * 3 * h;
      stats_of<K1>(ar, 2 * h, eps1, s1 + row * 4, buf.data());
      stats_of<K4>(ar + 2 * h, h, eps4, s4 + row * 4, buf.data());
      cell.compute(u + row * 3 * h, ar, g1 + grp * 2 * h, b1 + grp * 2 * h, g4 + grp * h, b4 + grp * h, s1 + row * 4,
                   s4 + row * 4, h);
      for (int64_t j = 0; j < h; ++j)
        h_out[row * h + j] = cell.z[j] * hp[row * h + j] + (A(1) - cell.z[j]) * cell.n[j];
    }
  });
}

// The gradient of a normalized term's input from the cotangent d of its output (in place);
// the gain's and bias's gradients are added to dg, db.
template <int Kind, class A>
inline void term_backward(A* d, const A* xhat, const A* g, const A* stats, int64_t n, A* dg, A* db, A* out) {
  for (int64_t i = 0; i < n; ++i) {
    db[i] += d[i];
    if constexpr (Kind != 0) {
      dg[i] += d[i] * xhat[i];
      d[i] *= g[i];
    }
  }
  if constexpr (Kind != 0) {
    input_grad<Kind == 1>(xhat, d, n, stats, out);
  } else {
    std::copy(d, d + n, out);
  }
}

template <int K1, int K4, class A>
void backward(ffi::ThreadPool& pool, const Step& S, const A* u, const A* a, const A* hp, const A* g1, const A* b1,
              const A* g4, const A* b4, const A* s1, const A* s4, const A* dh_out, A* du, A* da, A* dhp, A* dg1,
              A* db1, A* dg4, A* db4) {
  const int64_t h = S.h, width = 6 * h;  // per chunk: dg1, db1 (2H each), dg4, db4 (H each)
  std::vector<A> partial(size_t(S.L.chunks() * width), A(0));
  parallel_for(pool, S.L.chunks(), [&](int64_t chunk) {
    Gru<K1, K4, A> cell(h);
    std::vector<A> d1(2 * h), d4(h);
    A* p = partial.data() + chunk * width;
    for (int64_t row = S.L.begin(chunk); row < S.L.end(chunk); ++row) {
      const int64_t grp = S.L.group(row);
      cell.compute(u + row * 3 * h, a + row * 3 * h, g1 + grp * 2 * h, b1 + grp * 2 * h, g4 + grp * h, b4 + grp * h,
                   s1 + row * 4, s4 + row * 4, h);
      A* dur = du + row * 3 * h;
      for (int64_t j = 0; j < h; ++j) {
        const A dh = dh_out[row * h + j], r = cell.r[j], z = cell.z[j], n = cell.n[j];
        dhp[row * h + j] = dh * z;
        const A dn = dh * (A(1) - z) * (A(1) - n * n);  // through n = tanh(u_n + r N_4(a_n))
        dur[2 * h + j] = dn;
        d4[j] = dn * r;
        d1[j] = dn * cell.z4[j] * r * (A(1) - r);  // r's pre-activation
        d1[h + j] = dh * (hp[row * h + j] - n) * z * (A(1) - z);  // z's pre-activation
      }
      std::copy(d1.begin(), d1.end(), dur);
      term_backward<K1>(d1.data(), cell.x1.data(), g1 + grp * 2 * h, s1 + row * 4, 2 * h, p, p + 2 * h,
                        da + row * 3 * h);
      term_backward<K4>(d4.data(), cell.x4.data(), g4 + grp * h, s4 + row * 4, h, p + 4 * h, p + 5 * h,
                        da + row * 3 * h + 2 * h);
    }
  });
  for (int64_t grp = 0; grp < S.groups; ++grp) {  // chunk partials in order
    A* outs[4] = {dg1 + grp * 2 * h, db1 + grp * 2 * h, dg4 + grp * h, db4 + grp * h};
    const int64_t offset[4] = {0, 2 * h, 4 * h, 5 * h}, len[4] = {2 * h, 2 * h, h, h};
    for (int k = 0; k < 4; ++k) std::fill(outs[k], outs[k] + len[k], A(0));
    for (int64_t chunk = grp * S.L.chunks_per_group; chunk < (grp + 1) * S.L.chunks_per_group; ++chunk)
      for (int k = 0; k < 4; ++k)
        for (int64_t i = 0; i < len[k]; ++i) outs[k][i] += partial[chunk * width + offset[k] + i];
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer u, ffi::AnyBuffer a, ffi::AnyBuffer hp, ffi::AnyBuffer g1,
                   ffi::AnyBuffer b1, ffi::AnyBuffer g4, ffi::AnyBuffer b4, ffi::Result<ffi::AnyBuffer> h,
                   ffi::Result<ffi::AnyBuffer> s1, ffi::Result<ffi::AnyBuffer> s4, int64_t k1, int64_t k4,
                   double eps1, double eps4) {
  Step S;
  if (auto err = step_layout(hp, g4, 3, &S); !err.success()) return err;
  return real(hp.element_type(), [&](auto tag) {
    using A = decltype(tag);
    return kinds(k1, k4, [&](auto K1, auto K4) {
      forward<K1.value, K4.value>(pool, S, data<A>(u), data<A>(a), data<A>(hp), data<A>(g1), data<A>(b1),
                                  data<A>(g4), data<A>(b4), eps1, eps4, data<A>(h), data<A>(s1), data<A>(s4));
      return ffi::Error::Success();
    });
  });
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer u, ffi::AnyBuffer a, ffi::AnyBuffer hp, ffi::AnyBuffer g1,
                    ffi::AnyBuffer b1, ffi::AnyBuffer g4, ffi::AnyBuffer b4, ffi::AnyBuffer s1, ffi::AnyBuffer s4,
                    ffi::AnyBuffer dh, ffi::Result<ffi::AnyBuffer> du, ffi::Result<ffi::AnyBuffer> da,
                    ffi::Result<ffi::AnyBuffer> dhp, ffi::Result<ffi::AnyBuffer> dg1, ffi::Result<ffi::AnyBuffer> db1,
                    ffi::Result<ffi::AnyBuffer> dg4, ffi::Result<ffi::AnyBuffer> db4, int64_t k1, int64_t k4) {
  Step S;
  if (auto err = step_layout(hp, g4, 3, &S); !err.success()) return err;
  return real(hp.element_type(), [&](auto tag) {
    using A = decltype(tag);
    return kinds(k1, k4, [&](auto K1, auto K4) {
      backward<K1.value, K4.value>(pool, S, data<A>(u), data<A>(a), data<A>(hp), data<A>(g1), data<A>(b1),
                                   data<A>(g4), data<A>(b4), data<A>(s1), data<A>(s4), data<A>(dh), data<A>(du),
                                   data<A>(da), data<A>(dhp), data<A>(dg1), data<A>(db1), data<A>(dg4), data<A>(db4));
      return ffi::Error::Success();
    });
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LnjaxGruStepForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // u
                                  .Arg<ffi::AnyBuffer>()  // a = U h_{t-1}
                                  .Arg<ffi::AnyBuffer>()  // h_{t-1}
                                  .Arg<ffi::AnyBuffer>()  // N_1 gain
                                  .Arg<ffi::AnyBuffer>()  // N_1 bias
                                  .Arg<ffi::AnyBuffer>()  // N_4 gain
                                  .Arg<ffi::AnyBuffer>()  // N_4 bias
                                  .Ret<ffi::AnyBuffer>()  // h_t
                                  .Ret<ffi::AnyBuffer>()  // N_1's statistics
                                  .Ret<ffi::AnyBuffer>()  // N_4's statistics
                                  .Attr<int64_t>("k1")
                                  .Attr<int64_t>("k4")
                                  .Attr<double>("eps1")
                                  .Attr<double>("eps4"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LnjaxGruStepBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // u
                                  .Arg<ffi::AnyBuffer>()  // a
                                  .Arg<ffi::AnyBuffer>()  // h_{t-1}
                                  .Arg<ffi::AnyBuffer>()  // N_1 gain
                                  .Arg<ffi::AnyBuffer>()  // N_1 bias
                                  .Arg<ffi::AnyBuffer>()  // N_4 gain
                                  .Arg<ffi::AnyBuffer>()  // N_4 bias
                                  .Arg<ffi::AnyBuffer>()  // N_1's statistics
                                  .Arg<ffi::AnyBuffer>()  // N_4's statistics
                                  .Arg<ffi::AnyBuffer>()  // cotangent of h_t
                                  .Ret<ffi::AnyBuffer>()  // du
                                  .Ret<ffi::AnyBuffer>()  // da
                                  .Ret<ffi::AnyBuffer>()  // d h_{t-1} (the direct term)
                                  .Ret<ffi::AnyBuffer>()  // d N_1 gain
                                  .Ret<ffi::AnyBuffer>()  // d N_1 bias
                                  .Ret<ffi::AnyBuffer>()  // d N_4 gain
                                  .Ret<ffi::AnyBuffer>()  // d N_4 bias
                                  .Attr<int64_t>("k1")
                                  .Attr<int64_t>("k4"));
