// The whole MAF-RQS ensemble of models/maf.py (MAFEnsemble.log_prob) and the gradient of
// every parameter, fused: per member, chunks of S events run forward through every
// transform (masked MADE with context, then the spline) and straight back, so that the
// activations of a chunk stay in cache and no step is a separate tensor operation.
//
// At the OnlineFlow's sizes (4 features, 16 hidden units, 5 members, minibatch 256) autograd
// spends most of a step dispatching ~2,000 small operations; here the step is arithmetic,
// about a third of the CPU time of autograd with the spline kernel on this project's AMD
// EPYC (AVX2, FMA; benchmarks/online_flow_speed.py). Every inner loop runs over the S events
// of a chunk (layout [unit][event]), written with GCC/Clang vector types, 8 events a
// vector; weight gradients are summed over a chunk's events and added to one accumulator
// per weight, written out (masked, clipped) once per member. The MADE's masks zero
// about half the weights: hidden units are taken in order of their degree (``perm``), which
// makes every masked column's non-zero rows a prefix, and only the prefix is computed. The
// tables that gather a member's weights (masked, permuted) and scatter its gradients are
// built once per thread for a flow's shape. S = 64 measured best (32: +20%, 128: +10%).
//
// Layouts are MAFEnsemble's parameters (contiguous): in_weight (T,M,F,H), in_bias (T,M,1,H),
// context_weight (T,M,C,H), context_bias (T,M,1,H), block_weight (T,NB,2,M,H,H), block_bias
// (T,NB,2,M,1,H), block_context_weight (T,NB,M,C,H), block_context_bias (T,NB,M,1,H),
// out_weight (T,M,H,F·P), out_bias (T,M,1,F·P), P = 3K-1 spline parameters per feature
// grouped by kind (as models/spline_kernel.cpp). float32 tensors are computed in float,
// float64 in double.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

constexpr int S = 64;  // events per chunk: the length of every inner loop
constexpr int W = 8;   // lanes of a vector (8 floats: one AVX register; 8 doubles: two)
constexpr int NV = S / W;
// Gradient accumulators: one value per weight, each chunk's vector of partial sums added
// across its lanes (L = W lanes per weight, reduced once per member, took 3-4% longer per
// training step: 8x the memory to clear, reduce and keep in cache).
constexpr int L = 1;
constexpr double kMinBinWidth = 1e-3;  // nflows' defaults, as in models/maf.py
constexpr double kMinBinHeight = 1e-3;
constexpr double kMinDerivative = 1e-3;
constexpr double kLog2Pi = 1.8378770664093453;

// GCC/Clang vector extensions: the arithmetic below is written on 8 events at once, so
// that it is vectorised whatever the compiler's loop analysis makes of it.
using f8 = float __attribute__((vector_size(32)));
using i8 = int32_t __attribute__((vector_size(32)));
using d8 = double __attribute__((vector_size(64)));
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  using type = f8;
};
template <>
struct VecOf<double> {
  using type = d8;
};
template <typename T>
using Vec = typename VecOf<T>::type;

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
inline void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof v);
}
template <typename T>
inline Vec<T> splat(T x) {
  return Vec<T>{} + x;
}
template <typename V>
inline V vmax(V a, V b) {
  return a < b ? b : a;  // std::max's choice
}
template <typename V>
inline V vmin(V a, V b) {
  return b < a ? b : a;  // std::min's choice
}

// exp(x) for x <= 0 and log(x) for normal x > 0 in float: Cephes' polynomials (relative
// error ~1e-7), vectorised. Below -87 (exp < 1.6e-38, a softmax term that cannot matter)
// exp returns exp(-87). In double: std::exp and std::log, lane by lane (the reference).
inline f8 exp_nonpositive(f8 x) {
  x = vmax(x, splat(-87.0f));
  const i8 n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, i8);  // round
  const f8 fn = __builtin_convertvector(n, f8);
  const f8 r = (x - fn * 0.693359375f) - fn * -2.12194440e-4f;
  f8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const f8 e = p * r * r + r + 1.0f;
  const i8 bits = (n + 127) << 23;
  return e * (f8)bits;
}

// log(1 + m) for m in [sqrt(1/2) - 1, sqrt(2) - 1]: Cephes' logf polynomial
inline f8 log1p_small(f8 m) {
  const f8 z = m * m;
  f8 y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  return m + (y * m * z - 0.5f * z);
}

inline f8 log_positive(f8 x) {
  const i8 bits = (i8)x;
  f8 e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, f8);
  const i8 mant_bits = (bits & static_cast<int32_t>(0x807fffffu)) | 0x3f000000;  // [0.5, 1)
  f8 m = (f8)mant_bits;
  const i8 small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const f8 z = m * m;
  f8 y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

// log(1 + e) for e in [0, 1], without the rounding of 1 + e (softplus of a negative value)
inline f8 log1p_unit(f8 e) {
  return e < 0.41421356f ? log1p_small(e) : log_positive(1.0f + e);
}
inline d8 log1p_unit(d8 e) {
  for (int l = 0; l < W; ++l) e[l] = std::log1p(e[l]);
  return e;
}

inline d8 exp_nonpositive(d8 x) {
  for (int l = 0; l < W; ++l) x[l] = std::exp(x[l]);
  return x;
}
inline d8 log_positive(d8 x) {
  for (int l = 0; l < W; ++l) x[l] = std::log(x[l]);
  return x;
}

struct Dims {
  int64_t members, events;
  int features, transforms, hidden, blocks, bins, context;
  double bound;
};

// Pointers to the ten parameter tensors (or their gradients), in MAFEnsemble's order.
template <typename P>
struct Tensors {
  P in_w, in_b, ctx_w, ctx_b, blk_w, blk_b, blk_ctx_w, blk_ctx_b, out_w, out_b;
};

// One transform of one member, ready for a chunk: weights masked, hidden units permuted,
// stored column by column (WT[j][i]: the weights into unit j) with the prefix length of
// each column's non-zero rows; and the gradient accumulators, L lanes per entry.
template <typename T>
struct Span {  // a slice of a flat array
  T* p = nullptr;
  size_t n = 0;
  T* data() const { return p; }
  size_t size() const { return n; }
};

template <typename T>
struct Layer {
  Span<T> in_wt, ctx_w, ctx_b, in_b, w0t, w1t, blk_ctx_w, b0, b1, out_wt, out_b;
  std::vector<int> in_hi, w0_hi, w1_hi, out_hi;
  Span<T> g_in_wt, g_ctx_w, g_ctx_b, g_in_b, g_w0t, g_w1t, g_blk_ctx_w, g_b0, g_b1, g_out_wt,
      g_out_b;
};

// out[j][:] = bias[j] + sum_{i < hi[j]} wt[j][i]·in[i][:]
template <typename T>
void dense_forward(const T* __restrict wt, const int* hi, const T* __restrict bias, int n_in,
                   int n_out, const T* __restrict in, T* __restrict out) {
  using V = Vec<T>;
  for (int j = 0; j < n_out; ++j) {
    V acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = splat(bias[j]);
    const T* w = wt + static_cast<int64_t>(j) * n_in;
    for (int i = 0; i < hi[j]; ++i) {
      const T wi = w[i];
      const T* row = in + i * S;
      for (int v = 0; v < NV; ++v) acc[v] += wi * load(row + v * W);
    }
    for (int v = 0; v < NV; ++v) store(out + j * S + v * W, acc[v]);
  }
}

// g_in[i][:] += sum_j wt[j][i]·g_out[j][:] (i < hi[j]), row by row: each row of g_in is
// summed in registers and stored once.
template <typename T>
void dense_backward_input(const T* __restrict wt, const int* hi, int n_in, int n_out,
                          const T* __restrict g_out, T* __restrict g_in) {
  using V = Vec<T>;
  for (int i = 0; i < n_in; ++i) {
    V acc[NV];
    T* row = g_in + i * S;
    for (int v = 0; v < NV; ++v) acc[v] = load(row + v * W);
    for (int j = 0; j < n_out; ++j) {
      if (i >= hi[j]) continue;
      const T wi = wt[static_cast<int64_t>(j) * n_in + i];
      const T* g = g_out + j * S;
      for (int v = 0; v < NV; ++v) acc[v] += wi * load(g + v * W);
    }
    for (int v = 0; v < NV; ++v) store(row + v * W, acc[v]);
  }
}

// the sum of a vector's lanes
inline float lanes_total(f8 v) {
  v += __builtin_shuffle(v, i8{4, 5, 6, 7, 0, 1, 2, 3});
  v += __builtin_shuffle(v, i8{2, 3, 0, 1, 6, 7, 4, 5});
  v += __builtin_shuffle(v, i8{1, 0, 3, 2, 5, 4, 7, 6});
  return v[0];
}
inline double lanes_total(d8 v) {
  double sum = 0;
  for (int l = 0; l < W; ++l) sum += v[l];
  return sum;
}

// acc[0:L] += part's lanes, folded into L
template <typename T>
inline void accumulate(T* __restrict acc, Vec<T> part) {
  if constexpr (L == 1) {
    *acc += lanes_total(part);
  } else {
    store(acc, load(acc) + part);
  }
}

// acc[0:L] += the S products a·b folded into L lanes
template <typename T>
inline void lanes_dot(T* __restrict acc, const T* __restrict a, const T* __restrict b) {
  Vec<T> part = load(a) * load(b);
  for (int v = 1; v < NV; ++v) part += load(a + v * W) * load(b + v * W);
  accumulate(acc, part);
}

template <typename T>
inline void lanes_sum(T* __restrict acc, const T* __restrict a) {
  Vec<T> part = load(a);
  for (int v = 1; v < NV; ++v) part += load(a + v * W);
  accumulate(acc, part);
}

// g_wt[j][i] += in[i]·g_out[j] (i < hi[j]) and g_bias[j] += sum g_out[j], in lanes
template <typename T>
void dense_backward_weights(const int* hi, int n_in, int n_out, const T* in, const T* g_out,
                            T* g_wt, T* g_bias) {
  using V = Vec<T>;
  for (int j = 0; j < n_out; ++j) {
    const T* gp = g_out + j * S;
    V g[NV];
    for (int v = 0; v < NV; ++v) g[v] = load(gp + v * W);
    lanes_sum(g_bias + j * L, gp);
    T* gw = g_wt + static_cast<int64_t>(j) * n_in * L;
    for (int i = 0; i < hi[j]; ++i) {
      const T* a = in + i * S;
      V part[4];  // four chains, not one: the sum is latency-bound otherwise
      for (int v = 0; v < 4; ++v) part[v] = load(a + v * W) * g[v];
      for (int v = 4; v < NV; ++v) part[v % 4] += load(a + v * W) * g[v];
      accumulate(gw + i * L, (part[0] + part[1]) + (part[2] + part[3]));
    }
  }
}

template <typename T>
inline T reduce(const T* lanes) {
  T sum = 0;
  for (int l = 0; l < L; ++l) sum += lanes[l];
  return sum;
}

// Elementwise over n values (a multiple of W): out = max(in, 0); g = ref > 0 ? g : 0;
// out += in; out[j][:] += sum_q w[q][j]·ctx[q][:] for every unit j < h.
template <typename T>
inline void relu(T* __restrict out, const T* __restrict in, int n) {
  for (int i = 0; i < n; i += W) store(out + i, vmax(load(in + i), splat(T(0))));
}
template <typename T>
inline void keep_where_positive(T* __restrict g, const T* __restrict ref, int n) {
  for (int i = 0; i < n; i += W) {
    const Vec<T> r = load(ref + i);
    store(g + i, r > T(0) ? load(g + i) : splat(T(0)));
  }
}
template <typename T>
inline void add(T* __restrict out, const T* __restrict in, int n) {
  for (int i = 0; i < n; i += W) store(out + i, load(out + i) + load(in + i));
}
template <typename T>
inline void add_context(T* __restrict out, const T* __restrict w, const T* __restrict ctx,
                        int h, int c) {
  for (int j = 0; j < h; ++j)
    for (int v = 0; v < S; v += W) {
      Vec<T> acc = load(out + j * S + v);
      for (int q = 0; q < c; ++q) acc += w[q * h + j] * load(ctx + q * S + v);
      store(out + j * S + v, acc);
    }
}

// softmax over the K rows [k][S] of in, into out
template <typename T>
void softmax_rows(const T* __restrict in, T* __restrict out, int k) {
  using V = Vec<T>;
  for (int v = 0; v < S; v += W) {
    V top = load(in + v);
    for (int b = 1; b < k; ++b) top = vmax(top, load(in + b * S + v));
    V sum = splat(T(0));
    for (int b = 0; b < k; ++b) {
      const V e = exp_nonpositive(load(in + b * S + v) - top);
      store(out + b * S + v, e);
      sum += e;
    }
    const V inverse = T(1) / sum;
    for (int b = 0; b < k; ++b) store(out + b * S + v, load(out + b * S + v) * inverse);
  }
}

// min + softplus(v) (torch's: beta 1, threshold 20) and its slope sigmoid(v)
template <typename V>
inline void derivative(V v, V* d, V* slope) {
  using T = decltype(v[0] + 0);
  const V e = exp_nonpositive(v < T(0) ? v : -v);
  const V soft = vmax(v, splat(T(0))) + log1p_unit(e);
  *d = T(kMinDerivative) + (v > T(20) ? v : soft);
  const V inv = T(1) / (T(1) + e);
  *slope = v >= T(0) ? inv : e * inv;
}

// What the spline's backward pass takes from its forward pass, per transform: the width and
// height probabilities (F, K, S), and per (feature, event) the bin (-1 outside the bound),
// its left x knot, width and height, its end derivatives and their slopes.
template <typename T>
struct SplineSaved {
  T *width_probs, *height_probs, *idx, *x0, *w, *h, *d0, *d1, *s0, *s1;
};

template <typename T>
void spline_forward(const T* __restrict params, const T* __restrict x, SplineSaved<T> sv,
                    T* __restrict y, T* __restrict log_det, int n_features, int k, T bound) {
  using V = Vec<T>;
  const int fk = n_features * k;
  const T width_scale = T(1 - kMinBinWidth * k), height_scale = T(1 - kMinBinHeight * k);
  const T last = static_cast<T>(k - 1);
  const V zero = splat(T(0)), one = splat(T(1));
  for (int f = 0; f < n_features; ++f) {
    const T* wp = sv.width_probs + f * k * S;
    const T* hp = sv.height_probs + f * k * S;
    softmax_rows(params + f * k * S, sv.width_probs + f * k * S, k);
    softmax_rows(params + (fk + f * k) * S, sv.height_probs + f * k * S, k);
    const T* du = params + (2 * fk + f * (k - 1)) * S;
    for (int v = 0; v < S; v += W) {
      const int o = f * S + v;
      const V xv = load(x + o);
      const auto inside = (xv >= -bound) & (xv <= bound);
      const V u = (vmin(vmax(xv, splat(-bound)), splat(bound)) + bound) / (2 * bound);
      V x_left = zero, y_left = zero, x0 = zero, y0 = zero, x1 = one, y1 = one, idx = zero;
      V found = zero, du_lo = zero, du_hi = load(du + v);
      for (int b = 0; b < k - 1; ++b) {  // knot b+1 = knot b + the size of bin b
        const V x_right = x_left + T(kMinBinWidth) + width_scale * load(wp + b * S + v);
        const V y_right = y_left + T(kMinBinHeight) + height_scale * load(hp + b * S + v);
        const auto beyond = u >= x_right;
        const auto first_after = ~beyond & (found == T(0));
        x0 = beyond ? x_right : x0;
        y0 = beyond ? y_right : y0;
        x1 = first_after ? x_right : x1;
        y1 = first_after ? y_right : y1;
        du_lo = beyond ? load(du + b * S + v) : du_lo;  // interior b is knot b+1's
        if (b + 1 < k - 1) du_hi = beyond ? load(du + (b + 1) * S + v) : du_hi;
        found = beyond ? found : one;
        idx = beyond ? idx + T(1) : idx;
        x_left = x_right;
        y_left = y_right;
      }
      V d0, d1, s0, s1;
      derivative(du_lo, &d0, &s0);
      derivative(du_hi, &d1, &s1);
      d0 = idx == T(0) ? one : d0;  // the end knots: derivative 1, fixed
      s0 = idx == T(0) ? zero : s0;
      d1 = idx == last ? one : d1;
      s1 = idx == last ? zero : s1;
      const V w = x1 - x0, h = y1 - y0;
      const V inv_w = T(1) / w;
      const V sl = h * inv_w, theta = (u - x0) * inv_w, t1 = theta * (T(1) - theta);
      const V inv_den = T(1) / (sl + (d0 + d1 - T(2) * sl) * t1);
      const V numerator = sl * theta * theta + d0 * t1;
      const V shape =
          d1 * theta * theta + T(2) * sl * t1 + d0 * (T(1) - theta) * (T(1) - theta);
      const V y_in = T(2) * bound * (y0 + h * numerator * inv_den) - bound;
      const V ld_in = log_positive(sl * sl * shape * inv_den * inv_den);
      store(y + o, inside ? y_in : xv);  // linear tails (and NaN passes through)
      store(log_det + v, load(log_det + v) + (inside ? ld_in : zero));
      store(sv.idx + o, inside ? idx : splat(T(-1)));  // -1: outside, no gradient to params
      store(sv.x0 + o, x0);
      store(sv.w + o, w);
      store(sv.h + o, h);
      store(sv.d0 + o, d0);
      store(sv.d1 + o, d1);
      store(sv.s0 + o, s0);
      store(sv.s1 + o, s1);
    }
  }
}

// Gradients of x (g_x, F x S) and of the params (g_params, F·P x S) given those of y (g_y)
// and of log_det (g_ld, the same for every feature).
template <typename T>
void spline_backward(const T* __restrict x, SplineSaved<T> sv, const T* __restrict g_y,
                     const T* __restrict g_ld, T* __restrict g_x, T* __restrict g_params,
                     int n_features, int k, T bound) {
  using V = Vec<T>;
  const int fk = n_features * k;
  const T width_scale = T(1 - kMinBinWidth * k), height_scale = T(1 - kMinBinHeight * k);
  const T last = static_cast<T>(k - 1);
  const V zero = splat(T(0));
  for (int f = 0; f < n_features; ++f) {
    const T* wp = sv.width_probs + f * k * S;
    const T* hp = sv.height_probs + f * k * S;
    T* g_wu = g_params + f * k * S;
    T* g_hu = g_params + (fk + f * k) * S;
    T* g_du = g_params + (2 * fk + f * (k - 1)) * S;
    for (int v = 0; v < S; v += W) {
      const int o = f * S + v;
      const V idx = load(sv.idx + o);
      const auto inside = idx >= T(0);
      const V u = ((inside ? load(x + o) : zero) + bound) / (2 * bound);
      const V x0 = load(sv.x0 + o), w = load(sv.w + o), h = load(sv.h + o);
      const V d0 = load(sv.d0 + o), d1 = load(sv.d1 + o);
      const V inv_w = T(1) / w;
      const V sl = h * inv_w, theta = (u - x0) * inv_w, t1 = theta * (T(1) - theta);
      const V c = d0 + d1 - T(2) * sl;
      const V inv_den = T(1) / (sl + c * t1);
      const V a = sl * theta * theta + d0 * t1;
      const V inv_m =
          T(1) / (d1 * theta * theta + T(2) * sl * t1 + d0 * (T(1) - theta) * (T(1) - theta));
      // y = 2B·y_unit - B and u = (x + B) / 2B: gradients in interval units
      const V gyv = load(g_y + o);
      const V gy = inside ? T(2) * bound * gyv : zero;
      const V gl = inside ? load(g_ld + v) : zero;
      const V g_a = gy * h * inv_den;
      const V g_den = -(g_a * a + T(2) * gl) * inv_den;
      const V one_minus_2theta = T(1) - T(2) * theta;
      const V gl_m = gl * inv_m;
      const V g_theta = g_a * (T(2) * sl * theta + d0 * one_minus_2theta) +
                        g_den * c * one_minus_2theta +
                        T(2) * gl_m * (d1 * theta + sl * one_minus_2theta - d0 * (T(1) - theta));
      const V g_s = g_a * theta * theta + g_den * (T(1) - T(2) * t1) + T(2) * gl * w / h +
                    T(2) * t1 * gl_m;
      const V g_d0 = (g_a + g_den) * t1 + gl_m * (T(1) - theta) * (T(1) - theta);
      const V g_d1 = g_den * t1 + gl_m * theta * theta;
      const V g_h = gy * a * inv_den + g_s * inv_w;
      const V g_w = -(g_s * sl + g_theta * theta) * inv_w;
      store(g_x + o, inside ? g_theta * inv_w / (T(2) * bound) : gyv);
      const auto is_last = idx == last;  // knot K is fixed at 1
      const V g_x1 = is_last ? zero : g_w, g_y1 = is_last ? zero : g_h;
      const V g_x0 = -g_theta * inv_w - g_w, g_y0 = gy - g_h;
      // knot j = sum of the sizes left of it; sizes = min + scale·softmax(unnormalised)
      for (int pass = 0; pass < 2; ++pass) {
        const T* p = pass == 0 ? wp : hp;
        T* out = pass == 0 ? g_wu : g_hu;
        const T scale = pass == 0 ? width_scale : height_scale;
        const V g_left = scale * (pass == 0 ? g_x0 + g_x1 : g_y0 + g_y1);
        const V g_right = scale * (pass == 0 ? g_x1 : g_y1);
        V dot = zero;
        for (int b = 0; b < k; ++b) {
          const T bf = static_cast<T>(b);
          const V g = bf < idx ? g_left : (bf == idx ? g_right : zero);
          dot += load(p + b * S + v) * g;
        }
        for (int b = 0; b < k; ++b) {
          const T bf = static_cast<T>(b);
          const V g = bf < idx ? g_left : (bf == idx ? g_right : zero);
          store(out + b * S + v, inside ? load(p + b * S + v) * (g - dot) : zero);
        }
      }
      // interior derivative j is knot j+1's: d0 when j + 1 == idx, d1 when j == idx
      const V gd0 = load(sv.s0 + o) * g_d0, gd1 = load(sv.s1 + o) * g_d1;
      for (int j = 0; j < k - 1; ++j) {
        const T jf = static_cast<T>(j);
        store(g_du + j * S + v, jf + T(1) == idx ? gd0 : (jf == idx ? gd1 : zero));
      }
    }
  }
}

template <typename T>
class Flow {
 public:
  Flow(const Dims& d, Tensors<const T*> p, const T* in_mask, const T* hidden_mask,
       const T* out_mask, const int32_t* perm)
      : d_(d), p_(p) {
    const int t_n = d.transforms, f = d.features, h = d.hidden, nb = d.blocks, c = d.context;
    const int64_t m_n = d.members;
    const int fp = f * (3 * d.bins - 1);
    fp_ = fp;
    key_.assign(in_mask, in_mask + f * h);
    key_.insert(key_.end(), hidden_mask, hidden_mask + h * h);
    key_.insert(key_.end(), out_mask, out_mask + h * fp);
    perm_.assign(perm, perm + h);
    layers_.resize(t_n);
    const size_t per_layer =
        h * f + c * h + 2 * h + 2 * nb * h * h + nb * c * h + 2 * nb * h + fp * h + fp;
    weights_.assign(per_layer * t_n, T(0));  // masked entries stay 0
    grads_.assign(per_layer * t_n * L, T(0));
    size_t used = 0;
    for (auto& ly : layers_) {
      auto carve = [&](Span<T>& w, Span<T>& g, size_t n) {
        w = {weights_.data() + used, n};
        g = {grads_.data() + used * L, n * L};
        used += n;
      };
      carve(ly.in_wt, ly.g_in_wt, h * f);
      carve(ly.ctx_w, ly.g_ctx_w, c * h);
      carve(ly.ctx_b, ly.g_ctx_b, h);
      carve(ly.in_b, ly.g_in_b, h);
      carve(ly.w0t, ly.g_w0t, nb * h * h);
      carve(ly.w1t, ly.g_w1t, nb * h * h);
      carve(ly.blk_ctx_w, ly.g_blk_ctx_w, nb * c * h);
      carve(ly.b0, ly.g_b0, nb * h);
      carve(ly.b1, ly.g_b1, nb * h);
      carve(ly.out_wt, ly.g_out_wt, fp * h);
      carve(ly.out_b, ly.g_out_b, fp);
      ly.in_hi.resize(h), ly.w0_hi.resize(nb * h), ly.w1_hi.resize(nb * h), ly.out_hi.resize(fp);
    }
    // Where each scratch entry comes from: tensor, offset (member 0), member stride, mask.
    // Unit j of ours is unit perm[j] of the parameters'.
    const int32_t* pm = perm;
    // Masked entries are left out: their weight stays 0, their gradient is 0 (the caller
    // zeroes the gradient tensors).
    auto entry = [&](const Span<T>& w, const Span<T>&, int q, int tensor, int64_t base,
                     int64_t stride, T mask, bool accumulate) {
      if (mask == T(0)) return;
      const auto index = static_cast<int32_t>(w.data() + q - weights_.data());
      table_.push_back({index, tensor, base, stride, mask, accumulate});
    };
    auto prefix = [](auto nonzero, int n) {
      int hi = 0;
      for (int i = 0; i < n; ++i)
        if (nonzero(i)) hi = i + 1;
      return hi;
    };
    for (int t = 0; t < t_n; ++t) {
      Layer<T>& ly = layers_[t];
      for (int j = 0; j < h; ++j) {
        const int u = pm[j];
        for (int i = 0; i < f; ++i)
          entry(ly.in_wt, ly.g_in_wt, j * f + i, 0, t * m_n * f * h + i * h + u, f * h,
                in_mask[i * h + u], false);
        ly.in_hi[j] = prefix([&](int i) { return in_mask[i * h + u] != T(0); }, f);
        entry(ly.in_b, ly.g_in_b, j, 1, t * m_n * h + u, h, T(1), false);
        for (int q = 0; q < c; ++q)
          entry(ly.ctx_w, ly.g_ctx_w, q * h + j, 2, t * m_n * c * h + q * h + u, c * h, T(1),
                false);
        entry(ly.ctx_b, ly.g_ctx_b, j, 3, t * m_n * h + u, h, T(1), false);
      }
      for (int b = 0; b < nb; ++b) {
        for (int k = 0; k < 2; ++k) {
          const Span<T>& w = k == 0 ? ly.w0t : ly.w1t;
          const Span<T>& g = k == 0 ? ly.g_w0t : ly.g_w1t;
          int* hi = (k == 0 ? ly.w0_hi.data() : ly.w1_hi.data()) + b * h;
          const int64_t tbk = (static_cast<int64_t>(t) * nb + b) * 2 + k;
          for (int j = 0; j < h; ++j) {
            for (int i = 0; i < h; ++i)
              entry(w, g, (b * h + j) * h + i, 4, tbk * m_n * h * h + pm[i] * h + pm[j], h * h,
                    hidden_mask[pm[i] * h + pm[j]], false);
            hi[j] = prefix([&](int i) { return hidden_mask[pm[i] * h + pm[j]] != T(0); }, h);
          }
          const Span<T>& bias = k == 0 ? ly.b0 : ly.b1;
          const Span<T>& g_bias = k == 0 ? ly.g_b0 : ly.g_b1;
          for (int j = 0; j < h; ++j)
            entry(bias, g_bias, b * h + j, 5, tbk * m_n * h + pm[j], h, T(1), false);
        }
        const int64_t tb = static_cast<int64_t>(t) * nb + b;
        for (int j = 0; j < h; ++j) {
          for (int q = 0; q < c; ++q)
            entry(ly.blk_ctx_w, ly.g_blk_ctx_w, (b * c + q) * h + j, 6,
                  tb * m_n * c * h + q * h + pm[j], c * h, T(1), false);
          // the block's context bias adds to its first bias: one sum, two gradients
          entry(ly.b0, ly.g_b0, b * h + j, 7, tb * m_n * h + pm[j], h, T(1), true);
        }
      }
      for (int k = 0; k < fp; ++k) {
        for (int i = 0; i < h; ++i)
          entry(ly.out_wt, ly.g_out_wt, k * h + i, 8, t * m_n * h * fp + pm[i] * fp + k,
                h * fp, out_mask[pm[i] * fp + k], false);
        ly.out_hi[k] = prefix([&](int i) { return out_mask[pm[i] * fp + k] != T(0); }, h);
        entry(ly.out_b, ly.g_out_b, k, 9, t * m_n * fp + k, fp, T(1), false);
      }
    }
    // in the parameters' order: a member's weights are read, and its gradients written,
    // front to back (the block's context bias, which adds to b0, stays after its bias)
    std::stable_sort(table_.begin(), table_.end(), [](const Entry& a, const Entry& b) {
      return a.tensor != b.tensor ? a.tensor < b.tensor : a.offset < b.offset;
    });
    values_.assign(table_.size(), T(0));
    // activations of one chunk, per transform
    per_t_ = f + h + (nb + 1) * h + nb * h + 2 * f * d.bins + 8 * f;
    acts_.assign(static_cast<size_t>(t_n) * per_t_ * S, T(0));
  }

  // Whether this flow was built for these sizes, masks and unit order (all but the events).
  bool matches(const Dims& d, const T* in_mask, const T* hidden_mask, const T* out_mask,
               const int32_t* perm) const {
    const int f = d.features, h = d.hidden, fp = f * (3 * d.bins - 1);
    if (d.members != d_.members || f != d_.features || d.transforms != d_.transforms ||
        h != d_.hidden || d.blocks != d_.blocks || d.bins != d_.bins || d.context != d_.context)
      return false;
    const T* k = key_.data();
    return std::equal(in_mask, in_mask + f * h, k) &&
           std::equal(hidden_mask, hidden_mask + h * h, k + f * h) &&
           std::equal(out_mask, out_mask + h * fp, k + f * h + h * h) &&
           std::equal(perm, perm + h, perm_.begin());
  }

  // The parameters, events and bound of the next run.
  void bind(const Dims& d, Tensors<const T*> p) {
    d_ = d;
    p_ = p;
  }

  // log p (M, N); with g_log_prob (M, N) also every parameter's gradient (written to g),
  // each member's scaled to norm <= max_norm when max_norm > 0; norms (M) before scaling.
  void run(const T* z, const T* context, const T* g_log_prob, T* log_prob, Tensors<T*> g,
           double max_norm, double* norms) {
    const bool grads = g_log_prob != nullptr;
    for (int64_t m = 0; m < d_.members; ++m) {
      load_member(m, grads);
      for (int64_t start = 0; start < d_.events; start += S) {
        const int n = static_cast<int>(std::min<int64_t>(S, d_.events - start));
        chunk(m, start, n, z, context, g_log_prob, log_prob, grads);
      }
      if (grads) {
        const double norm = std::sqrt(reduce_grads());
        if (norms != nullptr) norms[m] = norm;
        const double scale = max_norm > 0 ? std::min(1.0, max_norm / (norm + 1e-6)) : 1.0;
        write_grads(m, g, static_cast<T>(scale));
      }
    }
  }

 private:
  struct Entry {
    int32_t weight;  // our (masked, permuted) weight: its index in weights_ (and grads_ / L)
    int32_t tensor;  // which of the ten parameters
    int64_t offset;  // the element's offset in it for member 0
    int64_t stride;  // its member stride
    T mask;
    bool accumulate;  // adds to the weight (b0 = block bias + block context bias)
  };

  template <typename P>
  static std::array<P, 10> all(Tensors<P> p) {
    return {p.in_w, p.in_b, p.ctx_w, p.ctx_b, p.blk_w, p.blk_b, p.blk_ctx_w, p.blk_ctx_b,
            p.out_w, p.out_b};
  }

  void load_member(int64_t m, bool grads) {
    const std::array<const T*, 10> src = all(p_);
    T* w = weights_.data();
    for (const Entry& e : table_) {
      const T value = src[e.tensor][e.offset + m * e.stride] * e.mask;
      w[e.weight] = e.accumulate ? w[e.weight] + value : value;
    }
    if (grads) std::fill(grads_.begin(), grads_.end(), T(0));
  }

  // Each table entry's gradient (its lanes summed, masked) into values_; returns the sum of
  // their squares.
  double reduce_grads() {
    double squares = 0;
    for (size_t q = 0; q < table_.size(); ++q) {
      const Entry& e = table_[q];
      const T value = reduce(grads_.data() + static_cast<int64_t>(e.weight) * L) * e.mask;
      values_[q] = value;
      squares += static_cast<double>(value) * static_cast<double>(value);
    }
    return squares;
  }

  // Writes member m's gradients, scaled, into g.
  void write_grads(int64_t m, Tensors<T*> g, T scale) {
    const std::array<T*, 10> dst = all(g);
    for (size_t q = 0; q < table_.size(); ++q) {
      const Entry& e = table_[q];
      dst[e.tensor][e.offset + m * e.stride] = scale == T(1) ? values_[q] : values_[q] * scale;
    }
  }

  // the activations of transform t in this chunk
  struct Acts {
    T *x, *ctx_pre, *h, *inner;
    SplineSaved<T> sv;
  };
  Acts acts(int t) {
    const int f = d_.features, h = d_.hidden, nb = d_.blocks, k = d_.bins;
    T* p = acts_.data() + static_cast<size_t>(t) * per_t_ * S;
    Acts a;
    a.x = p, p += f * S;
    a.ctx_pre = p, p += h * S;
    a.h = p, p += (nb + 1) * h * S;
    a.inner = p, p += nb * h * S;
    a.sv.width_probs = p, p += f * k * S;
    a.sv.height_probs = p, p += f * k * S;
    for (T** q : {&a.sv.idx, &a.sv.x0, &a.sv.w, &a.sv.h, &a.sv.d0, &a.sv.d1, &a.sv.s0, &a.sv.s1})
      *q = p, p += f * S;
    return a;
  }

  void chunk(int64_t m, int64_t start, int n, const T* z, const T* context, const T* g_log_prob,
             T* log_prob, bool grads) {
    const int f = d_.features, h = d_.hidden, c = d_.context, nb = d_.blocks, k = d_.bins;
    const int fp = fp_;
    const T bound = static_cast<T>(d_.bound);
    std::vector<T>& buf = scratch_;
    const size_t need = static_cast<size_t>(c + 3 * f + 2 + fp + 3 * h) * S;
    if (buf.size() < need) buf.assign(need, T(0));
    T* ctx = buf.data();           // C x S
    T* x = ctx + c * S;            // F x S: the current input
    T* y = x + f * S;              // F x S
    T* ld = y + f * S;             // S
    T* params = ld + S;            // FP x S (and the params' gradient backward)
    T* tmp = params + fp * S;      // H x S
    T* tmp2 = tmp + h * S;         // H x S
    T* g_xs = tmp2 + h * S;        // F x S
    T* gl = g_xs + f * S;          // S
    T* g_inner = gl + S;           // H x S
    for (int s = 0; s < S; ++s) {
      const bool real = s < n;
      for (int q = 0; q < c; ++q) ctx[q * S + s] = real ? context[(start + s) * c + q] : T(0);
      for (int i = 0; i < f; ++i) x[i * S + s] = real ? z[(start + s) * f + i] : T(0);
      ld[s] = 0;
      gl[s] = (grads && real) ? g_log_prob[m * d_.events + start + s] : T(0);
    }
    for (int t = 0; t < d_.transforms; ++t) {
      Layer<T>& ly = layers_[t];
      Acts a = acts(t);
      std::memcpy(a.x, x, sizeof(T) * f * S);
      for (int j = 0; j < h; ++j)
        for (int s = 0; s < S; ++s) a.ctx_pre[j * S + s] = ly.ctx_b.data()[j];
      add_context(a.ctx_pre, ly.ctx_w.data(), ctx, h, c);
      dense_forward(ly.in_wt.data(), ly.in_hi.data(), ly.in_b.data(), f, h, a.x, a.h);
      relu(tmp, a.ctx_pre, h * S);
      add(a.h, tmp, h * S);
      for (int b = 0; b < nb; ++b) {
        const T* hb = a.h + b * h * S;
        T* hn = a.h + (b + 1) * h * S;
        T* inner = a.inner + b * h * S;
        relu(tmp, hb, h * S);
        dense_forward(ly.w0t.data() + b * h * h, ly.w0_hi.data() + b * h, ly.b0.data() + b * h,
                      h, h, tmp, inner);
        add_context(inner, ly.blk_ctx_w.data() + b * c * h, ctx, h, c);
        relu(tmp, inner, h * S);
        dense_forward(ly.w1t.data() + b * h * h, ly.w1_hi.data() + b * h, ly.b1.data() + b * h,
                      h, h, tmp, hn);
        add(hn, hb, h * S);
      }
      dense_forward(ly.out_wt.data(), ly.out_hi.data(), ly.out_b.data(), h, fp,
                    a.h + nb * h * S, params);
      spline_forward(params, a.x, a.sv, y, ld, f, k, bound);
      for (int i = 0; i < f; ++i) std::memcpy(x + i * S, y + (f - 1 - i) * S, sizeof(T) * S);
    }
    for (int s = 0; s < n; ++s) {
      T base = 0;
      for (int i = 0; i < f; ++i) base += x[i * S + s] * x[i * S + s];
      log_prob[m * d_.events + start + s] = T(-0.5) * base - T(0.5 * kLog2Pi) * f + ld[s];
    }
    if (!grads) return;
    // backward: g_x is the gradient of the current input (the output, at first)
    T* g_x = x;  // reused: x[i][s] becomes -x·gl
    for (int i = 0; i < f * S; ++i) g_x[i] = -x[i] * gl[i % S];
    T* g_y = y;
    for (int t = d_.transforms - 1; t >= 0; --t) {
      Layer<T>& ly = layers_[t];
      Acts a = acts(t);
      for (int i = 0; i < f; ++i) std::memcpy(g_y + i * S, g_x + (f - 1 - i) * S, sizeof(T) * S);
      spline_backward(a.x, a.sv, g_y, gl, g_xs, params, f, k, bound);
      const T* h_last = a.h + nb * h * S;
      dense_backward_weights(ly.out_hi.data(), h, fp, h_last, params, ly.g_out_wt.data(),
                             ly.g_out_b.data());
      T* g_h = tmp2;
      std::fill(g_h, g_h + h * S, T(0));
      dense_backward_input(ly.out_wt.data(), ly.out_hi.data(), h, fp, params, g_h);
      for (int b = nb - 1; b >= 0; --b) {
        const T* hb = a.h + b * h * S;
        const T* inner = a.inner + b * h * S;
        T* r = tmp;
        relu(r, inner, h * S);
        dense_backward_weights(ly.w1_hi.data() + b * h, h, h, r, g_h,
                               ly.g_w1t.data() + b * h * h * L, ly.g_b1.data() + b * h * L);
        std::fill(g_inner, g_inner + h * S, T(0));
        dense_backward_input(ly.w1t.data() + b * h * h, ly.w1_hi.data() + b * h, h, h, g_h,
                             g_inner);
        keep_where_positive(g_inner, inner, h * S);
        for (int j = 0; j < h; ++j)
          for (int q = 0; q < c; ++q)
            lanes_dot(ly.g_blk_ctx_w.data() + ((b * c + q) * h + j) * L, ctx + q * S,
                      g_inner + j * S);
        T* act = tmp;
        relu(act, hb, h * S);
        dense_backward_weights(ly.w0_hi.data() + b * h, h, h, act, g_inner,
                               ly.g_w0t.data() + b * h * h * L, ly.g_b0.data() + b * h * L);
        T* g_act = tmp;
        std::fill(g_act, g_act + h * S, T(0));
        dense_backward_input(ly.w0t.data() + b * h * h, ly.w0_hi.data() + b * h, h, h, g_inner,
                             g_act);
        keep_where_positive(g_act, hb, h * S);
        add(g_h, g_act, h * S);
      }
      dense_backward_weights(ly.in_hi.data(), f, h, a.x, g_h, ly.g_in_wt.data(),
                             ly.g_in_b.data());
      T* g_pre = tmp;
      std::memcpy(g_pre, g_h, sizeof(T) * h * S);
      keep_where_positive(g_pre, a.ctx_pre, h * S);
      for (int j = 0; j < h; ++j) {
        lanes_sum(ly.g_ctx_b.data() + j * L, g_pre + j * S);
        for (int q = 0; q < c; ++q)
          lanes_dot(ly.g_ctx_w.data() + (q * h + j) * L, ctx + q * S, g_pre + j * S);
      }
      if (t > 0) {
        std::memcpy(g_x, g_xs, sizeof(T) * f * S);
        dense_backward_input(ly.in_wt.data(), ly.in_hi.data(), f, h, g_h, g_x);
      }
    }
  }

  Dims d_;
  Tensors<const T*> p_;
  int fp_ = 0, per_t_ = 0;
  std::vector<Layer<T>> layers_;
  std::vector<Entry> table_;
  std::vector<T> weights_, grads_, values_, acts_, scratch_, key_;
  std::vector<int32_t> perm_;
};

}  // namespace

extern "C" {

// dims: members, events, features, transforms, hidden, blocks, bins, context. params and
// grads: the ten tensors in MAFEnsemble's order; masks: in (F,H), hidden (H,H), out (H,F·P)
// as in models/maf.py; perm: hidden units by degree. g_log_prob null: log_prob only.
// Returns 0, or -1 for sizes it does not take.
#define TRIGFARM_FLOW_ENTRY(T, SUFFIX)                                                         \
  int trigfarm_flow_##SUFFIX(const int64_t* dims, double bound, void* const* params,          \
                             const T* in_mask, const T* hidden_mask, const T* out_mask,       \
                             const int32_t* perm, const T* z, const T* context,              \
                             const T* g_log_prob, T* log_prob, void* const* grads,            \
                             double max_norm, double* norms) {                                \
    Dims d{dims[0], dims[1], static_cast<int>(dims[2]), static_cast<int>(dims[3]),            \
           static_cast<int>(dims[4]), static_cast<int>(dims[5]), static_cast<int>(dims[6]),   \
           static_cast<int>(dims[7]), bound};                                                 \
    if (d.bins < 2 || d.features < 1 || d.hidden < 1 || d.context < 1 || d.transforms < 1 ||  \
        d.blocks < 0)                                                                         \
      return -1;                                                                              \
    auto c = [&](int i) { return static_cast<const T*>(params[i]); };                         \
    Tensors<const T*> p{c(0), c(1), c(2), c(3), c(4), c(5), c(6), c(7), c(8), c(9)};           \
    Tensors<T*> g{};                                                                          \
    if (g_log_prob != nullptr) {                                                              \
      auto w = [&](int i) { return static_cast<T*>(grads[i]); };                              \
      g = {w(0), w(1), w(2), w(3), w(4), w(5), w(6), w(7), w(8), w(9)};                       \
    }                                                                                         \
    /* the tables of a flow's shape are built once per thread */                            \
    static thread_local std::unique_ptr<Flow<T>> flow;                                        \
    if (!flow || !flow->matches(d, in_mask, hidden_mask, out_mask, perm))                     \
      flow = std::make_unique<Flow<T>>(d, p, in_mask, hidden_mask, out_mask, perm);           \
    flow->bind(d, p);                                                                         \
    flow->run(z, context, g_log_prob, log_prob, g, max_norm, norms);                          \
    return 0;                                                                                 \
  }

TRIGFARM_FLOW_ENTRY(float, f32)
TRIGFARM_FLOW_ENTRY(double, f64)

}  // extern "C"
