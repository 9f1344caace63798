// Shared by the fused recurrent steps (lstm_step.cc, gru_step.cc): float32 exp, sigmoid and
// tanh that vectorize, the rows and chunks of a step, a normalized term of a row, and the
// dispatch over the terms' kinds (0: none, 1: layer norm, 2: RMS norm) and the dtype.
#ifndef LNJAX_CELLS_H_
#define LNJAX_CELLS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "rows.h"

namespace lnjax {

// exp, sigmoid and tanh for float32 without libm calls, so that the gate loops vectorize: exp
// by Cody-Waite range reduction and Cephes' degree-6 polynomial (about 1 ulp), scaled by 2^n
// through the exponent bits; tanh by Cephes' odd polynomial below 0.625 and 1 - 2/(e^2x + 1)
// above. float64 keeps libm's.
inline float exp_f32(float x) {
  x = x > 88.0f ? 88.0f : x;  // 2^n stays a normal float
  x = x < -87.0f ? -87.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return (poly * r * r + r + 1.0f) * scale;
}

inline float tanh_f32(float x) {
  const float a = std::fabs(x), z = x * x;
  float poly = -5.70498872745e-3f;
  poly = poly * z + 2.06390887954e-2f;
  poly = poly * z - 5.37397155531e-2f;
  poly = poly * z + 1.33314422036e-1f;
  poly = poly * z - 3.33332819422e-1f;
  const float small = x + x * z * poly;
  const float large = 1.0f - 2.0f / (exp_f32(2.0f * a) + 1.0f);
  return a < 0.625f ? small : std::copysign(large, x);
}

template <class A>
inline A sigmoid(A v) {
  if constexpr (std::is_same_v<A, float>) {
    return 1.0f / (1.0f + exp_f32(-v));
  } else {
    return A(1) / (A(1) + std::exp(-v));
  }
}

template <class A>
inline A tanh_(A v) {
  if constexpr (std::is_same_v<A, float>) {
    return tanh_f32(v);
  } else {
    return std::tanh(v);
  }
}

struct Step {
  int64_t rows, h, groups;
  Layout L;  // chunks of rows, with h the width of the pre-activations (4H or 3H)
};

// The rows of the carry `c` [..., H] and the groups of a [..., H] parameter `g`.
inline ffi::Error step_layout(const ffi::AnyBuffer& c, const ffi::AnyBuffer& g, int gates, Step* out) {
  const int64_t h = c.dimensions().back();
  const int64_t rows = h == 0 ? 0 : int64_t(c.element_count()) / h;
  const int64_t groups = h == 0 ? 1 : int64_t(g.element_count()) / h;
  if (groups < 1 || rows % groups) return ffi::Error::InvalidArgument("groups must divide the rows");
  const int64_t per_group = rows / groups, per_chunk = chunk_rows(gates * h);
  *out = Step{rows, h, groups,
              Layout{rows, gates * h, groups, per_group, per_chunk, (per_group + per_chunk - 1) / per_chunk}};
  return ffi::Error::Success();
}

// N(v) of a row into z (gain g, bias b), saving its statistics (kind 1: layer, 2: RMS).
template <int Kind, class A>
inline void norm_row(const A* v, int64_t n, const A* g, const A* b, double eps, A* stats, A* buf, A* z) {
  std::copy(v, v + n, buf);
  row_stats<Kind == 1>(buf, n, eps, stats);
  for (int64_t i = 0; i < n; ++i) z[i] = normalized<Kind == 1>(buf[i], stats) * g[i] + b[i];
}

// Calls f with std::integral_constant values of the kinds (0, 1, 2 each).
template <class F>
ffi::Error kinds(int64_t kh, int64_t kc, F&& f) {
  auto with_kc = [&](auto h_kind) -> ffi::Error {
    switch (kc) {
      case 0: return f(h_kind, std::integral_constant<int, 0>{});
      case 1: return f(h_kind, std::integral_constant<int, 1>{});
      case 2: return f(h_kind, std::integral_constant<int, 2>{});
      default: return ffi::Error::InvalidArgument("kc must be 0, 1 or 2");
    }
  };
  switch (kh) {
    case 0: return with_kc(std::integral_constant<int, 0>{});
    case 1: return with_kc(std::integral_constant<int, 1>{});
    case 2: return with_kc(std::integral_constant<int, 2>{});
    default: return ffi::Error::InvalidArgument("kh must be 0, 1 or 2");
  }
}

template <class F>
ffi::Error real(ffi::DataType dtype, F&& f) {
  switch (dtype) {
    case ffi::DataType::F32: return f(float{});
    case ffi::DataType::F64: return f(double{});
    default: return ffi::Error::InvalidArgument("the LSTM step computes in float32 or float64");
  }
}

}  // namespace lnjax

#endif  // LNJAX_CELLS_H_
