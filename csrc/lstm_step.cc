// One step of an LSTM with normalized recurrent and cell terms, forward and backward, as XLA
// FFI handlers for the CPU (Ba et al. 2016, supplement eq. 20-22):
//
//   [i, f, g, o] = u + N_h(a_h)            u = N_x(W_x x_t), a_h = W_h h_{t-1} (XLA's matmuls)
//   c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g)
//   h_t = sigmoid(o) tanh(N_c(c_t))
//
// N_h is layer norm, RMS norm or only a bias (kind 1, 2, 0), N_c layer norm, RMS norm or the
// identity (kind 1, 2, 0), each with a gain and a bias. A row (one sequence) is one thread's,
// in cache, with the per-row arithmetic of the row kernels (rows.h): the same exact and
// overflow-safe statistics. The forward saves each row's statistics of a_h and c_t; the
// backward recomputes the gates from u, a_h and c_{t-1}, and sums the parameter gradients per
// fixed-size chunk of rows, the chunks combined in order.
//
// Parameters are [..., 4H] and [..., H] in the computation dtype, their G leading entries
// dividing the rows (G > 1 under vmap).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cells.h"

namespace ffi = xla::ffi;
using namespace lnjax;  // NOLINT: this file's kernels are lnjax's

namespace {

// The gates and c_t of one row, from u, a_h, c_{t-1} and N_h's statistics (recomputed).
template <int KH, class A>
struct Gates {
  std::vector<A> z, xh, si, sf, tg, so, c;
  explicit Gates(int64_t h) : z(4 * h), xh(4 * h), si(h), sf(h), tg(h), so(h), c(h) {}

  void compute(const A* u, const A* ah, const A* cp, const A* gh, const A* bh, const A* sh, int64_t h) {
    if constexpr (KH == 0) {
      for (int64_t i = 0; i < 4 * h; ++i) z[i] = u[i] + ah[i] + bh[i];
    } else {
      load_scaled<KH == 1>(ah, 4 * h, sh, xh.data());
      for (int64_t i = 0; i < 4 * h; ++i) {
        xh[i] = normalized<KH == 1>(xh[i], sh);
        z[i] = u[i] + (xh[i] * gh[i] + bh[i]);
      }
    }
    for (int64_t j = 0; j < h; ++j) {
      si[j] = sigmoid(z[j]), sf[j] = sigmoid(z[h + j]), tg[j] = tanh_(z[2 * h + j]), so[j] = sigmoid(z[3 * h + j]);
      c[j] = sf[j] * cp[j] + si[j] * tg[j];
    }
  }
};

template <int KH, int KC, class A>
void forward(ffi::ThreadPool& pool, const Step& S, const A* u, const A* ah, const A* cp, const A* gh, const A* bh,
             const A* gc, const A* bc, double eps_h, double eps_c, A* c_out, A* h_out, A* sh, A* sc) {
  const int64_t h = S.h;
  parallel_for(pool, S.L.chunks(), [&](int64_t chunk) {
    Gates<KH, A> gates(h);
    std::vector<A> buf(4 * h), cn(h);
    for (int64_t r = S.L.begin(chunk); r < S.L.end(chunk); ++r) {
      const int64_t grp = S.L.group(r);
      A* stats_h = sh + r * 4;
      std::fill(stats_h, stats_h + 4, A(0));  // the unused entries (and all, for kind 0) are 0
      std::fill(sc + r * 4, sc + r * 4 + 4, A(0));
      if constexpr (KH != 0) {  // N_h's statistics, then the gates with them
        std::copy(ah + r * 4 * h, ah + (r + 1) * 4 * h, buf.data());
        row_stats<KH == 1>(buf.data(), 4 * h, eps_h, stats_h);
      }
      gates.compute(u + r * 4 * h, ah + r * 4 * h, cp + r * h, gh + grp * 4 * h, bh + grp * 4 * h, stats_h, h);
      if constexpr (KC == 0) {  // N_c absent: c_t itself (no bias)
        std::copy(gates.c.begin(), gates.c.end(), cn.begin());
      } else {
        norm_row<KC>(gates.c.data(), h, gc + grp * h, bc + grp * h, eps_c, sc + r * 4, buf.data(), cn.data());
      }
      for (int64_t j = 0; j < h; ++j) {
        c_out[r * h + j] = gates.c[j];
        h_out[r * h + j] = gates.so[j] * tanh_(cn[j]);
      }
    }
  });
}

template <int KH, int KC, class A>
void backward(ffi::ThreadPool& pool, const Step& S, const A* u, const A* ah, const A* cp, const A* gh, const A* bh,
              const A* gc, const A* bc, const A* sh, const A* sc, const A* dc_out, const A* dh_out, A* du, A* dah,
              A* dcp, A* dgh, A* dbh, A* dgc, A* dbc) {
  const int64_t h = S.h, width = 10 * h;  // per chunk: dgh, dbh (4H each), dgc, dbc (H each)
  std::vector<A> partial(size_t(S.L.chunks() * width), A(0));
  parallel_for(pool, S.L.chunks(), [&](int64_t chunk) {
    Gates<KH, A> gates(h);
    std::vector<A> xc(h), dcn(h), da(4 * h);
    A* p = partial.data() + chunk * width;
    for (int64_t r = S.L.begin(chunk); r < S.L.end(chunk); ++r) {
      const int64_t grp = S.L.group(r);
      const A *gh_r = gh + grp * 4 * h, *gc_r = gc + grp * h, *bc_r = bc + grp * h, *sc_r = sc + r * 4;
      gates.compute(u + r * 4 * h, ah + r * 4 * h, cp + r * h, gh_r, bh + grp * 4 * h, sh + r * 4, h);
      if constexpr (KC != 0) {
        load_scaled<KC == 1>(gates.c.data(), h, sc_r, xc.data());
        for (int64_t j = 0; j < h; ++j) xc[j] = normalized<KC == 1>(xc[j], sc_r);
      }
      for (int64_t j = 0; j < h; ++j) {  // through h_t = so tanh(cn)
        const A cn = KC != 0 ? xc[j] * gc_r[j] + bc_r[j] : gates.c[j];
        const A tc = tanh_(cn), dh = dh_out[r * h + j];
        da[3 * h + j] = dh * tc * gates.so[j] * (A(1) - gates.so[j]);
        dcn[j] = dh * gates.so[j] * (A(1) - tc * tc);
        if constexpr (KC != 0) {
          p[8 * h + j] += dcn[j] * xc[j], p[9 * h + j] += dcn[j];
          dcn[j] *= gc_r[j];
        }
      }
      if constexpr (KC != 0) input_grad<KC == 1>(xc.data(), dcn.data(), h, sc_r, dcn.data());
      for (int64_t j = 0; j < h; ++j) {  // through c_t = sf c_{t-1} + si tg
        const A dc = dc_out[r * h + j] + dcn[j];
        const A si = gates.si[j], sf = gates.sf[j], tg = gates.tg[j];
        dcp[r * h + j] = dc * sf;
        da[j] = dc * tg * si * (A(1) - si);
        da[h + j] = dc * cp[r * h + j] * sf * (A(1) - sf);
        da[2 * h + j] = dc * si * (A(1) - tg * tg);
      }
      for (int64_t i = 0; i < 4 * h; ++i) {  // through z = u + N_h(a_h)
        du[r * 4 * h + i] = da[i];
        p[4 * h + i] += da[i];
        if constexpr (KH != 0) {
          p[i] += da[i] * gates.xh[i];
          da[i] *= gh_r[i];
        }
      }
      if constexpr (KH != 0) {
        input_grad<KH == 1>(gates.xh.data(), da.data(), 4 * h, sh + r * 4, dah + r * 4 * h);
      } else {
        std::copy(da.begin(), da.end(), dah + r * 4 * h);
      }
    }
  });
  for (int64_t grp = 0; grp < S.groups; ++grp) {  // chunk partials in order
    A* outs[4] = {dgh + grp * 4 * h, dbh + grp * 4 * h, dgc + grp * h, dbc + grp * h};
    const int64_t offset[4] = {0, 4 * h, 8 * h, 9 * h}, len[4] = {4 * h, 4 * h, h, h};
    for (int k = 0; k < 4; ++k) std::fill(outs[k], outs[k] + len[k], A(0));
    for (int64_t chunk = grp * S.L.chunks_per_group; chunk < (grp + 1) * S.L.chunks_per_group; ++chunk)
      for (int k = 0; k < 4; ++k)
        for (int64_t i = 0; i < len[k]; ++i) outs[k][i] += partial[chunk * width + offset[k] + i];
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer u, ffi::AnyBuffer ah, ffi::AnyBuffer cp, ffi::AnyBuffer gh,
                   ffi::AnyBuffer bh, ffi::AnyBuffer gc, ffi::AnyBuffer bc, ffi::Result<ffi::AnyBuffer> c,
                   ffi::Result<ffi::AnyBuffer> h, ffi::Result<ffi::AnyBuffer> sh, ffi::Result<ffi::AnyBuffer> sc,
                   int64_t kh, int64_t kc, double eps_h, double eps_c) {
  Step S;
  if (auto err = step_layout(cp, gc, 4, &S); !err.success()) return err;
  return real(cp.element_type(), [&](auto tag) {
    using A = decltype(tag);
    return kinds(kh, kc, [&](auto KH, auto KC) {
      forward<KH.value, KC.value>(pool, S, data<A>(u), data<A>(ah), data<A>(cp), data<A>(gh), data<A>(bh),
                                  data<A>(gc), data<A>(bc), eps_h, eps_c, data<A>(c), data<A>(h), data<A>(sh),
                                  data<A>(sc));
      return ffi::Error::Success();
    });
  });
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer u, ffi::AnyBuffer ah, ffi::AnyBuffer cp, ffi::AnyBuffer gh,
                    ffi::AnyBuffer bh, ffi::AnyBuffer gc, ffi::AnyBuffer bc, ffi::AnyBuffer sh, ffi::AnyBuffer sc,
                    ffi::AnyBuffer dc, ffi::AnyBuffer dh, ffi::Result<ffi::AnyBuffer> du,
                    ffi::Result<ffi::AnyBuffer> dah, ffi::Result<ffi::AnyBuffer> dcp, ffi::Result<ffi::AnyBuffer> dgh,
                    ffi::Result<ffi::AnyBuffer> dbh, ffi::Result<ffi::AnyBuffer> dgc, ffi::Result<ffi::AnyBuffer> dbc,
                    int64_t kh, int64_t kc) {
  Step S;
  if (auto err = step_layout(cp, gc, 4, &S); !err.success()) return err;
  return real(cp.element_type(), [&](auto tag) {
    using A = decltype(tag);
    return kinds(kh, kc, [&](auto KH, auto KC) {
      backward<KH.value, KC.value>(pool, S, data<A>(u), data<A>(ah), data<A>(cp), data<A>(gh), data<A>(bh),
                                   data<A>(gc), data<A>(bc), data<A>(sh), data<A>(sc), data<A>(dc), data<A>(dh),
                                   data<A>(du), data<A>(dah), data<A>(dcp), data<A>(dgh), data<A>(dbh), data<A>(dgc),
                                   data<A>(dbc));
      return ffi::Error::Success();
    });
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LnjaxLstmStepForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // u
                                  .Arg<ffi::AnyBuffer>()  // a_h
                                  .Arg<ffi::AnyBuffer>()  // c_{t-1}
                                  .Arg<ffi::AnyBuffer>()  // N_h gain
                                  .Arg<ffi::AnyBuffer>()  // N_h bias
                                  .Arg<ffi::AnyBuffer>()  // N_c gain
                                  .Arg<ffi::AnyBuffer>()  // N_c bias
                                  .Ret<ffi::AnyBuffer>()  // c_t
                                  .Ret<ffi::AnyBuffer>()  // h_t
                                  .Ret<ffi::AnyBuffer>()  // N_h's statistics
                                  .Ret<ffi::AnyBuffer>()  // N_c's statistics
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kc")
                                  .Attr<double>("eps_h")
                                  .Attr<double>("eps_c"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LnjaxLstmStepBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // u
                                  .Arg<ffi::AnyBuffer>()  // a_h
                                  .Arg<ffi::AnyBuffer>()  // c_{t-1}
                                  .Arg<ffi::AnyBuffer>()  // N_h gain
                                  .Arg<ffi::AnyBuffer>()  // N_h bias
                                  .Arg<ffi::AnyBuffer>()  // N_c gain
                                  .Arg<ffi::AnyBuffer>()  // N_c bias
                                  .Arg<ffi::AnyBuffer>()  // N_h's statistics
                                  .Arg<ffi::AnyBuffer>()  // N_c's statistics
                                  .Arg<ffi::AnyBuffer>()  // cotangent of c_t
                                  .Arg<ffi::AnyBuffer>()  // cotangent of h_t
                                  .Ret<ffi::AnyBuffer>()  // du
                                  .Ret<ffi::AnyBuffer>()  // d a_h
                                  .Ret<ffi::AnyBuffer>()  // d c_{t-1}
                                  .Ret<ffi::AnyBuffer>()  // d N_h gain
                                  .Ret<ffi::AnyBuffer>()  // d N_h bias
                                  .Ret<ffi::AnyBuffer>()  // d N_c gain
                                  .Ret<ffi::AnyBuffer>()  // d N_c bias
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kc"));
