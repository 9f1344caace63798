// Training-mode batch normalization over the rows of x [..., C] as XLA FFI handlers for the CPU.
//
// Column statistics in one pass over memory: the rows are cut into blocks of a fixed size (a
// function of C only), each block's mean and sum of squared deviations computed two-pass in
// cache (corrected: the residual sum(x - m) is removed), and the blocks combined in order by
// Chan, Golub & LeVeque's pairwise update, never E[x^2] - E[x]^2. Blocks run on XLA's intra-op
// pool; their order of combination is fixed, so the result does not depend on the threads.
// Then y = (x - mean) * rstd * scale + bias, by chunks of rows.
//
// `scale` and `bias` are [..., C] in the statistics dtype, their G leading entries dividing the
// rows into G independent batches (G = 1 normally; G > 1 under vmap): statistics per batch.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace ffi = xla::ffi;
using namespace lnjax;  // NOLINT: this file's kernels are lnjax's

namespace {

struct Columns {
  int64_t rows, c, groups, per_group, per_block, blocks_per_group;
  int64_t blocks() const { return groups * blocks_per_group; }
  int64_t begin(int64_t b) const { return (b / blocks_per_group) * per_group + (b % blocks_per_group) * per_block; }
  int64_t end(int64_t b) const { return std::min(begin(b) + per_block, (b / blocks_per_group + 1) * per_group); }
};

ffi::Error columns(const ffi::AnyBuffer& x, const ffi::AnyBuffer& scale, Columns* out) {
  auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("x must be [rows, C]");
  const int64_t c = dims.back();
  const int64_t rows = c == 0 ? 0 : int64_t(x.element_count()) / c;
  if (scale.dimensions().size() < 1 || scale.dimensions().back() != c)
    return ffi::Error::InvalidArgument("scale must be [..., C]");
  const int64_t groups = c == 0 ? 1 : int64_t(scale.element_count()) / c;
  if (groups < 1 || rows % groups) return ffi::Error::InvalidArgument("groups must divide the rows");
  const int64_t per_group = rows / groups;
  const int64_t per_block = std::max<int64_t>(1, 16384 / std::max<int64_t>(c, 1));  // ~64 KiB
  *out = Columns{rows, c, groups, per_group, per_block, (per_group + per_block - 1) / per_block};
  return ffi::Error::Success();
}

// One block's columns, two-pass in cache: the rounded mean m0, the residual mean(x - m0) (so
// that m0 + residual is the mean to within the precision of the deviations), and the sum of
// squared deviations from that mean.
template <class T>
void block_moments(const T* x, int64_t n, int64_t c, Acc<T>* m0, Acc<T>* residual, Acc<T>* m2) {
  using A = Acc<T>;
  std::fill(m0, m0 + c, A(0));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < c; ++j) m0[j] += load(x[r * c + j]);
  for (int64_t j = 0; j < c; ++j) m0[j] /= A(n);
  std::fill(m2, m2 + c, A(0));
  std::fill(residual, residual + c, A(0));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < c; ++j) {
      const A d = load(x[r * c + j]) - m0[j];
      residual[j] += d, m2[j] += d * d;
    }
  for (int64_t j = 0; j < c; ++j) {
    residual[j] /= A(n);
    m2[j] = std::max(m2[j] - A(n) * residual[j] * residual[j], A(0));
  }
}

// Per-block column sums of dy and dy * xhat.
template <class T>
void block_sums(const T* x, const T* dy, int64_t n, int64_t c, const Acc<T>* mean, const Acc<T>* residual,
                const Acc<T>* rstd, Acc<T>* sum_dy, Acc<T>* sum_dyx) {
  using A = Acc<T>;
  std::fill(sum_dy, sum_dy + c, A(0));
  std::fill(sum_dyx, sum_dyx + c, A(0));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < c; ++j) {
      const A d = load(dy[r * c + j]);
      sum_dy[j] += d, sum_dyx[j] += d * (((load(x[r * c + j]) - mean[j]) - residual[j]) * rstd[j]);
    }
}

// The block moments combined in order (Chan, Golub & LeVeque's update) in a wider type, the
// mean returned as a rounded `mean` and its `residual`, as the row kernels do.
template <class T>
void combine(const Columns& L, int64_t g, const Acc<T>* bm, const Acc<T>* br, const Acc<T>* bq, Acc<T>* mean,
             Acc<T>* residual, Acc<T>* var) {
  using A = Acc<T>;
  using W = std::conditional_t<std::is_same_v<A, double>, long double, double>;
  const int64_t c = L.c;
  std::vector<W> m(c, W(0)), q(c, W(0));
  W n = 0;
  for (int64_t b = g * L.blocks_per_group; b < (g + 1) * L.blocks_per_group; ++b) {
    const W nb = W(L.end(b) - L.begin(b)), total = n + nb;
    for (int64_t j = 0; j < c; ++j) {
      const W delta = (W(bm[b * c + j]) + W(br[b * c + j])) - m[j];
      m[j] += delta * (nb / total);
      q[j] += W(bq[b * c + j]) + delta * delta * (n * nb / total);
    }
    n = total;
  }
  for (int64_t j = 0; j < c; ++j) {
    mean[j] = A(m[j]);
    residual[j] = A(m[j] - W(mean[j]));
    var[j] = n > 0 ? A(q[j] / n) : A(0);
  }
}

template <class T>
void forward(ffi::ThreadPool& pool, const Columns& L, const T* x, T* y, const Acc<T>* scale, const Acc<T>* bias,
             double eps, Acc<T>* mean, Acc<T>* residual, Acc<T>* var) {
  using A = Acc<T>;
  const int64_t c = L.c;
  std::vector<A> bm(size_t(L.blocks() * c)), br(bm.size()), bq(bm.size());
  parallel_for(pool, L.blocks(), [&](int64_t b) {
    block_moments(x + L.begin(b) * c, L.end(b) - L.begin(b), c, bm.data() + b * c, br.data() + b * c,
                  bq.data() + b * c);
  });
  for (int64_t g = 0; g < L.groups; ++g)
    combine<T>(L, g, bm.data(), br.data(), bq.data(), mean + g * c, residual + g * c, var + g * c);
  parallel_for(pool, L.blocks(), [&](int64_t b) {
    const int64_t g = b / L.blocks_per_group;
    const A *m = mean + g * c, *res = residual + g * c, *v = var + g * c, *s = scale + g * c, *o = bias + g * c;
    for (int64_t r = L.begin(b); r < L.end(b); ++r)
      for (int64_t j = 0; j < c; ++j) {
        const A rstd = A(1) / std::sqrt(v[j] + A(eps));
        y[r * c + j] = store<T>(((load(x[r * c + j]) - m[j]) - res[j]) * rstd * s[j] + o[j]);
      }
  });
}

// dx = scale * rstd * (dy - mean_N(dy) - xhat * mean_N(dy * xhat)); dscale = sum_N(dy * xhat),
// dbias = sum_N(dy).
template <class T>
void backward(ffi::ThreadPool& pool, const Columns& L, const T* x, const T* dy, T* dx, const Acc<T>* scale,
              const Acc<T>* mean, const Acc<T>* residual, const Acc<T>* var, double eps, Acc<T>* dscale,
              Acc<T>* dbias) {
  using A = Acc<T>;
  const int64_t c = L.c;
  std::vector<A> rstd(size_t(L.groups * c));
  for (int64_t k = 0; k < L.groups * c; ++k) rstd[k] = A(1) / std::sqrt(var[k] + A(eps));
  std::vector<A> s1(size_t(L.blocks() * c)), s2(size_t(L.blocks() * c));
  parallel_for(pool, L.blocks(), [&](int64_t b) {
    const int64_t g = b / L.blocks_per_group;
    block_sums(x + L.begin(b) * c, dy + L.begin(b) * c, L.end(b) - L.begin(b), c, mean + g * c, residual + g * c,
               rstd.data() + g * c, s1.data() + b * c, s2.data() + b * c);
  });
  for (int64_t g = 0; g < L.groups; ++g) {
    A *db = dbias + g * c, *ds = dscale + g * c;
    std::fill(db, db + c, A(0));
    std::fill(ds, ds + c, A(0));
    for (int64_t b = g * L.blocks_per_group; b < (g + 1) * L.blocks_per_group; ++b)
      for (int64_t j = 0; j < c; ++j) db[j] += s1[b * c + j], ds[j] += s2[b * c + j];
  }
  parallel_for(pool, L.blocks(), [&](int64_t b) {
    const int64_t g = b / L.blocks_per_group;
    const A n = A(L.per_group);
    const A *m = mean + g * c, *res = residual + g * c, *rs = rstd.data() + g * c, *s = scale + g * c;
    const A *db = dbias + g * c, *ds = dscale + g * c;
    for (int64_t r = L.begin(b); r < L.end(b); ++r)
      for (int64_t j = 0; j < c; ++j) {
        const A xhat = ((load(x[r * c + j]) - m[j]) - res[j]) * rs[j];
        dx[r * c + j] = store<T>(s[j] * rs[j] * (load(dy[r * c + j]) - db[j] / n - xhat * (ds[j] / n)));
      }
  });
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::AnyBuffer bias,
                   ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean, ffi::Result<ffi::AnyBuffer> residual,
                   ffi::Result<ffi::AnyBuffer> var, double eps) {
  Columns L;
  if (auto err = columns(x, scale, &L); !err.success()) return err;
  return dispatch(x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    forward(pool, L, data<T>(x), data<T>(y), data<A>(scale), data<A>(bias), eps, data<A>(mean), data<A>(residual),
            data<A>(var));
    return ffi::Error::Success();
  });
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer scale,
                    ffi::AnyBuffer mean, ffi::AnyBuffer residual, ffi::AnyBuffer var, ffi::Result<ffi::AnyBuffer> dx,
                    ffi::Result<ffi::AnyBuffer> dscale, ffi::Result<ffi::AnyBuffer> dbias, double eps) {
  Columns L;
  if (auto err = columns(x, scale, &L); !err.success()) return err;
  return dispatch(x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    backward(pool, L, data<T>(x), data<T>(dy), data<T>(dx), data<A>(scale), data<A>(mean), data<A>(residual),
             data<A>(var), eps, data<A>(dscale), data<A>(dbias));
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LnjaxBatchNormForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<double>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LnjaxBatchNormBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<double>("eps"));
