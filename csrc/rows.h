// Per-row layer and RMS normalization arithmetic, shared by the row kernels (row_norms.cc)
// and the fused recurrent steps (lstm_step.cc): exact corrected two-pass statistics of a row in
// cache, scaled by a power of two 2^-e where its squares would overflow or underflow.
//
// A row's statistics, in the units of the scaled row: [mean, residual, rstd, e] (layer) or
// [rstd, e] (RMS); e = 0 for all but extreme rows.
#ifndef LNJAX_ROWS_H_
#define LNJAX_ROWS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "kernels.h"

namespace lnjax {

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

inline ffi::Error layout(const ffi::AnyBuffer& x, const ffi::AnyBuffer& scale, Layout* out) {
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


template <bool Center>
constexpr int kStats = Center ? 4 : 2;

template <bool Center, class A>
inline int stats_exponent(const A* stats) {
  return int(stats[kStats<Center> - 1]);
}

// Statistics of the row `buf` (A values), which is scaled in place by 2^-e where needed.
template <bool Center, class A>
inline void row_stats(A* buf, int64_t h, double eps, A* stats) {
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
  if constexpr (Center) {
    stats[0] = mean, stats[1] = residual, stats[2] = rstd, stats[3] = A(e);
  } else {
    stats[0] = rstd, stats[1] = A(e);
  }
}

// The normalized value of a (scaled) entry v of a row with these statistics.
template <bool Center, class A>
inline A normalized(A v, const A* stats) {
  if constexpr (Center) {
    return ((v - stats[0]) - stats[1]) * stats[2];
  } else {
    return v * stats[0];
  }
}

// The row x loaded and scaled by its statistics' 2^-e, into out (a separate loop for e != 0,
// so that the common one has no ldexp and vectorizes).
template <bool Center, class T, class A>
inline void load_scaled(const T* x, int64_t h, const A* stats, A* out) {
  const int e = stats_exponent<Center>(stats);
  if (e == 0) {
    for (int64_t i = 0; i < h; ++i) out[i] = load(x[i]);
  } else {
    for (int64_t i = 0; i < h; ++i) out[i] = std::ldexp(load(x[i]), -e);
  }
}

// The gradient of a row's input from xhat and gs (the output's cotangent times the gain):
// dx = 2^-e rstd (gs - mean(gs) - xhat mean(gs xhat)) (RMS: without mean(gs)), into out (which
// may be gs).
template <bool Center, class A>
inline void input_grad(const A* xhat, const A* gs, int64_t h, const A* stats, A* out) {
  const A n = A(h), rstd = Center ? stats[2] : stats[0];
  const int e = stats_exponent<Center>(stats);
  const A a = Center ? lane_sum<A>(h, [&](int64_t i) { return gs[i]; }) / n : A(0);
  const A m = lane_sum<A>(h, [&](int64_t i) { return gs[i] * xhat[i]; }) / n;
  if (e == 0) {
    for (int64_t i = 0; i < h; ++i) out[i] = (gs[i] - a - xhat[i] * m) * rstd;
  } else {
    for (int64_t i = 0; i < h; ++i) out[i] = std::ldexp((gs[i] - a - xhat[i] * m) * rstd, -e);
  }
}

}  // namespace lnjax

#endif  // LNJAX_ROWS_H_
